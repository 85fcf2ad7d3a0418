"""The judge: one rule, in the engine, that weighs a student's own readings against its demonstrations
for every student backend, learned online from the teacher's answers.

A classification query has up to three experts:

- ``icl``: the student's reading with the demos in its prompt (the paper's step 2);
- ``zero-shot``: the student's reading without demos (``predict(query, [])``), cached per image,
  prompt and options;
- ``vote``: the similarity-weighted vote of the nearest pooled demos in the embedder's image space
  (free: no model call).

The answer is the mixture ``p(o) = sum_e w_e(s) p_e(o)``, ``s`` the nearest pooled demo's cosine in
the image space. The weights are the posterior mean over a grid of the weight simplex, each grid point
scored by the kernel-weighted (in ``s``) likelihood of the teacher's answers over the judge's checks:

- the **met** check of every taught query: what each expert said of it at its first pass, at the
  similarity it met (its class was often not pooled yet: the check the gate's first calls give);
- the **leave-one-out** and **leave-label-out** checks of ``SimilarityMixture``: the vote of the other
  taught queries (of the other labels) and the zero-shot reading, at their similarity (the ICL
  reading was not read there: it is left out of those checks, the weights renormalised over the
  experts present).

Each teacher answer also gives a check with its label left out: the student reads the query shown the
nearest pooled demos of other labels (one more ICL reading), what it meets where the pool lacks its
class. ``JudgeConfig.rule="bayes"`` combines the experts' answers by their reliability near ``s``
instead (measured below the mixture). What the checks give lives in ``icdistill.judge_checks``.

The mixture is then multiplied, per option, by the likelihood ratio of the query's nearest cosine to
that option's taught images (``icdistill.judge_likelihood``): the vote says which label is near, the
ratio also says which labels are far (``JudgeConfig.likelihood``).

Each LM reading enters at a temperature fitted to the teacher's answers (small LMs' option
distributions are far too flat where they read right). An expert is only computed when it can
change the answer: the LM reading of more weight is read first (on a tie the zero-shot one, read once
per image), and the other is skipped when no distribution it could give changes the answer (the
mixture is linear in it: checked at its one-hot extremes, the likelihood ratios applied); it then
enters the mixture as the even distribution, so the gate's uncertainty still carries its weight. A
taught query's skipped readings are read when it is taught (its checks need them).

Everything the judge learns is an event (``drain_events``), logged per query and replayed on resume
(``replay``), so a resumed run answers as an uninterrupted one. The zero-shot readings it read
are events too, put back in its cache on replay.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from icdistill.coverage import decode_sketch, encode_sketch
from icdistill.judge_checks import EXPERTS, JudgeChecks, JudgeConfig, _bayes, _even, _mix, _swing
from icdistill.judge_likelihood import SimilarityLikelihood
from icdistill.judge_open import OpenJudge, same_image
from icdistill.mixture import temper, vote
from icdistill.protocols import Pool, Student
from icdistill.select import nearest_demos
from icdistill.types import IMAGE, Demo, Embeddings, Prediction, Query, image_digest

ICL, ZERO_SHOT, VOTE = EXPERTS
JUDGE_MODES = ("on", "full", "off")  # LoopConfig.judge
_ZERO_SHOT_CACHE = 50_000


class Judging(Protocol):
    """What the loop needs of a judge (``icdistill.distiller``)."""

    def answer(
        self,
        query: Query,
        emb: Embeddings,
        demos: Sequence[Demo],
        pool: Pool,
        *,
        exclude: Sequence[int] = (),
    ) -> Prediction: ...

    def teach(
        self,
        query: Query,
        emb: Embeddings,
        first: Prediction,
        answer: str,
        demos: Sequence[Demo] = (),
        pool: Pool | None = None,
    ) -> None: ...

    def needs_zero_shot(self, query: Query) -> bool: ...

    def drain_events(self) -> list[list[Any]]: ...

    def replay(self, record: dict[str, Any]) -> None: ...


def _probs(pred: Prediction, options: Sequence[str]) -> np.ndarray:
    p = pred.option_probs()
    out = np.array([p.get(o, 0.0) for o in options], dtype=np.float64)
    s = out.sum()
    return out / s if s > 0 else np.full(len(options), 1.0 / len(options))


class Judge:
    """Combines a student's readings and the pool's vote for option questions (see the module doc).

    Open questions: the same mixture over the answers the ICL generation, the zero-shot one and the
    nearest open demos give (``icdistill.judge_open``)."""

    def __init__(
        self, student: Student, shots: int, config: JudgeConfig | None = None, best_last: bool = True
    ) -> None:
        self.student = student
        self.shots = max(1, shots)
        self.best_last = best_last  # the prompt's demo order (LoopConfig.demo_order)
        self.config = config or JudgeConfig()
        self._reset()

    def _reset(self) -> None:
        self.checks = JudgeChecks(self.shots, self.config)
        self.likelihood = SimilarityLikelihood(self.config.likelihood_bandwidth, self.config.likelihood_prior)
        self._ahead = 0.0  # read-ahead time of the readings of the query being answered
        # judged queries and those that read the zero-shot reading, decayed (what to read ahead)
        self._zs_rate = (0.0, 0.0)
        self.open = OpenJudge(self._read, self.config, self.shots, self._record)
        self._zs: OrderedDict[str, np.ndarray] = OrderedDict()
        self._events: list[list[Any]] = []

    # ------------------------------------------------------------------ the readings
    @staticmethod
    def _key(query: Query, options: Sequence[str]) -> str:
        image = image_digest(query.image) if query.image is not None else ""
        return hashlib.sha1(json.dumps([image, query.prompt, list(options)]).encode()).hexdigest()

    def zero_shot(self, query: Query, options: tuple[str, ...]) -> np.ndarray:
        """The student's option distribution without demos, read once per image, prompt and options."""
        key = self._key(query, options)
        hit = self._zs.get(key)
        if hit is not None:
            self._zs.move_to_end(key)
            return hit
        return self._remember_zero_shot(key, _probs(self._read(query, []), options))

    def needs_zero_shot(self, query: Query) -> bool:
        """Whether a micro-batch should read the student's zero-shot reading of ``query`` ahead
        (``Distiller.read_ahead``): an option question whose reading is not cached, where the judge
        reads it (``--judge full``), or has read it on at least half of the queries it judged lately (a
        reading read ahead and not used is wasted work; which readings are read does not change)."""
        if not query.options or self._key(query, tuple(dict.fromkeys(query.options))) in self._zs:
            return False
        judged, read = self._zs_rate
        return not self.config.skip or judged < 8 or read >= judged / 2

    def _weights(
        self, options: tuple[str, ...], s: float | None
    ) -> tuple[np.ndarray, float, float, np.ndarray | None, np.ndarray]:
        """The mixture's weights near ``s``, the two LM temperatures, each expert's reliability (the
        bayes rule, else None) and each reading's strength (what it can add to one option)."""
        w, t_icl, t_zs = self.checks.weights(options, s)
        rel = self.checks.reliabilities(options, s) if self.config.rule == "bayes" else None
        return w, t_icl, t_zs, rel, (w if rel is None else _swing(rel, len(options)))

    @staticmethod
    def _combine(
        options: tuple[str, ...],
        readings: dict[str, np.ndarray | None],
        w: np.ndarray,
        rel: np.ndarray | None,
    ) -> np.ndarray:
        # a skipped reading enters the mixture as the even distribution: the argmax is the same, and
        # the uncertainty the gate sees keeps the weight the judge would have given it
        mixed = _mix({k: _even(options) if r is None and k != VOTE else r for k, r in readings.items()}, w)
        return mixed if rel is None else _bayes(readings, rel, mixed)

    def _second_needed(
        self,
        options: tuple[str, ...],
        readings: dict[str, np.ndarray | None],
        w: np.ndarray,
        rel: np.ndarray | None,
        second: str,
        ratio: np.ndarray,
    ) -> bool:
        """Whether the reading not read yet (None in ``readings``) can change the answer (the combination
        times the likelihood ``ratio``): the answer with each option's one-hot in its place against the
        answer now. The mixture is linear in the reading, so its one-hots are its extremes and the check
        is exact; the bayes rule reads the reading's argmax (exact) and breaks ties by the mixture."""
        if not self.config.skip:
            return True
        now = int(np.argmax(self._combine(options, readings, w, rel) * ratio))
        for corner in np.eye(len(options)):
            probe = {**readings, second: corner}
            if int(np.argmax(self._combine(options, probe, w, rel) * ratio)) != now:
                return True
        return False

    def _ratios(self, options: tuple[str, ...], emb: Embeddings) -> np.ndarray:
        """Per option, the likelihood ratio of the query's nearest cosine to the option's taught images
        (``icdistill.judge_likelihood``); all 1 when it is off or the query has no image."""
        features = emb.get(IMAGE)
        if not self.config.likelihood or features is None:
            return np.ones(len(options))
        return self.likelihood.ratios(options, np.asarray(features, dtype=np.float32))

    def _remember_zero_shot(self, key: str, p: np.ndarray) -> np.ndarray:
        """Cache a zero-shot reading, as an event: a resumed run finds it where it was (a student
        whose reading changes online, e.g. calibrated, is not asked again)."""
        self._record(["zero-shot", key, [float(x) for x in p]])
        return self._zs[key]

    def _read(self, query: Query, demos: Sequence[Demo]) -> Prediction:
        """The student's prediction; what it reports beyond the wall time spent here (a reading read
        ahead in a micro-batch: its share of that batch's time) is added to ``_ahead``."""
        t0 = time.perf_counter()
        pred = self.student.predict(query, demos)
        wall = time.perf_counter() - t0
        self._ahead += max(0.0, pred.seconds - wall)
        pred.seconds = max(pred.seconds, wall)
        return pred

    def _vote(
        self, query: Query, emb: Embeddings, pool: Pool, options: Sequence[str], exclude: Sequence[int]
    ) -> tuple[np.ndarray, float, bool, str] | None:
        """The vote of the nearest pooled demos, the nearest one's cosine, whether that demo is of
        this very image (the re-run after a teacher call, or a repeated image), and its answer."""
        found = nearest_demos(query, emb, pool, self.shots, key=IMAGE, exclude=exclude)
        if found is None:
            return None
        demos, sims = found
        p = vote(sims, [d.answer for d in demos], options, self.config.temperature)
        near = demos[int(np.argmax(sims))]
        return p, float(sims.max()), same_image(query, near, float(sims.max())), near.answer

    # ------------------------------------------------------------------ the answer
    def answer(
        self,
        query: Query,
        emb: Embeddings,
        demos: Sequence[Demo],
        pool: Pool,
        *,
        exclude: Sequence[int] = (),
    ) -> Prediction:
        """The judged answer to ``query`` shown ``demos``; ``exclude``: pooled demos the vote must not
        see (the query's own on its first pass). Its ``seconds`` are the student's: a reading read
        ahead in a micro-batch counts with its share of that batch's time."""
        start = time.perf_counter()
        self._ahead = 0.0
        if not query.options:
            return self._answer_open(query, emb, demos, pool, exclude, start)
        options = tuple(dict.fromkeys(query.options))
        voted = self._vote(query, emb, pool, options, exclude)
        details: dict[str, Any] = {}
        if voted is not None and voted[2]:
            # the pooled demo of this very image (the re-run after a teacher call): its answer is the answer
            p, s = voted[0], voted[1]
            details = {
                "by": "same-image",
                "similarity": round(s, 5),
                "vote_answer": options[int(np.argmax(p))],
            }
            return self._prediction(options, p, details, start)
        if not demos:  # the student alone: its zero-shot reading is its ICL reading
            p = self.zero_shot(query, options)
            details = {"by": "zero-shot", "zero_shot": _round(p)}
            if voted is not None:  # demos of no shown kind, e.g. shots 0: the vote is still read
                details["vote"], details["similarity"] = _round(voted[0]), round(voted[1], 5)
            return self._prediction(options, p, details, start - self._ahead)
        s = voted[1] if voted is not None else None
        w, t_icl, t_zs, rel, strength = self._weights(options, s)
        raw: dict[str, Prediction | np.ndarray | None] = {ICL: None, ZERO_SHOT: None}
        spent = dict.fromkeys((ICL, ZERO_SHOT), 0.0)

        def read(name: str) -> None:
            t0, ahead = time.perf_counter(), self._ahead
            raw[name] = self._read(query, demos) if name == ICL else self.zero_shot(query, options)
            spent[name] = time.perf_counter() - t0 + self._ahead - ahead

        def tempered(name: str) -> np.ndarray | None:
            r = raw[name]
            if r is None:
                return None
            p = _probs(r, options) if isinstance(r, Prediction) else r
            return temper(p, t_icl if name == ICL else t_zs)

        # the LM reading of more weight first (on a tie the zero-shot one, read once per image); the
        # other only where it can change the answer
        first = ICL if strength[0] > strength[1] else ZERO_SHOT
        second = ZERO_SHOT if first == ICL else ICL
        read(first)

        def readings_now() -> dict[str, np.ndarray | None]:
            return {ICL: tempered(ICL), ZERO_SHOT: tempered(ZERO_SHOT), VOTE: voted[0] if voted else None}

        ratio = self._ratios(options, emb)
        if self._second_needed(options, readings_now(), w, rel, second, ratio):
            read(second)
        p = self._combine(options, readings_now(), w, rel) * ratio
        p = p / float(p.sum())
        judged, read_zs = self._zs_rate
        self._zs_rate = (0.95 * judged + 1.0, 0.95 * read_zs + float(raw[ZERO_SHOT] is not None))
        readings = readings_now()
        icl_pred = raw[ICL] if isinstance(raw[ICL], Prediction) else None
        details = {
            "by": "judge",
            "rule": self.config.rule,
            # the mixture's weights, or each expert's reliability near s (bayes)
            "weights": [round(float(x), 4) for x in (w if rel is None else rel)],
            "similarity": None if s is None else round(s, 5),
            "icl": None if icl_pred is None else _round(_probs(icl_pred, options)),
            "zero_shot": None if raw[ZERO_SHOT] is None else _round(raw[ZERO_SHOT]),  # type: ignore[arg-type]
            "vote": None if voted is None else _round(voted[0]),
            "temperatures": [round(t_icl, 4), round(t_zs, 4)],
            # per option, the likelihood ratio of the query's nearest cosine to its taught images
            "likelihood": [round(float(x), 4) for x in ratio],
            # the student's time on each reading of this query
            "seconds": {ICL: round(spent[ICL], 6), ZERO_SHOT: round(spent[ZERO_SHOT], 6)},
        }
        if icl_pred is not None:
            details["icl_answer"] = icl_pred.answer
            details["icl_copies_nearest_demo"] = icl_pred.answer == (voted[3] if voted else None)
            if icl_pred.details:
                details["student"] = icl_pred.details
        for name in (ZERO_SHOT, VOTE):
            if readings[name] is not None:
                details[f"{name.replace('-', '_')}_answer"] = options[int(np.argmax(readings[name]))]
        return self._prediction(options, p, details, start - self._ahead)

    def _answer_open(
        self,
        query: Query,
        emb: Embeddings,
        demos: Sequence[Demo],
        pool: Pool,
        exclude: Sequence[int],
        start: float,
    ) -> Prediction:
        """An open question: the mixture of the student's ICL generation, its zero-shot one and the vote
        of the nearest open demos, over their answers (``icdistill.judge_open``)."""
        near = self.open.nearest(query, emb, pool, exclude) if demos else None
        if near is not None and same_image(query, near[0][0], float(near[1][0])):
            # the pooled demo of this very image answers
            details = {"by": "same-image", "similarity": round(float(near[1][0]), 5)}
            # the student is sure of it: the gate sees no uncertainty
            return Prediction(
                near[0][0].answer,
                token_logprobs=[0.0],
                token_entropies=[0.0],
                seconds=time.perf_counter() - start,
                details={"judge": details},
            )
        pred = self._read(query, demos)
        if near is not None:
            pred = self.open.answer(query, pred, near, read_all=not self.config.skip)
        pred.seconds = time.perf_counter() - start + self._ahead
        return pred

    @staticmethod
    def _prediction(
        options: tuple[str, ...], p: np.ndarray, details: dict[str, Any], start: float
    ) -> Prediction:
        scores = dict(zip(options, np.log(np.maximum(p, 1e-12)).tolist(), strict=True))
        answer = max(options, key=scores.__getitem__)
        return Prediction(
            answer, option_scores=scores, seconds=time.perf_counter() - start, details={"judge": details}
        )

    # ------------------------------------------------------------------ learning
    def teach(
        self,
        query: Query,
        emb: Embeddings,
        first: Prediction,
        answer: str,
        demos: Sequence[Demo] = (),
        pool: Pool | None = None,
    ) -> None:
        """The teacher's answer to ``query``, whose first pass was ``first`` shown ``demos``: a check of
        each expert (the readings the first pass skipped are read now, with the same demos). With the
        ``pool``, a second check leaves the answer's label out: the student reads the query shown the
        nearest pooled demos of other labels (one more ICL reading per teacher answer), what it meets
        where the pool lacks the query's class."""
        if not query.options:
            self.open.teach(query, emb, first, answer, pool, self.best_last)
            features = emb.get(IMAGE)
            if features is not None:  # an image the teacher named: the likelihood ratios' too
                self._record(
                    ["labelled-image", answer, encode_sketch(np.asarray(features, dtype=np.float32))]
                )
            return
        if answer not in query.options:
            return
        options = tuple(dict.fromkeys(query.options))
        j = first.details.get("judge") or {}
        icl = j.get("icl")
        if icl is None and j.get("by") == "judge" and demos:
            icl = _round(_probs(self._read(query, demos), options))
        zs = self.zero_shot(query, options)
        features = emb.get(IMAGE)
        self._record(
            [
                "teach",
                list(options),
                answer,
                None if features is None else encode_sketch(np.asarray(features, dtype=np.float32)),
                j.get("similarity"),
                icl,
                [float(x) for x in zs],
                j.get("vote"),
            ]
        )
        if pool is not None:
            self._teach_label_left_out(query, emb, options, answer, zs, pool)

    def _teach_label_left_out(
        self, query: Query, emb: Embeddings, options: tuple[str, ...], answer: str, zs: np.ndarray, pool: Pool
    ) -> None:
        found = nearest_demos(query, emb, pool, 4 * self.shots + 1, key=IMAGE)
        if found is None:
            return
        others = [
            (d, s) for d, s in zip(*found, strict=True) if d.answer != answer and d.query_id != query.id
        ]
        others = others[: self.shots]
        if not others:
            return
        shown = [d for d, _ in others]
        sims = np.array([s for _, s in others], dtype=np.float64)
        icl = _probs(self._read(query, shown[::-1] if self.best_last else shown), options)
        voted = vote(sims, [d.answer for d in shown], options, self.config.temperature)
        self._record(
            [
                "check",
                list(options),
                answer,
                float(sims.max()),
                _round(icl),
                [float(x) for x in zs],
                _round(voted),
            ]
        )

    def _record(self, ev: list[Any]) -> None:
        self._events.append(ev)
        self._apply(ev)

    def _apply(self, ev: Sequence[Any]) -> None:
        if self.open.apply(ev):
            return
        if ev[0] == "zero-shot":
            self._zs[ev[1]] = np.asarray(ev[2], dtype=np.float64)
            self._zs.move_to_end(ev[1])
            while len(self._zs) > _ZERO_SHOT_CACHE:
                self._zs.popitem(last=False)
            return
        if ev[0] == "check":  # a check with the answer's label left out of the shown demos
            _, options_l, answer, sim, icl, zs, voted = ev
            options = tuple(options_l)
            self.checks.add_met(
                options,
                options.index(answer),
                sim,
                icl,
                np.asarray(zs, dtype=np.float64),
                voted,
                unpooled=True,
            )
            return
        if ev[0] == "labelled-image":
            self.likelihood.teach(decode_sketch(ev[2]).astype(np.float32), ev[1])
            return
        if ev[0] != "teach":
            return
        _, options_l, answer, sketch, sim, icl, zs, voted = ev
        options = tuple(options_l)
        y = options.index(answer)
        zs_a = np.asarray(zs, dtype=np.float64)
        first_of_label = self.checks.count_answer(options, answer)
        if sim is not None and icl is not None:  # a met check: demos were shown at its first pass
            self.checks.add_met(options, y, sim, icl, zs_a, voted, unpooled=first_of_label)
        if sketch is not None:
            features = decode_sketch(sketch).astype(np.float32)
            self.checks.teach_synthetic(options, features, zs_a, answer)
            self.likelihood.teach(features, answer)

    def drain_events(self) -> list[list[Any]]:
        events, self._events = self._events, []
        return events

    def replay(self, record: dict[str, Any]) -> None:
        """Re-learn what an earlier process logged for one query (resume): what it was taught and the
        zero-shot readings it read (back into the cache, so the student is asked as before)."""
        for ev in record.get("judge_events") or ():
            self._apply(ev)


def _round(p: np.ndarray) -> list[float]:
    return [round(float(x), 6) for x in p]
