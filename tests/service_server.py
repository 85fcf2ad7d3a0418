"""Runs `icd serve`'s app in its own process with a fake student and embedder and a real teacher spec
(used by the SIGKILL tests: the process must be killable).
Usage: service_server.py POOL PORT TEACHER_SPEC MAX_CALLS [CLAIM_LEASE_S]; POOL may be a postgresql:// URL."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import uvicorn  # noqa: E402

from fakes import FakeEmbedder, FakeStudent  # noqa: E402
from icdistill.models.registry import resolve_teacher  # noqa: E402
from icdistill.runner import Parts  # noqa: E402
from icdistill.service.app import create_app  # noqa: E402
from icdistill.service.config import ServeConfig  # noqa: E402
from service_helpers import KEY  # noqa: E402


def main() -> None:
    pool, port, teacher, max_calls = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    lease = {"claim_lease_s": float(sys.argv[5])} if len(sys.argv) > 5 else {}
    cfg = ServeConfig(
        pool=pool, port=port, api_key=KEY, teacher=teacher, gate="always", max_calls=max_calls, **lease
    )
    model = None if cfg.human_teacher else resolve_teacher(teacher)
    app = create_app(cfg, Parts(FakeStudent(), model, FakeEmbedder()))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
