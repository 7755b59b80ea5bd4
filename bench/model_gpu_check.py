"""GPU check of the Kimi-Linear model (small preset), for the device tool; exits non-zero on any
failed check:
- varlen prefill then decode steps give the logits of one forward over each whole sequence: a bar
  on the fp32 model; the bf16 model's figures are reported (a measure, not a bar: a bf16 rounding
  difference can flip an MoE top-k choice, and one flipped expert moves a token's logits by
  several percent);
- bf16 vs fp32 logits agreement (reported);
- 1,000 greedy decode steps as a manual CUDA graph equal eager, token for token;
- the compiled decode step (mode="reduce-overhead", fullgraph) runs with cudagraph_skips == 0,
  and its tokens are compared with eager (reported: Inductor's fusions may round differently).

    python bench/model_gpu_check.py [--steps 1000]
"""

import argparse
import sys

import torch
from torch._dynamo.utils import counters

from kda_ops import KimiLinearConfig, KimiLinearForCausalLM

PROMPT_LENGTHS = [37, 300, 5, 129]
PREFILL_DECODE_STEPS = 8
# fp32 relative error of logits between two evaluation orders: chunked vs recurrent KDA (tf32
# tensor-core products inside the chunked kernels), packed vs single-sequence attention
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


def check_prefill_decode(model, ref32, failures):
    seqs = [torch.randint(0, model.config.vocab_size, (n + PREFILL_DECODE_STEPS,), device="cuda") for n in PROMPT_LENGTHS]
    ref32.allocate_caches(len(PROMPT_LENGTHS), max(PROMPT_LENGTHS) + PREFILL_DECODE_STEPS)
    for i, (r16, r32) in enumerate(zip(prefill_decode_errors(model, seqs), prefill_decode_errors(ref32, seqs))):
        errors = {k: v for k, v in r32.items() if k != "forward"}
        print(f"seq {i} len {PROMPT_LENGTHS[i]}: fp32 " + ", ".join(f"{k} rel {v:.2e}" for k, v in errors.items())
              + "; bf16 " + ", ".join(f"{k} rel {v:.2e}" for k, v in r16.items() if k != "forward")
              + f"; bf16 forward vs fp32 rel {rel(r16['forward'], r32['forward']):.2e}")
        failures += [f"seq {i}: fp32 {k} {v:.2e} > {PREFILL_DECODE_BAR_FP32}" for k, v in errors.items()
                     if not v <= PREFILL_DECODE_BAR_FP32]


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
    model = KimiLinearForCausalLM(config, dtype=torch.bfloat16).init_weights(0).cuda().eval()
    ref32 = KimiLinearForCausalLM(config, dtype=torch.float32).init_weights(0).cuda().eval()
    model.allocate_caches(len(PROMPT_LENGTHS), max(PROMPT_LENGTHS) + args.steps + PREFILL_DECODE_STEPS)
    failures: list[str] = []
    check_prefill_decode(model, ref32, failures)
    check_generation(model, args.steps, failures)
    print("FAILED:\n  " + "\n  ".join(failures) if failures else "all model GPU checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
