"""Precision: what runs in bf16 and what must not (the default student's dtype is tested in test_smollm2)."""

import pytest
import torch
from test_scoring import ByteTokenizer, tiny_llama

from fakes import FakeTagger
from icdistill.models.smollm2 import SmolLM2Student


def test_the_online_lora_baseline_trains_an_fp32_copy_of_a_bf16_student():
    pytest.importorskip("peft")
    from icdistill.eval.finetune import LoRAStudent

    model = tiny_llama().to(torch.bfloat16)
    base = SmolLM2Student(FakeTagger(), lm=(model, ByteTokenizer()), calibrate=False)
    student = LoRAStudent(base, steps=1, seed=0)
    # AdamW's small updates would round away in bf16 weights
    assert {p.dtype for p in student.model.parameters()} == {torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # the base is left as it runs
