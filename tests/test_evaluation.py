"""Evaluation of a real trained run (tiny Llama, PEFT LoRA): example selection, scores, files, CLI."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from cora.cli import main
from cora.data import DataConfig, Example, load_examples, split_examples
from cora.evaluation import EvaluationConfig, data_name, evaluate_model, select_examples
from cora.execution import ExecutionConfig
from cora.generation import GenerationConfig
from cora.metrics import MetricsConfig
from cora.training import train_run
from test_training import ALPACA_ROWS, MBPP_ROWS, run_config, write_jsonl

QUICK = EvaluationConfig(generation=GenerationConfig(max_new_tokens=8), metrics=MetricsConfig(metrics=("rouge1", "sacrebleu")))


@pytest.fixture(scope="module")
def alpaca_run(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("alpaca-run")
    data = write_jsonl(root / "alpaca.jsonl", ALPACA_ROWS)
    train_run(run_config(tiny_llama_dir, data, mode="lora", max_steps=2), root / "run")
    return root / "run", data


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_training_file_gives_held_out_split(tmp_path):
    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    config = DataConfig(path=data, eval_size=2)
    _, held_out = split_examples(load_examples(data), config)
    examples, description = select_examples(data, config)
    assert examples == held_out
    assert description.startswith("held-out split")


def test_relative_training_path_gives_held_out_split(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    monkeypatch.chdir(tmp_path)
    examples, _ = select_examples("alpaca.jsonl", DataConfig(path=data, eval_size=2))
    assert len(examples) == 2


def test_no_data_gives_run_held_out_split(tmp_path):
    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    examples, _ = select_examples(None, DataConfig(path=data, eval_size=3))
    assert len(examples) == 3


def test_other_file_gives_all_rows(tmp_path):
    training = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    other = write_jsonl(tmp_path / "mbpp.jsonl", MBPP_ROWS)
    examples, description = select_examples(other, DataConfig(path=training, eval_size=2))
    assert [example.task_id for example in examples] == ["1", "2", "3", "4", "5"]
    assert description.startswith("all rows")


def test_max_examples_keeps_first(tmp_path):
    data = write_jsonl(tmp_path / "mbpp.jsonl", MBPP_ROWS)
    examples, _ = select_examples(data, None, max_examples=2)
    assert [example.task_id for example in examples] == ["1", "2"]


def test_data_name_strips_suffixes():
    assert data_name("/data/HumanEval.jsonl.gz") == "HumanEval"
    assert data_name("yahma/alpaca-cleaned") == "yahma__alpaca-cleaned"


def test_evaluate_model_scores_every_example(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    examples = [Example("What is the capital of France?", "Paris."), Example("Say hello.", "Hello.")]
    result = evaluate_model(model, tokenizer, examples, "alpaca", QUICK)
    assert result.num_examples == 2
    assert set(result.metrics) == {"rouge1", "sacrebleu", "response_nll"}
    assert [record.reference for record in result.records] == ["Paris.", "Hello."]


def test_invalid_loss_max_length_rejected():
    with pytest.raises(ValueError, match="invalid loss_max_length 1; expected at least 2 tokens"):
        EvaluationConfig(loss_max_length=1)


def test_evaluate_model_rejects_execute_without_tests(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    config = EvaluationConfig(generation=GenerationConfig(max_new_tokens=4), execute=True)
    with pytest.raises(ValueError, match="have no tests"):
        evaluate_model(model, tokenizer, [Example("Say hello.", "Hello.", task_id="a")], "alpaca", config)


def test_execute_adds_pass_at_1(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    examples = load_examples(write_jsonl(tmp_path / "mbpp.jsonl", MBPP_ROWS))[:2]
    config = EvaluationConfig(
        generation=GenerationConfig(max_new_tokens=8), metrics=None, execute=True, execution=ExecutionConfig(timeout_s=5)
    )
    result = evaluate_model(model, tokenizer, examples, "code", config)
    assert result.metrics["pass@1"] == 0.0  # a random tiny model writes no working code
    assert set(result.metrics) == {"pass@1", "response_nll"}
    assert all(record.status and record.status[0] != "passed" for record in result.records)


def test_write_produces_both_files(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    result = evaluate_model(model, tokenizer, [Example("Say hello.", "Hello.", task_id="h")], "alpaca", QUICK)
    predictions_path, metrics_path = result.write(tmp_path / "out", {"model": "tiny"})
    row = json.loads(predictions_path.read_text())
    summary = json.loads(metrics_path.read_text())
    assert set(row) == {"task_id", "prompt", "prediction", "reference"}
    assert summary["num_examples"] == 1
    assert summary["model"] == "tiny"
    assert [path.name for path in (tmp_path / "out").iterdir() if path.name.startswith(".")] == []


def test_cli_evaluates_trained_run(alpaca_run, capsys):
    run_dir, _ = alpaca_run
    code = main(
        ["evaluate", str(run_dir), "--max-new-tokens", "8", "--metrics", "rouge1", "rougeL", "--no-response-loss"]
    )
    assert code == 0
    out_dir = run_dir / "eval" / "alpaca"
    summary = json.loads((out_dir / "metrics.json").read_text())
    assert set(summary["metrics"]) == {"rouge1", "rougeL"}
    assert summary["num_examples"] == 2
    assert summary["adapter"] is True
    assert len((out_dir / "predictions.jsonl").read_text().splitlines()) == 2
    assert "rouge1" in capsys.readouterr().out


def test_cli_base_model_on_run_examples(alpaca_run, tiny_llama_dir):
    run_dir, _ = alpaca_run
    code = main(["evaluate", str(run_dir), "--base-model", str(tiny_llama_dir), "--max-new-tokens", "4", "--metrics", "rouge1"])
    assert code == 0
    summary = json.loads((run_dir / "eval" / "alpaca" / "base" / "metrics.json").read_text())
    assert summary["adapter"] is False
    assert summary["num_examples"] == 2


def test_cli_base_model_needs_output(tiny_llama_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "mbpp.jsonl", MBPP_ROWS)
    assert main(["evaluate", "--base-model", str(tiny_llama_dir), "--data", data]) == 2
    assert "needs an output folder (-o)" in capsys.readouterr().err


def test_cli_without_model_reports_error(capsys):
    assert main(["evaluate"]) == 2
    assert "pass a run folder" in capsys.readouterr().err
