"""The baselines ICD is compared with, written as ordinary backends so one loop runs them all:
a k-NN vote over the pool (no LM), a student that never answers (teacher-only), and a student that
labels its own confident answers (self-labelling)."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from icdistill.errors import ICDError
from icdistill.protocols import Embedder, Student
from icdistill.types import IMAGE, Demo, Prediction, Query, TeacherResponse, Usage

# log-score given to options no demo votes for: finite, so entropy and margin stay defined
_FLOOR = math.log(1e-6)


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32).ravel()
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


class KNNStudent:
    """``knn-pool``: a similarity-weighted vote of the demonstrations, no language model at all.

    Each demo votes for its answer with weight ``softmax(cos(query, demo) / temperature)`` in the
    embedding space ``key`` (the image features the ICD selector uses). The vote is the prediction's
    option distribution, so the same gates (e.g. ``margin`` at a budget) decide its teacher calls.
    Open questions get the answer of the most similar demo. With no demos it is maximally unsure.
    """

    name = "knn-pool"

    def __init__(self, embedder: Embedder, key: str = IMAGE, temperature: float = 0.05) -> None:
        if temperature <= 0:
            raise ICDError(f"knn-pool temperature must be > 0, got {temperature}")
        self.embedder = embedder
        self.key = key
        self.temperature = temperature

    def votes(self, query: Query, demos: Sequence[Demo]) -> dict[str, float]:
        """Answer -> summed weight of the demos giving it (weights sum to 1)."""
        if not demos:
            return {}
        q = self.embedder.embed_query(query).get(self.key)
        if q is None or any(self.key not in d.embeddings for d in demos):
            sims = np.zeros(len(demos))  # no vectors to compare: every demo counts the same
        else:
            qv = _unit(q)
            sims = np.array([float(_unit(d.embeddings[self.key]) @ qv) for d in demos])
        w = np.exp((sims - sims.max()) / self.temperature)
        w /= w.sum()
        out: dict[str, float] = {}
        for d, wi in zip(demos, w, strict=True):
            out[d.answer] = out.get(d.answer, 0.0) + float(wi)
        return out

    def predict(self, query: Query, demos: Sequence[Demo]) -> Prediction:
        start = time.perf_counter()
        votes = self.votes(query, demos)
        if query.options is None:
            answer = max(votes, key=lambda a: votes[a]) if votes else ""
            p = votes.get(answer, 0.0)
            ent = -sum(v * math.log(v) for v in votes.values() if v > 0) if votes else math.log(2)
            return Prediction(
                answer=answer,
                token_logprobs=[math.log(max(p, 1e-6))],
                token_entropies=[ent],
                seconds=time.perf_counter() - start,
            )
        scores = {o: math.log(votes[o]) if votes.get(o, 0.0) > 0 else _FLOOR for o in query.options}
        # ties (e.g. no demos) go to the first option, as a student's argmax would
        answer = max(query.options, key=lambda o: scores[o])
        return Prediction(answer=answer, option_scores=scores, seconds=time.perf_counter() - start)


class NearestOrZeroShotStudent:
    """``knn-or-zero-shot``: the fixed switch a sceptic tries first. The nearest shown demo's answer when
    its cosine to the query (in the embedder's space ``key``) is at least ``cos``, else the student's
    own zero-shot answer. No learning: one threshold for every dataset."""

    def __init__(self, student: Student, embedder: Embedder, cos: float = 0.7, key: str = IMAGE) -> None:
        if not -1.0 <= cos <= 1.0:
            raise ICDError(f"knn-or-zero-shot cos must be in [-1, 1], got {cos}")
        self.student = student
        self.embedder = embedder
        self.cos = cos
        self.key = key
        self.name = f"knn-or-zero-shot:{student.name}"

    def predict(self, query: Query, demos: Sequence[Demo]) -> Prediction:
        start = time.perf_counter()
        q = self.embedder.embed_query(query).get(self.key) if demos else None
        if q is not None and all(self.key in d.embeddings for d in demos):
            qv = _unit(q)
            sims = [float(_unit(d.embeddings[self.key]) @ qv) for d in demos]
            best = int(np.argmax(sims))
            if sims[best] >= self.cos:
                answer = demos[best].answer
                if query.options is None or answer in query.options:
                    options = query.options or (answer,)
                    scores = {o: 0.0 if o == answer else _FLOOR for o in options}
                    details = {"switch": "nearest-demo", "similarity": round(sims[best], 5)}
                    if query.options is None:
                        return Prediction(
                            answer,
                            token_logprobs=[0.0],
                            token_entropies=[0.0],
                            details=details,
                            seconds=time.perf_counter() - start,
                        )
                    return Prediction(
                        answer, option_scores=scores, details=details, seconds=time.perf_counter() - start
                    )
        pred = self.student.predict(query, [])
        pred.details = {**pred.details, "switch": "zero-shot"}
        return pred


class AbstainingStudent:
    """Answers nothing, at no cost: with ``answer=forward`` and the ``always`` gate, the run is the
    teacher alone on every query (``teacher-zero-shot``)."""

    name = "none"

    def predict(self, query: Query, demos: Sequence[Demo]) -> Prediction:
        if query.options:
            return Prediction(answer=query.options[0], option_scores=dict.fromkeys(query.options, 0.0))
        return Prediction(answer="", token_logprobs=[0.0], token_entropies=[0.0])


class SelfTeacher:
    """``self-label``: the student is its own teacher. Its N samples are drawn from the option
    distribution of the student's own first pass on the query (no extra model call), so the agreement
    floor of test-time scaling keeps only answers the student is sure of.

    Wrap the student with ``MemoStudent`` and pass the memo here.
    """

    def __init__(self, memo: MemoStudent, seed: int = 0) -> None:
        self.memo = memo
        self.seed = seed
        self.name = f"self:{memo.name}"

    def sample(self, query: Query, n: int) -> TeacherResponse:
        pred = self.memo.last(query.id)
        if pred is None:
            raise ICDError(f"self-label: no student prediction for query {query.id!r}")
        probs = pred.option_probs()
        if not probs:  # open answers: the student's own answer, n times
            return TeacherResponse([pred.answer] * n, Usage(calls=1))
        keys = list(probs)
        p = np.array([probs[k] for k in keys])
        rng = np.random.default_rng([self.seed, query.position])
        draws = rng.choice(len(keys), size=n, p=p / p.sum())
        return TeacherResponse([keys[i] for i in draws], Usage(calls=1))


class MemoStudent:
    """Wraps a student and remembers its most recent predictions per query id."""

    def __init__(self, student: Student, size: int = 64) -> None:
        self.student = student
        self.name = student.name
        self.size = size
        self._last: OrderedDict[str, Prediction] = OrderedDict()

    def predict(self, query: Query, demos: Sequence[Demo]) -> Prediction:
        pred = self.student.predict(query, demos)
        self._last.setdefault(query.id, pred)  # the first pass is the one a self-label comes from
        while len(self._last) > self.size:
            self._last.popitem(last=False)
        return pred

    def last(self, query_id: str) -> Prediction | None:
        return self._last.get(query_id)
