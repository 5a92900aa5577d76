"""``cora extract``: write a common basis file from several source models."""

from __future__ import annotations

import argparse
from pathlib import Path

from cora.decompose import METHODS, RandomizedOptions
from cora.extract import NORMALIZATIONS, ExtractConfig, extract_basis


def parse_layers(text: str) -> tuple[int, ...]:
    """Parse ``0-3,7`` into ``(0, 1, 2, 3, 7)``."""
    layers: list[int] = []
    try:
        for part in text.split(","):
            start, _, end = part.partition("-")
            layers.extend(range(int(start), int(end or start) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid layer list {text!r}; expected e.g. 0-3,7") from None
    return tuple(layers)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "extract",
        help="extract a common q/k/v basis from source models",
        description="Read the q/k/v attention weights of each MODEL layer by layer and write the top-r "
        "singular vectors of their concatenation to a basis file.",
    )
    parser.add_argument("models", nargs="+", metavar="MODEL",
                        help="Hub id (optionally id@revision), checkpoint directory, .gguf file or smollm2")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", "-r", type=int, help="basis columns r")
    size.add_argument("--energy", type=float, metavar="FRACTION",
                      help="choose the smallest rank that captures this energy fraction in every layer")
    parser.add_argument("--side", choices=("output", "input"), default="output",
                        help="output: basis becomes lora_B (out, r); input: lora_A = basis.T (default: output)")
    parser.add_argument("--group", choices=("qkv", "module"), default="qkv",
                        help="qkv: one basis per layer shared by q, k, v; module: one per projection (default: qkv)")
    parser.add_argument("--method", choices=METHODS, default="auto", help="decomposition (default: auto)")
    parser.add_argument("--layers", type=parse_layers, help="layer indices to extract, e.g. 0-3,7 (default: all)")
    parser.add_argument("--normalize", choices=NORMALIZATIONS, default="none",
                        help="frobenius: scale each source to unit norm per layer and target (default: none)")
    parser.add_argument("--center", action="store_true", help="subtract the mean column first (PCA)")
    parser.add_argument("--base-model", help="decompose the differences W_source - W_base from this model")
    parser.add_argument("--scale-by-singular-values", action="store_true",
                        help="store U_r * S_r instead of orthonormal columns")
    parser.add_argument("--q-name", help="q module name relative to a layer, for unlisted architectures")
    parser.add_argument("--k-name", help="k module name relative to a layer")
    parser.add_argument("--v-name", help="v module name relative to a layer")
    parser.add_argument("--power-iterations", type=int, default=RandomizedOptions.max_power_iterations,
                        help="maximum power iterations of the randomized method")
    parser.add_argument("--seed", type=int, default=0, help="seed of the randomized method")
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="BASIS",
                        help="basis file to write (.safetensors)")
    parser.add_argument("--overwrite", action="store_true", help="replace the basis file if it exists")
    parser.set_defaults(func=run)


def check_output(path: Path, overwrite: bool) -> None:
    """Reject an existing basis file unless ``overwrite`` is set; called before any extraction work."""
    if path.is_dir():
        raise ValueError(f"output {path} is a folder; pass a file name such as {path / 'basis.safetensors'}")
    if path.exists() and not overwrite:
        raise ValueError(f"output {path} already exists; pass --overwrite to replace it")


def run(args: argparse.Namespace) -> int:
    check_output(args.output, args.overwrite)
    names = (args.q_name, args.k_name, args.v_name)
    if any(names) and not all(names):
        raise ValueError("give all three of --q-name, --k-name and --v-name, or none")
    config = ExtractConfig(
        models=tuple(args.models),
        rank=args.rank,
        energy_threshold=args.energy,
        side=args.side,
        group=args.group,
        method=args.method,
        layers=args.layers,
        normalize=args.normalize,
        center=args.center,
        base_model=args.base_model,
        scale_by_singular_values=args.scale_by_singular_values,
        module_names=names if all(names) else None,
        randomized=RandomizedOptions(
            max_power_iterations=args.power_iterations,
            min_power_iterations=min(RandomizedOptions.min_power_iterations, args.power_iterations),
            seed=args.seed,
        ),
    )
    basis = extract_basis(config)
    path = basis.save(args.output)
    energies = list(basis.metadata.energy.values())
    print(
        f"wrote {path}: rank {basis.rank}, {len(basis.metadata.layers)} layers, side {basis.metadata.side}, "
        f"group {basis.metadata.group}, method {basis.metadata.method}, "
        f"captured energy min {min(energies):.4f} mean {sum(energies) / len(energies):.4f}"
    )
    return 0
