"""The ``hf:`` backend: a Hugging Face VLM (Idefics3/SmolVLM, Qwen2-VL/Qwen2.5-VL, LLaVA-OneVision) as
student (in-context label scoring or greedy answers) and teacher (sampled answers), with interleaved images.

This is the shared core (prompts, option scoring, generation); loading is ``hf_load``, and each family's
quirks are one module each: ``hf_smolvlm`` (image sizing and tiling), ``hf_qwen2_vl`` (3-D rotary
positions), ``hf_llava_onevision``."""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import time
import zlib
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from icdistill.errors import DataError, ICDError
from icdistill.models import hf_qwen2_vl, hf_smolvlm
from icdistill.models.hf_load import (
    HFOptions,
    LoadedVLM,
    load,
)
from icdistill.models.readahead import ReadAhead
from icdistill.models.registry import ModelContext, Spec
from icdistill.models.scoring import (
    continuation_batch,
    keep_positions,
    last_token_logits,
    score_after_prefixes,
)
from icdistill.models.vision_cache import cache_image_features
from icdistill.teacher import match_option
from icdistill.types import Demo, Prediction, Query, TeacherResponse, Usage

log = logging.getLogger(__name__)

# Marks where an answer goes when the chat template is rendered with a placeholder answer.
_SENTINEL = "\x00ANSWER\x00"


def options_line(options: Sequence[str]) -> str:
    return f"Answer with one of: {', '.join(options)}."


def fit_image(image: Image.Image, max_side: int | None, max_pixels: int | None) -> Image.Image:
    """RGB copy of ``image`` shrunk (never enlarged) to the size limits, keeping its aspect ratio."""
    img = image.convert("RGB")
    w, h = img.size
    scale = 1.0
    if max_side:
        scale = min(scale, max_side / max(w, h))
    if max_pixels:
        scale = min(scale, math.sqrt(max_pixels / (w * h)))
    if scale < 1.0:
        img = img.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.Resampling.BICUBIC)
    return img


class HFVisionLanguageModel:
    """Student and teacher over one Hugging Face VLM.

    A prompt is the chat template applied to: each demonstration as a user turn (image, prompt) and an
    assistant turn (its answer), then the query as the last user turn, then the assistant-turn start.
    """

    def __init__(self, name: str, loaded: LoadedVLM, opts: HFOptions, seed: int = 0) -> None:
        self.name = name
        self.loaded = loaded
        self.opts = opts
        self.seed = seed
        self.family = loaded.family
        self._ahead = ReadAhead()
        self.model = loaded.model
        # a demo's image is in every prompt that shows the demo: its vision features are computed once
        self.image_cache = cache_image_features(self.model, opts.image_cache, self.family)
        self.processor = loaded.processor
        self.tokenizer = loaded.processor.tokenizer
        self._answer_lead, self._turn_end = self._template_answer_frame()
        self._eos = self._eos_ids()

    # -- prompt -----------------------------------------------------------------------------------

    def _user_turn(self, image: Image.Image | None, text: str) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"type": "image"}] if image is not None else []
        content.append({"type": "text", "text": text})
        return {"role": "user", "content": content}

    @staticmethod
    def _assistant_turn(text: str) -> dict[str, Any]:
        return {"role": "assistant", "content": [{"type": "text", "text": text}]}

    def query_text(self, query: Query, with_options: bool = True) -> str:
        if with_options and query.options:
            return f"{query.prompt}\n{options_line(query.options)}"
        return query.prompt

    def render_messages(self, query: Query, demos: Sequence[Demo] = ()) -> list[dict[str, Any]]:
        """Chat messages: (user: demo image + prompt, assistant: demo answer) per demo, then the query."""
        messages: list[dict[str, Any]] = []
        for d in demos:
            # A demo looks like the query it precedes: it gets the same options line when its answer
            # is one of them (demos come from the same stream), so the model sees the task's format.
            text = d.prompt
            if query.options and d.answer in query.options:
                text = f"{d.prompt}\n{options_line(query.options)}"
            messages.append(self._user_turn(d.image, text))
            messages.append(self._assistant_turn(d.answer))
        messages.append(self._user_turn(query.image, self.query_text(query)))
        return messages

    def images(self, query: Query, demos: Sequence[Demo] = ()) -> list[Image.Image]:
        """The prompt's images in prompt order (demos first, query last), resized to the limits."""
        raw = [d.image for d in demos if d.image is not None]
        if query.image is not None:
            raw.append(query.image)
        return [fit_image(im, self.opts.max_side, self.opts.max_pixels) for im in raw]

    def render_prompt(self, query: Query, demos: Sequence[Demo] = ()) -> str:
        """The prompt text up to and including the assistant-turn start (image placeholders unexpanded)."""
        return self.processor.apply_chat_template(
            self.render_messages(query, demos), add_generation_prompt=True, tokenize=False
        )

    def _template_answer_frame(self) -> tuple[str, str]:
        """What the template puts between the assistant-turn start and an answer (e.g. a space for
        SmolVLM's ``Assistant:``), and the text that ends an assistant turn (``<end_of_utterance>``)."""
        q = Query(id="_", image=None, prompt="Q")
        messages = self.render_messages(q)
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        full = self.processor.apply_chat_template(
            [*messages, self._assistant_turn(_SENTINEL)], add_generation_prompt=False, tokenize=False
        )
        at = full.find(_SENTINEL)
        lead = full[len(prompt) : at] if full.startswith(prompt) and at >= len(prompt) else ""
        return lead, full[at + len(_SENTINEL) :] if at >= 0 else ""

    def _image_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.family == "idefics3":
            kwargs = hf_smolvlm.image_kwargs(self.processor.image_processor, self.opts)
        return kwargs

    def context_limit(self) -> int | None:
        """Tokens a prompt and its answer may take: ``max_context``, else the text model's positions."""
        if self.opts.max_context:
            return self.opts.max_context
        config = self.model.config
        text_config = getattr(config, "text_config", None) or config
        value = getattr(text_config, "max_position_embeddings", None)
        return int(value) if isinstance(value, int) and value > 0 else None

    def build_inputs(self, query: Query, demos: Sequence[Demo] = (), reserve: int = 0) -> Any:
        """Processor output for the prompt (ids, pixel values in prompt order, ...), on the model's device.

        The prompt plus ``reserve`` tokens (the answer) must fit the context: demos are dropped from the
        start of the prompt until it does (the loop puts the most similar demo last, so these are the
        least similar), with a warning.
        """
        kept = list(demos)
        limit = self.context_limit()
        while True:
            inputs = self._encode(query, kept)
            length = int(inputs["input_ids"].shape[1])
            if limit is None or length + reserve <= limit or not kept:
                break
            kept = kept[1:]
        if len(kept) < len(demos):
            log.warning(
                "%s: query %s: dropped %d of %d demos to fit the context of %d tokens (prompt %d + answer %d)",
                self.name, query.id, len(demos) - len(kept), len(demos), limit, length, reserve,
            )  # fmt: skip
        if limit is not None and length + reserve > limit:
            raise DataError(
                f"query {query.id}: the prompt takes {length} tokens, over the context of {limit} even without "
                f"demos (lower max_side/max_pixels or raise max_context)"
            )
        return inputs

    def _encode(self, query: Query, demos: Sequence[Demo]) -> Any:
        text = self.render_prompt(query, demos)
        images = self.images(query, demos)
        kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt", "add_special_tokens": False}
        if images:
            # one sample with all its images: multi-image mode for every family
            kwargs["images"] = [images]
            kwargs.update(self._image_kwargs())
        inputs = self.processor(**kwargs)
        return inputs.to(self.loaded.device, dtype=self.model.dtype)

    # -- forward helpers ------------------------------------------------------------------------------

    def _forward(
        self, inputs: dict[str, Any], cache: Any = None, logits_to_keep: int = 0
    ) -> tuple[torch.Tensor, Any]:
        params = inspect.signature(self.model.forward).parameters
        kwargs = dict(inputs)
        kwargs["use_cache"] = True
        if cache is not None:
            # transformers 5 renamed past_key_values to cache; 4.57 is still allowed
            kwargs["cache" if "cache" in params else "past_key_values"] = cache
        if logits_to_keep and "logits_to_keep" in params:
            kwargs["logits_to_keep"] = logits_to_keep
        out = self.model(**kwargs)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = getattr(out, "past_key_values", None)
        return out.logits, new_cache

    def _mrope_positions(self, inputs: dict[str, Any]) -> tuple[torch.Tensor | None, int]:
        """Qwen2-VL's 3-D rotary positions of the prefix and the offset of the text after it."""
        return hf_qwen2_vl.mrope_positions(self.model, inputs)

    def _end_of_turn_ids(self) -> list[int]:
        """The token that ends an assistant turn (``<end_of_utterance>``, ``<|im_end|>``), else EOS."""
        if self._turn_end.strip():
            end = self.tokenizer(self._turn_end, add_special_tokens=False).input_ids
            if end and end[0] in set(self.tokenizer.all_special_ids):
                return [end[0]]
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return [eos] if isinstance(eos, int) else []

    def option_token_ids(self, options: Sequence[str]) -> list[list[int]]:
        """Each option as the template would write it after the assistant-turn start, tokenized, with
        the end-of-turn token: the model must also say the answer ends there, so an option that is a
        prefix of another ("dark" / "dark green") does not get the longer one's credit."""
        end = self._end_of_turn_ids()
        out = []
        for o in options:
            ids = list(self.tokenizer(self._answer_lead + o, add_special_tokens=False).input_ids)
            if not ids:
                raise DataError(f"option {o!r} encodes to no tokens; it cannot be scored")
            out.append(ids + end)
        return out

    def _pad_id(self) -> int:
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(self.tokenizer, name, None)
            if isinstance(value, int):
                return value
        return 0

    @torch.inference_mode()
    def score_options(self, query: Query, demos: Sequence[Demo] = ()) -> dict[str, float]:
        """Mean token log-likelihood of each option as the answer, from one prefix forward (images
        included) and one batched forward of all continuations over the prefix's KV cache."""
        options = list(dict.fromkeys(query.options or ()))
        if not options:
            raise DataError(f"query {query.id}: no options to score")
        cont = self.option_token_ids(options)
        inputs = self.build_inputs(query, demos, reserve=max(len(c) for c in cont))
        n_prefix = inputs["input_ids"].shape[1]
        positions, delta = self._mrope_positions(inputs)
        prefix_inputs = dict(inputs)
        if positions is not None:
            prefix_inputs["position_ids"] = positions
        logits, prefix_cache = self._forward(prefix_inputs, logits_to_keep=1)
        first = torch.log_softmax(logits[0, -1].float(), dim=-1)
        device = first.device

        scores: list[float] = []
        step = self.opts.max_batch
        chunks = [cont[i : i + step] for i in range(0, len(cont), step)]
        for ci, chunk in enumerate(chunks):
            sums = first[torch.tensor([c[0] for c in chunk], device=device)].double()
            # A continuation's last token is only a target, so it is never fed.
            width = max(len(c) for c in chunk) - 1
            if width > 0:
                b = len(chunk)
                ids, targets, valid = continuation_batch(chunk, self._pad_id(), device)
                # The forward appends to the cache it gets: the last chunk may consume the prefix cache.
                cache = prefix_cache if ci == len(chunks) - 1 else copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(b)
                mask = torch.cat(
                    [torch.ones((b, n_prefix), dtype=torch.long, device=device), valid.long()], dim=1
                )
                pos = (n_prefix + delta + torch.arange(width, device=device)).unsqueeze(0).expand(b, width)
                if positions is not None:
                    pos = pos.unsqueeze(0).expand(3, b, width)  # text tokens: all three M-RoPE axes equal
                batch = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
                out, _ = self._forward(batch, cache=cache)
                picked = torch.log_softmax(out.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                sums = sums + (picked * valid).sum(dim=1).double()
            lengths = torch.tensor([len(c) for c in chunk], device=device, dtype=torch.float64)
            scores.extend((sums / lengths).tolist())
        return dict(zip(options, scores, strict=True))

    @torch.inference_mode()
    def score_options_unbatched(self, query: Query, demos: Sequence[Demo] = ()) -> dict[str, float]:
        """Reference for ``score_options``: one full forward (images included) per option, same token ids."""
        options = list(dict.fromkeys(query.options or ()))
        cont = self.option_token_ids(options)
        inputs = self.build_inputs(query, demos, reserve=max(len(c) for c in cont))
        n_prefix = inputs["input_ids"].shape[1]
        out: dict[str, float] = {}
        for option, c in zip(options, cont, strict=True):
            full = dict(inputs)
            extra = torch.tensor([c], device=inputs["input_ids"].device)
            full["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
            full["attention_mask"] = torch.ones_like(full["input_ids"])
            if "mm_token_type_ids" in full:
                zeros = torch.zeros_like(extra, dtype=full["mm_token_type_ids"].dtype)
                full["mm_token_type_ids"] = torch.cat([full["mm_token_type_ids"], zeros], dim=1)
            logits = self.model(**full, use_cache=False).logits[0].float()
            logp = torch.log_softmax(logits[n_prefix - 1 : n_prefix - 1 + len(c)], dim=-1)
            out[option] = float(logp[torch.arange(len(c)), extra[0]].double().mean())
        return out

    # -- micro-batches (``--batch``) ------------------------------------------------------------------------

    # families whose processor outputs this backend pads into one batch itself (their image tensors
    # carry a per-sample dimension); the others answer a batch one query at a time
    BATCHED_FAMILIES = ("idefics3",)

    def _collate(self, encoded: Sequence[Any]) -> dict[str, Any]:
        """One batch of several prompts' processor outputs: token rows padded on the right (the pad
        id, mask 0), per-sample image tensors padded with all-zero images (which Idefics3 drops)."""
        out: dict[str, Any] = {}
        for key in encoded[0]:
            values = [e[key] for e in encoded]
            shape = [max(v.shape[d] for v in values) for d in range(values[0].dim())]
            fill = self._pad_id() if key == "input_ids" else 0
            padded = []
            for v in values:
                grow = [shape[d] - v.shape[d] for d in range(v.dim())]
                if any(grow):
                    pad: list[int] = []
                    for g in reversed(grow):
                        pad += [0, g]
                    v = torch.nn.functional.pad(v, pad, value=fill)
                padded.append(v)
            out[key] = torch.cat(padded, dim=0)
        return out

    @torch.inference_mode()
    def score_options_batch(
        self, queries: Sequence[Query], demos_lists: Sequence[Sequence[Demo]]
    ) -> list[dict[str, float]]:
        """``score_options`` for several queries in one batched pass: the prompts (images included)
        right-padded into one prefix forward, then every query's options in one forward over its
        prefix's cache row (``scoring.score_after_prefixes``). Equal to ``score_options`` per query
        within float tolerance."""
        options = [list(dict.fromkeys(q.options or ())) for q in queries]
        for q, o in zip(queries, options, strict=True):
            if not o:
                raise DataError(f"query {q.id}: no options to score")
        conts = [self.option_token_ids(o) for o in options]
        encoded = [
            self.build_inputs(q, d, reserve=max(len(c) for c in cs))
            for q, d, cs in zip(queries, demos_lists, conts, strict=True)
        ]
        lengths = [int(e["input_ids"].shape[1]) for e in encoded]
        inputs = self._collate(encoded)
        keep, kept = keep_positions(self.model, lengths)
        out = self.model(**inputs, use_cache=True, **keep)
        cache = getattr(out, "cache", None) or out.past_key_values
        first = torch.log_softmax(last_token_logits(out.logits, kept, lengths).float(), dim=-1)
        rows = score_after_prefixes(
            lambda batch, c: self._forward(batch, cache=c),
            first,
            cache,
            inputs["attention_mask"],
            conts,
            self._pad_id(),
            lengths,
        )
        return [dict(zip(o, r, strict=True)) for o, r in zip(options, rows, strict=True)]

    def predict_batch(
        self, queries: Sequence[Query], demos_lists: Sequence[Sequence[Demo]]
    ) -> list[Prediction]:
        """``predict`` for a micro-batch: option questions of a batched family in one batched pass
        (``score_options_batch``); open questions, and other families, one by one. Each prediction's
        ``seconds`` is its share of the batch's time."""
        t0 = time.perf_counter()
        batched = [i for i, q in enumerate(queries) if q.options and self.family in self.BATCHED_FAMILIES]
        preds: list[Prediction | None] = [None] * len(queries)
        if len(batched) > 1:
            scores = self.score_options_batch(
                [queries[i] for i in batched], [demos_lists[i] for i in batched]
            )
            for i, s in zip(batched, scores, strict=True):
                preds[i] = Prediction(answer=max(s, key=s.__getitem__), option_scores=s)
        done = [
            p if p is not None else self.predict(q, d)
            for p, q, d in zip(preds, queries, demos_lists, strict=True)
        ]
        share = (time.perf_counter() - t0) / max(1, len(done))
        for p in done:
            p.seconds = share
        return done

    # -- generation ------------------------------------------------------------------------------------

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        candidates: list[Any] = [getattr(self.tokenizer, "eos_token_id", None)]
        gen_config = getattr(self.model, "generation_config", None)
        if gen_config is not None:
            candidates.append(getattr(gen_config, "eos_token_id", None))
        # The token that ends an assistant turn in this template (<end_of_utterance>, <|im_end|>)
        if self._turn_end.strip():
            end = self.tokenizer(self._turn_end, add_special_tokens=False).input_ids
            if end and end[0] in set(self.tokenizer.all_special_ids):
                candidates.append(end[0])
        for c in candidates:
            for x in c if isinstance(c, list | tuple) else [c]:
                if isinstance(x, int) and x not in ids:
                    ids.append(x)
        return ids

    @contextlib.contextmanager
    def _plain_generation_defaults(self) -> Any:
        """generate() fills every knob left unset from the checkpoint's generation_config (top_p=0.001,
        min_p, no_repeat_ngram_size, ...); with a plain one in its place only ours apply, on every
        transformers version (4.x merges values equal to the defaults, 5.x unset ones)."""
        from transformers import GenerationConfig

        saved = self.model.generation_config
        ids = {k: getattr(saved, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        self.model.generation_config = GenerationConfig(**{k: v for k, v in ids.items() if v is not None})
        try:
            yield
        finally:
            self.model.generation_config = saved

    def _generate(self, inputs: Any, n: int, temperature: float, seed: int, scores: bool = True) -> Any:
        """``scores=False`` (teacher samples: only the text is used) skips the full-vocabulary logits
        kept per step and sample, which reach gigabytes for large vocabularies and N samples."""
        from transformers import GenerationConfig

        eos = self._eos
        sampling = temperature > 0
        # Every sampling knob is set: generate() fills unset ones from the checkpoint's
        # generation_config (Qwen2-VL ships top_k=1, temperature=0.01, i.e. sampling would be greedy).
        # Greedy gets the library defaults, which generate() does not warn about.
        config = GenerationConfig(
            max_new_tokens=self.opts.max_new_tokens,
            do_sample=sampling,
            temperature=temperature if sampling else 1.0,
            top_p=self.opts.top_p if sampling else 1.0,
            top_k=0 if sampling else 50,
            repetition_penalty=1.0,
            num_return_sequences=n,
            eos_token_id=eos or None,
            pad_token_id=self._pad_id(),
            output_logits=scores,
            return_dict_in_generate=True,
        )
        device = self.loaded.device
        devices = [] if device in ("cpu", "mps") else [torch.device(device).index or 0]
        # fork_rng: reproducible samples per (seed, query) without touching the caller's RNG state
        with (
            torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"),
            self._plain_generation_defaults(),
        ):
            torch.manual_seed(seed)
            return self.model.generate(**inputs, generation_config=config)

    def _split_outputs(self, gen: Any, n_prefix: int) -> list[tuple[str, list[float], list[float], int]]:
        """Per returned sequence: text, token log-probs, token entropies, tokens generated (with EOS).
        Without logits in ``gen`` (generated with ``scores=False``) the log-probs and entropies are empty."""
        eos = set(self._eos)
        logp = entropy = None
        if getattr(gen, "logits", None):
            logits = torch.stack(gen.logits, dim=1).float()  # (n, steps, vocab)
            logp = torch.log_softmax(logits, dim=-1)
            entropy = -(logp.exp() * logp).nan_to_num(0.0).sum(-1)
        out = []
        for i, seq in enumerate(gen.sequences[:, n_prefix:].tolist()):
            end = next((j for j, t in enumerate(seq) if t in eos), len(seq))
            # stats run through the token that ended the answer: how sure the model is that the answer
            # stops there is part of its uncertainty, and an immediately stopped answer keeps one value
            stop = min(end + 1, len(seq))
            lps = [float(logp[i, j, seq[j]]) for j in range(stop)] if logp is not None else []
            ents = [float(entropy[i, j]) for j in range(stop)] if entropy is not None else []
            text = self.tokenizer.decode(seq[:end], skip_special_tokens=True).strip()
            out.append((text, lps, ents, stop))
        return out

    @torch.inference_mode()
    def generate(self, query: Query, demos: Sequence[Demo] = ()) -> tuple[str, list[float], list[float]]:
        """Greedy answer with per-token log-probabilities and entropies (nats)."""
        inputs = self.build_inputs(query, demos, reserve=self.opts.max_new_tokens)
        gen = self._generate(inputs, 1, 0.0, self.seed)
        text, lps, ents, _ = self._split_outputs(gen, inputs["input_ids"].shape[1])[0]
        return text, lps, ents

    # -- protocols -------------------------------------------------------------------------------------

    def prefetch(self, queries: Sequence[Query], demos_lists: Sequence[Sequence[Demo]]) -> None:
        """Read a micro-batch's passes ahead (``predict_batch``); ``predict`` with the same query and
        demos then takes its prediction (``icdistill.models.readahead``)."""
        self._ahead.keep(queries, demos_lists, self.predict_batch(queries, demos_lists))

    def predict(self, query: Query, demos: Sequence[Demo]) -> Prediction:
        ahead = self._ahead.take(query, demos)
        if ahead is not None:
            return ahead
        t0 = time.perf_counter()
        if query.options:
            scores = self.score_options(query, demos)
            answer = max(scores, key=scores.__getitem__)
            return Prediction(answer=answer, option_scores=scores, seconds=time.perf_counter() - t0)
        text, lps, ents = self.generate(query, demos)
        return Prediction(
            answer=text, token_logprobs=lps, token_entropies=ents, seconds=time.perf_counter() - t0
        )

    @torch.inference_mode()
    def sample(self, query: Query, n: int) -> TeacherResponse:
        """``n`` zero-shot sampled answers; for classification each is mapped to the option it names."""
        if n < 1:
            raise ICDError("sample needs n >= 1")
        inputs = self.build_inputs(query, (), reserve=self.opts.max_new_tokens)
        n_prefix = inputs["input_ids"].shape[1]
        temperature = self.opts.temperature
        seed = (self.seed * 1_000_003 + zlib.crc32(query.id.encode())) % (2**31)
        gen = self._generate(inputs, n if temperature > 0 else 1, temperature, seed, scores=False)
        outs = self._split_outputs(gen, n_prefix)
        if temperature <= 0:
            outs = outs * n  # greedy: n copies of one answer
        answers = []
        for text, *_ in outs:
            hit = match_option(text, query.options) if query.options else None
            answers.append(hit if hit is not None else text)
        completion = sum(o[3] for o in outs[: n if temperature > 0 else 1])
        return TeacherResponse(
            answers=answers, usage=Usage(calls=1, prompt_tokens=n_prefix, completion_tokens=completion)
        )


def from_spec(spec: Spec, role: str, ctx: ModelContext) -> HFVisionLanguageModel:
    """Registry entry point: one object serves as Student and Teacher; weights are shared per context."""
    opts = HFOptions.from_spec(spec)
    key = f"hf-weights:{spec.target}|{opts.dtype}|{opts.device}|{opts.attn}|{opts.local_files_only}"
    loaded = ctx.get_or_create(key, lambda: load(spec.target, opts))
    return HFVisionLanguageModel(f"hf:{spec.target}", loaded, opts, seed=ctx.seed)
