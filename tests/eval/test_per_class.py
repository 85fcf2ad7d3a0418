"""Per-class flags against the student alone: a drop on any stream order (not only by the median), and
the lift of the student alone's answers, which tells a class it knows from one it guesses."""

import json
from pathlib import Path

import pytest

from icdistill.eval.cells import Cell
from icdistill.eval.methods import parse_method
from icdistill.eval.per_class import answer_lift, class_results, class_section, class_table


def _write(out: Path, method: str, budget, seed: int, records: list[dict]) -> None:
    path = out / Cell(parse_method(method), budget, seed).path / "log.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _q(pos: int, label: str, answer: str) -> dict:
    ok = answer == label
    return {
        "event": "query",
        "position": pos,
        "label": label,
        "answer": answer,
        "correct": ok,
        "first_correct": ok,
        "teacher_asked": False,
        "ctx_kind": "options",
    }


LABELS = ("shirt", "boot", "bag", "coat")  # 10 queries each per stream


def _alone(label: str) -> str:
    """The student alone: knows shirts; says "boot" for everything else (right on boots by chance)."""
    return "shirt" if label == "shirt" else "boot"


def _grid(out: Path) -> list[dict]:
    """Three stream orders. icd equals the student alone on shirts and boots except on seed 2, where it
    gets 2 of 10 of each wrong (the median over seeds shows no drop), and is right on bags and coats."""
    rows = []
    for seed in (0, 1, 2):
        stream = [lab for lab in LABELS for _ in range(10)]
        zs = [_q(i, lab, _alone(lab)) for i, lab in enumerate(stream)]
        icd = []
        for i, lab in enumerate(stream):
            wrong = seed == 2 and lab in ("shirt", "boot") and i % 10 < 2
            icd.append(_q(i, lab, "coat" if wrong else lab))
        _write(out, "student-zero-shot", None, seed, zs)
        _write(out, "icd", 0.05, seed, icd)
        rows += [
            {"method": "student-zero-shot", "budget": None, "seed": seed},
            {"method": "icd", "budget": 0.05, "seed": seed},
        ]
    return rows


def test_lift_tells_a_known_class_from_a_guessed_one():
    records = [_q(i, lab, _alone(lab)) for i, lab in enumerate(lab for lab in LABELS for _ in range(10))]
    lift = answer_lift([records])
    # "shirt" answers are always right (precision 1, share 1/4); "boot" is said for 30 queries, 10 right
    assert lift["shirt"] == pytest.approx(4.0) and lift["boot"] == pytest.approx(4 / 3)
    assert lift["bag"] is None and lift["coat"] is None  # never answered


def test_a_drop_on_one_stream_order_is_flagged_and_a_known_class_is_a_violation(tmp_path):
    rows = _grid(tmp_path)
    res = class_results(rows, tmp_path)
    assert res["groups"]["shirt"]["icd @ 5%"] == 1.0  # the median over seeds hides the drop
    table, flags = class_table(res)
    assert "| label | queries | lift | student-zero-shot | icd @ 5% first pass | icd @ 5% |" in table
    shirt = next(x for x in table.splitlines() if x.startswith("| shirt |"))
    boot = next(x for x in table.splitlines() if x.startswith("| boot |"))
    assert shirt == "| shirt | 10 | 4.0 | 1.000 | **1.000 ▼!** | **1.000 ▼!** |"
    assert boot == "| boot | 10 | 1.3 | 1.000 | **1.000 ▼** | **1.000 ▼** |"
    bag = next(x for x in table.splitlines() if x.startswith("| bag |"))
    assert "▼" not in bag and "| bag | 10 | - |" in bag
    # violations (the student alone knows the class) are listed first, with the order that dropped
    assert flags[0] == (
        "**violation** `icd @ 5% first pass` on `shirt`: 0.800 vs 1.000 on seed 2 "
        "(median 1.000 vs 1.000; 10 queries, lift 4.0)"
    )
    assert sum(f.startswith("**violation**") for f in flags) == 2 and len(flags) == 4
    text = "\n".join(class_section(rows, tmp_path))
    assert "on some stream order" in text and "**▼!** marks a drop on a class the student alone knows" in text
