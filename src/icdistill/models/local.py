"""The shipped offline models: ``local:smollm2`` (student) and ``local:conse`` (embedder), sharing one tagger."""

from __future__ import annotations

from typing import Any

from icdistill.errors import SpecError
from icdistill.models.registry import ModelContext, Spec

STUDENTS = {"smollm2": "SmolLM2-135M-Instruct reading EfficientNet-Lite0 tags, label log-likelihood scoring"}
EMBEDDERS = {"conse": "EfficientNet-Lite0 features (image), MiniLM (text), ConSE image-in-text-space"}


def _flag(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected 1/0, true/false, on/off, got {text!r}")


def shared_tagger(ctx: ModelContext) -> Any:
    from icdistill.models.efficientnet import ImageTagger

    return ctx.get_or_create("tagger", ImageTagger)


def from_spec(spec: Spec, role: str, ctx: ModelContext) -> Any:
    if role == "student":
        if spec.target != "smollm2":
            raise SpecError(f"unknown local student {spec.target!r}; available: {', '.join(STUDENTS)}")
        from icdistill.models.smollm2 import SmolLM2Student

        casts: dict[str, Any] = {
            "max_tags": int,
            "score": str,
            "calibrate": _flag,
            "zero_shot": str,
            "dtype": str,
        }
        unknown = set(spec.options) - set(casts)
        if unknown:
            raise SpecError(
                f"spec {spec.raw!r}: unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(casts)}"
            )
        kwargs: dict[str, Any] = {k: spec.opt(k, cast=c) for k, c in casts.items() if k in spec.options}
        return ctx.get_or_create(f"student:{spec.raw}", lambda: SmolLM2Student(shared_tagger(ctx), **kwargs))
    if spec.target != "conse":
        raise SpecError(f"unknown local embedder {spec.target!r}; available: {', '.join(EMBEDDERS)}")
    from icdistill.embed import ConSEEmbedder, MiniLMTextEncoder

    return ctx.get_or_create(
        "embedder:conse",
        lambda: ConSEEmbedder(shared_tagger(ctx), ctx.get_or_create("minilm", MiniLMTextEncoder)),
    )
