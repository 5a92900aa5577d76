"""The ``cora`` command: one module per subcommand in this package.

Each subcommand module defines ``register(subparsers)``, which adds its parser
and sets ``func`` to a callable taking the parsed arguments and returning an
exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cora import __version__

# Subcommand modules, in the order `cora --help` lists them.
SUBCOMMANDS = ("extract", "inspect_basis", "train", "evaluate", "merge", "convert", "demo", "compare", "setup_wordnet")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cora",
        description="CoRA: LoRA fine-tuning with a common subspace of several models' attention weights.",
    )
    parser.add_argument("--version", action="version", version=f"cora-adapters {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"cora.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        # Input errors carry the value and the fix in their message: show it without a traceback.
        if args.verbose:
            raise
        print(f"cora {args.command}: error: {error}", file=sys.stderr)
        return 2
