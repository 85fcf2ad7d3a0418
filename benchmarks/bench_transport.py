"""Transport for ``openai:``: our httpx client vs the official ``openai`` SDK (``AsyncOpenAI``), on 127.0.0.1.

Usage: ``nice -n 19 .venv/bin/python benchmarks/bench_transport.py [--n 300]`` with the SDK importable
(``pip install openai``, or ``PYTHONPATH=<dir with openai>``). Both send the same chat request (one
32x32 image, an options line) to the same ``serve-model`` app over a FakeStudent-like scorer; the server
is the same process, so the numbers are the client's overhead plus a fixed loopback round trip.
Timed: import time of each stack, sequential latency per request (p50/p90) and throughput at
concurrency 4. Behaviour: how each reports the server replies ``openai:`` must handle (vLLM's old
error shape, llama.cpp refusing ``n``, a 301 redirect, a 429 ``insufficient_quota``). The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _import_seconds(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    runs = [float(subprocess.check_output([sys.executable, "-c", code], text=True)) for _ in range(3)]
    return min(runs)


class Server:
    """uvicorn on a free 127.0.0.1 port in a thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)


def _scripted_app(reply: Any) -> Any:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()
    app.state.hits = 0

    @app.post("/v1/chat/completions")
    async def chat(body: dict) -> JSONResponse:
        app.state.hits += 1
        status, data, headers = reply(body)
        return JSONResponse(data, status_code=status, headers=headers)

    return app


def _stats(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    return {"p50_ms": statistics.median(ms), "p90_ms": ms[int(0.9 * (len(ms) - 1))]}


def timing(n: int) -> dict[str, Any]:
    from openai import AsyncOpenAI
    from PIL import Image

    from icdistill.conformance import sample_queries
    from icdistill.models.openai_api import OpenAIChatModel
    from icdistill.serve_model import create_app
    from icdistill.types import Prediction

    class Scorer:
        name = "scorer"

        def predict(self, query: Any, demos: Any) -> Prediction:
            options = query.options or ("yes", "no")
            return Prediction(answer=options[0], option_scores={o: -float(i) for i, o in enumerate(options)})

    q = sample_queries()[0]
    q = type(q)(id=q.id, image=Image.new("RGB", (32, 32), (200, 30, 30)), prompt=q.prompt, options=q.options)
    out: dict[str, Any] = {}
    with Server(create_app(Scorer())) as base:
        ours = OpenAIChatModel("scorer", base + "/v1", cache=None, concurrency=4)
        messages = ours.build_messages(q, [])
        ours.sample(q, 1)  # connect, warm up
        seq = []
        for _ in range(n):
            t0 = time.perf_counter()
            ours.sample(q, 1)
            seq.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ours.sample_many([q] * n, 1)
        out["httpx_client"] = _stats(seq) | {"concurrent4_req_per_s": n / (time.perf_counter() - t0)}
        ours.close()

        async def sdk() -> dict[str, Any]:
            client = AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
            params = {"model": "scorer", "messages": messages, "max_tokens": 128, "temperature": 0.7}
            await client.chat.completions.create(**params)
            seq = []
            for _ in range(n):
                t0 = time.perf_counter()
                r = await client.chat.completions.create(**params)
                _ = r.choices[0].message.content
                seq.append(time.perf_counter() - t0)
            sem = asyncio.Semaphore(4)

            async def one() -> None:
                async with sem:
                    await client.chat.completions.create(**params)

            t0 = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(n)))
            rate = n / (time.perf_counter() - t0)
            await client.close()
            return _stats(seq) | {"concurrent4_req_per_s": rate}

        out["openai_sdk"] = asyncio.run(sdk())
    out["sdk_over_httpx_p50"] = out["openai_sdk"]["p50_ms"] / out["httpx_client"]["p50_ms"]
    return out


def behaviour() -> dict[str, Any]:
    """What the SDK reports for the replies ``openai:`` adapts to (ours: see tests/models/test_openai_api.py)."""
    import openai

    cases = {
        "old_vllm_error": lambda b: (400, {"object": "error", "message": "top_logprobs must be at most 0",
                                           "type": "BadRequestError", "param": None, "code": 400}, None),
        "llama_cpp_n": lambda b: (500, {"error": {"code": 500, "message": "Only one completion choice is allowed",
                                                  "type": "server_error"}}, None),
        "redirect_301": lambda b: (301, {}, {"location": "/v2/chat/completions"}),
        "quota_429": lambda b: (429, {"error": {"message": "You exceeded your current quota", "type": "insufficient_quota",
                                                "param": None, "code": "insufficient_quota"}}, None),
    }  # fmt: skip
    out: dict[str, Any] = {}
    for name, reply in cases.items():
        app = _scripted_app(reply)
        with Server(app) as base:
            client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=2, timeout=10)
            t0 = time.perf_counter()
            try:
                client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], n=2)
                result = "no error"
            except openai.APIError as e:
                result = f"{type(e).__name__}: {getattr(e, 'message', e)}"[:160]
            out[name] = {
                "sdk": result,
                "requests": app.state.hits,
                "seconds": round(time.perf_counter() - t0, 2),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    args = parser.parse_args()
    result = {
        "import_s": {
            "httpx+tenacity": _import_seconds("httpx, tenacity"),
            "openai": _import_seconds("openai"),
        },
        "timing": timing(args.n),
        "behaviour": behaviour(),
        "n": args.n,
    }
    print(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
