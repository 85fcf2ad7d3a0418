"""Building a Chat Completions request: the prompt with its options (and reading it back), images as
data URIs, the messages (demos as user/assistant turns), the params and the body."""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Sequence
from typing import Any, TypeVar

from PIL import Image

from icdistill.types import Demo, Query, image_digest

T = TypeVar("T")


OPTIONS_PREFIX = "Answer with one of:"


ANSWER_ONLY = "Reply with the answer only."


def format_prompt(prompt: str, options: Sequence[str] | None) -> str:
    """The user text of a turn; ``serve_model`` parses the options line back with ``parse_prompt``."""
    if not options:
        return prompt
    return f"{prompt}\n{OPTIONS_PREFIX} {', '.join(options)}.\n{ANSWER_ONLY}"


def parse_prompt(text: str) -> tuple[str, tuple[str, ...] | None]:
    """Inverse of ``format_prompt``: (prompt without the instruction lines, options or None)."""
    kept: list[str] = []
    options: tuple[str, ...] | None = None
    for line in text.split("\n"):
        s = line.strip()
        if options is None and s.startswith(OPTIONS_PREFIX):
            body = s[len(OPTIONS_PREFIX) :].strip().removesuffix(".")
            options = tuple(o.strip() for o in body.split(", ") if o.strip()) or None
        elif s != ANSWER_ONLY:
            kept.append(line)
    return "\n".join(kept).strip(), options


def encode_image(image: Image.Image, max_side: int = 768, fmt: str = "auto", quality: int = 90) -> str:
    """A base64 data URI of ``image`` shrunk to ``max_side``; JPEG unless it has transparency (or fmt=png)."""
    img = image
    if max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    has_alpha = img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info)
    use_png = fmt == "png" or (fmt == "auto" and has_alpha)
    buf = io.BytesIO()
    if use_png:
        img.save(buf, format="PNG")
        mime = "image/png"
    else:
        img.convert("RGB").save(buf, format="JPEG", quality=quality)
        mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def image_key(image: Image.Image) -> str:
    """A key for the data URI of ``image``: pixels plus the palette and transparency that
    ``image_digest`` (pixel indices only) leaves out, so two palettes never share a URI."""
    if image.mode not in ("P", "PA"):
        return image_digest(image)
    extra = hashlib.sha1(bytes(image.getpalette() or []))
    extra.update(repr(image.info.get("transparency")).encode())
    return f"{image_digest(image)}:{extra.hexdigest()}"


class _Requests:
    """How ``OpenAIChatModel`` builds a request: messages with images, the params that determine
    the answer (the cache key) and the body in this server's names (a mixin over the model's state)."""

    def _image_uri(self, image: Image.Image) -> str:
        key = image_key(image)
        with self._lock:
            if key in self._images:
                self._images.move_to_end(key)
                return self._images[key]
        uri = encode_image(image, self.max_side, self.image_format, self.jpeg_quality)
        with self._lock:
            self._images[key] = uri
            while len(self._images) > 256:  # demos repeat across queries; bound the memory
                self._images.popitem(last=False)
        return uri

    def _user_turn(self, image: Image.Image | None, text: str) -> dict[str, Any]:
        if image is None:
            return {"role": "user", "content": text}
        url: dict[str, Any] = {"url": self._image_uri(image)}
        if self.detail:
            url["detail"] = self.detail
        return {
            "role": "user",
            "content": [{"type": "image_url", "image_url": url}, {"type": "text", "text": text}],
        }

    def build_messages(self, query: Query, demos: Sequence[Demo]) -> list[dict[str, Any]]:
        """system?, then (user image+prompt, assistant answer) per demo, then the query's user turn."""
        messages: list[dict[str, Any]] = []
        if self.system:
            messages.append({"role": "system", "content": self.system})
        for d in demos:
            messages.append(self._user_turn(d.image, format_prompt(d.prompt, query.options)))
            messages.append({"role": "assistant", "content": d.answer})
        messages.append(self._user_turn(query.image, format_prompt(query.prompt, query.options)))
        return messages

    def _params(self, query: Query, temperature: float | None) -> dict[str, Any]:
        """What determines the answer (also the cache key); ``_body`` maps it onto this server's names."""
        params: dict[str, Any] = {"max_tokens": self.max_tokens}
        if temperature is not None:
            params["temperature"] = temperature
        if self.seed is not None:
            params["seed"] = self.seed
        if self.reasoning_effort:
            params["reasoning_effort"] = self.reasoning_effort
        if self.send_options and query.options:
            params["options"] = list(query.options)
        return params

    def _key_params(self, params: dict[str, Any]) -> dict[str, Any]:
        # Without a pinned seed, runs with different --seed must draw fresh samples; run seed 0 adds
        # nothing, so caches written before the run seed was part of the key stay valid.
        if self.seed is None and self.run_seed:
            return params | {"run_seed": self.run_seed}
        return params

    def _body(
        self, messages: list[dict[str, Any]], params: dict[str, Any], k: int, index: int
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        for key, value in params.items():
            if key == "max_tokens":
                body[self._token_param] = value
            elif key != "temperature" or self._send_temperature:
                body[key] = value
        if k > 1:
            body["n"] = k
        elif "seed" in params:
            body["seed"] = params["seed"] + index  # repeated single samples must not be identical
        return body
