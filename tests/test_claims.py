"""Claim verdicts from per-seed records: pairing, signs, intervals and the verdict rules."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from cora.claims import ClaimSpec, claims_markdown, compare_metric, evaluate_claims


def records(method: str, metric: str, values: dict[int, float], eval_set: str = "held_out") -> list[dict]:
    return [
        {"task": "alpaca", "eval_set": eval_set, "method": method, "seed": seed, "metrics": {metric: value}}
        for seed, value in values.items()
    ]


def test_interval_is_the_paired_student_t_interval():
    comparison = compare_metric({0: 0.30, 1: 0.34, 2: 0.31}, {0: 0.28, 1: 0.30, 2: 0.30}, "rougeL")
    differences = [0.02, 0.04, 0.01]
    mean = sum(differences) / 3
    std = math.sqrt(sum((d - mean) ** 2 for d in differences) / 2)
    assert comparison.difference == pytest.approx(mean)
    assert comparison.half_width == pytest.approx(stats.t.ppf(0.975, 2) * std / math.sqrt(3))
    assert comparison.pairs == 3
    # Mean 0.0233, half width 0.0379: three seeds cannot separate this gain from zero.
    assert comparison.outcome == "no clear difference"


def test_pairs_follow_seeds_not_order():
    # Same differences seed by seed (+0.1), opposite orders of the raw values: a tight interval.
    comparison = compare_metric({0: 0.5, 1: 0.2, 2: 0.9}, {2: 0.8, 0: 0.4, 1: 0.1}, "rouge1")
    assert comparison.difference == pytest.approx(0.1)
    assert comparison.half_width == pytest.approx(0.0, abs=1e-12)
    assert comparison.outcome == "better"


def test_lower_is_better_for_response_nll():
    comparison = compare_metric({0: 1.9, 1: 1.8, 2: 1.85}, {0: 2.0, 1: 1.95, 2: 1.97}, "response_nll")
    assert comparison.difference > 0
    assert comparison.outcome == "better"


def test_wide_spread_is_no_clear_difference():
    comparison = compare_metric({0: 0.1, 1: 0.5, 2: 0.3}, {0: 0.3, 1: 0.2, 2: 0.3}, "rougeL")
    assert comparison.outcome == "no clear difference"


def test_seed_independent_baseline_pairs_with_every_seed():
    comparison = compare_metric({0: 0.30, 1: 0.31, 2: 0.32}, {None: 0.20}, "rougeL")
    assert comparison.pairs == 3
    assert comparison.baseline_mean == pytest.approx(0.20)
    assert comparison.outcome == "better"


def test_single_seed_verdict_is_too_few_seeds():
    data = records("a", "rouge1", {0: 0.2}) + records("b", "rouge1", {0: 0.5})
    (result,) = evaluate_claims(data, [ClaimSpec("c", "a", "b")])
    assert result.verdict == "too few seeds"


def test_one_pair_has_no_interval():
    comparison = compare_metric({0: 0.4}, {0: 0.3}, "rougeL")
    assert math.isnan(comparison.half_width)
    assert comparison.outcome == "no clear difference"


def test_not_worse_verdicts():
    data = (
        records("frozen", "rougeL", {0: 0.30, 1: 0.31, 2: 0.32})
        + records("lora", "rougeL", {0: 0.40, 1: 0.41, 2: 0.42})
        + records("trainable", "rougeL", {0: 0.30, 1: 0.45, 2: 0.37})
    )
    claims = [ClaimSpec("frozen", "frozen", "lora"), ClaimSpec("trainable", "trainable", "lora")]
    frozen, trainable = evaluate_claims(data, claims)
    assert frozen.verdict == "does not hold"
    assert trainable.verdict == "holds"  # no clear difference is not "worse"


def test_better_verdict_needs_a_better_metric():
    data = records("a", "rouge1", {0: 0.6, 1: 0.61, 2: 0.62}) + records("b", "rouge1", {0: 0.5, 1: 0.5, 2: 0.5})
    data += records("a", "rouge2", {0: 0.2, 1: 0.2, 2: 0.2}) + records("b", "rouge2", {0: 0.3, 1: 0.3, 2: 0.3})
    (only_rouge1,) = evaluate_claims(data, [ClaimSpec("c", "a", "b", expect="better", metrics=("rouge1",))])
    (both,) = evaluate_claims(data, [ClaimSpec("c", "a", "b", expect="better")])
    assert only_rouge1.verdict == "holds"
    assert both.verdict == "mixed"


def test_better_verdict_without_clear_metrics_is_not_shown():
    data = records("a", "rouge1", {0: 0.1, 1: 0.5, 2: 0.3}) + records("b", "rouge1", {0: 0.3, 1: 0.2, 2: 0.3})
    (result,) = evaluate_claims(data, [ClaimSpec("c", "a", "b", expect="better")])
    assert result.verdict == "not shown"


def test_claims_per_eval_set_skip_missing():
    data = records("a", "rouge1", {0: 0.5, 1: 0.6}) + records("b", "rouge1", {0: 0.4, 1: 0.45})
    data += records("a", "rouge1", {0: 0.5, 1: 0.6}, eval_set="other") + records("b", "rouge1", {0: 0.4}, eval_set="other")
    results = evaluate_claims(data, [ClaimSpec("c", "a", "b"), ClaimSpec("missing", "a", "absent")])
    assert [(r.claim.name, r.eval_set) for r in results] == [("c", "held_out"), ("c", "other")]
    assert results[1].comparisons[0].pairs == 1  # only seed 0 in common: a missing seed is not filled in


def test_markdown_lists_each_claim():
    data = records("a", "rouge1", {0: 0.5, 1: 0.6}) + records("b", "rouge1", {0: 0.4, 1: 0.45})
    text = claims_markdown(evaluate_claims(data, [ClaimSpec("c", "a", "b", text="A matches B")]))
    assert "| c | alpaca / held_out | a vs b |" in text
    assert "A matches B (expected: not worse)." in text


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"expect": "equal"}, "invalid expect 'equal'"),
        ({"baseline": "a"}, "compares method 'a' with itself"),
        ({"confidence": 1.5}, "invalid confidence 1.5"),
    ],
)
def test_invalid_claims(fields, message):
    with pytest.raises(ValueError, match=message):
        ClaimSpec(**{"name": "c", "method": "a", "baseline": "b", **fields})
