"""``icd eval``: the command line of the evaluation harness (parsing and display; the grid is in harness)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

from icdistill.errors import ICDError

# `icd run` flags that an eval sets per cell: given on `icd eval` they would be silently overridden
_PER_CELL = ("seed", "budget")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def method_help() -> str:
    from icdistill.eval.methods import METHODS

    return "; ".join(f"{m.name}: {m.description}" for m in METHODS.values())


def add_eval_args(
    p: argparse.ArgumentParser, add_run_args: Callable[[argparse.ArgumentParser], None]
) -> None:
    g = p.add_argument_group("grid")
    g.add_argument(
        "--methods",
        default="student-zero-shot,icd,knn-pool",
        help="comma-separated methods, each name[:key=value,...] (default: %(default)s). " + method_help(),
    )
    g.add_argument(
        "--budgets", type=_floats, default="0.05", help="comma-separated teacher-call rates of gated methods"
    )
    # string defaults: argparse converts them with ``type``, and the help shows them as typed
    g.add_argument("--seeds", type=_ints, default="0,1,2", help="comma-separated stream orders")
    r = p.add_argument_group("Ray (pip install 'icdistill[ray]')")
    r.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="run cells on Ray actors (models loaded once per actor): a local Ray instance, or the cluster "
        "at ADDRESS (auto, host:port or ray://host:port; --out must then be on storage every node sees)",
    )
    r.add_argument(
        "--ray-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all cores)"
    )
    r.add_argument(
        "--ray-actor-cpus",
        type=int,
        default=1,
        help="CPUs (and torch threads) each actor holds; one actor per this many CPUs",
    )
    r.add_argument(
        "--ray-cell-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="a cell with no result after this long fails (its actor is replaced) and the other cells go "
        "on; --resume runs it again (default: no limit)",
    )
    add_run_args(p)
    for action in p._actions:
        if action.dest in _PER_CELL:
            action.help = argparse.SUPPRESS


def config_from_args(args: argparse.Namespace, given: set[str]) -> Any:
    """The eval grid the command line asks for; raises ``ICDError`` on a bad command line."""
    from icdistill.eval.harness import EvalConfig, refusals
    from icdistill.runner import RunConfig

    clash = sorted(f"--{g}" for g in given & set(_PER_CELL))
    if clash:
        raise ICDError(f"{', '.join(clash)} is set per cell by icd eval: use --seeds / --budgets")
    if args.resume:
        kept = {"out", "resume", "quiet"}
        changed = sorted({f"--{g.replace('_', '-')}" for g in given - kept} | _grid_flags(args.argv))
        if changed:
            raise ICDError(
                f"--resume continues the grid stored in --out; it does not take {', '.join(changed)} "
                "(start a new eval in another folder to change it)"
            )
    base = RunConfig(**{f.name: getattr(args, f.name) for f in fields(RunConfig) if f.name not in _PER_CELL})
    cfg = EvalConfig(
        base=base,
        methods=tuple(m.raw for m in _methods(args.methods)),
        budgets=tuple(args.budgets),
        seeds=tuple(args.seeds),
    )
    why = refusals(cfg)
    if why:
        raise ICDError("cannot run: " + "; ".join(why))
    return cfg


def cmd_eval(cfg: Any, args: argparse.Namespace) -> int:
    from rich.console import Console

    from icdistill.eval.harness import plan, run_eval
    from icdistill.eval.screen import print_screen

    out = Path(args.out or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}")
    console = Console(stderr=True)

    def warn(text: str) -> None:
        console.print(f"icd: warning: {text}", style="yellow", markup=False, highlight=False, soft_wrap=True)

    try:
        with _ray_runner(args) as runner:
            with _progress(console, args.quiet, len(plan(cfg)), queries=runner is None) as callbacks:
                rows = run_eval(cfg, out, resume=args.resume, runner=runner, on_warning=warn, **callbacks)
            if runner is not None and runner.workers:
                w = runner.workers
                console.print(
                    f"ran on {len(w)} Ray actors on {len({x['node'] for x in w})} node(s), "
                    f"{w[0]['torch_threads']} torch thread(s) each"
                )
    except KeyboardInterrupt:  # the cells done so far are kept: name the folder to resume
        print(f"icd: interrupted; continue with: icd eval --resume --out {out}", file=sys.stderr)
        return 130
    # a table that fits the terminal (80 columns in a file or a pipe), the per-class drops below the
    # student alone and the teacher warning; every column and figure is in report.md
    print_screen(rows, out, Console(highlight=False))
    console.print(f"results: {out / 'results.csv'}  report: {out / 'report.md'} (all columns, plots)")
    return 0


@contextmanager
def _ray_runner(args: argparse.Namespace) -> Iterator[Any]:
    """None without --ray; otherwise a connected RayCells, checked before anything is written."""
    from icdistill.errors import UsageError

    if args.ray is None:
        if args.ray_cpus is not None or args.ray_actor_cpus != 1 or args.ray_cell_timeout is not None:
            raise UsageError("--ray-cpus, --ray-actor-cpus and --ray-cell-timeout need --ray")
        yield None
        return
    from icdistill.errors import RaySetupError
    from icdistill.eval.ray_runner import RayCells, RayOptions

    try:
        runner = RayCells(
            RayOptions(
                address=None if args.ray == "local" else args.ray,
                cpus=args.ray_cpus,
                actor_cpus=args.ray_actor_cpus,
                cell_timeout_s=args.ray_cell_timeout,
            )
        )
        runner.connect()
    except RaySetupError as e:
        raise UsageError(str(e)) from e
    try:
        yield runner
    except RaySetupError as e:
        raise UsageError(str(e)) from e
    finally:
        runner.close()


def _grid_flags(argv: list[str]) -> set[str]:
    return {
        f for f in ("--methods", "--budgets", "--seeds") if any(a == f or a.startswith(f + "=") for a in argv)
    }


def _methods(text: str) -> list[Any]:
    from icdistill.eval.methods import split_methods

    return split_methods(text)


class _progress:
    """A rich progress display: one bar over cells, one over the current cell's queries."""

    def __init__(self, console: Any, disabled: bool, n_cells: int, queries: bool = True) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            console=console,
            disable=disabled,
        )
        self.cells = self.progress.add_task("cells", total=n_cells, stats="")
        # cells on Ray actors report only when they finish: no bar over one cell's queries
        self.queries = self.progress.add_task("queries", total=1, stats="", visible=queries)
        self.state = {"n": 0, "correct": 0, "calls": 0}

    def __enter__(self) -> dict[str, Callable[..., None]]:
        self.progress.start()
        return {
            "on_cell": self.on_cell,
            "on_start": self.on_start,
            "on_record": self.on_record,
            "on_cell_done": self.on_cell_done,
        }

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def on_cell(self, i: int, total: int, cell: Any) -> None:
        self.progress.update(self.cells, completed=i, stats=cell.label())
        self.state = {"n": 0, "correct": 0, "calls": 0}

    def on_cell_done(self, done: int, total: int, cell: Any) -> None:
        self.progress.update(self.cells, completed=done, stats=f"done: {cell.label()}")

    def on_start(self, start: int, total: int) -> None:
        self.progress.update(self.queries, total=total, completed=start, stats="")

    def on_record(self, rec: dict[str, Any]) -> None:
        if rec.get("event") == "query":
            self.state["n"] += 1
            self.state["correct"] += int(bool(rec.get("correct")))
            self.state["calls"] += int(rec["teacher_asked"])
        n = max(1, self.state["n"])
        self.progress.update(
            self.queries,
            advance=1,
            stats=f"acc {self.state['correct'] / n:.3f}  teacher {self.state['calls'] / n:.1%}"
            + (f"  in flight {rec['in_flight']}" if rec.get("in_flight") else ""),
        )
