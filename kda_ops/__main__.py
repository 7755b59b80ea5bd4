"""Command line: `python -m kda_ops demo` builds (or loads) a Kimi-Linear model, generates from a
few prompts of different lengths and reports prefill and decode throughput for each decode mode."""

import argparse
import sys
import time

import torch

from .config import KimiLinearConfig
from .export import add_export_arguments, run_export_command
from .model import KimiLinearForCausalLM

DEMO_PROMPT_LENGTHS = (5, 17, 40, 64)


def _say(message: str) -> None:
    print(message, flush=True)


def _build_model(args, device: torch.device) -> KimiLinearForCausalLM:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.checkpoint:
        _say(f"loading checkpoint {args.checkpoint} ...")
        return KimiLinearForCausalLM.from_pretrained(args.checkpoint, dtype=dtype, device=device).eval()
    config_name = args.config or ("small" if device.type == "cuda" else "micro")
    config = KimiLinearConfig.preset(config_name)
    _say(f"building the '{config_name}' preset with random weights ({dtype}, {device})")
    model = KimiLinearForCausalLM(config, dtype=dtype).init_weights(args.seed)
    return model.to(device).eval()


def _describe(model: KimiLinearForCausalLM) -> None:
    c = model.config
    params = sum(p.numel() for p in model.parameters())
    _say(
        f"  {c.num_hidden_layers} layers (KDA {c.kda_layers}, MLA {c.full_attn_layers}), hidden {c.hidden_size}, "
        f"vocab {c.vocab_size}, {c.num_experts} experts top-{c.num_experts_per_token}; {params / 1e6:.2f}M parameters"
    )


def _run_mode(model, prompts, args, mode: str, backend: str) -> tuple[list[list[int]], dict]:
    options = dict(greedy=True, decode=mode, compile_backend=backend, compile_prefill=args.compile_prefill and mode != "eager")
    what = {
        "eager": "warming up (first calls of the ops)",
        "compiled": f"compiling the decode step (torch.compile fullgraph, backend {backend})",
        "cuda_graph": "capturing a CUDA graph of the decode step",
    }[mode]
    _say(f"[{mode}] {what} ...")
    start = time.perf_counter()
    model.generate(prompts, 3, **options)
    _say(f"[{mode}] ready after {time.perf_counter() - start:.1f} s")
    timings: dict = {}
    tokens = model.generate(prompts, args.max_new_tokens, timings=timings, **options)
    return tokens, timings


def demo(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        _say("--device cuda requested but no CUDA device is available")
        return 2
    model = _build_model(args, device)
    _describe(model)
    generator = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in DEMO_PROMPT_LENGTHS]
    _say(f"prompts of lengths {list(DEMO_PROMPT_LENGTHS)}, {args.max_new_tokens} new tokens each, greedy")
    modes = ["eager", "compiled"] + (["cuda_graph"] if device.type == "cuda" else [])
    backend = args.compile_backend or ("inductor" if device.type == "cuda" else "aot_eager")
    reference = None
    rows = []
    failed = False
    for mode in modes:
        try:
            tokens, t = _run_mode(model, prompts, args, mode, backend)
        except Exception as error:  # report the failing mode, still measure the others
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            rows.append(f"{mode:<12}failed: {type(error).__name__}: {first_line[:200]}")
            failed = True
            continue
        reference = reference or tokens
        steps = max(t["decode_steps"], 1)
        rows.append(
            f"{mode:<12}{t['prefill_tokens'] / t['prefill_s']:>15.0f}{t['decode_tokens'] / t['decode_s']:>15.0f}"
            f"{1e3 * t['decode_s'] / steps:>10.2f}  {_agreement(tokens, reference)}"
        )
    _say("")
    _say(f"{'mode':<12}{'prefill tok/s':>15}{'decode tok/s':>15}{'ms/step':>10}  same tokens as eager")
    for row in rows:
        _say(row)
    _say("")
    if any("from new token" in row for row in rows):
        _say(
            "(greedy paths part where the compiled step's fused kernels round differently from eager and two "
            "candidate tokens are near a tie, as they often are with random weights in bf16)"
        )
    if reference is not None:
        _say(f"first prompt's continuation: {reference[0][:16]}{' ...' if len(reference[0]) > 16 else ''}")
    return 1 if failed else 0


def _agreement(tokens: list[list[int]], reference: list[list[int]]) -> str:
    """'yes', or from which new token (0-based, earliest over the prompts) the tokens differ."""
    first = [next((i for i, (a, b) in enumerate(zip(row, ref)) if a != b), None) for row, ref in zip(tokens, reference)]
    differing = [i for i in first if i is not None]
    return f"no: from new token {min(differing)}" if differing else "yes"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kda_ops", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    d = commands.add_parser("demo", help="generate with a Kimi-Linear model and report tokens/s")
    d.add_argument("--config", choices=["micro", "small"], help="preset (default: small on CUDA, micro on CPU)")
    d.add_argument("--checkpoint", help="directory with config.json and safetensors weights")
    d.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    d.add_argument("--max-new-tokens", type=int, default=32)
    d.add_argument("--compile-backend", help="torch.compile backend (default: inductor on CUDA, aot_eager on CPU)")
    d.add_argument("--compile-prefill", action="store_true", help="also compile the prefill (dynamic token count)")
    d.add_argument("--seed", type=int, default=0)
    e = commands.add_parser("export", help="write torch.export programs and AOTInductor packages for deployment")
    add_export_arguments(e)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo(args)
    if args.command == "export":
        return run_export_command(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
