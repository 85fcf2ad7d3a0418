"""Deterministic offline fakes of every protocol; each passes the same conformance checks as real backends."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from icdistill.errors import TeacherError
from icdistill.types import (
    IMAGE,
    IMAGE_TEXT,
    TEXT,
    Demo,
    GateContext,
    GateDecision,
    Prediction,
    Query,
    TeacherResponse,
    Usage,
)


def _text_vec(text: str, dim: int = 16) -> np.ndarray:
    seed = int(hashlib.sha1(text.encode()).hexdigest()[:8], 16)
    v = np.random.default_rng(seed).standard_normal(dim)
    return (v / np.linalg.norm(v)).astype(np.float32)


class FakeEmbedder:
    """Image vector = mean RGB (plus a constant), text vector = a hash-seeded random unit vector."""

    def embed_query(self, query: Query) -> dict[str, np.ndarray]:
        out = {TEXT: _text_vec(query.prompt)}
        if query.image is not None:
            rgb = np.asarray(query.image.convert("RGB"), dtype=np.float32).reshape(-1, 3).mean(0) / 255.0
            out[IMAGE] = np.concatenate([rgb, [0.05]]).astype(np.float32)
            out[IMAGE_TEXT] = _text_vec(f"colour {int(rgb.argmax())}")
        return out

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([_text_vec(t) for t in texts])


class FakeStudent:
    """Copies the answer of the demo nearest the query (the last one: the most similar by default);
    without demos it is unsure."""

    name = "fake-student"

    def __init__(self, confident: float = 2.0) -> None:
        self.confident = confident
        self.calls = 0

    def predict(self, query: Query, demos: Sequence[Demo]) -> Prediction:
        self.calls += 1
        options = query.options or ("yes", "no")
        scores = {o: 0.0 for o in options}
        if demos and demos[-1].answer in scores:
            scores[demos[-1].answer] = self.confident
        answer = max(scores, key=scores.__getitem__)
        if query.options is None:
            return Prediction(answer=answer, token_logprobs=[-0.1], token_entropies=[0.5 if demos else 2.0])
        return Prediction(answer=answer, option_scores=scores)


class FakeTeacher:
    """Answers with the query's label; ``wrong_every`` makes every k-th sample wrong; ``fail`` raises."""

    def __init__(self, wrong_every: int = 0, fail: bool = False, name: str = "fake-teacher") -> None:
        self.name = name
        self.wrong_every = wrong_every
        self.fail = fail
        self.samples = 0

    def sample(self, query: Query, n: int) -> TeacherResponse:
        if self.fail:
            raise TeacherError("fake teacher is down")
        out = []
        for _ in range(n):
            self.samples += 1
            wrong = self.wrong_every and self.samples % self.wrong_every == 0
            opts = list(query.options or ())
            label = query.label or ""
            if wrong and opts:
                label = next(o for o in opts if o != query.label)
            out.append(label)
        return TeacherResponse(answers=out, usage=Usage(calls=1, completion_tokens=n))


def colour_folder(root, n_per_class: int = 8, size: int = 16, seed: int = 0):
    """A folder dataset of noisy solid-colour images, one sub-folder per colour name."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200), "yellow": (220, 210, 40)}
    for name, rgb in colours.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = np.clip(np.array(rgb) + rng.normal(0, 25, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{i}.png")
    return root


class RecordingStudent(FakeStudent):
    """A FakeStudent that records what it was asked; ``count_answers`` makes open answers differ per call."""

    name = "recording-student"

    def __init__(self, confident: float = 2.0, count_answers: bool = False) -> None:
        super().__init__(confident)
        self.count_answers = count_answers
        self.seen: list[tuple[Query, list[Demo]]] = []

    def predict(self, query: Query, demos: Sequence[Demo]) -> Prediction:
        self.seen.append((query, list(demos)))
        pred = super().predict(query, demos)
        if self.count_answers and query.options is None:
            pred.answer = f"answer {self.calls}"
        return pred


class LocalServer:
    """``with LocalServer(app) as base_url``: uvicorn on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, app) -> None:
        import socket

        import uvicorn

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = None

    def __enter__(self) -> str:
        import threading
        import time

        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._sock.close()


class FakeTags:
    """Tagger output: ``describe(k)`` renders the top-k labels like ``"sandal 90%, clog 5%"``."""

    def __init__(self, labels: Sequence[tuple[str, float]]) -> None:
        self.labels = sorted(labels, key=lambda lp: -lp[1])

    def describe(self, k: int = 5) -> str:
        return ", ".join(f"{name} {p:.0%}" for name, p in self.labels[:k])


class FakeTagger:
    """Stand-in for the EfficientNet tagger: tags by the image's dominant colour (red/green/blue), or
    by a fixed ``table`` of labels keyed by ``icdistill.types.image_digest``."""

    def __init__(self, table: dict[str, Sequence[tuple[str, float]]] | None = None) -> None:
        self.table = dict(table or {})
        self.calls = 0

    def tag(self, image) -> FakeTags:
        from icdistill.types import image_digest

        self.calls += 1
        fixed = self.table.get(image_digest(image))
        if fixed is not None:
            return FakeTags(fixed)
        rgb = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0) / 255.0
        p = np.exp(8 * rgb) / np.exp(8 * rgb).sum()
        return FakeTags(list(zip(("red", "green", "blue"), p.tolist(), strict=True)))


COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200), "yellow": (220, 210, 40)}


class ColourStudent:
    """Knows colours: scores each option by how close the image's mean RGB is to that colour name's RGB.

    Served behind ``serve_model`` it plays a competent teacher for ``colour_folder`` data.
    """

    name = "colour-expert"

    def predict(self, query: Query, demos: Sequence[Demo]) -> Prediction:
        rgb = np.asarray(query.image.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0)
        options = query.options or tuple(COLOURS)
        scores = {
            o: -float(np.linalg.norm(rgb - np.array(COLOURS.get(o, (128, 128, 128))))) / 20.0 for o in options
        }
        answer = max(scores, key=scores.__getitem__)
        if query.options is None:
            return Prediction(answer=answer, token_logprobs=[-0.1], token_entropies=[0.2])
        return Prediction(answer=answer, option_scores=scores)


class CopyingColourStudent:
    """Knows colours alone (``ColourStudent``), but with demos in its prompt copies the nearest one:
    the small VLM that leans on its demos, whose ICL reading is wrong wherever the pool lacks the
    query's class."""

    name = "copying-colour-student"

    def __init__(self) -> None:
        self.alone = ColourStudent()
        self.calls = {"icl": 0, "zero-shot": 0}

    def predict(self, query: Query, demos: Sequence[Demo]) -> Prediction:
        if not demos:
            self.calls["zero-shot"] += 1
            return self.alone.predict(query, demos)
        self.calls["icl"] += 1
        if query.options is None:  # an open question: it says the nearest demo's answer
            return Prediction(demos[-1].answer, token_logprobs=[-0.1], token_entropies=[0.2])
        scores = dict.fromkeys(query.options, 0.0)
        scores[demos[-1].answer] = 3.0
        return Prediction(max(scores, key=scores.__getitem__), option_scores=scores)


class PositionsGate:
    """Asks the teacher exactly at the given stream positions."""

    def __init__(self, positions: set[int]) -> None:
        self.positions = positions

    def decide(self, uncertainty: float, ctx: GateContext) -> GateDecision:
        return GateDecision(ctx.position in self.positions, "scripted")

    def observe(self, uncertainty: float, ctx: GateContext, asked: bool) -> None:
        pass


class GatedTeacher(FakeTeacher):
    """A FakeTeacher that answers only once ``release()`` is called (a slow teacher, under test control)."""

    def __init__(self, **kwargs) -> None:
        import threading

        super().__init__(**kwargs)
        self._open = threading.Event()
        self.started = 0

    def release(self) -> None:
        self._open.set()

    def sample(self, query: Query, n: int) -> TeacherResponse:
        self.started += 1
        if not self._open.wait(timeout=30):
            raise TeacherError("gated teacher was never released")
        return super().sample(query, n)


def wait_for(done: Callable[[], object], what: str, limit_s: float = 300.0) -> None:
    """Until ``done()`` (an event: a notification applied, a row or file written). Tests wait on the
    event, never on the clock: the limit only stops a test that would hang, far past anything a busy
    machine needs."""
    deadline = time.monotonic() + limit_s
    while not done():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


def first_to(flag: str) -> bool:
    """Whether this process is the first to get here: it creates ``flag`` (with its pid) atomically,
    so of two actors arriving at the same moment exactly one does (a check-then-write let both)."""
    try:
        fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True
