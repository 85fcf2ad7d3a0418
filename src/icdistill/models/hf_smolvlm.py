"""The SmolVLM / Idefics3 family of the ``hf:`` backend: its model types and processors, and how its
images are sized and tiled (the ``max_side`` and ``split`` options)."""

from __future__ import annotations

import math
from typing import Any

# config.model_type -> family
MODEL_TYPES = {"idefics3": "idefics3", "smolvlm": "idefics3"}
# processor classes per model_type (rebuilt without a video processor; see ``hf_load.load_processor``)
PROCESSORS = {"idefics3": "Idefics3Processor", "smolvlm": "SmolVLMProcessor"}


def image_kwargs(ip: Any, opts: Any) -> dict[str, Any]:
    """The processor's image arguments for this family (``ip``: its image processor)."""
    kwargs: dict[str, Any] = {}
    # Idefics3 scales every image *up* to size["longest_edge"] and tiles it; with max_side the
    # target is cut to whole tiles covering max_side, so small images stay few tokens.
    tile = (getattr(ip, "max_image_size", None) or {}).get("longest_edge")
    own = (getattr(ip, "size", None) or {}).get("longest_edge")
    if opts.max_side and tile:
        edge = max(tile, math.ceil(opts.max_side / tile) * tile)
        # never above the checkpoint's own resolution: its vocabulary has row/col tokens only
        # for the tile grid that resolution gives
        kwargs["size"] = {"longest_edge": min(edge, own) if own else edge}
    if opts.split is not None:
        kwargs["do_image_splitting"] = opts.split
    return kwargs
