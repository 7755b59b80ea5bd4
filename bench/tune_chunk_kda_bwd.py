"""Sweeps the launch configuration of the chunked KDA backward around kernels/chunk_kda_bwd.py's
launch_config, one family at a time, on the GPU at hand, at the issue's benchmark shapes (bf16,
K = V = 128): the intra kernel's K and V tiles, warps and stages (the largest kernel of forward +
backward there), the wy kernel's V tile, warps and stages, the prep kernel's tiles and warps, and
the two scans' V tile, warps and stages. launch_config is chosen from these tables.

    KDA_OPS_COMMIT=$(git rev-parse HEAD) python bench/tune_chunk_kda_bwd.py [results.json [family ...]]

Naming families (of SWEEPS) sweeps only those.

The backward runs from the forward's residuals, as under autograd. Each configuration's
gradients must match the launch_config run's within 2e-3 relative RMS (the roundings of bf16
outputs summed in another order; the bars against the fp32 truth are 8e-3 and 2e-2), then
chunk_kda_bwd_triton is timed with triton.testing.do_bench (median) and the swept kernels alone
with the profiler (mean CUDA time).
"""

import dataclasses
import json
import os
import sys

import torch
import triton
from bench_chunk_kda import GRAD_NAMES, K, V, _inputs
from common import kernel_times, rel_rms

from kda_ops.kernels.chunk_kda_bwd import chunk_kda_bwd_triton, launch_config
from kda_ops.meta.chunk_kda import RESIDUAL_NAMES, chunk_kda_bwd_meta

SHAPES = [(1, 8192, 16), (8, 4096, 32), (1, 32768, 32)]  # (B, T, H): issue #4's benchmark shapes
SWEEPS = {  # family: (its kernels, its choices)
    "intra": (("chunk_kda_bwd_intra_kernel", "chunk_kda_bwd_finish_kernel"), [
        dict(intra_bk=bk, intra_bv=bv, intra_warps=w, intra_stages=st)
        for bk, bv, w, st in ((32, 32, 2, 2), (32, 32, 2, 1), (32, 32, 4, 2), (32, 32, 1, 2), (16, 16, 2, 1),
                              (16, 32, 2, 2), (64, 32, 4, 1), (64, 32, 2, 2), (32, 32, 1, 1), (32, 32, 1, 3),
                              (32, 16, 1, 2), (32, 64, 1, 2), (16, 32, 1, 2), (64, 32, 1, 2), (64, 64, 1, 2),
                              (64, 64, 2, 2))
    ]),
    "wy": (("chunk_kda_bwd_wy_kernel",), [
        dict(wy_bv=bv, wy_warps=w, wy_stages=st)
        for bv, w, st in ((32, 8, 3), (32, 8, 1), (32, 8, 2), (32, 4, 3), (32, 4, 1), (64, 8, 3), (64, 8, 1), (16, 4, 2),
                          (16, 8, 3))
    ]),
    "prep": (("chunk_kda_bwd_prep_kernel",), [
        dict(prep_bk=bk, prep_bv=bv, prep_warps=w)
        for bk, bv, w in ((32, 32, 4), (64, 32, 4), (32, 64, 4), (64, 64, 8), (32, 32, 8), (16, 32, 4), (64, 64, 4),
                          (32, 32, 2))
    ]),
    "scans": (("chunk_kda_bwd_state_kernel", "chunk_kda_bwd_dstate_kernel"), [
        dict(scan_bv=bv, scan_warps=w, scan_stages=st)
        for bv, w, st in ((16, 4, 2), (16, 4, 1), (32, 4, 2), (32, 4, 1), (32, 8, 2), (64, 4, 1), (64, 8, 1))
    ]),
}
SAME_BAR = 2e-3


def backward_of(x, cfg):
    """(run, grads): a closure running the backward from the forward's residuals into grads."""
    args = (x["q"], x["k"], x["v"], x["g"], x["beta"], None, None)
    residuals = torch.ops.kda.chunk_kda_fwd(*args, K**-0.5, False, False, True)[2:]
    full = (*args, x["do"], None, K**-0.5, False)
    grads = chunk_kda_bwd_meta(*full)

    def run():
        chunk_kda_bwd_triton(*full, *grads, residuals=dict(zip(RESIDUAL_NAMES, residuals)), config=cfg)

    return run, grads


def main() -> None:
    results = []
    families = sys.argv[2:] or list(SWEEPS)
    base = launch_config(K, V, torch.bfloat16)
    for B, T, H in SHAPES:
        x = _inputs(B, T, H)
        run, expected = backward_of(x, base)
        run()
        expected = [g.clone() for g in expected]
        print(f"\nB={B} T={T} H={H} K={K} V={V} ({torch.cuda.get_device_name()}), base {base}")
        for family in families:
            kernels, choices = SWEEPS[family]
            for choice in choices:
                cfg = dataclasses.replace(base, **choice)
                run, grads = backward_of(x, cfg)
                try:
                    run()
                except Exception as error:  # a config that does not compile (shared memory) is reported, not fatal
                    print(f"  {family} {choice}: {type(error).__name__}: {str(error)[:200]}")
                    continue
                diff = {n: rel_rms(g, e) for n, g, e in zip(GRAD_NAMES, grads, expected)}
                same = all(d <= SAME_BAR for d in diff.values())
                ms = triton.testing.do_bench(run, return_mode="median") if same else None
                times = kernel_times(run, 5) if same else {}
                kernel_us = {name: times.get(name) for name in kernels}
                results.append(dict(B=B, T=T, H=H, K=K, V=V, family=family, **choice, ms=ms, kernel_us=kernel_us,
                                    rel_rms_vs_base=diff))
                swept = ", ".join(f"{name.removeprefix('chunk_kda_bwd_')} {us:8.1f} us" for name, us in kernel_us.items()) if same else ""
                shown = f"backward {ms * 1e3:8.1f} us, {swept}" if same else f"MISMATCH {diff}"
                print(f"  {family} {choice}: {shown}", flush=True)
        del x, run, grads, expected
        torch.cuda.empty_cache()
    if len(sys.argv) > 1:
        machine = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       kda_ops_commit=os.environ.get("KDA_OPS_COMMIT", "unknown"))
        with open(sys.argv[1], "w") as f:
            json.dump(dict(machine_info=machine, results=results), f, indent=1)


if __name__ == "__main__":
    main()
