"""GPU check of the Kimi-Linear model (small preset), for the device tool; exits non-zero on any
failed check:
- varlen prefill then decode steps give the logits of one forward over each whole sequence: a bar
  on the fp32 small preset with dense MLPs in every layer; the preset's own (MoE) figures in fp32
  and bf16 are reported, not barred: any rounding difference (the chunked kernels' tf32 products
  against the recurrent decode, bf16) can flip an MoE top-k choice, and one flipped expert moves
  a token's logits by several percent (on the H100 the fp32 MoE model's layers differ by ~1e-3
  before the MoE and up to 2e-2 after it);
- bf16 vs fp32 logits agreement (reported);
- 1,000 greedy decode steps as a manual CUDA graph equal eager, token for token;
- the compiled decode step (mode="reduce-overhead", fullgraph) runs with cudagraph_skips == 0,
  and its tokens are compared with eager (reported: Inductor's fusions may round differently).

    python bench/model_gpu_check.py [--steps 1000]
"""

import argparse
import dataclasses
import sys

import torch
from torch._dynamo.utils import counters

from kda_ops import KimiLinearConfig, KimiLinearForCausalLM

PROMPT_LENGTHS = [37, 300, 5, 129]
PREFILL_DECODE_STEPS = 8
# fp32 relative error of logits between two evaluation orders, dense model: chunked vs recurrent
# KDA (chunk_kda's fp32 error is ~1.1e-3 on the H100, its tf32 products), packed vs single-sequence
# attention
PREFILL_DECODE_BAR_FP32 = 5e-3


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.no_grad()
def prefill_decode_errors(model, seqs) -> list[dict]:
    """Per sequence: relative error of the varlen prefill's and of the decode steps' logits
    against one forward over the whole sequence, and that forward's logits."""
    slots = torch.arange(len(seqs), device="cuda")
    cu = torch.tensor([0] + PROMPT_LENGTHS, device="cuda").cumsum(0).to(torch.int32)
    model.reset_sequences(slots)
    pre = model.prefill(torch.cat([s[:n] for s, n in zip(seqs, PROMPT_LENGTHS)]), cu, slots, all_logits=True)
    steps = [model.decode_step(torch.stack([s[n + t] for s, n in zip(seqs, PROMPT_LENGTHS)]), slots)
             for t in range(PREFILL_DECODE_STEPS)]
    rows = []
    for i, (s, n) in enumerate(zip(seqs, PROMPT_LENGTHS)):
        full = model(s[None])[0]
        dec = torch.stack([st[i] for st in steps])
        rows.append({"prefill vs forward": rel(pre[cu[i]:cu[i + 1]], full[:n]), "decode vs forward": rel(dec, full[n:]), "forward": full})
    return rows


def check_prefill_decode(config, failures):
    seqs = [torch.randint(0, config.vocab_size, (n + PREFILL_DECODE_STEPS,), device="cuda") for n in PROMPT_LENGTHS]
    dense = dataclasses.replace(config, first_k_dense_replace=config.num_hidden_layers)
    results = {}
    for name, cfg, dtype in (("dense fp32", dense, torch.float32), ("fp32", config, torch.float32), ("bf16", config, torch.bfloat16)):
        model = KimiLinearForCausalLM(cfg, dtype=dtype).init_weights(0).cuda().eval()
        model.allocate_caches(len(PROMPT_LENGTHS), max(PROMPT_LENGTHS) + PREFILL_DECODE_STEPS)
        results[name] = prefill_decode_errors(model, seqs)
    for i in range(len(seqs)):
        print(f"seq {i} len {PROMPT_LENGTHS[i]}: " + "; ".join(
            name + " " + ", ".join(f"{k} rel {v:.2e}" for k, v in rows[i].items() if k != "forward")
            for name, rows in results.items())
            + f"; bf16 forward vs fp32 rel {rel(results['bf16'][i]['forward'], results['fp32'][i]['forward']):.2e}")
        failures += [f"seq {i}: dense fp32 {k} {v:.2e} > {PREFILL_DECODE_BAR_FP32}" for k, v in results["dense fp32"][i].items()
                     if k != "forward" and not v <= PREFILL_DECODE_BAR_FP32]


def check_generation(model, steps, failures):
    prompts = [torch.randint(0, model.config.vocab_size, (n,)).tolist() for n in PROMPT_LENGTHS]
    timings = {}
    eager = model.generate(prompts, steps, greedy=True, timings=timings)
    print("eager", timings)
    for mode in ("cuda_graph", "compiled"):
        counters.clear()
        model.generate(prompts, 4, greedy=True, decode=mode)
        timings = {}
        out = model.generate(prompts, steps, greedy=True, decode=mode, timings=timings)
        equal_rows = sum(a == b for a, b in zip(out, eager))
        first_diff = [next((t for t, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(out, eager)]
        skips = counters["inductor"]["cudagraph_skips"]
        print(f"{mode}: {timings}; sequences equal to eager {equal_rows}/{len(prompts)} (first differing step per row "
              f"{first_diff}); cudagraph_skips {skips}")
        if mode == "cuda_graph" and equal_rows != len(prompts):
            failures.append(f"cuda_graph decode differs from eager at steps {first_diff}")
        if skips:
            failures.append(f"{mode}: cudagraph_skips = {skips}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="greedy decode steps compared with eager")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = KimiLinearConfig.preset("small")
    failures: list[str] = []
    check_prefill_decode(config, failures)
    model = KimiLinearForCausalLM(config, dtype=torch.bfloat16).init_weights(0).cuda().eval()
    model.allocate_caches(len(PROMPT_LENGTHS), max(PROMPT_LENGTHS) + args.steps + PREFILL_DECODE_STEPS)
    check_generation(model, args.steps, failures)
    print("FAILED:\n  " + "\n  ".join(failures) if failures else "all model GPU checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
