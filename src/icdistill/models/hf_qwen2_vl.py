"""The Qwen2-VL / Qwen2.5-VL family of the ``hf:`` backend: its model types and processors, and its 3-D
rotary positions (M-RoPE), computed for the cached batched pass of option scoring."""

from __future__ import annotations

import inspect
from typing import Any

import torch

# config.model_type -> family
MODEL_TYPES = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_vl"}
# processor classes per model_type (rebuilt without a video processor; see ``hf_load.load_processor``)
PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}


def mrope_positions(model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor | None, int]:
    """Qwen2-VL's 3-D rotary positions of the prefix and the offset of the text after it.

    The model keeps this offset as state between calls (``rope_deltas``); computing it here keeps
    the cached batched pass independent of what ran before. (None, 0) for a model without them.
    """
    inner = getattr(model, "model", None)
    get_rope_index = getattr(inner, "get_rope_index", None)
    if get_rope_index is None or inputs.get("image_grid_thw") is None:
        return None, 0
    params = inspect.signature(get_rope_index).parameters
    kwargs = {k: v for k, v in inputs.items() if k in params and k != "input_ids"}
    positions, deltas = get_rope_index(inputs["input_ids"], **kwargs)
    return positions, int(deltas.reshape(-1)[0])
