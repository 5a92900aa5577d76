"""Run MBPP's reference solutions through the sandbox and report the ones that fail.

Usage: python benchmarks/mbpp_references.py [--data MBPP_FOLDER] [--variant full|sanitized]

Upstream MBPP has two rows whose reference code fails its own tests, so the full
set is expected to score 972/974 and the sanitized set 427/427. The script
prints the count and every failing task with the reason the sandbox gives.
"""

from __future__ import annotations

import argparse
import time

from cora.code_tasks import load_mbpp, reference_program
from cora.execution import ExecutionConfig, run_programs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/mbpp", help="MBPP folder or file")
    parser.add_argument("--variant", default="full", choices=("full", "sanitized"))
    parser.add_argument("--workers", type=int, default=2, help="programs run at the same time")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per program")
    args = parser.parse_args()

    examples = load_mbpp(args.data, args.variant, split="all")
    started = time.monotonic()
    results = run_programs(
        [reference_program(example) for example in examples], ExecutionConfig(timeout_s=args.timeout), workers=args.workers
    )
    seconds = time.monotonic() - started

    passed = sum(result.passed for result in results)
    print(f"MBPP {args.variant}: {passed}/{len(examples)} reference solutions pass ({seconds:.1f} s, {args.workers} workers)")
    for example, result in zip(examples, results):
        if not result.passed:
            print(f"  task {example.task_id}: {result.status}: {result.reason}")


if __name__ == "__main__":
    main()
