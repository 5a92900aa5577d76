"""Merging a trained adapter into its base model: a plain transformers checkpoint.

    RUN_DIR/run_config.yaml --models--> base model (full precision)
    RUN_DIR/adapter --PEFT--> PeftModel --merge_and_unload--> W + scaling * B @ A
        --save_pretrained--> OUTPUT_DIR (config, safetensors weights, tokenizer)

The merged model has no LoRA layers left, so ``AutoModelForCausalLM.from_pretrained``
loads it without PEFT or cora. A frozen basis merges like any other ``lora_B``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from cora.adapters import load_cora_adapter
from cora.files import atomic_directory
from cora.models import load_base_model
from cora.runs import ADAPTER_DIR_NAME, load_run_config

logger = logging.getLogger(__name__)

MERGE_DTYPES = ("float32", "bfloat16", "float16")


def load_run_for_merge(run_dir: str | os.PathLike, dtype: str = "float32") -> tuple[Any, Any]:
    """Load a run's base model in ``dtype`` with its adapter, ready to merge.

    A QLoRA run (``training.load_in_4bit``) is merged into the full-precision base,
    because adding ``B @ A`` to 4-bit weights would quantise the update away.
    """
    if dtype not in MERGE_DTYPES:
        raise ValueError(f"invalid dtype {dtype!r}; expected one of {MERGE_DTYPES}")
    config = load_run_config(run_dir)
    adapter_dir = Path(run_dir) / ADAPTER_DIR_NAME
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} has no trained adapter; the run may not have finished")
    if config.training.load_in_4bit:
        logger.info("run trained a 4-bit base; merging into the %s base instead", dtype)
    base, tokenizer = load_base_model(config.model, dtype=dtype)
    model = load_cora_adapter(base, adapter_dir)
    model.eval()
    return model, tokenizer


def merge_adapter(peft_model: Any) -> Any:
    """Fold every LoRA update into its base weight and return the plain transformers model."""
    return peft_model.merge_and_unload(safe_merge=True)


def save_merged(model: Any, tokenizer: Any, output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write model and tokenizer to a temporary folder beside ``output_dir``, then rename it.

    Raises:
        ValueError: ``output_dir`` exists and ``overwrite`` is False.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise ValueError(f"output folder {output_dir} already exists; pass --overwrite to replace it")
    with atomic_directory(output_dir) as temp_dir:
        model.save_pretrained(temp_dir)
        tokenizer.save_pretrained(temp_dir)
    return output_dir


def merge_run(
    run_dir: str | os.PathLike, output_dir: str | os.PathLike, dtype: str = "float32", overwrite: bool = False
) -> Path:
    """Merge the adapter of a finished ``cora train`` run into its base model and save it.

    Args:
        run_dir: run folder with ``run_config.yaml`` and ``adapter/``.
        output_dir: folder to write; a transformers checkpoint with the tokenizer.
        dtype: weight dtype of the merged model: float32, bfloat16 or float16.
        overwrite: replace ``output_dir`` if it exists.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise ValueError(f"output folder {output_dir} already exists; pass --overwrite to replace it")
    model, tokenizer = load_run_for_merge(run_dir, dtype)
    merged = merge_adapter(model)
    path = save_merged(merged, tokenizer, output_dir, overwrite=overwrite)
    logger.info("merged %s into %s", Path(run_dir) / ADAPTER_DIR_NAME, path)
    return path
