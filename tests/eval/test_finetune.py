"""The online LoRA baseline on the real SmolLM2-135M (slow: loads the model)."""

import pytest
from PIL import Image

from fakes import FakeTagger
from icdistill.errors import ICDError
from icdistill.eval.finetune import LoRAStudent, training_text
from icdistill.models.smollm2 import SmolLM2Student
from icdistill.models.smollm2_load import load_smollm2
from icdistill.types import Query, image_digest

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def lm():
    return load_smollm2()


@pytest.mark.slow
def test_learning_a_label_moves_the_answer_and_leaves_the_base_model_alone(lm):
    img = Image.new("RGB", (8, 8), (250, 250, 0))
    tagger = FakeTagger({image_digest(img): [("sandal", 0.9)]})
    base = SmolLM2Student(tagger, lm=lm, calibrate=False)
    q = Query(id="q", image=img, prompt="What item of clothing is shown?", options=("Sandal", "Pullover"))

    def margin(student) -> float:
        s = student.predict(q, []).option_scores
        return s["Pullover"] - s["Sandal"]

    before_base = margin(base)
    student = LoRAStudent(base, steps=6, lr=5e-3, seed=0)
    before = margin(student)
    assert before == pytest.approx(before_base, abs=1e-4)  # LoRA starts as the identity
    prefix, _ = student._example(q, "Pullover")
    assert student.tokenizer.decode(prefix) == base.prompt_for(q, ())  # trained where it is scored
    student.learn(q, "Pullover")
    assert margin(student) > before + 0.5
    assert margin(base) == pytest.approx(before_base, abs=1e-5)  # a private copy was trained
    stats = student.training_stats()
    assert stats["train_steps"] == 6 and stats["train_examples"] == 1 and stats["train_seconds"] > 0


def test_options_are_checked():
    assert LoRAStudent.parse_options({"steps": "4", "lr": "0.01"}) == {"steps": 4, "lr": 0.01}
    with pytest.raises(ICDError, match="not a number"):
        LoRAStudent.parse_options({"steps": "many"})
    with pytest.raises(ICDError, match="local:smollm2"):
        LoRAStudent.from_student(object())


def _student():
    img = Image.new("RGB", (8, 8), (250, 250, 0))
    tagger = FakeTagger({image_digest(img): [("sandal", 0.9)]})
    q = Query(id="q", image=img, prompt="What item of clothing is shown?", options=("Sandal", "Pullover"))
    return SmolLM2Student(tagger, lm=(object(), object()), calibrate=False), q


def test_training_prompt_is_the_prompt_the_student_is_scored_with():
    # it trained on "Image: <tags>\nAnswer:" and was scored after the question and options lines
    student, q = _student()
    prompt, target = training_text(student, q, "Pullover")
    assert prompt == student.prompt_for(q, ()) and "Options: Sandal, Pullover" in prompt
    assert target == " Pullover\n"
    open_q = Query(id="o", image=q.image, prompt="What colour is it?")
    assert training_text(student, open_q, "yellow") == (student.prompt_for(open_q, ()), " yellow\n")


def test_finetune_online_is_seeded_by_the_stream_seed(monkeypatch):
    # every seed trained with seed 0
    from icdistill.eval.methods import METHODS, parse_method
    from icdistill.runner import Parts, RunConfig

    got = []
    monkeypatch.setattr(LoRAStudent, "from_student", classmethod(lambda cls, s, **kw: got.append(kw) or s))
    m = METHODS["finetune-online"]
    for seed in (0, 3):
        cfg = m.run_config(RunConfig(), parse_method("finetune-online:steps=2"), 0.1, seed)
        m.wrap(Parts(object(), object(), object()), cfg, {"steps": "2"})
    assert [(k["seed"], k["steps"]) for k in got] == [(0, 2), (3, 2)]
