"""Each image through the vision tower once (``hf:`` Idefics3 / SmolVLM, Qwen2-VL, LLaVA-OneVision): a demo's image is
in the prompt of every query shown that demo, and on a CPU the vision tower is most of a forward.
``cache_image_features`` wraps the model's ``get_image_features`` so that the features of an image
already seen (the same pixels, the same size) come from an LRU cache, and only the new images of a
prompt or a batch go through the tower, together.

- Idefics3 / SmolVLM: ``pixel_values`` is (rows, images, C, H, W), padded with all-zero images, which
  the model skips and so does the cache; an image's unit is one tile.
- Qwen2-VL: ``pixel_values`` is every image's patches, one after another, ``image_grid_thw`` their
  grids; each image attends only to itself, so computing it alone gives its features in a batch.
- LLaVA-OneVision: ``pixel_values`` is (images, patches, C, H, W), padded; an image alone in its prompt
  is split into anyres patches, one among several is not (``batch_num_images``), so an image's unit is
  its pixels, its size and whether it was split. The tower (SigLIP) reads each patch alone.

Features computed alone and in a batch agree within float rounding (the tests compare the answers).
"""

from __future__ import annotations

import hashlib
import inspect
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

FAMILIES = ("idefics3", "qwen2_vl", "llava_onevision")
# feature tokens kept per image of the cache's size: an image alone in a LLaVA-OneVision prompt is up to
# ~8.7k tokens (anyres), one among several 730, an Idefics3 tile 64; the cache keeps at most ``size``
# images and ``size * TOKENS_PER_IMAGE`` tokens (256 images: ~0.5 GB of bf16 features at width 896)
TOKENS_PER_IMAGE = 1024


def _key(*tensors: torch.Tensor | None) -> str:
    h = hashlib.sha1()
    for t in tensors:
        if t is None:
            continue
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class ImageFeatureCache:
    """``get_image_features`` of an Idefics3, Qwen2-VL or LLaVA-OneVision model, computed once per image
    (module doc)."""

    def __init__(self, compute: Any, size: int, family: str, config: Any = None) -> None:
        if family not in FAMILIES:
            raise ValueError(f"no image feature cache for the {family} family")
        self._compute = compute  # the model's own get_image_features
        # generate() passes the encoder the inputs its signature names: name the same ones
        self.__signature__ = inspect.signature(compute)
        self.size = size
        self.family = family
        self._config = config  # the model's (LLaVA-OneVision: its anyres grid)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.tokens = 0  # feature tokens held (each entry's first dimension)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __call__(self, pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        kwargs = {**kwargs, "return_dict": True}
        if self.family == "qwen2_vl":
            return BaseModelOutputWithPooling(
                pooler_output=tuple(self._qwen2_vl(pixel_values, *args, **kwargs))
            )
        if self.family == "llava_onevision":
            return BaseModelOutputWithPooling(
                pooler_output=self._llava_onevision(pixel_values, *args, **kwargs)
            )
        return BaseModelOutputWithPooling(pooler_output=self._idefics3(pixel_values, *args, **kwargs))

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
            self.tokens = 0

    def _features(
        self, keys: Sequence[str], compute: Callable[[list[int]], list[torch.Tensor]]
    ) -> list[torch.Tensor]:
        """Each unit's features: from the cache, or computed together (``compute`` of their indices)."""
        with self._lock:
            todo = [k for k in dict.fromkeys(keys) if k not in self._cache]
            self.misses += len(todo)
            self.hits += len(keys) - len(todo)
            if todo:
                for k, f in zip(todo, compute([keys.index(k) for k in todo]), strict=True):
                    self._cache[k] = f
                    self.tokens += int(f.shape[0])
            out = []
            for k in keys:
                out.append(self._cache[k])
                self._cache.move_to_end(k)
            # after this call's units are taken
            while len(self._cache) > self.size or (
                self.tokens > self.size * TOKENS_PER_IMAGE and len(self._cache) > 1
            ):
                self.tokens -= int(self._cache.popitem(last=False)[1].shape[0])
            return out

    def _idefics3(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> list[torch.Tensor]:
        rows, n = pixel_values.shape[:2]
        flat = pixel_values.reshape(rows * n, *pixel_values.shape[2:])
        masks = (
            None
            if pixel_attention_mask is None
            else pixel_attention_mask.reshape(rows * n, *pixel_attention_mask.shape[2:])
        )
        real = [i for i in range(rows * n) if bool((flat[i] != 0).any())]

        def compute(idx: list[int]) -> list[torch.Tensor]:
            sel = [real[j] for j in idx]
            out = self._compute(
                flat[sel].unsqueeze(0), None if masks is None else masks[sel].unsqueeze(0), **kwargs
            )
            f = out.pooler_output[0]  # the images of one row: each the same number of tokens
            return list(f.reshape(len(sel), -1, f.shape[-1]))

        feats = self._features([_key(flat[i], None if masks is None else masks[i]) for i in real], compute)
        per_row: list[torch.Tensor] = []
        start = 0
        for r in range(rows):
            count = sum(1 for i in real if r * n <= i < (r + 1) * n)
            if count:
                per_row.append(torch.cat(feats[start : start + count]).reshape(-1, feats[start].shape[-1]))
            start += count
        return per_row

    def _qwen2_vl(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None, **kwargs: Any
    ) -> list[torch.Tensor]:
        if image_grid_thw is None:
            raise ValueError("Qwen2-VL image features need image_grid_thw")
        parts = list(pixel_values.split(image_grid_thw.prod(-1).tolist()))

        def compute(idx: list[int]) -> list[torch.Tensor]:
            out = self._compute(torch.cat([parts[i] for i in idx]), image_grid_thw[idx], **kwargs)
            return list(out.pooler_output)

        return self._features([_key(p, g) for p, g in zip(parts, image_grid_thw, strict=True)], compute)

    def _llava_onevision(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        *args: Any,
        batch_num_images: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> list[torch.Tensor]:
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        if pixel_values.dim() != 5:  # never from the processor: the model's own path
            kwargs = {**kwargs, "batch_num_images": batch_num_images}
            return list(self._compute(pixel_values, image_sizes, *args, **kwargs).pooler_output)
        counts = [1] * len(image_sizes) if batch_num_images is None else [int(n) for n in batch_num_images]
        split = [n == 1 for n in counts for _ in range(n)]
        cfg = self._config
        patches = [
            image_size_to_num_patches(
                image_size=size,
                grid_pinpoints=cfg.image_grid_pinpoints,
                patch_size=cfg.vision_config.image_size,
            )
            if alone
            else 1
            for size, alone in zip(image_sizes, split, strict=True)
        ]
        units = [pixel_values[i, : patches[i]] for i in range(len(patches))]

        def run(idx: list[int], alone: bool) -> list[torch.Tensor]:
            # one pass for images split alike; a lone unsplit image goes twice (a prompt of two)
            chosen = idx if alone or len(idx) > 1 else idx * 2
            width = max(patches[i] for i in chosen)
            batch = pixel_values.new_zeros((len(chosen), width, *pixel_values.shape[2:]))
            for row, i in enumerate(chosen):
                batch[row, : patches[i]] = units[i]
            nums = torch.tensor([1] * len(chosen) if alone else [len(chosen)])
            out = self._compute(batch, image_sizes[chosen], *args, batch_num_images=nums, **kwargs)
            return list(out.pooler_output)[: len(idx)]

        def compute(idx: list[int]) -> list[torch.Tensor]:
            got: dict[int, torch.Tensor] = {}
            for alone in (True, False):
                group = [i for i in idx if split[i] == alone]
                if group:
                    got.update(zip(group, run(group, alone), strict=True))
            return [got[i] for i in idx]

        keys = [_key(u, image_sizes[i]) + ("-split" if split[i] else "") for i, u in enumerate(units)]
        return self._features(keys, compute)


def cache_image_features(model: Any, size: int, family: str) -> ImageFeatureCache | None:
    """Wrap the model's ``get_image_features`` (``size``: images kept; 0, or a family without a cache:
    none). A model shared by a student and a teacher is wrapped once."""
    inner = getattr(model, "model", None)
    if size <= 0 or family not in FAMILIES or inner is None or not hasattr(inner, "get_image_features"):
        return None
    current = inner.get_image_features
    if isinstance(current, ImageFeatureCache):
        return current
    cache = ImageFeatureCache(current, size, family, getattr(inner, "config", None))
    inner.get_image_features = cache
    return cache
