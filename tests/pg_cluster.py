"""A throwaway PostgreSQL cluster for tests: Debian's server binaries, a free port, a temp folder.

PostgreSQL refuses to run as root, so under root the cluster belongs to ``nobody``. The cluster is
stopped and its folder removed when the context exits; ``restart_cluster`` restarts it in between
(``pg_ctl -m fast restart``: every backend is terminated, the port stays), ``pg_ctl_cluster`` runs any
``pg_ctl`` command on it (``stop``, ``start``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

# the running clusters by URL: how to run pg_ctl on each
_PG_CTL: dict[str, Callable[..., None]] = {}


def pg_bin() -> Path | None:
    """The newest Debian PostgreSQL server binaries (/usr/lib/postgresql/<version>/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[str]:
    """Yields the URL of a running cluster (database ``postgres``, user ``postgres``, trust auth)."""
    bindir = pg_bin()
    if bindir is None:
        raise RuntimeError(
            "PostgreSQL server binaries not found: run scripts/install.sh (Debian 'postgresql')"
        )
    root = Path(tempfile.mkdtemp(prefix="icd-pg-"))
    data = root / "data"
    as_user: dict[str, int] = {}
    if os.geteuid() == 0:
        as_user = {"user": 65534, "group": 65534}  # nobody
        os.chown(root, 65534, 65534)
        os.chmod(root, 0o700)
    port = free_port()
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}

    def run(*args: str) -> None:
        subprocess.run(args, check=True, capture_output=True, env=env, cwd=root, **as_user)  # type: ignore[call-overload]

    try:
        run(
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60"
        run(
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            opts,
            "-l",
            str(root / "log"),
            "-w",
            "-t",
            "60",
            "start",
        )
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        # the server's output to its log file: a pipe to pg_ctl would be held open by the server
        _PG_CTL[url] = lambda *args: run(
            str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"), "-t", "120", *args
        )
        yield url
    finally:
        _PG_CTL.pop(f"postgresql://postgres@127.0.0.1:{port}/postgres", None)
        with contextlib.suppress(subprocess.CalledProcessError, FileNotFoundError):
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def pg_ctl_cluster(url: str, *args: str) -> None:
    """``pg_ctl ARGS`` on the throwaway cluster of ``url`` (any database's URL on it)."""
    _PG_CTL[url.rsplit("/", 1)[0] + "/postgres"](*args)


def restart_cluster(url: str) -> None:
    """``pg_ctl -m fast restart``; returns once the cluster accepts connections again."""
    pg_ctl_cluster(url, "-m", "fast", "-w", "restart")


def fresh_database(admin_url: str, name: str) -> str:
    """A new empty database on the cluster; returns its URL."""
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + f"/{name}"
