"""`cora merge`: a run's adapter folded into its base model, loadable by transformers alone."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cora.cli import main
from cora.merge import merge_run
from cora.runs import load_trained_model
from cora.training import train_run
from test_adapters import svd_basis
from test_training import ALPACA_ROWS, run_config, write_jsonl

PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_llama_dir):
    """A finished 3-step frozen-basis run on the tiny Llama."""
    folder = tmp_path_factory.mktemp("merge")
    data = write_jsonl(folder / "alpaca.jsonl", ALPACA_ROWS)
    basis = svd_basis(AutoModelForCausalLM.from_pretrained(tiny_llama_dir)).save(folder / "basis.safetensors")
    run_dir = folder / "run"
    train_run(run_config(tiny_llama_dir, data, str(basis), max_steps=3), run_dir)
    return run_dir


def adapter_logits(run_dir) -> torch.Tensor:
    model, tokenizer, _ = load_trained_model(run_dir)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def merged_logits(merged_dir) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(merged_dir)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merged_model_matches_adapter_logits(trained_run, tmp_path):
    merged_dir = merge_run(trained_run, tmp_path / "merged")
    expected = adapter_logits(trained_run)
    logits = merged_logits(merged_dir)
    assert torch.allclose(logits, expected, atol=1e-5, rtol=0)


def test_merged_model_differs_from_base(trained_run, tiny_llama_dir, tmp_path):
    merged_dir = merge_run(trained_run, tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    name = "model.layers.0.self_attn.q_proj.weight"
    difference = (merged.state_dict()[name] - base.state_dict()[name]).abs().max()
    assert difference > 1e-6


def test_merged_folder_has_no_adapter_weights(trained_run, tmp_path):
    merged_dir = merge_run(trained_run, tmp_path / "merged")
    assert (merged_dir / "config.json").is_file()
    assert (merged_dir / "tokenizer.json").is_file()
    assert not (merged_dir / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora_" in name for name in model.state_dict())


def test_merge_rejects_existing_output(trained_run, tmp_path):
    (tmp_path / "merged").mkdir()
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        merge_run(trained_run, tmp_path / "merged")


def test_merge_rejects_folder_without_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="a run folder written by `cora train`"):
        merge_run(tmp_path, tmp_path / "merged")


def test_cli_merge_writes_bfloat16_model(trained_run, tmp_path, capsys):
    code = main(["merge", str(trained_run), "-o", str(tmp_path / "merged"), "--dtype", "bfloat16"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["merged_model"] == str(tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_cli_merge_overwrite_replaces_output(trained_run, tmp_path):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "stale.txt").write_text("old")
    assert main(["merge", str(trained_run), "-o", str(tmp_path / "merged"), "--overwrite"]) == 0
    assert not (tmp_path / "merged" / "stale.txt").exists()
