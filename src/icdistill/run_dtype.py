"""The precision a run's student runs in, kept with the run: ``config.json`` and ``summary.json`` record
it, and a resume on a machine whose default differs (``icdistill.models.precision``: bf16 where the
hardware multiplies it) is warned, since answers to near ties can differ from the interrupted run's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from icdistill.runlog import write_json_atomic


def student_dtype(student: Any) -> str | None:
    """The dtype a local or ``hf:`` student runs in (None for an API student)."""
    dtype = getattr(student, "dtype", None) or getattr(getattr(student, "model", None), "dtype", None)
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _stored(out: Path) -> dict[str, Any]:
    path = out / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):  # no run there yet, or a config the runner refuses itself
        return {}
    return data if isinstance(data, dict) else {}


def precision_warning(out: str | Path, student: Any) -> str | None:
    """A warning where a resumed run's student runs in another dtype than the run started in."""
    before = _stored(Path(out)).get("student_dtype")
    now = student_dtype(student)
    if before is None or before == now:
        return None
    return (
        f"the run in {out} started with its student in {before} and resumes in {now} (this machine's "
        f"default): answers to near ties can differ from the interrupted run's; add dtype={before} to the "
        "student spec to keep it"
    )


def keep_student_dtype(out: Path, student: Any) -> None:
    """Record the student's dtype in the run's config.json, where ``precision_warning`` finds it."""
    data = _stored(out)
    dtype = student_dtype(student)
    if data and data.get("student_dtype") != dtype:
        write_json_atomic(out / "config.json", {**data, "student_dtype": dtype})
