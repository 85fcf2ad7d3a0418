"""The methods of an evaluation: ICD and every baseline a user would try, each a configuration of the
same online loop. A method is written ``name[:key=value,...]``, e.g. ``icd:selector=random``."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from icdistill.errors import ICDError
from icdistill.eval.baselines import (
    AbstainingStudent,
    KNNStudent,
    MemoStudent,
    NearestOrZeroShotStudent,
    SelfTeacher,
)
from icdistill.runner import Parts, RunConfig

_RUN_FIELDS = {f.name: f for f in fields(RunConfig)}


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method string: its name and its ``key=value`` options."""

    raw: str
    name: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        """A folder-safe name."""
        return "".join(c if c.isalnum() or c in "-_=." else "_" for c in self.raw.replace(":", "__"))


def parse_method(raw: str) -> MethodSpec:
    raw = raw.strip()
    name, _, body = raw.partition(":")
    options: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        if "=" not in part:
            raise ICDError(f"method {raw!r}: option {part!r} must be key=value")
        k, v = part.split("=", 1)
        options[k.strip().replace("-", "_")] = v.strip()
    if name not in METHODS:
        raise ICDError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    spec = MethodSpec(raw=raw, name=name, options=options)
    METHODS[name].check_options(spec)
    if name == "icd-random-gate" and options.get("calls", "match") not in ("match", "rate"):
        raise ICDError(f"method {raw!r}: calls must be match or rate, got {options['calls']!r}")
    return spec


def split_methods(text: str) -> list[MethodSpec]:
    """``"icd,knn-pool:k=3,icd:selector=random"`` -> specs. A comma starts a new method unless the
    part is a ``key=value`` option of the method before it."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ICDError("no methods given")
    groups: list[str] = []
    for p in parts:
        if "=" in p and ":" not in p and groups:
            groups[-1] += "," + p
        else:
            groups.append(p)
    specs = [parse_method(g) for g in groups]
    seen = [s.raw for s in specs]
    dup = {r for r in seen if seen.count(r) > 1}
    if dup:
        raise ICDError(f"method given twice: {', '.join(sorted(dup))}")
    return specs


def _cast(name: str, value: str) -> Any:
    f = _RUN_FIELDS[name]
    typ = str(f.type)
    if value.lower() in ("none", "null") and "None" in typ:
        return None
    try:
        if typ.startswith("int"):
            return int(value)
        if typ.startswith("float"):
            return float(value)
        if typ.startswith("bool"):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("1", "true", "yes")
    except ValueError as e:
        raise ICDError(f"option {name}={value!r} is not a valid {typ}") from e
    return value


@dataclass(frozen=True)
class Method:
    """How a method changes the base run config and the loaded parts.

    ``uses_budget``: run once per budget (gated methods) or once per seed (budget-free ones).
    ``accuracy_key``: the summary field that is the method's accuracy. ``options``: the method's own
    keys (besides any ``RunConfig`` field for the ICD family).
    """

    name: str
    description: str
    uses_budget: bool
    config: dict[str, Any] = field(default_factory=dict)
    options: dict[str, str] = field(default_factory=dict)  # own key -> help
    run_options: bool = False  # accepts any RunConfig field as key=value
    accuracy_key: str = "accuracy"
    resumable: bool = True
    wrap: Callable[[Parts, RunConfig, dict[str, str]], Parts] | None = None
    requires: Callable[[RunConfig], str | None] | None = None

    def check_options(self, spec: MethodSpec) -> None:
        for k in spec.options:
            if k in self.options or (self.run_options and k in _RUN_FIELDS and k not in ("seed", "budget")):
                continue
            known = sorted(self.options) + (["any `icd run` option"] if self.run_options else [])
            raise ICDError(f"method {spec.raw!r}: unknown option {k!r}; known: {', '.join(known) or 'none'}")

    def run_config(self, base: RunConfig, spec: MethodSpec, budget: float | None, seed: int) -> RunConfig:
        changes: dict[str, Any] = {"seed": seed, **self.config}
        if budget is not None:
            changes["budget"] = budget
        if self.run_options:
            changes.update({k: _cast(k, v) for k, v in spec.options.items() if k in _RUN_FIELDS})
        for k, v in spec.options.items():
            if k in self.options and k in _RUN_FIELDS:
                changes[k] = _cast(k, v)
        return replace(base, **changes)

    def refusal(self, cfg: RunConfig) -> str | None:
        return self.requires(cfg) if self.requires else None


def _knn(parts: Parts, cfg: RunConfig, opts: dict[str, str]) -> Parts:
    temperature = float(opts.get("temperature", 0.05))
    return replace(parts, student=KNNStudent(parts.embedder, temperature=temperature))


def _nearest_or_zero_shot(parts: Parts, cfg: RunConfig, opts: dict[str, str]) -> Parts:
    cos = float(opts.get("cos", 0.7))
    return replace(parts, student=NearestOrZeroShotStudent(parts.student, parts.embedder, cos=cos))


def _teacher_only(parts: Parts, cfg: RunConfig, opts: dict[str, str]) -> Parts:
    return replace(parts, student=AbstainingStudent())


def _self_label(parts: Parts, cfg: RunConfig, opts: dict[str, str]) -> Parts:
    memo = MemoStudent(parts.student)
    return replace(parts, student=memo, teacher=SelfTeacher(memo, seed=cfg.seed))


def _finetune(parts: Parts, cfg: RunConfig, opts: dict[str, str]) -> Parts:
    from icdistill.eval.finetune import LoRAStudent

    # the stream's seed also seeds the LoRA initialisation and the replay batches
    kwargs = {**LoRAStudent.parse_options(opts), "seed": cfg.seed}
    return replace(parts, student=LoRAStudent.from_student(parts.student, **kwargs))


def _needs_local_lm(cfg: RunConfig) -> str | None:
    if not cfg.student.startswith("local:smollm2"):
        return (
            f"finetune-online trains the student's weights and needs the local:smollm2 student, not "
            f"{cfg.student!r} (an API student cannot be fine-tuned here)"
        )
    if importlib.util.find_spec("peft") is None:
        return "finetune-online needs the peft package: pip install peft"
    return None


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "student-zero-shot",
            "the student alone, no demonstrations, no teacher",
            uses_budget=False,
            config={"gate": "never", "shots": 0},
            options={"student": "student spec, e.g. local:smollm2?zero_shot=plain"},
        ),
        Method(
            "teacher-zero-shot",
            "the teacher on every query (the ceiling and its price)",
            uses_budget=False,
            config={"gate": "always", "shots": 0, "answer": "forward", "judge": "off"},
            options={"teacher": "teacher spec", "samples": "teacher samples per query", "agreement": "floor"},
            wrap=_teacher_only,
        ),
        Method(
            "icd",
            "online in-context distillation (any `icd run` option as key=value)",
            uses_budget=True,
            run_options=True,
        ),
        Method(
            "icd-forward",
            "ICD answering the queries sent to the teacher with the teacher's answer",
            uses_budget=True,
            config={"answer": "forward"},
            run_options=True,
        ),
        Method(
            "icd-random-gate",
            "ICD with the teacher asked at random queries, as many times as icd on the same seed",
            uses_budget=True,
            config={"gate": "random"},
            options={
                "calls": "match (default): as many calls as icd on the same seed and budget, at random "
                "queries; rate: the target rate, paced like icd's gate",
            },
            run_options=True,
        ),
        Method(
            "knn-pool",
            "similarity-weighted k-NN vote over the teacher-labelled pool, its calls chosen by the same gate "
            "(its vote margin is its uncertainty); no LM",
            uses_budget=True,
            config={"shots": 3, "uncertainty": "margin", "judge": "off"},
            options={
                "shots": "neighbours that vote (default 3)",
                "temperature": "softmax temperature of the cosine weights (default 0.05)",
                "uncertainty": "margin (default) or entropy of the vote",
                "selector": "how neighbours are found (default: the ICD selector)",
            },
            wrap=_knn,
        ),
        Method(
            "knn-or-zero-shot",
            "a fixed switch, no learning: the nearest demo's answer if its cosine is >= cos, else the "
            "student's zero-shot answer",
            uses_budget=True,
            config={"judge": "off"},
            options={
                "cos": "the switch's cosine threshold (default 0.7)",
                "shots": "demos searched (default 2)",
            },
            wrap=_nearest_or_zero_shot,
        ),
        Method(
            "oracle-icl",
            "ICL with every earlier query's true label in the pool (accuracy of the first pass)",
            uses_budget=False,
            config={
                "gate": "always",
                "answer": "forward",
                "teacher": "reference",
                "samples": 1,
                "agreement": 0.0,
            },
            run_options=True,
            accuracy_key="first_pass_accuracy",
        ),
        Method(
            "self-label",
            "no teacher: the student's own answers enter the pool when N samples of its distribution agree",
            uses_budget=False,
            config={"gate": "always", "answer": "forward", "samples": 5, "agreement": 0.8, "judge": "off"},
            options={
                "samples": "samples drawn from the student (default 5)",
                "agreement": "floor (default 0.8)",
            },
            wrap=_self_label,
        ),
        Method(
            "finetune-online",
            "the student LM fine-tuned online with LoRA on the teacher's labels, same gate and budget",
            uses_budget=True,
            config={"shots": 0},
            options={
                "steps": "optimiser steps after each new label (default 8)",
                "lr": "learning rate (default 1e-3)",
                "rank": "LoRA rank (default 8)",
                "batch": "examples per step (default 8)",
            },
            resumable=False,
            wrap=_finetune,
            requires=_needs_local_lm,
        ),
    )
}
