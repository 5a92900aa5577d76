"""Many compact task adapters on one base model: one shared basis, frozen factors stay frozen."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from cora.adapters import AdapterConfig, build_cora_model
from cora.basis import Basis
from cora.compact import load_compact_adapter, save_compact_adapter
from cora.serving import AdapterServer, load_task_adapters
from test_adapters import input_ids, svd_basis, train_one_step

TASKS = {"summaries": 1, "code": 2, "chat": 3}  # adapter name -> init_seed


@pytest.fixture(scope="module")
def basis_path(tmp_path_factory, tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    return svd_basis(model).save(tmp_path_factory.mktemp("serving") / "basis.safetensors")


@pytest.fixture(scope="module")
def task_files(tmp_path_factory, tiny_llama_dir, basis_path):
    """Three frozen-basis adapters, each trained one step from its own seed, saved compact."""
    folder = tmp_path_factory.mktemp("tasks")
    files = {}
    for name, seed in TASKS.items():
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        model = build_cora_model(base, Basis.load(basis_path), AdapterConfig(mode="frozen", init_seed=seed))
        train_one_step(model)
        files[name] = save_compact_adapter(model, folder / f"{name}.cora.safetensors", basis_path)
    return files


@pytest.fixture
def server(tiny_llama_dir, basis_path, task_files):
    return load_task_adapters(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), basis_path, task_files)


def unique_storage_bytes(model) -> int:
    storages = {}
    for parameter in model.parameters():
        storage = parameter.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def test_adapters_share_one_basis_tensor(server):
    for name in TASKS:
        for module, weight in server.frozen_factors(name).items():
            layer = int(module.split("layers.")[1].split(".")[0])
            role = module.split("self_attn.")[1][0]
            assert weight.data_ptr() == server.basis.factor(layer, role).data_ptr(), (name, module)


def test_extra_adapter_costs_only_trained_factor(tiny_llama_dir, basis_path, task_files):
    server = AdapterServer(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), basis_path)
    server.add("summaries", task_files["summaries"])
    before = unique_storage_bytes(server.model)
    server.add("code", task_files["code"])
    added = unique_storage_bytes(server.model) - before
    assert added == 2 * 3 * 4 * 64 * 4  # lora_A (r=4, in=64) of q, k, v in 2 layers, float32


def test_served_logits_match_single_adapter(server, tiny_llama_dir, basis_path, task_files):
    alone = load_compact_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), task_files["code"], basis_path)
    alone.eval()
    with torch.no_grad():
        expected = alone(input_ids=input_ids()).logits
    server.logits("chat", input_ids())
    assert torch.equal(server.logits("code", input_ids()), expected)


def test_adapters_give_different_logits(server):
    assert not torch.equal(server.logits("code", input_ids()), server.logits("chat", input_ids()))


def test_switching_keeps_every_frozen_factor_frozen(server, basis_path):
    basis = Basis.load(basis_path)
    for name in ["code", "summaries", "chat", "code"]:
        server.activate(name)
    for name in TASKS:
        for module, weight in server.frozen_factors(name).items():
            layer = int(module.split("layers.")[1].split(".")[0])
            assert not weight.requires_grad, (name, module)
            assert torch.equal(weight, basis.factor(layer, module.split("self_attn.")[1][0])), (name, module)


def test_switching_leaves_model_without_trainable_parameters(server):
    server.activate("summaries")
    server.activate("code")
    assert not any(p.requires_grad for p in server.model.parameters())


def test_unknown_adapter_rejected(server):
    with pytest.raises(KeyError, match="no adapter named 'poetry'; loaded adapters: \\['summaries', 'code', 'chat'\\]"):
        server.activate("poetry")


def test_adapter_from_other_basis_rejected(tiny_llama_dir, tiny_llama_variant_dir, task_files, tmp_path):
    other = svd_basis(AutoModelForCausalLM.from_pretrained(tiny_llama_variant_dir)).save(tmp_path / "other.safetensors")
    server = AdapterServer(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), other)
    with pytest.raises(ValueError, match="differs from the basis file 'basis.safetensors'"):
        server.add("code", task_files["code"])


def test_empty_adapter_mapping_rejected(tiny_llama_dir, basis_path):
    with pytest.raises(ValueError, match="no adapters given"):
        load_task_adapters(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), basis_path, {})
