"""Compact frozen-basis adapters: trained factor only, basis checked by sha256 on load."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cora.adapters import AdapterConfig, build_cora_model, lora_layers, save_cora_adapter
from cora.basis import file_sha256
from cora.cli import main
from cora.compact import (
    compact_peft_folder,
    expand_compact_adapter,
    load_compact_adapter,
    read_compact_adapter,
    save_compact_adapter,
)
from cora.runs import load_trained_model
from test_adapters import RANK, input_ids, svd_basis, train_one_step
from test_merge import trained_run  # noqa: F401  (module-scoped fixture: a finished frozen run)


@pytest.fixture
def run_basis(trained_run):  # noqa: F811
    return trained_run.parent / "basis.safetensors"


@pytest.fixture
def compact_file(trained_run, run_basis, tmp_path):  # noqa: F811
    return compact_peft_folder(trained_run / "adapter", run_basis, tmp_path / "task.cora.safetensors")


@pytest.fixture
def other_basis(tiny_llama_variant_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_variant_dir)
    return svd_basis(model).save(tmp_path / "other-basis.safetensors")


def run_logits(run_dir) -> torch.Tensor:
    model, _, _ = load_trained_model(run_dir)
    with torch.no_grad():
        return model(input_ids=input_ids()).logits


def test_compact_adapter_reproduces_peft_logits(trained_run, run_basis, compact_file, tiny_llama_dir):  # noqa: F811
    model = load_compact_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), compact_file, run_basis)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids()).logits
    assert torch.equal(logits, run_logits(trained_run))


def test_compact_file_stores_only_lora_A(compact_file):
    tensors = load_file(str(compact_file))
    assert len(tensors) == 2 * 3  # q, k, v of 2 layers
    assert all(name.endswith(".lora_A") for name in tensors)


def test_compact_file_is_smaller_than_peft_folder(trained_run, compact_file):  # noqa: F811
    peft_bytes = (trained_run / "adapter" / "adapter_model.safetensors").stat().st_size
    assert compact_file.stat().st_size < 0.75 * peft_bytes


def test_compact_header_records_basis_and_mode(compact_file, run_basis):
    compact = read_compact_adapter(compact_file)
    assert compact.basis.sha256 == file_sha256(run_basis)
    assert compact.basis.name == "basis.safetensors"
    assert compact.record["adapter_config"]["mode"] == "frozen"
    assert compact.record["adapter_config"]["b_init"] == "basis"
    assert compact.record["adapter_config"]["side"] == "output"


def test_missing_basis_names_needed_file(compact_file, run_basis, tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    digest = file_sha256(run_basis)
    with pytest.raises(FileNotFoundError, match=f"needs the basis file 'basis.safetensors' \\(sha256 {digest}\\)"):
        load_compact_adapter(model, compact_file, None)


def test_absent_basis_path_names_needed_file(compact_file, tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with pytest.raises(FileNotFoundError, match="basis file not found: .*gone.safetensors; .*'basis.safetensors'"):
        load_compact_adapter(model, compact_file, tmp_path / "gone.safetensors")


def test_different_basis_rejected_by_sha256(compact_file, other_basis, run_basis, tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    expected = file_sha256(run_basis)
    with pytest.raises(ValueError, match=f"other-basis.safetensors has sha256 .* trained with the basis file "
                                         f"'basis.safetensors' \\(sha256 {expected}\\)"):
        load_compact_adapter(model, compact_file, other_basis)


def test_compacting_with_wrong_basis_rejected(trained_run, other_basis, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="differs from basis file .*other-basis.safetensors"):
        compact_peft_folder(trained_run / "adapter", other_basis, tmp_path / "task.cora.safetensors")


def test_compacting_lora_adapter_rejected(tiny_llama_dir, run_basis, tmp_path):
    model = build_cora_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), None, AdapterConfig(mode="lora", r=RANK))
    save_cora_adapter(model, tmp_path / "lora")
    with pytest.raises(ValueError, match="needs mode 'frozen' with b_init 'basis'"):
        compact_peft_folder(tmp_path / "lora", run_basis, tmp_path / "lora.cora.safetensors")


def test_loaded_compact_keeps_basis_frozen(compact_file, run_basis, tiny_llama_dir):
    model = load_compact_adapter(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir), compact_file, run_basis, is_trainable=True
    )
    for name, layer in lora_layers(model).items():
        assert layer.lora_A["default"].weight.requires_grad, name
        assert not layer.lora_B["default"].weight.requires_grad, name


def test_expanded_compact_loads_with_plain_peft(trained_run, compact_file, run_basis, tiny_llama_dir, tmp_path):  # noqa: F811
    folder = expand_compact_adapter(compact_file, run_basis, tmp_path / "expanded")
    original = load_file(str(trained_run / "adapter" / "adapter_model.safetensors"))
    expanded = load_file(str(folder / "adapter_model.safetensors"))
    assert sorted(expanded) == sorted(original)
    for name in original:
        assert torch.equal(expanded[name], original[name]), name

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(folder))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids()).logits
    assert torch.equal(logits, run_logits(trained_run))


def test_input_side_compact_round_trip(tiny_gqa_llama_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_gqa_llama_dir)
    basis_path = svd_basis(base, side="input").save(tmp_path / "input-basis.safetensors")
    model = build_cora_model(base, svd_basis(base, side="input"), AdapterConfig(mode="frozen"))
    train_one_step(model)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=input_ids()).logits
    path = save_compact_adapter(model, tmp_path / "input.cora.safetensors", basis_path)
    assert all(name.endswith(".lora_B") for name in load_file(str(path)))

    fresh = AutoModelForCausalLM.from_pretrained(tiny_gqa_llama_dir)
    loaded = load_compact_adapter(fresh, path, basis_path)
    loaded.eval()
    with torch.no_grad():
        logits = loaded(input_ids=input_ids()).logits
    assert torch.allclose(logits, expected, atol=1e-6, rtol=0)


def test_cli_convert_to_compact_and_back(trained_run, run_basis, tmp_path, capsys):  # noqa: F811
    compact = tmp_path / "task.cora.safetensors"
    assert main(["convert", str(trained_run), "--basis", str(run_basis), "-o", str(compact)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bytes"] == compact.stat().st_size
    assert report["bytes"] < report["peft_bytes"]

    folder = tmp_path / "peft"
    assert main(["convert", str(compact), "--basis", str(run_basis), "--to", "peft", "-o", str(folder)]) == 0
    assert (folder / "adapter_config.json").is_file()
    assert (folder / "cora_adapter.json").is_file()


def test_cli_convert_reports_wrong_basis(trained_run, other_basis, tmp_path, capsys):  # noqa: F811
    code = main(["convert", str(trained_run), "--basis", str(other_basis), "-o", str(tmp_path / "x.cora.safetensors")])
    assert code == 2
    assert "differs from basis file" in capsys.readouterr().err


def test_compact_with_peft_suffix_targets(tiny_tokenizer, tmp_path):
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    # 7 layers x q, k, v = 21 target modules: PEFT rewrites 20 or more full names into suffixes.
    torch.manual_seed(0)
    config = tiny_llama_config(len(tiny_tokenizer), num_key_value_heads=4)
    config.num_hidden_layers = 7
    LlamaForCausalLM(config).save_pretrained(tmp_path / "deep")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "deep")
    basis_path = svd_basis(base).save(tmp_path / "basis.safetensors")
    model = build_cora_model(base, svd_basis(base), AdapterConfig(mode="frozen"))
    assert model.peft_config["default"].target_modules == {"q_proj", "k_proj", "v_proj"}
    train_one_step(model)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=input_ids()).logits

    path = save_compact_adapter(model, tmp_path / "deep.cora.safetensors", basis_path)
    assert len(load_file(str(path))) == 7 * 3
    loaded = load_compact_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "deep"), path, basis_path)
    loaded.eval()
    with torch.no_grad():
        logits = loaded(input_ids=input_ids()).logits
    assert torch.equal(logits, expected)


def test_fused_output_basis_rejected(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from cora.extract import ExtractConfig, extract_basis

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4))
    gpt2.save_pretrained(tmp_path / "gpt2")
    basis = extract_basis(
        ExtractConfig(models=(str(tmp_path / "gpt2"),), rank=RANK, side="output", group="module", show_progress=False)
    )
    basis_path = basis.save(tmp_path / "basis.safetensors")
    model = build_cora_model(gpt2, basis, AdapterConfig(mode="frozen"))
    with pytest.raises(ValueError, match="do not support the fused q/k/v module 'attn.c_attn' with an output-side"):
        save_compact_adapter(model, tmp_path / "gpt2.cora.safetensors", basis_path)
