"""Prometheus metrics of one service instance (its own registry: no process-global state)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.predict_seconds = Histogram(
            "icd_predict_seconds",
            "Latency of POST /v1/predict (to the student's answer, or the teacher's with wait=true)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120),
            registry=r,
        )
        self.teacher_outcomes = Counter(
            "icd_teacher_outcomes",
            "Annotations by outcome (annotated, rejected, failed)",
            ["outcome"],
            registry=r,
        )
        stats = engine.stats
        Gauge("icd_pool_size", "Demonstrations in the pool", registry=r).set_function(
            lambda: stats()["pool_size"]
        )
        Gauge("icd_queries", "Queries answered since the pool was created", registry=r).set_function(
            lambda: stats()["queries"]
        )
        Gauge(
            "icd_teacher_calls",
            "Teacher requests paid for (queries sent to the teacher, and requests a crash cut off that were "
            "sent again); what --max-calls caps",
            registry=r,
        ).set_function(lambda: stats()["teacher_calls"])
        Gauge(
            "icd_teacher_requests", "Teacher API requests recorded in the ledger (retries included)", registry=r
        ).set_function(lambda: stats()["budget"]["teacher_requests"])
        Gauge(
            "icd_pending_annotations", "Queries waiting for the teacher or a person", registry=r
        ).set_function(lambda: stats()["pending"])
        Gauge("icd_teacher_cost_usd", "Teacher spend recorded in the ledger", registry=r).set_function(
            lambda: stats()["budget"]["usd_spent"]
        )
        engine.on_event = self.observe

    def observe(self, event: str, seconds: float) -> None:
        if event == "predict":
            self.predict_seconds.observe(seconds)
        elif event.startswith("teacher_"):
            self.teacher_outcomes.labels(event.removeprefix("teacher_")).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
