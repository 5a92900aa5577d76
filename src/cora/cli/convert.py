"""``cora convert``: between a standard PEFT adapter folder and the compact frozen-basis file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cora.runs import ADAPTER_DIR_NAME


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a frozen-basis adapter to the compact format and back",
        description="--to compact: keep only the trained factor of a frozen-basis adapter (a run folder or PEFT "
        "adapter folder) in one .cora.safetensors file that refers to the basis file by sha256. "
        "--to peft: rebuild the standard PEFT folder from a compact file and its basis.",
    )
    parser.add_argument("source", type=Path, metavar="SOURCE",
                        help="run folder or PEFT adapter folder (--to compact), or compact file (--to peft)")
    parser.add_argument("--basis", required=True, type=Path, help="the basis file the adapter was trained with")
    parser.add_argument("--to", choices=("compact", "peft"), default="compact", help="target format (default: compact)")
    parser.add_argument("-o", "--output", required=True, type=Path,
                        help="compact file to write (--to compact) or PEFT folder (--to peft)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cora.compact import compact_peft_folder, expand_compact_adapter

    if args.output.exists() and not args.overwrite:
        raise ValueError(f"output {args.output} already exists; pass --overwrite to replace it")
    if args.to == "compact":
        source = args.source
        if (source / ADAPTER_DIR_NAME / "adapter_config.json").is_file():
            source = source / ADAPTER_DIR_NAME  # a run folder
        path = compact_peft_folder(source, args.basis, args.output)
        peft_bytes = (source / "adapter_model.safetensors").stat().st_size
        report = {"compact_adapter": str(path), "bytes": path.stat().st_size, "peft_bytes": peft_bytes}
    else:
        path = expand_compact_adapter(args.source, args.basis, args.output)
        report = {"peft_adapter": str(path)}
    print(json.dumps(report, indent=2))
    return 0
