"""MiniLM text encoder and the ConSE embedder on the shipped models."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from icdistill.conformance import check_embedder
from icdistill.embed import ConSEEmbedder, MiniLMTextEncoder
from icdistill.errors import SpecError
from icdistill.models.efficientnet import FEATURE_DIM, ImageTagger
from icdistill.types import IMAGE, IMAGE_TEXT, TEXT, Query


def _photo(name: str) -> Image.Image:
    data = pytest.importorskip("skimage.data")
    return Image.fromarray(getattr(data, name)())


@pytest.fixture(scope="module")
def embedder() -> ConSEEmbedder:
    return ConSEEmbedder(ImageTagger(), MiniLMTextEncoder())


def test_missing_model_folder_is_a_spec_error(tmp_path) -> None:
    with pytest.raises(SpecError):
        _ = MiniLMTextEncoder(tmp_path / "nope").model


def test_top_t_beyond_tagger_top_k_is_rejected() -> None:
    with pytest.raises(ValueError):
        ConSEEmbedder(ImageTagger(top_k=5), MiniLMTextEncoder(), top_t=10)


@pytest.mark.slow
def test_text_vectors_unit_norm_deterministic_and_cached(embedder: ConSEEmbedder, monkeypatch) -> None:
    enc = embedder.text_encoder
    texts = ["a photo of a cat", "sandal", "a photo of a cat", "What is shown in this image?"]
    v = enc.encode(texts)
    assert v.shape == (4, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(v[0], v[2])
    calls: list[list[str]] = []
    real = enc.model.encode
    monkeypatch.setattr(enc.model, "encode", lambda xs, **kw: calls.append(list(xs)) or real(xs, **kw))
    again = enc.encode(["sandal", "a new text"])
    assert calls == [["a new text"]]  # only the unseen text is encoded
    assert np.array_equal(again[0], v[1])
    v[1] = 0  # the caller's array is its own: the cache is not affected
    assert np.linalg.norm(enc.encode(["sandal"])[0]) == pytest.approx(1.0, abs=1e-5)
    # a text alone gives the same vector as in a padded batch
    alone = MiniLMTextEncoder(cache_size=0)
    alone._model = enc.model  # reuse the loaded weights
    assert np.allclose(alone.encode(["sandal"])[0], again[0], atol=1e-5)
    assert enc.encode([]).shape == (0, 384)


@pytest.mark.slow
def test_conformance(embedder: ConSEEmbedder) -> None:
    check_embedder(embedder)


@pytest.mark.slow
def test_query_embedding_keys(embedder: ConSEEmbedder) -> None:
    q = Query(id="a", image=_photo("coffee"), prompt="What is this?")
    e = embedder.embed_query(q)
    assert set(e) == {IMAGE, IMAGE_TEXT, TEXT}
    assert e[IMAGE].shape == (FEATURE_DIM,) and e[IMAGE_TEXT].shape == (384,) and e[TEXT].shape == (384,)
    for v in e.values():
        assert v.dtype == np.float32
        assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5)
    text_only = embedder.embed_query(Query(id="b", image=None, prompt="What is this?"))
    assert set(text_only) == {TEXT}
    assert np.allclose(text_only[TEXT], e[TEXT])


@pytest.mark.slow
def test_conse_puts_images_near_their_words(embedder: ConSEEmbedder) -> None:
    answers = embedder.embed_texts(["cat", "truck", "coffee"])
    cat = embedder.embed_query(Query(id="c", image=_photo("chelsea"), prompt="?"))[IMAGE_TEXT]
    coffee = embedder.embed_query(Query(id="d", image=_photo("coffee"), prompt="?"))[IMAGE_TEXT]
    assert answers[0] @ cat > answers[1] @ cat
    assert answers[0] @ cat > answers[2] @ cat
    assert answers[2] @ coffee > answers[0] @ coffee


@pytest.mark.slow
def test_shared_tagger_runs_each_image_once(embedder: ConSEEmbedder) -> None:
    img = Image.new("RGB", (28, 28), (12, 34, 56))
    tags = embedder.tagger.tag(img)  # e.g. the student tags the image first
    before = embedder.tagger.forward_images
    e = embedder.embed_query(Query(id="e", image=img.copy(), prompt="?"))
    assert embedder.tagger.forward_images == before
    assert np.allclose(e[IMAGE], tags.features / np.linalg.norm(tags.features))


@pytest.mark.slow
def test_a_batch_of_queries_embeds_as_one_at_a_time(embedder: ConSEEmbedder) -> None:
    images = [Image.new("RGB", (28, 28), (10 * i, 200 - 20 * i, 90)) for i in range(4)]
    queries = [Query(id=f"b{i}", image=img, prompt="?") for i, img in enumerate([*images, images[0].copy()])]
    before = embedder.tagger.forward_images
    many = embedder.embed_queries(queries)
    assert embedder.tagger.forward_images == before + 4  # the repeated image runs once
    for q, e in zip(queries, many, strict=True):
        one = embedder.embed_query(q)
        assert set(e) == set(one) and all(np.allclose(e[k], one[k], atol=1e-5) for k in e)
