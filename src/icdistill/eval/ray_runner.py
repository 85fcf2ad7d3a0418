"""``icd eval --ray``: the cells of an eval run on Ray actors, each loading the models once.

The driver plans, dispatches and writes results; every actor runs cells with the harness's own
``CellWorker`` into the same ``out/cells/...`` folders as the single-process eval, so a cell's log,
pool and row are the same whichever process ran it, and ``--resume`` works across both. A killed
driver takes its actors with it (Ray ends a job's actors when its driver dies); the next ``--resume``
skips finished cells and continues half-done ones. A killed actor is restarted by Ray and its cell
retried, which continues that cell from its log.

One cell does not stop the others: a cell that raises, whose actor dies past its restarts, or that
gives no result within ``cell_timeout_s`` (its actor is then killed and replaced) becomes a failure
row (``error``) and the eval goes on; ``run_eval`` then names the failed cells, and ``--resume`` runs
them again. ``ray.util.ActorPool`` is not used: its ``get_next_unordered(timeout=)`` says only that
*some* result is late, not which cell or actor, and it cannot replace an actor, so a per-cell deadline
needs this loop's own bookkeeping anyway.

Cell folders (logs, pools) are written by the actors, so on a cluster ``--out`` must be on storage
every node sees at the same path: a marker file written by the driver is read back by every actor
before any cell runs, and a worker that cannot see it stops the eval with an error. A cell's row
comes back through Ray's object store and the driver writes it (``row.json``, results.csv): what
marks a cell finished never depends on a lock or a write across hosts. The cell's own lock
(``run.lock``, ``flock``) only guards a cell against an actor of a killed driver that is still
exiting; where ``flock`` is not shared between hosts (some NFS mounts) only the driver's dispatch,
which sends a cell to one actor at a time, keeps a cell single.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from icdistill.errors import ICDError, RaySetupError
from icdistill.eval.cells import Cell
from icdistill.eval.harness import CellJob, CellWorker, failed_row, finished_row, write_row_json
from icdistill.runlog import FolderLock

MARKER = ".icd-ray-storage-check"
INSTALL_HINT = "pip install 'icdistill[ray]'"
# how long a cell waits for the lock of a process that is still dying (an actor of a killed driver)
LOCK_WAIT_S = 60.0
# environment of every actor: set before torch loads there
_PASS_ENV = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HUB_DISABLE_PROGRESS_BARS",
    "TOKENIZERS_PARALLELISM",
    "TQDM_DISABLE",
    "HF_HOME",
)


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide: ``address`` None starts a local Ray instance of ``cpus`` CPUs (default: all);
    otherwise ``auto``, ``host:port`` (a cluster's GCS) or ``ray://host:port`` (Ray Client)."""

    address: str | None = None
    cpus: int | None = None
    actor_cpus: int = 1
    max_restarts: int = 3
    cell_timeout_s: float | None = None  # a cell with no result after this long fails (None: no limit)

    def __post_init__(self) -> None:
        if self.cell_timeout_s is not None and not self.cell_timeout_s > 0:
            raise RaySetupError(f"--ray-cell-timeout must be > 0 seconds, got {self.cell_timeout_s}")
        if self.cpus is not None and self.cpus < 1:
            raise RaySetupError(f"--ray-cpus must be at least 1, got {self.cpus}")
        if self.actor_cpus < 1:
            raise RaySetupError(f"--ray-actor-cpus must be at least 1, got {self.actor_cpus}")
        if self.address is not None and self.cpus is not None:
            raise RaySetupError(
                "--ray-cpus sizes a local Ray instance; a cluster (--ray ADDRESS) has its own"
            )


def import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise RaySetupError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from e
    return ray


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A plain TCP connect first: ``ray.init`` on a dead address waits minutes before failing."""
    if address == "auto":
        return
    hostport = address.removeprefix("ray://").rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RaySetupError(f"--ray {address}: expected auto, host:port or ray://host:port")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise RaySetupError(f"cannot reach Ray at {address}: {e}") from e


def storage_problem(marker: Path, token: str) -> str | None:
    """Why this process cannot see the marker the driver wrote into --out (None: it can)."""
    try:
        seen = marker.read_text(encoding="utf-8").strip()
    except OSError as e:
        return f"cannot read {marker}: {e.strerror or e}"
    if seen != token:
        return f"{marker} holds another eval's marker (a different folder at the same path)"
    return None


def wait_for_cell(folder: Path, timeout: float = LOCK_WAIT_S) -> None:
    """Wait while another process (an actor of a killed driver, still exiting) holds the cell's lock."""
    lock_path = folder / "run.lock"
    if not lock_path.exists():
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            FolderLock(lock_path, f"cell {folder}").acquire().release()
            return
        except ICDError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class _CellActor:
    """One Ray actor: a ``CellWorker`` (models loaded once) running the cells it is sent.

    The job comes with each cell as a nested reference and is fetched once: a restarted actor (after
    its process died) fetches it again from the driver, which holds it until the eval ends."""

    def __init__(self, out: Path, token: str, threads: int) -> None:
        # the actor holds `threads` CPUs: as many torch threads, not one per core of the machine
        import torch

        torch.set_num_threads(threads)
        self.out, self.token = out, token
        self.worker: CellWorker | None = None

    def describe(self) -> dict[str, Any]:
        import torch

        return {
            "node": socket.gethostname(),
            "pid": os.getpid(),
            "torch_threads": torch.get_num_threads(),
            "storage_problem": storage_problem(self.out / MARKER, self.token),
        }

    def run(self, job_ref: list[Any], cell: Cell) -> dict[str, Any]:
        problem = storage_problem(self.out / MARKER, self.token)
        if problem is not None:
            raise RaySetupError(_storage_message(self.out, socket.gethostname(), problem))
        if self.worker is None:
            import ray

            self.worker = CellWorker(ray.get(job_ref[0]))
        wait_for_cell(self.out / cell.path)
        return self.worker.run(cell, write_row=False)  # the row goes back to the driver, which stores it


def _storage_message(out: Path, node: str, problem: str) -> str:
    return (
        f"a Ray worker on {node} cannot see --out {out} ({problem}): on a cluster --out must be a folder "
        "on storage every node sees at the same path (e.g. an NFS mount)"
    )


class RayCells:
    """A ``CellRunner`` that spreads cells over Ray actors and yields rows as they finish."""

    def __init__(self, options: RayOptions | None = None) -> None:
        self.options = options or RayOptions()
        self.workers: list[dict[str, Any]] = []  # what each actor reported (node, pid, torch threads)
        self._ray: Any = None
        self._owns = False  # whether close() disconnects (and stops the local instance we started)
        self._job_ref: Any = None
        self._new_actor: Any = None  # starts one more actor like the others (a replacement)
        self._job_out = Path()

    def connect(self) -> None:
        """Import Ray and start or join the instance now (errors before anything is written)."""
        if self._ray is None:
            ray = import_ray()
            self._owns = self._connect(ray)
            self._ray = ray
            try:
                self._cluster_cpus(ray)
            except RaySetupError:
                self.close()
                raise

    def close(self) -> None:
        if self._ray is not None and self._owns:
            self._ray.shutdown()
        self._ray, self._owns = None, False

    def run(self, cells: Sequence[Cell], job: CellJob) -> Iterator[tuple[int, dict[str, Any]]]:
        out = job.out.resolve()  # actors may not share the driver's working directory
        pending = []
        for i, cell in enumerate(cells):
            row = finished_row(cell, out)
            if row is not None:
                yield i, row
            else:
                pending.append(i)
        if not pending:
            return
        connected_here = self._ray is None
        self.connect()
        ray = self._ray
        token = uuid.uuid4().hex
        write_marker(out, token)
        actors: list[Any] = []
        try:
            self._job_out = out
            self._start_actors(ray, replace(job, out=out), token, len(pending), actors)
            yield from self._dispatch(ray, cells, pending, actors)
        finally:
            for actor in actors:
                with contextlib.suppress(Exception):
                    ray.kill(actor)
            self._job_ref = None
            with contextlib.suppress(OSError):
                (out / MARKER).unlink()
            if connected_here:
                self.close()

    def _connect(self, ray: Any) -> bool:
        """Connect (True: we started or joined Ray here and shut it down after); an instance this
        process already holds is used as it is (tests share one)."""
        if ray.is_initialized():
            return False
        opts = self.options
        kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,  # worker output stays in Ray's session logs, not across the progress bars
            "logging_level": logging.WARNING,
        }
        try:
            if opts.address is None:
                _quiet_token_auth_notice()
                ray.init(num_cpus=opts.cpus or os.cpu_count() or 1, **kwargs)
            else:
                check_reachable(opts.address)
                ray.init(address=opts.address, **kwargs)
        except RaySetupError:
            raise
        except (Exception, SystemExit) as e:  # ray.init exits the process when the GCS never answers
            where = (
                "start a local Ray instance" if opts.address is None else f"connect to Ray at {opts.address}"
            )
            raise RaySetupError(
                f"cannot {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ) from e
        return True

    def _cluster_cpus(self, ray: Any) -> int:
        total = int(ray.cluster_resources().get("CPU", 0))
        if total < self.options.actor_cpus:
            raise RaySetupError(
                f"the Ray cluster has {total} CPUs; an actor needs {self.options.actor_cpus} (--ray-actor-cpus)"
            )
        return total

    def _start_actors(self, ray: Any, job: CellJob, token: str, n_pending: int, actors: list[Any]) -> None:
        """Start actors into ``actors`` (the caller kills them whatever happens) and check each sees --out."""
        opts = self.options
        n = min(n_pending, self._cluster_cpus(ray) // opts.actor_cpus)
        env = {k: os.environ[k] for k in _PASS_ENV if k in os.environ}
        threads = str(opts.actor_cpus)
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OMP_WAIT_POLICY="PASSIVE")
        actor_cls = ray.remote(_CellActor).options(
            num_cpus=opts.actor_cpus,
            max_restarts=opts.max_restarts,
            max_task_retries=opts.max_restarts,
            runtime_env={"env_vars": env},
        )
        # the dataset and any injected models are sent once, not per actor; the reference is held until
        # the eval ends because a restarted actor is constructed from it again
        self._job_ref = ray.put(job)
        self._new_actor = lambda: actor_cls.remote(job.out, token, opts.actor_cpus)
        actors.extend(self._new_actor() for _ in range(n))
        self.workers = []
        self._ready(ray, actors)

    def _ready(self, ray: Any, actors: list[Any]) -> None:
        """Wait until ``actors`` have started (into ``workers``); each must see --out."""
        described = [_get(ray, ref, "starting") for ref in [a.describe.remote() for a in actors]]
        self.workers.extend(described)
        for w in described:
            if w["storage_problem"]:
                raise RaySetupError(_storage_message(self._job_out, w["node"], w["storage_problem"]))

    def _dispatch(
        self, ray: Any, cells: Sequence[Cell], pending: list[int], actors: list[Any]
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        queue = deque(pending)
        running: dict[Any, tuple[Any, int, float]] = {}  # result ref -> actor, cell, deadline
        limit = self.options.cell_timeout_s
        out = self._job_out

        def submit(actor: Any) -> None:
            if queue:
                i = queue.popleft()
                deadline = time.monotonic() + limit if limit is not None else math.inf
                running[actor.run.remote([self._job_ref], cells[i])] = (actor, i, deadline)

        def replace_actor(actor: Any) -> None:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
            actors.remove(actor)
            actors.append(self._new_actor())
            self._ready(ray, actors[-1:])  # started before its cell's deadline runs
            submit(actors[-1])

        for actor in actors:
            submit(actor)
        while running:
            nearest = min(deadline for _, _, deadline in running.values())
            wait_s = None if nearest == math.inf else max(0.0, nearest - time.monotonic())
            ready, _ = ray.wait(list(running), num_returns=1, timeout=wait_s)
            if not ready:  # a cell ran past its deadline: it fails, its (hung) actor is replaced
                now = time.monotonic()
                for ref, (actor, i, deadline) in list(running.items()):
                    if deadline <= now:
                        del running[ref]
                        replace_actor(actor)
                        yield i, failed_row(cells[i], f"no result within {limit:g} s; its actor was stopped")
                continue
            actor, i, _ = running.pop(ready[0])
            try:
                row = _get(ray, ready[0], f"running {cells[i].label()}")
            except RaySetupError:
                raise  # the eval cannot work as set up: no cell can
            except _ActorLost as e:
                replace_actor(actor)
                yield i, failed_row(cells[i], str(e))
                continue
            except Exception as e:  # this cell's own failure: the others go on
                submit(actor)
                yield i, failed_row(cells[i], f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                continue
            write_row_json(cells[i], out, row)
            submit(actor)
            yield i, row


def _quiet_token_auth_notice() -> None:
    """Drop Ray's notice that a local instance uses token authentication (its default in Ray 2.60), printed
    on every start; the warning that authentication is *disabled* still shows. (Setting RAY_AUTH_MODE
    instead does not work once ``ray`` is imported: Ray reads it at import.)"""
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropTokenAuthNotice) for f in log.filters):
        log.addFilter(_DropTokenAuthNotice())


class _DropTokenAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


def write_marker(out: Path, token: str) -> None:
    (out / MARKER).write_text(token + "\n", encoding="utf-8")


def _get(ray: Any, ref: Any, doing: str) -> Any:
    """``ray.get``, with a worker's own error raised as itself (an ICDError stays an ICDError)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise
    except ray.exceptions.RayActorError as e:
        raise _ActorLost(
            f"a Ray worker died {doing} and could not be restarted ({str(e).splitlines()[0]}); "
            "finished cells are kept: continue with --resume"
        ) from e


class _ActorLost(ICDError):
    """An actor died past its restarts."""
