import itertools
import os
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

# With 2 cores shared by the test process and in-process servers, OpenMP's busy-waiting threads
# stall small matmuls (measured: 162 s -> 37 s for the SmolLM2 tests). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# shared-pool workers map this host's saved index from a cache folder: the tests' own, not ~/.cache
os.environ.setdefault("ICD_POOL_CACHE", tempfile.mkdtemp(prefix="icd-pool-cache-"))

_pg_databases = itertools.count()


@pytest.fixture(scope="session")
def cluster():
    """A throwaway PostgreSQL cluster (Debian's server) for the shared-pool tests, removed at the end."""
    from pg_cluster import throwaway_cluster

    with throwaway_cluster() as url:
        yield url


@pytest.fixture()
def url(cluster):
    """A fresh database on ``cluster`` for one test."""
    from pg_cluster import fresh_database

    return fresh_database(cluster, f"icd_{os.getpid()}_{next(_pg_databases)}")
