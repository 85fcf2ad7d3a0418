"""``icd serve`` settings: one dataclass, validated once, and the command-line options that fill it.

Imports nothing heavy, so ``icd --help`` stays fast.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from dataclasses import dataclass, fields
from types import SimpleNamespace
from typing import Any

from icdistill.errors import ICDError
from icdistill.loop_args import add_loop_args

HUMAN = "human"
# the options `icd serve` shares with `icd run` (by name; RunConfig has others, e.g. its own `pool`)
LOOP_FIELDS = (
    "student", "teacher", "embedder", "shots", "selector", "k_tt", "k_it", "demo_order", "judge", "pool_max", "gate",
    "budget", "delta", "warmup", "gate_score", "max_calls", "max_cost_usd", "uncertainty", "samples", "agreement", "answer",
    "seed",
)  # fmt: skip
MiB = 1024 * 1024


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


MIN_KEY_CHARS = 8
MIN_PUBLIC_KEY_CHARS = 16  # on an address beyond loopback, where anyone on the network may guess


def check_api_key(key: str, host: str) -> None:
    if any(c.isspace() or not c.isprintable() for c in key):
        raise ICDError("the API key must not contain spaces or control characters")
    least = MIN_KEY_CHARS if is_loopback(host) else MIN_PUBLIC_KEY_CHARS
    if len(key) < least or len(set(key)) < 4:
        raise ICDError(
            f"the API key must have at least {least} characters, 4 of them different, on {host}: "
            "e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(24))'"
        )


@dataclass(frozen=True)
class ServeConfig:
    """The service's models, loop options (the same as ``icd run``) and safety limits."""

    pool: str = "icd-pool.sqlite"
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    no_auth: bool = False
    student: str = "local:smollm2"
    teacher: str = HUMAN
    embedder: str = "local:conse"
    shots: int = 2
    selector: str = "image"
    k_tt: int = 64
    k_it: int = 16
    demo_order: str = "best-last"
    judge: str = "on"
    pool_max: int | None = None
    gate: str = "budget"
    budget: float = 0.05
    delta: float = 0.5
    warmup: int = 3
    # the service restores its gate from stored rows that keep no coverage signals: rank by uncertainty
    gate_score: str = "uncertainty"
    max_calls: int | None = None
    max_cost_usd: float | None = None
    uncertainty: str = "entropy"
    samples: int = 1
    agreement: float = 0.0
    answer: str = "student"
    seed: int = 0
    teacher_concurrency: int = 4
    max_body_bytes: int = 10 * MiB
    max_import_bytes: int = 512 * MiB
    max_pixels: int = 24_000_000
    max_prompt_tokens: int = 1024
    # an import holds its decoded images at once (all-or-nothing): ~3 bytes a pixel
    max_import_pixels: int = 100_000_000
    wait_timeout_s: float = 120.0
    label_lease_s: float = 300.0
    # with a PostgreSQL pool: how long a silent server keeps its teacher work and label claims before
    # another server adopts them (a live server renews them every second)
    claim_lease_s: float = 30.0
    # the proxies whose X-Forwarded-For names the client (uvicorn's syntax: "10.0.0.1,10.0.0.2" or "*");
    # None: the client is the socket's peer, whatever a header says
    forwarded_allow_ips: str | None = None
    # a request's headers must arrive within this long of the connection opening (slowloris)
    header_timeout_s: float = 10.0
    # connections open at once (kept below the open-files limit); one more gets 503 and is closed
    max_connections: int = 1000
    # connections open at once from one client address (not applied behind --forwarded-allow-ips)
    max_connections_per_client: int = 128
    # model requests (predictions, demos, imports) admitted at once; one more gets 503 + Retry-After
    max_queued: int = 32
    # lines of an import's demos.jsonl (each checked as it is read)
    max_import_lines: int = 100_000

    def __post_init__(self) -> None:
        if self.gate_score != "uncertainty":
            # the service restores its gate from stored rows that keep no coverage signals, so a
            # coverage gate would come back from a restart ranking every query alike
            raise ICDError(
                f"icd serve ranks queries by uncertainty only (--gate-score {self.gate_score} is for icd run and "
                "icd eval): its gate is restored after a restart from rows without coverage signals"
            )
        if self.no_auth and not is_loopback(self.host):
            raise ICDError(f"--no-auth is only allowed on a loopback address, not {self.host!r}")
        if not self.no_auth and not self.api_key:
            raise ICDError(
                "an API key is required: pass --api-key or set ICD_API_KEY (or --no-auth on 127.0.0.1)"
            )
        if self.api_key is not None:
            check_api_key(self.api_key, self.host)
        if not 0 <= self.port <= 65535:
            raise ICDError(f"--port must be in 0..65535, got {self.port}")
        for name in (
            "teacher_concurrency",
            "max_body_bytes",
            "max_import_bytes",
            "max_pixels",
            "max_import_pixels",
            "max_prompt_tokens",
            "max_connections",
            "max_connections_per_client",
            "max_queued",
            "max_import_lines",
        ):
            if getattr(self, name) < 1:
                raise ICDError(f"{name.replace('_', '-')} must be >= 1")
        if self.wait_timeout_s <= 0 or self.label_lease_s <= 0 or self.claim_lease_s <= 0:
            raise ICDError("wait and lease timeouts must be > 0")
        if self.header_timeout_s <= 0:
            raise ICDError("--header-timeout must be > 0")
        if self.forwarded_allow_ips is not None and not self.forwarded_allow_ips.strip():
            raise ICDError("--forwarded-allow-ips needs the proxies' addresses (or '*')")
        self.run_config()  # validates the loop options exactly as `icd run` does

    @property
    def human_teacher(self) -> bool:
        return self.teacher == HUMAN

    def run_config(self) -> Any:
        from icdistill.runner import RunConfig

        names = {f.name for f in fields(RunConfig)}
        loop = {name: getattr(self, name) for name in LOOP_FIELDS if name in names}
        if self.human_teacher:
            loop["teacher"] = "reference"  # RunConfig knows registry specs only; the person is ours
        return RunConfig(**loop)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    d = ServeConfig.__dataclass_fields__
    g = p.add_argument_group("service")
    g.add_argument(
        "--pool",
        default=d["pool"].default,
        help="SQLite file (one server) or postgresql://... (a database shared by many servers and "
        "icd run workers): pool, labelling queue, budget ledger",
    )
    g.add_argument("--host", default=d["host"].default, help="address to listen on")
    g.add_argument("--port", type=int, default=d["port"].default, help="TCP port")
    g.add_argument(
        "--api-key", default=None, help="clients send 'Authorization: Bearer KEY' (env ICD_API_KEY)"
    )
    g.add_argument("--no-auth", action="store_true", help="no API key (only on a loopback address)")
    g.add_argument(
        "--teacher-concurrency",
        type=int,
        default=d["teacher_concurrency"].default,
        help="teacher calls in flight at once",
    )
    g.add_argument(
        "--max-body-bytes",
        type=int,
        default=d["max_body_bytes"].default,
        help="largest request body accepted",
    )
    g.add_argument(
        "--max-pixels",
        type=int,
        default=d["max_pixels"].default,
        help="largest image accepted (width x height)",
    )
    g.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=d["max_prompt_tokens"].default,
        help="longest prompt accepted, in the student's tokens (a query's, or an added demo's)",
    )
    g.add_argument(
        "--max-import-pixels",
        type=int,
        default=d["max_import_pixels"].default,
        help="most pixels the images of one /v1/import may hold in all (decoded at once: ~3 bytes each)",
    )
    g.add_argument(
        "--wait-timeout",
        dest="wait_timeout_s",
        type=float,
        default=d["wait_timeout_s"].default,
        help="seconds a request with wait=true waits for the teacher before it is answered pending",
    )
    g.add_argument(
        "--claim-lease",
        dest="claim_lease_s",
        type=float,
        default=d["claim_lease_s"].default,
        help="PostgreSQL pool: seconds before another server adopts the teacher work of a silent one",
    )
    g.add_argument(
        "--forwarded-allow-ips",
        default=None,
        help="proxies trusted to name the client in X-Forwarded-For (comma-separated addresses, or '*'); "
        "by default the client is the socket's peer, so the wrong-key throttle cannot be dodged",
    )
    g.add_argument(
        "--header-timeout",
        dest="header_timeout_s",
        type=float,
        default=d["header_timeout_s"].default,
        help="seconds a client has to send a request's headers (slow clients are cut off)",
    )
    g.add_argument(
        "--max-connections",
        type=int,
        default=d["max_connections"].default,
        help="connections open at once (one more is answered 503 and closed)",
    )
    g.add_argument(
        "--max-connections-per-client",
        type=int,
        default=d["max_connections_per_client"].default,
        help="connections open at once from one address (not applied behind --forwarded-allow-ips)",
    )
    g.add_argument(
        "--max-queued",
        type=int,
        default=d["max_queued"].default,
        help="predictions, demos and imports admitted at once; one more is answered 503 with Retry-After",
    )
    g.add_argument(
        "--max-import-lines",
        type=int,
        default=d["max_import_lines"].default,
        help="most lines an import's demos.jsonl may have",
    )
    g = p.add_argument_group("models")
    g.add_argument("--student", default=d["student"].default, help="student spec")
    g.add_argument(
        "--teacher", default=d["teacher"].default, help="'human' (the /label page) or a teacher spec"
    )
    g.add_argument("--embedder", default=d["embedder"].default, help="retrieval embedder spec")
    g = p.add_argument_group("loop (as in icd run)")
    defaults = SimpleNamespace(**{name: f.default for name, f in d.items()})
    add_loop_args(g, g, g, defaults, gate_scores=("uncertainty",))  # see ServeConfig.__post_init__
    g.add_argument("--seed", type=int, default=d["seed"].default, help="seed of the gate and the selectors")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    values = {f.name: getattr(args, f.name) for f in fields(ServeConfig) if hasattr(args, f.name)}
    if not values.get("api_key"):
        values["api_key"] = os.environ.get("ICD_API_KEY") or None
    if values.get("no_auth"):
        values["api_key"] = None
    return ServeConfig(**values)

