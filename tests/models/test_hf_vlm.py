"""The ``hf:`` VLM backend on tiny random-weight Idefics3, SmolVLM2, Qwen2-VL and LLaVA-OneVision models
built offline in the test (BPE tokenizer trained here, family chat templates written here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from icdistill.conformance import check_student, check_teacher, sample_demos, sample_queries
from icdistill.errors import DataError, SpecError
from icdistill.models.hf_load import HFOptions
from icdistill.models.hf_vlm import HFVisionLanguageModel, fit_image
from icdistill.models.registry import ModelContext, resolve_student, resolve_teacher
from icdistill.types import Demo, Query
from tiny_vlms import FAMILIES  # noqa: E402


@pytest.fixture(scope="module", params=list(FAMILIES))
def vlm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> HFVisionLanguageModel:
    path = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    FAMILIES[request.param][0](path)
    model = resolve_student(f"hf:{path}?max_new_tokens=4&dtype=float32&device=cpu&local_files_only=1")
    assert model.family == {"smolvlm": "idefics3"}.get(request.param, request.param)
    return model


def _runs(ids: list[int], token_id: int) -> int:
    """Number of maximal runs of ``token_id`` (one per image for the marker tokens)."""
    return sum(1 for i, t in enumerate(ids) if t == token_id and (i == 0 or ids[i - 1] != token_id))


def _image_colours(family: str, inputs: Any) -> list[int]:
    """Dominant RGB channel of each image the processor produced, in order (tiles of one image merged)."""
    pv = inputs["pixel_values"].float()
    if family == "qwen2_vl":
        sizes = inputs["image_grid_thw"].prod(-1).tolist()
        per_image = [p.reshape(p.shape[0], 3, -1).mean(dim=(0, 2)) for p in pv.split(sizes)]
    elif family == "idefics3":
        per_image = list(pv[0].mean(dim=(2, 3)))  # one row per tile
    else:
        per_image = list(pv.mean(dim=(1, 3, 4)))
    channels = [int(c.argmax()) for c in per_image]
    return [c for i, c in enumerate(channels) if i == 0 or channels[i - 1] != c]


def test_prompt_interleaves_demo_images_in_order(vlm: HFVisionLanguageModel) -> None:
    queries = sample_queries()  # red, green, blue images
    demos = sample_demos(queries)[:2]
    query = queries[2]
    messages = vlm.render_messages(query, demos)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert [m["content"][0]["text"] for m in messages[1::2]] == ["red", "green"]
    assert (
        messages[-1]["content"][-1]["text"]
        == "Which colour is this image?\nAnswer with one of: red, green, blue."
    )
    inputs = vlm.build_inputs(query, demos)
    marker = vlm.tokenizer.convert_tokens_to_ids(FAMILIES[vlm.family][1])
    assert _runs(inputs["input_ids"][0].tolist(), marker) == 3
    assert _image_colours(vlm.family, inputs) == [0, 1, 2]  # demo red, demo green, query blue
    # with demos in the other order the images follow them
    assert _image_colours(vlm.family, vlm.build_inputs(query, demos[::-1])) == [1, 0, 2]


@pytest.mark.parametrize("k", [0, 2])
def test_batched_cached_scores_equal_full_forwards(vlm: HFVisionLanguageModel, k: int) -> None:
    queries = sample_queries()
    # options of different token lengths exercise the right padding of the batched continuation
    query = Query(
        id="q",
        image=queries[2].image,
        prompt="Which colour is this image?",
        options=("red", "dark green", "light sky blue"),
    )
    demos = sample_demos(queries)[:k]
    batched = vlm.score_options(query, demos)
    full = vlm.score_options_unbatched(query, demos)
    assert set(batched) == set(query.options)
    for option in query.options:
        assert batched[option] == pytest.approx(full[option], abs=1e-5)
    # a text-only query (no image at all) takes the same path
    text_only = Query(id="t", image=None, prompt="Pick one.", options=("red", "dark green"))
    a, b = vlm.score_options(text_only, []), vlm.score_options_unbatched(text_only, [])
    assert all(a[o] == pytest.approx(b[o], abs=1e-5) for o in text_only.options)


def test_open_answer_generation_reports_entropies(vlm: HFVisionLanguageModel) -> None:
    queries = sample_queries()
    query = Query(id="open", image=queries[0].image, prompt="What is in the image?")
    p = vlm.predict(query, sample_demos(queries)[:2])
    assert isinstance(p.answer, str) and p.option_scores is None
    assert p.token_entropies and p.token_logprobs and len(p.token_entropies) == len(p.token_logprobs) <= 4
    assert all(torch.isfinite(torch.tensor(p.token_entropies))) and min(p.token_entropies) >= 0
    assert all(lp <= 0 for lp in p.token_logprobs)


def test_sample_returns_n_answers_with_usage(vlm: HFVisionLanguageModel) -> None:
    query = sample_queries()[1]
    r = vlm.sample(query, 4)
    assert len(r.answers) == 4 and all(isinstance(a, str) for a in r.answers)
    assert r.usage.calls == 1 and r.usage.prompt_tokens > 0 and 4 <= r.usage.completion_tokens <= 16
    assert vlm.sample(query, 4).answers == r.answers  # reproducible per (seed, query)


def test_sampling_ignores_checkpoint_sampling_defaults(
    vlm: HFVisionLanguageModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Qwen2-VL checkpoints ship top_k=1/temperature=0.01, which would make every teacher sample the same
    monkeypatch.setattr(vlm.model.generation_config, "top_k", 1)
    monkeypatch.setattr(vlm.model.generation_config, "temperature", 0.01)
    answers = vlm.sample(sample_queries()[0], 4).answers
    assert len(set(answers)) > 1


def test_bfloat16_weights_give_finite_scores(vlm: HFVisionLanguageModel) -> None:
    path = vlm.name.removeprefix("hf:")
    half = resolve_student(f"hf:{path}?dtype=bfloat16&device=cpu")
    assert half.model.dtype == torch.bfloat16
    queries = sample_queries()
    p = half.predict(queries[0], sample_demos(queries)[1:])
    assert all(torch.isfinite(torch.tensor(list((p.option_scores or {}).values()))))


def test_conformance(vlm: HFVisionLanguageModel) -> None:
    check_student(vlm)
    check_teacher(vlm)


def test_sample_maps_free_text_to_options(
    vlm: HFVisionLanguageModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [("Red.", [], [], 2), ("it is green", [], [], 3), ("purple", [], [], 1)]
    monkeypatch.setattr(vlm, "_split_outputs", lambda gen, n_prefix: texts)
    r = vlm.sample(sample_queries()[0], 3)
    assert r.answers == ["red", "green", "purple"]
    assert r.usage.completion_tokens == 6


@pytest.mark.parametrize("vlm", ["idefics3", "smolvlm"], indirect=True)  # the tiling families only
def test_idefics3_max_side_and_split_cut_image_tokens(vlm: HFVisionLanguageModel) -> None:
    query = sample_queries()[0]
    tiles = vlm.build_inputs(query)["pixel_values"].shape[1]
    small = HFVisionLanguageModel("small", vlm.loaded, HFOptions(max_side=32))
    nosplit = HFVisionLanguageModel("nosplit", vlm.loaded, HFOptions(split=False))
    assert tiles == 5  # 2x2 tiles + global view
    assert small.build_inputs(query)["pixel_values"].shape[1] == 1
    assert nosplit.build_inputs(query)["pixel_values"].shape[1] == 1


def test_student_and_teacher_share_weights(vlm: HFVisionLanguageModel) -> None:
    path = vlm.name.removeprefix("hf:")
    ctx = ModelContext()
    s = resolve_student(f"hf:{path}?device=cpu", ctx)
    t = resolve_teacher(f"hf:{path}?device=cpu&temperature=1.0", ctx)
    assert s.model is t.model and t.opts.temperature == 1.0


def test_fit_image_shrinks_only() -> None:
    img = Image.new("RGB", (400, 200))
    assert fit_image(img, 100, None).size == (100, 50)
    assert fit_image(img, None, 20_000).size == (200, 100)
    assert fit_image(img, 1000, None).size == (400, 200)
    assert fit_image(Image.new("L", (8, 8)), None, None).mode == "RGB"


def test_missing_weights_are_a_clear_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        resolve_student(f"hf:{tmp_path / 'nowhere'}")
    with pytest.raises(SpecError, match="does not hold a loadable model"):
        resolve_student(f"hf:{tmp_path}")
    from transformers import Idefics3Config

    Idefics3Config().save_pretrained(tmp_path / "config-only")  # no weights, no processor
    with pytest.raises(SpecError, match="does not hold a loadable model"):
        resolve_student(f"hf:{tmp_path / 'config-only'}")
    with pytest.raises(SpecError, match=r"huggingface-cli download no-such-org/no-such-vlm.*local folder"):
        resolve_teacher("hf:no-such-org/no-such-vlm?local_files_only=1")


def test_unsupported_families_and_options_are_refused(tmp_path: Path) -> None:
    from transformers import BertConfig, LlavaConfig

    LlavaConfig().save_pretrained(tmp_path / "llava")
    with pytest.raises(SpecError, match="cannot take several images"):
        resolve_student(f"hf:{tmp_path / 'llava'}")
    BertConfig().save_pretrained(tmp_path / "bert")
    with pytest.raises(SpecError, match="not supported"):
        resolve_student(f"hf:{tmp_path / 'bert'}")
    for bad in ("dtype=float8", "temperature=-1", "colour=red", "max_side=big", "local_files_only=maybe"):
        with pytest.raises(SpecError):
            resolve_student(f"hf:{tmp_path / 'llava'}?{bad}")


def test_demo_without_image_and_options_line(vlm: HFVisionLanguageModel) -> None:
    query = sample_queries()[0]
    demos = [Demo(id=1, query_id="x", image=None, prompt="Name a colour.", answer="purple")]
    messages = vlm.render_messages(query, demos)
    assert messages[0]["content"] == [
        {"type": "text", "text": "Name a colour."}
    ]  # answer not an option: no line
    assert len(vlm.images(query, demos)) == 1
    assert set(vlm.predict(query, demos).option_scores or {}) == set(query.options or ())


def test_local_files_only_follows_hf_hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from icdistill.models.registry import parse_spec

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert HFOptions.from_spec(parse_spec("hf:org/model")).local_files_only
    assert not HFOptions.from_spec(parse_spec("hf:org/model?local_files_only=0")).local_files_only
    monkeypatch.delenv("HF_HUB_OFFLINE")
    opts = HFOptions.from_spec(
        parse_spec("hf:org/model?max_side=512&attn=sdpa&max_new_tokens=8&temperature=0")
    )
    assert not opts.local_files_only
    assert (opts.max_side, opts.attn, opts.max_new_tokens, opts.temperature) == (512, "sdpa", 8, 0.0)


def test_zero_temperature_teacher_repeats_its_greedy_answer(vlm: HFVisionLanguageModel) -> None:
    greedy = HFVisionLanguageModel("greedy", vlm.loaded, HFOptions(temperature=0.0, max_new_tokens=3))
    r = greedy.sample(Query(id="g", image=sample_queries()[0].image, prompt="What is it?"), 3)
    assert len(r.answers) == 3 and len(set(r.answers)) == 1 and 1 <= r.usage.completion_tokens <= 3


def _generation_configs(vlm: HFVisionLanguageModel, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The configs generate() really runs with (after merging the checkpoint's defaults)."""
    seen: list[Any] = []
    prepare = vlm.model._prepare_generation_config

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = prepare(*args, **kwargs)
        seen.append(out[0])
        return out

    monkeypatch.setattr(vlm.model, "_prepare_generation_config", spy)
    return seen


def test_teacher_sampling_ignores_checkpoint_top_p_min_p_and_ngram_rules(
    vlm: HFVisionLanguageModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    gc = vlm.model.generation_config
    for key, value in {"top_p": 0.001, "min_p": 0.9, "no_repeat_ngram_size": 1, "typical_p": 0.01}.items():
        monkeypatch.setattr(gc, key, value, raising=False)
    seen = _generation_configs(vlm, monkeypatch)
    answers = vlm.sample(sample_queries()[0], 4).answers
    (config,) = seen
    assert config.top_p == 1.0 and not config.min_p and not config.no_repeat_ngram_size
    assert config.typical_p in (None, 1.0)
    assert len(set(answers)) > 1  # top_p=0.001 would have made every sample the greedy one
    assert vlm.model.generation_config is gc and gc.top_p == 0.001  # the checkpoint's own is restored


def test_teacher_sampling_keeps_no_logits(
    vlm: HFVisionLanguageModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _generation_configs(vlm, monkeypatch)
    vlm.sample(sample_queries()[0], 3)
    vlm.predict(Query(id="open", image=sample_queries()[0].image, prompt="What is it?"), [])
    assert [bool(c.output_logits) for c in seen] == [False, True]  # the student's entropies need them


def test_options_are_scored_with_the_end_of_turn(vlm: HFVisionLanguageModel) -> None:
    end = vlm.tokenizer.convert_tokens_to_ids(
        "<end_of_utterance>" if vlm.family == "idefics3" else "<|im_end|>"
    )
    dark, dark_green = vlm.option_token_ids(["dark", "dark green"])
    assert dark[-1] == end and dark_green[-1] == end
    assert dark_green[: len(dark) - 1] == dark[:-1]  # "dark" is a prefix, told apart by the end token
    q = Query(id="d", image=sample_queries()[1].image, prompt="Which colour?", options=("dark", "dark green"))
    batched, full = vlm.score_options(q, []), vlm.score_options_unbatched(q, [])
    assert batched["dark"] == pytest.approx(full["dark"], abs=1e-5)


@pytest.mark.parametrize("vlm", ["idefics3", "smolvlm"], indirect=True)  # the tiling families only
def test_idefics3_max_side_never_exceeds_the_checkpoint_resolution(vlm: HFVisionLanguageModel) -> None:
    query = sample_queries()[0]
    huge = HFVisionLanguageModel("huge", vlm.loaded, HFOptions(max_side=1600))
    inputs = huge.build_inputs(query)
    assert inputs["pixel_values"].shape[1] == 5  # the checkpoint's own 2x2 tiles + global view, not 50x50
    grid = [
        t
        for t in vlm.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
        if t.startswith("<row_")
    ]
    assert grid and all(vlm.tokenizer.convert_tokens_to_ids(t) != vlm.tokenizer.unk_token_id for t in grid)


def test_demos_are_dropped_to_fit_the_context(
    vlm: HFVisionLanguageModel, caplog: pytest.LogCaptureFixture
) -> None:
    queries = sample_queries()
    demos = sample_demos(queries)[:2]
    query = queries[2]
    reserve = max(len(c) for c in vlm.option_token_ids(query.options or ()))
    last_only = vlm.build_inputs(query, demos[1:])["input_ids"]
    length = [vlm.build_inputs(query, d)["input_ids"].shape[1] for d in ([], demos[1:], demos)]
    assert length[0] < length[1] < length[2]
    tight = HFVisionLanguageModel("tight", vlm.loaded, HFOptions(max_context=length[1] + reserve))
    with caplog.at_level("WARNING"):
        fitted = tight.build_inputs(query, demos, reserve=reserve)
        scores = tight.score_options(query, demos)
    # the first demo (least similar in the loop's best-last order) went; the last one stayed
    assert torch.equal(fitted["input_ids"], last_only)
    assert "dropped 1 of 2 demos" in caplog.text and set(scores) == set(query.options or ())
    hopeless = HFVisionLanguageModel("hopeless", vlm.loaded, HFOptions(max_context=length[0]))
    with pytest.raises(DataError, match="even without demos"):
        hopeless.score_options(query, demos)


def test_predict_batch_answers_as_predict(vlm: HFVisionLanguageModel) -> None:
    # a micro-batch (--batch): prompts of different lengths (0, 1, 2 demos) and images padded into
    # one pass score as one query at a time
    queries = sample_queries()
    demos = sample_demos(queries)
    options = ("red", "dark green", "light sky blue")
    batch = [
        Query(id=f"q{i}", image=q.image, prompt="Which colour is this image?", options=options)
        for i, q in enumerate(queries[:3])
    ]
    demo_lists = [demos[:2], [], demos[1:2]]
    got = vlm.predict_batch(batch, demo_lists)
    for q, d, g in zip(batch, demo_lists, got, strict=True):
        want = vlm.predict(q, d)
        assert g.answer == want.answer
        assert g.option_scores == pytest.approx(want.option_scores, abs=1e-4)
    assert len({round(v, 4) for g in got for v in g.option_scores.values()}) > 3
    # read ahead (the loop's --batch): predict with the same query and demos takes the batch's reading,
    # once; other demos are read afresh
    vlm.prefetch(batch, demo_lists)
    ahead = vlm.predict(batch[0], demo_lists[0])
    assert ahead.option_scores == pytest.approx(got[0].option_scores, abs=1e-6) and len(vlm._ahead) == 2
    again = vlm.predict(batch[0], demo_lists[0])
    assert again is not ahead and len(vlm._ahead) == 2
    assert vlm.predict(batch[1], demos[:1]).option_scores != pytest.approx(got[1].option_scores, abs=1e-6)
