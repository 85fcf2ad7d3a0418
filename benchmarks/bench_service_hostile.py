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

Issue 27 adds three attacks, each on a fresh server (``--runs slowloris,tiny-lines,big-images``), while
another client (127.0.0.1) sends ``GET /healthz`` every 50 ms; measured: that client's /healthz p50/p99
idle and under attack, the server's RSS before, its peak during, and ``--after`` (60) seconds after the
attack ends, and that every acknowledged request is there:

* slowloris: 1,100 connections from 127.0.0.2, each sending a header line every 10 s, reopened when
  the server hangs up, for ``--attack-s`` seconds;
* tiny lines: ``/v1/import`` of a 16 KB zip whose demos.jsonl is 16 MiB of ``{}`` lines, back to back;
* big images: 40 clients at once, each posting a 5.9 MB noise PNG (multipart) to ``/v1/predict``.

Writes ``benchmarks/results/service_hostile_27.json`` and ``service_hostile_27.md``.
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


def _start(tmp: str, extra: list[str] | None = None) -> tuple[Any, str]:
    import subprocess
    import sys

    port = free_port()
    cmd = [sys.executable, "-m", "icdistill", "serve", "--port", str(port), "--pool", f"{tmp}/pool.sqlite"]
    cmd += ["--api-key", KEY, "--gate", "never", *(extra or [])]
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


def mixed(args: argparse.Namespace) -> None:
    """Issue 17's run: a victim's predictions against the mixed hostile client."""
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


# ---------------------------------------------------------------------- issue 27: three attacks


class Prober(threading.Thread):
    """Another client: ``GET /healthz`` every 50 ms from 127.0.0.1 on one kept-alive connection
    (reconnecting when needed); latencies by phase."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.phase = "idle"
        self.seconds: dict[str, list[float]] = {}
        self.codes: dict[str, Counter[str]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            while not self.stop.is_set():
                phase = self.phase
                t0 = time.perf_counter()
                try:
                    code = str(c.get("/healthz").status_code)
                except httpx.HTTPError as e:
                    code = type(e).__name__
                self.seconds.setdefault(phase, []).append(time.perf_counter() - t0)
                self.codes.setdefault(phase, Counter())[code] += 1
                self.stop.wait(0.05)


def slowloris(url: str, stop: threading.Event, n: int = 1100, every_s: float = 10.0) -> dict[str, Any]:
    import socket

    port = int(url.rsplit(":", 1)[1])
    socks: list[Any] = []
    opened = cut = busy = 0

    def connect() -> Any:
        nonlocal opened
        s = socket.socket()
        s.setblocking(True)
        s.settimeout(5)
        s.bind(("127.0.0.2", 0))
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        s.setblocking(False)
        opened += 1
        return s

    for _ in range(n):
        socks.append(connect())
    i = 0
    while not stop.wait(every_s):
        i += 1
        for k, s in enumerate(socks):
            try:
                data = s.recv(4096)
                if data.startswith(b"HTTP/1.1 503"):
                    busy += 1
                if data == b"" or data:
                    raise ConnectionResetError
            except BlockingIOError:
                pass
            except OSError:
                s.close()
                cut += 1
                socks[k] = connect()
                continue
            try:
                s.sendall(f"X-Drip-{i}: 1\r\n".encode())
            except OSError:
                s.close()
                cut += 1
                socks[k] = connect()
    for s in socks:
        s.close()
    return {"connections": n, "opened": opened, "cut_by_server": cut, "answered_503": busy}


def tiny_lines(url: str, stop: threading.Event) -> dict[str, Any]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("demos.jsonl", b"{}\n" * (16 * 1024 * 1024 // 3))
    bomb = buf.getvalue()
    codes: Counter[int] = Counter()
    seconds = []
    local = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(base_url=url, headers=AUTH, timeout=600, transport=local) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            r = c.post("/v1/import", content=bomb, headers={"content-type": "application/zip"})
            seconds.append(time.perf_counter() - t0)
            codes[r.status_code] += 1
    return {"zip_bytes": len(bomb), "unpacked_bytes": 16 * 1024 * 1024 // 3 * 3, "codes": dict(codes),
            "p50_s": pct(seconds, 50), "max_s": max(seconds, default=None)}  # fmt: skip


def noise_png(seed: int, side: int = 1400) -> bytes:
    import numpy as np

    arr = np.random.default_rng(seed).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="PNG")
    return out.getvalue()


def big_images(url: str, stop: threading.Event, n: int = 40) -> dict[str, Any]:
    images = [noise_png(i) for i in range(n)]
    results: list[tuple[int, float, str | None, str | None]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        local = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(base_url=url, headers=AUTH, timeout=600, transport=local) as c:
            t0 = time.perf_counter()
            r = c.post("/v1/predict", files={"image": ("n.png", images[i], "image/png")}, data={"prompt": "What is it?", "options": '["Bag", "Shirt", "Sneaker"]'})
            dt = time.perf_counter() - t0
            qid = r.json().get("query_id") if r.status_code == 200 else None
            with lock:
                results.append((r.status_code, dt, qid, r.headers.get("retry-after")))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    ok = [q for code, _, q, _ in results if code == 200 and q]
    with httpx.Client(base_url=url, headers=AUTH, timeout=600) as c:
        lost = sum(c.get(f"/v1/queries/{q}").status_code != 200 for q in ok)
    return {
        "png_mb": sum(map(len, images)) / len(images) / 1e6,
        "codes": dict(Counter(code for code, *_ in results)),
        "retry_after": sorted({ra for *_, ra in results if ra}),
        "p50_s": pct([dt for _, dt, *_ in results], 50),
        "max_s": max(dt for _, dt, *_ in results),
        "acknowledged": len(ok),
        "acknowledged_lost": lost,
    }


ATTACKS = {"slowloris": slowloris, "tiny-lines": tiny_lines, "big-images": big_images}


def attack_run(name: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = _start(tmp)
        try:
            reqs = [{k: v for k, v in r.items() if k != "label"} for r in requests_for(1)]
            httpx.post(url + "/v1/predict", json=reqs[0], headers=AUTH, timeout=600).raise_for_status()
            prober = Prober(url)
            prober.start()
            time.sleep(args.idle_s)
            rss_before = rss_mb(proc.pid)
            probe = RssProbe(proc.pid)
            probe.start()
            prober.phase = "attack"
            stop = threading.Event()
            timer = threading.Timer(args.attack_s, stop.set)
            timer.start()
            t0 = time.perf_counter()
            detail = ATTACKS[name](url, stop)
            attack_s = time.perf_counter() - t0
            timer.cancel()
            prober.phase = "after"
            probe.stop.set()
            probe.join()
            time.sleep(args.after)
            rss_after = rss_mb(proc.pid)
            prober.stop.set()
            prober.join()
            alive = proc.poll() is None
            log_bytes = (Path(tmp) / "server.log").stat().st_size
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    idle, attacked = prober.seconds.get("idle", []), prober.seconds.get("attack", [])
    ratio = (pct(attacked, 99) or 0) / (pct(idle, 99) or 1)
    out = {
        "attack": name, "attack_s": attack_s, "detail": detail,
        "healthz_idle": {"n": len(idle), "p50_ms": 1e3 * pct(idle, 50), "p99_ms": 1e3 * pct(idle, 99)},
        "healthz_attack": {"n": len(attacked), "p50_ms": 1e3 * pct(attacked, 50), "p99_ms": 1e3 * pct(attacked, 99),
                           "codes": dict(prober.codes.get("attack", {}))},
        "p99_ratio": ratio,
        "rss_mb": {"before": rss_before, "peak_during": probe.peak, f"after_{args.after:g}s": rss_after},
        "server_alive": alive, "server_log_bytes": log_bytes,
    }  # fmt: skip
    lost = detail.get("acknowledged_lost", 0)
    out["passed"] = ratio <= P99_BOUND and rss_after - rss_before <= 200 and alive and lost == 0
    return out


def attacks(args: argparse.Namespace) -> None:
    results = [attack_run(name, args) for name in args.runs if name in ATTACKS]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "service_hostile_27.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = [
        "| attack | /healthz idle p50 / p99 ms | under attack p50 / p99 ms | p99 ratio | RSS before / peak / "
        f"{args.after:g} s after MB | attack's result | passed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rss = list(r["rss_mb"].values())
        d = r["detail"]
        what = ", ".join(f"{k}: {v}" for k, v in d.items() if k in ("codes", "cut_by_server", "answered_503", "acknowledged", "acknowledged_lost", "p50_s", "max_s"))  # fmt: skip
        rows.append(
            f"| {r['attack']} | {r['healthz_idle']['p50_ms']:.1f} / {r['healthz_idle']['p99_ms']:.1f} | "
            f"{r['healthz_attack']['p50_ms']:.1f} / {r['healthz_attack']['p99_ms']:.1f} | {r['p99_ratio']:.2f}x | "
            f"{rss[0]:.0f} / {rss[1]:.0f} / {rss[2]:.0f} | {what} | {'yes' if r['passed'] else 'NO'} |"
        )
    note = (
        f"\n\n127.0.0.1, local:smollm2 + local:conse, --gate never, default limits; load average (5 min) "
        f"{os.getloadavg()[1]:.1f} on {os.cpu_count()} cores.\n"
    )
    (RESULTS / "service_hostile_27.md").write_text("\n".join(rows) + note)
    print("\n".join(rows) + note)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="victim queries per phase (mixed)")
    ap.add_argument(
        "--runs",
        default="mixed,slowloris,tiny-lines,big-images",
        help="comma-separated: mixed (issue 17), slowloris, tiny-lines, big-images (issue 27)",
    )
    ap.add_argument("--idle-s", type=float, default=10.0, help="seconds of /healthz probes before an attack")
    ap.add_argument("--attack-s", type=float, default=40.0, help="seconds of slowloris or tiny-lines")
    ap.add_argument("--after", type=float, default=60.0, help="seconds after an attack when RSS is read")
    args = ap.parse_args()
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if "mixed" in args.runs:
        mixed(args)
    if any(r in ATTACKS for r in args.runs):
        attacks(args)


if __name__ == "__main__":
    main()
