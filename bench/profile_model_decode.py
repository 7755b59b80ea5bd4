"""Where an eager decode step of the Kimi-Linear model spends its host time: torch.profiler over a
few eager steps of the small preset (bf16, batch 1, context 1024 declared in the caches), the ops
sorted by self CPU time, and the step's wall time against its GPU time; then cProfile over the same
steps, the Python functions sorted by cumulative time (where a custom op's host time goes).

    python bench/profile_model_decode.py [--steps 10] [--rows 30]
"""

import argparse
import cProfile
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

from kda_ops import KimiLinearConfig, KimiLinearForCausalLM

CONTEXT = 1024


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args(argv)
    model = KimiLinearForCausalLM(KimiLinearConfig.preset("small"), dtype=torch.bfloat16).init_weights(0).cuda().eval()
    model.allocate_caches(1, CONTEXT + 2 * args.steps + 8)
    slots = torch.arange(1, device="cuda")
    tokens = torch.zeros(1, dtype=torch.long, device="cuda")
    with torch.no_grad():
        model.reset_sequences(slots)
        model.seq_lens.fill_(CONTEXT)
        for _ in range(3):
            model.decode_step(tokens, slots)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            model.decode_step(tokens, slots)
        torch.cuda.synchronize()
        print(f"eager decode step: {(time.perf_counter() - start) / args.steps * 1e3:.2f} ms wall")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                model.decode_step(tokens, slots)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=70))
    with torch.no_grad(), cProfile.Profile() as python_profile:
        for _ in range(args.steps):
            model.decode_step(tokens, slots)
        torch.cuda.synchronize()
    pstats.Stats(python_profile).sort_stats("cumulative").print_stats(args.rows)


if __name__ == "__main__":
    main()
