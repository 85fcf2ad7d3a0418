"""The judge's rule for open questions (``icdistill.judge``): the same mixture as for option questions,
over the answers its experts give.

An open question has up to three experts, as an option question has:

- ``icl``: the student's generation with the demos in its prompt;
- ``zero-shot``: its generation without demos (once per image and prompt), read where it can change
  the answer, for the checks of a taught query, and on every query with ``--judge full``;
- ``vote``: the similarity-weighted vote of the nearest pooled open demos' answers in the embedder's
  image space (free), as the option judge's vote.

The **candidates** are the answers the experts give, VQA-normalised. A generation puts its confidence
(its mean token probability) on its own answer, the rest on answers no expert gave. The vote is the
softmax over its demos' cosines, scaled by how often the vote was right on the checks near ``s``
(``prior`` pseudo-checks count as right: where no check is near, the teacher's answers of the nearest
images are trusted, as the option judge's vote is). A softmax is as sharp among far demos as among
near ones; the checks say how far is too far. The answer is the argmax of the mixture
``sum_e w_e(s) p_e``, ``s`` the nearest open demo's cosine, with the weights the option judge uses
(``icdistill.judge_checks.grid_weights``): the posterior mean over the weight simplex under the
kernel-weighted likelihood of the teacher's answers over the open checks, even where no check is near.
So where nothing was checked, the near demos' answer is taken over a generation that does not copy it
(measured on the mixed manifest: the nearest open demo at cosine >= 0.7 was the teacher's answer on
every query, the student's ICL generation on 54-89%, BENCHMARKS.md), and where the checks found far
demos wrong, the generation answers.

Every taught open query checks each expert: p(teacher's answer) of each, at the similarity it met (the
zero-shot answer read now where the first pass skipped it), and again with the answer left out: the
student shown the nearest demos of other answers, where the vote cannot be right. Checks and
zero-shot readings are events, replayed on resume.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from icdistill.judge_checks import (
    JudgeConfig,
    grid_log_lik,
    grid_log_prior,
    grid_weights,
    kernel,
    simplex_grid,
)
from icdistill.mixture import vote
from icdistill.protocols import Pool
from icdistill.select import nearest_demos
from icdistill.teacher import normalise_answer
from icdistill.types import IMAGE, Demo, Embeddings, Prediction, Query, image_digest

OPEN_EXPERTS = ("icl", "zero-shot", "vote")
_CACHE = 50_000
# a pooled demo this similar to the query, of the same query, or of the same image content asked the
# same question, is the same item: its (teacher's) answer is the answer
SAME_IMAGE = 1.0 - 1e-4
# a generation's confidence in its own answer is kept within these (one token of probability 1 is not
# certainty about the answer)
_CONF = (0.02, 0.98)


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


def confidence(pred: Prediction) -> float:
    """A generation's confidence in its answer: its mean token probability (one half without logprobs)."""
    lp = [float(x) for x in (pred.token_logprobs or ()) if np.isfinite(x)]
    c = float(np.exp(np.mean(lp))) if lp else 0.5
    return float(np.clip(c, *_CONF))


def generation_dist(answer: str, conf: float, candidates: Sequence[str]) -> np.ndarray:
    """A generation's distribution over the (normalised) ``candidates``: ``conf`` on its own answer;
    the rest is on answers no expert gave (not spread over the others: a hesitant generation does
    not speak for another expert's answer)."""
    out = np.zeros(len(candidates))
    out[list(candidates).index(answer)] = conf
    return out


class OpenChecks:
    """The open checks: per taught open query, the similarity it met and each expert's p(teacher's
    answer) (NaN: not read); from them the mixture's weights near a similarity."""

    def __init__(self, config: JudgeConfig) -> None:
        self.config = config
        self._grid = simplex_grid(config.grid)
        self._log_prior = grid_log_prior(self._grid, config)
        self.sims: list[float] = []
        self.p: list[list[float]] = []
        self.vote_right: list[float] = []  # NaN: no vote in the check
        self._ll: np.ndarray | None = None

    def add(self, sim: float, p: Sequence[float | None], vote_right: bool | None) -> None:
        self.sims.append(float(sim))
        self.p.append([np.nan if x is None else float(x) for x in p])
        self.vote_right.append(np.nan if vote_right is None else float(vote_right))
        self._ll = None

    def vote_reliability(self, s: float) -> float:
        """How often the vote's answer was the teacher's on the checks near ``s`` (kernel-weighted), with
        ``prior`` pseudo-checks where it was: the vote's confidence there. A softmax over cosines is as
        sharp among far demos as among near ones; the checks say how far is too far. Until they do, the
        teacher's answers of the nearest images are trusted, as the option judge's vote is."""
        right = np.asarray(self.vote_right, dtype=np.float64)
        seen = ~np.isnan(right)
        prior = self.config.prior
        if not seen.any():
            return 1.0
        kern = kernel(np.asarray(self.sims)[seen], s, self.config.bandwidth)
        return float((kern @ right[seen] + prior) / (kern.sum() + prior))

    def weights(self, s: float) -> np.ndarray:
        """``(w_icl, w_zero_shot, w_vote)`` near ``s`` (even before any check)."""
        if not self.sims:
            return np.full(3, 1.0 / 3)
        if self._ll is None:
            self._ll = grid_log_lik(self._grid, np.asarray(self.p, dtype=np.float64))
        return grid_weights(self._grid, self._log_prior, self._ll, np.asarray(self.sims), s, self.config)


class _Readings:
    """One open query's expert answers, as a mixture over their candidates."""

    def __init__(
        self,
        icl: str,
        icl_conf: float,
        voted: Sequence[str],
        sims: Sequence[float],
        vote_conf: float,
        temperature: float,
    ) -> None:
        self.raw: dict[str, str] = {}  # normalised candidate -> the answer given for it
        self.icl, self.icl_conf = self._add(icl), icl_conf
        self.voted_raw = list(voted)
        self.voted = [self._add(a) for a in voted]
        self.sims = np.asarray(sims, dtype=np.float64)
        self.vote_conf = vote_conf
        self.temperature = temperature
        self.zs: str | None = None
        self.zs_conf = 0.5

    @classmethod
    def of(
        cls, icl: Prediction, near: tuple[Sequence[Demo], np.ndarray], vote_conf: float, temperature: float
    ) -> _Readings:
        demos, sims = near
        return cls(icl.answer, confidence(icl), [d.answer for d in demos], sims, vote_conf, temperature)

    @classmethod
    def from_details(cls, j: dict[str, Any], temperature: float) -> _Readings:
        """The readings a first pass logged (its judge details)."""
        r = cls(
            j["icl_answer"],
            j["icl_confidence"],
            j["voted"],
            j["vote_similarities"],
            j["vote_confidence"],
            temperature,
        )
        if "zero_shot_answer" in j:
            r.zs, r.zs_conf = r._add(j["zero_shot_answer"]), j["zero_shot_confidence"]
        return r

    def _add(self, answer: str) -> str:
        key = normalise_answer(answer)
        self.raw.setdefault(key, answer)
        return key

    def add_zero_shot(self, pred: Prediction) -> None:
        self.zs, self.zs_conf = self._add(pred.answer), confidence(pred)

    def dists(self) -> list[np.ndarray | None]:
        """Each expert's distribution over the candidates (None: not read)."""
        cands = list(self.raw)
        return [
            generation_dist(self.icl, self.icl_conf, cands),
            None if self.zs is None else generation_dist(self.zs, self.zs_conf, cands),
            self.vote_conf * vote(self.sims, self.voted, cands, self.temperature),
        ]

    def mix(self, w: np.ndarray) -> np.ndarray:
        """The mixture of the experts read, unnormalised (an expert not read adds nothing)."""
        out = np.zeros(len(self.raw))
        for wi, d in zip(w, self.dists(), strict=True):
            if d is not None:
                out += wi * d
        return out

    def vote_answer(self) -> str:
        """The (normalised) candidate the vote puts most on."""
        return list(self.raw)[int(np.argmax(self.dists()[2]))]

    def p_of(self, answer: str) -> list[float | None]:
        """Each expert's probability of ``answer`` (None: not read; 0 where no expert gave it)."""
        cands, y = list(self.raw), normalise_answer(answer)
        return [
            None if d is None else round(float(d[cands.index(y)]), 6) if y in cands else 0.0
            for d in self.dists()
        ]

    def details(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "icl_confidence": round(self.icl_conf, 4),
            "vote_confidence": round(self.vote_conf, 4),
            "voted": self.voted_raw,
            "vote_similarities": [round(float(x), 5) for x in self.sims],
            "vote_answer": self.raw[self.vote_answer()],
        }
        if self.zs is not None:
            out["zero_shot_confidence"] = round(self.zs_conf, 4)
        return out


class OpenJudge:
    """Mixes the open experts (see the module doc). ``record`` logs an event (the judge's)."""

    def __init__(
        self,
        read: Callable[[Query, Sequence[Demo]], Prediction],
        config: JudgeConfig,
        shots: int,
        record: Callable[[list[Any]], None],
    ) -> None:
        self._read = read  # the student's prediction, its time counted (``Judge._read``)
        self.config = config
        self.shots = max(1, shots)
        self.checks = OpenChecks(config)
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
    ) -> tuple[list[Demo], np.ndarray] | None:
        """The ``shots`` nearest pooled open demos in the image space and their cosines, nearest first."""
        return nearest_demos(query, emb, pool, self.shots, key=IMAGE, exclude=exclude)

    def answer(
        self, query: Query, icl: Prediction, near: tuple[Sequence[Demo], np.ndarray], read_all: bool = False
    ) -> Prediction:
        """The mixture's answer to an open ``query`` whose ICL reading is ``icl`` and whose nearest pooled
        open demos are ``near``; ``read_all``: read the zero-shot answer even where it cannot change it."""
        s = float(near[1][0])
        w = self.checks.weights(s)
        r = _Readings.of(icl, near, self.checks.vote_reliability(s), self.config.temperature)
        top2 = np.sort(r.mix(w))[::-1]
        # the zero-shot answer adds at most w_zero_shot to one candidate (a new one starts at 0)
        zs = None
        if read_all or top2[0] - (top2[1] if len(top2) > 1 else 0.0) <= w[1]:
            zs = self.zero_shot(query)
            r.add_zero_shot(zs)
        cands = list(r.raw)
        best = cands[int(np.argmax(r.mix(w)))]  # a tie goes to the ICL answer, the first candidate
        # the expert whose answer it is; the zero-shot one only where no other gave it (whether it was
        # read then does not change the answer, nor the uncertainty the gate sees)
        chosen = "icl" if best == r.icl else "vote" if best in r.voted else "zero-shot"
        details: dict[str, Any] = {
            "by": "judge-open",
            "similarity": round(s, 5),
            "weights": [round(float(x), 4) for x in w],
            "chosen": chosen,
            "icl_answer": icl.answer,
            **r.details(),
        }
        if zs is not None:
            details["zero_shot_answer"] = zs.answer
        # the student's time on each reading of this query
        details["seconds"] = {"icl": round(icl.seconds, 6), "zero-shot": round(zs.seconds if zs else 0.0, 6)}
        out = replace(icl, details={**icl.details, "judge": details})
        if chosen == "vote":  # the student's own uncertainty about the query stays what the gate measures
            out.answer = r.raw[best]
        elif chosen == "zero-shot" and zs is not None:
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
        best_last: bool,
    ) -> None:
        """Checks of each expert on a taught open query: its p(teacher's answer). The **met** check is
        what each gave at the first pass (the zero-shot answer read now where the first pass skipped
        it). With the ``pool``, a check with the **answer left out**: the student shown the nearest
        open demos of other answers (one more ICL reading per teacher answer), what it meets where the
        pool lacks the answer; the vote, of other answers, cannot be right there."""
        want = normalise_answer(answer)
        j = (first.details or {}).get("judge") or {}
        if j.get("by") == "judge-open":
            met = _Readings.from_details(j, self.config.temperature)
            if met.zs is None:
                met.add_zero_shot(self.zero_shot(query))
            self._record(["open-check", j["similarity"], met.p_of(answer), met.vote_answer() == want])
        found = nearest_demos(query, emb, pool, 4 * self.shots + 1, key=IMAGE) if pool is not None else None
        if found is None:
            return
        others = [
            (d, float(sim))
            for d, sim in zip(*found, strict=True)
            if normalise_answer(d.answer) != want and d.query_id != query.id
        ][: self.shots]
        if not others:
            return
        shown = [d for d, _ in others]
        icl = self._read(query, shown[::-1] if best_last else shown)
        sim = max(x for _, x in others)
        # a vote of other answers gives the teacher's answer 0, whatever its confidence
        r = _Readings.of(icl, (shown, np.asarray([x for _, x in others])), 1.0, self.config.temperature)
        r.add_zero_shot(self.zero_shot(query))
        self._record(["open-check", round(sim, 5), r.p_of(answer), False])

    def apply(self, ev: Sequence[Any]) -> bool:
        """Apply one of its events; False when the event is not an open-question one."""
        if ev[0] == "open-zero-shot":
            self._zs[ev[1]] = {"answer": ev[2], "logprobs": ev[3], "entropies": ev[4]}
            self._zs.move_to_end(ev[1])
            while len(self._zs) > _CACHE:
                self._zs.popitem(last=False)
            return True
        if ev[0] == "open-check":  # (an earlier version logged no vote_right: its p of one half or more)
            vote_p = ev[2][2]
            self.checks.add(ev[1], ev[2], ev[3] if len(ev) > 3 else None if vote_p is None else vote_p >= 0.5)
            return True
        if ev[0] == "open-teach":  # an earlier version's check: right or wrong per expert
            right = [None if x is None else bool(x) for x in ev[2]]
            self.checks.add(ev[1], [None if x is None else float(x) for x in right], right[2])
            return True
        return False
