"""Result tables and plots from grid records."""

from __future__ import annotations

import csv
import json
import math

import pytest

from cora.report import aggregate, markdown_table, mean_curve, mean_std, write_report


def record(method: str, seed: int | None, rouge1: float, loss: float | None = 1.0, eval_set: str = "held_out") -> dict:
    return {
        "task": "alpaca",
        "method": method,
        "seed": seed,
        "eval_set": eval_set,
        "num_examples": 4,
        "trainable_parameters": 0 if seed is None else 100,
        "train_seconds": 0.0 if seed is None else 10.0,
        "steps": 2,
        "final_loss": loss,
        "eval_seconds": 1.0,
        "metrics": {"rouge1": rouge1, "sacrebleu": 10 * rouge1},
    }


RECORDS = [
    record("lora", 0, 0.2),
    record("lora", 1, 0.4),
    record("frozen", 0, 0.3),
    record("frozen", 1, 0.3),
    record("base_model", None, 0.1, loss=None),
]


def test_mean_std_uses_sample_std():
    mean, std = mean_std([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert std == pytest.approx(1.0)


def test_mean_std_single_value_has_no_std():
    assert math.isnan(mean_std([5.0])[1])


def test_aggregate_averages_seeds():
    rows = {row.method: row for row in aggregate(RECORDS)}
    assert rows["lora"].metrics["rouge1"][0] == pytest.approx(0.3)
    assert rows["lora"].metrics["rouge1"][1] == pytest.approx(math.sqrt(0.02))
    assert rows["lora"].seeds == 2


def test_aggregate_follows_method_order():
    methods = [row.method for row in aggregate(RECORDS, ["base_model", "frozen", "lora"])]
    assert methods == ["base_model", "frozen", "lora"]


def test_aggregate_base_model_has_no_loss():
    rows = {row.method: row for row in aggregate(RECORDS)}
    assert math.isnan(rows["base_model"].final_loss[0])


def test_markdown_shows_mean_and_std():
    table = markdown_table(aggregate(RECORDS), "t")
    lora_line = next(line for line in table.splitlines() if line.startswith("| lora"))
    assert "0.3000 ± 0.1414" in lora_line


def test_markdown_single_seed_shows_mean_only():
    table = markdown_table(aggregate(RECORDS), "t")
    base_line = next(line for line in table.splitlines() if line.startswith("| base_model"))
    assert "0.1000 |" in base_line
    assert "±" not in base_line


def test_markdown_one_section_per_eval_set():
    records = RECORDS + [record("lora", 0, 0.5, eval_set="self_instruct")]
    table = markdown_table(aggregate(records))
    assert "## alpaca / held_out (4 examples)" in table
    assert "## alpaca / self_instruct (4 examples)" in table


def test_mean_curve_uses_common_steps():
    steps, means, stds = mean_curve([[(1, 2.0), (2, 1.0)], [(1, 4.0), (2, 3.0), (3, 2.0)]])
    assert steps == [1, 2]
    assert means == [3.0, 2.0]


def test_write_report_writes_every_file(tmp_path):
    curves = {("alpaca", "lora"): [[(1, 2.0), (2, 1.5)], [(1, 2.2), (2, 1.4)]]}
    paths = write_report(RECORDS, curves, tmp_path, ["base_model", "lora", "frozen"], title="test")
    names = sorted(path.name for path in paths)
    assert names == sorted(
        ["results.md", "results.csv", "results.json", "metrics_alpaca_held_out.png", "loss_alpaca.png"]
    )


def test_csv_has_mean_and_std_columns(tmp_path):
    write_report(RECORDS, {}, tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    lora = next(row for row in rows if row["method"] == "lora")
    assert float(lora["rouge1_mean"]) == pytest.approx(0.3)
    assert float(lora["sacrebleu_std"]) == pytest.approx(10 * math.sqrt(0.02))


def test_json_keeps_raw_records(tmp_path):
    write_report(RECORDS, {}, tmp_path)
    payload = json.loads((tmp_path / "results.json").read_text())
    assert len(payload["records"]) == 5


def test_json_writes_missing_loss_as_null(tmp_path):
    write_report(RECORDS, {}, tmp_path)
    rows = {row["method"]: row for row in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert rows["base_model"]["final_loss_mean"] is None
    assert rows["lora"]["final_loss_std"] == 0.0


def test_write_report_without_records_writes_nothing(tmp_path):
    assert write_report([], {}, tmp_path / "empty") == []
