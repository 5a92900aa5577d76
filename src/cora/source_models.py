"""Extra source models for basis extraction: short fine-tunes of the base model, merged.

CoRA extracts its basis from several models that share a base. When only the
base model is at hand, a grid can build more sources itself::

    base model --LoRA fine-tune on task data (train_run)--> adapter
        --merge_and_unload--> full checkpoint (safetensors + tokenizer) = one source model

Each source lives in its own folder with a ``cora_source.json`` record of the
spec that built it. A folder whose record matches the spec is reused, so a grid
that runs again does not train its sources again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cora.files import atomic_directory, write_atomic
from cora.runs import RunConfig

logger = logging.getLogger(__name__)

SOURCE_RECORD_NAME = "cora_source.json"
TRAIN_DIR_NAME = "train"


@dataclass
class SourceModelSpec:
    """How to build one source model: a LoRA fine-tune of the base model, merged into its weights."""

    name: str  # folder name of the source, and how bases refer to it ("source:NAME")
    data: dict[str, Any]  # partial DataConfig: at least {"path": ...}
    template: str = "alpaca"  # prompt template of the fine-tune
    max_steps: int = 50  # optimiser steps of the fine-tune
    lr: float = 3e-4  # peak learning rate
    r: int = 16  # LoRA rank of the fine-tune (the merged update has this rank per module)
    lora_alpha: float | None = None  # None: equal to r
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    batch_size: int = 4
    max_length: int = 256  # tokens per example
    seed: int = 0  # seed of the LoRA init and the data order
    mbpp_split: str | None = None  # with MBPP data: train on this standard split only (see cora.code_tasks)
    training: dict[str, Any] = field(default_factory=dict)  # further TrainingConfig fields

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"invalid source model name {self.name!r}; expected a plain folder name")
        if not isinstance(self.data, dict) or "path" not in self.data:
            raise ValueError(f"source model {self.name!r}: data must be a mapping with a path, got {self.data!r}")
        if self.max_steps < 1 or self.r < 1:
            raise ValueError(
                f"source model {self.name!r}: invalid max_steps {self.max_steps} or r {self.r}; expected positive integers"
            )
        self.target_modules = tuple(self.target_modules)

    def fingerprint(self, base_model: str) -> str:
        """Return a short hash of the spec and the base model, which names the source's folder."""
        text = json.dumps({"spec": asdict(self), "base_model": base_model}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]

    def run_config(self, base_model: str, data_path: str) -> RunConfig:
        """Return the run config of the LoRA fine-tune behind this source."""
        training = {
            "max_steps": self.max_steps,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "seed": self.seed,
            "logging_steps": max(1, self.max_steps // 10),
            **self.training,
        }
        return RunConfig.from_dict(
            {
                "model": base_model,
                "template": self.template,
                "data": {**self.data, "path": data_path},
                "adapter": {
                    "mode": "lora",
                    "r": self.r,
                    "lora_alpha": self.lora_alpha,
                    "target_modules": list(self.target_modules),
                    "init_seed": self.seed,
                },
                "training": training,
            }
        )


def source_is_built(directory: Path, fingerprint: str) -> bool:
    """Check that ``directory`` contains a merged checkpoint built from the spec with ``fingerprint``."""
    record_path = directory / SOURCE_RECORD_NAME
    if not (record_path.is_file() and (directory / "config.json").is_file()):
        return False
    record = json.loads(record_path.read_text())
    return record.get("fingerprint") == fingerprint


def build_source_model(spec: SourceModelSpec, base_model: str, out_root: str | os.PathLike, data_path: str) -> Path:
    """Fine-tune, merge and save one source model; reuse it when it is already built.

    Args:
        spec: the fine-tune.
        base_model: base model spec (Hub id, folder, .gguf or smollm2).
        out_root: folder that receives ``NAME-<fingerprint>/``.
        data_path: resolved training data file (an MBPP split already cut out by the caller).

    Returns:
        The folder of the merged checkpoint: ``config.json``, ``model.safetensors``,
        tokenizer files and ``cora_source.json``.
    """
    from cora.runs import load_trained_model
    from cora.training import train_run

    fingerprint = spec.fingerprint(base_model)
    directory = Path(out_root) / f"{spec.name}-{fingerprint}"
    if source_is_built(directory, fingerprint):
        logger.info("source model %s already built in %s", spec.name, directory)
        return directory

    train_dir = Path(out_root) / f".{spec.name}-{fingerprint}.{TRAIN_DIR_NAME}"
    logger.info("building source model %s: %d LoRA steps on %s", spec.name, spec.max_steps, data_path)
    result = train_run(spec.run_config(base_model, data_path), train_dir, overwrite=True)
    model, tokenizer, _ = load_trained_model(train_dir)
    merged = model.merge_and_unload()  # W + scaling * B @ A, then plain Linear layers

    record = {
        "fingerprint": fingerprint,
        "spec": asdict(spec),
        "base_model": base_model,
        "data_path": data_path,
        "steps": result.steps,
        "final_loss": result.final_loss,
        "train_seconds": round(result.train_seconds, 3),
    }
    _save_checkpoint(merged, tokenizer, directory, record)
    shutil.rmtree(train_dir, ignore_errors=True)
    logger.info("source model %s saved to %s", spec.name, directory)
    return directory


def _save_checkpoint(model: Any, tokenizer: Any, directory: Path, record: dict[str, Any]) -> None:
    """Save model, tokenizer and record to a temporary folder, then rename it to ``directory``."""
    with atomic_directory(directory) as temp_dir:
        model.save_pretrained(temp_dir, safe_serialization=True)
        tokenizer.save_pretrained(temp_dir)
        write_atomic(temp_dir / SOURCE_RECORD_NAME, json.dumps(record, indent=2, default=str) + "\n")
