"""The floating-point precision a model runs in, one rule for every backend.

bf16 keeps fp32's exponent range, so a model trained in bf16 (SmolLM2, SmolVLM, Qwen2-VL) reads the
same in it up to rounding. Where the hardware multiplies bf16 matrices natively it is the faster
choice: GPUs with bf16, and CPUs with Intel AMX (Sapphire Rapids and later), where the default
student's batched option scoring runs about 3x faster than in fp32 (BENCHMARKS.md §3). Elsewhere a
CPU emulates half precision, slower than fp32, so fp32 stays the CPU default there.
"""

from __future__ import annotations

from types import MappingProxyType

import torch

DTYPES = MappingProxyType({"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16})


def cpu_has_bf16_matmul() -> bool:
    """True where this CPU multiplies bf16 matrices in hardware (AMX tiles)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except Exception:  # an old or unusual build: assume emulation
        return False


def default_dtype(device: str) -> torch.dtype:
    """bf16 (fp16 without it) on a GPU, fp16 on Apple's MPS, bf16 on an AMX CPU, fp32 on other CPUs."""
    if device.startswith("cuda"):  # emulated bf16 (e.g. a V100 or T4) is slower than fp16
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_bf16_matmul() else torch.float32


def parse_dtype(name: str | None, device: str) -> torch.dtype:
    """``float32`` / ``bfloat16`` / ``float16``, or ``None`` for ``default_dtype``."""
    if name is None:
        return default_dtype(device)
    if name not in DTYPES:
        raise ValueError(f"dtype={name} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]
