"""Option scoring with every option packed into the prompt's own forward ("tree attention").

``score_token_ids`` (``icdistill.models.scoring``) reads a prompt in two forwards: the prefix fills a
KV cache, then every option continues it from a copy of that cache. Here one forward does both: each
row is the prefix followed by all its options' fed tokens, and a 4D attention mask lets each option
token see the prefix and its own option's earlier tokens only, at the positions it would have after
the prefix. Only the rows' wanted positions go through the LM head. One forward and no cache copies:
on the default student's 2-shot prompts (~105 tokens, 10 options) it takes 0.25 s a prompt on 2 CPU
cores against 0.39 s, and several prompts batch into one forward (0.15 s a prompt at 8; BENCHMARKS.md
§3). The scores equal the cached path's within float tolerance (tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from icdistill.models.scoring import _check_inputs, _device, _pad_id, encode_continuation, encode_prefix

# prompts are split into forwards of at most this many row tokens (the mask is rows x width x width)
MAX_PACKED_TOKENS = 8192


def _layout(
    prefixes: Sequence[Sequence[int]], continuations: Sequence[Sequence[Sequence[int]]]
) -> tuple[list[list[int]], list[list[int]], list[list[tuple[int, int]]]]:
    """Per row: its tokens, their positions, and each option's (first fed column, option length)."""
    rows, positions, spans = [], [], []
    for prefix, conts in zip(prefixes, continuations, strict=True):
        n = len(prefix)
        ids, pos, sp = list(prefix), list(range(n)), []
        for c in conts:
            sp.append((len(ids), len(c)))
            ids.extend(c[:-1])  # an option's last token is only a target
            pos.extend(range(n, n + len(c) - 1))
        rows.append(ids)
        positions.append(pos)
        spans.append(sp)
    return rows, positions, spans


def packed_mask(
    lengths: Sequence[int],
    prefix_lengths: Sequence[int],
    spans: Sequence[Sequence[tuple[int, int]]],
    width: int,
) -> torch.Tensor:
    """(B, W, W) bool: True where a row's token (dim 1) may attend to a token (dim 2). The prefix is
    causal; an option's fed tokens see the prefix and their own option's earlier tokens; a padding
    column sees only itself (so that no softmax row is empty)."""
    allow = torch.zeros((len(lengths), width, width), dtype=torch.bool)
    for i, (n, n_prefix, sp) in enumerate(zip(lengths, prefix_lengths, spans, strict=True)):
        allow[i, :n_prefix, :n_prefix] = torch.ones(n_prefix, n_prefix, dtype=torch.bool).tril()
        for start, length in sp:
            k = length - 1
            if k:
                allow[i, start : start + k, :n_prefix] = True
                allow[i, start : start + k, start : start + k] = torch.ones(k, k, dtype=torch.bool).tril()
        pad = torch.arange(n, width)
        allow[i, pad, pad] = True
    return allow


# config fields of models whose logits are more than the head's output (softcapped or scaled)
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _logits_at(
    model: Any, inputs: dict[str, torch.Tensor], rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Logits at the given (row, column) positions: the decoder's hidden states there through the LM
    head (all positions' logits where the model does not expose the two, or post-processes them)."""
    decoder = getattr(model, "get_decoder", lambda: None)()
    head = getattr(model, "get_output_embeddings", lambda: None)()
    config = getattr(model, "config", None)
    plain = not any(getattr(config, name, None) for name in _LOGIT_POSTPROCESSING)
    if decoder is not None and head is not None and decoder is not model and plain:
        hidden = decoder(**inputs, use_cache=False).last_hidden_state
        return head(hidden[rows, cols])
    return model(**inputs, use_cache=False).logits[rows, cols]


@torch.inference_mode()
def score_packed(
    model: Any,
    prefixes: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[Sequence[int]]],
    pad_id: int = 0,
    normalise: bool = True,
) -> list[list[float]]:
    """Mean (``normalise``, else total) log-likelihood of each ``continuations[i]`` after ``prefixes[i]``,
    all prompts in one packed forward (per ``MAX_PACKED_TOKENS``; see the module doc)."""
    for p, c in zip(prefixes, continuations, strict=True):
        _check_inputs(p, c)
    # a prompt whose options would make a row longer than the budget is split into several rows,
    # each the prefix with some of its options
    parts: list[tuple[int, int, int]] = []  # (prompt, first option, end)
    for i, (p, conts) in enumerate(zip(prefixes, continuations, strict=True)):
        first, width = 0, len(p)
        for j, c in enumerate(conts):
            if j > first and width + len(c) - 1 > MAX_PACKED_TOKENS:
                parts.append((i, first, j))
                first, width = j, len(p)
            width += len(c) - 1
        if conts:
            parts.append((i, first, len(conts)))
    scored = _score_parts(
        model,
        [prefixes[i] for i, _, _ in parts],
        [continuations[i][a:b] for i, a, b in parts],
        pad_id,
        normalise,
    )
    out: list[list[float]] = [[] for _ in prefixes]
    for (i, _, _), row in zip(parts, scored, strict=True):
        out[i].extend(row)
    return out


def _score_parts(
    model: Any,
    prefixes: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[Sequence[int]]],
    pad_id: int,
    normalise: bool,
) -> list[list[float]]:
    """``score_packed`` for rows that each fit the budget (or hold one option): rows grouped into
    forwards of at most ``MAX_PACKED_TOKENS`` row tokens."""
    rows, positions, spans = _layout(prefixes, continuations)
    out: list[list[float]] = []
    start = 0
    while start < len(rows):
        end = start + 1
        while (
            end < len(rows)
            and (end + 1 - start) * max(len(r) for r in rows[start : end + 1]) <= MAX_PACKED_TOKENS
        ):
            end += 1
        out.extend(
            _score_rows(
                model,
                rows[start:end],
                positions[start:end],
                spans[start:end],
                [len(p) for p in prefixes[start:end]],
                continuations[start:end],
                pad_id,
                normalise,
            )
        )
        start = end
    return out


def _score_rows(
    model: Any,
    rows: list[list[int]],
    positions: list[list[int]],
    spans: list[list[tuple[int, int]]],
    prefix_lengths: list[int],
    continuations: Sequence[Sequence[Sequence[int]]],
    pad_id: int,
    normalise: bool,
) -> list[list[float]]:
    device = _device(model)
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    dtype = embeddings.weight.dtype if embeddings is not None else next(model.parameters()).dtype
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, p) in enumerate(zip(rows, positions, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        pos[i, : len(p)] = torch.tensor(p)
    allow = packed_mask([len(r) for r in rows], prefix_lengths, spans, width)
    # an additive float mask: what every attention implementation (eager, sdpa) reads alike
    mask = torch.zeros(allow.shape, dtype=dtype).masked_fill_(~allow, torch.finfo(dtype).min).unsqueeze(1)
    # the wanted positions: a prefix's last token predicts every option's first token, an option's fed
    # token t predicts its token t + 1
    at_rows, at_cols, targets, owner = [], [], [], []
    for i, (n_prefix, sp, conts) in enumerate(zip(prefix_lengths, spans, continuations, strict=True)):
        for j, ((start, length), c) in enumerate(zip(sp, conts, strict=True)):
            cols = [n_prefix - 1, *range(start, start + length - 1)]
            at_rows.extend([i] * length)
            at_cols.extend(cols)
            targets.extend(c)
            owner.extend([(i, j)] * length)
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": pos.to(device)}
    logits = _logits_at(
        model, inputs, torch.tensor(at_rows, device=device), torch.tensor(at_cols, device=device)
    )
    picked = torch.log_softmax(logits.float(), dim=-1).gather(
        -1, torch.tensor(targets, device=device).unsqueeze(-1)
    )
    sums: list[list[float]] = [[0.0] * len(c) for c in continuations]
    for (i, j), v in zip(owner, picked.squeeze(-1).double().tolist(), strict=True):
        sums[i][j] += v
    if normalise:
        return [
            [s / len(c) for s, c in zip(row, conts, strict=True)]
            for row, conts in zip(sums, continuations, strict=True)
        ]
    return sums


def score_continuations_packed(
    model: Any, tokenizer: Any, prompts: Sequence[tuple[str, Sequence[str]]], normalise: bool = True
) -> list[list[float]]:
    """``score_continuations`` for several (prefix, continuations) prompts in one packed forward."""
    prefixes = [encode_prefix(tokenizer, p) for p, _ in prompts]
    conts = [[encode_continuation(tokenizer, c) for c in cs] for _, cs in prompts]
    return score_packed(model, prefixes, conts, pad_id=_pad_id(tokenizer), normalise=normalise)
