"""Run configs: YAML files, overrides, validation, and the `cora train` command."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from cora.cli import main
from cora.runs import RunConfig, apply_overrides, load_config, load_run_config, save_run_config
from test_training import ALPACA_ROWS, write_jsonl

CONFIG_TEXT = """
model: HuggingFaceTB/SmolLM2-135M-Instruct@main
basis: basis.safetensors
template: alpaca
adapter:
  mode: trainable
  r: 8
  target_modules: [q_proj, v_proj]
data:
  path: alpaca.json
  eval_size: 50
training:
  max_steps: 200
  lr: 1e-4
  gradient_checkpointing: yes
evaluation:
  max_new_tokens: 128
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(CONFIG_TEXT)
    return path


def test_yaml_config_loads_every_section(config_file):
    config = load_config(config_file)
    assert config.model == "HuggingFaceTB/SmolLM2-135M-Instruct@main"
    assert config.adapter.mode == "trainable"
    assert config.adapter.target_modules == ("q_proj", "v_proj")
    assert config.data.eval_size == 50
    assert config.training.lr == 1e-4  # YAML 1.1 reads "1e-4" as a string; the field type converts it
    assert config.training.gradient_checkpointing is True
    assert config.evaluation.max_new_tokens == 128


def test_override_replaces_nested_field(config_file):
    config = load_config(config_file, ["training.lr=3e-4", "adapter.mode=frozen", "evaluation.eval_size=null"])
    assert config.training.lr == 3e-4
    assert config.adapter.mode == "frozen"
    assert config.evaluation.eval_size is None


def test_override_without_equals_rejected():
    with pytest.raises(ValueError, match="invalid override 'training.lr'; expected KEY=VALUE"):
        apply_overrides({}, ["training.lr"])


def test_override_unknown_section_rejected():
    with pytest.raises(ValueError, match="invalid override key 'optim.lr'"):
        apply_overrides({}, ["optim.lr=1"])


def test_unknown_field_named_in_error(config_file):
    with pytest.raises(ValueError, match=r"unknown run config field training.learning_rate; expected one of \["):
        load_config(config_file, ["training.learning_rate=1e-4"])


def test_invalid_mode_names_field_and_values(config_file):
    with pytest.raises(ValueError, match=r"adapter: invalid mode 'half'; expected one of \('lora', 'frozen'"):
        load_config(config_file, ["adapter.mode=half"])


def test_invalid_scheduler_names_values(config_file):
    with pytest.raises(ValueError, match="invalid training.lr_scheduler 'step'; expected one of"):
        load_config(config_file, ["training.lr_scheduler=step"])


def test_wrong_type_names_field(config_file):
    with pytest.raises(ValueError, match="invalid training.batch_size 'many'; expected a value of type int"):
        load_config(config_file, ["training.batch_size=many"])


def test_missing_data_path_rejected():
    with pytest.raises(ValueError, match="missing run config field data"):
        RunConfig.from_dict({"model": "smollm2"})


def test_frozen_mode_without_basis_rejected():
    with pytest.raises(ValueError, match="needs a basis file"):
        RunConfig.from_dict({"data": {"path": "x.json"}, "adapter": {"mode": "frozen"}})


def test_saved_config_round_trips(config_file, tmp_path):
    config = load_config(config_file)
    save_run_config(config, tmp_path / "run")
    assert load_run_config(tmp_path / "run") == config


def test_saved_config_is_plain_yaml(config_file, tmp_path):
    save_run_config(load_config(config_file), tmp_path)
    raw = yaml.safe_load((tmp_path / "run_config.yaml").read_text())
    assert raw["adapter"]["target_modules"] == ["q_proj", "v_proj"]


def test_cli_train_writes_run_folder(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    run_dir = tmp_path / "run"
    code = main([
        "train", "--model", str(tiny_llama_dir), "--data", data, "--mode", "lora", "--rank", "2",
        "--steps", "2", "--batch-size", "2", "--max-length", "96", "--set", "training.logging_steps=1",
        "-o", str(run_dir),
    ])
    assert code == 0
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["steps"] == 2
    saved = load_run_config(run_dir)
    assert saved.adapter.r == 2
    assert saved.training.logging_steps == 1


def test_cli_set_overrides_config_file(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_llama_dir), "data": {"path": data}, "adapter": {"mode": "lora", "r": 2},
        "training": {"max_steps": 5, "batch_size": 2, "max_length": 96},
    }))
    code = main(["train", "--config", str(config), "--steps", "3", "--set", "training.max_steps=1", "-o", str(tmp_path / "run")])
    assert code == 0
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["steps"] == 1


def test_cli_reports_invalid_field(tmp_path, capsys):
    code = main(["train", "--data", "x.json", "--mode", "lora", "--set", "training.lr=-1", "-o", str(tmp_path / "run")])
    assert code == 2
    assert "invalid training.lr -1" in capsys.readouterr().err


def test_cli_resume_continues_run(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    run_dir = tmp_path / "run"
    common = ["--model", str(tiny_llama_dir), "--data", data, "--mode", "lora", "--rank", "2", "--batch-size", "2",
              "--max-length", "96", "--save-steps", "1"]
    assert main(["train", *common, "--steps", "2", "-o", str(run_dir)]) == 0
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-2")  # as if the run stopped after step 1
    assert main(["train", "--resume", "-o", str(run_dir)]) == 0
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["steps"] == 2


def test_cli_resume_of_finished_run_rejected(tiny_llama_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    run_dir = tmp_path / "run"
    common = ["--model", str(tiny_llama_dir), "--data", data, "--mode", "lora", "--rank", "2", "--batch-size", "2",
              "--max-length", "96", "--save-steps", "1"]
    assert main(["train", *common, "--steps", "1", "-o", str(run_dir)]) == 0
    assert main(["train", "--resume", "-o", str(run_dir)]) == 2
    assert "already finished at step 1 of 1" in capsys.readouterr().err


def test_cli_resume_rejects_other_flags(tmp_path, capsys):
    assert main(["train", "--resume", "--steps", "5", "-o", str(tmp_path)]) == 2
    assert "--resume reads the run folder's run_config.yaml" in capsys.readouterr().err


def test_cli_retry_after_missing_data_needs_no_overwrite(tiny_llama_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    run_dir = tmp_path / "run"
    common = ["--model", str(tiny_llama_dir), "--mode", "lora", "--rank", "2", "--steps", "1", "--batch-size", "2",
              "--max-length", "96", "-o", str(run_dir)]
    assert main(["train", *common, "--data", str(tmp_path / "absent.jsonl")]) == 2
    assert "data file not found" in capsys.readouterr().err
    assert main(["train", *common, "--data", data]) == 0


def test_cli_run_config_paths_work_from_other_folder(tiny_llama_dir, tmp_path, monkeypatch):
    write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model", str(tiny_llama_dir), "--data", "alpaca.jsonl", "--mode", "lora", "--rank", "2",
                 "--steps", "1", "--batch-size", "2", "--max-length", "96", "-o", "run"]) == 0
    monkeypatch.chdir("/")
    assert load_run_config(tmp_path / "run").data.path == str(tmp_path / "alpaca.jsonl")
