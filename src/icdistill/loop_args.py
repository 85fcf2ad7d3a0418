"""The loop's command-line options, shared by ``icd run`` (and ``icd eval``) and ``icd serve``: one
place for their names, types and help, with each command's own defaults."""

from __future__ import annotations

import argparse
from typing import Any


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for on/off flags and unset (None) options, whose help says it itself."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or action.default is None:
            return action.help
        return super()._get_help_string(action)


GATE_SCORES = ("uncertainty", "coverage", "coverage-uncertainty")


def add_loop_args(
    demos: Any, gate: Any, teacher: Any, d: Any, gate_scores: tuple[str, ...] = GATE_SCORES
) -> None:
    """Add the demonstration, gate and teacher options to their argument groups; ``d`` holds the
    defaults as attributes (a ``RunConfig``, or a service's defaults); ``gate_scores``: the
    ``--gate-score`` values the command accepts (``icd serve``: uncertainty only)."""
    demos.add_argument("--shots", type=int, default=d.shots, help="demonstrations per query")
    demos.add_argument("--selector", default=d.selector, help="random, image, text, image-text, cross-modal")
    demos.add_argument("--k-tt", type=int, default=d.k_tt, help="cross-modal stage 1 size (text-text)")
    demos.add_argument(
        "--k-it", type=int, default=d.k_it, help="cross-modal stage 2 size (image-answer text)"
    )
    demos.add_argument(
        "--demo-order",
        default=d.demo_order,
        choices=["best-last", "best-first"],
        help="where the most similar demo goes in the prompt",
    )
    demos.add_argument(
        "--judge",
        default=getattr(d, "judge", "on"),
        choices=["on", "full", "off"],
        help="weigh the student's reading with its demos, its zero-shot reading and the nearest demos' vote, "
        "learned from the teacher's answers (option questions: their option distributions; open questions: "
        "their answers); on: the zero-shot reading only where it can change the answer; full: every reading "
        "of every query, to measure each; off: the reading with demos alone",
    )
    demos.add_argument(
        "--pool-max", type=int, default=d.pool_max, help="cap the pool, evicting the oldest demos"
    )
    gate.add_argument("--gate", default=d.gate, help="budget, threshold, always, never, random")
    gate.add_argument(
        "--budget", type=float, default=d.budget, help="target teacher-call rate for --gate budget"
    )
    gate.add_argument(
        "--delta", type=float, default=d.delta, help="uncertainty threshold for --gate threshold"
    )
    ranks = {
        "uncertainty": "the student's uncertainty",
        "coverage": "coverage (far from every pooled demo and typical of the stream)",
        "coverage-uncertainty": "both",
    }
    gate.add_argument(
        "--gate-score",
        default=d.gate_score,
        choices=list(gate_scores),
        help="budget gate: rank queries by "
        + ", by ".join(ranks[g] for g in gate_scores[:-1])
        + f", or by {ranks[gate_scores[-1]]}"
        if len(gate_scores) > 1
        else f"budget gate: ranks queries by {ranks[gate_scores[0]]} (the only score this command offers)",
    )
    gate.add_argument(
        "--warmup",
        type=int,
        default=d.warmup,
        help="budget gate: ask while the pool holds fewer demos of the query's kind, within 2 calls over "
        "the budget",
    )
    gate.add_argument(
        "--max-calls", type=int, default=None, help="hard cap on teacher calls (global on a PostgreSQL pool)"
    )
    gate.add_argument(
        "--max-cost",
        dest="max_cost_usd",
        type=float,
        default=None,
        help="hard cap on teacher cost in USD (global on a PostgreSQL pool)",
    )
    gate.add_argument("--uncertainty", default=d.uncertainty, help="entropy, margin, token-entropy")
    teacher.add_argument(
        "--samples", type=int, default=d.samples, help="teacher samples per annotation (test-time scaling)"
    )
    teacher.add_argument(
        "--agreement",
        type=float,
        default=d.agreement,
        help="reject annotations whose vote agreement is below this",
    )
    teacher.add_argument(
        "--answer",
        default=d.answer,
        choices=["student", "forward"],
        help="after a teacher call: re-run the student or forward the teacher's answer",
    )
