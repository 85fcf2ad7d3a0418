import json

import pytest

from icdistill.errors import ICDError
from icdistill.runlog import FolderLock, RunLog, read_records


def test_read_records_keeps_answers_with_unicode_line_separators(tmp_path):
    path = tmp_path / "log.jsonl"
    with RunLog(path) as log:
        log.append({"position": 0, "answer": "line\u2028break\u2029and\x85more"})
        log.append({"position": 1, "answer": "plain"})
    recs = read_records(path)
    assert [r["position"] for r in recs] == [0, 1]
    assert recs[0]["answer"] == "line\u2028break\u2029and\x85more"
    assert [r["position"] for r in RunLog(path).records] == [0, 1]


def test_read_records_ignores_a_torn_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text(json.dumps({"position": 0}) + "\n" + '{"position": 1, "ans')
    assert read_records(path) == [{"position": 0}]


def test_folder_lock_is_exclusive_and_released(tmp_path):
    lock = FolderLock(tmp_path / "run" / "run.lock", "run folder x").acquire()
    with pytest.raises(ICDError, match=r"in use by another process \(pid \d+\)"):
        FolderLock(tmp_path / "run" / "run.lock", "run folder x").acquire()
    lock.release()
    with FolderLock(tmp_path / "run" / "run.lock", "run folder x"):
        pass
