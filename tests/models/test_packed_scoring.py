"""Packed option scoring (every option in the prompt's own forward, a 4D mask keeping them apart) equals
one full forward per continuation, for either attention implementation, in chunks, and batched."""

from __future__ import annotations

import pytest
import torch
from test_scoring import OPTIONS, PREFIX, ByteTokenizer, tiny_llama

from icdistill.models import packed_scoring
from icdistill.models.packed_scoring import packed_mask, score_continuations_packed
from icdistill.models.scoring import score_continuations_naive

PROMPTS = [
    (PREFIX, OPTIONS),
    ("A much longer question about what this item could be?\nAnswer:", [" x\n", " trouser\n"]),
    ("Hi:", [" a\n", " ankle boot\n", " coat\n", " t"]),
]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_one_forward_per_continuation(attn: str) -> None:
    model, tok = tiny_llama(attn), ByteTokenizer()
    packed = score_continuations_packed(model, tok, PROMPTS)
    for (prefix, conts), got in zip(PROMPTS, packed, strict=True):
        assert got == pytest.approx(score_continuations_naive(model, tok, prefix, conts), abs=1e-4)
    # the scores differ from option to option and prompt to prompt: rows or options mixed up would fail
    assert len({round(v, 3) for row in packed for v in row}) > 8
    totals = score_continuations_packed(model, tok, PROMPTS, normalise=False)
    lengths = [len(c) for c in PROMPTS[2][1]]  # one byte a token
    assert totals[2] == pytest.approx([m * n for m, n in zip(packed[2], lengths, strict=True)], abs=1e-4)


def test_an_option_sees_neither_the_other_options_nor_padding(monkeypatch) -> None:
    model, tok = tiny_llama(), ByteTokenizer()
    alone = score_continuations_packed(model, tok, [(PREFIX, [" Sandal\n"])])[0][0]
    among = score_continuations_packed(model, tok, [(PREFIX, OPTIONS)])[0][OPTIONS.index(" Sandal\n")]
    assert among == pytest.approx(alone, abs=1e-5)
    # forwards split at a tiny token budget (one prompt each) give the same scores
    whole = score_continuations_packed(model, tok, PROMPTS)
    # a budget below one prompt's options splits them over rows that each repeat the prefix
    monkeypatch.setattr(packed_scoring, "MAX_PACKED_TOKENS", 16)
    assert score_continuations_packed(model, tok, PROMPTS) == [pytest.approx(r, abs=1e-5) for r in whole]
    assert score_continuations_packed(model, tok, [("Hi:", []), *PROMPTS[2:]])[0] == []


def test_mask_layout() -> None:
    # prefix of 3, an option of 3 tokens (2 fed) at column 3, an option of 1 token (none fed), width 6
    allow = packed_mask([5], [3], [[(3, 3), (5, 1)]], 6)[0]
    assert allow[:3, :3].equal(torch.ones(3, 3, dtype=torch.bool).tril())
    assert allow[3].tolist() == [True, True, True, True, False, False]
    assert allow[4].tolist() == [True, True, True, True, True, False]
    assert allow[5].tolist() == [False] * 5 + [True]  # padding: itself only
    assert not allow[:3, 3:].any()  # the prefix never sees an option
