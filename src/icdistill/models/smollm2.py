"""The offline default student ``local:smollm2``: an image's classifier tags as text, answered by
SmolLM2-135M-Instruct through label log-likelihood scoring with in-context demonstrations."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image

from icdistill.coverage import decode_sketch, encode_sketch
from icdistill.errors import SpecError
from icdistill.mixture import SimilarityMixture, vote
from icdistill.models.scoring import generate_with_entropy, sample_generations, score_continuations
from icdistill.models.smollm2_load import load_smollm2
from icdistill.types import Demo, Prediction, Query, image_digest

log = logging.getLogger(__name__)

# Tag descriptions kept per student; the pool's demos come back query after query.
TAG_CACHE_SIZE = 4096


class TagsLike(Protocol):
    def describe(self, k: int) -> str: ...


class TaggerLike(Protocol):
    """An image tagger: ``tag(image).describe(k)`` gives e.g. ``"sandal 41%, running shoe 20%"``."""

    def tag(self, image: Image.Image) -> TagsLike: ...


def _one_line(text: str) -> str:
    # a newline inside a field would end the block early in the line-based prompt format
    return " ".join(text.split())


# a tag's share as the tagger writes it ("sandal 41%"); the last one of a generation may be cut ("1")
_SHARE = re.compile(r"\s+\d{1,3}(?:\.\d+)?%")
_CUT_SHARE = re.compile(r"(.+?)\s+\d{1,3}(?:\.\d*)?%?")


def tag_names(tags: str) -> list[str]:
    """The labels of a tag line, without their shares: ``"sandal 41%, clog 9%"`` -> sandal, clog."""
    return [name for name in (_SHARE.sub("", t).strip() for t in tags.split(",")) if name]


def open_tags(tags: str) -> str:
    """The tag line of an open question: the labels only. With the shares in the prompt SmolLM2
    copied them into its answers ("chocolate sauce 41%"); options are scored, so theirs keep them."""
    return ", ".join(tag_names(tags))


def clean_open_answer(text: str, names: Sequence[str]) -> str:
    """A generated answer without the tag-line artefacts that still leak: a known tag's share
    (``"chocolate sauce 41%"`` -> ``"chocolate sauce"``, a cut last one too once a share was seen)
    and the same item repeated (``"toy store 19%, toy store 14%, toy store 1"`` -> ``"toy store"``).
    Anything else (numbers, dates, other lists) is left as generated."""
    known = {n.lower() for n in names}
    parts = [p.strip() for p in text.split(",")]
    cleaned: list[str] = []
    shared = False
    for i, part in enumerate(parts):
        has_share = _SHARE.search(part) is not None
        m = _CUT_SHARE.fullmatch(part)
        cut_last = i == len(parts) - 1 and shared
        if m and m[1].strip().lower() in known and (has_share or cut_last):
            part, shared = m[1].strip(), True
        cleaned.append(part)
    if not shared:
        return text
    return ", ".join(dict.fromkeys(p for p in cleaned if p))


def instruction(options: Sequence[str] | None) -> str:
    """The head of an open-answer prompt. Classification prompts have none: listing the options
    there made SmolLM2 follow its own label prior instead of the demos (measured: a demo label was
    chosen for 32-40% of queries with the option list, 84-92% without)."""
    if options:
        return ""
    return "Each image is described by the top tags of an image classifier. Answer each question in a few words.\n\n"


def build_prompt(
    query_tags: str,
    query_prompt: str,
    demos: Sequence[tuple[str, str, str]],
    options: Sequence[str] | None = None,
) -> str:
    """The few-shot prompt, a pure function of its text parts.

    ``demos`` are ``(tags, prompt, answer)`` in the order given (the student leans on the last one,
    nearest the query). ``Question:`` lines are only written when the prompts differ: a stream that
    asks one question of every image gains nothing from repeating it, and the prompt halves. The
    prompt ends with ``"Answer:"`` so that an option is scored as the continuation ``" <option>\\n"``,
    exactly the tokens a demo's answer line has in the prompt.
    """
    with_question = options is None or any(_one_line(p) != _one_line(query_prompt) for _, p, _ in demos)
    parts = [instruction(options)]
    for tags, prompt, answer in demos:
        question = f"Question: {_one_line(prompt)}\n" if with_question else ""
        parts.append(f"Image: {_one_line(tags)}\n{question}Answer: {_one_line(answer)}\n\n")
    question = f"Question: {_one_line(query_prompt)}\n" if with_question else ""
    parts.append(f"Image: {_one_line(query_tags)}\n{question}Answer:")
    return "".join(parts)


ZERO_SHOT_STYLES = ("plain", "question", "options", "instruction")


def zero_shot_prompt(tags: str, prompt: str, options: Sequence[str], style: str) -> str:
    """The prompt of a classification query without demonstrations. ``plain``: the tags only;
    ``question``: and the question; ``options``: and the options listed; ``instruction``: an
    instruction line naming the options before the tags and the question."""
    listed = ", ".join(_one_line(o) for o in options)
    head = f"Image: {_one_line(tags)}\n"
    if style == "plain":
        return head + "Answer:"
    if style == "question":
        return head + f"Question: {_one_line(prompt)}\nAnswer:"
    if style == "options":
        return head + f"Question: {_one_line(prompt)}\nOptions: {listed}\nAnswer:"
    if style == "instruction":
        return (
            f"Each image is described by the top tags of an image classifier. Answer with one of: {listed}.\n\n"
            + head
            + f"Question: {_one_line(prompt)}\nAnswer:"
        )
    raise SpecError(f"local:smollm2 zero_shot must be one of {', '.join(ZERO_SHOT_STYLES)}, got {style!r}")


def option_continuation(option: str) -> str:
    """A candidate as scored after ``"Answer:"``: with its leading space and the terminating newline.

    The newline makes the model commit that the answer ends there, so an option that is a prefix of a
    longer one ("Boot" / "Boots") gets no credit for the longer one's start.
    """
    return f" {_one_line(option)}\n"


class OnlineCalibration:
    """Contextual calibration without extra forward passes (after Zhao et al., 2021, "Calibrate before
    use"): the running mean of the student's own option log-probabilities over earlier queries is its
    label prior in this prompt format, and is subtracted from each new prediction.

    SmolLM2 favours some label words whatever the image ("Shirt" for 30% of answers on Fashion-MNIST,
    10% true); measured on 150 queries with 2 demos from a 25-demo pool: 0.49 -> 0.57 accuracy. Means
    are kept per option set and per prompt kind (zero-shot or with demos), whose priors differ. The
    first query of a kind is not calibrated. The student logs every update as an event, so a resumed
    run replays the state exactly.
    """

    def __init__(self) -> None:
        self._sum: dict[tuple[tuple[str, ...], bool], np.ndarray] = {}
        self._n: dict[tuple[tuple[str, ...], bool], int] = {}
        self._lock = threading.Lock()

    def peek(self, options: Sequence[str], with_demos: bool, logp: np.ndarray) -> np.ndarray:
        """``logp`` calibrated against the mean so far, without counting it (a query read again)."""
        key = (tuple(options), with_demos)
        with self._lock:
            n = self._n.get(key, 0)
            return logp - self._sum[key] / n if n else logp.copy()

    def __call__(self, options: Sequence[str], with_demos: bool, logp: np.ndarray) -> np.ndarray:
        key = (tuple(options), with_demos)
        with self._lock:
            n = self._n.get(key, 0)
            out = logp - self._sum[key] / n if n else logp.copy()
            self._sum[key] = self._sum.get(key, 0.0) + logp
            self._n[key] = n + 1
        return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def cosines(query_features: np.ndarray, demo_features: Sequence[np.ndarray]) -> np.ndarray:
    """Cosine similarity of the query's features to each demo's."""
    q = query_features / max(float(np.linalg.norm(query_features)), 1e-12)
    return np.array([float(q @ (d / max(float(np.linalg.norm(d)), 1e-12))) for d in demo_features])


def demo_vote(
    query_features: np.ndarray, demo_features: Sequence[np.ndarray], answers: Sequence[str], temperature: float
) -> dict[str, float]:
    """The demos' answers weighted by ``softmax(cos(query, demo) / temperature)`` of the student's own
    image features: what the student sees of how alike the demo images are to the query."""
    options = list(dict.fromkeys(answers))
    w = vote(cosines(query_features, demo_features), answers, options, temperature)
    return dict(zip(options, w.tolist(), strict=True))


# zero-shot readings remembered per query id: the re-run after a teacher call and the teacher's check
# of the student (``learn``) reuse the first pass's
_ZERO_SHOT_CACHE = 256
# zero-shot LM readings kept per prompt (a few hundred bytes each)
RAW_CACHE_SIZE = 100_000
# a shown demo this similar to the query is the same image: its answer is the answer
SAME_IMAGE = 1.0 - 1e-4


class SmolLM2Student:
    """Student ``local:smollm2``: tags each image with ``tagger`` and asks SmolLM2-135M-Instruct.

    Classification queries are answered by mixing two readings:

    - its own zero-shot reading: the LM's option log-likelihoods after the zero-shot prompt (no
      demos), calibrated online (``calibrate``, see ``OnlineCalibration``);
    - the shown demos' vote: their answers weighted by how alike their images are to the query in
      the tagger's features (``mix_temperature``), what the student's vision encoder sees.

    ``p(o) = w(s) vote(o) + (1 - w(s)) zero_shot(o)`` with ``s`` the nearest shown demo's similarity:
    far demos must not overwrite a reading the student gets right alone. ``w(s)`` is learned online
    from the teacher's answers (``learn``; see ``icdistill.mixture.SimilarityMixture``,
    ``mix_bandwidth``, ``mix_prior``), or fixed with ``mix``. The LM does not read the demos: with
    them in its prompt it copied the nearest demo's answer (39 of 39 queries measured), adding
    nothing to the vote and overwriting what it read right alone where the pool lacks a class.

    Open queries are answered by greedy generation with the demos in the prompt, up to the end of
    the line. The model loads on the first ``predict`` (once per instance, thread-safe), unless a
    loaded ``lm=(model, tokenizer)`` is given to share one model between instances.

    Everything the student learns online (calibration, taught queries) is also kept as events
    (``drain_events``) that a resumed run replays (``replay_events``), so a resumed run answers
    exactly as the uninterrupted one. BENCHMARKS.md has the measurements behind the defaults.
    """

    name = "local:smollm2"

    def __init__(
        self,
        tagger: TaggerLike,
        cache_dir: str | None = None,
        max_tags: int = 5,
        max_new_tokens: int = 16,
        device: str = "cpu",
        *,
        lm: tuple[Any, Any] | None = None,
        score: str = "mean",
        calibrate: bool = True,
        mix: float | None = None,
        mix_temperature: float = 0.05,
        mix_bandwidth: float = 0.1,
        mix_prior: float = 0.5,
        shots: int = 2,
        zero_shot: str = "options",
    ) -> None:
        if score not in ("mean", "sum"):
            raise SpecError(f"local:smollm2 score must be 'mean' (length-normalised) or 'sum', got {score!r}")
        if mix is not None and not 0.0 <= mix <= 1.0:
            raise SpecError(f"local:smollm2 mix must be in [0, 1], got {mix}")
        if mix_temperature <= 0:
            raise SpecError(f"local:smollm2 mix_temperature must be > 0, got {mix_temperature}")
        if mix_bandwidth <= 0 or mix_prior <= 0:
            raise SpecError("local:smollm2 mix_bandwidth and mix_prior must be > 0")
        if zero_shot not in ZERO_SHOT_STYLES:
            raise SpecError(
                f"local:smollm2 zero_shot must be one of {', '.join(ZERO_SHOT_STYLES)}, got {zero_shot!r}"
            )
        self.shots = shots
        self.zero_shot = zero_shot
        self.score = score
        self.calibrate = calibrate
        self.mix = mix
        self.mix_temperature = mix_temperature
        self.mix_bandwidth = mix_bandwidth
        self.mix_prior = mix_prior
        self.tagger = tagger
        self.cache_dir = cache_dir
        self.max_tags = max_tags
        self.max_new_tokens = max_new_tokens
        self.device = device
        # a one-slot holder, shared with the twins ``fresh()`` makes, so the LM loads once, lazily
        self._lm: list[tuple[Any, Any] | None] = [lm]
        self._load_lock = threading.Lock()
        self._tags_lock = threading.Lock()
        self._tags: OrderedDict[str, TagsLike] = OrderedDict()
        self._raw_lock = threading.Lock()
        self._raw: OrderedDict[str, np.ndarray] = OrderedDict()  # shared with twins, like the tags
        self._reset_online_state()

    def _reset_online_state(self) -> None:
        self.calibration = OnlineCalibration() if self.calibrate else None
        self.mixture = SimilarityMixture(
            shots=max(1, self.shots),
            temperature=self.mix_temperature,
            bandwidth=self.mix_bandwidth,
            prior=self.mix_prior,
        )
        self._state_lock = threading.RLock()
        # query id -> its zero-shot reading (calibrated once: the re-run after a teacher call reuses it)
        self._zero_shot_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._events: list[list[Any]] = []

    def use_shots(self, shots: int) -> None:
        """The number of demos a run shows (``LoopConfig.shots``): the mixture's checks replay a
        vote of as many."""
        shots = max(1, shots)
        with self._state_lock:
            self.shots = shots
            if self.mixture.shots != shots:
                self.mixture = self.mixture.with_shots(shots)

    def lm(self) -> tuple[Any, Any]:
        """``(model, tokenizer)``, loaded on first use."""
        with self._load_lock:
            if self._lm[0] is None:
                model, tokenizer = load_smollm2(self.cache_dir)
                self._lm[0] = (model.to(self.device), tokenizer)
            return self._lm[0]

    def _tags_of(self, image: Image.Image) -> TagsLike:
        """The tagger's result for an image, cached per image content (demos come back query after query)."""
        key = image_digest(image)
        with self._tags_lock:
            tags = self._tags.get(key)
            if tags is not None:
                self._tags.move_to_end(key)
                return tags
        tags = self.tagger.tag(image)
        with self._tags_lock:
            self._tags[key] = tags
            while len(self._tags) > TAG_CACHE_SIZE:
                self._tags.popitem(last=False)
        return tags

    def describe(self, image: Image.Image | None) -> str:
        """The image's tags as text."""
        return "none" if image is None else self._tags_of(image).describe(self.max_tags)

    def fresh(self) -> SmolLM2Student:
        """A student with the same loaded LM, tagger and options but nothing learned online: each
        run of an experiment starts from the same state, whatever ran before it in the process."""
        twin = copy.copy(self)  # shares the LM holder, its lock and the tag cache
        twin._reset_online_state()
        return twin

    def prompt_for(self, query: Query, demos: Sequence[Demo]) -> str:
        if query.options and not demos:
            return zero_shot_prompt(self.describe(query.image), query.prompt, query.options, self.zero_shot)
        describe = self.describe if query.options else self._open_describe
        shots = [(describe(d.image), d.prompt, d.answer) for d in demos]
        return build_prompt(describe(query.image), query.prompt, shots, query.options)

    def _open_describe(self, image: Image.Image | None) -> str:
        return open_tags(self.describe(image))

    def _clean(self, text: str, query: Query, demos: Sequence[Demo]) -> str:
        """An open answer cleaned of the tag names' artefacts (``clean_open_answer``)."""
        images = (query.image, *(d.image for d in demos))
        names = [name for image in images for name in tag_names(self.describe(image))]
        return clean_open_answer(text, names)

    # ------------------------------------------------------------------ online state, replayable
    def drain_events(self) -> list[list[Any]]:
        """What the student learned since the last call, as JSON-able events (for the run log)."""
        with self._state_lock:
            events, self._events = self._events, []
            return events

    def replay_events(self, events: Sequence[Sequence[Any]]) -> None:
        """Re-learn events an earlier process logged (resume): the state is then exactly as it was."""
        with self._state_lock:
            for ev in events:
                self._apply(ev)

    def _apply(self, ev: Sequence[Any]) -> np.ndarray | None:
        """Apply one event; returns the calibrated log-probabilities of a calibration event."""
        if ev[0] == "calibrate" and self.calibration is not None:
            return self.calibration(tuple(ev[1]), bool(ev[2]), np.asarray(ev[3], dtype=np.float64))
        if ev[0] == "teach":
            self.mixture.teach(ev[1], decode_sketch(ev[2]).astype(np.float32), np.asarray(ev[3]), ev[4])
        return None

    def _record(self, ev: list[Any]) -> np.ndarray | None:
        """Apply an event now and keep it for the log."""
        self._events.append(ev)
        return self._apply(ev)

    def learn(self, query: Query, answer: str) -> None:
        """The teacher's answer to ``query``: the student remembers what it read of it (features and
        zero-shot reading), which checks both of its readings for the mixture's weights."""
        if not query.options or query.image is None or self.mix is not None:
            return
        features = getattr(self._tags_of(query.image), "features", None)
        if features is None:
            return
        options = tuple(dict.fromkeys(query.options))
        # read again if its first pass left the cache (a late label): not counted in the calibration twice
        zero_shot = self._zero_shot_probs(query, options, count=False)
        with self._state_lock:
            # features go to the log as float16: rounded here too, so a replay is exact
            self._record(["teach", list(options), encode_sketch(np.asarray(features)), zero_shot.tolist(), answer])

    # ------------------------------------------------------------------ the experts
    def _zero_shot_probs(self, query: Query, options: Sequence[str], count: bool = True) -> np.ndarray:
        """The LM's calibrated option distribution after the zero-shot prompt, once per query.
        ``count=False``: a reading not counted in the online calibration (nor kept), for a query that
        was counted when first read."""
        with self._state_lock:
            cached = self._zero_shot_cache.get(query.id)
        if cached is not None and len(cached) == len(options):
            return cached
        logp = self._raw_zero_shot(self.prompt_for(query, ()), options)
        with self._state_lock:
            if self.calibration is not None and not count:
                return np.exp(_log_softmax(self.calibration.peek(options, False, logp)))
            if self.calibration is not None:
                calibrated = self._record(["calibrate", list(options), False, logp.tolist()])
                assert calibrated is not None
                logp = _log_softmax(calibrated)
            probs = np.exp(logp)
            self._zero_shot_cache[query.id] = probs
            while len(self._zero_shot_cache) > _ZERO_SHOT_CACHE:
                self._zero_shot_cache.popitem(last=False)
        return probs

    def forget_readings(self) -> None:
        """Drop the cached LM readings (per prompt and per query): for a student whose weights just
        changed (the online LoRA baseline), where a cached reading is the untrained model's."""
        with self._raw_lock:
            self._raw.clear()
        with self._state_lock:
            self._zero_shot_cache.clear()

    def _raw_zero_shot(self, prompt: str, options: Sequence[str]) -> np.ndarray:
        """The LM's option log-probabilities after ``prompt``, a pure function of its text: cached
        across queries and across the twins ``fresh()`` makes (the cells of an evaluation read each
        image once)."""
        key = hashlib.sha1(json.dumps([prompt, list(options)]).encode()).hexdigest()
        with self._raw_lock:
            hit = self._raw.get(key)
            if hit is not None:
                self._raw.move_to_end(key)
                return hit
        model, tokenizer = self.lm()
        scores = score_continuations(
            model, tokenizer, prompt, [option_continuation(o) for o in options], normalise=self.score == "mean"
        )
        logp = _log_softmax(np.asarray(scores, dtype=np.float64))
        logp.flags.writeable = False
        with self._raw_lock:
            self._raw[key] = logp
            while len(self._raw) > RAW_CACHE_SIZE:
                self._raw.popitem(last=False)
        return logp

    def _vote(
        self, query: Query, demos: Sequence[Demo], options: Sequence[str]
    ) -> tuple[np.ndarray, float] | None:
        """The demos' vote over ``options`` and the nearest demo's similarity, in the tagger's
        features; None without demos, images or features."""
        images = [query.image, *[d.image for d in demos]]
        if not demos or any(i is None for i in images):
            return None
        feats = [getattr(self._tags_of(i), "features", None) for i in images]  # type: ignore[arg-type]
        if any(f is None for f in feats):
            return None
        sims = cosines(feats[0], feats[1:])  # once, for the vote and the nearest similarity
        return vote(sims, [d.answer for d in demos], options, self.mix_temperature), float(sims.max())

    def vote_weight(self, options: Sequence[str], similarity: float) -> float:
        """The vote's weight in the mixture at the nearest demo's ``similarity``: ``mix`` when fixed,
        else learned (``SimilarityMixture.vote_weight``)."""
        if self.mix is not None:
            return self.mix
        with self._state_lock:
            return self.mixture.vote_weight(options, similarity)

    def _predict_options(self, query: Query, demos: Sequence[Demo]) -> Prediction:
        options = tuple(dict.fromkeys(query.options or ()))
        zero_shot = self._zero_shot_probs(query, options)
        voted = self._vote(query, demos, options)
        details: dict[str, Any] = {"zero_shot_answer": options[int(np.argmax(zero_shot))]}
        if voted is None:
            probs = zero_shot  # no demos: the LM's own (calibrated) reading, as the student alone
        else:
            vote, similarity = voted
            if self.mix is None:  # against the vote, its reading enters at its fitted temperature
                with self._state_lock:
                    zero_shot = self.mixture.zero_shot(options, zero_shot)
            # a demo of the very same image is its answer (e.g. the re-run after a teacher call)
            w = 1.0 if similarity >= SAME_IMAGE else self.vote_weight(options, similarity)
            probs = w * vote + (1.0 - w) * zero_shot
            details |= {
                "vote_answer": options[int(np.argmax(vote))],
                "vote_weight": round(w, 4),
                "nearest_similarity": round(similarity, 5),
            }
        option_scores = dict(zip(options, np.log(np.maximum(probs, 1e-12)).tolist(), strict=True))
        answer = max(options, key=option_scores.__getitem__)
        return Prediction(answer=answer, option_scores=option_scores, details=details)

    def sample(
        self, query: Query, demos: Sequence[Demo], n: int, temperature: float, seed: int
    ) -> list[str]:
        """``n`` answers to an open question sampled at ``temperature`` (reproducible by ``seed``)."""
        model, tokenizer = self.lm()
        prompt = self.prompt_for(query, demos)
        texts = sample_generations(model, tokenizer, prompt, n, temperature, self.max_new_tokens, seed)
        return [self._clean(t, query, demos) for t in texts]

    def predict(self, query: Query, demos: Sequence[Demo]) -> Prediction:
        start = time.perf_counter()
        if query.options:
            pred = self._predict_options(query, demos)
            pred.seconds = time.perf_counter() - start
            return pred
        model, tokenizer = self.lm()
        prompt = self.prompt_for(query, demos)
        text, logprobs, entropies = generate_with_entropy(
            model, tokenizer, prompt, self.max_new_tokens, stop=["\n"]
        )
        return Prediction(
            answer=self._clean(text, query, demos),
            token_logprobs=logprobs,
            token_entropies=entropies,
            seconds=time.perf_counter() - start,
        )
