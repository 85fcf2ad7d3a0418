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

from icdistill.errors import SpecError
from icdistill.models.packed_scoring import score_continuations_packed
from icdistill.models.precision import parse_dtype
from icdistill.models.scoring import generate_with_entropy, sample_generations
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


# zero-shot LM readings kept per prompt (a few hundred bytes each)
RAW_CACHE_SIZE = 100_000


def _raw_key(prompt: str, options: Sequence[str]) -> str:
    """The key of the LM's option reading after ``prompt`` in the reading cache."""
    return hashlib.sha1(json.dumps([prompt, list(options)]).encode()).hexdigest()


class SmolLM2Student:
    """Student ``local:smollm2``: tags each image with ``tagger`` and asks SmolLM2-135M-Instruct.

    A plain student: classification queries are answered by the LM's option log-likelihoods after the
    prompt, with the demos in it (its ICL reading) or without (its zero-shot reading, in the
    ``zero_shot`` prompt style), calibrated online (``calibrate``, see ``OnlineCalibration``). How far
    to trust either reading against the pool's vote is the engine's judge's business
    (``icdistill.judge``), the same for every student backend.

    Open queries are answered by greedy generation with the demos in the prompt, up to the end of
    the line. The model loads on the first ``predict`` (once per instance, thread-safe), unless a
    loaded ``lm=(model, tokenizer)`` is given to share one model between instances. It loads in
    ``dtype`` (``float32``, ``bfloat16``, ``float16``; default: bf16 where the hardware multiplies it
    natively, an AMX CPU or a GPU, else fp32: ``icdistill.models.precision``); a given ``lm`` is used
    as it is.

    The calibration's updates are kept as events (``drain_events``) that a resumed run replays
    (``replay_events``), so a resumed run answers exactly as the uninterrupted one. BENCHMARKS.md has
    the measurements behind the defaults.
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
        zero_shot: str = "options",
        dtype: str | None = None,
    ) -> None:
        if score not in ("mean", "sum"):
            raise SpecError(f"local:smollm2 score must be 'mean' (length-normalised) or 'sum', got {score!r}")
        if zero_shot not in ZERO_SHOT_STYLES:
            raise SpecError(
                f"local:smollm2 zero_shot must be one of {', '.join(ZERO_SHOT_STYLES)}, got {zero_shot!r}"
            )
        try:
            self.dtype = parse_dtype(dtype, device)  # bf16 where the hardware has it (models/precision.py)
        except ValueError as e:
            raise SpecError(f"local:smollm2 {e}") from None
        self.zero_shot = zero_shot
        self.score = score
        self.calibrate = calibrate
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
        # the readings the last micro-batch read ahead, not used yet: their share of its time
        self._ahead_seconds: dict[str, float] = {}
        self.calibration = OnlineCalibration() if self.calibrate else None
        self._state_lock = threading.RLock()
        self._events: list[list[Any]] = []

    def lm(self) -> tuple[Any, Any]:
        """``(model, tokenizer)``, loaded on first use."""
        with self._load_lock:
            if self._lm[0] is None:
                model, tokenizer = load_smollm2(self.cache_dir)
                self._lm[0] = (model.to(self.device, dtype=self.dtype), tokenizer)
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
        return None

    def _record(self, ev: list[Any]) -> np.ndarray | None:
        """Apply an event now and keep it for the log."""
        self._events.append(ev)
        return self._apply(ev)

    # ------------------------------------------------------------------ the readings
    def forget_readings(self) -> None:
        """Drop the cached LM readings: for a student whose weights just changed (the online LoRA
        baseline), where a cached reading is the untrained model's."""
        with self._raw_lock:
            self._raw.clear()
            self._ahead_seconds.clear()

    def _raw_scores(self, prompt: str, options: Sequence[str]) -> np.ndarray:
        """The LM's option log-probabilities after ``prompt``, a pure function of its text: cached
        across queries and across the twins ``fresh()`` makes (the cells of an evaluation read each
        image once)."""
        key = _raw_key(prompt, options)
        with self._raw_lock:
            hit = self._raw.get(key)
            if hit is not None:
                self._raw.move_to_end(key)
                return hit
        model, tokenizer = self.lm()
        scores = score_continuations_packed(
            model,
            tokenizer,
            [(prompt, [option_continuation(o) for o in options])],
            normalise=self.score == "mean",
        )[0]
        return self._keep_raw(key, scores)

    def _keep_raw(self, key: str, scores: Sequence[float]) -> np.ndarray:
        logp = _log_softmax(np.asarray(scores, dtype=np.float64))
        logp.flags.writeable = False
        with self._raw_lock:
            self._raw[key] = logp
            while len(self._raw) > RAW_CACHE_SIZE:
                self._raw.popitem(last=False)
        return logp

    def _options_prediction(self, options: tuple[str, ...], with_demos: bool, logp: np.ndarray) -> Prediction:
        """The prediction from raw option log-probabilities, calibrated online (an event)."""
        if self.calibration is not None:
            with self._state_lock:
                calibrated = self._record(["calibrate", list(options), with_demos, logp.tolist()])
            assert calibrated is not None
            logp = _log_softmax(calibrated)
        option_scores = dict(zip(options, logp.tolist(), strict=True))
        answer = max(options, key=option_scores.__getitem__)
        return Prediction(answer=answer, option_scores=option_scores)

    def _predict_options(self, query: Query, demos: Sequence[Demo]) -> Prediction:
        options = tuple(dict.fromkeys(query.options or ()))
        prompt = self.prompt_for(query, demos)
        pred = self._options_prediction(options, bool(demos), self._raw_scores(prompt, options))
        with self._raw_lock:  # a reading read ahead in a micro-batch: its share of that batch's time
            pred.seconds = self._ahead_seconds.pop(_raw_key(prompt, options), 0.0)
        return pred

    def sample(self, query: Query, demos: Sequence[Demo], n: int, temperature: float, seed: int) -> list[str]:
        """``n`` answers to an open question sampled at ``temperature`` (reproducible by ``seed``)."""
        model, tokenizer = self.lm()
        prompt = self.prompt_for(query, demos)
        texts = sample_generations(model, tokenizer, prompt, n, temperature, self.max_new_tokens, seed)
        return [self._clean(t, query, demos) for t in texts]

    def prefetch(self, queries: Sequence[Query], demos_lists: Sequence[Sequence[Demo]]) -> None:
        """Read a micro-batch's option readings ahead (``--batch``): those not cached yet go through the
        LM in one packed forward (``score_continuations_packed``) into the reading cache. Nothing
        online changes (the calibration is applied when ``predict`` asks); each reading's share of the
        batch's time is counted in the prediction that first uses it. Open queries are not read ahead."""
        start = time.perf_counter()
        with self._raw_lock:  # a share only means something within its own batch
            self._ahead_seconds.clear()
        todo: dict[str, tuple[str, tuple[str, ...]]] = {}
        for q, demos in zip(queries, demos_lists, strict=True):
            if q.options:
                prompt, options = self.prompt_for(q, demos), tuple(dict.fromkeys(q.options))
                key = _raw_key(prompt, options)
                with self._raw_lock:
                    cached = key in self._raw
                if not cached:
                    todo[key] = (prompt, options)
        if not todo:
            return
        model, tokenizer = self.lm()
        prompts = [(p, [option_continuation(o) for o in opts]) for p, opts in todo.values()]
        scores = score_continuations_packed(model, tokenizer, prompts, normalise=self.score == "mean")
        share = (time.perf_counter() - start) / len(todo)
        for key, row in zip(todo, scores, strict=True):
            self._keep_raw(key, row)
            with self._raw_lock:
                self._ahead_seconds[key] = share

    def predict_batch(
        self, queries: Sequence[Query], demos_lists: Sequence[Sequence[Demo]]
    ) -> list[Prediction]:
        """``predict`` for a micro-batch: ``prefetch``, then each query answered as ``predict`` answers
        it, in order (the calibration's events too)."""
        self.prefetch(queries, demos_lists)
        return [self.predict(q, demos) for q, demos in zip(queries, demos_lists, strict=True)]

    def predict(self, query: Query, demos: Sequence[Demo]) -> Prediction:
        start = time.perf_counter()
        if query.options:
            pred = self._predict_options(query, demos)
            pred.seconds += time.perf_counter() - start
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
