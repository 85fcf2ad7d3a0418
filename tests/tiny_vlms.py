"""Tiny random-weight VLMs of each supported family, built offline (BPE tokenizer trained here,
chat templates in the shape of each family's published one). Shared by the hf: backend tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Chat templates in the shape of each family's published one (HF renders with trim_blocks, so
# newlines are written as expressions).
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}"
    "{% if m['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
    "{% elif c['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{{ '<end_of_utterance>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
QWEN2_VL_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' }}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAVA_OV_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% for c in m['content'] if c['type'] == 'image' %}{{ '<image>' }}{% endfor %}"
    "{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1
)
CORPUS = [
    "Which colour is this image? Answer with one of: red, green, blue, dark green, light sky blue.",
    "System User Assistant system user assistant You are a helpful assistant. What is it?",
]


def _tokenizer(extra: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": extra})
    return tok


def _save_processor(
    path: Path, tok: Any, image_processor: Any, template: str, config: dict[str, Any]
) -> None:
    # Written piece by piece: Qwen2-VL and LLaVA-OV processors cannot be built without torchvision
    # (their video processor), which is exactly what the backend has to cope with when loading.
    tok.save_pretrained(path)
    image_processor.save_pretrained(path)
    (path / "chat_template.jinja").write_text(template)
    (path / "processor_config.json").write_text(json.dumps(config))


def _build_idefics3(path: Path) -> None:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    grid = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tok = _tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *grid])
    # 64-px images split into 32-px tiles (2x2 + a global view), as SmolVLM does at 512/2048
    ip = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    Idefics3Processor(
        image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE
    ).save_pretrained(path)
    config = Idefics3Config(
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=dict(model_type="llama", vocab_size=len(tok), pad_token_id=tok.pad_token_id, **TEXT),
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    Idefics3ForConditionalGeneration(config).save_pretrained(path)


def _build_smolvlm(path: Path) -> None:
    """SmolVLM2 (model_type smolvlm): Idefics3's layout, and a processor that also wants a video processor."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    grid = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tok = _tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *grid])
    ip = SmolVLMImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    processor_config = {"processor_class": "SmolVLMProcessor", "image_seq_len": 4}
    _save_processor(path, tok, ip, IDEFICS3_TEMPLATE, processor_config)
    config = SmolVLMConfig(
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=dict(model_type="llama", vocab_size=len(tok), pad_token_id=tok.pad_token_id, **TEXT),
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    SmolVLMForConditionalGeneration(config).save_pretrained(path)


def _build_qwen2_vl(path: Path) -> None:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    names = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }
    tok = _tokenizer(list(names.values()))
    ip = Qwen2VLImageProcessorPil(min_pixels=16 * 16, max_pixels=32 * 32, patch_size=4, merge_size=2)
    _save_processor(path, tok, ip, QWEN2_VL_TEMPLATE, {"processor_class": "Qwen2VLProcessor"})
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    config = Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=4, mlp_ratio=2),
        text_config=dict(
            vocab_size=len(tok),
            rope_parameters=rope,
            pad_token_id=tok.pad_token_id,
            bos_token_id=None,
            **TEXT,
        ),
        **{k: tok.convert_tokens_to_ids(v) for k, v in names.items()},
    )
    Qwen2VLForConditionalGeneration(config).save_pretrained(path)


def _build_llava_onevision(path: Path) -> None:
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tok = _tokenizer(["<image>", "<video>"])
    pins = [[16, 16], [16, 32], [32, 16], [32, 32]]
    ip = LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16}, image_grid_pinpoints=pins)
    processor_config = {
        "processor_class": "LlavaOnevisionProcessor",
        "num_image_tokens": 16,
        "vision_feature_select_strategy": "full",
    }
    _save_processor(path, tok, ip, LLAVA_OV_TEMPLATE, processor_config)
    config = LlavaOnevisionConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
            vision_use_head=False,
        ),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), pad_token_id=tok.pad_token_id, **TEXT),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pins,
        vision_feature_select_strategy="full",
    )
    LlavaOnevisionForConditionalGeneration(config).save_pretrained(path)


# family -> (builder, token that marks one image in the prompt)
FAMILIES: dict[str, tuple[Callable[[Path], None], str]] = {
    "idefics3": (_build_idefics3, "<global-img>"),
    "smolvlm": (_build_smolvlm, "<global-img>"),
    "qwen2_vl": (_build_qwen2_vl, "<|vision_start|>"),
    "llava_onevision": (_build_llava_onevision, "<image>"),
}
