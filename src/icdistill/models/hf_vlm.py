"""The ``hf:`` backend: a Hugging Face VLM (Idefics3/SmolVLM, Qwen2-VL/Qwen2.5-VL, LLaVA-OneVision) as
student (in-context label scoring or greedy answers) and teacher (sampled answers), with interleaved images."""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import os
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, SimpleNamespace
from typing import Any

import torch
from PIL import Image

from icdistill.errors import DataError, ICDError, SpecError
from icdistill.models.registry import ModelContext, Spec
from icdistill.models.scoring import continuation_batch
from icdistill.teacher import match_option
from icdistill.types import Demo, Prediction, Query, TeacherResponse, Usage

log = logging.getLogger(__name__)

# config.model_type -> family. Every family here takes several images interleaved with text, which
# in-context demonstrations need.
FAMILIES = MappingProxyType(
    {
        "idefics3": "idefics3",
        "smolvlm": "idefics3",
        "qwen2_vl": "qwen2_vl",
        "qwen2_5_vl": "qwen2_vl",
        "llava_onevision": "llava_onevision",
    }
)
# Processor classes per model_type, used to rebuild a processor without its video processor when
# AutoProcessor cannot load one (transformers 5 video processors need torchvision).
_PROCESSOR_CLASSES = MappingProxyType(
    {
        "idefics3": "Idefics3Processor",
        "smolvlm": "SmolVLMProcessor",
        "qwen2_vl": "Qwen2VLProcessor",
        "qwen2_5_vl": "Qwen2_5_VLProcessor",
        "llava_onevision": "LlavaOnevisionProcessor",
    }
)
# Families known to take one image per prompt (or to place all images before the text): refused with
# a reason rather than silently dropping the demonstrations' images.
SINGLE_IMAGE = MappingProxyType(
    {
        "llava": "LLaVA-1.5 was trained with one image per prompt",
        "llava_next": "LLaVA-NeXT was trained with one image per prompt",
        "paligemma": "PaliGemma puts all images before the text, so demos cannot be interleaved",
        "blip-2": "BLIP-2 takes one image per prompt",
        "instructblip": "InstructBLIP takes one image per prompt",
        "fuyu": "Fuyu takes one image per prompt",
        "mllama": "Llama 3.2 Vision was trained with one image per prompt",
    }
)
OPTIONS = MappingProxyType(
    {
        "dtype": "float32 | bfloat16 | float16 | auto (the checkpoint's); default: bfloat16/float16 on GPU, float32 on CPU",
        "device": "cpu | cuda | cuda:N | mps | auto (default)",
        "max_side": "resize images so that their longer side is at most this many pixels",
        "max_pixels": "resize images to at most this many pixels",
        "attn": "attention implementation: sdpa | eager | flash_attention_2",
        "local_files_only": "1/0; default 1 when HF_HUB_OFFLINE=1 is set",
        "max_new_tokens": "tokens generated for open answers and teacher samples (default 32)",
        "temperature": "teacher sampling temperature (default 0.7; 0 = greedy)",
        "top_p": "teacher nucleus sampling (default 1.0: the full distribution)",
        "split": "Idefics3/SmolVLM only: 0 disables splitting images into tiles (fewer image tokens)",
        "max_batch": "option continuations per batched forward (default 64)",
        "max_context": "prompt + answer token limit (default: the model's max_position_embeddings); "
        "demos are dropped to fit",
    }
)
_DTYPES = MappingProxyType({"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
# Marks where an answer goes when the chat template is rendered with a placeholder answer.
_SENTINEL = "\x00ANSWER\x00"


def _flag(value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


@dataclass(frozen=True)
class HFOptions:
    """Parsed ``hf:`` spec options (see ``OPTIONS``)."""

    dtype: str | None = None
    device: str = "auto"
    max_side: int | None = None
    max_pixels: int | None = None
    attn: str | None = None
    local_files_only: bool = False
    max_new_tokens: int = 32
    temperature: float = 0.7
    top_p: float = 1.0
    split: bool | None = None
    max_batch: int = 64
    max_context: int | None = None

    @classmethod
    def from_spec(cls, spec: Spec) -> HFOptions:
        unknown = sorted(set(spec.options) - set(OPTIONS))
        if unknown:
            raise SpecError(
                f"spec {spec.raw!r}: unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}"
            )
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE
        opts = cls(
            dtype=spec.opt("dtype"),
            device=spec.opt("device", "auto"),
            max_side=spec.opt("max_side", None, int),
            max_pixels=spec.opt("max_pixels", None, int),
            attn=spec.opt("attn"),
            local_files_only=spec.opt("local_files_only", offline, _flag),
            max_new_tokens=spec.opt("max_new_tokens", 32, int),
            temperature=spec.opt("temperature", 0.7, float),
            top_p=spec.opt("top_p", 1.0, float),
            split=spec.opt("split", None, _flag),
            max_batch=spec.opt("max_batch", 64, int),
            max_context=spec.opt("max_context", None, int),
        )
        if opts.dtype is not None and opts.dtype not in (*_DTYPES, "auto"):
            raise SpecError(f"spec {spec.raw!r}: dtype={opts.dtype} is not one of {', '.join(_DTYPES)}, auto")
        for name in ("max_side", "max_pixels", "max_new_tokens", "max_batch", "max_context"):
            value = getattr(opts, name)
            if value is not None and value < 1:
                raise SpecError(f"spec {spec.raw!r}: {name} must be at least 1")
        if opts.temperature < 0:
            raise SpecError(f"spec {spec.raw!r}: temperature must be >= 0")
        if not 0 < opts.top_p <= 1:
            raise SpecError(f"spec {spec.raw!r}: top_p must be in (0, 1]")
        return opts


def resolve_device(name: str) -> str:
    """``auto`` -> cuda, else mps, else cpu; an explicit accelerator that is absent is a SpecError."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SpecError(f"device={name} but CUDA is not available here (use device=cpu or device=auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SpecError("device=mps but MPS is not available here (use device=cpu or device=auto)")
    if name != "cpu" and not name.startswith(("cuda", "mps")):
        raise SpecError(f"device={name} is not one of cpu, cuda, cuda:N, mps, auto")
    return name


def resolve_dtype(name: str | None, device: str) -> torch.dtype | str:
    if name == "auto":
        return "auto"
    if name is not None:
        return _DTYPES[name]
    # bf16 keeps fp32's range on GPUs that have it; CPU matmuls in half precision are slow or missing.
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device == "mps" else torch.float32


def _is_local_path(target: str) -> bool:
    return target.startswith(("/", "./", "../", "~")) or Path(target).expanduser().exists()


def _missing_weights(target: str, local_only: bool, err: Exception) -> SpecError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if Path(target).is_dir():
        return SpecError(
            f"hf:{target}: the folder does not hold a loadable model ({first}); it needs config.json, the "
            f"weights (*.safetensors) and the processor files, as written by save_pretrained or "
            f"`huggingface-cli download <repo> --local-dir {target}`"
        )
    where = (
        "the hub is not used (HF_HUB_OFFLINE=1 or local_files_only=1)"
        if local_only
        else "the Hugging Face hub could not be reached"
    )
    return SpecError(
        f"cannot load hf:{target}: its files are not in the local Hugging Face cache and {where} ({first}). "
        f"Download it on a machine with access (`huggingface-cli download {target}` or `hf download {target}`) "
        f"and copy ~/.cache/huggingface/hub here, or pass a local folder: hf:/path/to/folder"
    )


def _without_video(cls: type) -> type:
    """A subclass of a processor class that neither loads nor checks a video processor."""

    def get_attributes(sub: type) -> list[str]:
        return [a for a in super(sub_cls, sub).get_attributes() if "video" not in a]

    # SmolVLM's apply_chat_template reads video_processor.num_frames/fps even for image-only chats
    placeholder = SimpleNamespace(num_frames=None, fps=None)
    attrs = {"get_attributes": classmethod(get_attributes), "video_processor": placeholder}
    sub_cls = type(cls.__name__, (cls,), attrs)
    return sub_cls


def load_processor(target: str, model_type: str, local_only: bool) -> Any:
    """AutoProcessor, or, where a video processor cannot be loaded (no torchvision), the family's
    processor class without it: images and text are all this backend uses."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(target, local_files_only=local_only)
    except ImportError as e:
        if "torchvision" not in str(e).lower() or model_type not in _PROCESSOR_CLASSES:
            raise
        import transformers

        cls = getattr(transformers, _PROCESSOR_CLASSES[model_type])
        kwargs: dict[str, Any] = {"local_files_only": local_only}
        if "video_processor" in inspect.signature(cls.__init__).parameters:
            kwargs["video_processor"] = None  # SmolVLM2's processor requires the argument
        return _without_video(cls).from_pretrained(target, **kwargs)


@dataclass
class LoadedVLM:
    """A model and its processor, shared by the student and teacher built from the same weights."""

    model: Any
    processor: Any
    model_type: str
    family: str
    device: str


def load(target: str, opts: HFOptions) -> LoadedVLM:
    """Load config, processor and weights; every failure a user can fix becomes a SpecError."""
    if not target:
        raise SpecError("hf: needs a repo id or a folder, e.g. hf:HuggingFaceTB/SmolVLM-256M-Instruct")
    if _is_local_path(target):
        path = Path(target).expanduser()
        if not path.is_dir():
            raise SpecError(
                f"hf:{target}: folder {path} does not exist (pass a folder holding config.json, the weights "
                f"and the processor files, or a repo id such as HuggingFaceTB/SmolVLM-256M-Instruct)"
            )
        if not (path / "config.json").is_file():
            raise _missing_weights(str(path), opts.local_files_only, FileNotFoundError("no config.json"))
        target = str(path)
    try:
        from transformers import AutoConfig, AutoModelForImageTextToText
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise SpecError(f"hf: needs transformers: {e}") from e

    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    try:
        config = AutoConfig.from_pretrained(target, local_files_only=opts.local_files_only)
    except OSError as e:
        raise _missing_weights(target, opts.local_files_only, e) from e
    except ValueError as e:
        raise SpecError(f"hf:{target}: transformers cannot read its config ({e})") from e
    model_type = getattr(config, "model_type", "")
    if model_type in SINGLE_IMAGE:
        raise SpecError(
            f"hf:{target} is a {model_type!r} model, which cannot take several images in one prompt "
            f"({SINGLE_IMAGE[model_type]}); in-context demonstrations need interleaved images. "
            f"Use one of the families {', '.join(sorted(set(FAMILIES)))}."
        )
    if model_type not in FAMILIES:
        raise SpecError(
            f"hf:{target}: model_type {model_type!r} is not supported by the hf: backend "
            f"(supported: {', '.join(sorted(FAMILIES))})"
        )
    try:
        processor = load_processor(target, model_type, opts.local_files_only)
        kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": opts.local_files_only}
        if opts.attn:
            kwargs["attn_implementation"] = opts.attn
        if device != "cpu":
            # straight onto the accelerator: no full CPU copy of a large model first
            kwargs["device_map"] = device
        model = AutoModelForImageTextToText.from_pretrained(target, **kwargs)
    except OSError as e:
        raise _missing_weights(target, opts.local_files_only, e) from e
    except (ImportError, ValueError, TypeError) as e:
        raise SpecError(f"hf:{target}: cannot load the model or its processor ({e})") from e
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise SpecError(f"hf:{target}: no image processor found next to the weights (processor_config.json)")
    if not getattr(processor, "chat_template", None):
        raise SpecError(
            f"hf:{target}: the processor has no chat template; an instruction-tuned model is needed"
        )
    if device == "cpu":
        model.to(device)
    model.eval()
    return LoadedVLM(
        model=model, processor=processor, model_type=model_type, family=FAMILIES[model_type], device=device
    )


def options_line(options: Sequence[str]) -> str:
    return f"Answer with one of: {', '.join(options)}."


def fit_image(image: Image.Image, max_side: int | None, max_pixels: int | None) -> Image.Image:
    """RGB copy of ``image`` shrunk (never enlarged) to the size limits, keeping its aspect ratio."""
    img = image.convert("RGB")
    w, h = img.size
    scale = 1.0
    if max_side:
        scale = min(scale, max_side / max(w, h))
    if max_pixels:
        scale = min(scale, math.sqrt(max_pixels / (w * h)))
    if scale < 1.0:
        img = img.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.Resampling.BICUBIC)
    return img


class HFVisionLanguageModel:
    """Student and teacher over one Hugging Face VLM.

    A prompt is the chat template applied to: each demonstration as a user turn (image, prompt) and an
    assistant turn (its answer), then the query as the last user turn, then the assistant-turn start.
    """

    def __init__(self, name: str, loaded: LoadedVLM, opts: HFOptions, seed: int = 0) -> None:
        self.name = name
        self.loaded = loaded
        self.opts = opts
        self.seed = seed
        self.family = loaded.family
        self.model = loaded.model
        self.processor = loaded.processor
        self.tokenizer = loaded.processor.tokenizer
        self._answer_lead, self._turn_end = self._template_answer_frame()
        self._eos = self._eos_ids()

    # -- prompt -----------------------------------------------------------------------------------

    def _user_turn(self, image: Image.Image | None, text: str) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"type": "image"}] if image is not None else []
        content.append({"type": "text", "text": text})
        return {"role": "user", "content": content}

    @staticmethod
    def _assistant_turn(text: str) -> dict[str, Any]:
        return {"role": "assistant", "content": [{"type": "text", "text": text}]}

    def query_text(self, query: Query, with_options: bool = True) -> str:
        if with_options and query.options:
            return f"{query.prompt}\n{options_line(query.options)}"
        return query.prompt

    def render_messages(self, query: Query, demos: Sequence[Demo] = ()) -> list[dict[str, Any]]:
        """Chat messages: (user: demo image + prompt, assistant: demo answer) per demo, then the query."""
        messages: list[dict[str, Any]] = []
        for d in demos:
            # A demo looks like the query it precedes: it gets the same options line when its answer
            # is one of them (demos come from the same stream), so the model sees the task's format.
            text = d.prompt
            if query.options and d.answer in query.options:
                text = f"{d.prompt}\n{options_line(query.options)}"
            messages.append(self._user_turn(d.image, text))
            messages.append(self._assistant_turn(d.answer))
        messages.append(self._user_turn(query.image, self.query_text(query)))
        return messages

    def images(self, query: Query, demos: Sequence[Demo] = ()) -> list[Image.Image]:
        """The prompt's images in prompt order (demos first, query last), resized to the limits."""
        raw = [d.image for d in demos if d.image is not None]
        if query.image is not None:
            raw.append(query.image)
        return [fit_image(im, self.opts.max_side, self.opts.max_pixels) for im in raw]

    def render_prompt(self, query: Query, demos: Sequence[Demo] = ()) -> str:
        """The prompt text up to and including the assistant-turn start (image placeholders unexpanded)."""
        return self.processor.apply_chat_template(
            self.render_messages(query, demos), add_generation_prompt=True, tokenize=False
        )

    def _template_answer_frame(self) -> tuple[str, str]:
        """What the template puts between the assistant-turn start and an answer (e.g. a space for
        SmolVLM's ``Assistant:``), and the text that ends an assistant turn (``<end_of_utterance>``)."""
        q = Query(id="_", image=None, prompt="Q")
        messages = self.render_messages(q)
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        full = self.processor.apply_chat_template(
            [*messages, self._assistant_turn(_SENTINEL)], add_generation_prompt=False, tokenize=False
        )
        at = full.find(_SENTINEL)
        lead = full[len(prompt) : at] if full.startswith(prompt) and at >= len(prompt) else ""
        return lead, full[at + len(_SENTINEL) :] if at >= 0 else ""

    def _image_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.family == "idefics3":
            ip = self.processor.image_processor
            # Idefics3 scales every image *up* to size["longest_edge"] and tiles it; with max_side the
            # target is cut to whole tiles covering max_side, so small images stay few tokens.
            tile = (getattr(ip, "max_image_size", None) or {}).get("longest_edge")
            own = (getattr(ip, "size", None) or {}).get("longest_edge")
            if self.opts.max_side and tile:
                edge = max(tile, math.ceil(self.opts.max_side / tile) * tile)
                # never above the checkpoint's own resolution: its vocabulary has row/col tokens only
                # for the tile grid that resolution gives
                kwargs["size"] = {"longest_edge": min(edge, own) if own else edge}
            if self.opts.split is not None:
                kwargs["do_image_splitting"] = self.opts.split
        return kwargs

    def context_limit(self) -> int | None:
        """Tokens a prompt and its answer may take: ``max_context``, else the text model's positions."""
        if self.opts.max_context:
            return self.opts.max_context
        config = self.model.config
        text_config = getattr(config, "text_config", None) or config
        value = getattr(text_config, "max_position_embeddings", None)
        return int(value) if isinstance(value, int) and value > 0 else None

    def build_inputs(self, query: Query, demos: Sequence[Demo] = (), reserve: int = 0) -> Any:
        """Processor output for the prompt (ids, pixel values in prompt order, ...), on the model's device.

        The prompt plus ``reserve`` tokens (the answer) must fit the context: demos are dropped from the
        start of the prompt until it does (the loop puts the most similar demo last, so these are the
        least similar), with a warning.
        """
        kept = list(demos)
        limit = self.context_limit()
        while True:
            inputs = self._encode(query, kept)
            length = int(inputs["input_ids"].shape[1])
            if limit is None or length + reserve <= limit or not kept:
                break
            kept = kept[1:]
        if len(kept) < len(demos):
            log.warning(
                "%s: query %s: dropped %d of %d demos to fit the context of %d tokens (prompt %d + answer %d)",
                self.name, query.id, len(demos) - len(kept), len(demos), limit, length, reserve,
            )  # fmt: skip
        if limit is not None and length + reserve > limit:
            raise DataError(
                f"query {query.id}: the prompt takes {length} tokens, over the context of {limit} even without "
                f"demos (lower max_side/max_pixels or raise max_context)"
            )
        return inputs

    def _encode(self, query: Query, demos: Sequence[Demo]) -> Any:
        text = self.render_prompt(query, demos)
        images = self.images(query, demos)
        kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt", "add_special_tokens": False}
        if images:
            # one sample with all its images: multi-image mode for every family
            kwargs["images"] = [images]
            kwargs.update(self._image_kwargs())
        inputs = self.processor(**kwargs)
        return inputs.to(self.loaded.device, dtype=self.model.dtype)

    # -- forward helpers ------------------------------------------------------------------------------

    def _forward(
        self, inputs: dict[str, Any], cache: Any = None, logits_to_keep: int = 0
    ) -> tuple[torch.Tensor, Any]:
        params = inspect.signature(self.model.forward).parameters
        kwargs = dict(inputs)
        kwargs["use_cache"] = True
        if cache is not None:
            # transformers 5 renamed past_key_values to cache; 4.57 is still allowed
            kwargs["cache" if "cache" in params else "past_key_values"] = cache
        if logits_to_keep and "logits_to_keep" in params:
            kwargs["logits_to_keep"] = logits_to_keep
        out = self.model(**kwargs)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = getattr(out, "past_key_values", None)
        return out.logits, new_cache

    def _mrope_positions(self, inputs: dict[str, Any]) -> tuple[torch.Tensor | None, int]:
        """Qwen2-VL's 3-D rotary positions of the prefix and the offset of the text after it.

        The model keeps this offset as state between calls (``rope_deltas``); computing it here keeps
        the cached batched pass independent of what ran before.
        """
        inner = getattr(self.model, "model", None)
        get_rope_index = getattr(inner, "get_rope_index", None)
        if get_rope_index is None or inputs.get("image_grid_thw") is None:
            return None, 0
        params = inspect.signature(get_rope_index).parameters
        kwargs = {k: v for k, v in inputs.items() if k in params and k != "input_ids"}
        positions, deltas = get_rope_index(inputs["input_ids"], **kwargs)
        return positions, int(deltas.reshape(-1)[0])

    def _end_of_turn_ids(self) -> list[int]:
        """The token that ends an assistant turn (``<end_of_utterance>``, ``<|im_end|>``), else EOS."""
        if self._turn_end.strip():
            end = self.tokenizer(self._turn_end, add_special_tokens=False).input_ids
            if end and end[0] in set(self.tokenizer.all_special_ids):
                return [end[0]]
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return [eos] if isinstance(eos, int) else []

    def option_token_ids(self, options: Sequence[str]) -> list[list[int]]:
        """Each option as the template would write it after the assistant-turn start, tokenized, with
        the end-of-turn token: the model must also say the answer ends there, so an option that is a
        prefix of another ("dark" / "dark green") does not get the longer one's credit."""
        end = self._end_of_turn_ids()
        out = []
        for o in options:
            ids = list(self.tokenizer(self._answer_lead + o, add_special_tokens=False).input_ids)
            if not ids:
                raise DataError(f"option {o!r} encodes to no tokens; it cannot be scored")
            out.append(ids + end)
        return out

    def _pad_id(self) -> int:
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(self.tokenizer, name, None)
            if isinstance(value, int):
                return value
        return 0

    @torch.inference_mode()
    def score_options(self, query: Query, demos: Sequence[Demo] = ()) -> dict[str, float]:
        """Mean token log-likelihood of each option as the answer, from one prefix forward (images
        included) and one batched forward of all continuations over the prefix's KV cache."""
        options = list(dict.fromkeys(query.options or ()))
        if not options:
            raise DataError(f"query {query.id}: no options to score")
        cont = self.option_token_ids(options)
        inputs = self.build_inputs(query, demos, reserve=max(len(c) for c in cont))
        n_prefix = inputs["input_ids"].shape[1]
        positions, delta = self._mrope_positions(inputs)
        prefix_inputs = dict(inputs)
        if positions is not None:
            prefix_inputs["position_ids"] = positions
        logits, prefix_cache = self._forward(prefix_inputs, logits_to_keep=1)
        first = torch.log_softmax(logits[0, -1].float(), dim=-1)
        device = first.device

        scores: list[float] = []
        step = self.opts.max_batch
        chunks = [cont[i : i + step] for i in range(0, len(cont), step)]
        for ci, chunk in enumerate(chunks):
            sums = first[torch.tensor([c[0] for c in chunk], device=device)].double()
            # A continuation's last token is only a target, so it is never fed.
            width = max(len(c) for c in chunk) - 1
            if width > 0:
                b = len(chunk)
                ids, targets, valid = continuation_batch(chunk, self._pad_id(), device)
                # The forward appends to the cache it gets: the last chunk may consume the prefix cache.
                cache = prefix_cache if ci == len(chunks) - 1 else copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(b)
                mask = torch.cat(
                    [torch.ones((b, n_prefix), dtype=torch.long, device=device), valid.long()], dim=1
                )
                pos = (n_prefix + delta + torch.arange(width, device=device)).unsqueeze(0).expand(b, width)
                if positions is not None:
                    pos = pos.unsqueeze(0).expand(3, b, width)  # text tokens: all three M-RoPE axes equal
                batch = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
                out, _ = self._forward(batch, cache=cache)
                picked = torch.log_softmax(out.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                sums = sums + (picked * valid).sum(dim=1).double()
            lengths = torch.tensor([len(c) for c in chunk], device=device, dtype=torch.float64)
            scores.extend((sums / lengths).tolist())
        return dict(zip(options, scores, strict=True))

    @torch.inference_mode()
    def score_options_unbatched(self, query: Query, demos: Sequence[Demo] = ()) -> dict[str, float]:
        """Reference for ``score_options``: one full forward (images included) per option, same token ids."""
        options = list(dict.fromkeys(query.options or ()))
        cont = self.option_token_ids(options)
        inputs = self.build_inputs(query, demos, reserve=max(len(c) for c in cont))
        n_prefix = inputs["input_ids"].shape[1]
        out: dict[str, float] = {}
        for option, c in zip(options, cont, strict=True):
            full = dict(inputs)
            extra = torch.tensor([c], device=inputs["input_ids"].device)
            full["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
            full["attention_mask"] = torch.ones_like(full["input_ids"])
            if "mm_token_type_ids" in full:
                zeros = torch.zeros_like(extra, dtype=full["mm_token_type_ids"].dtype)
                full["mm_token_type_ids"] = torch.cat([full["mm_token_type_ids"], zeros], dim=1)
            logits = self.model(**full, use_cache=False).logits[0].float()
            logp = torch.log_softmax(logits[n_prefix - 1 : n_prefix - 1 + len(c)], dim=-1)
            out[option] = float(logp[torch.arange(len(c)), extra[0]].double().mean())
        return out

    # -- generation ------------------------------------------------------------------------------------

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        candidates: list[Any] = [getattr(self.tokenizer, "eos_token_id", None)]
        gen_config = getattr(self.model, "generation_config", None)
        if gen_config is not None:
            candidates.append(getattr(gen_config, "eos_token_id", None))
        # The token that ends an assistant turn in this template (<end_of_utterance>, <|im_end|>)
        if self._turn_end.strip():
            end = self.tokenizer(self._turn_end, add_special_tokens=False).input_ids
            if end and end[0] in set(self.tokenizer.all_special_ids):
                candidates.append(end[0])
        for c in candidates:
            for x in c if isinstance(c, list | tuple) else [c]:
                if isinstance(x, int) and x not in ids:
                    ids.append(x)
        return ids

    @contextlib.contextmanager
    def _plain_generation_defaults(self) -> Any:
        """generate() fills every knob left unset from the checkpoint's generation_config (top_p=0.001,
        min_p, no_repeat_ngram_size, ...); with a plain one in its place only ours apply, on every
        transformers version (4.x merges values equal to the defaults, 5.x unset ones)."""
        from transformers import GenerationConfig

        saved = self.model.generation_config
        ids = {k: getattr(saved, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        self.model.generation_config = GenerationConfig(**{k: v for k, v in ids.items() if v is not None})
        try:
            yield
        finally:
            self.model.generation_config = saved

    def _generate(self, inputs: Any, n: int, temperature: float, seed: int, scores: bool = True) -> Any:
        """``scores=False`` (teacher samples: only the text is used) skips the full-vocabulary logits
        kept per step and sample, which reach gigabytes for large vocabularies and N samples."""
        from transformers import GenerationConfig

        eos = self._eos
        sampling = temperature > 0
        # Every sampling knob is set: generate() fills unset ones from the checkpoint's
        # generation_config (Qwen2-VL ships top_k=1, temperature=0.01, i.e. sampling would be greedy).
        # Greedy gets the library defaults, which generate() does not warn about.
        config = GenerationConfig(
            max_new_tokens=self.opts.max_new_tokens,
            do_sample=sampling,
            temperature=temperature if sampling else 1.0,
            top_p=self.opts.top_p if sampling else 1.0,
            top_k=0 if sampling else 50,
            repetition_penalty=1.0,
            num_return_sequences=n,
            eos_token_id=eos or None,
            pad_token_id=self._pad_id(),
            output_logits=scores,
            return_dict_in_generate=True,
        )
        device = self.loaded.device
        devices = [] if device in ("cpu", "mps") else [torch.device(device).index or 0]
        # fork_rng: reproducible samples per (seed, query) without touching the caller's RNG state
        with (
            torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"),
            self._plain_generation_defaults(),
        ):
            torch.manual_seed(seed)
            return self.model.generate(**inputs, generation_config=config)

    def _split_outputs(self, gen: Any, n_prefix: int) -> list[tuple[str, list[float], list[float], int]]:
        """Per returned sequence: text, token log-probs, token entropies, tokens generated (with EOS).
        Without logits in ``gen`` (generated with ``scores=False``) the log-probs and entropies are empty."""
        eos = set(self._eos)
        logp = entropy = None
        if getattr(gen, "logits", None):
            logits = torch.stack(gen.logits, dim=1).float()  # (n, steps, vocab)
            logp = torch.log_softmax(logits, dim=-1)
            entropy = -(logp.exp() * logp).nan_to_num(0.0).sum(-1)
        out = []
        for i, seq in enumerate(gen.sequences[:, n_prefix:].tolist()):
            end = next((j for j, t in enumerate(seq) if t in eos), len(seq))
            # stats run through the token that ended the answer: how sure the model is that the answer
            # stops there is part of its uncertainty, and an immediately stopped answer keeps one value
            stop = min(end + 1, len(seq))
            lps = [float(logp[i, j, seq[j]]) for j in range(stop)] if logp is not None else []
            ents = [float(entropy[i, j]) for j in range(stop)] if entropy is not None else []
            text = self.tokenizer.decode(seq[:end], skip_special_tokens=True).strip()
            out.append((text, lps, ents, stop))
        return out

    @torch.inference_mode()
    def generate(self, query: Query, demos: Sequence[Demo] = ()) -> tuple[str, list[float], list[float]]:
        """Greedy answer with per-token log-probabilities and entropies (nats)."""
        inputs = self.build_inputs(query, demos, reserve=self.opts.max_new_tokens)
        gen = self._generate(inputs, 1, 0.0, self.seed)
        text, lps, ents, _ = self._split_outputs(gen, inputs["input_ids"].shape[1])[0]
        return text, lps, ents

    # -- protocols -------------------------------------------------------------------------------------

    def predict(self, query: Query, demos: Sequence[Demo]) -> Prediction:
        t0 = time.perf_counter()
        if query.options:
            scores = self.score_options(query, demos)
            answer = max(scores, key=scores.__getitem__)
            return Prediction(answer=answer, option_scores=scores, seconds=time.perf_counter() - t0)
        text, lps, ents = self.generate(query, demos)
        return Prediction(
            answer=text, token_logprobs=lps, token_entropies=ents, seconds=time.perf_counter() - t0
        )

    @torch.inference_mode()
    def sample(self, query: Query, n: int) -> TeacherResponse:
        """``n`` zero-shot sampled answers; for classification each is mapped to the option it names."""
        if n < 1:
            raise ICDError("sample needs n >= 1")
        inputs = self.build_inputs(query, (), reserve=self.opts.max_new_tokens)
        n_prefix = inputs["input_ids"].shape[1]
        temperature = self.opts.temperature
        seed = (self.seed * 1_000_003 + zlib.crc32(query.id.encode())) % (2**31)
        gen = self._generate(inputs, n if temperature > 0 else 1, temperature, seed, scores=False)
        outs = self._split_outputs(gen, n_prefix)
        if temperature <= 0:
            outs = outs * n  # greedy: n copies of one answer
        answers = []
        for text, *_ in outs:
            hit = match_option(text, query.options) if query.options else None
            answers.append(hit if hit is not None else text)
        completion = sum(o[3] for o in outs[: n if temperature > 0 else 1])
        return TeacherResponse(
            answers=answers, usage=Usage(calls=1, prompt_tokens=n_prefix, completion_tokens=completion)
        )


def from_spec(spec: Spec, role: str, ctx: ModelContext) -> HFVisionLanguageModel:
    """Registry entry point: one object serves as Student and Teacher; weights are shared per context."""
    opts = HFOptions.from_spec(spec)
    key = f"hf-weights:{spec.target}|{opts.dtype}|{opts.device}|{opts.attn}|{opts.local_files_only}"
    loaded = ctx.get_or_create(key, lambda: load(spec.target, opts))
    return HFVisionLanguageModel(f"hf:{spec.target}", loaded, opts, seed=ctx.seed)
