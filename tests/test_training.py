"""Training runs with the Hugging Face Trainer on a tiny Llama: outputs, freezing, resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cora.adapters import AdapterConfig
from cora.basis import Basis
from cora.data import DataConfig, Example
from cora.runs import EvaluationConfig, RunConfig, TrainingConfig, load_run_config, load_trained_model, save_run_config
from cora.training import IGNORE_INDEX, train_run, tokenize_example
from test_adapters import svd_basis

ALPACA_ROWS = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "Eat a balanced diet, exercise regularly and sleep well."},
    {"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."},
    {"instruction": "Write a function that adds two numbers.", "input": "",
     "output": "def add(a, b):\n    return a + b\n"},
    {"instruction": "Rewrite the sentence in the passive voice.", "input": "The fox jumps over the dog.",
     "output": "The dog is jumped over by the fox."},
    {"instruction": "Name a prime number between 10 and 20.", "input": "", "output": "13 is a prime number."},
    {"instruction": "Summarise the proverb.", "input": "A journey of a thousand miles begins with a single step.",
     "output": "Big goals are reached one small step at a time."},
    {"instruction": "Print the squares of the numbers below 10.", "input": "",
     "output": "for i in range(10):\n    print(i * i)\n"},
    {"instruction": "Create an empty stack class in Python.", "input": "",
     "output": "class Stack:\n    def __init__(self):\n        self.items = []\n"},
]

MBPP_ROWS = [
    {"task_id": 1, "text": "Write a function to add two numbers.", "code": "def add(a, b):\n    return a + b",
     "test_list": ["assert add(1, 2) == 3"]},
    {"task_id": 2, "text": "Write a function to check whether a number is prime.",
     "code": "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))",
     "test_list": ["assert is_prime(7)"]},
    {"task_id": 3, "text": "Write a function to compute the nth Fibonacci number.",
     "code": "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
     "test_list": ["assert fibonacci(10) == 55"]},
    {"task_id": 4, "text": "Write a function to square a number.", "code": "def square(x):\n    return x * x",
     "test_list": ["assert square(3) == 9"]},
    {"task_id": 5, "text": "Write a function to return the larger of two numbers.",
     "code": "def larger(a, b):\n    return a if a > b else b", "test_list": ["assert larger(2, 5) == 5"]},
]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture
def alpaca_file(tmp_path):
    return write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)


@pytest.fixture
def basis_file(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    return str(svd_basis(model).save(tmp_path / "basis.safetensors"))


def run_config(model_dir, data_path, basis=None, mode="frozen", template="alpaca", **training) -> RunConfig:
    settings = {"max_steps": 4, "batch_size": 2, "lr": 1e-2, "logging_steps": 1, "max_length": 96, **training}
    return RunConfig(
        model=str(model_dir),
        basis=basis,
        template=template,
        data=DataConfig(path=data_path, eval_size=2),
        adapter=AdapterConfig(mode=mode, r=4),
        training=TrainingConfig(**settings),
        evaluation=EvaluationConfig(max_new_tokens=16),
    )


def adapter_tensors(run_dir, name="adapter/adapter_model.safetensors"):
    return load_file(str(run_dir / name))


def test_tokenize_labels_only_response(tiny_tokenizer):
    example = Example("What is the capital of France?", "Paris.")
    row = tokenize_example(example, "alpaca", tiny_tokenizer, max_length=256)
    response_ids = tiny_tokenizer("Paris.", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    labelled = [label for label in row["labels"] if label != IGNORE_INDEX]
    assert labelled == response_ids
    assert row["labels"][: len(row["labels"]) - len(response_ids)] == [IGNORE_INDEX] * (len(row["labels"]) - len(response_ids))


def test_tokenize_skips_example_without_room_for_response(tiny_tokenizer):
    example = Example("What is the capital of France?", "Paris.")
    assert tokenize_example(example, "alpaca", tiny_tokenizer, max_length=4) is None


def test_frozen_run_writes_run_folder(tiny_llama_dir, alpaca_file, basis_file, tmp_path):
    run_dir = tmp_path / "run"
    result = train_run(run_config(tiny_llama_dir, alpaca_file, basis_file), run_dir)
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == ["adapter", "loss_curve.png", "run_config.yaml", "train_log.jsonl", "train_summary.json"]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["steps"] == 4
    assert summary["trainable_parameters"] == 2 * 3 * 4 * 64  # r * in for q, k, v of 2 layers
    assert summary["trainable_parameters"] == result.trainable_parameters
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert (run_dir / "adapter" / "cora_adapter.json").is_file()


def test_frozen_run_keeps_basis_bitwise(tiny_llama_dir, alpaca_file, basis_file, tmp_path):
    run_dir = tmp_path / "run"
    train_run(run_config(tiny_llama_dir, alpaca_file, basis_file), run_dir)
    lora_B = adapter_tensors(run_dir)["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    assert torch.equal(lora_B, Basis.load(basis_file).factor(1, "v"))


def test_trained_A_differs_from_initial_A(tiny_llama_dir, alpaca_file, basis_file, tmp_path):
    untrained = train_run(run_config(tiny_llama_dir, alpaca_file, basis_file, lr=1e-12, max_steps=1), tmp_path / "a")
    trained = train_run(run_config(tiny_llama_dir, alpaca_file, basis_file), tmp_path / "b")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    before = adapter_tensors(untrained.run_dir)[key]
    after = adapter_tensors(trained.run_dir)[key]
    assert (after - before).abs().max() > 1e-4


def test_lora_run_on_mbpp_rows(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "mbpp.jsonl", MBPP_ROWS)
    result = train_run(run_config(tiny_llama_dir, data, mode="lora", template="code", max_steps=2), tmp_path / "run")
    assert result.steps == 2
    assert result.trainable_parameters == 2 * 3 * 4 * (64 + 64)
    assert result.final_loss > 0


def test_run_rejects_non_empty_folder(tiny_llama_dir, alpaca_file, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="is not empty; pass --overwrite"):
        train_run(run_config(tiny_llama_dir, alpaca_file, mode="lora"), run_dir)


def test_overwrite_keeps_unrelated_files(tiny_llama_dir, alpaca_file, tmp_path):
    run_dir = tmp_path / "run"
    config = run_config(tiny_llama_dir, alpaca_file, mode="lora", max_steps=1)
    train_run(config, run_dir)
    (run_dir / "notes.txt").write_text("keep me")
    train_run(config, run_dir, overwrite=True)
    assert (run_dir / "notes.txt").read_text() == "keep me"


def test_load_trained_model_reproduces_logits(tiny_llama_dir, alpaca_file, basis_file, tmp_path):
    run_dir = tmp_path / "run"
    train_run(run_config(tiny_llama_dir, alpaca_file, basis_file), run_dir)
    model, tokenizer, config = load_trained_model(run_dir)
    assert config.adapter.mode == "frozen"
    ids = tokenizer("def add(a, b):", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits

    from peft import PeftModel

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(run_dir / "adapter"))
    plain.eval()
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
    assert torch.equal(logits, expected)


def test_resume_continues_step_and_keeps_basis(tiny_llama_dir, alpaca_file, basis_file, tmp_path):
    straight = train_run(
        run_config(tiny_llama_dir, alpaca_file, basis_file, save_steps=2, max_steps=4), tmp_path / "straight"
    )

    run_dir = tmp_path / "resumed"
    config = run_config(tiny_llama_dir, alpaca_file, basis_file, save_steps=2, max_steps=4)
    train_run(config, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-4")  # as if the run stopped after step 2
    resumed = train_run(config, run_dir, resume=True)

    assert resumed.steps == 4
    assert [r["step"] for r in resumed.log_history if "loss" in r] == [1, 2, 3, 4]
    key = "base_model.model.model.layers.0.self_attn.k_proj"
    resumed_tensors = adapter_tensors(run_dir)
    assert torch.equal(resumed_tensors[f"{key}.lora_B.weight"], Basis.load(basis_file).factor(0, "k"))
    straight_A = adapter_tensors(straight.run_dir)[f"{key}.lora_A.weight"]
    assert torch.allclose(resumed_tensors[f"{key}.lora_A.weight"], straight_A, atol=1e-6)


def test_resume_without_checkpoint_rejected(tiny_llama_dir, alpaca_file, tmp_path):
    with pytest.raises(ValueError, match="no checkpoint in"):
        train_run(run_config(tiny_llama_dir, alpaca_file, mode="lora"), tmp_path / "run", resume=True)


def test_4bit_without_cuda_rejected(tiny_llama_dir, alpaca_file, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error path needs a CPU-only machine")
    config = run_config(tiny_llama_dir, alpaca_file, mode="lora", load_in_4bit=True)
    with pytest.raises(RuntimeError, match="load_in_4bit needs a CUDA GPU"):
        train_run(config, tmp_path / "run")


def test_gradient_checkpointing_run_trains(tiny_llama_dir, alpaca_file, basis_file, tmp_path):
    config = run_config(tiny_llama_dir, alpaca_file, basis_file, gradient_checkpointing=True, max_steps=2)
    result = train_run(config, tmp_path / "run")
    grad_norms = [record["grad_norm"] for record in result.log_history if "grad_norm" in record]
    assert all(norm > 0 for norm in grad_norms)


def test_failed_run_on_missing_basis_leaves_folder_retryable(tiny_llama_dir, alpaca_file, basis_file, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(FileNotFoundError):
        train_run(run_config(tiny_llama_dir, alpaca_file, str(tmp_path / "absent.safetensors"), max_steps=1), run_dir)
    assert not run_dir.exists()
    result = train_run(run_config(tiny_llama_dir, alpaca_file, basis_file, max_steps=1), run_dir)
    assert result.steps == 1


def test_failed_run_on_missing_data_keeps_other_files(tiny_llama_dir, alpaca_file, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("keep me")
    with pytest.raises(FileNotFoundError, match="data file not found"):
        train_run(run_config(tiny_llama_dir, str(tmp_path / "absent.jsonl"), mode="lora"), run_dir, overwrite=True)
    assert sorted(path.name for path in run_dir.iterdir()) == ["notes.txt"]


def test_failed_training_step_removes_run_config(tiny_llama_dir, alpaca_file, tmp_path):
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            raise KeyboardInterrupt

    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_run(run_config(tiny_llama_dir, alpaca_file, mode="lora"), run_dir, callbacks=[Interrupt()])
    assert not run_dir.exists()


def test_resume_with_changed_max_steps_rejected(tiny_llama_dir, alpaca_file, tmp_path):
    run_dir = tmp_path / "run"
    train_run(run_config(tiny_llama_dir, alpaca_file, mode="lora", save_steps=1, max_steps=2), run_dir)
    longer = run_config(tiny_llama_dir, alpaca_file, mode="lora", save_steps=1, max_steps=5)
    with pytest.raises(ValueError, match="invalid training.max_steps 5 .* belongs to a run of 2 steps"):
        train_run(longer, run_dir, resume=True)


def test_resumed_summary_counts_time_before_checkpoint(tiny_llama_dir, alpaca_file, tmp_path):
    run_dir = tmp_path / "run"
    config = run_config(tiny_llama_dir, alpaca_file, mode="lora", save_steps=1, max_steps=2)
    train_run(config, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-2")  # as if the run stopped after step 1
    before = json.loads((run_dir / "checkpoints" / "checkpoint-1" / "cora_train_seconds.json").read_text())
    resumed = train_run(config, run_dir, resume=True)
    assert resumed.train_seconds > before["train_seconds"] > 0


def test_saved_config_has_absolute_local_paths(tiny_llama_dir, alpaca_file, basis_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = run_config(tiny_llama_dir, "alpaca.jsonl", "basis.safetensors")
    save_run_config(config, tmp_path / "run")
    saved = load_run_config(tmp_path / "run")
    assert saved.data.path == alpaca_file
    assert saved.basis == basis_file


def test_saved_config_keeps_hub_ids_and_alias(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = RunConfig(model="smollm2", data=DataConfig(path="hub:tatsu-lab/alpaca"), adapter=AdapterConfig(mode="lora"))
    save_run_config(config, tmp_path / "run")
    saved = load_run_config(tmp_path / "run")
    assert saved.model == "smollm2"
    assert saved.data.path == "hub:tatsu-lab/alpaca"
