"""EfficientNet-Lite0 and the image tagger: strict weight loading, sensible predictions, caching, batching."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from icdistill.errors import SpecError
from icdistill.models.efficientnet import (
    FEATURE_DIM,
    ImageTagger,
    Tags,
    imagenet_class_names,
    load_efficientnet_lite0,
    preprocess,
    to_rgb,
)

CAT_IDS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _photo(name: str) -> Image.Image:
    data = pytest.importorskip("skimage.data")
    return Image.fromarray(getattr(data, name)())


def _noise(seed: int, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))


@pytest.fixture(scope="module")
def tagger() -> ImageTagger:
    return ImageTagger(batch_size=4)


def test_class_names_in_index_order() -> None:
    names = imagenet_class_names()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert names[0] == "tench" and names[1] == "goldfish"
    assert names[281] == "tabby cat" and names[817] == "sports car" and names[999] == "toilet tissue"
    assert all(n == n.strip() and n for n in names)


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (28, 28), 128),
        Image.new("RGBA", (50, 70), (10, 20, 30, 0)),
        Image.new("P", (30, 30)),
        Image.new("1", (300, 200)),
        Image.new("I;16", (64, 64), 40000),
        Image.new("RGB", (1024, 480), (255, 0, 0)),
    ],
    ids=["L-28", "RGBA", "P", "1", "I16", "RGB-large"],
)
def test_preprocess_any_mode_and_size(image: Image.Image) -> None:
    x = preprocess(image)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0


def test_transparent_pixels_become_white() -> None:
    rgb = to_rgb(Image.new("RGBA", (4, 4), (0, 0, 0, 0)))
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255)


def test_missing_weights_is_a_spec_error(tmp_path) -> None:
    with pytest.raises(SpecError):
        load_efficientnet_lite0(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.raises(SpecError):
        load_efficientnet_lite0(bad)


def test_tags_describe_and_equality() -> None:
    f = np.zeros(3, dtype=np.float32)
    t = Tags(
        labels=("sandal", "running shoe", "clog"), probs=(0.414, 0.2, 0.09), ids=(774, 770, 502), features=f
    )
    assert t.describe() == "sandal 41%, running shoe 20%, clog 9%"
    assert t.describe(1) == "sandal 41%"
    assert t == Tags(labels=t.labels, probs=t.probs, ids=t.ids, features=f.copy())


@pytest.mark.slow
def test_strict_load_and_parameter_count() -> None:
    model = load_efficientnet_lite0()
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    assert len(model.state_dict()) == 296


@pytest.mark.slow
def test_real_photos_get_sensible_classes(tagger: ImageTagger) -> None:
    cat = tagger.tag(_photo("chelsea"))
    assert set(cat.ids[:5]) & CAT_IDS, cat.describe()
    assert cat.ids[0] in CAT_IDS, cat.describe()
    coffee = tagger.tag(_photo("coffee"))
    assert {"espresso", "cup", "coffee mug"} & set(coffee.labels[:3]), coffee.describe()
    assert re.fullmatch(r"[^,]+ \d+%(, [^,]+ \d+%){4}", cat.describe())


@pytest.mark.slow
def test_tags_shape_for_all_kinds_of_images(tagger: ImageTagger) -> None:
    images = [
        _noise(1, (28, 28), "L"),  # Fashion-MNIST-like grayscale
        Image.new("RGBA", (64, 48), (200, 30, 30, 128)),
        _noise(2, (800, 600)),
        Image.new("P", (20, 20)),
    ]
    for tags in tagger.tag_many(images):
        assert len(tags.labels) == len(tags.probs) == len(tags.ids) == tagger.top_k
        assert list(tags.probs) == sorted(tags.probs, reverse=True)
        assert 0 < sum(tags.probs) <= 1.0 + 1e-5
        assert tags.features.shape == (FEATURE_DIM,) and tags.features.dtype == np.float32
        assert np.all(np.isfinite(tags.features))
        assert not tags.features.flags.writeable


@pytest.mark.slow
def test_cache_hits_do_no_forward(tagger: ImageTagger) -> None:
    img = _noise(10)
    before = tagger.forward_images
    first = tagger.tag(img)
    assert tagger.forward_images == before + 1
    again = tagger.tag(img.copy())  # same content, other object
    assert tagger.forward_images == before + 1
    assert again is first
    # duplicates inside one batch run once; cached ones not at all
    tagger.tag_many([img, _noise(11), _noise(11), img])
    assert tagger.forward_images == before + 2


@pytest.mark.slow
def test_cache_is_bounded() -> None:
    small = ImageTagger(cache_size=2)
    for seed in range(3):
        small.tag(_noise(seed))
    assert small.forward_images == 3
    small.tag(_noise(0))  # evicted, least recently used
    assert small.forward_images == 4
    small.tag(_noise(2))
    assert small.forward_images == 4


@pytest.mark.slow
def test_batched_equals_one_by_one(tagger: ImageTagger) -> None:
    images = [_noise(100 + i, (28 + 7 * i, 28)) for i in range(5)]
    one_by_one = ImageTagger(cache_size=0, batch_size=1)
    batched = tagger.tag_many(images)  # batch_size 4: a full batch and a partial one
    for img, b in zip(images, batched, strict=True):
        s = one_by_one.tag(img)
        assert np.allclose(s.features, b.features, atol=1e-4)
        assert s.ids[:3] == b.ids[:3]
        assert np.allclose(s.probs, b.probs, atol=1e-4)
