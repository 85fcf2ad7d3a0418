"""One registry that turns model spec strings into Student, Teacher and Embedder backends.

Spec grammar: ``scheme:target[?key=value&key=value]`` (``,`` also separates options). A value that
holds ``,``, ``&`` or ``?`` is quoted: ``system="Be brief, please."`` (``\\"`` is a quote inside). The
options start at the first ``?``. Examples: ``local:smollm2``,
``reference``, ``reference:noise=0.2``, ``hf:HuggingFaceTB/SmolVLM-256M-Instruct?dtype=bfloat16``,
``openai:gpt-4o@https://api.openai.com/v1``, ``local:conse`` (embedder).
Backends are imported lazily so that a missing optional dependency only affects its own scheme.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from icdistill.errors import SpecError

Role = Literal["student", "teacher", "embedder"]


@dataclass(frozen=True)
class Spec:
    raw: str
    scheme: str
    target: str
    options: dict[str, str] = field(default_factory=dict)

    def opt(self, key: str, default: Any = None, cast: Callable[[str], Any] = str) -> Any:
        if key not in self.options:
            return default
        try:
            return cast(self.options[key])
        except ValueError as e:
            raise SpecError(
                f"spec {self.raw!r}: option {key}={self.options[key]!r} is not valid ({e})"
            ) from e


_SEPARATORS = ",&"
_QUOTES = "\"'"


def parse_options(text: str, raw: str) -> dict[str, str]:
    """``key=value`` pairs separated by ``,`` or ``&`` (quoted values may hold both); ``raw`` names
    the whole spec in errors. Also reads the keys of ``--dataset hf:...``."""
    out: dict[str, str] = {}
    i = 0
    while i < len(text):
        if text[i] in _SEPARATORS:
            i += 1
            continue
        j = i
        while j < len(text) and text[j] not in _SEPARATORS and text[j] != "=":
            j += 1
        key = text[i:j].strip()
        if j >= len(text) or text[j] != "=":
            raise SpecError(f"spec {raw!r}: option {key!r} must be key=value")
        j += 1
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] in _QUOTES:
            value, i = _quoted(text, j, raw)
            while i < len(text) and text[i] == " ":
                i += 1
            if i < len(text) and text[i] not in _SEPARATORS:
                raise SpecError(f"spec {raw!r}: option {key!r}: text after the closing quote")
        else:
            i = j
            while i < len(text) and text[i] not in _SEPARATORS:
                i += 1
            value = text[j:i].strip()
        out[key] = value
    return out


def _quoted(text: str, start: int, raw: str) -> tuple[str, int]:
    """The value of the quoted string opening at ``start`` (backslash escapes) and the index after it."""
    quote, chars, i = text[start], [], start + 1
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            chars.append(text[i + 1])
            i += 2
        elif ch == quote:
            return "".join(chars), i + 1
        else:
            chars.append(ch)
            i += 1
    raise SpecError(f"spec {raw!r}: a quoted option value is not closed")


def parse_spec(raw: str) -> Spec:
    raw = raw.strip()
    if not raw:
        raise SpecError("empty model spec")
    scheme, _, body = raw.partition(":")
    target, options = body, {}
    if "?" in body:
        # The first "?": option values may hold "?" (a system prompt), targets do not.
        target, qs = body.split("?", 1)
        options = parse_options(qs, raw)
    elif "=" in body and "/" not in body and "@" not in body:
        # ``reference:noise=0.2``: the body is all options
        target, options = "", parse_options(body, raw)
    return Spec(raw=raw, scheme=scheme.strip().lower(), target=target.strip(), options=options)


@dataclass
class ModelContext:
    """Objects shared between backends resolved for one run (e.g. one image tagger and its cache)."""

    shared: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def get_or_create(self, key: str, factory: Callable[[], Any]) -> Any:
        if key not in self.shared:
            self.shared[key] = factory()
        return self.shared[key]


# scheme -> (module, function, roles it can fill, one-line description)
_BACKENDS: dict[str, tuple[str, str, tuple[Role, ...], str]] = {
    "local": (
        "icdistill.models.local",
        "from_spec",
        ("student", "embedder"),
        "shipped offline models: local:smollm2 (student), local:conse (embedder)",
    ),
    "reference": (
        "icdistill.models.reference",
        "from_spec",
        ("teacher",),
        "the dataset's labels as teacher (an oracle or human annotator); reference:noise=P flips labels",
    ),
    "hf": (
        "icdistill.models.hf_vlm",
        "from_spec",
        ("student", "teacher"),
        "a Hugging Face VLM (SmolVLM/Idefics3, Qwen2-VL, LLaVA-OneVision) from a repo id or folder",
    ),
    "openai": (
        "icdistill.models.openai_api",
        "from_spec",
        ("student", "teacher"),
        "an OpenAI-compatible chat API: openai:<model>@<base_url> (OpenAI, vLLM, Ollama, llama.cpp)",
    ),
}


def check_spec(raw: str, role: Role, purpose: str | None = None) -> Spec:
    """The parsed spec when its scheme exists and can fill ``role`` (cheap: nothing is loaded).
    ``purpose`` says what the spec was for in the refusal (default: "used as <role>")."""
    spec = parse_spec(raw)
    if spec.scheme not in _BACKENDS:
        known = ", ".join(sorted(_BACKENDS))
        raise SpecError(f"unknown model spec {raw!r}: scheme {spec.scheme!r} is not one of {known}")
    roles = _BACKENDS[spec.scheme][2]
    if role not in roles:
        can = ", ".join(f"{scheme}:" for scheme, backend in _BACKENDS.items() if role in backend[2])
        raise SpecError(
            f"spec {raw!r} cannot be {purpose or f'used as {role}'}: scheme {spec.scheme!r} can only be "
            f"{' or '.join(roles)}; use {can}"
        )
    return spec


def resolve(raw: str, role: Role, ctx: ModelContext | None = None) -> Any:
    """Build the backend a spec names for ``role``; raise ``SpecError`` with a clear reason otherwise."""
    spec = check_spec(raw, role)
    module_name, func, _, _ = _BACKENDS[spec.scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SpecError(f"spec {raw!r} needs a package that is not installed: {e}") from e
    return getattr(module, func)(spec, role, ctx or ModelContext())


def resolve_student(raw: str, ctx: ModelContext | None = None) -> Any:
    return resolve(raw, "student", ctx)


def resolve_teacher(raw: str, ctx: ModelContext | None = None) -> Any:
    return resolve(raw, "teacher", ctx)


def resolve_embedder(raw: str, ctx: ModelContext | None = None) -> Any:
    return resolve(raw, "embedder", ctx)


def check_reachable(backend: Any) -> None:
    """Probe a remote backend once (e.g. an API's model list) so that a server that is down fails
    before a run starts; local backends have nothing to probe. Raises ``ICDError``."""
    probe = getattr(backend, "check_reachable", None)
    if callable(probe):
        probe()
