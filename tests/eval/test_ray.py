"""``icd eval --ray``: cells on Ray actors give the single-process results, survive dead actors and a
killed driver, and refuse storage the workers cannot see. One local Ray instance (2 CPUs) is shared by
the tests, in-process and by driver subprocesses joining it by address; the slow CLI test starts its
own, as ``icd eval --ray`` does."""

import csv
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import ray
from test_harness import WORKER, _timeless

from fakes import FakeEmbedder, FakeStudent, colour_folder, first_to, wait_for
from icdistill.errors import RaySetupError
from icdistill.eval.harness import EvalConfig, plan, run_eval
from icdistill.eval.ray_runner import RayCells, RayOptions
from icdistill.models.reference import ReferenceTeacher
from icdistill.runner import Parts, RunConfig

TESTS = Path(__file__).resolve().parents[1]
SRC = TESTS.parent / "src"
# wall-clock fields: everything else in a row must be the same whichever process ran the cell
TIMING = (
    "seconds_per_query",
    "student_seconds_per_query",
    "teacher_seconds_per_query",
    "peak_rss_mb",
    "image_embed_seconds",
)


@pytest.fixture(scope="module")
def local_ray():
    # workers import the fakes (and this module's students) by name, as the driver does
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS), str(Path(__file__).parent), *([old] if old else [])]
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


class DyingStudent(FakeStudent):
    """Kills its own process (the Ray actor) once, at its ``at``-th prediction; ``flag`` records that."""

    def __init__(self, flag: str, at: int) -> None:
        super().__init__()
        self.flag, self.at = flag, at

    def predict(self, query, demos):
        if self.calls + 1 == self.at and first_to(self.flag):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().predict(query, demos)


class BreakingStudent(FakeStudent):
    """Once per eval (flag files in ``folder``): raises at its ``fail_at``-th prediction, and hangs for
    good (a wait on an event nobody sets) at its ``hang_at``-th, in whichever actor gets there first."""

    def __init__(self, folder: str, fail_at: int, hang_at: int) -> None:
        super().__init__()
        self.folder, self.fail_at, self.hang_at = folder, fail_at, hang_at

    def predict(self, query, demos):
        for kind, at in (("failed", self.fail_at), ("hung", self.hang_at)):
            if self.calls + 1 == at and first_to(str(Path(self.folder) / kind)):
                if kind == "hung":
                    threading.Event().wait()
                raise RuntimeError("the student broke")
        return super().predict(query, demos)


def _grid(data: Path) -> EvalConfig:
    return EvalConfig(
        base=RunConfig(dataset=str(data), n=14, warmup=2, shots=2),
        methods=("icd", "knn-pool", "student-zero-shot"),
        budgets=(0.25,),
        seeds=(0, 1),
    )


def _parts(student=None) -> Parts:
    return Parts(student or FakeStudent(), ReferenceTeacher(), FakeEmbedder())


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(fh)]


def _assert_same_eval(a: Path, b: Path) -> None:
    assert _rows(a / "results.csv") == _rows(b / "results.csv")
    cells = sorted(a.glob("cells/*/*/*"))
    assert cells and sorted(c.relative_to(a) for c in cells) == sorted(
        c.relative_to(b) for c in b.glob("cells/*/*/*")
    )
    for cell in cells:
        assert _timeless(cell / "log.jsonl") == _timeless(b / cell.relative_to(a) / "log.jsonl"), cell


def test_cells_on_ray_actors_equal_the_single_process_eval(tmp_path, local_ray):
    data = colour_folder(tmp_path / "c", n_per_class=5)
    cfg = _grid(data)
    single = run_eval(cfg, tmp_path / "single", parts=_parts())
    runner = RayCells()
    done = []
    rows = run_eval(
        cfg, tmp_path / "ray", parts=_parts(), runner=runner, on_cell_done=lambda d, n, c: done.append(d)
    )
    assert [(r["method"], r["budget"], r["seed"]) for r in rows] == [
        (r["method"], r["budget"], r["seed"]) for r in single
    ]
    _assert_same_eval(tmp_path / "single", tmp_path / "ray")
    assert done == list(range(1, len(plan(cfg)) + 1))
    assert (tmp_path / "ray" / "report.md").exists()
    # two actors (one per CPU) shared the 6 cells, each with one torch thread, not one per core
    assert len(runner.workers) == 2 and len({w["pid"] for w in runner.workers}) == 2
    assert [w["torch_threads"] for w in runner.workers] == [1, 1]
    assert not (tmp_path / "ray" / ".icd-ray-storage-check").exists()


def test_a_killed_actor_is_restarted_and_its_cell_resumed(tmp_path, local_ray):
    data = colour_folder(tmp_path / "c", n_per_class=5)
    cfg = _grid(data)
    run_eval(cfg, tmp_path / "single", parts=_parts())
    flag = tmp_path / "died"
    # the 20th prediction of an actor is in its second cell: one cell finished, one half done
    run_eval(cfg, tmp_path / "ray", parts=_parts(DyingStudent(str(flag), at=20)), runner=RayCells())
    assert flag.exists()  # an actor really died mid-cell
    _assert_same_eval(tmp_path / "single", tmp_path / "ray")


def test_a_failing_and_a_hung_cell_fail_alone_and_resume(tmp_path, local_ray):
    """One cell raising aborted every other cell; one hung actor hung the eval (``ray.wait`` had no
    timeout). Each is now a failure row, the other cells finish, and ``--resume`` runs the two again."""
    from icdistill.errors import ICDError

    data = colour_folder(tmp_path / "c", n_per_class=5)
    cfg = _grid(data)
    run_eval(cfg, tmp_path / "single", parts=_parts())
    broken = _parts(BreakingStudent(str(tmp_path), fail_at=5, hang_at=20))
    # 30 s: a cell of 14 fake queries needs well under a second; the hung one never ends
    runner = RayCells(RayOptions(cell_timeout_s=30))
    with pytest.raises(ICDError, match=r"cells failed: .*RuntimeError: the student broke.*no result within 30 s"):
        run_eval(cfg, tmp_path / "ray", parts=broken, runner=runner)
    rows = _rows(tmp_path / "ray" / "results.csv")
    assert len(rows) == len(plan(cfg)) == 6
    assert sorted(bool(r["error"]) for r in rows) == [False] * 4 + [True] * 2
    assert len(list((tmp_path / "ray").glob("cells/*/*/*/row.json"))) == 4  # written by the driver
    assert len(runner.workers) == 3  # the hung actor was replaced
    run_eval(cfg, tmp_path / "ray", resume=True, parts=_parts(), runner=RayCells())
    _assert_same_eval(tmp_path / "single", tmp_path / "ray")


def test_out_that_workers_cannot_see_stops_the_eval(tmp_path, local_ray, monkeypatch):
    data = colour_folder(tmp_path / "c", n_per_class=3)
    elsewhere = tmp_path / "driver-only"
    elsewhere.mkdir()
    # the driver's marker lands on storage the workers do not share
    monkeypatch.setattr(
        "icdistill.eval.ray_runner.write_marker",
        lambda out, token: (elsewhere / ".icd-ray-storage-check").write_text(token),
    )
    with pytest.raises(RaySetupError, match="cannot see --out .*storage every node sees"):
        run_eval(_grid(data), tmp_path / "out", parts=_parts(), runner=RayCells())
    assert not (tmp_path / "out" / "cells").exists()


def test_a_killed_ray_driver_resumes_to_the_single_process_results(tmp_path, local_ray):
    data = colour_folder(tmp_path / "c", n_per_class=5)
    # the drivers join the running instance by address (`--ray host:port`); the killed driver's
    # actors are ended by Ray, and the resumed driver's actors wait for their cells' locks if need be
    address = local_ray.get_runtime_context().gcs_address
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS), str(Path(__file__).parent)]),
    }
    clean = tmp_path / "clean"
    subprocess.run([sys.executable, str(WORKER), str(data), str(clean), "fresh", "0"], check=True, env=env)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(data), str(killed), "fresh", "0.05", "ray", address],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def under_way() -> list[Path]:  # a cell with a query logged and no row yet
        return [
            c
            for c in killed.glob("cells/*/*/*")
            if not (c / "row.json").exists() and (c / "log.jsonl").exists() and (c / "log.jsonl").stat().st_size
        ]

    # the kill lands when two cells are finished and another is under way, however long that takes on a
    # busy machine (a 120 s window ran out before any cell finished)
    wait_for(
        lambda: proc.poll() is not None or (len(list(killed.glob("cells/*/*/*/row.json"))) >= 2 and under_way()),
        "two finished cells and a half-done one",
        limit_s=900,
    )
    assert proc.poll() is None, "the driver ended before it was killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(killed.glob("cells/*/*/*/row.json")))
    half_done = [c for c in killed.glob("cells/*/*/*") if not (c / "row.json").exists()]
    assert 2 <= finished < 8 and half_done and not (killed / "report.md").exists()
    subprocess.run(
        [sys.executable, str(WORKER), str(data), str(killed), "resume", "0", "ray", address],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        timeout=900,
    )
    _assert_same_eval(clean, killed)


def test_a_cluster_too_small_for_one_actor_is_refused_on_connect(local_ray):
    runner = RayCells(RayOptions(actor_cpus=3))
    with pytest.raises(RaySetupError, match="the Ray cluster has 2 CPUs; an actor needs 3"):
        runner.connect()
    assert local_ray.is_initialized()  # an instance the process already held is left to its owner


def _icd_without_ray(*args: str) -> subprocess.CompletedProcess:
    # `import ray` fails in this process, as where the extra is not installed
    shim = (
        "import sys; sys.modules['ray'] = None; from icdistill.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    return subprocess.run([sys.executable, "-c", shim, *args], capture_output=True, text=True, timeout=300)


def _icd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "icdistill", *args], capture_output=True, text=True, timeout=300
    )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_not_installed_is_a_one_line_usage_error(tmp_path):
    r = _icd_without_ray("eval", "--ray", "--methods", "icd", "--out", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr
    assert (
        r.stderr.strip()
        == "icd: error: --ray needs Ray, which is not installed: pip install 'icdistill[ray]'"
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ray", "127.0.0.1:{port}"], "cannot reach Ray at 127.0.0.1:{port}"),
        (["--ray", "ray://127.0.0.1:{port}"], "cannot reach Ray at ray://127.0.0.1:{port}"),
        (["--ray", "nowhere"], "expected auto, host:port or ray://host:port"),
        (["--ray-cpus", "2"], "--ray-cpus, --ray-actor-cpus and --ray-cell-timeout need --ray"),
        (["--ray", "127.0.0.1:{port}", "--ray-cpus", "2"], "--ray-cpus sizes a local Ray instance"),
    ],
)
def test_ray_usage_errors_are_one_line_and_write_nothing(tmp_path, args, message):
    port = _closed_port()
    r = _icd("eval", "--methods", "icd", "--out", str(tmp_path / "o"), *[a.format(port=port) for a in args])
    assert r.returncode == 2, r.stderr
    assert message.format(port=port) in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cli_eval_on_ray_matches_the_single_process_cli(tmp_path):
    data = colour_folder(tmp_path / "c", n_per_class=4)
    args = [
        "eval",
        "--dataset",
        str(data),
        "--n",
        "10",
        "--seeds",
        "0,1",
        "--budgets",
        "0.2",
        "--warmup",
        "2",
    ]
    args += ["--methods", "teacher-zero-shot,knn-pool:shots=1", "--quiet"]
    single = _icd(*args, "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    # the real embedder, loaded once by each of 2 actors on a local 2-CPU Ray instance
    on_ray = _icd(*args, "--out", str(tmp_path / "ray"), "--ray", "--ray-cpus", "2")
    assert on_ray.returncode == 0, on_ray.stderr
    assert "ran on 2 Ray actors on 1 node(s), 1 torch thread(s) each" in on_ray.stderr
    assert _rows(tmp_path / "ray" / "results.csv") == _rows(tmp_path / "single" / "results.csv")
    assert (tmp_path / "ray" / "report.md").exists()
