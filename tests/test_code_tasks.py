"""Code tasks: MBPP/HumanEval loading, test programs and pass@k."""

from __future__ import annotations

import json
import math
from itertools import combinations

import pytest

from cora.code_tasks import (
    build_program,
    check_completions,
    load_humaneval,
    load_mbpp,
    mean_pass_at_k,
    pass_at_k,
    reference_program,
)
from cora.execution import ExecutionConfig, run_programs

FAST = ExecutionConfig(timeout_s=5.0)

# Rows in MBPP's layout, written for these tests: ids chosen to fall in each standard split.
MBPP_ROWS = [
    {"task_id": 3, "text": "Write a function to double a number.", "code": "def double(x):\n    return 2 * x",
     "test_list": ["assert double(2) == 4", "assert double(0) == 0"], "test_setup_code": ""},
    {"task_id": 42, "text": "Write a function to reverse a string.", "code": "def rev(s):\n    return s[::-1]",
     "test_list": ["assert rev('ab') == 'ba'"], "test_setup_code": ""},
    {"task_id": 512, "text": "Write a function to square a number.", "code": "def sq(x):\n    return x * x",
     "test_list": ["assert sq(3) == 9"], "test_setup_code": ""},
    {"task_id": 700, "text": "Write a function that returns pi rounded.", "code": "def pi2():\n    return round(math.pi, 2)",
     "test_list": ["assert pi2() == 3.14"], "test_setup_code": "import math"},
]  # fmt: skip


@pytest.fixture()
def mbpp_dir(tmp_path):
    with open(tmp_path / "mbpp.jsonl", "w") as stream:
        for row in MBPP_ROWS:
            stream.write(json.dumps(row) + "\n")
    sanitized = [
        {"task_id": row["task_id"], "prompt": row["text"], "code": row["code"], "test_list": row["test_list"],
         "test_imports": [row["test_setup_code"]] if row["test_setup_code"] else []}
        for row in MBPP_ROWS
    ]  # fmt: skip
    (tmp_path / "sanitized-mbpp.json").write_text(json.dumps(sanitized))
    return tmp_path


@pytest.mark.parametrize(("split", "ids"), [("prompt", ["3"]), ("test", ["42"]), ("validation", ["512"]), ("train", ["700"])])
def test_mbpp_standard_splits(mbpp_dir, split, ids):
    assert [example.task_id for example in load_mbpp(mbpp_dir, split=split)] == ids


def test_mbpp_sanitized_reads_test_imports(mbpp_dir):
    examples = load_mbpp(mbpp_dir, variant="sanitized", split="train")
    assert examples[0].extra["test_setup_code"] == "import math"


def test_mbpp_reference_solutions_pass(mbpp_dir):
    for variant in ("full", "sanitized"):
        examples = load_mbpp(mbpp_dir, variant=variant, split="all")
        results = run_programs([reference_program(example) for example in examples], FAST, progress=False)
        assert all(result.passed for result in results), variant


def test_mbpp_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="mbpp.jsonl not found"):
        load_mbpp(tmp_path)


def test_mbpp_rejects_unknown_split(mbpp_dir):
    with pytest.raises(ValueError, match="invalid MBPP split 'dev'"):
        load_mbpp(mbpp_dir, split="dev")


def test_wrong_completion_fails_mbpp_tests(mbpp_dir):
    example = load_mbpp(mbpp_dir, split="test")[0]
    results = check_completions([example], [["def rev(s):\n    return s", "def rev(s):\n    return s[::-1]"]], "code", FAST)
    assert [result.passed for result in results[0]] == [False, True]


def test_humaneval_has_164_problems():
    examples = load_humaneval()
    assert len(examples) == 164
    assert examples[0].extra["entry_point"] == "has_close_elements"


def test_humaneval_canonical_solutions_all_pass():
    examples = load_humaneval()
    results = run_programs([reference_program(example) for example in examples], FAST, workers=2, progress=False)
    failing = [example.task_id for example, result in zip(examples, results) if not result.passed]
    assert failing == []


def test_humaneval_completion_template_prepends_prompt():
    example = load_humaneval()[0]
    program = build_program(example, example.response, template="completion")
    assert program.startswith(example.instruction + example.response)
    assert program.rstrip().endswith("check(has_close_elements)")


def test_build_program_rejects_example_without_tests():
    from cora.data import Example

    with pytest.raises(ValueError, match="has no tests"):
        build_program(Example("Say hi.", "hi", task_id="7"), "print('hi')")


def test_pass_at_k_matches_combinatorial_definition():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 0, 4), (5, 5, 2), (7, 2, 6)]:
        expected = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(expected), (n, c, k)


def test_pass_at_k_matches_enumeration():
    outcomes = [True, False, False, True, False, False]
    draws = list(combinations(outcomes, 3))
    expected = sum(any(draw) for draw in draws) / len(draws)
    assert pass_at_k(6, 2, 3) == pytest.approx(expected)


def test_pass_at_1_is_fraction_passing():
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)


def test_pass_at_k_stable_for_large_n():
    value = pass_at_k(2000, 1, 100)
    assert value == pytest.approx(100 / 2000)


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError, match="invalid k 5"):
        pass_at_k(3, 1, 5)


def test_mean_pass_at_k_averages_problems(mbpp_dir):
    example = load_mbpp(mbpp_dir, split="test")[0]
    completions = [["def rev(s):\n    return s[::-1]"] * 2, ["def rev(s):\n    return s"] * 2]
    results = check_completions([example, example], completions, "code", FAST)
    assert mean_pass_at_k(results, 1) == pytest.approx(0.5)
