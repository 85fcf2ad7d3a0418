"""``icd run --ray``: a stream in shards on real local Ray actors over one real PostgreSQL pool. Every
position is answered once, the global ``--max-calls`` holds across actors, and a ``kill -9`` of an
actor mid-stream loses nothing and buys nothing twice. One local Ray instance (2 CPUs) is shared."""

import json
import os
import signal
import threading
from pathlib import Path

import psycopg
import pytest

from fakes import FakeEmbedder, FakeStudent, colour_folder, first_to
from icdistill.data.stream import load_dataset, stream_order
from icdistill.errors import ICDError, RaySetupError
from icdistill.models.reference import ReferenceTeacher
from icdistill.run_ray import RayRunOptions, run_on_ray
from icdistill.runlog import read_records
from icdistill.runner import Parts, RunConfig

ray = pytest.importorskip("ray")
pytest.importorskip("psycopg")
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def local_ray():
    # actors unpickle the fakes (and this module's students) by name: the tests folder is on their path
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), *([old] if old else [])])
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
    """Kills its own process (a Ray actor) with SIGKILL once, at its ``at``-th prediction (``flag``
    records which process died; a restarted actor sees the flag and lives)."""

    def __init__(self, flag: str, at: int) -> None:
        super().__init__()
        self.flag, self.at = flag, at

    def predict(self, query, demos):
        if self.calls + 1 == self.at and first_to(self.flag):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().predict(query, demos)


class HangingStudent(FakeStudent):
    """Hangs for good (a wait on an event nobody sets) once, at its ``at``-th prediction."""

    def __init__(self, flag: str, at: int) -> None:
        super().__init__()
        self.flag, self.at = flag, at

    def predict(self, query, demos):
        if self.calls + 1 == self.at and first_to(self.flag):
            threading.Event().wait()
        return super().predict(query, demos)


class BreakingStudent(FakeStudent):
    """Raises once (in whichever actor gets there first), at its ``at``-th prediction."""

    def __init__(self, flag: str, at: int) -> None:
        super().__init__()
        self.flag, self.at = flag, at

    def predict(self, query, demos):
        if self.calls + 1 == self.at and first_to(self.flag):
            raise RuntimeError("the student broke")
        return super().predict(query, demos)


def _parts(student=None) -> Parts:
    return Parts(student or FakeStudent(), ReferenceTeacher(), FakeEmbedder())


def _cfg(data, url, **kw) -> RunConfig:
    return RunConfig(
        **{"dataset": str(data), "n": 24, "warmup": 2, "shots": 2, "budget": 0.25, "pool": url, **kw}
    )


def _stream_ids(data, n=24) -> list[str]:
    dataset = load_dataset(data)
    return [dataset.item(i).id for i in stream_order(len(dataset), n, 0)]


def _shard_records(out: Path) -> list[dict]:
    return [
        r for f in sorted(out.glob("shard-*")) for r in read_records(f / "log.jsonl") if r["event"] == "query"
    ]


def _bought(url: str) -> tuple[int, int, int]:
    """(ledger calls, annotation rows, distinct items annotated) of the shared pool."""
    with psycopg.connect(url) as db:
        calls = db.execute("SELECT calls FROM icd_ledger").fetchone()[0]
        rows, distinct = db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT query_id) FROM icd_annotations"
        ).fetchone()
    return calls, rows, distinct


def _assert_each_position_once(out: Path, data, n=24) -> dict:
    recs = _shard_records(out)
    assert sorted(r["query_id"] for r in recs) == sorted(_stream_ids(data, n))  # each item once
    for folder in out.glob("shard-*"):  # and each shard's positions once, in order
        positions = [r["position"] for r in read_records(folder / "log.jsonl") if r["event"] == "query"]
        assert positions == list(range(len(positions)))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_queries"] == n and summary["shards"]["complete"] is True
    return summary


def test_two_actors_answer_the_stream_once_with_one_progress_bar(tmp_path, local_ray, url):
    data = colour_folder(tmp_path / "c", n_per_class=8)
    starts, seen = [], []
    result = run_on_ray(
        _cfg(data, url),
        tmp_path / "big",
        RayRunOptions(workers=2),
        parts=_parts(),
        total=24,
        on_start=lambda done, total: starts.append((done, total)),
        on_record=seen.append,
    )
    assert result.complete and not result.failed
    summary = _assert_each_position_once(tmp_path / "big", data)
    assert starts == [(0, 24)] and len(seen) == 24  # the whole stream, in one bar
    assert sorted(summary["shards"]["merged"]) == ["1/2", "2/2"]
    assert len({w["pid"] for w in summary["ray_workers"]}) == 2
    calls, rows, distinct = _bought(url)
    assert calls == summary["teacher_calls"] == rows == distinct
    assert (tmp_path / "big" / "run.png").exists()
    # a second run into the same folder is refused; --resume of a finished run changes nothing
    with pytest.raises(ICDError, match="already holds a run; pass --resume"):
        run_on_ray(_cfg(data, url), tmp_path / "big", RayRunOptions(workers=2), parts=_parts())
    with pytest.raises(ICDError, match="split in 2 shards: resume it with --workers 2"):
        run_on_ray(_cfg(data, url), tmp_path / "big", RayRunOptions(workers=3), parts=_parts(), resume=True)
    run_on_ray(_cfg(data, url), tmp_path / "big", RayRunOptions(workers=2), parts=_parts(), resume=True)
    assert len(_shard_records(tmp_path / "big")) == 24 and _bought(url) == (calls, rows, distinct)
    # --n grows on resume: each shard goes on with its share of the longer stream, the split unmoved
    with pytest.raises(ICDError, match="--n 12 is shorter than the run's stream"):
        run_on_ray(
            _cfg(data, url), tmp_path / "big", RayRunOptions(workers=2), resume=True, changes={"n": 12}
        )
    run_on_ray(
        _cfg(data, url),
        tmp_path / "big",
        RayRunOptions(workers=2),
        parts=_parts(),
        resume=True,
        changes={"n": 32},
    )
    _assert_each_position_once(tmp_path / "big", data, 32)
    calls, rows, distinct = _bought(url)
    assert calls == rows == distinct


def test_a_global_max_calls_holds_exactly_across_actors(tmp_path, local_ray, url):
    data = colour_folder(tmp_path / "c", n_per_class=8)
    # every query asks the teacher: only the pool's ledger stops the two actors at 5 calls in all
    cfg = _cfg(data, url, gate="always", max_calls=5)
    run_on_ray(cfg, tmp_path / "big", RayRunOptions(workers=2), parts=_parts())
    summary = _assert_each_position_once(tmp_path / "big", data)
    recs = _shard_records(tmp_path / "big")
    # each shard alone would have bought 5 (its own gate caps at 5 too): 10 without the shared ledger
    sizes = [
        len([r for r in read_records(f / "log.jsonl") if r["event"] == "query"])
        for f in (tmp_path / "big").glob("shard-*")
    ]
    assert len(sizes) == 2 and min(sizes) >= 5
    assert summary["teacher_calls"] == sum(r["teacher_asked"] for r in recs) == 5
    assert _bought(url) == (5, 5, 5)


def test_a_killed_actor_is_replaced_and_its_shard_resumes(tmp_path, local_ray, url):
    data = colour_folder(tmp_path / "c", n_per_class=8)
    flag = tmp_path / "died"
    # the 7th prediction of an actor is a few queries into its shard: some logged, some labels bought
    run_on_ray(
        _cfg(data, url), tmp_path / "big", RayRunOptions(workers=2), parts=_parts(DyingStudent(str(flag), 7))
    )
    assert flag.exists()  # an actor really died mid-stream (SIGKILL)
    summary = _assert_each_position_once(tmp_path / "big", data)
    calls, rows, distinct = _bought(url)
    assert rows == distinct == calls  # nothing bought twice
    assert summary["teacher_calls"] <= calls


def test_ray_needs_a_shared_pool_and_enough_cpus(tmp_path, local_ray, url):
    data = colour_folder(tmp_path / "c", n_per_class=2)
    with pytest.raises(ICDError, match="--ray needs a shared pool"):
        run_on_ray(
            RunConfig(dataset=str(data), n=4), tmp_path / "a", RayRunOptions(workers=2), parts=_parts()
        )
    with pytest.raises(
        RaySetupError, match="--workers 3 x --ray-actor-cpus 1 needs 3 CPUs; the Ray cluster has 2"
    ):
        run_on_ray(_cfg(data, url, n=4), tmp_path / "b", RayRunOptions(workers=3), parts=_parts())
    with pytest.raises(RaySetupError, match="--workers must be at least 1"):
        RayRunOptions(workers=0)


def test_a_hung_actor_is_replaced_after_the_stall_timeout(tmp_path, local_ray, url):
    data = colour_folder(tmp_path / "c", n_per_class=8)
    flag = tmp_path / "hung"
    # 20 s: a shard of 12 fake queries logs one every few milliseconds; the hung one never again
    options = RayRunOptions(workers=2, stall_timeout_s=20)
    result = run_on_ray(
        _cfg(data, url), tmp_path / "big", options, parts=_parts(HangingStudent(str(flag), 5))
    )
    assert flag.exists() and result.complete and not result.failed
    summary = _assert_each_position_once(tmp_path / "big", data)
    assert len(summary["ray_workers"]) == 3  # the hung actor's replacement
    calls, rows, distinct = _bought(url)
    assert rows == distinct == calls


def test_out_that_actors_cannot_see_stops_the_run(tmp_path, local_ray, url, monkeypatch):
    data = colour_folder(tmp_path / "c", n_per_class=2)
    elsewhere = tmp_path / "driver-only"
    elsewhere.mkdir()
    # the driver's marker lands on storage the actors do not share (a cluster's local disk)
    monkeypatch.setattr(
        "icdistill.run_ray.write_marker",
        lambda out, token: (elsewhere / ".icd-ray-storage-check").write_text(token),
    )
    with pytest.raises(RaySetupError, match="cannot see --out .*storage every node sees"):
        run_on_ray(_cfg(data, url, n=4), tmp_path / "out", RayRunOptions(workers=2), parts=_parts())
    assert not list((tmp_path / "out").glob("shard-*"))


def test_a_failing_shard_is_named_the_others_finish_and_resume_completes_it(tmp_path, local_ray, url):
    data = colour_folder(tmp_path / "c", n_per_class=8)
    broken = _parts(BreakingStudent(str(tmp_path / "broke"), 4))
    result = run_on_ray(_cfg(data, url), tmp_path / "big", RayRunOptions(workers=2), parts=broken)
    assert not result.complete and len(result.failed) == 1
    (shard,) = result.failed
    assert "RuntimeError: the student broke" in result.failed[shard]
    assert list(result.unfinished) == [shard]
    assert any(f"shard {shard} is unfinished" in p and "the student broke" in p for p in result.problems())
    summary = json.loads((tmp_path / "big" / "summary.json").read_text())
    assert summary["shards"]["complete"] is False and summary["shards"]["failed"] == result.failed
    run_on_ray(_cfg(data, url), tmp_path / "big", RayRunOptions(workers=2), parts=_parts(), resume=True)
    _assert_each_position_once(tmp_path / "big", data)
    calls, rows, distinct = _bought(url)
    assert calls == rows == distinct
