"""Runs ``run_icd`` with the fakes and an ``openai:`` teacher at a loopback URL, with teacher calls in
flight; the stream-driver SIGKILL/resume test runs it as a separate process.

argv: dataset out url fresh|resume teacher_concurrency n gate"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fakes import FakeEmbedder, FakeStudent  # noqa: E402
from icdistill.models.registry import ModelContext, resolve_teacher  # noqa: E402
from icdistill.runner import Parts, RunConfig, run_icd  # noqa: E402


def teacher_spec(url: str) -> str:
    # one request a call (no retries: a kill test counts requests), no response cache
    return f"openai:colour-expert@{url}/v1?timeout=600&retries=0&cache=0&concurrency=16"


if __name__ == "__main__":
    data, out, url, mode, concurrency, n, gate = sys.argv[1:8]
    spec = teacher_spec(url)
    cfg = RunConfig(
        student="fake", teacher=spec, embedder="fake", dataset=data, n=int(n), gate=gate, budget=0.3,
        warmup=2, shots=2, teacher_concurrency=int(concurrency),
    )  # fmt: skip
    parts = Parts(FakeStudent(), resolve_teacher(spec, ModelContext()), FakeEmbedder())
    run_icd(cfg, out, resume=mode == "resume", parts=parts, changes={} if mode == "resume" else None)
