"""Each image through the vision tower once (``hf:`` Idefics3 / SmolVLM): a demo's image is in the prompt
of every query shown that demo, and on a CPU the vision tower (SigLIP over every tile, then the
connector) is most of a forward. ``cache_image_features`` wraps the model's ``get_image_features`` so
that the features of an image already seen (the same pixels, the same padded size) are taken from an
LRU cache, and only the new images of a prompt or a batch go through the tower, together.

A padding image (all zeros: Idefics3 pads a batch's rows to the same number of images) is skipped, as
the model itself skips it. Features computed alone and in a batch agree within float rounding.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

import torch


def _key(pixels: torch.Tensor, mask: torch.Tensor | None) -> str:
    h = hashlib.sha1(str(tuple(pixels.shape)).encode())
    h.update(pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    if mask is not None:
        h.update(mask.detach().to("cpu", torch.uint8).contiguous().numpy().tobytes())
    return h.hexdigest()


class ImageFeatureCache:
    """``get_image_features`` of an Idefics3 model, computed once per image (see the module doc)."""

    def __init__(self, compute: Any, size: int) -> None:
        self._compute = compute  # the model's own get_image_features
        self.size = size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __call__(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        batch, n_images = pixel_values.shape[:2]
        flat = pixel_values.reshape(batch * n_images, *pixel_values.shape[2:])
        masks = (
            None
            if pixel_attention_mask is None
            else pixel_attention_mask.reshape(batch * n_images, *pixel_attention_mask.shape[2:])
        )
        real = [bool((flat[i] != 0).any()) for i in range(len(flat))]
        keys = [
            _key(flat[i], None if masks is None else masks[i]) if real[i] else "" for i in range(len(flat))
        ]
        with self._lock:
            todo = list(
                dict.fromkeys(k for k, r in zip(keys, real, strict=True) if r and k not in self._cache)
            )
            self.hits += sum(1 for k, r in zip(keys, real, strict=True) if r and k not in todo)
            self.misses += len(todo)
            if todo:
                first = [keys.index(k) for k in todo]
                out = self._compute(
                    flat[first].unsqueeze(0),
                    None if masks is None else masks[first].unsqueeze(0),
                    **{**kwargs, "return_dict": True},
                )
                # one row of features for all the new images: each has the same number of tokens
                features = out.pooler_output[0].reshape(len(todo), -1, out.pooler_output[0].shape[-1])
                for k, f in zip(todo, features, strict=True):
                    self._cache[k] = f
                while len(self._cache) > self.size:
                    self._cache.popitem(last=False)
            rows = []
            for b in range(batch):
                row = [self._cache[k] for k in keys[b * n_images : (b + 1) * n_images] if k]
                for k in keys[b * n_images : (b + 1) * n_images]:
                    if k:
                        self._cache.move_to_end(k)
                rows.append(torch.cat(row).reshape(-1, row[0].shape[-1]) if row else None)
        return BaseModelOutputWithPooling(pooler_output=[r for r in rows if r is not None])


def cache_image_features(model: Any, size: int) -> ImageFeatureCache | None:
    """Wrap the Idefics3 model's ``get_image_features`` (``size``: images kept; 0: none). A model shared
    by a student and a teacher is wrapped once."""
    inner = getattr(model, "model", None)
    if size <= 0 or inner is None or not hasattr(inner, "get_image_features"):
        return None
    current = inner.get_image_features
    if isinstance(current, ImageFeatureCache):
        return current
    cache = ImageFeatureCache(current, size)
    inner.get_image_features = cache
    return cache
