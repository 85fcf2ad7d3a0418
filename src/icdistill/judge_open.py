"""The judge's rule for open questions (``icdistill.judge``): which of the student's answers to trust.

An open question has up to three experts, as an option question has:

- ``icl``: the student's generation with the demos in its prompt;
- ``zero-shot``: its generation without demos, read where it is the expert to trust, for the check
  of a taught query, and on every query with ``--judge full`` (once per image and prompt);
- ``nearest``: the answer of the nearest pooled demo of an open question in the embedder's image
  space (free).

Generations have no distribution over a shared set of answers to mix, so the judge selects. Every
taught open query checks each expert: was its answer (VQA-normalised) the teacher's? At a query's
nearest-demo similarity ``s``, an expert's reliability is its kernel-weighted share of right answers
near ``s``, with ``prior`` pseudo-checks at one half. The ICL reading answers unless another expert
beat it on those checks with evidence (``OpenChecks.choose``: wins minus losses on the checks where
they disagreed, above 1.28 standard errors); before any check the student answers as it always did. The
gate measures the token uncertainty of the generation that answers: the zero-shot one where it is
chosen, else the ICL one (where the nearest demo answers, the student's own uncertainty about the
query). Checks and zero-shot readings are events, replayed on resume.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from icdistill.protocols import Pool
from icdistill.select import nearest_demos
from icdistill.teacher import normalise_answer
from icdistill.types import IMAGE, Demo, Embeddings, Prediction, Query, image_digest

OPEN_EXPERTS = ("icl", "zero-shot", "nearest")
# how many standard errors another expert's wins over the ICL reading must exceed its losses by (one
# sided, about 90%): measured on the mixed manifest, two lucky checks of the zero-shot reading moved
# a stream's open answers from 0.45 to 0.13
SWITCH_Z = 1.28
_CACHE = 50_000
# a pooled demo this similar to the query, of the same query, or of the same image content asked the
# same question, is the same item: its (teacher's) answer is the answer
SAME_IMAGE = 1.0 - 1e-4


def same_image(query: Query, demo: Demo, similarity: float) -> bool:
    """Whether a pooled demo is of this very query (the re-run after a teacher call), or of the same
    image asked the same question with the same options (a repeated item). Another question about the
    same image is not: its answer answers that other question."""
    if similarity < SAME_IMAGE:
        return False
    if demo.query_id == query.id:
        return True
    shown = demo.provenance.get("options")
    return (
        demo.image is not None
        and query.image is not None
        and " ".join(demo.prompt.split()) == " ".join(query.prompt.split())
        and (shown is None or list(shown) == list(query.options or ()))
        and image_digest(demo.image) == image_digest(query.image)
    )


class OpenChecks:
    """Per taught open query: the similarity it met and whether each expert was right (NaN: not read)."""

    def __init__(self, bandwidth: float, prior: float) -> None:
        self.bandwidth = bandwidth
        self.prior = prior
        self.sims: list[float] = []
        self.right: list[list[float]] = []

    def add(self, sim: float, right: Sequence[bool | None]) -> None:
        self.sims.append(float(sim))
        self.right.append([np.nan if r is None else float(r) for r in right])

    def reliabilities(self, s: float) -> np.ndarray:
        """Each expert's kernel-weighted share of right answers near ``s`` (one half before any check)."""
        if not self.sims:
            return np.full(len(OPEN_EXPERTS), 0.5)
        kern = np.exp(-0.5 * ((np.asarray(self.sims) - s) / self.bandwidth) ** 2)
        right = np.asarray(self.right, dtype=np.float64)
        present = ~np.isnan(right)
        hits = np.where(present, right, 0.0).T @ kern
        seen = present.T.astype(np.float64) @ kern
        return (hits + self.prior / 2) / (seen + self.prior)

    def choose(self, s: float) -> str:
        """The expert to trust near ``s``: the ICL reading, unless another beat it on the checks near
        ``s`` with evidence (a sign test on the checks where one was right and the other wrong:
        kernel-weighted wins minus losses above ``SWITCH_Z`` standard errors, ``prior`` pseudo-checks
        added); of several such, the most reliable. A few lucky checks do not move the answer."""
        if not self.sims:
            return "icl"
        kern = np.exp(-0.5 * ((np.asarray(self.sims) - s) / self.bandwidth) ** 2)
        right = np.asarray(self.right, dtype=np.float64)
        rel = self.reliabilities(s)
        icl = right[:, 0]
        best, best_rel = "icl", -1.0
        for e, name in enumerate(OPEN_EXPERTS):
            if name == "icl":
                continue
            both = ~np.isnan(right[:, e]) & ~np.isnan(icl)
            wins = float(kern[both] @ ((right[both, e] == 1) & (icl[both] == 0)))
            losses = float(kern[both] @ ((right[both, e] == 0) & (icl[both] == 1)))
            if wins - losses > SWITCH_Z * np.sqrt(wins + losses + self.prior) and rel[e] > best_rel:
                best, best_rel = name, float(rel[e])
        return best


class OpenJudge:
    """Selects among the open experts (see the module doc). ``record`` logs an event (the judge's)."""

    def __init__(
        self,
        read: Callable[[Query, Sequence[Demo]], Prediction],
        bandwidth: float,
        prior: float,
        record: Callable[[list[Any]], None],
    ) -> None:
        self._read = read  # the student's prediction, its time counted (``Judge._read``)
        self.checks = OpenChecks(bandwidth, prior)
        self._record = record
        self._zs: OrderedDict[str, dict[str, Any]] = OrderedDict()

    @staticmethod
    def _key(query: Query) -> str:
        image = image_digest(query.image) if query.image is not None else ""
        return hashlib.sha1(json.dumps(["open", image, query.prompt]).encode()).hexdigest()

    def zero_shot(self, query: Query) -> Prediction:
        """The student's answer without demos, read once per image and prompt (an event)."""
        key = self._key(query)
        hit = self._zs.get(key)
        if hit is None:
            pred = self._read(query, [])
            self._record(["open-zero-shot", key, pred.answer, pred.token_logprobs, pred.token_entropies])
            return pred
        self._zs.move_to_end(key)
        # a cached answer costs nothing
        return Prediction(hit["answer"], token_logprobs=hit["logprobs"], token_entropies=hit["entropies"])

    def nearest(
        self, query: Query, emb: Embeddings, pool: Pool, exclude: Sequence[int]
    ) -> tuple[Demo, float] | None:
        found = nearest_demos(query, emb, pool, 1, key=IMAGE, exclude=exclude)
        if found is None:
            return None
        return found[0][0], float(found[1][0])

    def answer(
        self, query: Query, icl: Prediction, near: tuple[Demo, float], read_all: bool = False
    ) -> Prediction:
        """The selected answer to an open ``query`` whose ICL reading is ``icl`` and whose nearest pooled
        open demo is ``near``; ``read_all``: read the zero-shot answer even where it is not chosen."""
        demo, s = near
        rel = self.checks.reliabilities(s)
        best = self.checks.choose(s)
        details: dict[str, Any] = {
            "by": "judge-open",
            "similarity": round(s, 5),
            "reliabilities": [round(float(x), 4) for x in rel],
            "chosen": best,
            "icl_answer": icl.answer,
            "nearest_answer": demo.answer,
        }
        zs = self.zero_shot(query) if best == "zero-shot" or read_all else None
        if zs is not None:
            details["zero_shot_answer"] = zs.answer
        # the student's time on each reading of this query
        details["seconds"] = {"icl": round(icl.seconds, 6), "zero-shot": round(zs.seconds if zs else 0.0, 6)}
        out = replace(icl, details={**icl.details, "judge": details})
        if best == "nearest":  # the student's own uncertainty about the query stays what the gate measures
            out.answer = demo.answer
        elif best == "zero-shot" and zs is not None:
            out.answer, out.token_logprobs, out.token_entropies = (
                zs.answer,
                zs.token_logprobs,
                zs.token_entropies,
            )
        return out

    def teach(
        self,
        query: Query,
        emb: Embeddings,
        first: Prediction,
        answer: str,
        pool: Pool | None,
        shots: int,
        best_last: bool,
    ) -> None:
        """Checks of each expert on a taught open query: was its answer the teacher's? The **met** check
        is what each said at the first pass (the zero-shot answer read now where the first pass skipped
        it). With the ``pool``, a check with the **answer left out**: the student shown the nearest open
        demos of other answers (one more ICL reading per teacher answer), what it meets where the pool
        lacks the answer; the nearest demo is wrong there by construction."""
        want = normalise_answer(answer)
        j = (first.details or {}).get("judge") or {}
        if j.get("by") == "judge-open":
            zs = j.get("zero_shot_answer") or self.zero_shot(query).answer
            said = (j["icl_answer"], zs, j["nearest_answer"])
            self._record(["open-teach", j["similarity"], [normalise_answer(a) == want for a in said]])
        found = nearest_demos(query, emb, pool, 4 * shots + 1, key=IMAGE) if pool is not None else None
        if found is None:
            return
        others = [
            (d, float(sim))
            for d, sim in zip(*found, strict=True)
            if normalise_answer(d.answer) != want and d.query_id != query.id
        ][:shots]
        if not others:
            return
        shown = [d for d, _ in others]
        icl = self._read(query, shown[::-1] if best_last else shown).answer
        zs = self.zero_shot(query).answer
        sim = max(x for _, x in others)
        self._record(
            [
                "open-teach",
                round(sim, 5),
                [normalise_answer(icl) == want, normalise_answer(zs) == want, False],
            ]
        )

    def apply(self, ev: Sequence[Any]) -> bool:
        """Apply one of its events; False when the event is not an open-question one."""
        if ev[0] == "open-zero-shot":
            self._zs[ev[1]] = {"answer": ev[2], "logprobs": ev[3], "entropies": ev[4]}
            self._zs.move_to_end(ev[1])
            while len(self._zs) > _CACHE:
                self._zs.popitem(last=False)
            return True
        if ev[0] == "open-teach":
            self.checks.add(ev[1], ev[2])
            return True
        return False
