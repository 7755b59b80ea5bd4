"""Sweeps the launch configuration of the chunked KDA forward's kernels on the GPU at hand, one
kernel at a time around kernels/chunk_kda_fwd.py's launch_config, at the benchmark shapes (bf16,
K = V = 128): the gate kernel's K tile and warps; the intra kernel's K tile, warps, stages and diagonal-block
precision; the solve kernel's tiles, warps and stages; the scan's V tile, warps and stages.
launch_config is chosen from these tables.

    KDA_OPS_COMMIT=$(git rev-parse HEAD) python bench/tune_chunk_kda_fwd.py [results.json [family ...]]

Naming families (of SWEEPS) sweeps only those.

Each configuration first passes the benchmark's correctness check (o within 0.005 relative RMS of
the fp32 chunked reference); then the forward is timed with triton.testing.do_bench (median).
"""

import dataclasses
import json
import os
import sys

import torch
import triton
from bench_chunk_kda import SHAPES, K, V, _forward_flops, _inputs
from common import rel_rms

from kda_ops.kernels.chunk_kda_fwd import DIAG_PRECISIONS, chunk_kda_fwd_triton, launch_config
from kda_ops.meta.chunk_kda import chunk_kda_fwd_reference

SWEEPS = dict(
    gate=[dict(gate_bk=bk, gate_warps=w) for bk in (16, 32, 64) for w in (2, 4, 8)],
    intra=[
        dict(intra_bk=bk, intra_warps=w, intra_stages=s, diag_precision=p)
        for bk in (16, 32) for w in (1, 2) for s in (2, 3) for p in DIAG_PRECISIONS
    ],
    solve=[
        dict(solve_bk=bk, solve_bv=bv, solve_warps=w, solve_stages=s)
        for bk in (16, 32, 64) for bv in (16, 32, 64) for w in (1, 2) for s in (1, 3)
    ],
    scan=[dict(scan_bv=bv, scan_warps=w, scan_stages=s) for bv in (16, 32, 64) for w in (4, 8) for s in (1, 2, 3)],
)


def time_config(x, ref, cfg) -> float | None:
    B, T, H, _ = x["q"].shape
    o = torch.full((B, T, H, V), float("nan"), device="cuda", dtype=torch.bfloat16)
    empty = torch.empty(0, device="cuda")

    def fwd():
        chunk_kda_fwd_triton(x["q"], x["k"], x["v"], x["g"], x["beta"], None, None, K**-0.5, False, o, empty, config=cfg)

    try:
        fwd()
    except Exception as error:  # a config that does not compile (shared memory) is reported, not fatal
        print(f"    {cfg}: {type(error).__name__}: {str(error)[:200]}")
        return None
    if not rel_rms(o, ref) <= 0.005:
        return None
    return triton.testing.do_bench(fwd, return_mode="median")


def main() -> None:
    results = []
    base = launch_config(K, V, torch.bfloat16)
    families = sys.argv[2:] or list(SWEEPS)
    for shape in SHAPES:
        B, T, H = shape.values
        x = _inputs(B, T, H)
        ref, _ = chunk_kda_fwd_reference(
            x["q"].float(), x["k"].float(), x["v"].float(), x["g"], x["beta"].float(), None, None, K**-0.5, False, False
        )
        print(f"\nB={B} T={T} H={H} K={K} V={V} ({torch.cuda.get_device_name()}), base {base}")
        for kernel in families:
            rows = []
            for choice in SWEEPS[kernel]:
                cfg = dataclasses.replace(base, **choice)
                ms = time_config(x, ref, cfg)
                rows.append((ms, choice))
                results.append(dict(B=B, T=T, H=H, K=K, V=V, kernel=kernel, **choice, ms=ms))
            for ms, choice in sorted(rows, key=lambda r: float("inf") if r[0] is None else r[0])[:6]:
                shown = "FAILED" if ms is None else f"{ms * 1e3:8.1f} us {_forward_flops(B, T, H) / (ms * 1e-3) / 1e12:5.1f} TFLOP/s"
                print(f"  {kernel} {choice}: {shown}")
        del x, ref
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
