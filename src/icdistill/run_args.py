"""The ``icd run`` command line: its flags (models, data, demonstrations, gate, teacher, output), which
flags a command line names, and the flags that repeat a stored config (``config_flags``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from icdistill.loop_args import add_loop_args


def _none_or_int(s: str) -> int | None:
    if s.lower() in ("none", "all"):
        return None
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'all', got {s!r}") from None


def _add_run_args(p: argparse.ArgumentParser) -> None:
    from icdistill.runner import RunConfig

    d = RunConfig()
    g = p.add_argument_group("models")
    g.add_argument("--student", default=d.student, help="student spec (default: %(default)s)")
    g.add_argument(
        "--teacher",
        default=d.teacher,
        help="teacher spec, e.g. reference, reference:noise=0.2, openai:gpt-4o@URL",
    )
    g.add_argument("--embedder", default=d.embedder, help="retrieval embedder spec (default: %(default)s)")
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default=d.dataset,
        help="fashion-mnist, a folder (one sub-folder per class), a .jsonl manifest, or "
        "hf:<Hugging Face dataset folder, parquet file or cached name>?image=COL&label=COL&split=NAME",
    )
    g.add_argument("--split", default=d.split, help="split of built-in datasets (default: %(default)s)")
    g.add_argument(
        "--n",
        type=_none_or_int,
        default=d.n,
        help="stream length; 'all' for the whole dataset (default: %(default)s)",
    )
    g.add_argument(
        "--seed", type=int, default=d.seed, help="stream order and sampling seed (default: %(default)s)"
    )
    g.add_argument(
        "--no-shuffle",
        dest="shuffle",
        action="store_false",
        help="keep the dataset's order (default: shuffled)",
    )
    demos = p.add_argument_group("demonstrations")
    gate = p.add_argument_group("gate")
    teacher = p.add_argument_group("teacher")
    add_loop_args(demos, gate, teacher, d)
    demos.add_argument(
        "--pool",
        default=d.pool,
        metavar="postgresql://...",
        help="share the pool with other workers in PostgreSQL (default: the run's own pool.sqlite)",
    )
    demos.add_argument(
        "--shard",
        default=d.shard,
        metavar="K/N",
        help="answer shard K of N of the stream (split by item id; --n counts the whole stream); the N "
        "workers share one --pool postgresql://... (see icd merge)",
    )
    demos.add_argument(
        "--mix-questions",
        action="store_true",
        help="let a query see demos of other kinds of question (another option set, or open vs options)",
    )
    teacher.add_argument(
        "--max-teacher-failures",
        type=int,
        default=d.max_teacher_failures,
        help="stop (resumable) after this many failed teacher calls in a row; 0: never",
    )
    teacher.add_argument(
        "--teacher-concurrency",
        type=int,
        default=d.teacher_concurrency,
        help="teacher calls in flight while the stream goes on (1: the stream waits for each call; "
        "default: %(default)s)",
    )
    g = p.add_argument_group("speed")
    g.add_argument(
        "--batch",
        type=int,
        default=d.batch,
        help="queries whose student passes are read ahead together, then answered one at a time "
        "(the answers of --batch 1, faster; default: %(default)s)",
    )
    p.add_argument("--out", default=None, help="output folder (default: runs/<timestamp>)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out where it stopped, with its stored config (--n may grow it)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _given_run_flags(argv: Sequence[str]) -> set[str]:
    """The RunConfig fields named on the command line (a flag given with its default value counts)."""
    p = argparse.ArgumentParser(add_help=False)
    _add_run_args(p)
    for action in p._actions:
        action.default = argparse.SUPPRESS
    try:
        ns, _ = p.parse_known_args(list(argv))
    except SystemExit:  # pragma: no cover - the real parser already accepted argv
        return set()
    return set(vars(ns))


def config_flags(config: dict[str, Any], skip: Sequence[str] = ()) -> list[str]:
    """The ``icd run`` flags that give a stored config's values where they differ from the defaults
    (``skip``: fields left out), e.g. to repeat a run's setting in ``icd eval``."""
    p = argparse.ArgumentParser(add_help=False)
    _add_run_args(p)
    out: list[str] = []
    for action in p._actions:
        dest = action.dest
        if dest not in config or dest in skip or config[dest] == action.default:
            continue
        flag = max(action.option_strings, key=len)
        value = config[dest]
        if action.nargs == 0:  # an on/off flag: its presence flips the default
            out.append(flag)
        else:
            out += [flag, "all" if value is None else str(value)]
    return out


def add_ray_run_args(p: argparse.ArgumentParser) -> None:
    """``icd run --ray``'s flags: the stream in shards on Ray actors (``icdistill.run_ray``)."""
    r = p.add_argument_group("Ray: the stream in shards on a cluster (pip install 'icdistill[ray]')")
    r.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="answer the stream in --workers shards on Ray actors (models loaded once per actor, one "
        "--pool postgresql://... shared): a local Ray instance, or the cluster at ADDRESS (auto, host:port "
        "or ray://host:port; --out is then required, on storage every node sees)",
    )
    r.add_argument("--workers", type=int, default=None, help="shard actors (--ray; default: 2)")
    r.add_argument(
        "--ray-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all cores)"
    )
    r.add_argument(
        "--ray-actor-cpus",
        type=float,
        default=1.0,
        help="CPUs each actor holds (its torch threads: the whole part, at least 1)",
    )
    r.add_argument("--ray-actor-gpus", type=float, default=0.0, help="GPUs each actor holds")
    r.add_argument(
        "--ray-stall-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="replace an actor whose shard logs nothing this long (model loading included; default: never)",
    )
