"""The per-query run log: one JSON line per query, appended and fsynced, readable after a crash."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any

from icdistill.errors import ICDError


class RunLog:
    """Append-only JSONL. A torn last line (killed mid-write) is cut off on open, nothing else is lost."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[dict[str, Any]] = self._read_and_repair()
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the run

    def _read_and_repair(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        raw = self.path.read_bytes()
        records: list[dict[str, Any]] = []
        good_end = 0
        pos = 0
        for line in raw.splitlines(keepends=True):
            pos += len(line)
            if not line.endswith(b"\n"):
                break  # torn write
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good_end = pos
        if good_end < len(raw):
            with open(self.path, "r+b") as fh:
                fh.truncate(good_end)
        return records

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, default=_jsonable) + "\n"
        try:
            self._fh.write(line)
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as e:
            raise ICDError(f"could not write run log {self.path}: {e}") from e
        self.records.append(record)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The complete records of a run log (a torn last line is ignored, the file is not changed)."""
    out = []
    # split on newlines only: str.splitlines also splits on U+2028 and friends, which json.dumps
    # leaves unescaped (ensure_ascii=False) inside answers
    text = Path(path).read_text(encoding="utf-8")
    for line in text.split("\n")[:-1]:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


class FolderLock:
    """An exclusive lock (``fcntl.flock``) held while one process works on a run folder or pool file.

    The lock file records the holder's pid for the error message. The kernel drops the lock when its
    holder dies (even by SIGKILL), so a crashed run never blocks its own ``--resume``.
    """

    def __init__(self, path: str | Path, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self._fh: Any = None

    def acquire(self) -> FolderLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open while locked
        except OSError as e:
            raise ICDError(f"cannot lock {self.what}: {e}") from e
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise ICDError(
                f"{self.what} is in use by another process (pid {holder}); wait for it to finish or stop it, "
                "one process per run"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, set | tuple):
        return list(obj)
    return str(obj)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON via a temp file and rename, so readers never see a half-written file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, ensure_ascii=False, default=_jsonable)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise ICDError(f"could not write {path}: {e}") from e
