"""``cora train``: fine-tune a CoRA or LoRA adapter and write a run folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cora.adapters import A_INITS, B_INITS, MODES
from cora.data import TEMPLATES

# Flag destination -> dotted run config key.
FLAG_KEYS = {
    "model": "model",
    "basis": "basis",
    "template": "template",
    "data": "data.path",
    "data_split": "data.split",
    "eval_size": "data.eval_size",
    "max_examples": "data.max_examples",
    "mode": "adapter.mode",
    "rank": "adapter.r",
    "alpha": "adapter.lora_alpha",
    "dropout": "adapter.lora_dropout",
    "target_modules": "adapter.target_modules",
    "b_init": "adapter.b_init",
    "a_init": "adapter.a_init",
    "steps": "training.max_steps",
    "epochs": "training.epochs",
    "lr": "training.lr",
    "batch_size": "training.batch_size",
    "grad_accum": "training.gradient_accumulation_steps",
    "max_length": "training.max_length",
    "seed": "training.seed",
    "eval_steps": "training.eval_steps",
    "save_steps": "training.save_steps",
    "precision": "training.precision",
    "gradient_checkpointing": "training.gradient_checkpointing",
    "load_in_4bit": "training.load_in_4bit",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a CoRA or LoRA adapter",
        description=(
            "Fine-tune an adapter with the Hugging Face Trainer. Settings come from --config (YAML), "
            "then the flags below, then --set KEY=VALUE overrides."
        ),
    )
    parser.add_argument("-o", "--output", required=True, type=Path, help="run folder to write")
    parser.add_argument("--config", type=Path, help="run config YAML file")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override any run config field, e.g. training.lr=1e-4 (repeatable)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in the folder")
    parser.add_argument("--resume", action="store_true", help="continue the run in the folder from its last checkpoint")

    source = parser.add_argument_group("model and data")
    source.add_argument("--model", help="base model: Hub id[@revision], folder, .gguf file or smollm2")
    source.add_argument("--data", help="training data: Alpaca/MBPP/HumanEval JSON or JSONL file, or a Hub dataset id")
    source.add_argument("--data-split", help="Hub dataset split (default train)")
    source.add_argument(
        "--eval-size", type=int,
        help="held-out examples (default: 10%% of the data); rows that share a prompt are held out together, "
        "so it can be more",
    )
    source.add_argument("--max-examples", type=int, help="cap on examples read")
    source.add_argument("--template", choices=TEMPLATES, help="prompt template (default alpaca)")

    adapter = parser.add_argument_group("adapter")
    adapter.add_argument("--basis", help="basis file from `cora extract`")
    adapter.add_argument("--mode", choices=MODES, help="lora, frozen (basis frozen) or trainable (default frozen)")
    adapter.add_argument("--rank", type=int, help="LoRA rank r (default: the basis rank, or 8)")
    adapter.add_argument("--alpha", type=float, help="lora_alpha; scaling = alpha / r (default: r)")
    adapter.add_argument("--dropout", type=float, help="lora_dropout (default 0)")
    adapter.add_argument("--target-modules", nargs="+", help="module names to adapt (default: the basis modules)")
    adapter.add_argument("--b-init", choices=B_INITS, help="basis-side factor (default basis)")
    adapter.add_argument("--a-init", choices=A_INITS, help="free factor (default kaiming)")

    training = parser.add_argument_group("training")
    training.add_argument("--steps", type=int, help="optimiser steps (default 100)")
    training.add_argument("--epochs", type=float, help="epochs, used with --steps 0")
    training.add_argument("--lr", type=float, help="peak learning rate (default 2e-4)")
    training.add_argument("--batch-size", type=int, help="examples per device per step (default 4)")
    training.add_argument("--grad-accum", type=int, help="gradient accumulation steps (default 1)")
    training.add_argument("--max-length", type=int, help="max tokens per example (default 512)")
    training.add_argument("--seed", type=int, help="seed of init, dropout and data order (default 0)")
    training.add_argument("--eval-steps", type=int, help="held-out loss every N steps (default: none)")
    training.add_argument("--save-steps", type=int, help="checkpoint every N steps, for --resume (default: none)")
    training.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), help="default auto")
    training.add_argument(
        "--gradient-checkpointing", action="store_const", const=True, help="recompute activations to save memory"
    )
    training.add_argument("--load-in-4bit", action="store_const", const=True, help="QLoRA 4-bit base (CUDA only)")
    parser.set_defaults(func=run)


def flag_overrides(args: argparse.Namespace) -> dict[str, object]:
    """Dotted run config keys for the flags that were given."""
    overrides: dict[str, object] = {}
    for dest, key in FLAG_KEYS.items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides[key] = value
    if overrides.get("training.max_steps") == 0:
        overrides["training.max_steps"] = None  # --steps 0: train for --epochs
    return overrides


def run(args: argparse.Namespace) -> int:
    from cora.runs import apply_overrides, load_run_config, read_config_file, RunConfig
    from cora.training import train_run

    if args.resume:
        if args.config or args.set or flag_overrides(args):
            raise ValueError("--resume reads the run folder's run_config.yaml; drop --config, --set and other flags")
        config = load_run_config(args.output)
    else:
        raw = read_config_file(args.config) if args.config else {}
        raw = apply_overrides(raw, flag_overrides(args))
        config = RunConfig.from_dict(apply_overrides(raw, args.set))

    result = train_run(config, args.output, overwrite=args.overwrite, resume=args.resume)
    print(
        json.dumps(
            {
                "run_dir": str(result.run_dir),
                "adapter": str(result.adapter_dir),
                "steps": result.steps,
                "final_loss": result.final_loss,
                "trainable_parameters": result.trainable_parameters,
                "total_parameters": result.total_parameters,
                "train_seconds": round(result.train_seconds, 1),
            },
            indent=2,
        )
    )
    return 0
