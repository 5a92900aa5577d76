"""CoRA adapters on PEFT: factor placement, freezing, save/reload and basis checks."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from cora.adapters import (
    AdapterConfig,
    add_cora_adapter,
    build_cora_model,
    count_parameters,
    load_cora_adapter,
    lora_layers,
    read_sidecar,
    save_cora_adapter,
)
from cora.basis import Basis, BasisMetadata, ModuleRecord, SourceRecord, tensor_key

RANK = 4
HIDDEN = 64


def svd_basis(model, rank: int = RANK, side: str = "output", group: str = "qkv", num_layers: int | None = None) -> Basis:
    """A basis from the model's own q/k/v weights: top singular vectors per layer."""
    layers = model.model.layers
    num_layers = num_layers or len(layers)
    modules = tuple(
        ModuleRecord(role, f"self_attn.{role}_proj", tuple(getattr(layers[0].self_attn, f"{role}_proj").weight.shape))
        for role in "qkv"
    )
    factors, values = {}, {}
    for i in range(num_layers):
        attention = layers[i % len(layers)].self_attn
        weights = {role: getattr(attention, f"{role}_proj").weight.detach().double() for role in "qkv"}
        groups = {"qkv": list(weights.values())} if group == "qkv" else {role: [w] for role, w in weights.items()}
        for target, members in groups.items():
            matrix = torch.cat(members, dim=1) if side == "output" else torch.cat(members, dim=0)
            U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
            factor = U[:, :rank] if side == "output" else Vh[:rank].T  # (dim, r)
            factors[tensor_key(i, target)] = factor.float().contiguous()
            values[tensor_key(i, target)] = S.float()
    metadata = BasisMetadata(
        rank=rank,
        side=side,
        group=group,
        architecture="LlamaForCausalLM",
        model_type="llama",
        layer_prefix="model.layers",
        layers=tuple(range(num_layers)),
        modules=modules,
        sources=(SourceRecord("tiny-llama"),),
    )
    return Basis(factors=factors, singular_values=values, metadata=metadata)


@pytest.fixture
def tiny_model(tiny_llama_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)


@pytest.fixture
def tiny_gqa_model(tiny_gqa_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_gqa_llama_dir, dtype=torch.float32)


def input_ids() -> torch.Tensor:
    return torch.tensor([[5, 17, 42, 99, 3, 250, 7, 1]])


def frozen_pairs(model, adapter="default"):
    """(lora_A, lora_B) weight parameters of every adapted module."""
    return [(layer.lora_A[adapter].weight, layer.lora_B[adapter].weight) for layer in lora_layers(model).values()]


def train_one_step(model) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = input_ids()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()


def test_frozen_mode_places_basis_in_lora_B(tiny_model):
    basis = svd_basis(tiny_model)
    model = build_cora_model(tiny_model, basis, AdapterConfig(mode="frozen"))
    layer = lora_layers(model)["model.layers.1.self_attn.k_proj"]
    assert torch.equal(layer.lora_B["default"].weight, basis.factor(1, "k"))


def test_frozen_mode_trains_r_times_in_per_layer(tiny_model):
    model = build_cora_model(tiny_model, svd_basis(tiny_model), AdapterConfig(mode="frozen"))
    trainable, _ = count_parameters(model)
    assert trainable == 2 * 3 * RANK * HIDDEN  # 2 layers x q, k, v x r * in


def test_frozen_input_side_trains_r_times_out_per_layer(tiny_gqa_model):
    basis = svd_basis(tiny_gqa_model, side="input")
    model = build_cora_model(tiny_gqa_model, basis, AdapterConfig(mode="frozen"))
    trainable, _ = count_parameters(model)
    assert trainable == 2 * RANK * (64 + 32 + 32)  # 2 layers x r * out of q, k, v


def test_input_side_places_basis_transposed_in_lora_A(tiny_gqa_model):
    basis = svd_basis(tiny_gqa_model, side="input")
    model = build_cora_model(tiny_gqa_model, basis, AdapterConfig(mode="frozen"))
    layer = lora_layers(model)["model.layers.0.self_attn.v_proj"]
    assert torch.equal(layer.lora_A["default"].weight, basis.factor(0, "v").T)
    assert not layer.lora_A["default"].weight.requires_grad
    assert layer.lora_B["default"].weight.requires_grad


def test_free_factor_bound_uses_model_width(tiny_gqa_model):
    # The free factor is uniform in +-1/sqrt(width) on both sides: lora_A (r, in) uses in,
    # and a free lora_B (out, r) uses out, not its fan-in r.
    output_basis = svd_basis(tiny_gqa_model, group="module")
    output_side = build_cora_model(tiny_gqa_model, output_basis, AdapterConfig(mode="frozen"))
    free_a = lora_layers(output_side)["model.layers.0.self_attn.q_proj"].lora_A["default"].weight
    assert free_a.abs().max() <= 1 / free_a.shape[1] ** 0.5
    input_side = build_cora_model(tiny_gqa_model, svd_basis(tiny_gqa_model, side="input"), AdapterConfig(mode="frozen"))
    free_b = lora_layers(input_side)["model.layers.0.self_attn.q_proj"].lora_B["default"].weight  # (out, r)
    assert free_b.abs().max() <= 1 / free_b.shape[0] ** 0.5
    assert free_b.abs().max() > 0.5 / free_b.shape[0] ** 0.5  # uniform draws reach the bound's order


def test_trainable_mode_trains_both_factors(tiny_model):
    model = build_cora_model(tiny_model, svd_basis(tiny_model), AdapterConfig(mode="trainable"))
    trainable, _ = count_parameters(model)
    assert trainable == 2 * 3 * RANK * (HIDDEN + HIDDEN)


def test_lora_mode_matches_plain_peft_init(tiny_model):
    model = build_cora_model(tiny_model, None, AdapterConfig(mode="lora", r=RANK))
    for _, lora_B in frozen_pairs(model):
        assert torch.count_nonzero(lora_B) == 0
    trainable, _ = count_parameters(model)
    assert trainable == 2 * 3 * RANK * (HIDDEN + HIDDEN)


def test_zero_a_init_keeps_base_output(tiny_model):
    with torch.no_grad():
        expected = tiny_model(input_ids=input_ids()).logits.clone()
    model = build_cora_model(tiny_model, svd_basis(tiny_model), AdapterConfig(mode="frozen", a_init="zeros"))
    with torch.no_grad():
        logits = model(input_ids=input_ids()).logits
    assert torch.equal(logits, expected)


def test_training_changes_A_and_leaves_frozen_B_bitwise(tiny_model):
    model = build_cora_model(tiny_model, svd_basis(tiny_model), AdapterConfig(mode="frozen"))
    before = [(a.detach().clone(), b.detach().clone()) for a, b in frozen_pairs(model)]
    train_one_step(model)
    for (a_before, b_before), (a_after, b_after) in zip(before, frozen_pairs(model)):
        assert torch.equal(b_after, b_before)
        assert not torch.equal(a_after, a_before)


@pytest.mark.parametrize("b_init", ["zeros", "ones", "gaussian", "orthogonal"])
def test_ablation_b_init_sets_lora_B_without_basis(tiny_model, b_init):
    model = build_cora_model(tiny_model, None, AdapterConfig(mode="frozen", r=RANK, b_init=b_init))
    lora_B = lora_layers(model)["model.layers.0.self_attn.q_proj"].lora_B["default"].weight  # (out, r)
    if b_init == "zeros":
        assert torch.count_nonzero(lora_B) == 0
    else:
        assert torch.allclose(lora_B.norm(dim=0), torch.ones(RANK), atol=1e-5)
    if b_init == "orthogonal":
        assert torch.allclose(lora_B.T @ lora_B, torch.eye(RANK), atol=1e-5)
    assert not lora_B.requires_grad


def test_frozen_B_stays_frozen_after_adapter_switch(tiny_model):
    basis = svd_basis(tiny_model)
    model = build_cora_model(tiny_model, basis, AdapterConfig(mode="frozen"), adapter_name="task1")
    add_cora_adapter(model, basis, AdapterConfig(mode="trainable"), adapter_name="task2")
    model.set_adapter("task2")
    model.set_adapter("task1")
    for lora_A, lora_B in frozen_pairs(model, "task1"):
        assert lora_A.requires_grad
        assert not lora_B.requires_grad
    model.set_adapter("task2")
    for lora_A, lora_B in frozen_pairs(model, "task2"):
        assert lora_B.requires_grad


def test_saved_adapter_loads_with_plain_peft_and_same_logits(tiny_model, tiny_llama_dir, tmp_path):
    model = build_cora_model(tiny_model, svd_basis(tiny_model), AdapterConfig(mode="frozen"))
    train_one_step(model)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=input_ids()).logits
    save_cora_adapter(model, tmp_path / "adapter")

    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    with torch.no_grad():
        logits = loaded(input_ids=input_ids()).logits
    assert torch.equal(logits, expected)


def test_frozen_B_stays_frozen_after_reload_and_switch(tiny_model, tiny_llama_dir, tmp_path):
    basis = svd_basis(tiny_model)
    model = build_cora_model(tiny_model, basis, AdapterConfig(mode="frozen"), adapter_name="task1")
    save_cora_adapter(model, tmp_path / "task1", adapter_name="task1")
    assert read_sidecar(tmp_path / "task1")["frozen_weights"] == ["lora_B"]

    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    loaded = load_cora_adapter(fresh, tmp_path / "task1", adapter_name="task1", is_trainable=True)
    add_cora_adapter(loaded, None, AdapterConfig(mode="lora", r=RANK), adapter_name="other")
    loaded.set_adapter("other")
    loaded.set_adapter("task1")
    for (lora_A, lora_B), layer_name in zip(frozen_pairs(loaded, "task1"), lora_layers(loaded)):
        assert lora_A.requires_grad, layer_name
        assert not lora_B.requires_grad, layer_name
        assert torch.equal(lora_B, lora_layers(model)[layer_name].lora_B["task1"].weight)


def test_basis_with_more_layers_than_model_rejected(tiny_model):
    basis = svd_basis(tiny_model, num_layers=30)
    with pytest.raises(ValueError, match="basis layers 30 .* vs model layers 2"):
        build_cora_model(tiny_model, basis, AdapterConfig(mode="frozen"))


def test_basis_with_wrong_dim_rejected(tiny_model, tiny_gqa_model):
    basis = svd_basis(tiny_model, group="module")  # k/v bases are (64, r)
    with pytest.raises(ValueError, match="basis dim 64 vs module out 32 for model.layers.0.self_attn.k_proj"):
        build_cora_model(tiny_gqa_model, basis, AdapterConfig(mode="frozen"))


def test_rank_above_basis_rank_rejected(tiny_model):
    with pytest.raises(ValueError, match="rank 8 exceeds the basis rank 4"):
        build_cora_model(tiny_model, svd_basis(tiny_model), AdapterConfig(mode="frozen", r=8))


def test_adapter_config_rejects_unknown_mode():
    with pytest.raises(ValueError, match="invalid mode 'half'; expected one of"):
        AdapterConfig(mode="half")


def test_adapter_config_rejects_b_init_for_lora_mode():
    with pytest.raises(ValueError, match="apply to modes frozen and trainable"):
        AdapterConfig(mode="lora", b_init="ones")


def test_target_modules_subset_adapts_only_those(tiny_model):
    model = build_cora_model(tiny_model, svd_basis(tiny_model), AdapterConfig(mode="frozen", target_modules=("q_proj",)))
    assert sorted(lora_layers(model)) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_extracted_basis_fits_its_model(tiny_llama_dir, tiny_llama_variant_dir, tiny_model):
    from cora.extract import ExtractConfig, extract_basis

    basis = extract_basis(
        ExtractConfig(models=(str(tiny_llama_dir), str(tiny_llama_variant_dir)), rank=RANK, show_progress=False)
    )
    model = build_cora_model(tiny_model, basis, AdapterConfig(mode="frozen"))
    layer = lora_layers(model)["model.layers.1.self_attn.v_proj"]
    assert torch.equal(layer.lora_B["default"].weight, basis.factor(1, "v"))


def test_fused_gpt2_input_basis_goes_to_lora_A(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from cora.extract import ExtractConfig, extract_basis

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4))
    gpt2.save_pretrained(tmp_path / "gpt2")
    basis = extract_basis(
        ExtractConfig(models=(str(tmp_path / "gpt2"),), rank=RANK, side="input", show_progress=False)
    )
    model = build_cora_model(gpt2, basis, AdapterConfig(mode="frozen"))
    layer = lora_layers(model)["transformer.h.0.attn.c_attn"]
    assert torch.equal(layer.lora_A["default"].weight, basis.factor(0, "q").T)
    trainable, _ = count_parameters(model)
    assert trainable == 2 * RANK * 3 * 32  # 2 layers x r * out of the fused (96, 32) projection


def gpt2_and_basis(tmp_path, side: str, group: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    from cora.extract import ExtractConfig, extract_basis

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4))
    gpt2.save_pretrained(tmp_path / "gpt2")
    config = ExtractConfig(models=(str(tmp_path / "gpt2"),), rank=RANK, side=side, group=group, show_progress=False)
    return gpt2, extract_basis(config)


def test_fused_input_module_basis_rejected(tmp_path):
    gpt2, basis = gpt2_and_basis(tmp_path, "input", "module")
    with pytest.raises(ValueError, match="side=input, group=module is not supported"):
        build_cora_model(gpt2, basis, AdapterConfig(mode="frozen"))


@pytest.mark.parametrize("group", ["qkv", "module"])
def test_fused_output_B_holds_role_blocks(tmp_path, group):
    gpt2, basis = gpt2_and_basis(tmp_path, "output", group)
    model = build_cora_model(gpt2, basis, AdapterConfig(mode="frozen"))
    lora_B = lora_layers(model)["transformer.h.1.attn.c_attn"].lora_B["default"].weight  # (96, 3r)
    assert lora_B.shape == (96, 3 * RANK)
    expected = torch.zeros(96, 3 * RANK)
    for index, role in enumerate("qkv"):
        rows = torch.tensor(basis.metadata.fused_rows[role])
        expected[rows, index * RANK:(index + 1) * RANK] = basis.factor(1, role)
    assert torch.equal(lora_B, expected)


def test_fused_output_equals_three_separate_loras(tmp_path):
    gpt2, basis = gpt2_and_basis(tmp_path, "output", "module")
    base_out = {}
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        base_out = gpt2.transformer.h[0].attn.c_attn(x)  # (2, 5, 96)
    model = build_cora_model(gpt2, basis, AdapterConfig(mode="frozen", lora_alpha=2 * RANK))
    layer = lora_layers(model)["transformer.h.0.attn.c_attn"]
    lora_A = layer.lora_A["default"].weight  # (3r, in)

    expected = base_out.clone()
    for index, role in enumerate("qkv"):
        rows = torch.tensor(basis.metadata.fused_rows[role])
        a_role = lora_A[index * RANK:(index + 1) * RANK]  # (r, in)
        expected[..., rows] += 2.0 * (x @ a_role.T) @ basis.factor(0, role).T  # scaling = lora_alpha / r = 2
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_fused_output_frozen_trains_3r_times_in(tmp_path):
    gpt2, basis = gpt2_and_basis(tmp_path, "output", "module")
    model = build_cora_model(gpt2, basis, AdapterConfig(mode="frozen"))
    trainable, _ = count_parameters(model)
    assert trainable == 2 * 3 * RANK * 32  # 2 layers x lora_A (3r, in), as three rank-r LoRAs


def test_fused_output_trainable_trains_whole_B(tmp_path):
    gpt2, basis = gpt2_and_basis(tmp_path, "output", "module")
    model = build_cora_model(gpt2, basis, AdapterConfig(mode="trainable"))
    trainable, _ = count_parameters(model)
    assert trainable == 2 * 3 * RANK * (32 + 96)  # the off-block zeros of lora_B (96, 3r) train too


def test_fused_output_frozen_B_unchanged_by_training(tmp_path):
    gpt2, basis = gpt2_and_basis(tmp_path, "output", "module")
    model = build_cora_model(gpt2, basis, AdapterConfig(mode="frozen"))
    lora_A, lora_B = frozen_pairs(model)[0]
    before_A, before_B = lora_A.detach().clone(), lora_B.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = input_ids() % 64  # GPT-2's vocabulary here has 64 tokens
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert not torch.equal(lora_A, before_A)
    assert torch.equal(lora_B, before_B)
