"""Conformance checks every implementation of a protocol must pass, the project's and a user's alike.

Each ``check_*`` raises ``AssertionError`` with a reason on the first violation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from icdistill.protocols import Embedder, Gate, Pool, Selector, Student, Teacher
from icdistill.types import (
    Demo,
    GateContext,
    GateDecision,
    Prediction,
    Query,
    TeacherResponse,
)


def sample_queries() -> list[Query]:
    """Small labelled queries with real (synthetic) images of distinct colours."""
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    options = tuple(colours)
    out = []
    for i, (name, rgb) in enumerate(colours.items()):
        img = Image.new("RGB", (32, 32), rgb)
        out.append(
            Query(
                id=f"q{i}",
                image=img,
                prompt="Which colour is this image?",
                options=options,
                label=name,
                position=i,
            )
        )
    return out


def sample_demos(queries: Sequence[Query] | None = None) -> list[Demo]:
    qs = list(queries or sample_queries())
    return [
        Demo(id=i + 1, query_id=q.id, image=q.image, prompt=q.prompt, answer=q.label or "")
        for i, q in enumerate(qs)
    ]


def check_student(student: Student, queries: Sequence[Query] | None = None) -> None:
    qs = list(queries or sample_queries())
    assert isinstance(student, Student), "does not implement Student (needs .name and .predict)"
    assert isinstance(student.name, str) and student.name, "Student.name must be a non-empty string"
    demos = sample_demos(qs)
    for q in qs:
        for ds in ([], demos[:2]):
            p = student.predict(q, ds)
            assert isinstance(p, Prediction), f"predict returned {type(p).__name__}, not Prediction"
            assert isinstance(p.answer, str), "Prediction.answer must be str"
            if q.options:
                assert p.option_scores is not None, "classification queries need option_scores"
                assert set(p.option_scores) == set(q.options), "option_scores must cover exactly the options"
                assert all(math.isfinite(v) for v in p.option_scores.values()), "option scores must be finite"
                assert p.answer in q.options, "answer must be one of the options"
                best = max(p.option_scores, key=p.option_scores.__getitem__)
                assert p.option_scores[p.answer] == p.option_scores[best], (
                    "answer must be the best-scored option"
                )
            assert p.seconds >= 0


def check_teacher(teacher: Teacher, queries: Sequence[Query] | None = None, n: int = 3) -> None:
    qs = list(queries or sample_queries())
    assert isinstance(teacher, Teacher), "does not implement Teacher (needs .name and .sample)"
    for q in qs:
        r = teacher.sample(q, n)
        assert isinstance(r, TeacherResponse), f"sample returned {type(r).__name__}"
        assert len(r.answers) == n, f"asked for {n} samples, got {len(r.answers)}"
        assert all(isinstance(a, str) for a in r.answers)
        assert r.usage.calls >= 1, "usage.calls must count the request"


def check_embedder(embedder: Embedder, queries: Sequence[Query] | None = None) -> None:
    qs = list(queries or sample_queries())
    assert isinstance(embedder, Embedder)
    dims: dict[str, int] = {}
    for q in qs:
        e = embedder.embed_query(q)
        assert e, "embed_query returned no embeddings"
        for key, v in e.items():
            v = np.asarray(v)
            assert v.ndim == 1 and np.all(np.isfinite(v)), f"embedding {key!r} must be a finite vector"
            assert dims.setdefault(key, v.shape[0]) == v.shape[0], f"embedding {key!r} changes dimension"
        again = embedder.embed_query(q)
        for key in e:
            assert np.allclose(e[key], again[key], atol=1e-5), f"embedding {key!r} is not deterministic"
    t = np.asarray(embedder.embed_texts(["a red image", "a blue image"]))
    assert t.ndim == 2 and t.shape[0] == 2 and np.all(np.isfinite(t)), "embed_texts must return (n, d)"


def check_selector(selector: Selector, pool: Pool, queries: Sequence[Query], embed: Embedder) -> None:
    """``pool`` must hold at least 3 demos; selection must be a duplicate-free subset of the pool."""
    assert isinstance(selector, Selector)
    pool_ids = {d.id for d in pool.demos()}
    for q in queries:
        e = embed.embed_query(q)
        for k in (0, 1, 2, len(pool) + 5):
            got = selector.select(q, e, pool, k)
            assert len(got) == min(k, len(pool)), f"k={k}: selected {len(got)} of a pool of {len(pool)}"
            ids = [d.id for d in got]
            assert len(set(ids)) == len(ids), "selected the same demo twice"
            assert set(ids) <= pool_ids, "selected a demo that is not in the pool"
            assert all(isinstance(d, Demo) for d in got)


def check_gate(gate: Gate, uncertainties: Sequence[float] | None = None) -> None:
    us = list(uncertainties if uncertainties is not None else np.linspace(0, 1, 50))
    assert isinstance(gate, Gate)
    calls = 0
    for t, u in enumerate(us):
        ctx = GateContext(position=t, teacher_calls=calls, pool_size=calls)
        d1 = gate.decide(u, ctx)
        d2 = gate.decide(u, ctx)
        assert isinstance(d1, GateDecision) and isinstance(d1.reason, str) and d1.reason
        assert d1 == d2, "decide must not change the gate's state"
        gate.observe(u, ctx, d1.ask)
        calls += int(d1.ask)
