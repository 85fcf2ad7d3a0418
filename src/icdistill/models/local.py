"""The shipped offline models: ``local:smollm2`` (student) and ``local:conse`` (embedder), sharing one tagger."""

from __future__ import annotations

from typing import Any

from icdistill.models.registry import ModelContext, Spec
from icdistill.types import SpecError

STUDENTS = {"smollm2": "SmolLM2-135M-Instruct reading EfficientNet-Lite0 tags, label log-likelihood scoring"}
EMBEDDERS = {"conse": "EfficientNet-Lite0 features (image), MiniLM (text), ConSE image-in-text-space"}


def shared_tagger(ctx: ModelContext) -> Any:
    from icdistill.models.efficientnet import ImageTagger

    return ctx.get_or_create("tagger", ImageTagger)


def from_spec(spec: Spec, role: str, ctx: ModelContext) -> Any:
    if role == "student":
        if spec.target != "smollm2":
            raise SpecError(f"unknown local student {spec.target!r}; available: {', '.join(STUDENTS)}")
        from icdistill.models.smollm2 import SmolLM2Student

        unknown = set(spec.options) - {"max_tags", "score"}
        if unknown:
            raise SpecError(
                f"spec {spec.raw!r}: unknown option(s) {', '.join(sorted(unknown))}; known: max_tags, score"
            )
        kwargs: dict[str, Any] = {}
        if "max_tags" in spec.options:
            kwargs["max_tags"] = spec.opt("max_tags", cast=int)
        if "score" in spec.options:
            kwargs["score"] = spec.opt("score")
        return ctx.get_or_create(f"student:{spec.raw}", lambda: SmolLM2Student(shared_tagger(ctx), **kwargs))
    if spec.target != "conse":
        raise SpecError(f"unknown local embedder {spec.target!r}; available: {', '.join(EMBEDDERS)}")
    from icdistill.embed import ConSEEmbedder, MiniLMTextEncoder

    return ctx.get_or_create(
        "embedder:conse",
        lambda: ConSEEmbedder(shared_tagger(ctx), ctx.get_or_create("minilm", MiniLMTextEncoder)),
    )
