"""``cora compare``: train and evaluate a grid of methods x tasks x seeds, then write the results."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="run an experiment grid (methods x tasks x seeds) and write result tables and plots",
        description=(
            "Build the grid's source models and bases, train and evaluate every (task, method, seed) cell with "
            "the same data and budget, and write results.md/.csv/.json and PNG plots into the output folder. "
            "Finished cells are skipped, so running the same command again resumes an interrupted grid."
        ),
    )
    parser.add_argument("--config", required=True, type=Path, help="grid YAML file (see docs/compare.md)")
    parser.add_argument("-o", "--output", required=True, type=Path, help="output folder of the grid")
    parser.add_argument("--data-root", help="folder that relative data paths resolve against (default: the grid's data_root)")
    parser.add_argument("--device", help="torch device for training and evaluation (default: cuda when available, else cpu)")
    parser.add_argument("--dry-run", action="store_true", help="list the planned cells and their state, train nothing")
    parser.add_argument("--report-only", action="store_true", help="rewrite tables and plots from finished cells only")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cora.compare import collect_curves, collect_records, load_grid, plan_runs, run_grid
    from cora.report import write_report
    from cora.training import SUMMARY_NAME

    grid = load_grid(args.config, data_root=args.data_root)
    if args.dry_run:
        grid.check_data_files()
        plans = plan_runs(grid, args.output)
        for plan in plans:
            if not plan.method.train:
                state = "base model, evaluation only"
            else:
                state = "has a training summary" if (plan.run_dir / SUMMARY_NAME).is_file() else "not trained"
            print(f"{plan.label:50s} {state}")
        print(f"{len(plans)} cells, {len(grid.bases)} bases, {len(grid.sources)} source models")
        return 0

    result = None
    if args.report_only:
        plans = plan_runs(grid, args.output)
        records = collect_records(grid, plans)
        paths = write_report(
            records, collect_curves(plans), args.output, [m.name for m in grid.methods], grid.name, grid.claims
        )
        print(f"{len(records)} evaluations reported")
    else:
        result = run_grid(grid, args.output, device=args.device)
        paths = result.report_paths
        print(
            f"grid {grid.name}: {result.trained} runs trained, {result.evaluated} evaluations, "
            f"{result.skipped} cells already finished, {result.seconds:.0f} s"
        )
    for path in paths:
        print(f"wrote {path}")
    if result is not None and result.failed:
        print(f"{len(result.failed)} cells failed; fix the cause and run the same command again:")
        for line in result.failed:
            print(f"  {line}")
        return 1
    return 0
