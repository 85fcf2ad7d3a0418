"""The eval's plots say what they measured: the achieved rates on tradeoff.png's axis, medians and the
methods actually run on running.png, a legend beside per_class.png's bars, and each cell's run.png
named for its method, with failed teacher calls shown."""

import json
from pathlib import Path

from icdistill.eval import plots
from icdistill.eval.cells import Cell
from icdistill.eval.methods import parse_method
from icdistill.run_summary import plot_run


class _Figures:
    """matplotlib.pyplot with ``close`` keeping the figures."""

    def __init__(self, plt):
        self.plt, self.figs = plt, []

    def __getattr__(self, name):
        return getattr(self.plt, name)

    def close(self, fig):
        self.figs.append(fig)


def _row(method, budget, seed, rate, acc):
    return {"method": method, "budget": budget, "seed": seed, "teacher_call_rate": rate, "accuracy": acc}


def test_tradeoff_ticks_are_the_achieved_rates(tmp_path, monkeypatch):
    figs = _Figures(plots._plt())
    monkeypatch.setattr(plots, "_plt", lambda: figs)
    rows = [
        _row("student-zero-shot", None, 0, 0.0, 0.3),
        _row("icd", 0.05, 0, 0.047, 0.5),
        _row("icd", 0.2, 0, 0.19, 0.6),
        _row("teacher-zero-shot", None, 0, 1.0, 0.9),
    ]
    plots.plot_tradeoff(rows, tmp_path, tmp_path / "t.png")
    ax = figs.figs[-1].axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["0%", "4.7%", "19%", "100%"]  # not "0" and "10^0" alone


def _log(out: Path, method: str, budget, seed: int, firsts: list[bool]) -> None:
    path = out / Cell(parse_method(method), budget, seed).path / "log.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    recs = [{"event": "query", "position": i, "first_correct": f} for i, f in enumerate(firsts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_running_is_the_median_and_names_only_the_methods_run(tmp_path, monkeypatch):
    figs = _Figures(plots._plt())
    monkeypatch.setattr(plots, "_plt", lambda: figs)
    for seed, firsts in enumerate(([True, True], [False, False], [False, True])):
        _log(tmp_path, "icd", 0.1, seed, firsts)
    rows = [_row("icd", 0.1, s, 0.1, 0.5) for s in range(3)]
    plots.plot_running(rows, tmp_path, tmp_path / "r.png")
    ax = figs.figs[-1].axes[0]
    assert "median" in ax.get_ylabel() and "teacher-zero-shot" not in ax.get_title()
    (line,) = ax.get_lines()
    assert list(line.get_ydata()) == [0.0, 0.5]  # medians of [1, 0, 0] and [1, 0, 0.5]; means 0.33, 0.5
    rows.append(_row("teacher-zero-shot", None, 0, 1.0, 0.9))
    plots.plot_running(rows, tmp_path, tmp_path / "r.png")
    assert "teacher-zero-shot: no first pass" in figs.figs[-1].axes[0].get_title()


def test_per_class_legend_is_beside_the_bars(tmp_path, monkeypatch):
    figs = _Figures(plots._plt())
    monkeypatch.setattr(plots, "_plt", lambda: figs)
    res = {
        "columns": ["student-zero-shot", "icd @ 5%", "knn-pool @ 5%"],
        "groups": {g: {"n": 10, "student-zero-shot": 1.0, "icd @ 5%": 0.95, "knn-pool @ 5%": 1.0} for g in "abc"},
    }
    plots.plot_per_class(res, tmp_path / "p.png")
    fig = figs.figs[-1]
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1  # right of the axes, over no bar


def _q(i: int, asked: bool, error: str | None) -> dict:
    return {
        "event": "query",
        "position": i,
        "correct": i % 2 == 0,
        "first_correct": i % 2 == 0,
        "teacher_asked": asked,
        "teacher_error": error,
        "demo_ids": [],
    }


def test_a_cell_s_run_plot_is_named_for_its_method_and_failed_calls_show(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    shown = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (shown.append(fig), close(fig)))
    plot_run([_q(i, False, None) for i in range(6)], tmp_path / "a.png", what="student-zero-shot seed 0")
    assert len(shown[-1].axes) == 1  # no teacher call: no axis of zero calls
    ax = shown[-1].axes[0]
    assert ax.get_title().startswith("student-zero-shot seed 0: 6 queries")
    assert [line.get_label() for line in ax.get_lines()] == ["accuracy (final answers)"]  # first = final
    failed = [_q(i, i < 3, "HTTP 500" if i < 3 else None) for i in range(6)]
    plot_run(failed, tmp_path / "b.png")
    ax, ax2 = shown[-1].axes
    assert "all 3 teacher calls FAILED" in ax.get_title()
    assert "failed teacher calls (no answer)" in [line.get_label() for line in ax2.get_lines()]
