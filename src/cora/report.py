"""Results of an experiment grid: tables (Markdown, CSV, JSON) and plots (PNG).

Input records are flat dicts, one per (task, method, seed, eval set), as
:func:`cora.compare.collect_records` returns them. Rows aggregate the seeds of
one (task, eval set, method): each metric becomes a mean and a sample standard
deviation (``ddof=1``; undefined, so empty, with a single seed).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cora.claims import LOWER_IS_BETTER
from cora.files import write_atomic

logger = logging.getLogger(__name__)

TABLE_NAMES = ("results.md", "results.csv", "results.json")
# Shown in this order, then any other metric in order of appearance.
METRIC_ORDER = ("rouge1", "rouge2", "rougeL", "meteor", "sacrebleu", "bertscore_f1", "pass@1", "response_nll")


@dataclass
class ResultRow:
    """One method on one eval set of one task, over its seeds."""

    task: str
    eval_set: str
    method: str
    seeds: int  # number of seeds (runs) aggregated
    num_examples: int  # evaluation examples per run
    trainable_parameters: int
    train_seconds: float  # mean over seeds
    eval_seconds: float  # mean over seeds
    final_loss: tuple[float, float]  # (mean, std) of the last logged training loss; nan without training
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (mean, std)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Return the mean and the sample standard deviation (nan for fewer than two values)."""
    array = np.asarray([value for value in values if value is not None], dtype=float)
    if array.size == 0:
        return math.nan, math.nan
    std = float(array.std(ddof=1)) if array.size > 1 else math.nan
    return float(array.mean()), std


def metric_names(records: list[dict[str, Any]]) -> list[str]:
    seen = []
    for record in records:
        for name in record["metrics"]:
            if name not in seen:
                seen.append(name)
    ordered = [name for name in METRIC_ORDER if name in seen]
    return ordered + [name for name in seen if name not in ordered]


def aggregate(records: list[dict[str, Any]], method_order: list[str] | None = None) -> list[ResultRow]:
    """Group records by (task, eval set, method) and average over seeds.

    Rows come in task and eval-set order of first appearance, methods in
    ``method_order`` (then any others).
    """
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[(record["task"], record["eval_set"], record["method"])].append(record)
    names = metric_names(records)

    tasks = list(dict.fromkeys((record["task"], record["eval_set"]) for record in records))
    methods = list(method_order or []) + [m for m in dict.fromkeys(r["method"] for r in records) if m not in (method_order or [])]
    rows = []
    for task, eval_set in tasks:
        for method in methods:
            group = groups.get((task, eval_set, method))
            if not group:
                continue
            rows.append(
                ResultRow(
                    task=task,
                    eval_set=eval_set,
                    method=method,
                    seeds=len(group),
                    num_examples=int(group[0]["num_examples"]),
                    trainable_parameters=int(group[0]["trainable_parameters"]),
                    train_seconds=float(np.mean([r["train_seconds"] for r in group])),
                    eval_seconds=float(np.mean([r["eval_seconds"] for r in group])),
                    final_loss=mean_std([r["final_loss"] for r in group]),
                    metrics={name: mean_std([r["metrics"][name] for r in group if name in r["metrics"]]) for name in names},
                )
            )
    return rows


# --- tables -------------------------------------------------------------------------------------------


def _format(mean: float, std: float, digits: int) -> str:
    if math.isnan(mean):
        return "–"
    if math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _digits(metric: str) -> int:
    return 2 if metric == "sacrebleu" else 4


def markdown_table(rows: list[ResultRow], title: str = "") -> str:
    """Render one Markdown table per (task, eval set), cells as ``mean ± std`` over seeds."""
    lines = [f"# {title}\n"] if title else []
    sections: dict[tuple[str, str], list[ResultRow]] = defaultdict(list)
    for row in rows:
        sections[(row.task, row.eval_set)].append(row)
    for (task, eval_set), section in sections.items():
        names = list(section[0].metrics)
        lines.append(f"## {task} / {eval_set} ({section[0].num_examples} examples)\n")
        header = ["method", "seeds", "trainable params", "train s", "final loss", *names]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        for row in section:
            cells = [
                row.method,
                str(row.seeds),
                f"{row.trainable_parameters:,}",
                f"{row.train_seconds:.0f}",
                _format(*row.final_loss, 3),
                *(_format(*row.metrics.get(name, (math.nan, math.nan)), _digits(name)) for name in names),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _flat(row: ResultRow) -> dict[str, Any]:
    flat: dict[str, Any] = {
        "task": row.task,
        "eval_set": row.eval_set,
        "method": row.method,
        "seeds": row.seeds,
        "num_examples": row.num_examples,
        "trainable_parameters": row.trainable_parameters,
        "train_seconds": round(row.train_seconds, 2),
        "eval_seconds": round(row.eval_seconds, 2),
        "final_loss_mean": row.final_loss[0],
        "final_loss_std": row.final_loss[1],
    }
    for name, (mean, std) in row.metrics.items():
        flat[f"{name}_mean"] = mean
        flat[f"{name}_std"] = std
    return {key: (None if isinstance(value, float) and math.isnan(value) else value) for key, value in flat.items()}


def csv_table(rows: list[ResultRow]) -> str:
    flats = [_flat(row) for row in rows]
    columns = list(dict.fromkeys(key for flat in flats for key in flat))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for flat in flats:
        writer.writerow({key: "" if flat.get(key) is None else flat[key] for key in columns})
    return buffer.getvalue()


def write_tables(rows: list[ResultRow], out_dir: Path, title: str = "", records: list[dict[str, Any]] | None = None) -> list[Path]:
    """Write ``results.md``, ``results.csv`` and ``results.json`` (rows, plus the raw records if given)."""
    paths = [out_dir / name for name in TABLE_NAMES]
    write_atomic(paths[0], markdown_table(rows, title))
    write_atomic(paths[1], csv_table(rows))
    payload = {"rows": [_flat(row) for row in rows], "records": records or []}
    write_atomic(paths[2], json.dumps(payload, indent=2) + "\n")
    return paths


# --- plots --------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(figure: Any, path: Path, dpi: int) -> Path:
    plt = _pyplot()
    temp_path = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(temp_path, dpi=dpi)
    plt.close(figure)
    os.replace(temp_path, path)
    return path


def _file_part(text: str) -> str:
    return "".join(char if char.isalnum() or char in "-_" else "_" for char in text)


def plot_metrics(rows: list[ResultRow], out_dir: Path, dpi: int = 80) -> list[Path]:
    """Draw one PNG per (task, eval set): a bar per method for each metric, error bars = std over seeds."""
    plt = _pyplot()
    sections: dict[tuple[str, str], list[ResultRow]] = defaultdict(list)
    for row in rows:
        sections[(row.task, row.eval_set)].append(row)

    paths = []
    for (task, eval_set), section in sections.items():
        names = list(section[0].metrics)
        columns = min(4, len(names))
        lines = math.ceil(len(names) / columns)
        figure, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 2.6 * lines + 0.6), squeeze=False)
        positions = np.arange(len(section))
        for axis, name in zip(axes.flat, names):
            means = [row.metrics[name][0] for row in section]
            errors = [0.0 if math.isnan(row.metrics[name][1]) else row.metrics[name][1] for row in section]
            if name in LOWER_IS_BETTER:
                # A loss has no meaningful zero, so points on a fitted axis show the differences.
                axis.errorbar(positions, means, yerr=errors, fmt="o", capsize=2, color="tab:blue")
                axis.set_title(f"{name} (lower is better)", fontsize=9)
            else:
                axis.bar(positions, means, yerr=errors, capsize=2, color="tab:blue")
                axis.set_title(name, fontsize=9)
            axis.set_xticks(positions, [row.method for row in section], rotation=60, ha="right", fontsize=7)
            axis.tick_params(axis="y", labelsize=7)
        for axis in list(axes.flat)[len(names):]:
            axis.set_visible(False)
        figure.suptitle(f"{task} / {eval_set}: mean over seeds, bars = std", fontsize=10)
        figure.tight_layout()
        paths.append(_save_figure(figure, out_dir / f"metrics_{_file_part(task)}_{_file_part(eval_set)}.png", dpi))
    return paths


def mean_curve(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float]]:
    """Average loss curves over seeds at the steps all of them logged; return steps, means and stds."""
    common = sorted(set.intersection(*(set(step for step, _ in curve) for curve in curves)))
    by_step = [dict(curve) for curve in curves]
    means, stds = [], []
    for step in common:
        mean, std = mean_std([values[step] for values in by_step])
        means.append(mean)
        stds.append(0.0 if math.isnan(std) else std)
    return common, means, stds


def plot_loss_curves(
    curves: dict[tuple[str, str], list[list[tuple[int, float]]]], out_dir: Path, dpi: int = 80
) -> list[Path]:
    """Draw one PNG per task: training loss against step, one line per method (mean over seeds, band = std)."""
    plt = _pyplot()
    tasks = list(dict.fromkeys(task for task, _ in curves))
    paths = []
    for task in tasks:
        figure, axis = plt.subplots(figsize=(6, 4))
        for (curve_task, method), seeds in curves.items():
            if curve_task != task:
                continue
            steps, means, stds = mean_curve(seeds)
            if not steps:
                continue
            axis.plot(steps, means, label=method)
            axis.fill_between(steps, np.subtract(means, stds), np.add(means, stds), alpha=0.2)
        axis.set_xlabel("optimiser step")
        axis.set_ylabel("training loss (nats per response token)")
        axis.set_title(f"{task}: training loss, mean over seeds")
        axis.legend(fontsize=7)
        figure.tight_layout()
        paths.append(_save_figure(figure, out_dir / f"loss_{_file_part(task)}.png", dpi))
    return paths


def write_claims(records: list[dict[str, Any]], claims: list[Any], out_dir: Path) -> list[Path]:
    """Evaluate the grid's claims on the records; write ``claims.md`` and ``claims.json``."""
    from cora.claims import claims_json, claims_markdown, evaluate_claims

    results = evaluate_claims(records, claims)
    if not results:
        logger.warning("no claim has results for both of its methods yet; claims.md not written")
        return []
    md_path, json_path = out_dir / "claims.md", out_dir / "claims.json"
    write_atomic(md_path, claims_markdown(results))
    write_atomic(json_path, json.dumps(claims_json(results), indent=2) + "\n")
    return [md_path, json_path]


def write_report(
    records: list[dict[str, Any]],
    curves: dict[tuple[str, str], list[list[tuple[int, float]]]],
    out_dir: str | os.PathLike,
    method_order: list[str] | None = None,
    title: str = "",
    claims: list[Any] | None = None,
) -> list[Path]:
    """Write the tables and plots of a grid into ``out_dir``; return the written paths.

    Args:
        claims: :class:`cora.claims.ClaimSpec` list; when given, also write ``claims.md`` and ``claims.json``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not records:
        logger.warning("no finished evaluations to report in %s", out_dir)
        return []
    rows = aggregate(records, method_order)
    paths = write_tables(rows, out_dir, title, records)
    paths += plot_metrics(rows, out_dir)
    paths += plot_loss_curves(curves, out_dir)
    if claims:
        paths += write_claims(records, claims, out_dir)
    logger.info("wrote %d report files to %s", len(paths), out_dir)
    return paths
