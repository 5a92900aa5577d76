"""Claims of a grid: is method X as good as, or better than, method Y, given the seeds' spread?

A grid file may list claims, each naming a method, a baseline and what is expected::

    claims:
      frozen_matches_lora:
        text: "A frozen common basis matches LoRA with fewer trainable parameters"
        method: frozen
        baseline: lora
        expect: not_worse          # or: better
        metrics: [rougeL, response_nll]   # optional; default: every metric of the eval set

For each (claim, task, eval set, metric), the runs are paired by seed, because
the same seed gives both methods the same data order. The per-seed differences
are signed so that a positive value favours the method. Their mean gets a
two-sided Student-t confidence interval. A seed-independent run (the base
model, whose records have seed None) is compared with every seed of the other
method. The comparison reads:

* ``better``: the whole interval is above 0;
* ``worse``: the whole interval is below 0;
* ``no clear difference``: the interval contains 0 (or there are fewer than 2 pairs).

A claim's verdict on one eval set combines its metrics:

* ``expect: not_worse`` holds when no metric is ``worse``, and does not hold when
  more metrics are ``worse`` than ``better``; otherwise it is mixed;
* ``expect: better`` holds when at least one metric is ``better`` and none is
  ``worse``. It does not hold when some metric is ``worse`` and none is
  ``better``. It is not shown when every metric is unclear, and mixed otherwise.

With fewer than 2 seed pairs on every metric the verdict is ``too few seeds``,
and with no metric in common ``not measured``.

"No clear difference" is not evidence of equality: with 3 seeds the interval is
wide, so the report shows it next to each verdict.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cora.likelihood import RESPONSE_LOSS_NAME

EXPECTATIONS = ("not_worse", "better")
LOWER_IS_BETTER = frozenset({RESPONSE_LOSS_NAME})  # every other metric: higher is better

BETTER, WORSE, UNCLEAR = "better", "worse", "no clear difference"


@dataclass(frozen=True)
class ClaimSpec:
    """One claim of a grid, validated at construction."""

    name: str
    method: str
    baseline: str
    text: str = ""  # the claim in words, as the report prints it
    expect: str = "not_worse"  # not_worse | better
    metrics: tuple[str, ...] = ()  # () = every metric of the eval set
    confidence: float = 0.95  # two-sided confidence level of the interval

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", tuple(self.metrics))
        if self.expect not in EXPECTATIONS:
            raise ValueError(f"claim {self.name!r}: invalid expect {self.expect!r}; expected one of {EXPECTATIONS}")
        if self.method == self.baseline:
            raise ValueError(f"claim {self.name!r} compares method {self.method!r} with itself; pick another baseline")
        if not 0 < self.confidence < 1:
            raise ValueError(f"claim {self.name!r}: invalid confidence {self.confidence}; expected a value in (0, 1)")


@dataclass
class Comparison:
    """One metric of one claim on one eval set."""

    metric: str
    method_mean: float
    baseline_mean: float
    difference: float  # mean of the per-seed differences, positive = the method is better
    half_width: float  # half width of the confidence interval of ``difference``; nan below 2 pairs
    pairs: int
    outcome: str  # better | worse | no clear difference


@dataclass
class ClaimResult:
    """A claim's comparisons and verdict on one (task, eval set)."""

    claim: ClaimSpec
    task: str
    eval_set: str
    comparisons: list[Comparison] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        outcomes = [comparison.outcome for comparison in self.comparisons]
        better, worse = outcomes.count(BETTER), outcomes.count(WORSE)
        if not outcomes:
            return "not measured"
        if all(comparison.pairs < 2 for comparison in self.comparisons):
            return "too few seeds"  # no interval, so "no clear difference" would make not_worse hold by default
        if self.claim.expect == "not_worse":
            if worse == 0:
                return "holds"
            return "does not hold" if worse > better else "mixed"
        if better == 0:
            return "does not hold" if worse else "not shown"
        return "holds" if worse == 0 else "mixed"


def _t_quantile(confidence: float, degrees: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2, degrees))


def _broadcast(values: dict[int | None, float], seeds: dict[int | None, float]) -> dict[int | None, float]:
    """Give a seed-independent result (seed None) to every seed of the other side."""
    if set(values) == {None}:
        return {seed: values[None] for seed in seeds}
    return values


def compare_metric(
    method_values: dict[int | None, float],
    baseline_values: dict[int | None, float],
    metric: str,
    confidence: float = 0.95,
) -> Comparison | None:
    """Compare one metric, values keyed by seed (None: seed-independent); None when no pair can be formed."""
    method_values, baseline_values = _broadcast(method_values, baseline_values), _broadcast(baseline_values, method_values)
    seeds = sorted(set(method_values) & set(baseline_values), key=lambda seed: -1 if seed is None else seed)
    if not seeds:
        return None
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    differences = np.array([sign * (method_values[s] - baseline_values[s]) for s in seeds], dtype=float)
    mean = float(differences.mean())
    if len(seeds) < 2:
        half_width, outcome = math.nan, UNCLEAR
    else:
        half_width = _t_quantile(confidence, len(seeds) - 1) * float(differences.std(ddof=1)) / math.sqrt(len(seeds))
        if mean - half_width > 0:
            outcome = BETTER
        elif mean + half_width < 0:
            outcome = WORSE
        else:
            outcome = UNCLEAR
    return Comparison(
        metric=metric,
        method_mean=float(np.mean([method_values[s] for s in seeds])),
        baseline_mean=float(np.mean([baseline_values[s] for s in seeds])),
        difference=mean,
        half_width=half_width,
        pairs=len(seeds),
        outcome=outcome,
    )


def evaluate_claims(records: list[dict[str, Any]], claims: list[ClaimSpec]) -> list[ClaimResult]:
    """Evaluate every claim on every (task, eval set) where both of its methods have results.

    Args:
        records: flat per-evaluation records, as :func:`cora.compare.collect_records` returns them.
    """
    values: dict[tuple[str, str, str], dict[str, dict[int | None, float]]] = defaultdict(lambda: defaultdict(dict))
    for record in records:
        for metric, value in record["metrics"].items():
            values[(record["task"], record["eval_set"], record["method"])][metric][record["seed"]] = float(value)
    eval_sets = list(dict.fromkeys((record["task"], record["eval_set"]) for record in records))

    results = []
    for claim in claims:
        for task, eval_set in eval_sets:
            method, baseline = values.get((task, eval_set, claim.method)), values.get((task, eval_set, claim.baseline))
            if not method or not baseline:
                continue
            result = ClaimResult(claim, task, eval_set)
            for metric in claim.metrics or list(method):
                if metric not in method or metric not in baseline:
                    continue
                comparison = compare_metric(method[metric], baseline[metric], metric, claim.confidence)
                if comparison is not None:
                    result.comparisons.append(comparison)
            results.append(result)
    return results


def _number(value: float, metric: str) -> str:
    digits = 2 if metric == "sacrebleu" else 4
    return "–" if math.isnan(value) else f"{value:.{digits}f}"


def claims_markdown(results: list[ClaimResult]) -> str:
    """Render the verdicts, then one table per claim and eval set with every compared metric."""
    if not results:
        return ""
    confidence = results[0].claim.confidence
    lines = [
        "# Claims\n",
        f"Differences are method minus baseline, signed so that a positive value favours the method "
        f"(for response_nll, lower is better). Intervals: {confidence:.0%} Student-t over seed pairs.\n",
        "| claim | task / eval set | method vs baseline | verdict | better / worse / unclear metrics |",
        "|---|---|---|---|---|",
    ]
    for result in results:
        outcomes = [comparison.outcome for comparison in result.comparisons]
        counts = f"{outcomes.count(BETTER)} / {outcomes.count(WORSE)} / {outcomes.count(UNCLEAR)}"
        lines.append(
            f"| {result.claim.name} | {result.task} / {result.eval_set} | {result.claim.method} vs "
            f"{result.claim.baseline} | {result.verdict} | {counts} |"
        )
    lines.append("")
    for result in results:
        lines.append(f"## {result.claim.name}: {result.task} / {result.eval_set}\n")
        if result.claim.text:
            lines.append(f"{result.claim.text} (expected: {result.claim.expect.replace('_', ' ')}).\n")
        lines.append(f"| metric | {result.claim.method} | {result.claim.baseline} | difference | seeds | outcome |")
        lines.append("|---|---:|---:|---:|---:|---|")
        for c in result.comparisons:
            interval = "" if math.isnan(c.half_width) else f" ± {_number(c.half_width, c.metric)}"
            lines.append(
                f"| {c.metric} | {_number(c.method_mean, c.metric)} | {_number(c.baseline_mean, c.metric)} | "
                f"{'+' if c.difference >= 0 else '-'}{_number(abs(c.difference), c.metric)}{interval} | "
                f"{c.pairs} | {c.outcome} |"
            )
        lines.append("")
    return "\n".join(lines)


def claims_json(results: list[ClaimResult]) -> list[dict[str, Any]]:
    """Return the results as JSON-ready dicts, one per claim and eval set."""
    return [
        {
            "claim": result.claim.name,
            "text": result.claim.text,
            "method": result.claim.method,
            "baseline": result.claim.baseline,
            "expect": result.claim.expect,
            "task": result.task,
            "eval_set": result.eval_set,
            "verdict": result.verdict,
            "comparisons": [
                {
                    "metric": c.metric,
                    "method_mean": c.method_mean,
                    "baseline_mean": c.baseline_mean,
                    "difference": c.difference,
                    "half_width": None if math.isnan(c.half_width) else c.half_width,
                    "pairs": c.pairs,
                    "outcome": c.outcome,
                }
                for c in result.comparisons
            ],
        }
        for result in results
    ]
