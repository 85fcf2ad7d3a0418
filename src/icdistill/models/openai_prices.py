"""What an OpenAI-compatible model costs: list prices per 1M tokens of the common models (a dated
snapshot falls back to its family) and the hosted APIs that bill per token."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TypeVar

import httpx

T = TypeVar("T")


# USD per 1M (input, output) tokens, list prices of the common models (checked 2026-11); a dated
# snapshot falls back to its family by longest prefix. Unlisted models need price_in/price_out.
PRICES: Mapping[str, tuple[float, float]] = MappingProxyType(
    {
        "gpt-4o": (2.5, 10.0),
        "gpt-4o-2024-05-13": (5.0, 15.0),
        "gpt-4o-mini": (0.15, 0.6),
        "chatgpt-4o-latest": (5.0, 15.0),
        "gpt-4.1": (2.0, 8.0),
        "gpt-4.1-mini": (0.4, 1.6),
        "gpt-4.1-nano": (0.1, 0.4),
        "gpt-4-turbo": (10.0, 30.0),
        "gpt-5": (1.25, 10.0),
        "gpt-5-chat-latest": (1.25, 10.0),
        "gpt-5-mini": (0.25, 2.0),
        "gpt-5-nano": (0.05, 0.4),
        "o1": (15.0, 60.0),
        "o1-mini": (1.1, 4.4),
        "o1-pro": (150.0, 600.0),
        "o3": (2.0, 8.0),
        "o3-mini": (1.1, 4.4),
        "o3-pro": (20.0, 80.0),
        "o4-mini": (1.1, 4.4),
    }
)


# Hosted APIs that bill per token: an unknown model there must not be counted as free.
PAID_HOSTS = ("api.openai.com", ".openai.azure.com", "openrouter.ai", "api.together.xyz", "api.groq.com",
              "api.fireworks.ai", "api.deepseek.com", "api.mistral.ai", "generativelanguage.googleapis.com")  # fmt: skip


def known_price(model: str) -> tuple[float, float] | None:
    """(input, output) USD per 1M tokens of a listed model (or a dated snapshot of one), else None."""
    if model in PRICES:
        return PRICES[model]
    family = [k for k in PRICES if model.startswith(k + "-")]
    return PRICES[max(family, key=len)] if family else None


def model_price(model: str) -> tuple[float, float]:
    """(input, output) USD per 1M tokens for a known model, else (0, 0) (local servers are free)."""
    return known_price(model) or (0.0, 0.0)


def is_paid_endpoint(base_url: str) -> bool:
    host = (httpx.URL(base_url).host or "").lower()
    return any(host == h or (h.startswith(".") and host.endswith(h)) for h in PAID_HOSTS)
