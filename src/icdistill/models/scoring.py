"""Causal-LM helpers shared by local backends: label log-likelihood scoring over a shared, KV-cached
prefix, and greedy or sampled generation with per-token log-probabilities and entropies."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any

import torch

# Default number of continuations per batched forward; above it the prefix cache is copied per chunk
# so that memory (batch x length x vocab logits) stays bounded.
DEFAULT_MAX_BATCH = 64


def encode_prefix(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt, with the tokenizer's own special tokens (a BOS where the model uses one)."""
    return list(tokenizer(text).input_ids)


def encode_continuation(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a continuation, without special tokens: it is appended to an encoded prefix."""
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _forward(
    model: Any,
    input_ids: torch.Tensor,
    *,
    cache: Any = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    logits_to_keep: int = 0,
) -> tuple[torch.Tensor, Any]:
    """One forward with a KV cache; returns (logits, cache).

    transformers 5 renamed ``past_key_values`` to ``cache`` (and its output field); the project still
    allows 4.57, so the keyword is picked from the model's signature.
    """
    params = inspect.signature(model.forward).parameters
    kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": True}
    if cache is not None:
        kwargs["cache" if "cache" in params else "past_key_values"] = cache
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if logits_to_keep and "logits_to_keep" in params:
        kwargs["logits_to_keep"] = logits_to_keep
    out = model(**kwargs)
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = out.past_key_values
    return out.logits, new_cache


def _check_inputs(prefix_ids: Sequence[int], continuation_ids: Sequence[Sequence[int]]) -> None:
    if not prefix_ids:
        raise ValueError("the prefix must encode to at least one token (nothing predicts the first token)")
    for i, c in enumerate(continuation_ids):
        if not c:
            raise ValueError(f"continuation {i} encodes to no tokens; its mean log-likelihood is undefined")


def continuation_batch(
    chunk: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (inputs, targets, valid) for continuations fed after a cached prefix.

    A continuation's first token is scored by the prefix's last logits and its last token is only a
    target, so row i feeds ``c[:-1]`` and predicts ``c[1:]``.
    """
    width = max(len(c) for c in chunk) - 1
    inputs = torch.full((len(chunk), width), pad_id, dtype=torch.long, device=device)
    targets = torch.zeros((len(chunk), width), dtype=torch.long, device=device)
    valid = torch.zeros((len(chunk), width), dtype=torch.bool, device=device)
    for row, c in enumerate(chunk):
        n = len(c) - 1
        if n:
            inputs[row, :n] = torch.tensor(list(c[:-1]), device=device)
            targets[row, :n] = torch.tensor(list(c[1:]), device=device)
            valid[row, :n] = True
    return inputs, targets, valid


@torch.inference_mode()
def score_token_ids(
    model: Any,
    prefix_ids: Sequence[int],
    continuation_ids: Sequence[Sequence[int]],
    pad_id: int = 0,
    max_batch: int = DEFAULT_MAX_BATCH,
    normalise: bool = True,
) -> list[float]:
    """Mean (``normalise``, else total) per-token log-likelihood of each continuation after the prefix (token-id level).

    One forward of the prefix fills a KV cache; its last logits score every continuation's first
    token. The rest of all continuations goes through one batched forward (per ``max_batch`` chunk)
    that reuses the prefix cache expanded to the batch: right-padded, masked, positions continuing
    after the prefix. A continuation's last token is only a target, so it is never fed.
    """
    _check_inputs(prefix_ids, continuation_ids)
    if not continuation_ids:
        return []
    device = _device(model)
    n_prefix = len(prefix_ids)
    logits, prefix_kv = _forward(model, torch.tensor([list(prefix_ids)], device=device), logits_to_keep=1)
    first = torch.log_softmax(logits[0, -1].float(), dim=-1)

    totals: list[float] = []
    chunks = [continuation_ids[i : i + max_batch] for i in range(0, len(continuation_ids), max_batch)]
    for ci, chunk in enumerate(chunks):
        sums = first[torch.tensor([c[0] for c in chunk], device=device)].double()
        width = max(len(c) for c in chunk) - 1
        if width > 0:
            b = len(chunk)
            inputs, targets, valid = continuation_batch(chunk, pad_id, device)
            # The batched forward appends to the cache it is given; the last chunk may consume the
            # prefix cache itself, earlier ones work on a copy.
            cache = prefix_kv if ci == len(chunks) - 1 else copy.deepcopy(prefix_kv)
            cache.batch_repeat_interleave(b)
            mask = torch.cat(
                [torch.ones((b, n_prefix), dtype=torch.long, device=device), valid.long()], dim=1
            )
            positions = (n_prefix + torch.arange(width, device=device)).unsqueeze(0).expand(b, width)
            out, _ = _forward(model, inputs, cache=cache, attention_mask=mask, position_ids=positions)
            logp = torch.log_softmax(out.float(), dim=-1)
            picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            sums = sums + (picked * valid).sum(dim=1).double()
        if normalise:
            sums = sums / torch.tensor([len(c) for c in chunk], device=device)
        totals.extend(sums.tolist())
    return totals


@torch.inference_mode()
def score_token_ids_naive(
    model: Any, prefix_ids: Sequence[int], continuation_ids: Sequence[Sequence[int]]
) -> list[float]:
    """Reference for ``score_token_ids``: one full forward of prefix + continuation per continuation."""
    _check_inputs(prefix_ids, continuation_ids)
    device = _device(model)
    n_prefix = len(prefix_ids)
    out = []
    for c in continuation_ids:
        ids = torch.tensor([list(prefix_ids) + list(c)], device=device)
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), dim=-1)
        # the token at position n_prefix + i is predicted by the logits at n_prefix + i - 1
        rows = torch.arange(n_prefix - 1, n_prefix - 1 + len(c), device=device)
        out.append(float(logp[rows, torch.tensor(list(c), device=device)].double().mean()))
    return out


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def score_continuations(
    model: Any,
    tokenizer: Any,
    prefix: str,
    continuations: Sequence[str],
    max_batch: int = DEFAULT_MAX_BATCH,
    normalise: bool = True,
) -> list[float]:
    """Length-normalised (mean per token; total with ``normalise=False``) log-likelihood of each
    continuation after ``prefix``.

    Prefix and continuations are tokenized separately and their ids concatenated, so the caller
    decides the boundary (e.g. prefix ``"Answer:"``, continuations ``" Sandal\\n"``).
    """
    prefix_ids = encode_prefix(tokenizer, prefix)
    ids = [encode_continuation(tokenizer, c) for c in continuations]
    return score_token_ids(
        model,
        prefix_ids,
        ids,
        pad_id=_pad_id(tokenizer),
        max_batch=max_batch,
        normalise=normalise,
    )


def score_continuations_naive(
    model: Any, tokenizer: Any, prefix: str, continuations: Sequence[str]
) -> list[float]:
    """``score_continuations`` with one full forward per continuation (same token ids): for tests and benchmarks."""
    prefix_ids = encode_prefix(tokenizer, prefix)
    return score_token_ids_naive(
        model, prefix_ids, [encode_continuation(tokenizer, c) for c in continuations]
    )


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    candidates: list[Any] = [getattr(tokenizer, "eos_token_id", None)]
    gen_config = getattr(model, "generation_config", None)
    if gen_config is not None:
        candidates.append(getattr(gen_config, "eos_token_id", None))
    for c in candidates:
        if isinstance(c, int):
            ids.add(c)
        elif isinstance(c, list | tuple):
            ids.update(x for x in c if isinstance(x, int))
    return ids


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.inference_mode()
def _decode_loop(
    model: Any,
    tokenizer: Any,
    prompt: str,
    n: int,
    max_new_tokens: int,
    stop: Sequence[str],
    temperature: float,
    generator: torch.Generator | None,
) -> list[tuple[str, list[float], list[float]]]:
    """Decode ``n`` continuations of one prompt in a batch over its shared KV cache.

    A sequence ends at an EOS token, at a stop string, or after ``max_new_tokens``. Its statistics
    run up to and including the token that ended it: the confidence that the answer stops there is
    part of the answer's uncertainty, and an immediately stopped answer still has one entropy.
    """
    device = _device(model)
    prefix_ids = encode_prefix(tokenizer, prompt)
    if not prefix_ids:
        raise ValueError("the prompt must encode to at least one token")
    eos = _eos_ids(model, tokenizer)
    logits, cache = _forward(model, torch.tensor([prefix_ids], device=device), logits_to_keep=1)
    last = logits[:, -1].float().expand(n, -1)
    if n > 1:
        cache.batch_repeat_interleave(n)
    tokens: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[float]] = [[] for _ in range(n)]
    entropies: list[list[float]] = [[] for _ in range(n)]
    texts = [""] * n
    done = [False] * n
    for step in range(max_new_tokens):
        logp = torch.log_softmax(last, dim=-1)
        p = logp.exp()
        # 0 * log 0 is 0 in an entropy; a -inf logit would otherwise give nan
        ent = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
        if temperature > 0:
            probs = torch.softmax(last / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            nxt = last.argmax(-1)
        chosen = logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
        for i in range(n):
            if done[i]:
                continue
            tok = int(nxt[i])
            logprobs[i].append(float(chosen[i]))
            entropies[i].append(float(ent[i]))
            if tok in eos:
                done[i] = True
                continue
            tokens[i].append(tok)
            texts[i], hit = _cut_at_stop(tokenizer.decode(tokens[i], skip_special_tokens=True), stop)
            done[i] = hit
        if all(done) or step == max_new_tokens - 1:
            break
        positions = torch.full((n, 1), len(prefix_ids) + step, dtype=torch.long, device=device)
        out, cache = _forward(model, nxt.unsqueeze(-1), cache=cache, position_ids=positions)
        last = out[:, -1].float()
    return [(texts[i].strip(), logprobs[i], entropies[i]) for i in range(n)]


def generate_with_entropy(
    model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, stop: Sequence[str] = ("\n",)
) -> tuple[str, list[float], list[float]]:
    """Greedy continuation of ``prompt`` until EOS, a stop string or ``max_new_tokens``.

    Returns the text (cut before the first stop string, stripped) and, per generated token, its
    log-probability and the entropy (nats) of the next-token distribution it was chosen from.
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    return _decode_loop(model, tokenizer, prompt, 1, max_new_tokens, stop, 0.0, None)[0]


def sample_generations(
    model: Any,
    tokenizer: Any,
    prompt: str,
    n: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    stop: Sequence[str] = ("\n",),
) -> list[str]:
    """``n`` sampled continuations of ``prompt`` (cut at a stop string, stripped), reproducible by ``seed``.

    ``temperature <= 0`` gives ``n`` copies of the greedy answer.
    """
    if n < 1 or max_new_tokens < 1:
        raise ValueError("n and max_new_tokens must be at least 1")
    generator = torch.Generator(device=_device(model)).manual_seed(seed)
    results = _decode_loop(model, tokenizer, prompt, n, max_new_tokens, stop, temperature, generator)
    return [text for text, _, _ in results]


# -- micro-batches: several prompts at once (``--batch``) ---------------------------------------------


def last_token_logits(logits: torch.Tensor, kept: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    """(B, V) logits of each row's last real token, from logits kept at the positions ``kept``."""
    where = {p: j for j, p in enumerate(kept)}
    cols = torch.tensor([where[n - 1] for n in lengths], device=logits.device)
    return logits[torch.arange(len(lengths), device=logits.device), cols]


def score_after_prefixes(
    forward: Any,
    first: torch.Tensor,
    cache: Any,
    prefix_mask: torch.Tensor,
    continuations: Sequence[Sequence[Sequence[int]]],
    pad_id: int,
    offsets: Sequence[int],
    normalise: bool = True,
    mrope: bool = False,
) -> list[list[float]]:
    """Score each prefix's own continuations after a batched prefix forward.

    ``first``: (B, V) log-probs of the token after each prefix; ``cache``: the KV cache of the
    right-padded prefixes (consumed); ``prefix_mask``: (B, L) 1 on their real tokens; ``offsets``: the
    position of each prefix's first continuation token (its length, plus Qwen2-VL's rope delta);
    ``forward(inputs, cache) -> (logits, cache)``. All continuations of all prefixes go through one
    forward over the cache rows of their prefix: right-padded, masked, positions continuing each
    prefix. Returns, per prefix, the mean (``normalise``, else total) log-likelihood of each.
    """
    device = first.device
    owner = [i for i, conts in enumerate(continuations) for _ in conts]
    rows = [c for conts in continuations for c in conts]
    if not rows:
        return [[] for _ in continuations]
    _check_inputs([0], rows)
    index = torch.tensor(owner, device=device)
    sums = first[index, torch.tensor([c[0] for c in rows], device=device)].double()
    width = max(len(c) for c in rows) - 1
    if width > 0:
        cache.reorder_cache(index)  # one cache row per continuation, copied from its prefix's row
        inputs, targets, valid = continuation_batch(rows, pad_id, device)
        mask = torch.cat([prefix_mask[index], valid.long()], dim=1)
        start = torch.tensor(list(offsets), device=device)[index]
        pos = start.unsqueeze(1) + torch.arange(width, device=device).unsqueeze(0)
        if mrope:
            pos = pos.unsqueeze(0).expand(3, len(rows), width)  # text tokens: all three axes equal
        out, _ = forward({"input_ids": inputs, "attention_mask": mask, "position_ids": pos}, cache)
        picked = torch.log_softmax(out.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        sums = sums + (picked * valid).sum(dim=1).double()
    if normalise:
        sums = sums / torch.tensor([len(c) for c in rows], device=device, dtype=torch.float64)
    flat = sums.tolist()
    out_rows: list[list[float]] = [[] for _ in continuations]
    for i, v in zip(owner, flat, strict=True):
        out_rows[i].append(v)
    return out_rows


def keep_positions(model: Any, lengths: Sequence[int]) -> tuple[dict[str, Any], list[int]]:
    """The forward keyword that keeps only the logits at each row's last real token (all of them when
    the model cannot), and those positions."""
    kept = sorted({n - 1 for n in lengths})
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return {"logits_to_keep": torch.tensor(kept, device=_device(model))}, kept
    return {}, list(range(max(lengths)))
