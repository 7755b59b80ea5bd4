"""Sweeps the launch configuration of the kda_decode kernel (V-tile width, warps, pipeline stages)
on the GPU at hand and prints one table per shape; kernels/kda_decode.py's kda_decode_config is
chosen from these tables.

    KDA_OPS_COMMIT=$(git rev-parse HEAD) python bench/tune_kda_decode.py [results.json]

Each configuration first passes a correctness check (o and state within 0.005 relative RMS of
meta's reference on the same inputs); then one decode step is captured in a CUDA graph and timed
with triton.testing.do_bench (median). GB/s = state bytes read + written / time.
"""

import itertools
import json
import os
import sys

import torch
import triton
from common import capture_cuda_graph, rel_rms

from kda_ops.kernels.kda_decode import DecodeConfig, kda_decode_fwd
from kda_ops.meta.kda_decode import kda_decode_reference

H = 32
SHAPES = [  # (B, T, K, V)
    (1, 1, 128, 128),
    (8, 1, 128, 128),
    (64, 1, 128, 128),
    (256, 1, 128, 128),
    (64, 4, 128, 128),
    (64, 1, 64, 64),
    (64, 1, 256, 256),
]
BV_CHOICES = (8, 16, 32, 64)
WARP_CHOICES = (1, 2, 4, 8)
STAGE_CHOICES = (1, 2)



def inputs(B, T, K, V):
    q = torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, device="cuda"))
    beta = torch.rand(B, T, H, device="cuda", dtype=torch.bfloat16)
    pool = torch.randn(B, H, K, V, device="cuda") * 0.1
    slots = torch.randperm(B, device="cuda").to(torch.int32)
    return q, k, v, g, beta, pool, slots


def time_config(B, T, K, V, cfg: DecodeConfig) -> float | None:
    q, k, v, g, beta, pool, slots = inputs(B, T, K, V)
    o = torch.empty(B, T, H, V, device="cuda", dtype=torch.bfloat16)
    ref_pool = pool.clone()
    o_ref = kda_decode_reference(q, k, v, g, beta, ref_pool, slots, K**-0.5, True)

    def step():
        kda_decode_fwd(q, k, v, g, beta, pool, slots, o, K**-0.5, True, config=cfg)

    step()
    if max(rel_rms(o, o_ref), rel_rms(pool, ref_pool)) > 0.005:
        return None
    graph = capture_cuda_graph(step, warmup=1)
    return triton.testing.do_bench(graph.replay, return_mode="median")


def main() -> None:
    results = []
    for B, T, K, V in SHAPES:
        state_bytes = 2 * B * H * K * V * 4
        rows = []
        for BV, warps, stages in itertools.product(BV_CHOICES, WARP_CHOICES, STAGE_CHOICES):
            if BV > V or triton.next_power_of_2(K) * BV // (32 * warps) > 128:  # > 128 state values a thread
                continue
            cfg = DecodeConfig(BK=triton.next_power_of_2(K), BV=BV, num_warps=warps, num_stages=stages)
            ms = time_config(B, T, K, V, cfg)
            rows.append((ms, cfg))
            results.append(dict(B=B, T=T, H=H, K=K, V=V, BV=BV, num_warps=warps, num_stages=stages, ms=ms,
                                gbps=None if ms is None else state_bytes / (ms * 1e-3) / 1e9))
        print(f"\nB={B} T={T} H={H} K={K} V={V} ({torch.cuda.get_device_name()})")
        for ms, cfg in sorted(rows, key=lambda r: float("inf") if r[0] is None else r[0])[:8]:
            shown = "FAILED correctness" if ms is None else f"{ms * 1e3:8.1f} us {state_bytes / (ms * 1e-3) / 1e9:7.0f} GB/s"
            print(f"  BV={cfg.BV:3d} warps={cfg.num_warps} stages={cfg.num_stages}: {shown}")
    if len(sys.argv) > 1:
        machine = dict(
            gpu=torch.cuda.get_device_name(),
            torch=torch.__version__,
            triton=triton.__version__,
            kda_ops_commit=os.environ.get("KDA_OPS_COMMIT", "unknown"),
        )
        with open(sys.argv[1], "w") as f:
            json.dump(dict(machine_info=machine, results=results), f, indent=1)


if __name__ == "__main__":
    main()
