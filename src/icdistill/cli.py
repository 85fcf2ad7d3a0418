"""The ``icd`` command: run ICD on a dataset, list models, serve a model over an OpenAI-compatible API."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from icdistill.errors import ICDError, MissingDataset, SpecError, UsageError
from icdistill.loop_args import HelpFormatter
from icdistill.run_args import _add_run_args, _given_run_flags, add_ray_run_args


def _cmd_run(args: argparse.Namespace) -> int:
    import time
    from dataclasses import fields
    from pathlib import Path

    from rich.console import Console

    from icdistill.report import print_summary, progress_callbacks
    from icdistill.run_dtype import precision_warning
    from icdistill.runner import (
        RunConfig,
        build_parts,
        check_parts_reachable,
        clear_run,
        lock_run,
        preflight,
        run_icd,
        run_warnings,
    )

    if args.resume and not args.out:
        raise UsageError("--resume needs --out, the folder of the run to continue")
    if args.resume and args.replace:
        raise UsageError("--resume continues the run in --out, --replace deletes it: choose one")
    out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    names = [f.name for f in fields(RunConfig)]
    changes = None
    try:
        cfg = RunConfig(**{name: getattr(args, name) for name in names})
        if args.resume:
            given = _given_run_flags(getattr(args, "argv", sys.argv[1:]))
            changes = {name: getattr(cfg, name) for name in names if name in given}
    except ICDError as e:
        raise UsageError(str(e)) from e
    if args.ray is not None:
        from icdistill.run_ray import cmd_run_ray

        args.workers = 2 if args.workers is None else args.workers
        return cmd_run_ray(args, cfg, changes)
    if args.workers is not None or args.ray_stall_timeout is not None or args.ray_cpus is not None:
        raise UsageError("--workers, --ray-cpus and --ray-stall-timeout need --ray")
    console = Console(stderr=True)
    from icdistill.runner import check_out_path

    check_out_path(out)
    created = not out.exists()
    with lock_run(out) as lock:
        try:
            try:
                cfg, dataset = preflight(cfg, out, args.resume, changes, replace=args.replace)
            except MissingDataset as e:  # a mistyped --dataset; a resumed run's stored path is not
                if not args.resume or "dataset" in (changes or {}):
                    raise UsageError(str(e)) from e
                raise
            except ICDError as e:
                if args.resume and "flags differ" in str(e):
                    raise UsageError(str(e)) from e
                raise
            from icdistill.models.reference import unlabelled_refusal

            why = unlabelled_refusal(cfg.teacher, dataset.labels())
            if why:
                raise UsageError(why)  # before the models load
            for warning in run_warnings(cfg, dataset):
                console.print(f"icd: warning: {warning}", style="yellow", markup=False, highlight=False, soft_wrap=True)
            with console.status("loading models", spinner="dots"):
                try:
                    parts = build_parts(cfg)
                except ICDError as e:  # an unknown spec or a bad spec value: the command line is wrong
                    raise UsageError(str(e)) from e
            with console.status("checking that the teacher answers", spinner="dots"):
                check_parts_reachable(parts)
            changed = precision_warning(out, parts.student) if args.resume else None
            if changed:
                console.print(f"icd: warning: {changed}", style="yellow", markup=False, highlight=False, soft_wrap=True)
            if args.replace:
                clear_run(out)
        except BaseException:
            if created and [p.name for p in out.iterdir()] == ["run.lock"]:
                # a fresh run that never started leaves no folder behind
                (out / "run.lock").unlink()
                out.rmdir()
            raise
        try:
            with progress_callbacks(console, disabled=args.quiet) as (on_start, on_record):
                summary = run_icd(
                    cfg,
                    out,
                    resume=args.resume,
                    parts=parts,
                    dataset=dataset,
                    on_start=on_start,
                    on_record=on_record,
                    changes=changes,
                    lock=lock,
                )
        except KeyboardInterrupt:
            print(f"icd: interrupted; continue with: icd run --resume --out {out}", file=sys.stderr)
            return 130
    print_summary(summary, out, Console())
    calls, failures = summary.get("teacher_calls", 0), summary.get("teacher_failures", 0)
    if calls and failures == calls:
        print(
            f"icd: error: all {calls} teacher calls failed (see teacher_error in {out / 'log.jsonl'}); "
            "fix the teacher, then run the same command with --replace to start again in this folder",
            file=sys.stderr,
        )
        return 1
    skipped = summary.get("skipped_inputs", 0)
    if not summary.get("n_queries") and skipped:
        print(
            f"icd: error: every one of the {skipped} inputs was skipped, so nothing was answered (the "
            f"reasons are the bad_input records in {out / 'log.jsonl'})",
            file=sys.stderr,
        )
        return 1
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from rich.console import Console

    from icdistill.merge import merge_shards
    from icdistill.report import print_summary

    result = merge_shards(args.folders, args.out)
    print_summary(result.summary, result.out, Console())
    for problem in result.problems():
        print(f"icd: error: {problem}; the summary covers the shards' finished part", file=sys.stderr)
    return 0 if result.complete else 1


def _cmd_eval(args: argparse.Namespace) -> int:
    from icdistill.eval.cli import cmd_eval, config_from_args

    if args.resume and not args.out:
        raise UsageError("--resume needs --out, the folder of the eval to continue")
    try:
        cfg = config_from_args(args, _given_run_flags(args.argv))
    except ICDError as e:
        raise UsageError(str(e)) from e

    try:
        return cmd_eval(cfg, args)
    except SpecError as e:
        raise UsageError(str(e)) from e
    except MissingDataset as e:  # a mistyped --dataset (a resumed eval's stored path is no usage error)
        if args.resume:
            raise
        raise UsageError(str(e)) from e


def _cmd_models(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.padding import Padding
    from rich.text import Text

    from icdistill.models.availability import availability

    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(width=1000, highlight=False)  # a file or a pipe gets whole lines
    console.print("model specs (spec, roles, whether it works on this machine; notes below each)")
    for row in availability():
        head = Text.assemble((row["spec"], "bold"), f"  {row['roles']}  works here: ")
        head.append("yes" if row["ok"] else "no", style="green" if row["ok"] else "red")
        console.print(head)
        # notes wrap at the terminal's width on their own indented line, never cut ("efficientnet-lite...")
        console.print(Padding(Text(row["notes"]), (0, 0, 0, 4), expand=False))
    return 0


def _cmd_serve_model(args: argparse.Namespace) -> int:
    from icdistill.serve_model import main as serve

    serve(args.spec, host=args.host, port=args.port, faults=args.faults, api_key=args.api_key)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="icd", description="Online in-context distillation for vision-language models."
    )
    from icdistill import __version__

    p.add_argument("--version", action="version", version=f"icd {__version__}")
    sub = p.add_subparsers(dest="command")
    run = sub.add_parser(
        "run",
        help="stream a dataset through online ICD",
        formatter_class=HelpFormatter,
    )
    _add_run_args(run)
    run.add_argument(
        "--replace",
        action="store_true",
        help="delete the run already in --out (log, pool, summary, config, plot; nothing else) and start "
        "afresh, once the models have loaded and the teacher answers",
    )
    add_ray_run_args(run)
    run.set_defaults(func=_cmd_run)
    merge = sub.add_parser(
        "merge",
        help="one summary, per-label table and run.png for a stream answered in shards (icd run --shard)",
        formatter_class=HelpFormatter,
    )
    merge.add_argument("folders", nargs="+", help="the shards' run folders, e.g. runs/big/shard-*")
    merge.add_argument("--out", default=None, help="where to write (default: the shards' common parent)")
    merge.set_defaults(func=_cmd_merge)
    models = sub.add_parser("models", help="list model specs and whether they work on this machine")
    models.set_defaults(func=_cmd_models)
    serve = sub.add_parser(
        "serve-model",
        help="serve a backend as an OpenAI-compatible chat API",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve.add_argument("spec", help="backend spec, e.g. local:smollm2")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (beyond loopback needs --api-key)"
    )
    serve.add_argument("--port", type=int, default=8000, help="TCP port")
    serve.add_argument(
        "--api-key", default=None, help="require this Bearer key; when not given, $ICD_SERVE_API_KEY if set"
    )
    serve.add_argument(
        "--faults", default=None, help="fault plan for drills, e.g. 'slow:3,500,429:1,garbage,wrong_n'"
    )
    serve.set_defaults(func=_cmd_serve_model)
    from icdistill.eval.cli import add_eval_args

    ev = sub.add_parser(
        "eval",
        help="compare ICD with every baseline over methods x budgets x seeds",
        formatter_class=HelpFormatter,
    )
    add_eval_args(ev, _add_run_args)
    ev.set_defaults(func=_cmd_eval)
    from icdistill.service.cli import cmd_serve
    from icdistill.service.config import add_serve_args

    svc = sub.add_parser(
        "serve",
        help="online ICD as an HTTP service (a model or a person as teacher)",
        formatter_class=HelpFormatter,
    )
    add_serve_args(svc)
    svc.set_defaults(func=cmd_serve)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers' and the hub's tqdm bars ("Loading weights", GGUF conversion) would print through
    # every run beside our own progress display (rich, not tqdm)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # torch is imported later, so this still counts: OpenMP threads that busy-wait between the small
    # matmuls of a 135M LM stall when anything else shares the cores (BENCHMARKS.md, Speed)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TQDM_DISABLE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # which flags were given (run --resume)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except (UsageError, SpecError) as e:
        print(f"icd: error: {e}", file=sys.stderr)
        return 2
    except ICDError as e:
        print(f"icd: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("icd: interrupted; continue with --resume --out <folder>", file=sys.stderr)
        return 130
