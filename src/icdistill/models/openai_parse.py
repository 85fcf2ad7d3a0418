"""Parsing Chat Completions responses: choices to a compact JSON-able form (refusals, filtered and cut
answers marked as failed), answers matched to options, token entropies and option scores from
logprobs, votes of sampled answers, and error bodies."""

from __future__ import annotations

import json
import logging
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from icdistill.types import Prediction, Query, Usage

log = logging.getLogger(__name__)
T = TypeVar("T")


_STRIP = " \t\r\n\"'`.,;:!?()[]{}*_"


def normalise(text: str) -> str:
    """Case-, width- and whitespace-insensitive form used to compare answers with options."""
    s = unicodedata.normalize("NFKC", text).casefold()
    return re.sub(r"\s+", " ", s).strip(_STRIP)


def closest_option(answer: str, options: Sequence[str]) -> str | None:
    """The option ``answer`` most plausibly names, or None when none (or several) is close enough."""
    from icdistill.teacher import match_option  # one matcher for every backend and the vote

    return match_option(answer, options)


def token_entropy(entry: Mapping[str, Any]) -> float:
    """Entropy (nats) of one generated token over its top alternatives, renormalised."""
    lps = [lp for _, lp in entry.get("top") or []]
    if len(lps) >= 2:
        m = max(lps)
        ps = [math.exp(lp - m) for lp in lps]
        z = sum(ps)
        return float(-sum(p / z * math.log(p / z) for p in ps if p > 0))
    # No alternatives reported: treat "not this token" as one outcome (a lower bound).
    p = min(max(math.exp(entry["logprob"]), 1e-12), 1 - 1e-12)
    return float(-(p * math.log(p) + (1 - p) * math.log(1 - p)))


def first_token_scores(
    entries: Sequence[Mapping[str, Any]], options: Sequence[str]
) -> dict[str, float] | None:
    """Option log-probabilities from the first informative token's top_logprobs.

    None when the generated first token does not name exactly one option (e.g. options sharing a
    first token, or a chatty "The answer is ..."): the caller then scores by sampled votes.
    Options absent from the top list get the unreported mass, capped by the least likely listed
    token, so every score is finite.
    """
    norms = {o: normalise(o) for o in options}

    def targets(token: str) -> list[str]:
        t = normalise(token)
        if not t:
            return []
        exact = [o for o, n in norms.items() if n == t]
        return exact or [o for o, n in norms.items() if n.startswith(t)]

    entry = next((e for e in entries if normalise(e["token"])), None)
    if entry is None or len(targets(entry["token"])) != 1:
        return None
    tops = list(entry.get("top") or [])
    if not any(tok == entry["token"] for tok, _ in tops):
        tops.append((entry["token"], entry["logprob"]))
    mass = dict.fromkeys(options, 0.0)
    for tok, lp in tops:
        ts = targets(tok)
        for o in ts:
            mass[o] += math.exp(lp) / len(ts)
    listed = [math.exp(lp) for _, lp in tops]
    unmatched = [o for o in options if mass[o] <= 0]
    fill = min(max(0.0, 1.0 - sum(listed)) / len(unmatched), min(listed)) if unmatched else 0.0
    return {o: math.log(max(mass[o] if mass[o] > 0 else fill, 1e-12)) for o in options}


def vote_scores(answers: Sequence[str], options: Sequence[str], alpha: float = 0.5) -> dict[str, float]:
    """Log of the add-``alpha`` smoothed vote share of each option (finite even with no votes)."""
    votes = Counter(o for o in (closest_option(a, options) for a in answers) if o is not None)
    total = sum(votes.values()) + alpha * len(options)
    return {o: math.log((votes[o] + alpha) / total) for o in options}


def _best(scores: Mapping[str, float], prefer: str | None) -> str:
    top = max(scores.values())
    return prefer if prefer in scores and scores[prefer] == top else max(scores, key=scores.__getitem__)


@dataclass(frozen=True)
class ErrorInfo:
    """An error reply's fields, from OpenAI's ``{"error": {...}}``, vLLM's older top-level
    ``{"object": "error", "message": ...}``, FastAPI's ``{"detail": ...}`` or a plain-text body."""

    message: str
    code: str = ""
    param: str = ""
    type: str = ""


def error_info(resp: httpx.Response) -> ErrorInfo:
    try:
        data = resp.json()
    except ValueError:
        data = None
    src: Any = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):
            src = err
        elif isinstance(err, str):
            src = {"message": err, **{k: data.get(k) for k in ("code", "param", "type")}}
        elif "message" in data:
            src = data
        elif "detail" in data:
            src = {
                "message": json.dumps(data["detail"])
                if not isinstance(data["detail"], str)
                else data["detail"]
            }
    if src is None:
        src = {"message": resp.text}

    def text(key: str) -> str:
        value = src.get(key)
        return "" if value is None else " ".join(str(value).split())

    return ErrorInfo(
        message=text("message")[:300] or resp.reason_phrase,
        code=text("code"),
        param=text("param"),
        type=text("type"),
    )


def _finite(x: Any) -> float:
    v = float(x)
    return v if math.isfinite(v) else -1e4


def _parse_choice(raw: Any) -> dict[str, Any]:
    """The parts of one API choice we use, in a compact JSON-able form (also the cache value).

    ``failed`` is set for a choice that is no answer: a refusal, a content-filter block, an answer cut
    at the token limit, or no content at all. Such choices are counted, never cached or pooled.
    """
    msg = raw["message"]
    content = msg.get("content")
    if isinstance(content, list):  # some servers return content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    entries = None
    lp = raw.get("logprobs")
    if isinstance(lp, dict) and isinstance(lp.get("content"), list):
        entries = [
            {
                "token": str(e["token"]),
                "logprob": _finite(e["logprob"]),
                "top": [[str(t["token"]), _finite(t["logprob"])] for t in e.get("top_logprobs") or []],
            }
            for e in lp["content"]
        ]
    out: dict[str, Any] = {"content": content if isinstance(content, str) else "", "logprobs": entries}
    refusal, finish = msg.get("refusal"), raw.get("finish_reason")
    if isinstance(refusal, str) and refusal.strip():
        out["failed"] = f"refused ({' '.join(refusal.split())[:80]})"
    elif finish == "content_filter":
        out["failed"] = "blocked by the content filter"
    elif finish == "length":
        out["failed"] = "cut off at the token limit (raise max_tokens)"
    elif not isinstance(content, str):
        out["failed"] = "no answer text in the reply"
    return out


class _Parsing:
    """How ``OpenAIChatModel`` reads answers: unusable choices counted, logprobs to a prediction
    (a mixin over the model's state)."""

    def _count_failed(self, choices: list[dict[str, Any]], usage: Usage) -> list[str]:
        failed = [str(c["failed"]) for c in choices if c.get("failed")]
        if failed:
            usage.faults += len(failed)
            log.warning("%s: %d of %d answers unusable: %s", self.name, len(failed), len(choices), failed[0])
        return failed

    def _from_logprobs(self, query: Query, answer: str, entries: list[dict[str, Any]]) -> Prediction | None:
        logprobs = [e["logprob"] for e in entries]
        entropies = [token_entropy(e) for e in entries]
        if not query.options:
            return Prediction(answer=answer, token_logprobs=logprobs, token_entropies=entropies)
        scores = first_token_scores(entries, query.options)
        named = closest_option(answer, query.options)
        # The first token only matches options by prefix ("b" of "brown" -> blue): its scores count
        # only when the whole answer names the option they favour.
        if scores is None or named is None or max(scores, key=scores.__getitem__) != named:
            return None
        best = _best(scores, named)
        return Prediction(
            answer=best, option_scores=scores, token_logprobs=logprobs, token_entropies=entropies
        )
