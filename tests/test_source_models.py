"""Source models built by short fine-tunes of a tiny real base model, and bases extracted from them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from cora.basis import Basis
from cora.compare import BasisSpec, GridConfig, MethodSpec, TaskSpec, EvalSetSpec, extract_bases
from cora.source_models import SOURCE_RECORD_NAME, SourceModelSpec, build_source_model
from test_training import ALPACA_ROWS, MBPP_ROWS, write_jsonl


def source_spec(name: str, data: str, seed: int = 0) -> SourceModelSpec:
    return SourceModelSpec(
        name=name, data={"path": data, "eval_size": 2}, max_steps=2, r=4, batch_size=2, max_length=192, lr=1e-2, seed=seed
    )


@pytest.fixture(scope="module")
def built_source(tmp_path_factory, tiny_llama_dir):
    folder = tmp_path_factory.mktemp("sources")
    data = write_jsonl(folder / "alpaca.jsonl", ALPACA_ROWS)
    spec = source_spec("alpaca_ft", data)
    return spec, build_source_model(spec, str(tiny_llama_dir), folder / "out", data), folder, data


def test_source_is_full_safetensors_checkpoint(built_source):
    _, directory, _, _ = built_source
    assert (directory / "config.json").is_file()
    assert (directory / "model.safetensors").is_file()
    assert (directory / SOURCE_RECORD_NAME).is_file()


def test_source_differs_from_base_in_qkv_only(built_source, tiny_llama_dir):
    _, directory, _, _ = built_source
    base = load_file(tiny_llama_dir / "model.safetensors")
    merged = load_file(directory / "model.safetensors")
    changed = sorted(name for name in base if not torch.equal(base[name], merged[name]))
    assert changed
    assert all(name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")) for name in changed)


def test_source_has_no_lora_weights(built_source):
    _, directory, _, _ = built_source
    assert not [name for name in load_file(directory / "model.safetensors") if "lora_" in name]


def test_built_source_is_reused(built_source, tiny_llama_dir):
    spec, directory, folder, data = built_source
    before = (directory / "model.safetensors").stat().st_mtime_ns
    again = build_source_model(spec, str(tiny_llama_dir), folder / "out", data)
    assert again == directory
    assert (directory / "model.safetensors").stat().st_mtime_ns == before


def test_changed_spec_builds_new_source(built_source, tiny_llama_dir):
    spec, directory, folder, data = built_source
    other = build_source_model(source_spec("alpaca_ft", data, seed=1), str(tiny_llama_dir), folder / "out", data)
    assert other != directory


def test_difference_basis_spans_the_fine_tune_update(built_source, tiny_llama_dir):
    spec, directory, folder, data = built_source
    grid = GridConfig(
        run={"model": str(tiny_llama_dir)},
        tasks=[TaskSpec("t", {"path": data}, eval=[EvalSetSpec("held_out", metrics=("rouge1",))])],
        methods=[MethodSpec("lora", adapter={"mode": "lora"})],
        sources=[spec],
        bases=[BasisSpec("diff", ("source:alpaca_ft",), base_difference=True, options={"rank": 2, "group": "module", "method": "exact"})],
    )
    path = extract_bases(grid, folder / "grid", {"alpaca_ft": directory})["diff"]
    basis = Basis.load(path)
    assert basis.metadata.options["base_model"] == str(tiny_llama_dir)
    # The update W_source - W_base of a rank-4 LoRA has rank <= 4, so a rank-2 basis captures a large share.
    assert basis.metadata.energy["layers.0.q"] > 0.5
    # An SVD of the difference has at most 4 non-zero singular values.
    assert basis.singular_values["layers.0.q"][4:].abs().max() < 1e-4 * basis.singular_values["layers.0.q"][0]


def test_source_spec_without_path_rejected():
    with pytest.raises(ValueError, match="source model 'bad': data must be a mapping with a path"):
        SourceModelSpec(name="bad", data={"eval_size": 2})


def test_source_spec_with_path_name_rejected():
    with pytest.raises(ValueError, match="invalid source model name 'a/b'"):
        SourceModelSpec(name="a/b", data={"path": "x.json"})


def test_source_trains_on_mbpp_split(tmp_path, tiny_llama_dir):
    from cora.compare import grid_from_dict, training_data_path

    rows = [dict(row, task_id=task_id) for row, task_id in zip(MBPP_ROWS, (601, 602, 603, 11, 12))]
    data = write_jsonl(tmp_path / "mbpp.jsonl", rows)
    raw = {
        "run": {"model": str(tiny_llama_dir)},
        "methods": {"base_model": {"train": False}},
        "tasks": {"t": {"data": {"path": data}, "eval": {"held_out": {"metrics": ["rouge1"]}}}},
    }
    grid = grid_from_dict(raw)
    path = training_data_path(grid, {"path": data}, "train", tmp_path)
    assert len(open(path).read().splitlines()) == 3
