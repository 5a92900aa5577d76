"""Training under ``accelerate launch`` with two CPU processes (gloo): every rank ends with the same adapter.

Run as a script, this file is the training worker that ``accelerate launch``
starts on each rank: it trains with :func:`cora.training.train_run` and dumps the
rank's LoRA parameters to ``DUMP_DIR/rank{N}.safetensors``, so the test can
compare what each process holds after the last step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"
LAUNCH_TIMEOUT_SECONDS = 600
STEPS = 3


# --- the worker (runs inside accelerate launch) -----------------------------------------------------


def full_lora_tensors(model) -> dict[str, torch.Tensor]:
    """Collect every lora_A/lora_B parameter at full size, gathering FSDP2 and ZeRO-3 shards.

    All ranks must call this together: gathering a sharded tensor is a collective.
    """
    tensors = {}
    for name, parameter in model.named_parameters():
        if "lora_" not in name:
            continue
        key = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
        if hasattr(parameter, "full_tensor"):  # FSDP2 shards parameters as DTensors
            tensors[key] = parameter.full_tensor().detach().cpu().clone()
        elif hasattr(parameter, "ds_id"):  # DeepSpeed ZeRO-3 partitions parameters
            import deepspeed

            with deepspeed.zero.GatheredParameters([parameter]):
                tensors[key] = parameter.detach().cpu().clone()
        else:
            tensors[key] = parameter.detach().cpu().clone()
    return tensors


def run_worker(argv: list[str]) -> None:
    from accelerate.state import AcceleratorState
    from transformers import TrainerCallback

    from cora.runs import load_config
    from cora.training import train_run

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--dump", required=True, type=Path)
    args = parser.parse_args(argv)

    class DumpRankState(TrainerCallback):
        def on_train_end(self, training_args, state, control, model=None, **kwargs):
            tensors = full_lora_tensors(model)
            save_file(tensors, str(dump_dir / f"rank{training_args.process_index}.safetensors"))

            lora_parameters = [p for name, p in model.named_parameters() if "lora_" in name]
            facts = {
                "world_size": training_args.world_size,
                "distributed_type": str(AcceleratorState().distributed_type),
                "sharded_lora_parameters": sum(hasattr(p, "full_tensor") or hasattr(p, "ds_id") for p in lora_parameters),
            }
            (dump_dir / f"rank{training_args.process_index}.json").write_text(json.dumps(facts))

    dump_dir = args.dump
    dump_dir.mkdir(parents=True, exist_ok=True)
    train_run(load_config(args.config), args.output, callbacks=[DumpRankState()])


# --- the tests --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(accelerate_config: Path, worker_args: list[str]) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(accelerate_config),
        "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(free_port()),
        "--num_cpu_threads_per_process", "1",
        *worker_args,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_SECONDS
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]
    return completed


@pytest.fixture(scope="module")
def distributed_inputs(tmp_path_factory, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from test_adapters import svd_basis
    from test_training import ALPACA_ROWS, write_jsonl

    folder = tmp_path_factory.mktemp("distributed")
    data = write_jsonl(folder / "alpaca.jsonl", ALPACA_ROWS)
    basis = svd_basis(AutoModelForCausalLM.from_pretrained(tiny_llama_dir)).save(folder / "basis.safetensors")
    return folder, data, basis


def write_run_config(folder: Path, model_dir: Path, data: str, basis: Path, **training) -> Path:
    settings = {"max_steps": STEPS, "batch_size": 2, "lr": 1e-2, "logging_steps": 1, "max_length": 96, **training}
    raw = {
        "model": str(model_dir),
        "basis": str(basis),
        "data": {"path": data, "eval_size": 2},
        "adapter": {"mode": "frozen", "r": 4},
        "training": settings,
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def train_on_two_ranks(accelerate_config: str, tiny_llama_dir, distributed_inputs, name: str):
    folder, data, basis = distributed_inputs
    work = folder / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    config = write_run_config(work, tiny_llama_dir, data, basis)
    launch(
        ACCELERATE_CONFIGS / accelerate_config,
        [__file__, "--config", str(config), "--output", str(work / "run"), "--dump", str(work / "dump")],
    )
    ranks = [load_file(str(work / "dump" / f"rank{i}.safetensors")) for i in range(2)]
    facts = [json.loads((work / "dump" / f"rank{i}.json").read_text()) for i in range(2)]
    return work, ranks, facts, basis


def assert_same_adapter_on_both_ranks(ranks):
    assert sorted(ranks[0]) == sorted(ranks[1])
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name


def assert_frozen_basis_unchanged(tensors, basis_path):
    from cora.basis import Basis

    basis = Basis.load(basis_path)
    lora_B = {name: t for name, t in tensors.items() if ".lora_B." in name}
    assert len(lora_B) == 2 * 3  # q, k, v of 2 layers
    for name, tensor in lora_B.items():
        layer = int(name.split("layers.")[1].split(".")[0])
        role = name.split("self_attn.")[1][0]
        assert torch.equal(tensor, basis.factor(layer, role)), name


def saved_adapter(work: Path) -> dict[str, torch.Tensor]:
    return load_file(str(work / "run" / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_ddp_two_ranks_end_with_identical_adapters(tiny_llama_dir, distributed_inputs):
    work, ranks, facts, basis = train_on_two_ranks("ddp.yaml", tiny_llama_dir, distributed_inputs, "ddp")
    assert [f["world_size"] for f in facts] == [2, 2]
    assert facts[0]["distributed_type"] == "DistributedType.MULTI_CPU"
    assert_same_adapter_on_both_ranks(ranks)
    assert_frozen_basis_unchanged(ranks[0], basis)

    summary = json.loads((work / "run" / "train_summary.json").read_text())
    assert summary["steps"] == STEPS
    assert (work / "run" / "adapter" / "cora_adapter.json").is_file()

    saved = saved_adapter(work)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert torch.equal(saved[key], ranks[0][key.replace(".weight", ".default.weight")])
    assert_frozen_basis_unchanged(saved, basis)


# accelerate 1.15 turns the FSDP config into FSDP only on GPU-like devices: with CPU
# processes it trains as plain data parallel, so this test needs two CUDA devices.
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP through accelerate needs 2 CUDA devices")
def test_fsdp2_shards_adapter_and_keeps_basis(tiny_llama_dir, distributed_inputs):
    work, ranks, facts, basis = train_on_two_ranks("fsdp.yaml", tiny_llama_dir, distributed_inputs, "fsdp")
    assert facts[0]["sharded_lora_parameters"] == 2 * 3 * 2  # lora_A and lora_B of q, k, v in 2 layers
    assert_same_adapter_on_both_ranks(ranks)
    assert_frozen_basis_unchanged(ranks[0], basis)

    saved = saved_adapter(work)
    assert_frozen_basis_unchanged(saved, basis)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    assert torch.equal(saved[key], ranks[0][key.replace(".weight", ".default.weight")])


# ZeRO-3 is the stage that partitions the frozen basis; ZeRO-2 replicates parameters
# like DDP and is left to the same worker run by hand, to keep the suite short.
@pytest.mark.slow
def test_deepspeed_zero3_keeps_basis_on_both_ranks(tiny_llama_dir, distributed_inputs):
    pytest.importorskip("deepspeed")
    work, ranks, facts, basis = train_on_two_ranks("deepspeed_zero3.yaml", tiny_llama_dir, distributed_inputs, "zero3")
    assert facts[0]["distributed_type"] == "DistributedType.DEEPSPEED"
    assert facts[0]["sharded_lora_parameters"] == 2 * 3 * 2  # lora_A and lora_B of q, k, v in 2 layers
    assert_same_adapter_on_both_ranks(ranks)
    assert_frozen_basis_unchanged(ranks[0], basis)

    saved = saved_adapter(work)
    assert_frozen_basis_unchanged(saved, basis)
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    assert torch.equal(saved[key], ranks[0][key.replace(".weight", ".default.weight")])


if __name__ == "__main__":
    run_worker(sys.argv[1:])
