"""The LLaVA-OneVision family of the ``hf:`` backend: its model type and processor. It takes several
images interleaved with text as they are (no family-specific image arguments or positions); LLaVA-1.5
and LLaVA-NeXT, trained with one image per prompt, are refused (``hf_load.SINGLE_IMAGE``)."""

from __future__ import annotations

# config.model_type -> family
MODEL_TYPES = {"llava_onevision": "llava_onevision"}
# processor classes per model_type (rebuilt without a video processor; see ``hf_load.load_processor``)
PROCESSORS = {"llava_onevision": "LlavaOnevisionProcessor"}
