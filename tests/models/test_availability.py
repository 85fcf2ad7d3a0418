import json

from icdistill.models.availability import availability, cached_vlms


def _hf_row():
    return next(r for r in availability() if r["spec"].startswith("hf:"))


def test_hf_is_available_only_with_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    row = _hf_row()
    assert not row["ok"] and "no VLM weights" in row["notes"]
    snap = tmp_path / "models--HuggingFaceTB--SmolVLM-256M-Instruct" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"model_type": "idefics3"}))
    text_only = tmp_path / "models--org--tiny-llama" / "snapshots" / "abc"
    text_only.mkdir(parents=True)
    (text_only / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert cached_vlms() == ["HuggingFaceTB/SmolVLM-256M-Instruct"]
    row = _hf_row()
    assert row["ok"] and "SmolVLM-256M-Instruct" in row["notes"]
