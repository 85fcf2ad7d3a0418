"""What README's examples show matches what the commands do today (a new user reads them first)."""

from __future__ import annotations

from pathlib import Path

from icdistill.service.config import ServeConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_serve_example_shows_the_server_s_own_warm_up_and_budget():
    text = README.read_text()
    start = text.index("# the offline default: SmolLM2 student")
    example = text[start : text.index("```", start)]
    d = ServeConfig(no_auth=True)  # its defaults; the key is the example's own
    assert f"{d.budget:.0%} budget (warm-up: the first {d.warmup} queries)" in example
    assert f'"gate_reason":"warm-up: pool 0 < {d.warmup}"' in example


def test_serve_offers_only_the_gate_scores_it_accepts(capsys):
    import pytest

    from icdistill.cli import build_parser, main

    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    gate_score = next(a for a in serve._actions if a.dest == "gate_score")
    assert list(gate_score.choices) == ["uncertainty"]
    run = parser._subparsers._group_actions[0].choices["run"]
    assert "coverage" in next(a for a in run._actions if a.dest == "gate_score").choices
    with pytest.raises(SystemExit):
        main(["serve", "--gate-score", "coverage"])
    assert "invalid choice: 'coverage'" in capsys.readouterr().err
