"""``cora merge``: fold a run's adapter into its base model and save a plain transformers checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cora.merge import MERGE_DTYPES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="merge a trained adapter into its base model",
        description="Load RUN_DIR's base model and adapter, merge the adapter with PEFT's merge_and_unload "
        "and save model and tokenizer to a folder that transformers loads without PEFT.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run folder written by `cora train`")
    parser.add_argument("-o", "--output", required=True, type=Path, help="folder to write the merged model to")
    parser.add_argument("--dtype", choices=MERGE_DTYPES, default="float32",
                        help="weight dtype of the merged model (default: float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cora.merge import merge_run

    path = merge_run(args.run_dir, args.output, dtype=args.dtype, overwrite=args.overwrite)
    print(json.dumps({"merged_model": str(path)}, indent=2))
    return 0
