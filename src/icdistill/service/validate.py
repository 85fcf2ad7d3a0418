"""One validation for everything a client sends as text: prompts, options, labels, JSON bodies, and the
demos that enter the pool by any door (``POST /v1/demos``, a person's label, an import's zip lines or
SQLite rows). The checks raise ``ValueError`` (pydantic turns it into a 422); ``demo_record`` and
``checked_label`` raise the service's own 422s.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image

from icdistill.service.errors import bad_request, unprocessable

MAX_PROMPT_CHARS = 4000
MAX_LABEL_CHARS = 500
MAX_OPTIONS = 1000
MAX_NAME_CHARS = 200  # a demo's query id and teacher name


def parse_json(data: bytes | str, what: str = "the body") -> Any:
    """``json.loads`` that answers 400 for bad or too deeply nested JSON (a RecursionError was a 500)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise bad_request(f"{what} is nested too deeply", "bad_json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"{what} is not valid JSON: {e}", "bad_json") from e


def token_counter(student: Any) -> Callable[[str], int]:
    """How many tokens a text costs the student: its own ``count_tokens``, its tokenizer (a local LM's
    ``lm() -> (model, tokenizer)``), else UTF-8 bytes / 4 (about a token for 4 bytes of English; a
    byte-level tokenizer never makes more tokens than bytes). Characters are no measure: 4000
    combining marks cost 13x the time of 4000 ASCII letters."""
    count = getattr(student, "count_tokens", None)
    if callable(count):
        return count
    lm = getattr(student, "lm", None)
    if callable(lm):
        return lambda text: len(lm()[1](text, add_special_tokens=False)["input_ids"])
    return lambda text: -(-len(text.encode("utf-8", "surrogatepass")) // 4)


def check_prompt_cost(text: str, count: Callable[[str], int], limit: int) -> None:
    n = count(text)
    if n > limit:
        raise unprocessable(
            f"the prompt costs {n} tokens; the limit is {limit} (--max-prompt-tokens)", "prompt_too_long"
        )


def one_line(text: str) -> str:
    return " ".join(text.split())


def check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str):
        raise ValueError("the prompt must be a string")
    clean = prompt.strip()
    if not clean:
        raise ValueError("the prompt is empty")
    if len(clean) > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt is longer than {MAX_PROMPT_CHARS} characters")
    return clean


def check_options(v: Any) -> list[str] | None:
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(o, str) for o in v):
        raise ValueError("options must be a list of strings")
    if not v:
        raise ValueError("options must be a non-empty list of strings, or left out for open questions")
    if len(v) > MAX_OPTIONS:
        raise ValueError(f"at most {MAX_OPTIONS} options")
    clean = [one_line(o) for o in v]
    if any(not o for o in clean):
        raise ValueError("options must not be empty strings")
    if any(not visible(o) for o in clean):
        raise ValueError("options must have a visible character (not only spaces or invisible ones like U+200B)")
    if any(len(o) > MAX_LABEL_CHARS for o in clean):
        raise ValueError(f"an option is longer than {MAX_LABEL_CHARS} characters")
    if len(set(clean)) != len(clean):
        raise ValueError("options must be unique")
    # a label names its option case aside, and a person cannot see an invisible character: options
    # that differ only so ("Bag" and "bag", "Bag" and "Bag\u200b") could not be told apart
    keys = [visible(o).casefold() for o in clean]
    if len(set(keys)) != len(keys):
        same = next(o for o, k in zip(clean, keys, strict=True) if keys.count(k) > 1)
        raise ValueError(f"options must differ by more than case or invisible characters (e.g. {same!r})")
    return clean


INVISIBLE = {"Cf", "Cc", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"}


def visible(text: str) -> str:
    """``text`` without what a reader cannot see: spaces, format characters (U+200B), controls."""
    return "".join(c for c in text if unicodedata.category(c) not in INVISIBLE)


def check_label(label: Any, options: list[str] | None) -> str:
    """The label on one line; with options, the option it names (case aside), never a near one."""
    if not isinstance(label, str):
        raise ValueError("the label must be a string")
    clean = one_line(label)
    if not clean:
        raise ValueError("the label is empty")
    if len(clean) > MAX_LABEL_CHARS:
        raise ValueError(f"the label is longer than {MAX_LABEL_CHARS} characters")
    if options:
        same = [clean] if clean in options else [o for o in options if o.casefold() == clean.casefold()]
        if len(same) != 1:
            raise ValueError(f"label {clean!r} is not one of the options {options}")
        clean = same[0]
    return clean


def checked_label(label: Any, options: list[str] | None) -> str:
    try:
        return check_label(label, options)
    except ValueError as e:
        raise unprocessable(str(e), "bad_label") from e


def _name(value: Any, what: str, default: str) -> str:
    if value is None or value == "":
        return default
    if not isinstance(value, str) or len(value) > MAX_NAME_CHARS:
        raise ValueError(f"{what} must be a string of at most {MAX_NAME_CHARS} characters")
    return value


def _votes(value: Any, label: str) -> dict[str, int]:
    if value is None or value == {}:
        return {label: 1}
    if not isinstance(value, dict) or len(value) > MAX_OPTIONS:
        raise ValueError("votes must be an object of answers to counts")
    for k, n in value.items():
        if len(k) > MAX_LABEL_CHARS or isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError("votes must map answers to counts (integers >= 0)")
    return dict(value)


def _agreement(value: Any) -> float:
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("agreement must be a number in [0, 1]")
    if not 0.0 <= value <= 1.0:
        raise ValueError("agreement must be a number in [0, 1]")
    return float(value)


@dataclass(frozen=True)
class DemoRecord:
    """A demo checked for the pool, whichever way it came in."""

    image: Image.Image | None
    prompt: str
    label: str
    options: list[str] | None
    query_id: str
    teacher: str
    votes: dict[str, int]
    agreement: float
    where: str = ""  # where it came from, for errors found later ("demos.jsonl line 3")


def demo_record(
    fields: Mapping[str, Any], image: Image.Image | None, query_id: str, teacher: str, where: str = ""
) -> DemoRecord:
    """``fields``: prompt, label, options, and optionally query_id, teacher, votes, agreement (an
    export's or a pool's values; ``query_id`` and ``teacher`` are the defaults). Raises a 422 naming
    ``where`` (e.g. "demos.jsonl line 3")."""
    try:
        options = check_options(fields.get("options"))
        label = check_label(fields.get("label"), options)
        return DemoRecord(
            image=image,
            prompt=check_prompt(fields.get("prompt")),
            label=label,
            options=options,
            query_id=_name(fields.get("query_id"), "query_id", query_id),
            teacher=_name(fields.get("teacher"), "teacher", teacher),
            votes=_votes(fields.get("votes"), label),
            agreement=_agreement(fields.get("agreement")),
            where=where,
        )
    except ValueError as e:
        raise unprocessable(f"{where}: {e}" if where else str(e), "invalid_demo") from e
