"""``cora evaluate``: generate on held-out examples and score a trained run or a base model.

Writes ``predictions.jsonl`` (task_id, prompt, prediction, reference, and test
outcomes with ``--execute``) and ``metrics.json`` (metrics, number of examples,
settings, seconds) into the output folder, by default ``RUN_DIR/eval/<data name>/``
(``RUN_DIR/eval/<data name>/base/`` with ``--base-model``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cora.data import TEMPLATES
from cora.metrics import METRICS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="generate on held-out examples and compute ROUGE, METEOR, SacreBLEU, BERTScore (and pass@k)",
        description=(
            "Evaluate a trained run (RUN_DIR) or a base model without adapter (--base-model). Examples: without "
            "--data, the held-out split of the run's training data; with --data equal to the run's training file, "
            "its held-out split; with any other --data, all of its rows."
        ),
    )
    parser.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="run folder written by `cora train`")
    parser.add_argument(
        "--base-model",
        metavar="MODEL",
        help="evaluate this model without adapter (Hub id, folder, .gguf or smollm2); with RUN_DIR, "
        "on the run's examples and template",
    )

    parser.add_argument("--data", help="data file or Hub dataset id (default: the run's training data)")
    parser.add_argument("--split", default="train", help="Hub dataset split of --data (default: train)")
    parser.add_argument("--template", choices=TEMPLATES, help="prompt template (default: the run's, else alpaca)")
    parser.add_argument("--max-examples", type=int, help="score only the first N selected examples")
    parser.add_argument("--max-new-tokens", type=int, help="tokens generated per example (default: the run's, else 256)")
    parser.add_argument("--batch-size", type=int, help="prompts per generation batch (default: the run's, else 8)")

    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=list(METRICS), help="text metrics to compute")
    parser.add_argument("--no-metrics", action="store_true", help="skip text metrics (with --execute: pass@k only)")
    parser.add_argument(
        "--no-response-loss", action="store_true", help="skip the references' NLL per token (response_nll)"
    )
    parser.add_argument("--bertscore-model", help="local model folder for BERTScore (default: bundled all-MiniLM-L6-v2)")
    parser.add_argument("--bertscore-layers", type=int, help="BERTScore layer; required with --bertscore-model")

    parser.add_argument("--execute", action="store_true", help="run code tests in the sandbox and report pass@k")
    parser.add_argument("--samples", type=int, default=1, help="completions per example; above 1 samples them")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature with --samples > 1")
    parser.add_argument("--pass-k", type=int, nargs="+", default=[1], help="k values of pass@k (each <= --samples)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per sandboxed program")

    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("-o", "--output", help="output folder (default: RUN_DIR/eval/<data name>)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from cora.evaluation import EvaluationConfig, data_name, evaluate_model, select_examples
    from cora.execution import ExecutionConfig
    from cora.generation import GenerationConfig
    from cora.metrics import MetricsConfig

    if args.run_dir is None and args.base_model is None:
        raise ValueError("nothing to evaluate: pass a run folder (RUN_DIR) or --base-model MODEL")
    if args.run_dir is None and args.data is None:
        raise ValueError("--base-model without RUN_DIR needs --data")
    if args.run_dir is None and args.output is None:
        raise ValueError("--base-model without RUN_DIR needs an output folder (-o)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    model, tokenizer, run_config = _load(args, device)
    evaluation = run_config.evaluation if run_config is not None else None
    template = args.template or (run_config.template if run_config is not None else "alpaca")
    max_examples = args.max_examples or (evaluation.eval_size if evaluation is not None else None)
    examples, selection = select_examples(
        args.data, run_config.data if run_config is not None else None, args.split, max_examples
    )

    generation = GenerationConfig(
        max_new_tokens=args.max_new_tokens or (evaluation.max_new_tokens if evaluation else 256),
        batch_size=args.batch_size or (evaluation.batch_size if evaluation else 8),
        do_sample=args.samples > 1,
        temperature=args.temperature,
        num_return_sequences=args.samples,
    )
    metrics = None
    if not args.no_metrics:
        metrics = MetricsConfig(
            metrics=tuple(args.metrics),
            bertscore_model=args.bertscore_model,
            bertscore_num_layers=args.bertscore_layers,
            device=device,
        )
    config = EvaluationConfig(
        generation=generation,
        metrics=metrics,
        execute=args.execute,
        pass_k=tuple(args.pass_k),
        execution=ExecutionConfig(timeout_s=args.timeout),
        response_loss=not args.no_response_loss,
    )
    result = evaluate_model(model, tokenizer, examples, template, config)

    data = args.data or run_config.data.path
    out_dir = Path(args.output) if args.output else _default_output(args, data_name(data))
    context = {
        "model": args.base_model or run_config.model,
        "adapter": args.base_model is None,
        "run_dir": args.run_dir,
        "data": data,
        "selection": selection,
    }
    predictions_path, metrics_path = result.write(out_dir, context)

    print(f"{result.num_examples} examples ({selection}), {result.seconds:.1f} s")
    for name, value in result.metrics.items():
        print(f"  {name:14s} {value:.4f}")
    print(f"wrote {predictions_path} and {metrics_path}")
    return 0


def _load(args: argparse.Namespace, device: str):
    if args.base_model is not None:
        from cora.models import load_base_model
        from cora.runs import load_run_config

        run_config = load_run_config(args.run_dir) if args.run_dir is not None else None
        model, tokenizer = load_base_model(args.base_model, device=device)
        model.eval()
        return model, tokenizer, run_config

    from cora.runs import load_trained_model

    return load_trained_model(args.run_dir, device=device)


def _default_output(args: argparse.Namespace, name: str) -> Path:
    out = Path(args.run_dir) / "eval" / name
    return out / "base" if args.base_model is not None else out
