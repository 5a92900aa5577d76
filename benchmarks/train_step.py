"""Benchmark one training step of lora, frozen and trainable adapters on SmolLM2-135M-Instruct (CPU).

Methods, each run in its own subprocess so that peak RSS is its own, with the
repeats interleaved (lora, frozen, trainable, base, lora, ...) so that load on a
shared machine spreads over all methods alike:

* lora: plain PEFT LoRA (lora_A Kaiming, lora_B zeros), both factors train.
* frozen: CoRA with a frozen basis in lora_B, only lora_A trains.
* trainable: CoRA with lora_B starting at the basis, both factors train.
* base: no adapter; forward and backward through the frozen network (the
  embedding output requires grad, so every layer back-propagates activations
  but no weight gets a gradient). Every adapter method pays at least this.

Every adapter adapts q_proj, k_proj and v_proj of all 30 layers at rank 8. The
basis is extracted from the model itself with ``group=module``, because SmolLM2
uses grouped-query attention (k/v out 192, q out 576), so one output-side basis
per layer cannot serve q, k and v.

One step is forward, backward, ``AdamW.step`` and ``zero_grad`` on a fixed batch
of random token ids. The worker reports the median step time (wall and CPU
time of the process), peak RSS
(``ru_maxrss``), optimizer state bytes, trainable parameters and the adapter
file sizes (PEFT folder, and the compact file for ``frozen``).

Usage: ``python benchmarks/train_step.py [--quick]``. The last line printed is
``train_step: frozen/lora_time=X frozen/lora_rss=Y frozen/lora_params=Z``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CACHE = Path(os.environ.get("CORA_CACHE", Path.home() / ".cache" / "cora"))
RANK = 8
METHODS = ("lora", "frozen", "trainable", "base")
BASIS_NAME = f"smollm2-self-r{RANK}-module.safetensors"


# --- inputs -----------------------------------------------------------------------------------------------


def basis_path() -> Path:
    """Extract (once, then cached) a rank-8 output-side basis per q/k/v module from SmolLM2 itself."""
    from cora.extract import ExtractConfig, extract_basis
    from cora.models import resolve_model_path

    path = CACHE / "bench" / BASIS_NAME
    if not path.is_file():
        model_dir = resolve_model_path("smollm2")
        basis = extract_basis(ExtractConfig(models=(model_dir,), rank=RANK, side="output", group="module"))
        basis.save(path)
    return path


def predicted_trainable(model, mode: str) -> int:
    """Trainable parameters that the method predicts from the module shapes: r*in (frozen) or r*(in+out)."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj"):
            out_features, in_features = module.weight.shape
            total += RANK * in_features if mode == "frozen" else RANK * (in_features + out_features)
    return total


# --- the worker (one method, one subprocess) ------------------------------------------------------------


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    )


def directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.iterdir() if path.name.endswith(".safetensors"))


def build_model(method: str, basis_file: Path):
    from cora.adapters import AdapterConfig, build_cora_model
    from cora.basis import Basis
    from cora.models import load_base_model

    base, _ = load_base_model("smollm2")
    prediction = predicted_trainable(base, method) if method != "base" else 0
    if method == "base":
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        base.enable_input_require_grads()
        return base, prediction
    model = build_cora_model(base, Basis.load(basis_file), AdapterConfig(mode=method, r=RANK))
    return model, prediction


def adapter_sizes(model, method: str, basis_file: Path) -> dict[str, int]:
    from cora.adapters import save_cora_adapter
    from cora.compact import save_compact_adapter

    if method == "base":
        return {}
    with tempfile.TemporaryDirectory() as folder:
        sizes = {"adapter_bytes": directory_bytes(save_cora_adapter(model, Path(folder) / "adapter"))}
        if method == "frozen":
            compact = save_compact_adapter(model, Path(folder) / "task.cora.safetensors", basis_file)
            sizes["compact_bytes"] = compact.stat().st_size
    return sizes


def run_worker(method: str, basis_file: Path, batch: int, seq: int, warmup: int, steps: int) -> dict:
    torch.manual_seed(0)
    model, prediction = build_model(method, basis_file)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))  # (batch, seq)

    times, cpu_times = [], []
    for step in range(warmup + steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)

    return {
        "method": method,
        "median_step_seconds": statistics.median(times),
        "step_seconds": times,
        "step_cpu_seconds": cpu_times,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "optimizer_state_bytes": optimizer_state_bytes(optimizer) if optimizer is not None else 0,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "predicted_trainable_parameters": prediction,
        **adapter_sizes(model, method, basis_file),
    }


# --- the driver ---------------------------------------------------------------------------------------


def run_method(method: str, basis_file: Path, args: argparse.Namespace) -> dict:
    command = [
        sys.executable, __file__, "--worker", method, "--basis", str(basis_file),
        "--batch", str(args.batch), "--seq", str(args.seq), "--warmup", str(args.warmup), "--steps", str(args.steps),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"worker {method} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def summarise(results: dict[str, list[dict]], batch: int, seq: int) -> dict[str, dict]:
    summary = {}
    for method, runs in results.items():
        steps = [t for run in runs for t in run["step_seconds"]]
        median = statistics.median(steps)
        summary[method] = {
            "median_step_seconds": median,
            "median_step_cpu_seconds": statistics.median(t for run in runs for t in run["step_cpu_seconds"]),
            "tokens_per_second": batch * seq / median,
            "peak_rss_bytes": statistics.median(run["peak_rss_bytes"] for run in runs),
            "optimizer_state_bytes": runs[0]["optimizer_state_bytes"],
            "trainable_parameters": runs[0]["trainable_parameters"],
            "predicted_trainable_parameters": runs[0]["predicted_trainable_parameters"],
            "adapter_bytes": runs[0].get("adapter_bytes"),
            "compact_bytes": runs[0].get("compact_bytes"),
            "repeat_medians": [run["median_step_seconds"] for run in runs],
        }
    return summary


def print_table(summary: dict[str, dict]) -> None:
    print("| method | median step (s) | median step CPU (s) | tokens/s | peak RSS (MiB) "
          "| optimizer state (bytes) | trainable params | adapter file (bytes) |")
    print("|---|---|---|---|---|---|---|---|")
    for method, row in summary.items():
        size = row["adapter_bytes"]
        if row["compact_bytes"]:
            size = f"{size} (compact {row['compact_bytes']})"
        print(
            f"| {method} | {row['median_step_seconds']:.3f} | {row['median_step_cpu_seconds']:.3f} "
            f"| {row['tokens_per_second']:.0f} "
            f"| {row['peak_rss_bytes'] / 2**20:.0f} | {row['optimizer_state_bytes']} "
            f"| {row['trainable_parameters']} | {size if size is not None else '-'} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats of 3 measured steps at seq 64")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved subprocess runs per method")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps per run")
    parser.add_argument("--steps", type=int, default=4, help="measured steps per run")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--basis", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        # One thread by default: on a shared machine, CPU time per step then measures
        # the work itself, while wall time also counts waiting for a core.
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
        print(json.dumps(run_worker(args.worker, args.basis, args.batch, args.seq, args.warmup, args.steps)))
        return
    if args.quick:
        args.repeats, args.steps, args.seq = 2, 3, 64

    basis_file = basis_path()
    results: dict[str, list[dict]] = {method: [] for method in METHODS}
    for repeat in range(args.repeats):
        for method in METHODS:
            results[method].append(run_method(method, basis_file, args))
            print(f"repeat {repeat + 1}/{args.repeats} {method}: "
                  f"{results[method][-1]['median_step_seconds']:.3f} s/step", file=sys.stderr)

    summary = summarise(results, args.batch, args.seq)
    for method in ("lora", "frozen", "trainable"):
        row = summary[method]
        assert row["trainable_parameters"] == row["predicted_trainable_parameters"], (method, row)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"batch {args.batch} x seq {args.seq}, {args.repeats} interleaved repeats x {args.steps} measured steps")
    print_table(summary)
    print(json.dumps(summary))
    lora, frozen = summary["lora"], summary["frozen"]
    print(f"frozen/lora_cpu_time={frozen['median_step_cpu_seconds'] / lora['median_step_cpu_seconds']:.3f}")
    print(
        f"train_step: frozen/lora_time={frozen['median_step_seconds'] / lora['median_step_seconds']:.3f} "
        f"frozen/lora_rss={frozen['peak_rss_bytes'] / lora['peak_rss_bytes']:.3f} "
        f"frozen/lora_params={frozen['trainable_parameters'] / lora['trainable_parameters']:.6f}"
    )


if __name__ == "__main__":
    main()
