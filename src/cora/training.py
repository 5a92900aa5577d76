"""Fine-tuning a CoRA or LoRA adapter with the Hugging Face Trainer.

    RunConfig --models--> base model --adapters--> PeftModel
              --data-----> train / held-out examples --tokenize--> input_ids, labels
              --Trainer--> RUN_DIR/adapter, train_log.jsonl, train_summary.json, loss_curve.png

The loss covers response tokens only: prompt tokens carry the label -100, and
the response ends with the tokenizer's EOS token so the model learns to stop.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cora.adapters import SIDECAR_NAME, build_cora_model, count_parameters, save_cora_adapter
from cora.basis import Basis
from cora.data import Example, format_prompt, load_examples, split_examples
from cora.models import load_base_model
from cora.files import write_atomic
from cora.runs import ADAPTER_DIR_NAME, RunConfig, load_run_config, save_run_config

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label that the causal-LM loss skips
CHECKPOINT_DIR_NAME = "checkpoints"
LOG_NAME = "train_log.jsonl"
SUMMARY_NAME = "train_summary.json"
CURVE_NAME = "loss_curve.png"
SECONDS_NAME = "cora_train_seconds.json"  # training time up to a checkpoint, in each checkpoint folder
RUN_OUTPUTS = (ADAPTER_DIR_NAME, CHECKPOINT_DIR_NAME, "run_config.yaml", LOG_NAME, SUMMARY_NAME, CURVE_NAME)


@dataclass
class TrainResult:
    """Outputs of a finished run."""

    run_dir: Path
    adapter_dir: Path
    trainable_parameters: int
    total_parameters: int
    train_seconds: float
    steps: int
    final_loss: float  # mean training loss of the last logged interval (or of the run, if none was logged)
    log_history: list[dict[str, Any]] = field(default_factory=list)


# --- tokenisation ----------------------------------------------------------------------------------


def tokenize_example(example: Example, template: str, tokenizer: Any, max_length: int) -> dict[str, list[int]] | None:
    """Tokenise prompt and response; label only the response (and its EOS).

    Returns None when the prompt alone fills ``max_length`` and no response token fits.
    """
    # NOTE: prompt and response are tokenised separately, so a BPE merge across the
    # boundary can differ from tokenising the joined text. At generation time the prompt is
    # also tokenised on its own, so training and generation agree.
    prompt_ids = tokenizer(format_prompt(example, template, tokenizer), add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def build_dataset(examples: list[Example], template: str, tokenizer: Any, max_length: int) -> Any:
    from datasets import Dataset

    rows = [tokenize_example(example, template, tokenizer, max_length) for example in examples]
    kept = [row for row in rows if row is not None]
    if len(kept) < len(rows):
        logger.warning(
            "skipped %d of %d examples whose prompt fills max_length %d", len(rows) - len(kept), len(rows), max_length
        )
    if not kept:
        raise ValueError(f"no example fits max_length {max_length} with a response token; raise training.max_length")
    return Dataset.from_list(kept)


# --- model and Trainer set-up ----------------------------------------------------------------------


def bnb_4bit_config() -> Any:
    """Build the QLoRA bitsandbytes config (4-bit NF4, bfloat16 compute), which needs CUDA."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "training.load_in_4bit needs a CUDA GPU (bitsandbytes 4-bit kernels); "
            "set training.load_in_4bit=false to train in full precision"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise RuntimeError("training.load_in_4bit needs bitsandbytes; install it with `pip install bitsandbytes`") from error
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def resolve_precision(precision: str) -> str:
    """Map ``auto`` to bf16 or fp16 on a CUDA GPU and fp32 elsewhere; reject fp16 without CUDA."""
    cuda = torch.cuda.is_available()
    if precision == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and not cuda:
        raise ValueError("invalid training.precision 'fp16' without a CUDA GPU; use fp32 or bf16")
    return precision


def prepare_model(config: RunConfig) -> tuple[Any, Any]:
    """Load the base model and wrap it with the configured adapter."""
    quantization_config = bnb_4bit_config() if config.training.load_in_4bit else None
    base, tokenizer = load_base_model(config.model, quantization_config=quantization_config)
    if quantization_config is not None:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=config.training.gradient_checkpointing
        )
    basis = Basis.load(config.basis) if config.basis else None
    model = build_cora_model(base, basis, config.adapter)
    if config.training.gradient_checkpointing:
        # The inputs of the frozen base need gradients, or checkpointed blocks pass none to the adapters.
        model.enable_input_require_grads()
    return model, tokenizer


def lorafa_optimizer(model: Any, config: RunConfig) -> Any:
    """Build PEFT's LoRA-FA optimizer (arXiv 2308.03303), which also freezes every ``lora_A``."""
    from peft.optimizers import create_lorafa_optimizer

    peft_config = model.peft_config[model.active_adapter]  # r and lora_alpha as the adapter was built
    return create_lorafa_optimizer(
        model, r=peft_config.r, lora_alpha=peft_config.lora_alpha, lr=config.training.lr,
        weight_decay=config.training.weight_decay,
    )


def training_arguments(config: RunConfig, run_dir: Path, has_eval: bool) -> Any:
    from transformers import TrainingArguments

    settings = config.training
    precision = resolve_precision(settings.precision)
    periodic_eval = has_eval and settings.eval_steps is not None
    checkpointing = {}
    if settings.gradient_checkpointing:
        # transformers renamed gradient_checkpointing to activation_checkpointing during 5.x.
        prefix = "activation" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient"
        checkpointing = {f"{prefix}_checkpointing": True, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}
    return TrainingArguments(
        output_dir=str(run_dir / CHECKPOINT_DIR_NAME),
        max_steps=settings.max_steps if settings.max_steps is not None else -1,
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.lr,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        logging_steps=settings.logging_steps,
        eval_strategy="steps" if periodic_eval else "no",
        eval_steps=settings.eval_steps if periodic_eval else None,
        save_strategy="steps" if settings.save_steps is not None else "no",
        save_steps=settings.save_steps or 500,
        save_total_limit=settings.save_total_limit,
        seed=settings.seed,
        data_seed=settings.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # every LoRA factor takes part in each forward pass
        report_to=[],
        disable_tqdm=False,
        **checkpointing,
    )


def load_splits(config: RunConfig) -> tuple[list[Example], list[Example]]:
    """Load the training and held-out examples, split exactly as ``cora evaluate`` splits them."""
    examples = load_examples(config.data.path, config.data.split)
    train, held_out = split_examples(examples, config.data)
    logger.info("%d training and %d held-out examples", len(train), len(held_out))
    return train, held_out


# --- run folder ------------------------------------------------------------------------------------


def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Reject a file, or a non-empty folder without ``overwrite``; change nothing."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run folder {run_dir} is a file; pass a folder path to -o")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        raise ValueError(f"run folder {run_dir} is not empty; pass --overwrite to replace it or --resume to continue")


def prepare_run_dir(run_dir: Path, overwrite: bool) -> list[Path]:
    """Create ``run_dir``; reject a non-empty one unless ``overwrite``, which removes earlier run outputs only.

    Returns:
        The paths that the new run will create: the folder itself when it was absent, and the run outputs.
    """
    check_run_dir(run_dir, overwrite)
    created = [] if run_dir.is_dir() else [run_dir]
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return [run_dir / name for name in RUN_OUTPUTS] + created


def _remove_created(run_dir: Path, created: list[Path]) -> None:
    """Remove what a failed run wrote before its first checkpoint, so that the same command can run again."""
    for path in created:
        if path == run_dir:
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        elif path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    if created:
        logger.info("removed the outputs of the failed run from %s", run_dir)


def latest_checkpoint(run_dir: Path) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    folder = run_dir / CHECKPOINT_DIR_NAME
    if not folder.is_dir():
        return None
    last = get_last_checkpoint(str(folder))
    return Path(last) if last else None


def _check_unfinished(run_dir: Path, checkpoint: Path, config: RunConfig) -> None:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    step = int(state.get("global_step", 0))
    max_steps = config.training.max_steps
    saved_max_steps = state.get("max_steps")
    if max_steps is not None and saved_max_steps and max_steps != saved_max_steps:
        # The restored learning-rate scheduler keeps the schedule of the saved run, so a
        # changed step count would train the extra steps at the wrong learning rate.
        raise ValueError(
            f"invalid training.max_steps {max_steps} in {run_dir / 'run_config.yaml'}: the checkpoint "
            f"{checkpoint.name} belongs to a run of {saved_max_steps} steps, and resume continues a run to its "
            f"configured end; set training.max_steps back to {saved_max_steps}, or start a new run to train longer"
        )
    if max_steps is not None and step >= max_steps and (run_dir / SUMMARY_NAME).is_file():
        raise ValueError(
            f"run in {run_dir} already finished at step {step} of {max_steps}; nothing to resume. "
            "To train longer, start a new run in another folder"
        )


def _checkpoint_seconds(checkpoint: Path) -> float:
    """Read the training time up to ``checkpoint``; 0 for checkpoints written without it."""
    path = checkpoint / SECONDS_NAME
    if not path.is_file():
        return 0.0
    return float(json.loads(path.read_text())["train_seconds"])


def wall_time_callback(previous_seconds: float) -> Any:
    """Build a callback that writes the training time so far into each checkpoint, for resumed summaries."""
    from transformers import TrainerCallback

    class WallTimeCallback(TrainerCallback):
        def __init__(self) -> None:
            self.start = time.perf_counter()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start = time.perf_counter()

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if args.should_save and folder.is_dir():
                seconds = previous_seconds + time.perf_counter() - self.start
                write_atomic(folder / SECONDS_NAME, json.dumps({"train_seconds": round(seconds, 3)}) + "\n")

    return WallTimeCallback()


def final_loss(log_history: list[dict[str, Any]]) -> float | None:
    losses = [record["loss"] for record in log_history if "loss" in record]
    return float(losses[-1]) if losses else None


def write_log(run_dir: Path, log_history: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(record, sort_keys=True) + "\n" for record in log_history)
    write_atomic(run_dir / LOG_NAME, text)


def plot_loss_curve(run_dir: Path, log_history: list[dict[str, Any]]) -> Path:
    """Plot training and evaluation loss against step into ``loss_curve.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for key, label in (("loss", "training loss"), ("eval_loss", "held-out loss")):
        points = [(record["step"], record[key]) for record in log_history if key in record]
        if points:
            steps, values = zip(*points)
            axes.plot(steps, values, marker="o" if len(points) < 20 else None, label=label)
    axes.set_xlabel("optimiser step")
    axes.set_ylabel("loss (nats per response token)")
    axes.legend()
    figure.tight_layout()

    path = run_dir / CURVE_NAME
    temp_path = run_dir / f".{CURVE_NAME}.tmp.png"
    figure.savefig(temp_path, dpi=100)
    plt.close(figure)
    os.replace(temp_path, path)
    return path


# --- the run -------------------------------------------------------------------------------------


def train_run(
    config: RunConfig,
    run_dir: str | os.PathLike,
    overwrite: bool = False,
    resume: bool = False,
    callbacks: list[Any] | None = None,
) -> TrainResult:
    """Train the adapter that ``config`` describes and write the run folder.

    Args:
        config: the run; saved as ``run_dir/run_config.yaml``.
        run_dir: output folder; it must be empty or absent unless ``overwrite`` or ``resume``.
        overwrite: remove the outputs of an earlier run in ``run_dir`` first.
        resume: continue from the last checkpoint in ``run_dir/checkpoints`` (same
            step, data order, optimiser and learning-rate schedule) to the configured end;
            ``config`` must match the saved one.
        callbacks: extra ``transformers.TrainerCallback`` objects for the Trainer.

    Under ``accelerate launch`` (DDP, FSDP, DeepSpeed) every process trains, and
    only the main process writes the run folder.

    The model, basis and data load before anything is written, and a run that fails
    before its first checkpoint removes what it wrote, so the same command can be run again.
    The saved config has absolute local paths (see :func:`cora.runs.with_absolute_paths`).

    Raises:
        ValueError: the run folder is not empty, ``resume`` finds no checkpoint, or the
            saved ``training.max_steps`` differs from the checkpoint's.
    """
    from transformers import DataCollatorForSeq2Seq, Trainer, set_seed

    run_dir = Path(run_dir)
    # Built first: it sets up the process group when launched with several processes.
    args = training_arguments(config, run_dir, config.training.eval_steps is not None)
    checkpoint = None
    previous_seconds = 0.0
    if resume:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise ValueError(f"no checkpoint in {run_dir / CHECKPOINT_DIR_NAME} to resume; set training.save_steps")
        _check_unfinished(run_dir, checkpoint, config)
        previous_seconds = _checkpoint_seconds(checkpoint)
    elif args.should_save:
        check_run_dir(run_dir, overwrite)

    # Model, basis and data load before the run folder is written, so that a run that fails
    # on its inputs leaves nothing behind and the corrected command needs no --overwrite.
    set_seed(config.training.seed)
    model, tokenizer = prepare_model(config)
    train_examples, held_out = load_splits(config)
    train_set = build_dataset(train_examples, config.template, tokenizer, config.training.max_length)
    eval_set = None
    if config.training.eval_steps is not None:
        eval_examples = held_out[: config.evaluation.eval_size] if config.evaluation.eval_size else held_out
        eval_set = build_dataset(eval_examples, config.template, tokenizer, config.training.max_length)

    created = []
    if args.should_save and not resume:
        created = prepare_run_dir(run_dir, overwrite)
        save_run_config(config, run_dir)
    args.distributed_state.wait_for_everyone()

    try:
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_set,
            eval_dataset=eval_set,
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
            callbacks=[*(callbacks or []), wall_time_callback(previous_seconds)],
            optimizers=(lorafa_optimizer(model, config), None) if config.training.optimizer == "lorafa" else (None, None),
        )
        _warn_if_engine_ignored(trainer)
        trainable, total = count_parameters(model)
        logger.info("training %d of %d parameters (%.3f%%)", trainable, total, 100.0 * trainable / total)
        start = time.perf_counter()
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except BaseException:
        if args.should_save and latest_checkpoint(run_dir) is None:
            _remove_created(run_dir, created)
        raise
    seconds = previous_seconds + time.perf_counter() - start
    checkpoints = run_dir / CHECKPOINT_DIR_NAME
    if args.should_save and checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()  # the Trainer creates it even when it saves no checkpoint
    return _write_outputs(run_dir, model, trainer, output, trainable, total, seconds)


def _write_outputs(
    run_dir: Path, model: Any, trainer: Any, output: Any, trainable: int, total: int, seconds: float
) -> TrainResult:
    log_history = list(trainer.state.log_history)
    last_loss = final_loss(log_history)
    if last_loss is None:  # fewer steps than logging_steps: only the run mean was logged
        last_loss = float(output.training_loss)
    adapter_dir = save_trained_adapter(trainer, model, run_dir / ADAPTER_DIR_NAME)
    result = TrainResult(
        run_dir=run_dir,
        adapter_dir=adapter_dir,
        trainable_parameters=trainable,
        total_parameters=total,
        train_seconds=seconds,
        steps=int(output.global_step),
        final_loss=last_loss,
        log_history=log_history,
    )
    summary = {
        "trainable_parameters": trainable,
        "total_parameters": total,
        "train_seconds": round(seconds, 3),
        "steps": result.steps,
        "final_loss": result.final_loss,
        "mean_train_loss": float(output.training_loss),
    }
    if trainer.args.should_save:
        write_log(run_dir, log_history)
        plot_loss_curve(run_dir, log_history)
        write_atomic(run_dir / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    trainer.args.distributed_state.wait_for_everyone()
    logger.info("run finished: %d steps in %.1f s, final loss %s", result.steps, seconds, result.final_loss)
    return result


def _warn_if_engine_ignored(trainer: Any) -> None:
    # accelerate 1.15 enables FSDP only for GPU-like devices; with CPU processes it
    # runs plain data parallel without saying so.
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not trainer.is_fsdp_enabled:
        logger.warning("the accelerate config asks for FSDP, but accelerate enables it only on GPUs; "
                       "training runs as plain data parallel on %d processes", trainer.args.world_size)


def _is_sharded_or_multi_process(trainer: Any) -> bool:
    return trainer.args.world_size > 1 or trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled


def _is_zero3(trainer: Any) -> bool:
    plugin = trainer.accelerator.state.deepspeed_plugin if trainer.is_deepspeed_enabled else None
    return plugin is not None and plugin.zero_stage == 3


def _save_zero3_adapter(trainer: Any, model: Any, directory: Path) -> None:
    # Trainer.save_model leaves frozen parameters out of a PEFT model under ZeRO-3
    # (transformers 5.23), which would drop a frozen basis from the adapter. Gathering
    # every LoRA factor first saves both. All processes must enter the gather.
    import deepspeed

    factors = [parameter for name, parameter in model.named_parameters() if "lora_" in name]
    with deepspeed.zero.GatheredParameters(factors):
        if trainer.args.should_save:
            model.save_pretrained(str(directory), selected_adapters=["default"])


def _check_saved_factors(directory: Path, record: dict[str, Any] | None) -> None:
    """Raise if a factor that the adapter keeps frozen is missing from the saved weights."""
    from safetensors import safe_open

    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as reader:
        names = list(reader.keys())
    for weight_name in (record or {}).get("frozen_weights", ()):
        if not any(f".{weight_name}." in name for name in names):
            raise RuntimeError(
                f"the saved adapter in {directory} lacks the frozen {weight_name}; the distributed engine "
                "left frozen parameters out of the state dict, so the adapter would not load correctly"
            )


def save_trained_adapter(trainer: Any, model: Any, directory: Path) -> Path:
    """Save the trained adapter as a PEFT folder with ``cora_adapter.json``, from any number of processes.

    One process saves with :func:`save_cora_adapter`. Under DDP, FSDP or
    DeepSpeed ZeRO-2 every process joins ``Trainer.save_model``, which gathers an
    FSDP full state dict; under ZeRO-3 every process joins a gather of the LoRA
    factors. The main process then writes the sidecar, checks that the frozen
    factor was saved and renames the folder into place.
    """
    if not _is_sharded_or_multi_process(trainer):
        return save_cora_adapter(model, directory)

    temp_dir = directory.parent / f".{directory.name}.saving"
    if trainer.args.should_save and temp_dir.exists():
        shutil.rmtree(temp_dir)
    trainer.args.distributed_state.wait_for_everyone()
    if _is_zero3(trainer):
        _save_zero3_adapter(trainer, model, temp_dir)
    else:
        trainer.save_model(str(temp_dir))
    if trainer.args.should_save:
        record = getattr(model, "cora_records", {}).get("default")
        _check_saved_factors(temp_dir, record)
        if record is not None:
            write_atomic(temp_dir / SIDECAR_NAME, json.dumps(record, indent=2, sort_keys=True) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(temp_dir, directory)
    trainer.args.distributed_state.wait_for_everyone()
    return directory


def resume_run(run_dir: str | os.PathLike) -> TrainResult:
    """Continue a run from its last checkpoint, with the config saved in the run folder."""
    return train_run(load_run_config(run_dir), run_dir, resume=True)
