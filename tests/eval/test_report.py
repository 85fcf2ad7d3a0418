"""The eval report from rows and logs written here: what each number measures, said in the report."""

import argparse
import json
from pathlib import Path

import pytest

from icdistill.eval import plots, report
from icdistill.eval.cells import Cell, reference_method
from icdistill.eval.methods import parse_method
from icdistill.eval.rows import series_label
from icdistill.eval.scores import cell_scores, query_breakdown


def _rec(
    pos, label, correct, first, asked=False, reason="uncertainty 0.2 <= quantile 0.5", kind="options", **kw
):
    return {
        "event": "query",
        "position": pos,
        "label": label,
        "correct": correct,
        "first_correct": first,
        "teacher_asked": asked,
        "gate_reason": reason,
        "ctx_kind": kind,
        "uncertainty": kw.pop("uncertainty", 0.1 * (pos % 7)),
        **kw,
    }


def _row(method, budget, seed, **kw):
    base = {
        "method": method,
        "budget": budget,
        "seed": seed,
        "accuracy": 0.5,
        "first_pass_accuracy": 0.4,
        "unasked_accuracy": 0.45,
        "teacher_call_rate": 0.1,
        "teacher_calls": 4,
        "gate_chosen_calls": None,
        "demonstration_accuracy": 0.5,
        "auroc": None,
        "seconds_per_query": 0.1,
        "cost_usd": 0.0,
        "reliability": [],
    }
    return {**base, **kw}


def _write_log(out: Path, method: str, budget, seed: int, records) -> None:
    path = out / Cell(parse_method(method), budget, seed).path / "log.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_first_pass_and_not_asked_accuracy_leave_out_the_taught_copies():
    # 4 queries; the 2 sent to the teacher are right afterwards (their own demo), wrong before
    recs = [
        _rec(0, "a", True, False, asked=True, reason="warm-up: pool 0 < 2"),
        _rec(1, "a", True, False, asked=True, reason="uncertainty 0.9 > quantile 0.5"),
        _rec(2, "b", True, True),
        _rec(3, "b", False, False),
    ]
    b = query_breakdown(recs)
    assert b["first_pass_accuracy"] == 0.25 and b["unasked_accuracy"] == 0.5 and b["unasked_n"] == 2
    assert (b["gate_chosen_calls"], b["forced_calls"]) == (1, 1)
    table = report.summary_table([_row("icd", 0.1, 0)])
    assert "| accuracy | first pass | not asked |" in table and "| 0.500 | 0.400 | 0.450 |" in table
    notes = "\n".join(report.summary_notes([_row("icd", 0.1, 0)]))
    assert "**accuracy** (the headline of this table, of the paired table" in notes
    assert "**first pass**" in notes and "**not asked**" in notes


def test_cells_whose_gate_chose_no_call_are_flagged_and_compare_no_gate(tmp_path):
    # n=40 at 10%: 5 warm-up calls each, identical labels, printed as "0.000, 0/2 wins"
    rows = [
        _row(m, 0.1, s, teacher_calls=5, gate_chosen_calls=0, accuracy=0.3)
        for s in (0, 1)
        for m in ("icd", "icd-random-gate", "knn-pool")
    ] + [_row("icd", 0.3, 0, gate_chosen_calls=4), _row("student-zero-shot", None, 0, accuracy=0.2)]
    table = report.summary_table(rows)
    assert "| icd | 10% | 2 |" in table and "0 (none!)" in table
    assert "| icd | 30% | 1 |" in table and "(none!)" not in table.splitlines()[-2]
    notes = "\n".join(report.summary_notes(rows))
    assert "No gate-chosen call" in notes and "`icd @ 10%` (seeds 0, 1)" in notes
    assert "`icd-random-gate @ 10%` (seeds 0, 1)" in notes and "icd @ 30%" not in notes
    assert "Not matched to `icd`'s call count" in notes  # these rows have no matched_calls
    # the end of `icd eval` on the terminal says it too, not only report.md
    import io

    from rich.console import Console

    from icdistill.eval.screen import print_screen

    buf = io.StringIO()
    print_screen(rows, tmp_path, Console(file=buf, width=300, color_system=None))
    warned = [x for x in buf.getvalue().splitlines() if x.startswith("warning: no gate-chosen")]
    assert any("icd @ 10% (seeds 0, 1)" in x for x in warned) and not any("icd @ 30%" in x for x in warned)
    paired = report.paired_table(rows, "icd")
    line = next(x for x in paired.splitlines() if x.startswith("| icd-random-gate | 10% |"))
    assert "0 / 2 / 0" in line and "(no gate compared)" in line  # ties are not losses


def test_demo_accuracy_at_k_scores_the_k_nearest_demos():
    # demos are logged in prompt order, nearest last: icd's 2 demos (nearest right), knn-pool's 3
    # (the 2 nearest right, the farthest wrong)
    recs2 = [_rec(i, "a", True, True, demo_answers=["b", "a"]) for i in range(4)]
    recs3 = [_rec(i, "a", True, True, demo_answers=["b", "a", "a"]) for i in range(4)]
    at2, at3 = query_breakdown(recs2)["demo_accuracy_at"], query_breakdown(recs3)["demo_accuracy_at"]
    assert at2 == {"1": 1.0, "2": 0.5} and at3 == {"1": 1.0, "2": 1.0, "3": pytest.approx(2 / 3)}
    # with --demo-order best-first the nearest is logged first
    first = query_breakdown(recs3, demo_order="best-first")["demo_accuracy_at"]
    assert first == {"1": 0.0, "2": 0.5, "3": pytest.approx(2 / 3)}
    rows = [
        _row("icd", 0.1, 0, demo_accuracy_at=at2, demonstration_accuracy=0.5),
        _row("knn-pool", 0.1, 0, demo_accuracy_at=at3, demonstration_accuracy=2 / 3),
    ]
    assert report.common_k(rows) == 2
    table = report.summary_table(rows)
    assert "demo accuracy @2 | demo accuracy (own k)" in table
    assert "| 1.000 | 0.667 |" in table  # knn-pool: its 2 nearest at k=2, 0.667 at its own k=3
    assert "the 2 nearest selected demos" in "\n".join(report.summary_notes(rows))


def test_ranges_ties_legends_and_the_paired_reference():
    assert report._cell([-0.3, -0.425, -0.35]) == "-0.350 [-0.425, -0.300]"
    assert series_label("student-zero-shot", None) == "student-zero-shot"
    assert series_label("icd", 0.05) == "icd @ 5%"
    # the plain icd is the reference, wherever it is listed
    assert reference_method(["icd:selector=random", "knn-pool", "icd"]) == "icd"
    assert reference_method(["knn-pool", "icd:shots=3", "icd:shots=1"]) == "icd:shots=3"
    assert reference_method(["knn-pool", "icd-forward"]) is None
    merged, notes = plots.merge_identical([("a", [1, 2]), ("b", [1, 3]), ("c", [1, 2])])
    assert merged == [("a = c", [1, 2]), ("b", [1, 3])] and notes == ["a, c coincide (drawn as one line)"]


def test_a_constant_uncertainty_has_no_auroc_and_no_reliability_curve():
    # the reference teacher's uncertainty is constant: its AUROC read 0.5
    recs = [_rec(i, "a", i % 2 == 0, i % 2 == 0, uncertainty=0.0) for i in range(10)]
    s = cell_scores(recs, open_answers=False)
    assert s["auroc"] is None and s["reliability"] == []
    varied = [_rec(i, "a", i % 2 == 0, i % 2 == 0, uncertainty=0.1 * (i % 2)) for i in range(10)]
    assert cell_scores(varied, open_answers=False)["auroc"] == 1.0


def test_running_accuracy_is_the_first_pass_so_the_warm_up_does_not_start_it_at_one():
    recs = [_rec(i, "a", True, i >= 2, asked=i < 2, reason="warm-up: pool 0 < 2") for i in range(4)]
    assert plots._running(recs) == [0.0, 0.0, 1 / 3, 0.5]


class _Figures:
    """matplotlib.pyplot with ``close`` keeping the figures, to look at what a plot drew."""

    def __init__(self, plt):
        self.plt, self.figs = plt, []

    def __getattr__(self, name):
        return getattr(self.plt, name)

    def close(self, fig):
        self.figs.append(fig)


def test_plots_tick_whole_quintiles_and_show_coinciding_series(tmp_path, monkeypatch):
    figs = _Figures(plots._plt())
    monkeypatch.setattr(plots, "_plt", lambda: figs)
    rel = [{"accuracy": a, "uncertainty_mean": 0.1 * i, "n": 4.0} for i, a in enumerate((0.9, 0.8, 0.5))]
    other = [{**b, "accuracy": 0.5} for b in rel]
    rows = [
        _row("icd", 0.1, 0, reliability=rel, auroc=0.7),
        _row("knn-pool", 0.1, 0, reliability=rel, auroc=0.7),
        _row("student-zero-shot", None, 0, reliability=other, auroc=0.6),
        _row("teacher-zero-shot", None, 0, reliability=[]),
    ]
    notes = plots.plot_reliability(rows, tmp_path, tmp_path / "r.png")
    ax = figs.figs[-1].axes[0]
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)  # not 1.5 and 2.5
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    # identical series drawn once and named together; a budget-free method without " -"
    assert labels == [
        "icd @ 10% (AUROC 0.70) = knn-pool @ 10% (AUROC 0.70)",
        "student-zero-shot (AUROC 0.60)",
    ]
    assert any("coincide" in n for n in notes) and any("teacher-zero-shot" in n for n in notes)
    rows[1]["accuracy"] = 0.7
    plots.plot_tradeoff(rows, tmp_path, tmp_path / "t.png")
    legend = [t.get_text() for t in figs.figs[-1].axes[0].get_legend().get_texts()]
    assert legend == ["icd = student-zero-shot = teacher-zero-shot", "knn-pool"]


def _kind_logs(out: Path) -> list[dict]:
    """Two seeds; label 'shirt' (12 queries) is hurt by icd, 'boot' (4) too but is too small to flag."""
    rows = []
    for seed in (0, 1):
        zs, icd = [], []
        for i in range(16):
            label = "shirt" if i < 12 else "boot"
            kind = "open" if i % 4 == 0 else "options"
            zs.append(_rec(i, label, True, True, kind=kind))
            icd.append(_rec(i, label, i % 3 != 0, i % 3 == 2, asked=i == 0, kind=kind))
        _write_log(out, "student-zero-shot", None, seed, zs)
        _write_log(out, "icd", 0.05, seed, icd)
        rows += [_row("student-zero-shot", None, seed), _row("icd", 0.05, seed)]
    return rows


def test_per_class_table_flags_a_class_worse_than_the_student_alone(tmp_path):
    rows = _kind_logs(tmp_path)
    parts = "\n".join(report.class_section(rows, tmp_path))
    assert "| label | queries | student-zero-shot | icd @ 5% first pass | icd @ 5% |" in parts
    shirt = next(x for x in parts.splitlines() if x.startswith("| shirt |"))
    assert shirt.startswith("| shirt | 12 | 1.000 | **0.333 ▼** | **0.667 ▼** |")
    boot = next(x for x in parts.splitlines() if x.startswith("| boot |"))
    assert "▼" not in boot  # 4 queries: below the floor of 10
    assert "`icd @ 5%` on `shirt`: 0.667 vs 1.000 on seed 0 (median 0.667 vs 1.000; 12 queries)" in parts
    # both kinds of question were asked: a table per kind too
    assert "| question kind | queries |" in parts and "| open | 4 |" in parts and "| options | 12 |" in parts
    assert (tmp_path / "per_class.png").read_bytes()[:4] == b"\x89PNG"


def test_per_class_without_the_student_alone_says_it_cannot_flag(tmp_path):
    rows = [r for r in _kind_logs(tmp_path) if r["method"] == "icd"]
    parts = "\n".join(report.class_section(rows, tmp_path))
    assert "No `student-zero-shot` in this grid" in parts and " ▼**" not in parts
    assert "question kind" in parts


def test_eval_on_screen_fits_80_columns_and_shows_class_drops_and_the_teacher_warning(
    tmp_path, monkeypatch, capsys
):
    # `icd eval` printed a 14-column markdown table far wider than 80 columns, and neither the
    # per-class drops nor a teacher whose labels matched 29% of the time
    import icdistill.eval.harness as harness
    from icdistill.eval.cli import cmd_eval
    from icdistill.eval.harness import EvalConfig
    from icdistill.runner import RunConfig

    out = tmp_path / "o"
    rows = [
        {**r, **_row(r["method"], r["budget"], r["seed"])}
        | {"teacher_label_accuracy": 0.29 if r["method"] == "icd" else None, "teacher_label_checked": 24}
        for r in _kind_logs(out)
    ]
    monkeypatch.setattr(harness, "run_eval", lambda *a, **k: rows)
    args = argparse.Namespace(out=str(out), quiet=True, resume=False, ray=None, ray_cpus=None)
    args.ray_actor_cpus = 1
    args.ray_cell_timeout = None
    cfg = EvalConfig(base=RunConfig(), methods=("icd",), seeds=(0,))
    assert cmd_eval(cfg, args) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    table = lines[: next(i for i, x in enumerate(lines) if x.startswith("below"))]
    assert max(map(len, table)) <= 80  # stdout is not a terminal here: 80 columns
    assert any(x.split()[:1] == ["student-zero-shot"] for x in table) and "icd @ 5%" in text
    # the flags and the warning are whole lines (not cut at 80 columns in a file)
    assert "below the student alone: icd @ 5% on shirt: 0.667 vs 1.000 on seed 0 (12 queries)" in lines
    warning = next(x for x in lines if x.startswith("warning:"))
    assert "the teacher's answers matched the labels only 29% of the time" in warning
    assert warning.endswith("or the labels")


def test_s_per_query_reports_the_first_seed_apart_from_the_warm_ones():
    # seed 1 of the student alone read seed 0's cached readings: "0.46 [0.00, 0.91]" timed nothing
    rows = [
        _row("student-zero-shot", None, 0, seconds_per_query=0.91),
        _row("student-zero-shot", None, 1, seconds_per_query=0.0),
        _row("student-zero-shot", None, 2, seconds_per_query=0.01),
    ]
    table = report.summary_table(rows)
    head = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    line = [c.strip() for c in table.splitlines()[2].strip("|").split("|")]
    by = dict(zip(head, line, strict=True))
    assert by["s/query (first seed)"] == "0.91" and by["s/query (other seeds)"] == "0.01 [0.00, 0.01]"
    assert "0.46" not in table
    notes = "\n".join(report.summary_notes(rows))
    assert "**s/query (first seed)**" in notes and "**(other seeds)** may read the readings" in notes


def test_the_judge_section_shows_each_expert_and_the_midpoint_test():
    from icdistill.eval.judge_report import judge_rows, judge_section

    def judge(icl, zs, vote, judged, envelope, read_zs):
        return {
            "judged_queries": 100,
            "first_pass_accuracy": judged,
            "experts": {
                "icl": {"read": 100, "first_pass_accuracy": icl, "seconds_per_judged_query": 0.5},
                "zero-shot": {"read": read_zs, "first_pass_accuracy": zs, "seconds_per_judged_query": 0.2},
                "vote": {"read": 100, "first_pass_accuracy": vote, "seconds_per_judged_query": 0.0},
            },
            "all_read": read_zs,
            "envelope": envelope if read_zs == 100 else None,
            "first_pass_accuracy_all_read": judged,
        }

    rows = [
        {"method": "icd:judge=full", "budget": 0.05, "seed": s, "judge": judge(0.6, 0.7, 0.5, j, 0.9, 100)}
        for s, j in ((0, 0.85), (1, 0.75))
    ] + [
        {"method": "icd", "budget": 0.05, "seed": 0, "judge": judge(0.6, 0.7, 0.5, 0.8, None, 40)},
        {"method": "knn-pool", "budget": 0.05, "seed": 0, "judge": None},
    ]
    entries = {e["series"]: e for e in judge_rows(rows)}
    assert set(entries) == {"icd:judge=full @ 5%", "icd @ 5%"}
    full = entries["icd:judge=full @ 5%"]
    # midpoint (0.7 + 0.9) / 2 = 0.8: seed 0 is 0.05 over it, seed 1 0.05 under
    assert full["envelope"] == 0.9 and full["reached"] == 1 and abs(full["over_midpoint"]) < 1e-9
    assert entries["icd @ 5%"]["zero-shot_read"] == 0.4 and entries["icd @ 5%"].get("envelope") is None
    text = "\n".join(judge_section(rows))
    assert "| icd:judge=full @ 5% | 0.600 | 0.700 | 0.500 | 0.800 |" in text and "(1 of 2)" in text


def test_the_open_question_table_reads_summaries_from_before_the_open_vote():
    from icdistill.eval.judge_report import open_lines

    def summary(name):
        experts = {
            n: {"read": 10, "first_pass_accuracy": a}
            for n, a in (("icl", 0.3), ("zero-shot", 0.1), (name, 0.5))
        }
        return {
            "judged_queries": 10,
            "first_pass_accuracy": 0.5,
            "experts": experts,
            "chosen": {"icl": 5, "zero-shot": 0, name: 5},
            "all_read": 10,
            "envelope": 0.6,
        }

    old = [{"method": "icd", "budget": 0.05, "seed": 0, "judge": {"open": summary("nearest")}}]
    new = [{"method": "icd", "budget": 0.05, "seed": 0, "judge": {"open": summary("vote")}}]
    assert open_lines(old) == open_lines(new)
    assert "| icd @ 5% | 0.300 | 0.100 | 0.500 | 0.50 / 0.00 / 0.50 | 0.500 | 0.600 |" in open_lines(new)
