"""Load test of `icd serve` with the offline default student on 127.0.0.1: throughput and latency with
and without teacher traffic, and /healthz latency under load (the event loop must never run a model).

Usage: ``nice -n 19 .venv/bin/python benchmarks/bench_service.py [--n 40] [--clients 4]``.
Scenarios (same Fashion-MNIST images, same order, a fresh pool each):
  ``no teacher``      --gate never: every request is one student pass;
  ``teacher 20%``     --teacher reference --gate budget --budget 0.2: uncertain queries go to the teacher in
                      the background and their annotations join the pool while requests keep coming.
Same-run baselines: the student's own time per query in this process (no HTTP, no service), and
/healthz latency with the service idle. Writes ``benchmarks/results/service.json`` and ``service.md``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from icdistill.data.stream import load_dataset, stream_order  # noqa: E402

RESULTS = Path(__file__).parent / "results"
KEY = "bench-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
NO_TEACHER = ["--gate", "never"]
TEACHER = ["--teacher", "reference", "--gate", "budget", "--budget", "0.2", "--warmup", "3"]
# (name, server options, concurrent clients or None for --clients, share of --n requests)
SCENARIOS = [
    ("no teacher, 1 client", NO_TEACHER, 1, 0.5),
    ("no teacher", NO_TEACHER, None, 1.0),
    ("teacher 20%", TEACHER, None, 1.0),
]


def pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(xs), q)) if xs else None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads (Linux /proc): unlike wall time, it does not
    depend on how many other processes share the cores."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requests_for(n: int) -> list[dict[str, Any]]:
    ds = load_dataset("fashion-mnist", split="test")
    out = []
    for i in stream_order(len(ds), n, seed=0, shuffle=True):
        q = ds.item(i)
        buf = io.BytesIO()
        q.image.save(buf, format="PNG")
        out.append(
            {
                "image_b64": base64.b64encode(buf.getvalue()).decode(),
                "prompt": q.prompt,
                "options": list(q.options),
                "label": q.label,
            }
        )
    return out


class HealthProbe(threading.Thread):
    """GET /healthz every ``interval`` seconds; records each latency."""

    def __init__(self, url: str, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.url, self.interval = url, interval
        self.latencies: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=30) as c:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                c.get(self.url + "/healthz").raise_for_status()
                self.latencies.append(time.perf_counter() - t0)
                time.sleep(self.interval)


def run_scenario(name: str, extra: list[str], reqs: list[dict[str, Any]], clients: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "icdistill",
            "serve",
            "--port",
            str(port),
            "--pool",
            f"{tmp}/pool.sqlite",
        ]
        cmd += ["--api-key", KEY, *extra]
        log = open(Path(tmp) / "server.log", "wb")  # noqa: SIM115
        t_start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        url = f"http://127.0.0.1:{port}"
        try:
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"icd serve exited: {(Path(tmp) / 'server.log').read_text()[-2000:]}")
                try:
                    if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            startup = time.perf_counter() - t_start
            idle = HealthProbe(url)
            idle_cpu0 = cpu_seconds(proc.pid)
            idle.start()
            time.sleep(3.0)
            idle.stop.set()
            idle.join()
            # what one /healthz costs the server, to take the probes' share out of the per-request CPU
            probe_cpu = (cpu_seconds(proc.pid) - idle_cpu0) / max(1, len(idle.latencies))

            # warm-up request (first-call allocations), not timed
            httpx.post(url + "/v1/predict", json=reqs[0], headers=AUTH, timeout=120).raise_for_status()
            lat: list[float] = []
            answers: list[dict[str, Any]] = []
            lock = threading.Lock()
            todo = iter(range(1, len(reqs)))

            def client() -> None:
                with httpx.Client(headers=AUTH, timeout=300) as c:
                    while True:
                        with lock:
                            i = next(todo, None)
                        if i is None:
                            return
                        t0 = time.perf_counter()
                        r = c.post(url + "/v1/predict", json=reqs[i])
                        dt = time.perf_counter() - t0
                        r.raise_for_status()
                        with lock:
                            lat.append(dt)
                            answers.append({**r.json(), "label": reqs[i]["label"]})

            probe = HealthProbe(url)
            probe.start()
            cpu0 = cpu_seconds(proc.pid)
            t0 = time.perf_counter()
            threads = [threading.Thread(target=client) for _ in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            probe.stop.set()
            probe.join()
            # background annotations finish after the last answer: count their CPU too
            while httpx.get(url + "/v1/stats", headers=AUTH).json()["pending"]:
                time.sleep(0.2)
            cpu = cpu_seconds(proc.pid) - cpu0
            stats = httpx.get(url + "/v1/stats", headers=AUTH).json()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    answers.sort(key=lambda a: a["position"])
    half = len(answers) // 2
    acc = [float(a["student_answer"] == a["label"]) for a in answers]
    return {
        "scenario": name,
        "requests": len(lat),
        "clients": clients,
        "startup_seconds": startup,
        "throughput_rps": len(lat) / wall,
        "server_cpu_seconds_per_request_with_probes": cpu / len(lat),
        "server_cpu_seconds_per_request": (cpu - probe_cpu * len(probe.latencies)) / len(lat),
        "server_cpu_seconds_per_healthz": probe_cpu,
        "latency_p50": pct(lat, 50),
        "latency_p99": pct(lat, 99),
        "healthz_idle_p50": pct(idle.latencies, 50),
        "healthz_idle_p99": pct(idle.latencies, 99),
        "healthz_load_p50": pct(probe.latencies, 50),
        "healthz_load_p99": pct(probe.latencies, 99),
        "healthz_load_max": max(probe.latencies) if probe.latencies else None,
        "healthz_probes": len(probe.latencies),
        "teacher_calls": stats["teacher_calls"],
        "teacher_call_rate": stats["teacher_call_rate"],
        "pool_size": stats["pool_size"],
        "student_accuracy_first_half": float(np.mean(acc[:half])) if half else None,
        "student_accuracy_second_half": float(np.mean(acc[half:])) if acc[half:] else None,
    }


def in_process_student_seconds(reqs: list[dict[str, Any]], n: int) -> tuple[float, float]:
    """The student's pass alone (zero-shot, no HTTP): the floor a request cannot go below."""
    from icdistill.models.registry import ModelContext, resolve_student
    from icdistill.service.images import decode_b64_image
    from icdistill.types import Query

    student = resolve_student("local:smollm2", ModelContext())
    qs = [
        Query(
            id=str(i),
            image=decode_b64_image(r["image_b64"], 10**7),
            prompt=r["prompt"],
            options=tuple(r["options"]),
        )
        for i, r in enumerate(reqs[: n + 1])
    ]
    student.predict(qs[0], [])  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for q in qs[1:]:
        student.predict(q, [])
    return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def fmt(x: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="requests per scenario")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients")
    args = ap.parse_args()
    reqs = requests_for(args.n + 1)
    results = [
        run_scenario(name, extra, reqs[: 1 + max(2, int(share * args.n))], clients or args.clients)
        for name, extra, clients, share in SCENARIOS
    ]
    load_during = os.getloadavg()[1]  # 5-minute load average: other processes share the 2 cores
    base, base_cpu = in_process_student_seconds(reqs, 10)
    out = {
        "n": args.n,
        "clients": args.clients,
        "in_process_student_seconds": base,
        "in_process_student_cpu_seconds": base_cpu,
        "load_average_5min": load_during,
        "cpus": os.cpu_count(),
        "scenarios": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "service.json").write_text(json.dumps(out, indent=2) + "\n")
    rows = [
        "| scenario | clients | requests | req/s | p50 s | p99 s | server CPU s / request | vs student alone | /healthz idle p50 ms | /healthz under load p50 / p99 / max ms | teacher calls | pool |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['scenario']} | {r['clients']} | {r['requests']} | {r['throughput_rps']:.2f} | "
            f"{fmt(r['latency_p50'])} | {fmt(r['latency_p99'])} | {r['server_cpu_seconds_per_request']:.2f} | "
            f"{r['server_cpu_seconds_per_request'] / base_cpu:.2f}x | "
            f"{fmt(r['healthz_idle_p50'], 1000, 1)} | "
            f"{fmt(r['healthz_load_p50'], 1000, 1)} / {fmt(r['healthz_load_p99'], 1000, 1)} / "
            f"{fmt(r['healthz_load_max'], 1000, 1)} | {r['teacher_calls']} ({r['teacher_call_rate']:.0%}) | "
            f"{r['pool_size']} |"
        )
    table = "\n".join(rows)
    note = (
        "\n\n127.0.0.1, offline default student "
        f"(local:smollm2) and embedder (local:conse). Student pass alone, in process: {base:.3f} s/query wall, "
        f"{base_cpu:.2f} CPU s/query. "
        f"Load average (5 min) during the run: {load_during:.1f} on {os.cpu_count()} cores.\n"
    )
    (RESULTS / "service.md").write_text(table + note)
    print(table + note)


if __name__ == "__main__":
    main()
