"""Trains a small Kimi-Linear model (default: 2 KDA layers, 2 heads of dim 128, dense MLPs) on one
synthetic task and writes its curves: <out>/<task>_T<len>_<gate>_<layers>_seed<seed>.json, and a
PNG beside it when matplotlib is installed.

The forward + loss is compiled with torch.compile(fullgraph=True) (backend --compile), under bf16
autocast over fp32 weights (--dtype bf16); AdamW with linear warmup and cosine decay. Held-out
accuracy is measured at the training length and at twice it (extrapolation).

Example (repository root):
  python bench/synthetic/train.py --task mqar --seq-len 256 --steps 2000 --gate channel \\
      --out bench/results/h100/synthetic

The JSON holds the arguments, the task's settings, the model config and parameter count, the
machine (GPU, torch, triton, commit) and the record of kda_ops.synthetic.training.train (curve,
steps_to_converge, train_seconds, first_step_seconds, step_ms).
"""

import argparse
import dataclasses
import json
import os
import subprocess

import torch
import triton

from plot_curves import plot_runs
from kda_ops.synthetic.models import GATE_KINDS, LAYER_KINDS, synthetic_config, synthetic_model
from kda_ops.synthetic.tasks import MultiQueryAssociativeRecall, Palindrome, Stack
from kda_ops.synthetic.training import Task, TrainingSettings, train

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp32": None}
TASK_NAMES = ("palindrome", "mqar", "stack")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASK_NAMES, required=True)
    parser.add_argument("--seq-len", type=int, default=256, help="training length (even); also evaluated at 2x")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--warmup-fraction", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-batches", type=int, default=4, help="held-out batches per eval length")
    parser.add_argument("--seed", type=int, default=0, help="weights, training batches and held-out batches")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(AUTOCAST_DTYPES), default="bf16", help="bf16: autocast over fp32 weights")
    parser.add_argument("--compile", choices=("inductor", "aot_eager", "none"), default="inductor")
    parser.add_argument("--gate", choices=GATE_KINDS, default="channel", help="channel: KDA; head: scalar gate (GDN)")
    parser.add_argument("--layers", default="kda,kda", help=f"comma-separated layer kinds among {LAYER_KINDS}")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument(
        "--vocab-size", type=int, default=512, help="model vocabulary (>= the task's); one size for all tasks by default"
    )
    parser.add_argument("--palindrome-alphabet", type=int, default=64)
    parser.add_argument("--mqar-pairs", type=int, default=None, help="key-value pairs (default: seq-len / 8)")
    parser.add_argument("--mqar-keys", type=int, default=256)
    parser.add_argument("--mqar-values", type=int, default=256)
    parser.add_argument("--stacks", type=int, default=64)
    parser.add_argument("--stack-values", type=int, default=384)
    parser.add_argument("--out", required=True, help="folder for the JSON (and PNG)")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    return parser.parse_args(argv)


def make_task(args: argparse.Namespace) -> Task:
    if args.task == "palindrome":
        return Palindrome(args.palindrome_alphabet)
    if args.task == "mqar":
        pairs = args.seq_len // 8 if args.mqar_pairs is None else args.mqar_pairs
        return MultiQueryAssociativeRecall(pairs, args.mqar_keys, args.mqar_values)
    return Stack(args.stacks, args.stack_values)


def machine_record(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        # Runs on a machine without the .git folder set KDA_OPS_COMMIT.
        "kda_ops_commit": os.environ.get("KDA_OPS_COMMIT", commit),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    task = make_task(args)
    if args.vocab_size < task.vocab_size:
        raise SystemExit(f"train: --vocab-size {args.vocab_size} is smaller than the {task.name} vocabulary ({task.vocab_size})")
    layers = tuple(args.layers.split(","))
    config = synthetic_config(args.vocab_size, layers, args.heads, args.head_dim)
    model = synthetic_model(config, args.gate, args.seed)
    settings = TrainingSettings(
        seq_len=args.seq_len,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_fraction=args.warmup_fraction,
        weight_decay=args.weight_decay,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        seed=args.seed,
        device=args.device,
        autocast_dtype=AUTOCAST_DTYPES[args.dtype],
        compile_backend=None if args.compile == "none" else args.compile,
    )
    eval_lengths = (args.seq_len, 2 * args.seq_len)
    record = train(task, model, settings, eval_lengths)
    result = {
        "task": task.name,
        "task_settings": dataclasses.asdict(task),
        "seq_len": args.seq_len,
        "eval_lengths": list(eval_lengths),
        "gate": args.gate,
        "layers": list(layers),
        "parameters": sum(p.numel() for p in model.parameters()),
        "args": vars(args),
        "config": config.to_dict(),
        "machine": machine_record(torch.device(args.device)),
        **record,
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{task.name}_T{args.seq_len}_{args.gate}_{'-'.join(layers)}_seed{args.seed}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    plotted = not args.no_plot and plot_runs([result], stem + ".png")
    final = record["curve"][-1]["eval"]
    accuracies = ", ".join(f"T={length}: {final[str(length)]['accuracy']:.4f}" for length in eval_lengths)
    print(
        f"{task.name} T={args.seq_len} gate={args.gate} layers={args.layers}: accuracy {accuracies}; "
        f"converged at step {record['steps_to_converge']}; {record['train_seconds']:.1f} s training "
        f"({record['first_step_seconds']:.1f} s first step, {record['step_ms'] or 0:.2f} ms/step); "
        f"wrote {stem}.json{' and .png' if plotted else ''}"
    )


if __name__ == "__main__":
    main()
