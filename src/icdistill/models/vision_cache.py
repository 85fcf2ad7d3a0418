"""Each image through the vision tower once (``hf:`` Idefics3 / SmolVLM and Qwen2-VL): a demo's image is
in the prompt of every query shown that demo, and on a CPU the vision tower is most of a forward.
``cache_image_features`` wraps the model's ``get_image_features`` so that the features of an image
already seen (the same pixels, the same size) come from an LRU cache, and only the new images of a
prompt or a batch go through the tower, together.

- Idefics3 / SmolVLM: ``pixel_values`` is (rows, images, C, H, W), padded with all-zero images, which
  the model skips and so does the cache; an image's unit is one tile.
- Qwen2-VL: ``pixel_values`` is every image's patches, one after another, ``image_grid_thw`` their
  grids; each image attends only to itself, so computing it alone gives its features in a batch.

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

FAMILIES = ("idefics3", "qwen2_vl")


def _key(*tensors: torch.Tensor | None) -> str:
    h = hashlib.sha1()
    for t in tensors:
        if t is None:
            continue
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class ImageFeatureCache:
    """``get_image_features`` of an Idefics3 or Qwen2-VL model, computed once per image (module doc)."""

    def __init__(self, compute: Any, size: int, family: str) -> None:
        if family not in FAMILIES:
            raise ValueError(f"no image feature cache for the {family} family")
        self._compute = compute  # the model's own get_image_features
        # generate() passes the encoder the inputs its signature names: name the same ones
        self.__signature__ = inspect.signature(compute)
        self.size = size
        self.family = family
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
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
        return BaseModelOutputWithPooling(pooler_output=self._idefics3(pixel_values, *args, **kwargs))

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
            out = []
            for k in keys:
                out.append(self._cache[k])
                self._cache.move_to_end(k)
            while len(self._cache) > self.size:  # after this call's units are taken
                self._cache.popitem(last=False)
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


def cache_image_features(model: Any, size: int, family: str) -> ImageFeatureCache | None:
    """Wrap the model's ``get_image_features`` (``size``: images kept; 0, or a family without a cache:
    none). A model shared by a student and a teacher is wrapped once."""
    inner = getattr(model, "model", None)
    if size <= 0 or family not in FAMILIES or inner is None or not hasattr(inner, "get_image_features"):
        return None
    current = inner.get_image_features
    if isinstance(current, ImageFeatureCache):
        return current
    cache = ImageFeatureCache(current, size, family)
    inner.get_image_features = cache
    return cache
