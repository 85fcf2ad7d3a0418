"""``finetune-online``: the alternative ICD claims to beat. The student LM gets LoRA adapters (``peft``)
trained online on the teacher's labels as they arrive, with the same gate and budget as ICD and no
demonstrations in the prompt. Training time and memory are reported beside accuracy."""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Sequence
from typing import Any

import torch

from icdistill.errors import ICDError
from icdistill.models.scoring import encode_continuation, encode_prefix
from icdistill.models.smollm2 import SmolLM2Student, option_continuation
from icdistill.types import Demo, Prediction, Query


def training_text(student: SmolLM2Student, query: Query, answer: str) -> tuple[str, str]:
    """``(prompt, target)`` of a LoRA training example: the prompt is ``student.prompt_for(query, ())``,
    the one its predictions are scored after (it was once ``Image: <tags>\nAnswer:`` while answers were
    scored after the question and options lines: trained on one prompt, scored on another)."""
    prompt = student.prompt_for(query, ())
    target = option_continuation(answer) if query.options else f" {answer}\n"
    return prompt, target


class LoRAStudent:
    """A ``SmolLM2Student`` with its own LoRA-adapted copy of the LM, trained by ``learn``.

    ``learn(query, answer)`` adds the example and runs ``steps`` optimiser steps on mini-batches of
    ``batch`` examples drawn from everything learnt so far (replay, so early labels are not forgotten).
    The loss is the answer's token cross-entropy after the zero-shot prompt the student is asked with
    (``training_text``). ``seed`` sets the LoRA initialisation and the mini-batch draws (the eval passes
    the stream's seed).
    """

    name = "finetune-online"

    def __init__(
        self,
        base: SmolLM2Student,
        *,
        steps: int = 8,
        lr: float = 1e-3,
        rank: int = 8,
        batch: int = 8,
        seed: int = 0,
    ) -> None:
        if steps < 0 or batch < 1 or rank < 1 or lr <= 0:
            raise ICDError("finetune-online needs steps >= 0, batch >= 1, rank >= 1 and lr > 0")
        from peft import LoraConfig, get_peft_model

        model, tokenizer = base.lm()
        torch.manual_seed(seed)
        # a private copy: other cells of the same process keep using the untouched base model. It
        # trains in fp32 (the base may run in bf16, where AdamW's small updates round away)
        lora = get_peft_model(
            copy.deepcopy(model).float(),
            LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
        )
        lora.eval()
        self.tokenizer = tokenizer
        self.model = lora
        self.student = SmolLM2Student(
            base.tagger,
            max_tags=base.max_tags,
            max_new_tokens=base.max_new_tokens,
            lm=(lora, tokenizer),
            calibrate=base.calibration is not None,
            zero_shot=base.zero_shot,
        )
        self.steps = steps
        self.batch = batch
        self.optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=lr)
        self.examples: list[tuple[list[int], list[int]]] = []
        self.rng = random.Random(seed)
        self.train_seconds = 0.0
        self.train_steps = 0

    @classmethod
    def from_student(cls, student: Any, **kwargs: Any) -> LoRAStudent:
        if not isinstance(student, SmolLM2Student):
            raise ICDError(f"finetune-online needs the local:smollm2 student, got {type(student).__name__}")
        return cls(student, **kwargs)

    @staticmethod
    def parse_options(opts: dict[str, str]) -> dict[str, Any]:
        casts = {"steps": int, "lr": float, "rank": int, "batch": int}
        try:
            return {k: casts[k](v) for k, v in opts.items() if k in casts}
        except ValueError as e:
            raise ICDError(f"finetune-online option is not a number: {e}") from e

    def predict(self, query: Query, demos: Sequence[Demo]) -> Prediction:
        # what is learnt lives in the weights: the prompt has no demonstrations
        return self.student.predict(query, ())

    def training_text(self, query: Query, answer: str) -> tuple[str, str]:
        """The prompt and the target of a training example: the prompt ``predict`` asks the query with
        (the student's zero-shot prompt, e.g. with its question and options lines), so the weights learn
        the answer in the very context they are scored in."""
        return training_text(self.student, query, answer)

    def _example(self, query: Query, answer: str) -> tuple[list[int], list[int]]:
        prompt, target = self.training_text(query, answer)
        return encode_prefix(self.tokenizer, prompt), encode_continuation(self.tokenizer, target)

    def learn(self, query: Query, answer: str) -> None:
        self.examples.append(self._example(query, answer))
        t0 = time.perf_counter()
        self.model.train()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for _ in range(self.steps):
            chunk = [self.rng.choice(self.examples) for _ in range(min(self.batch, len(self.examples)))]
            width = max(len(p) + len(c) for p, c in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (p, c) in enumerate(chunk):
                seq = p + c
                ids[i, : len(seq)] = torch.tensor(seq)
                labels[i, len(p) : len(seq)] = torch.tensor(c)  # only the answer is learnt
                mask[i, : len(seq)] = 1
            loss = self.model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.train_steps += 1
        self.model.eval()
        self.student.forget_readings()  # its cached readings are the weights' before this step
        self.train_seconds += time.perf_counter() - t0

    def training_stats(self) -> dict[str, Any]:
        return {
            "train_seconds": self.train_seconds,
            "train_steps": self.train_steps,
            "train_examples": len(self.examples),
        }
