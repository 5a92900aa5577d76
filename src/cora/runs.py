"""Run configs and run folders: one YAML file describes a training run completely.

A run config has sections that mirror the pipeline::

    model: smollm2                 # base model spec (see cora.models)
    basis: basis.safetensors       # basis file, or null for plain LoRA and basis-free ablations
    template: alpaca               # prompt template (see cora.data.format_prompt)
    adapter:    {mode, r, lora_alpha, lora_dropout, target_modules, b_init, a_init, side, init_seed}
    data:       {path, split, eval_fraction, eval_size, max_examples, seed}
    training:   {max_steps, epochs, batch_size, gradient_accumulation_steps, lr, ...}
    evaluation: {max_new_tokens, eval_size, batch_size}

Every field can be overridden with a dotted key (``training.lr=1e-4``). Unknown
fields and invalid values are rejected when the config is built.

A finished run folder contains::

    RUN_DIR/
        adapter/             standard PEFT adapter folder, plus cora_adapter.json
        run_config.yaml      the resolved config
        train_log.jsonl      the Trainer's log history, one record per line
        train_summary.json   parameter counts, wall time, steps, final loss
        loss_curve.png       training (and evaluation) loss against step
        checkpoints/         Trainer checkpoints, when training.save_steps is set
"""

from __future__ import annotations

import dataclasses
import logging
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cora.adapters import AdapterConfig
from cora.data import TEMPLATES, DataConfig
from cora.files import write_atomic
from cora.models import DEFAULT_MODEL_ALIAS

logger = logging.getLogger(__name__)

SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay",
)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "lorafa")
RUN_CONFIG_NAME = "run_config.yaml"
ADAPTER_DIR_NAME = "adapter"


@dataclass
class TrainingConfig:
    """Optimisation settings, passed on to ``transformers.TrainingArguments``."""

    max_steps: int | None = 100  # optimiser steps; None: train for `epochs` instead
    epochs: float = 1.0  # passes over the training split, used when max_steps is None
    batch_size: int = 4  # examples per device per forward pass
    gradient_accumulation_steps: int = 1
    lr: float = 2e-4  # peak learning rate
    lr_scheduler: str = "linear"  # transformers scheduler name
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 512  # tokens per example (prompt + response), longer ones are cut at the end
    seed: int = 0  # seed of the model init, dropout and data order
    logging_steps: int = 10
    eval_steps: int | None = None  # held-out loss every N steps; None: no periodic evaluation
    save_steps: int | None = None  # checkpoint every N steps (needed for resume); None: no checkpoints
    save_total_limit: int | None = 2  # checkpoints kept
    gradient_checkpointing: bool = False
    precision: str = "auto"  # auto (bf16 or fp16 on a CUDA GPU, fp32 otherwise) | fp32 | bf16 | fp16
    load_in_4bit: bool = False  # QLoRA: 4-bit NF4 base model through bitsandbytes (CUDA only)
    optimizer: str = "adamw"  # adamw (the Trainer's) | lorafa (PEFT's LoRA-FA: lora_A frozen, projected B update)

    def __post_init__(self) -> None:
        _check_positive(self, "batch_size", "gradient_accumulation_steps", "max_length", "logging_steps")
        _check_positive(self, "max_steps", "eval_steps", "save_steps", "save_total_limit", optional=True)
        if self.epochs <= 0:
            raise ValueError(f"invalid training.epochs {self.epochs}; expected a positive number")
        if self.lr <= 0:
            raise ValueError(f"invalid training.lr {self.lr}; expected a positive number")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("invalid training.warmup_steps, weight_decay or max_grad_norm; expected values >= 0")
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"invalid training.lr_scheduler {self.lr_scheduler!r}; expected one of {SCHEDULERS}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"invalid training.precision {self.precision!r}; expected one of {PRECISIONS}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"invalid training.optimizer {self.optimizer!r}; expected one of {OPTIMIZERS}")


@dataclass
class EvaluationConfig:
    """Settings that ``cora evaluate`` reads for generation on the held-out split."""

    max_new_tokens: int = 256  # tokens generated per example
    eval_size: int | None = None  # held-out examples scored; None: all of them
    batch_size: int = 8  # prompts per generation batch

    def __post_init__(self) -> None:
        _check_positive(self, "max_new_tokens", "batch_size")
        _check_positive(self, "eval_size", optional=True)


def _check_positive(config: Any, *names: str, optional: bool = False) -> None:
    section = {TrainingConfig: "training", EvaluationConfig: "evaluation"}.get(type(config), "")
    for name in names:
        value = getattr(config, name)
        if value is None and optional:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            expected = "a positive integer or null" if optional else "a positive integer"
            raise ValueError(f"invalid {section}.{name} {value!r}; expected {expected}")


@dataclass
class RunConfig:
    """A complete description of one training run."""

    data: DataConfig
    model: str = "smollm2"  # base model spec: Hub id[@revision], folder, .gguf file or smollm2
    basis: str | None = None  # basis file from `cora extract`; None for plain LoRA or basis-free ablations
    template: str = "alpaca"  # prompt template: alpaca | code | completion | chat
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"invalid template {self.template!r}; expected one of {TEMPLATES}")
        if not self.model:
            raise ValueError("invalid model ''; expected a Hub id, a folder, a .gguf file or 'smollm2'")
        if self.adapter.mode != "lora" and self.adapter.b_init == "basis" and self.basis is None:
            raise ValueError(
                f"adapter.mode {self.adapter.mode!r} with b_init 'basis' needs a basis file; "
                "set basis (--basis), or use mode 'lora' or another b_init"
            )
        if self.training.optimizer == "lorafa" and self.adapter.mode != "lora":
            raise ValueError(
                f"training.optimizer 'lorafa' freezes lora_A of a plain LoRA adapter; it needs adapter.mode 'lora', "
                f"not {self.adapter.mode!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        """Build a config from nested plain values, checking every field name and value."""
        return _build(cls, raw, "")


SECTIONS = {"adapter": AdapterConfig, "data": DataConfig, "training": TrainingConfig, "evaluation": EvaluationConfig}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"invalid {prefix or 'run config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ValueError(f"unknown run config field {where}{unknown[0]}; expected one of {sorted(fields)}")

    required = [
        f.name for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in raw
    ]
    if required:
        where = f"{prefix}." if prefix else ""
        raise ValueError(f"missing run config field {where}{required[0]}; set it in the config file or with a flag")

    values = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, key)
        else:
            values[name] = _coerce(value, hint, key)
    try:
        return cls(**values)
    except ValueError as error:
        if prefix and not str(error).startswith(("invalid " + prefix, "unknown")):
            raise ValueError(f"{prefix}: {error}") from error
        raise


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise naming the field."""
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ValueError(f"invalid {key} null; expected a value of type {getattr(hint, '__name__', hint)}")
    if type(None) in args:
        hint = next(arg for arg in args if arg is not type(None))
        args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"invalid {key} {value!r}; expected a list of names")
        return tuple(str(item) for item in items)
    try:
        if hint is bool:
            return _to_bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"invalid {key} {value!r}; expected a value of type {hint.__name__}") from None
    return value


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in {"true", "yes", "1", "on"}:
        return True
    if text in {"false", "no", "0", "off"}:
        return False
    raise ValueError(value)


def apply_overrides(raw: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a nested config mapping: ``["training.lr=1e-4", "adapter.mode=trainable"]``.

    String values are parsed as YAML, so ``null``, numbers, booleans and lists work.
    """
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for text in overrides:
            key, sep, value = text.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"invalid override {text!r}; expected KEY=VALUE, e.g. training.lr=1e-4")
            items.append((key.strip(), yaml.safe_load(value) if value.strip() else None))

    result = _plain(raw)
    for key, value in items:
        parts = key.split(".")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] not in SECTIONS):
            raise ValueError(f"invalid override key {key!r}; expected FIELD or SECTION.FIELD with SECTION in {sorted(SECTIONS)}")
        target = result
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ValueError(f"invalid override key {key!r}: {part} is not a section")
        target[parts[-1]] = value
    return result


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run config not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path} does not contain a YAML mapping; expected sections like model, data, training")
    return raw


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | dict[str, Any] = ()) -> RunConfig:
    """Build a run config from an optional YAML file and dotted overrides."""
    raw = read_config_file(path) if path is not None else {}
    return RunConfig.from_dict(apply_overrides(raw, overrides))


def _absolute_if_local(spec: str) -> str:
    """Return ``spec`` as an absolute path when it names a file or folder that exists here, else unchanged."""
    return os.path.abspath(spec) if Path(spec).exists() else spec


def with_absolute_paths(config: RunConfig) -> RunConfig:
    """Return ``config`` with its local model, basis and data paths made absolute.

    A run folder is then usable from any working directory. Hub ids, ``hub:`` data ids
    and the ``smollm2`` alias stay as they are, as do paths that do not exist here.
    """
    model = config.model if config.model == DEFAULT_MODEL_ALIAS else _absolute_if_local(config.model)
    basis = _absolute_if_local(config.basis) if config.basis else config.basis
    data_path = config.data.path
    if not data_path.startswith("hub:"):
        data_path = _absolute_if_local(data_path)
    return dataclasses.replace(config, model=model, basis=basis, data=dataclasses.replace(config.data, path=data_path))


def save_run_config(config: RunConfig, run_dir: str | os.PathLike) -> Path:
    """Write ``RUN_DIR/run_config.yaml``, with local paths made absolute (see :func:`with_absolute_paths`)."""
    path = Path(run_dir) / RUN_CONFIG_NAME
    write_atomic(path, yaml.safe_dump(with_absolute_paths(config).to_dict(), sort_keys=False))
    return path


def load_run_config(run_dir: str | os.PathLike) -> RunConfig:
    """Read ``RUN_DIR/run_config.yaml``."""
    path = Path(run_dir) / RUN_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; is {run_dir} a run folder written by `cora train`?")
    return RunConfig.from_dict(read_config_file(path))


def load_trained_model(run_dir: str | os.PathLike, device: str | None = None) -> tuple[Any, Any, RunConfig]:
    """Load the base model of a run with its trained adapter, ready for generation.

    Returns:
        ``(peft_model, tokenizer, run_config)``; the model is in eval mode.
    """
    from cora.adapters import load_cora_adapter
    from cora.models import load_base_model

    config = load_run_config(run_dir)
    adapter_dir = Path(run_dir) / ADAPTER_DIR_NAME
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} has no trained adapter; the run may not have finished")
    quantization_config = None
    if config.training.load_in_4bit:
        from cora.training import bnb_4bit_config

        quantization_config = bnb_4bit_config()
    base, tokenizer = load_base_model(config.model, device=device, quantization_config=quantization_config)
    model = load_cora_adapter(base, adapter_dir)
    model.eval()
    return model, tokenizer, config
