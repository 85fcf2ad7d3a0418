"""Open questions and captions through `icd eval`, on a manifest built from scikit-image's shipped photos."""

import json

import pytest

from fakes import FakeEmbedder, FakeStudent
from icdistill.eval.harness import EvalConfig, run_eval
from icdistill.eval.scores import corpus_bleu_chrf, exact_match, token_f1
from icdistill.models.reference import ReferenceTeacher
from icdistill.runner import Parts, RunConfig

PHOTOS = {
    "chelsea": ("What animal is this?", "a cat", "a tabby cat lying on a wooden floor"),
    "coffee": ("What is in the cup?", "coffee", "a cup of coffee on a saucer with a spoon"),
    "rocket": ("What vehicle is this?", "a rocket", "a rocket standing on its launch pad"),
    "astronaut": ("Who is this?", "an astronaut", "an astronaut in a white suit in front of a flag"),
    "horse": ("What animal is this?", "horse", "a black horse silhouette on a white background"),
}


def _manifest(tmp_path, kind: str):
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    lines = []
    for i in range(3):  # each photo three times, shifted, so a later copy can find an earlier one
        for name, (question, answer, caption) in PHOTOS.items():
            arr = getattr(data, name)()
            img = Image.fromarray(arr).convert("RGB").resize((48, 48)).rotate(3 * i)
            path = tmp_path / f"{name}-{i}.png"
            img.save(path)
            prompt = question if kind == "vqa" else "Describe the image in one sentence."
            label = answer if kind == "vqa" else caption
            lines.append(json.dumps({"image": path.name, "prompt": prompt, "label": label}))
    manifest = tmp_path / f"{kind}.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def _records(out, method):
    logs = (out / "cells" / method).glob("*/seed-*/log.jsonl")
    return [json.loads(line) for log in sorted(logs) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("kind", ["vqa", "captions"])
def test_open_answer_metrics_match_hand_computation(tmp_path, kind):
    manifest = _manifest(tmp_path, kind)
    cfg = EvalConfig(
        base=RunConfig(dataset=str(manifest), n=15, warmup=2, shots=1, selector="image"),
        methods=("teacher-zero-shot", "knn-pool", "icd", "icd:judge=off"),
        budgets=(0.3,),
        seeds=(0,),
    )
    out = tmp_path / "out"
    rows = {
        r["method"]: r
        for r in run_eval(cfg, out, parts=Parts(FakeStudent(), ReferenceTeacher(), FakeEmbedder()))
    }
    for method in ("knn-pool", "icd", "teacher-zero-shot"):
        recs = [r for r in _records(out, method) if r["event"] == "query"]
        answers, labels = [r["answer"] for r in recs], [r["label"] for r in recs]
        row = rows[method]
        assert row["exact_match"] == pytest.approx(sum(map(exact_match, answers, labels)) / len(recs))
        assert row["accuracy"] == row["exact_match"]
        assert row["token_f1"] == pytest.approx(sum(map(token_f1, answers, labels)) / len(recs))
        bleu, chrf = corpus_bleu_chrf(answers, labels)
        assert (row["bleu"], row["chrf"]) == (pytest.approx(bleu), pytest.approx(chrf))
    # the teacher (reference answers) is right on every query, whatever the case and articles
    assert rows["teacher-zero-shot"]["exact_match"] == 1.0
    assert rows["teacher-zero-shot"]["chrf"] == pytest.approx(100)
    if kind == "captions":  # BLEU-4 needs 4-grams: one- and two-word VQA answers have none
        assert rows["teacher-zero-shot"]["bleu"] == pytest.approx(100)
    # copying the nearest labelled photo beats the fake student's yes/no on open questions; the judge
    # keeps the student's answer until the teacher's answers show another expert better (a few
    # checks on 15 queries), so it is never below plain ICL
    assert rows["knn-pool"]["token_f1"] > rows["icd:judge=off"]["token_f1"]
    assert rows["icd"]["token_f1"] >= rows["icd:judge=off"]["token_f1"]
    report = (out / "report.md").read_text()
    assert "exact match" in report and "chrF" in report
