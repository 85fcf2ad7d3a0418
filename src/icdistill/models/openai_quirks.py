"""Per-server quirks of OpenAI-compatible APIs: reasoning models (max_completion_tokens, default
temperature only), servers that refuse a parameter, ``n`` or logprobs; what is refused is adapted to once."""

from __future__ import annotations

import logging
import re
from typing import TypeVar

from icdistill.models.openai_parse import (
    ErrorInfo,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


# Reasoning models take max_completion_tokens (which also pays the hidden reasoning) and only the
# default temperature.
_REASONING = re.compile(r"^(o\d+|gpt-5)(?!-chat)([-.].*)?$")


def is_reasoning_model(model: str) -> bool:
    """OpenAI o-series and gpt-5 models (not gpt-5-chat): no max_tokens, no custom temperature."""
    return bool(_REASONING.match(model.rsplit("/", 1)[-1]))


class _LogprobsRejected(Exception):
    """The server refused the logprobs parameters (HTTP 400); the student retries without them."""


class _NRejected(Exception):
    """The server refuses ``n`` > 1 (llama.cpp: "Only one completion choice is allowed")."""


class _Unsupported(Exception):
    """HTTP 400 naming a parameter the model does not take (OpenAI reasoning models)."""

    def __init__(self, param: str, text: str) -> None:
        super().__init__(text)
        self.param = param


_PARAM_IN_TEXT = re.compile(r"unsupported (?:parameter|value): '(\w+)'", re.IGNORECASE)


def _unsupported_param(info: ErrorInfo) -> str | None:
    """The parameter a 400 says the model does not take, if it says so."""
    if info.code in ("unsupported_parameter", "unsupported_value") and info.param:
        return info.param
    m = _PARAM_IN_TEXT.search(info.message)
    return m.group(1) if m else None


def _refuses_n(info: ErrorInfo) -> bool:
    msg = info.message.lower()
    return "only one completion choice" in msg or info.param == "n"


class _Quirks:
    """What ``OpenAIChatModel`` learns a server refuses and stops sending (a mixin over the
    model's state)."""

    def _adapt(self, param: str) -> bool:
        """Stop sending what the model refuses (once; later requests know). False: nothing to change."""
        if param == "max_tokens" and self._token_param == "max_tokens":
            self._token_param = "max_completion_tokens"
        elif param == "max_completion_tokens" and self._token_param == "max_completion_tokens":
            self._token_param = "max_tokens"
        elif param == "temperature" and self._send_temperature:
            self._send_temperature = False
            log.warning("%s: the model takes only its default temperature; sampling at that", self.name)
            return True
        else:
            return False
        log.info("%s: the model takes %s", self.name, self._token_param)
        return True
