"""The run summary's worst-labels table as a user reads it in an 80-column terminal or a pipe."""

import io

from rich.console import Console

from icdistill.report import print_groups


def _group(n: int, acc: float) -> dict:
    return {"n": n, "accuracy": acc, "first_pass_accuracy": acc, "student_only_accuracy": acc, "teacher_calls": 1}


def test_worst_labels_stay_on_one_line_and_the_never_pooled_label_is_warned_about():
    summary = {
        "per_label": {
            "T-shirt/top": _group(33, 0.273),
            "Pullover": _group(30, 0.0),
            "Trouser": _group(23, 0.478),
            "Ankle boot": _group(31, 0.9),
        },
        "never_pooled_labels": {"Pullover": 30},
    }
    out = io.StringIO()
    print_groups(summary, Console(file=out, width=80, force_terminal=False, color_system=None))
    text = out.getvalue()
    rows = [line for line in text.splitlines() if "label:" in line]
    # worst first, each label's name whole on its row, with its numbers
    assert [r.split("label: ")[1].split("│")[0].strip() for r in rows[:3]] == ["Pullover", "T-shirt/top", "Trouser"]
    assert "0.273" in rows[1] and "33" in rows[1]
    assert "label 'Pullover' came 30 times but never entered the pool" in text.replace("\n", " ")
