"""``icd run --shard K/N`` and ``icd merge``: shards of one stream on one real PostgreSQL pool answer each
item exactly once, and the merged summary is the one recomputed from the shards' logs."""

import json
from dataclasses import replace

import psycopg
import pytest

from fakes import FakeEmbedder, FakeStudent, colour_folder
from icdistill.cli import main
from icdistill.data.stream import load_dataset, stream_order
from icdistill.errors import ICDError
from icdistill.merge import merge_shards
from icdistill.models.reference import ReferenceTeacher
from icdistill.runlog import read_records
from icdistill.runner import Parts, RunConfig, run_icd
from icdistill.shard import Shard, run_order, shard_of

pytest.importorskip("psycopg")


def _parts() -> Parts:
    return Parts(FakeStudent(), ReferenceTeacher(), FakeEmbedder())


def _cfg(data, url, **kw) -> RunConfig:
    return RunConfig(
        **{"dataset": str(data), "n": 24, "warmup": 2, "shots": 2, "budget": 0.25, "pool": url, **kw}
    )


def _run_shards(cfg: RunConfig, root, count: int, only=None) -> list:
    folders = []
    for k in only or range(1, count + 1):
        folder = root / Shard(k, count).folder_name
        run_icd(replace(cfg, shard=f"{k}/{count}"), folder, parts=_parts())
        folders.append(folder)
    return folders


def test_shard_flags_are_checked():
    for bad in ("3", "0/3", "4/3", "a/b", "1/0"):
        with pytest.raises(ICDError, match="--shard"):
            Shard.parse(bad)
    assert Shard.parse(" 2/4 ") == Shard(2, 4) and Shard(2, 4).folder_name == "shard-2-of-4"
    with pytest.raises(ICDError, match="--shard 1/3 splits the stream .* add --pool postgresql://"):
        RunConfig(shard="1/3")


def test_a_shard_of_a_sqlite_pool_is_refused_on_the_command_line(tmp_path, capsys):
    data = colour_folder(tmp_path / "c", n_per_class=2)
    out = tmp_path / "o"
    assert main(["run", "--dataset", str(data), "--shard", "1/2", "--out", str(out), "--quiet"]) == 2
    assert "add --pool postgresql://" in capsys.readouterr().err
    assert not out.exists()


def test_the_split_is_by_item_id_and_stable_as_the_stream_grows(tmp_path):
    data = load_dataset(colour_folder(tmp_path / "c", n_per_class=8))
    whole = stream_order(len(data), 32, seed=3)
    parts = [run_order(data, 32, 3, True, f"{k}/3") for k in (1, 2, 3)]
    assert sorted(i for p in parts for i in p) == sorted(whole)  # every item once
    for k, p in enumerate(parts, start=1):
        assert p == [i for i in whole if shard_of(data.item(i).id, 3) == k]  # the stream's order
        # a shorter stream's shard is a prefix of the longer one's (so --n may grow on resume)
        short = run_order(data, 16, 3, True, f"{k}/3")
        assert p[: len(short)] == short
        # another seed reorders the shard's items, it does not move items between shards
        assert sorted(run_order(data, None, 9, True, f"{k}/3")) == sorted(
            run_order(data, None, 3, True, f"{k}/3")
        )


def test_three_shards_answer_each_item_once_and_merge_to_the_recomputed_summary(tmp_path, url):
    data = colour_folder(tmp_path / "c", n_per_class=8)  # 32 items, a stream of 24
    cfg = _cfg(data, url)
    folders = _run_shards(cfg, tmp_path / "big", 3)
    ids = [r["query_id"] for f in folders for r in read_records(f / "log.jsonl") if r["event"] == "query"]
    dataset = load_dataset(data)
    stream = [dataset.item(i).id for i in stream_order(len(dataset), 24, 0)]
    assert sorted(ids) == sorted(stream) and len(ids) == 24  # each item of the stream exactly once
    assert all(json.loads((f / "summary.json").read_text())["shard"] for f in folders)

    result = merge_shards(folders)
    assert result.complete and result.out == (tmp_path / "big").resolve()
    merged = json.loads((tmp_path / "big" / "summary.json").read_text())
    # recomputed from the logs, by hand
    recs = [r for f in folders for r in read_records(f / "log.jsonl") if r["event"] == "query"]
    labelled = [r for r in recs if r["correct"] is not None]
    assert merged["n_queries"] == 24
    assert merged["accuracy"] == pytest.approx(sum(r["correct"] for r in labelled) / len(labelled))
    assert merged["teacher_calls"] == sum(r["teacher_asked"] for r in recs)
    assert merged["first_pass_accuracy"] == pytest.approx(
        sum(r["first_correct"] for r in labelled) / len(labelled)
    )
    for label, row in merged["per_label"].items():
        mine = [r for r in labelled if r["label"] == label]
        assert row["n"] == len(mine)
        assert row["accuracy"] == pytest.approx(sum(r["correct"] for r in mine) / len(mine))
    assert merged["dataset"]["stream_length"] == 24 and merged["shards"]["complete"] is True
    assert (tmp_path / "big" / "run.png").stat().st_size > 0
    assert (tmp_path / "big" / "per_label.csv").read_text().startswith("label,n,accuracy")
    # the teacher was paid once per label across the shards: the ledger counts what the logs say
    with psycopg.connect(url) as db:
        ledger_calls = db.execute("SELECT calls FROM icd_ledger").fetchone()[0]
        rows, distinct = db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT query_id) FROM icd_annotations"
        ).fetchone()
    assert ledger_calls == merged["teacher_calls"] == rows == distinct


def test_merge_names_missing_and_unfinished_shards(tmp_path, url, capsys):
    data = colour_folder(tmp_path / "c", n_per_class=8)
    cfg = _cfg(data, url)
    folders = _run_shards(cfg, tmp_path / "big", 3, only=(1, 3))
    # shard 3 stopped early: its log lost its last two lines (a killed worker)
    log = folders[1] / "log.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:-2]))
    code = main(["merge", *map(str, folders), "--out", str(tmp_path / "merged")])
    err = capsys.readouterr().err
    assert code == 1
    assert "shard 2/3 is missing" in err
    assert f"shard 3/3 is unfinished ({len(lines) - 2} of {len(lines)} positions)" in err
    summary = json.loads((tmp_path / "merged" / "summary.json").read_text())
    assert summary["shards"]["missing"] == ["2/3"] and summary["shards"]["complete"] is False
    # resuming the short shard and running the missing one completes the merge
    run_icd(replace(cfg, shard="3/3"), folders[1], resume=True, parts=_parts())
    _run_shards(cfg, tmp_path / "big", 3, only=(2,))
    assert (
        main(
            [
                "merge",
                *sorted(map(str, (tmp_path / "big").glob("shard-*"))),
                "--out",
                str(tmp_path / "merged"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "merged" / "summary.json").read_text())["n_queries"] == 24


def test_merge_refuses_shards_of_different_streams(tmp_path, url):
    data = colour_folder(tmp_path / "c", n_per_class=4)
    a = _run_shards(_cfg(data, url, n=12), tmp_path / "a", 2, only=(1,))
    b = _run_shards(_cfg(data, url, n=12, seed=5), tmp_path / "b", 2, only=(2,))
    with pytest.raises(ICDError, match="a shard of another stream .*--seed 5 vs 0"):
        merge_shards([*a, *b])
    solo = tmp_path / "solo"
    run_icd(RunConfig(dataset=str(data), n=4, warmup=1), solo, parts=_parts())
    with pytest.raises(ICDError, match="is not a shard"):
        merge_shards([solo])


def test_a_shard_resumes_with_a_longer_stream(tmp_path, url):
    data = colour_folder(tmp_path / "c", n_per_class=8)
    cfg = _cfg(data, url, n=12)
    (folder,) = _run_shards(cfg, tmp_path, 2, only=(1,))
    before = [r["query_id"] for r in read_records(folder / "log.jsonl")]
    run_icd(replace(cfg, n=32, shard="1/2"), folder, resume=True, parts=_parts(), changes={"n": 32})
    after = [r["query_id"] for r in read_records(folder / "log.jsonl")]
    dataset = load_dataset(data)
    assert after[: len(before)] == before
    assert after == [dataset.item(i).id for i in run_order(dataset, 32, 0, True, "1/2")]


def test_ray_flags_are_checked_before_anything_starts(tmp_path, capsys):
    data = colour_folder(tmp_path / "c", n_per_class=2)
    pool = ["--pool", "postgresql://icd@127.0.0.1:1/icd"]
    base = ["run", "--dataset", str(data), "--quiet", *pool]
    assert main([*base, "--workers", "2", "--out", str(tmp_path / "a")]) == 2
    assert "need --ray" in capsys.readouterr().err
    assert main([*base, "--ray", "10.0.0.1:6379", "--workers", "2"]) == 2
    assert "give --out, a folder on storage every node sees" in capsys.readouterr().err
    assert main([*base, "--ray", "--workers", "0", "--out", str(tmp_path / "b")]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err
    assert main([*base, "--ray", "--replace", "--out", str(tmp_path / "b")]) == 2
    assert "--replace" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
