"""Each image through the vision tower once (``hf:`` Idefics3 / SmolVLM, Qwen2-VL, LLaVA-OneVision): the cached features
give the answers the model gives without the cache, and a demo's image shown again is not computed
again."""

from __future__ import annotations

import inspect

import pytest
import torch

from icdistill.conformance import sample_demos, sample_queries
from icdistill.errors import SpecError
from icdistill.models import vision_cache
from icdistill.models.registry import ModelContext, resolve_student
from icdistill.types import Query
from tiny_vlms import FAMILIES


@pytest.mark.parametrize("family", ["idefics3", "smolvlm", "qwen2_vl", "llava_onevision"])
def test_cached_image_features_answer_as_the_model_without_them(family, tmp_path):
    torch.manual_seed(0)
    FAMILIES[family][0](tmp_path)
    spec = f"hf:{tmp_path}?max_new_tokens=4&dtype=float32&device=cpu&local_files_only=1"
    plain = resolve_student(spec + "&image_cache=0", ModelContext())
    cached = resolve_student(spec, ModelContext())
    assert plain.image_cache is None and cached.image_cache is not None
    queries = sample_queries()
    demos = sample_demos(queries)[:2]
    options = ("red", "dark green", "light sky blue")
    asked = [
        Query(id=f"q{i}", image=q.image, prompt="Which colour is this image?", options=options)
        for i, q in enumerate(queries)
    ]
    for q in asked:
        want, got = plain.predict(q, demos), cached.predict(q, demos)
        assert got.answer == want.answer
        assert got.option_scores == pytest.approx(want.option_scores, abs=1e-4)
    # each distinct image (each of its tiles) went through the tower once: asked again, none is
    # computed again, and a demo's image shown to the next query was found
    computed, found = cached.image_cache.misses, cached.image_cache.hits
    assert found > 0
    for q in asked:
        cached.predict(q, demos[::-1])
    assert cached.image_cache.misses == computed and cached.image_cache.hits > found
    # a micro-batch (images padded into one pass, rows with fewer images) and generation agree too
    lists = [demos, [], demos[:1]]
    for w, g in zip(plain.predict_batch(asked, lists), cached.predict_batch(asked, lists), strict=True):
        assert g.option_scores == pytest.approx(w.option_scores, abs=1e-4)
    # generate() hands the encoder the inputs its signature names (the grids, the pixel masks, the
    # images per prompt)
    params = inspect.signature(cached.image_cache).parameters
    named = {"qwen2_vl": "image_grid_thw", "llava_onevision": "batch_num_images"}
    assert named.get(family, "pixel_attention_mask") in params
    open_q = Query(id="o", image=queries[0].image, prompt="Which colour is this image?")
    want, got = plain.predict(open_q, demos), cached.predict(open_q, demos)
    assert got.answer == want.answer and got.token_logprobs == pytest.approx(want.token_logprobs, abs=1e-4)


def test_the_cache_keeps_at_most_its_size_and_refuses_a_negative_one(tmp_path, monkeypatch):
    torch.manual_seed(0)
    FAMILIES["idefics3"][0](tmp_path)
    spec = f"hf:{tmp_path}?dtype=float32&device=cpu&local_files_only=1"
    student = resolve_student(spec + "&image_cache=1", ModelContext())
    queries = sample_queries()
    for q in queries:
        student.predict(Query(id=q.id, image=q.image, prompt="Which colour?", options=("red", "blue")), [])
    assert len(student.image_cache._cache) == 1 and student.image_cache.misses == len(queries)
    # a prompt with more images than the cache keeps still gets all of them
    demos = sample_demos(queries)[:2]
    q = Query(id="q", image=queries[2].image, prompt="Which colour?", options=("red", "blue"))
    want = resolve_student(spec + "&image_cache=0", ModelContext()).predict(q, demos)
    assert student.predict(q, demos).option_scores == pytest.approx(want.option_scores, abs=1e-4)
    # and at most size x TOKENS_PER_IMAGE feature tokens (a LLaVA-OneVision image alone is ~8.7k)
    monkeypatch.setattr(vision_cache, "TOKENS_PER_IMAGE", 1)
    small = resolve_student(spec + "&image_cache=4", ModelContext())
    for q in queries:
        small.predict(Query(id=q.id, image=q.image, prompt="Which colour?", options=("red", "blue")), [])
    assert len(small.image_cache._cache) == 1 < len(queries)
    assert small.image_cache.tokens == next(iter(small.image_cache._cache.values())).shape[0]
    with pytest.raises(SpecError, match="image_cache must be >= 0"):
        resolve_student(spec + "&image_cache=-1", ModelContext())
