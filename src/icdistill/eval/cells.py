"""An eval's cells: one method x budget x seed (``Cell``, and the folder its run writes), and the ``icd``
method the others are paired with (``reference_method``). The harness runs cells; the report reads them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from icdistill.eval.methods import MethodSpec, parse_method


@dataclass(frozen=True)
class Cell:
    spec: MethodSpec
    budget: float | None
    seed: int

    @property
    def path(self) -> Path:
        b = "no-budget" if self.budget is None else f"budget-{self.budget:g}"
        return Path("cells") / self.spec.slug / b / f"seed-{self.seed}"

    def label(self) -> str:
        b = "" if self.budget is None else f" @ {self.budget:.0%}"
        return f"{self.spec.raw}{b} seed {self.seed}"


def reference_method(methods: Sequence[str]) -> str | None:
    """The ``icd`` the others are paired with and ``icd-random-gate`` matches its call count to:
    plain ``icd`` when it runs, else the first ``icd:...`` listed; None without one."""
    specs = [parse_method(m) for m in methods]
    plain = [s.raw for s in specs if s.raw == "icd"]
    return (plain or [s.raw for s in specs if s.name == "icd"] or [None])[0]
