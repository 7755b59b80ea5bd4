"""Sweeps the launch configuration of the mla_decode split kernel on the GPU at hand (heads per
program, BLOCK_N, warps, pipeline stages, programs per SM) in one process and writes
JSON; kernels/mla_decode.py's CONFIGS rows are the winners it prints.

    python bench/tune_mla_decode.py --out $OUT/mla_decode_tune.json [--heads 32,16] [--budget-s 230]

Shapes: those of bench_mla_decode.py (D_qk = 576, v_dim = 512, block size 64, bf16, full-length
sequences on permuted pages) at B in {1, 32, 128} x L in {4096, 32768}, not B = 1, L = 4096.
Per shape the inputs and the fp32 reference (kda::mla_decode_reference) are made once; each configuration
first passes the correctness check of bench_mla_decode.py (o within 0.005, lse within 0.001
relative RMS), then one step is captured in a CUDA graph and timed with triton.testing.do_bench
(median). GB/s = (cache rows read + q + o bytes) / time, as in bench_mla_decode.py. A
configuration that does not compile or does not fit (shared memory) is recorded with its error.
The winner per head count maximises the geometric mean of GB/s over the shapes, among the
configurations that passed every shape. Timing stops at --budget-s (compiles and all); the JSON
says which configurations were left out.
"""

import argparse
import dataclasses
import json
import math
import os
import time

import torch
import triton
from bench_mla_decode import BLOCK_SIZE, D_QK, SCALE, V_DIM, paged_inputs, reference
from common import capture_cuda_graph, rel_rms

from kda_ops.kernels.mla_decode import MLADecodeConfig, mla_decode_triton

SHAPES = [(1, 32768), (32, 4096), (32, 32768), (128, 4096), (128, 32768)]  # (B, L)


# (block_n, num_warps, num_stages, programs_per_sm), all heads in one program.
# Triton's pipeliner splits num_stages between the page-id load and the KV tile load it feeds:
# stages 2-4 leave the tile one buffer (its next load is issued after the dots read it and waited
# for at the top of the next iteration: no overlap), 5-6 give it two buffers, 7 three
# (bench/NOTES.md). Two programs per SM only where two fit in registers and shared memory
# (BLOCK_N 32 on 4 warps: 113 KB each). Lost before and not retried: 64 padded heads and 16 warps
# (`results/h100/mla_decode_alt_tiles_profile.json`).
CANDIDATES = [
    (64, 8, 5, 1),
    (64, 8, 3, 1),
    (32, 8, 5, 1),
    (32, 8, 7, 1),
    (32, 4, 5, 2),
    (32, 4, 7, 1),
    (16, 8, 7, 1),
]


def candidates(num_heads: int) -> list[MLADecodeConfig]:
    """CANDIDATES with all heads (padded to a power of two, at least 16) in one program."""
    block_h = max(16, triton.next_power_of_2(num_heads))
    return [MLADecodeConfig(block_h=block_h, block_n=n, num_warps=w, num_stages=s, programs_per_sm=p)
            for n, w, s, p in CANDIDATES]


def time_config(args, ref, cfg: MLADecodeConfig) -> tuple[float | None, str]:
    """(median ms of a CUDA-graph replay, "") or (None, why not)."""
    q = args[0]
    o = torch.full((q.shape[0], q.shape[1], V_DIM), float("nan"), dtype=q.dtype, device="cuda")
    lse = torch.full(q.shape[:2], float("nan"), device="cuda")

    def step():
        mla_decode_triton(*args, o, lse, SCALE, V_DIM, config=cfg)

    try:
        step()
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - out of shared memory, compile errors: recorded per config
        return None, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
    errors = {"o": rel_rms(o, ref[0]), "lse": rel_rms(lse, ref[1])}
    if not (errors["o"] <= 0.005 and errors["lse"] <= 0.001):
        return None, f"correctness: rel RMS {errors}"
    graph = capture_cuda_graph(step, warmup=1)
    return triton.testing.do_bench(graph.replay, return_mode="median"), ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--heads", default="32,16", help="head counts to tune, most important first")
    parser.add_argument("--budget-s", type=float, default=230.0, help="stop timing new configurations after this")
    args = parser.parse_args()
    start = time.perf_counter()
    results, winners, skipped = [], {}, []
    for H in map(int, args.heads.split(",")):
        configs = candidates(H)
        ms = {}  # (config, shape) -> ms or None
        broken = {}  # config -> the compile or launch error it raised once (not retried per shape)
        for B, L in SHAPES:
            shape_args = paged_inputs(H, B, L)
            ref = reference(*shape_args)
            total_bytes = (B * L * D_QK + B * H * D_QK + B * H * V_DIM) * 2
            print(f"\nH={H} B={B} L={L} ({torch.cuda.get_device_name()})", flush=True)
            for cfg in configs:
                if time.perf_counter() - start > args.budget_s:
                    skipped.append(dict(H=H, B=B, L=L, **dataclasses.asdict(cfg)))
                    continue
                t, error = (None, broken[cfg]) if cfg in broken else time_config(shape_args, ref, cfg)
                if t is None and not error.startswith("correctness"):
                    broken[cfg] = error
                ms[cfg, (B, L)] = t
                gbps = None if t is None else total_bytes / (t * 1e-3) / 1e9
                results.append(dict(H=H, B=B, L=L, D_qk=D_QK, D_v=V_DIM, block_size=BLOCK_SIZE, dtype="bfloat16",
                                    **dataclasses.asdict(cfg), ms=t, gbps=gbps, error=error))
                shown = error if t is None else f"{t * 1e3:8.1f} us {gbps:7.0f} GB/s"
                print(f"  {dataclasses.asdict(cfg)}: {shown}", flush=True)
            del shape_args, ref
            torch.cuda.empty_cache()
        scores = {}
        for cfg in configs:
            times = [ms.get((cfg, shape)) for shape in SHAPES]
            if all(t is not None for t in times):
                scores[cfg] = math.exp(-sum(math.log(t) for t in times) / len(times))  # geometric mean of 1/ms
        if scores:
            best = max(scores, key=scores.get)
            winners[H] = dataclasses.asdict(best)
            print(f"\nH={H} winner: {best}", flush=True)
    arch = torch.cuda.get_device_capability()
    machine = dict(gpu=torch.cuda.get_device_name(), arch=list(arch), torch=torch.__version__, triton=triton.__version__,
                   kda_ops_commit=os.environ.get("KDA_OPS_COMMIT", "unknown"), seconds=time.perf_counter() - start)
    with open(args.out, "w") as f:
        json.dump(dict(machine_info=machine, winners=winners, results=results, skipped=skipped), f, indent=1)
    print("\nCONFIGS rows for kernels/mla_decode.py:")
    for H, row in winners.items():
        print(f"    ({tuple(arch)}, torch.bfloat16, {H}, {D_QK}, {V_DIM}): MLADecodeConfig(" + ", ".join(f"{k}={v}" for k, v in row.items()) + "),")


if __name__ == "__main__":
    main()
