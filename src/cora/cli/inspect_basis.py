"""``cora inspect``: print a basis file's metadata and per-layer energy, optionally plot it."""

from __future__ import annotations

import argparse

from cora.basis import Basis
from cora.inspection import angle_lines, source_angles, summary_lines, write_plots


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show a basis file's metadata and captured energy",
        description="Print the metadata and per-layer captured energy of a basis file; with --plot, write "
        "PNG plots of the spectra and, given --sources, principal angles per source.",
    )
    parser.add_argument("basis", metavar="BASIS", help="basis file written by `cora extract`")
    parser.add_argument("--plot", metavar="DIR", help="write spectrum.png (and principal_angles.png) here")
    parser.add_argument("--sources", nargs="+", metavar="MODEL",
                        help="source models to compare with the common basis: prints the largest principal angle per layer")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    basis = Basis.load(args.basis)
    for line in summary_lines(basis):
        print(line)
    angles = source_angles(basis, args.sources) if args.sources else None
    if angles is not None:
        for line in angle_lines(basis, angles):
            print(line)
    if args.plot:
        for path in write_plots(basis, args.plot, args.sources, angles=angles):
            print(f"wrote {path}")
    return 0
