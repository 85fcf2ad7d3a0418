"""Causal-LM helpers on a tiny random Llama with a byte tokenizer: KV-cached batched scoring equals one
forward per continuation, and generation agrees with a cache-free greedy decode."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from icdistill.models.scoring import (
    _cut_at_stop,
    encode_continuation,
    generate_with_entropy,
    sample_generations,
    score_continuations,
    score_continuations_naive,
    score_token_ids,
)

BOS, EOS, PAD = 256, 257, 258


class ByteTokenizer:
    """One token per byte (latin-1, so one character per token), a BOS when special tokens are asked for."""

    eos_token_id = EOS
    pad_token_id = PAD

    class _Encoded:
        def __init__(self, ids: list[int]) -> None:
            self.input_ids = ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> ByteTokenizer._Encoded:
        ids = list(text.encode("latin-1"))
        return self._Encoded([BOS, *ids] if add_special_tokens else ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if i < 256).decode("latin-1")


def tiny_llama(attn: str = "sdpa") -> LlamaForCausalLM:
    """A tiny random Llama over the byte vocabulary (``attn``: its attention implementation)."""
    config = LlamaConfig(
        vocab_size=260,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        # a wide init makes next-token distributions peaked, so that scores differ clearly
        initializer_range=0.2,
        eos_token_id=EOS,
        pad_token_id=PAD,
        bos_token_id=BOS,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny() -> tuple[LlamaForCausalLM, ByteTokenizer]:
    return tiny_llama(), ByteTokenizer()


PREFIX = "Image: sandal 41%, clog 9%\nQuestion: What is it?\nAnswer: Sandal\n\nImage: sandal 38%\nAnswer:"
OPTIONS = [" A\n", " Bag\n", " Sandal\n", " T-shirt/top\n", " Ankle boot\n", " x"]


def test_batched_scores_equal_naive_for_different_lengths(tiny):
    model, tok = tiny
    fast = score_continuations(model, tok, PREFIX, OPTIONS)
    slow = score_continuations_naive(model, tok, PREFIX, OPTIONS)
    assert len(fast) == len(OPTIONS)
    assert max(abs(a - b) for a, b in zip(fast, slow, strict=True)) < 1e-4
    assert len({round(s, 3) for s in fast}) > 1  # the check means something: scores differ


def test_chunked_batches_and_single_token_continuations(tiny):
    model, tok = tiny
    full = score_continuations(model, tok, PREFIX, OPTIONS)
    chunked = score_continuations(model, tok, PREFIX, OPTIONS, max_batch=2)
    assert max(abs(a - b) for a, b in zip(full, chunked, strict=True)) < 1e-5
    singles = ["a", "b", "\n"]  # one token each: no batched forward at all
    a = score_continuations(model, tok, PREFIX, singles)
    b = score_continuations_naive(model, tok, PREFIX, singles)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5


def test_scores_are_mean_token_log_likelihoods(tiny):
    model, tok = tiny
    prefix = tok(PREFIX).input_ids
    cont = tok(" Sandal\n", add_special_tokens=False).input_ids
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.tensor([prefix + cont])).logits[0].double(), -1)
    expected = sum(float(logp[len(prefix) - 1 + i, t]) for i, t in enumerate(cont)) / len(cont)
    assert score_token_ids(model, prefix, [cont])[0] == pytest.approx(expected, abs=1e-4)


def test_bad_inputs(tiny):
    model, tok = tiny
    assert score_continuations(model, tok, PREFIX, []) == []
    with pytest.raises(ValueError, match="no tokens"):
        score_continuations(model, tok, PREFIX, [" a", ""])
    with pytest.raises(ValueError, match="prefix"):
        score_token_ids(model, [], [[1, 2]])


def _greedy_without_cache(model, tok, prompt: str, steps: int) -> list[int]:
    ids = tok(prompt).input_ids
    out = []
    with torch.inference_mode():
        for _ in range(steps):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == EOS:
                break
    return out


def test_greedy_generation_matches_cache_free_decode(tiny):
    model, tok = tiny
    text, logprobs, entropies = generate_with_entropy(model, tok, PREFIX, max_new_tokens=8, stop=[])
    ref = _greedy_without_cache(model, tok, PREFIX, 8)
    assert text == tok.decode(ref).strip()
    assert len(logprobs) == len(entropies) == len(ref)
    for lp, h in zip(logprobs, entropies, strict=True):
        assert math.isfinite(lp) and math.isfinite(h)
        assert 0 <= h <= math.log(260) + 1e-4
        # the greedy token is the most likely one, so its surprisal is at most the entropy
        assert -lp <= h + 1e-4


def test_generation_stops_at_stop_string(tiny):
    model, tok = tiny
    ref = tok.decode(_greedy_without_cache(model, tok, PREFIX, 8))
    stop = ref[2]  # a character the greedy decode is known to produce
    text, logprobs, _ = generate_with_entropy(model, tok, PREFIX, max_new_tokens=8, stop=[stop])
    assert text == ref[: ref.index(stop)].strip()
    assert len(logprobs) == ref.index(stop) + 1  # includes the token that ended the answer
    assert _cut_at_stop("Sandal\nImage", ["\n", "Im"]) == ("Sandal", True)
    assert _cut_at_stop("Sandal", ["\n"]) == ("Sandal", False)


def test_sampling_is_reproducible_by_seed(tiny):
    model, tok = tiny
    a = sample_generations(model, tok, PREFIX, n=4, temperature=1.0, max_new_tokens=6, seed=1, stop=[])
    b = sample_generations(model, tok, PREFIX, n=4, temperature=1.0, max_new_tokens=6, seed=1, stop=[])
    assert a == b and len(a) == 4 and all(isinstance(s, str) for s in a)
    greedy = generate_with_entropy(model, tok, PREFIX, max_new_tokens=6, stop=[])[0]
    cold = sample_generations(model, tok, PREFIX, n=3, temperature=0.0, max_new_tokens=6, seed=0, stop=[])
    assert cold == [greedy] * 3


def test_unnormalised_scores_are_sums(tiny):
    model, tok = tiny
    mean = score_continuations(model, tok, PREFIX, OPTIONS)
    total = score_continuations(model, tok, PREFIX, OPTIONS, normalise=False)
    lengths = [len(encode_continuation(tok, o)) for o in OPTIONS]
    assert all(abs(t - m * n) < 1e-4 for t, m, n in zip(total, mean, lengths, strict=True))
    assert any(n > 1 for n in lengths)


def test_batched_prompts_score_as_one_prompt_at_a_time(tiny) -> None:
    from icdistill.models.packed_scoring import score_continuations_packed as score_continuations_batch

    model, tok = tiny
    # prompts of different lengths (right padding), each with its own continuations of mixed lengths
    prompts = [
        ("Q: shoe?\nA:", [" sandal\n", " boot\n", " bag\n"]),
        ("A much longer question about what this item could be?\nAnswer:", [" x\n", " trouser\n"]),
        ("Hi:", [" a\n", " ankle boot\n", " coat\n", " t\n"]),
    ]
    batched = score_continuations_batch(model, tok, prompts)
    for (prefix, conts), got in zip(prompts, batched, strict=True):
        want = score_continuations(model, tok, prefix, conts)
        assert got == pytest.approx(want, abs=1e-4)
        assert got == pytest.approx(score_continuations_naive(model, tok, prefix, conts), abs=1e-4)
    totals = score_continuations_batch(model, tok, prompts, normalise=False)
    assert totals[1] == pytest.approx(score_continuations(model, tok, *prompts[1], normalise=False), abs=1e-4)
    # the scores differ from prompt to prompt: a batch that mixed rows up would fail above
    assert len({round(v, 3) for row in batched for v in row}) > 5
