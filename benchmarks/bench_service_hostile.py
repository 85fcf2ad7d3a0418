"""A hostile client against `icd serve` (issue 17, items 1-3): it cannot raise another client's p99 above
3x its idle value, nor the server's memory above a documented bound.

Usage: ``nice -n 19 .venv/bin/python benchmarks/bench_service_hostile.py [--n 20]``.
One `icd serve` (offline default student local:smollm2, embedder local:conse, --gate never) on
127.0.0.1. A victim client sends ``--n`` Fashion-MNIST queries one after another, first alone (idle),
then while one hostile client, from other addresses (127.0.0.2, and 127.0.0.3 for its wrong keys:
the throttle would otherwise refuse the rest with 429), sends back to back, in turn:

* item 1: a 118-byte 1 x 20,000 PNG, and a 1 x 20,000,000 PNG (multipart);
* item 2: a 72 KB zip whose 40 lines all name one 23 MP image (``/v1/import``);
* item 3: a 4000-character prompt of combining marks; ``GET /v1/queries/{id}`` of the victim's queries;
* item 4: a wrong API key.

Measured: the victim's latency p50/p99 idle and under attack, the hostile requests' status codes and
latency, the server's RSS (sampled every 50 ms) and its peak (VmHWM). Writes
``benchmarks/results/service_hostile.json`` and ``service_hostile.md``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import tempfile
import threading
import time
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from bench_service import AUTH, KEY, RESULTS, free_port, pct, requests_for
from PIL import Image

RSS_BOUND_MB = 512  # the documented bound: RSS under attack at most idle peak + this
P99_BOUND = 3.0


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def hostile_requests(victim_image_b64: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, httpx request kwargs) for each hostile request, sent in turn."""
    big = png(4800, 4800)  # 23 MP
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        line = {"prompt": "p", "label": "Bag", "options": ["Bag", "Shirt"], "image": "images/big.png"}
        z.writestr("demos.jsonl", "\n".join(json.dumps({**line, "query_id": f"h{i}"}) for i in range(40)))
        z.writestr("images/big.png", big)
    marks = "a" + "\u0301" * 3999
    return [
        ("1x20000 png", {"method": "POST", "url": "/v1/predict", "json": {"image_b64": base64.b64encode(png(1, 20_000)).decode(), "prompt": "p"}}),
        ("1x20M png", {"method": "POST", "url": "/v1/predict", "files": {"image": ("t.png", png(1, 20_000_000), "image/png")}, "data": {"prompt": "p"}}),
        ("40x23MP zip", {"method": "POST", "url": "/v1/import", "content": buf.getvalue(), "headers": {"content-type": "application/zip"}}),
        ("combining prompt", {"method": "POST", "url": "/v1/predict", "json": {"image_b64": victim_image_b64, "prompt": marks}}),
        ("poll query", {"method": "GET", "url": "/v1/queries/{victim}"}),
        ("wrong key", {"method": "GET", "url": "/v1/stats", "headers": {"Authorization": "Bearer wrong-key-0000000"}}),
    ]  # fmt: skip


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


class RssProbe(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.05)


def victim(url: str, reqs: list[dict[str, Any]], ids: list[str]) -> list[float]:
    lat = []
    with httpx.Client(base_url=url, headers=AUTH, timeout=600) as c:
        for body in reqs:
            t0 = time.perf_counter()
            r = c.post("/v1/predict", json=body)
            lat.append(time.perf_counter() - t0)
            r.raise_for_status()
            ids.append(r.json()["query_id"])
    return lat


class Hostile(threading.Thread):
    """One client, back to back, from 127.0.0.2 (its wrong keys from 127.0.0.3); until ``stop``."""

    def __init__(self, url: str, requests: list[tuple[str, dict[str, Any]]], ids: list[str]) -> None:
        super().__init__(daemon=True)
        self.url, self.requests, self.ids = url, requests, ids
        self.stop = threading.Event()
        self.codes: dict[str, Counter[int]] = {name: Counter() for name, _ in requests}
        self.seconds: dict[str, list[float]] = {name: [] for name, _ in requests}

    def run(self) -> None:
        # wrong keys from an address of their own: after 10 that address is throttled (429), which
        # would otherwise spare the server the other requests
        main, guesser = (
            httpx.Client(
                base_url=self.url, headers=AUTH, timeout=600, transport=httpx.HTTPTransport(local_address=a)
            )
            for a in ("127.0.0.2", "127.0.0.3")
        )
        with main, guesser:
            while not self.stop.is_set():
                for name, kw in self.requests:
                    if self.stop.is_set():
                        return
                    kw = dict(kw)
                    kw["url"] = kw["url"].replace("{victim}", self.ids[-1] if self.ids else "none")
                    t0 = time.perf_counter()
                    r = (guesser if name == "wrong key" else main).request(**kw)
                    self.seconds[name].append(time.perf_counter() - t0)
                    self.codes[name][r.status_code] += 1


def _start(tmp: str) -> tuple[Any, str]:
    import subprocess
    import sys

    port = free_port()
    cmd = [sys.executable, "-m", "icdistill", "serve", "--port", str(port), "--pool", f"{tmp}/pool.sqlite"]
    cmd += ["--api-key", KEY, "--gate", "never"]
    log = open(Path(tmp) / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"icd serve exited: {(Path(tmp) / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="victim queries per phase")
    args = ap.parse_args()
    reqs = [{k: v for k, v in r.items() if k != "label"} for r in requests_for(2 * args.n + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = _start(tmp)
        try:
            httpx.post(url + "/v1/predict", json=reqs[0], headers=AUTH, timeout=600).raise_for_status()
            ids: list[str] = []
            probe = RssProbe(proc.pid)
            probe.start()
            idle = victim(url, reqs[1 : 1 + args.n], ids)
            idle_peak, idle_hwm = probe.peak, rss_mb(proc.pid, "VmHWM")
            hostile = Hostile(url, hostile_requests(reqs[0]["image_b64"]), ids)
            hostile.start()
            attacked = victim(url, reqs[1 + args.n :], ids)
            hostile.stop.set()
            hostile.join()
            probe.stop.set()
            probe.join()
            attack_peak, attack_hwm = probe.peak, rss_mb(proc.pid, "VmHWM")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    ratio = pct(attacked, 99) / pct(idle, 99)
    out = {
        "n": args.n,
        "victim_idle": {"p50": pct(idle, 50), "p99": pct(idle, 99)},
        "victim_attacked": {"p50": pct(attacked, 50), "p99": pct(attacked, 99)},
        "p99_ratio": ratio,
        "p99_bound": P99_BOUND,
        "rss_mb": {"idle_peak": idle_peak, "idle_hwm": idle_hwm, "attack_peak": attack_peak, "attack_hwm": attack_hwm},
        "rss_bound_mb": idle_hwm + RSS_BOUND_MB,
        "hostile": {
            name: {"codes": dict(hostile.codes[name]), "p50": pct(hostile.seconds[name], 50), "max": max(hostile.seconds[name], default=None)}
            for name in hostile.codes
        },
        "load_average_5min": os.getloadavg()[1],
        "cpus": os.cpu_count(),
    }  # fmt: skip
    out["passed"] = ratio <= P99_BOUND and attack_hwm <= idle_hwm + RSS_BOUND_MB
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "service_hostile.json").write_text(json.dumps(out, indent=2) + "\n")
    rows = [
        "| victim | p50 s | p99 s |",
        "|---|---|---|",
        f"| alone | {out['victim_idle']['p50']:.3f} | {out['victim_idle']['p99']:.3f} |",
        f"| with the hostile client | {out['victim_attacked']['p50']:.3f} | {out['victim_attacked']['p99']:.3f} |",
        "",
        "| hostile request | sent | status codes | p50 s | max s |",
        "|---|---|---|---|---|",
    ]
    for name, h in out["hostile"].items():
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(h["codes"].items()))
        sent = sum(h["codes"].values())
        rows.append(f"| {name} | {sent} | {codes} | {h['p50'] or 0:.3f} | {h['max'] or 0:.3f} |")
    r = out["rss_mb"]
    note = (
        f"\n\nVictim p99 under attack / alone: {ratio:.2f}x (bound {P99_BOUND:g}x). Server RSS: peak "
        f"{r['idle_hwm']:.0f} MB alone, {r['attack_hwm']:.0f} MB with the attack (bound: alone + "
        f"{RSS_BOUND_MB} MB = {out['rss_bound_mb']:.0f} MB). {'PASSED' if out['passed'] else 'FAILED'}. "
        f"127.0.0.1, local:smollm2 + local:conse, --gate never; load average (5 min) "
        f"{out['load_average_5min']:.1f} on {os.cpu_count()} cores.\n"
    )
    (RESULTS / "service_hostile.md").write_text("\n".join(rows) + note)
    print("\n".join(rows) + note)


if __name__ == "__main__":
    main()
