"""Loading an ``hf:`` model, shared by every family: the spec's options (``HFOptions``), device and
dtype, the processor (rebuilt without its video processor where that cannot load) and the weights,
refusing families that cannot take interleaved images. The families themselves are ``hf_smolvlm``,
``hf_qwen2_vl`` and ``hf_llava_onevision``."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, SimpleNamespace
from typing import Any

import torch

from icdistill.errors import SpecError
from icdistill.models import hf_llava_onevision, hf_qwen2_vl, hf_smolvlm
from icdistill.models.precision import DTYPES, parse_dtype
from icdistill.models.registry import Spec

# config.model_type -> family. Every family here takes several images interleaved with text, which
# in-context demonstrations need.
FAMILIES = MappingProxyType({**hf_smolvlm.MODEL_TYPES, **hf_qwen2_vl.MODEL_TYPES, **hf_llava_onevision.MODEL_TYPES})
# Processor classes per model_type, used to rebuild a processor without its video processor when
# AutoProcessor cannot load one (transformers 5 video processors need torchvision).
_PROCESSOR_CLASSES = MappingProxyType(
    {**hf_smolvlm.PROCESSORS, **hf_qwen2_vl.PROCESSORS, **hf_llava_onevision.PROCESSORS}
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
        "dtype": "float32 | bfloat16 | float16 | auto (the checkpoint's); default: bfloat16 on a GPU (float16 without bf16) and on a CPU with AMX, float16 on MPS, else float32",
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
        "image_cache": "Idefics3/SmolVLM, Qwen2-VL, LLaVA-OneVision: images whose vision features are kept, each computed "
        "once (default 256; 0: none)",
    }
)


_TRUE = frozenset({"1", "true", "yes", "on"})


_FALSE = frozenset({"0", "false", "no", "off"})


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
    image_cache: int = 256

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
            image_cache=spec.opt("image_cache", 256, int),
        )
        if opts.dtype is not None and opts.dtype not in (*DTYPES, "auto"):
            raise SpecError(f"spec {spec.raw!r}: dtype={opts.dtype} is not one of {', '.join(DTYPES)}, auto")
        for name in ("max_side", "max_pixels", "max_new_tokens", "max_batch", "max_context"):
            value = getattr(opts, name)
            if value is not None and value < 1:
                raise SpecError(f"spec {spec.raw!r}: {name} must be at least 1")
        if opts.temperature < 0:
            raise SpecError(f"spec {spec.raw!r}: temperature must be >= 0")
        if opts.image_cache < 0:
            raise SpecError(f"spec {spec.raw!r}: image_cache must be >= 0")
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
    # bf16 where the hardware multiplies it natively (a GPU, an AMX CPU), else fp32 on a CPU
    return parse_dtype(name, device)


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
