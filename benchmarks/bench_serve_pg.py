"""`icd serve` on one shared PostgreSQL database: 1 and 2 server processes against the SQLite baseline.

Usage: ``nice -n 19 .venv/bin/python benchmarks/bench_serve_pg.py [--n 24] [--clients 4]``.

Offline default models (student ``local:smollm2``, embedder ``local:conse``), ``reference`` teacher,
``--gate budget --budget 0.2 --warmup 3``; the same Fashion-MNIST requests (as ``bench_service.py``)
in every scenario, spread round-robin over the servers by ``--clients`` concurrent clients, after one
untimed warm-up request per server. Scenarios: ``sqlite, 1 server`` (the same-run baseline: the
service's own SQLite file), ``postgresql, 1 server`` and ``postgresql, 2 servers`` (one throwaway
PostgreSQL cluster from Debian's packages, a fresh database each). Reports requests per second,
latency, the servers' CPU seconds per request (all processes, /proc), teacher calls and pooled
demos. On a 2-core machine the 2-server row shows the overhead of sharing, not a speed-up: each
server's student pass already uses both cores. Writes ``benchmarks/results/serve_pg.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import httpx  # noqa: E402
from bench_service import AUTH, KEY, RESULTS, cpu_seconds, free_port, pct, requests_for  # noqa: E402

from pg_cluster import fresh_database, throwaway_cluster  # noqa: E402

SERVER = ["--teacher", "reference", "--gate", "budget", "--budget", "0.2", "--warmup", "3"]


def start(pool: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "icdistill", "serve", "--port", str(port), "--pool", pool, "--api-key", KEY]
    out = open(log, "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([*cmd, *SERVER], stdout=out, stderr=out)
    return proc, f"http://127.0.0.1:{port}"


def wait_up(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"icd serve exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)


def scenario(name: str, pools: list[str], reqs: list[dict[str, Any]], clients: int, tmp: Path) -> dict[str, Any]:
    log = tmp / f"{name.replace(' ', '_').replace(',', '')}.log"
    t_start = time.perf_counter()
    servers = [start(p, log) for p in pools]  # boot side by side
    try:
        for proc, url in servers:
            wait_up(proc, url, log)
        startup = time.perf_counter() - t_start
        for k, (_, url) in enumerate(servers):  # warm-up (first-call allocations), not timed
            httpx.post(url + "/v1/predict", json=reqs[k], headers=AUTH, timeout=300).raise_for_status()
        todo = iter(range(len(servers), len(reqs)))
        lock = threading.Lock()
        lat: list[float] = []

        def client() -> None:
            with httpx.Client(headers=AUTH, timeout=600) as c:
                while True:
                    with lock:
                        i = next(todo, None)
                    if i is None:
                        return
                    url = servers[i % len(servers)][1]
                    t0 = time.perf_counter()
                    c.post(url + "/v1/predict", json=reqs[i]).raise_for_status()
                    with lock:
                        lat.append(time.perf_counter() - t0)

        cpu0 = sum(cpu_seconds(p.pid) for p, _ in servers)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        # background annotations finish after the last answer: count their CPU too
        while any(httpx.get(u + "/v1/stats", headers=AUTH).json()["pending"] for _, u in servers):
            time.sleep(0.2)
        time.sleep(1.5)  # one sweep: the shared stats mirrors catch up
        cpu = sum(cpu_seconds(p.pid) for p, _ in servers) - cpu0
        stats = [httpx.get(u + "/v1/stats", headers=AUTH).json() for _, u in servers]
    finally:
        for proc, _ in servers:
            proc.terminate()
        for proc, _ in servers:
            proc.wait(timeout=30)
    ledger = stats[0]["budget"].get("pool_ledger")
    return {
        "scenario": name,
        "servers": len(servers),
        "clients": clients,
        "requests": len(lat),
        "startup_seconds": startup,
        "wall_seconds": wall,
        "throughput_rps": len(lat) / wall,
        "latency_p50": pct(lat, 50),
        "latency_p99": pct(lat, 99),
        "server_cpu_seconds_per_request": cpu / len(lat),
        "queries_seen_by_each_server": [s["queries"] for s in stats],
        "teacher_calls_decided": stats[0]["teacher_calls"],
        "teacher_calls_bought": ledger["calls"] if ledger else stats[0]["budget"]["teacher_requests"],
        "pool_size": [s["pool_size"] for s in stats],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=24, help="timed requests per scenario")
    ap.add_argument("--clients", type=int, default=4)
    args = ap.parse_args()
    reqs = requests_for(args.n + 2)
    results = []
    with tempfile.TemporaryDirectory() as tmp, throwaway_cluster() as cluster:
        t = Path(tmp)
        results.append(scenario("sqlite, 1 server", [str(t / "pool.sqlite")], reqs[1:], args.clients, t))
        results.append(scenario("postgresql, 1 server", [fresh_database(cluster, "one")], reqs[1:], args.clients, t))
        url = fresh_database(cluster, "two")
        results.append(scenario("postgresql, 2 servers", [url, url], reqs, args.clients, t))
    load = os.getloadavg()[1]
    out = {"n": args.n, "clients": args.clients, "load_average_5min": load, "cpus": os.cpu_count(), "scenarios": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve_pg.json").write_text(json.dumps(out, indent=2) + "\n")
    base = results[0]
    rows = [
        "| scenario | req/s | vs sqlite | p50 s | p99 s | server CPU s / request | teacher calls decided / bought | pool |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['scenario']} | {r['throughput_rps']:.2f} | {r['throughput_rps'] / base['throughput_rps']:.2f}x | "
            f"{r['latency_p50']:.2f} | {r['latency_p99']:.2f} | {r['server_cpu_seconds_per_request']:.2f} | "
            f"{r['teacher_calls_decided']} / {r['teacher_calls_bought']} | {r['pool_size']} |"
        )
    print("\n".join(rows) + f"\n\nload average (5 min): {load:.1f} on {os.cpu_count()} cores")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
