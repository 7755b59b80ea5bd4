"""What a timing method adds to one kda::mla_decode step: do_bench (median, L2 flushed) of the
step launched directly, of a CUDA graph holding one step (what bench_mla_decode.py reports), and
of a graph holding 8 steps on distinct q and o (and distinct caches while 8 fit in 2 GB), / 8 —
the step's cost inside a larger graph such as a model's decode step. An empty Triton kernel,
direct and as a graph of one and of two, gives the floor of each method.

    python bench/probe_mla_graph_timing.py > bench/results/<gpu>/mla_decode_graph_probe.log
"""

import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))
from bench_mla_decode import D_QK, SCALE, V_DIM, paged_inputs  # noqa: E402
from common import capture_cuda_graph  # noqa: E402

from kda_ops.kernels.mla_decode import mla_decode_triton  # noqa: E402

SHAPES = [(32, 1, 32768), (16, 1, 32768), (16, 32, 4096), (16, 128, 4096), (32, 32, 4096), (32, 128, 4096),
          (32, 32, 32768), (32, 128, 32768)]  # (H, B, L)
STEPS_PER_GRAPH = 8
DISTINCT_CACHE_BYTES = 2**31


@triton.jit
def empty_kernel(x):
    tl.store(x + tl.program_id(0), 1.0)


def median_us(fn) -> float:
    return triton.testing.do_bench(fn, return_mode="median") * 1e3


def main():
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    buf = torch.zeros(16, device="cuda")

    def one():
        empty_kernel[(1,)](buf)

    def two():
        one()
        one()

    for name, fn in (("1 empty kernel", one), ("2 empty kernels", two)):
        print(f"{name}: direct {median_us(fn):.2f} us, graph replay {median_us(capture_cuda_graph(fn).replay):.2f} us")

    for H, B, L in SHAPES:
        cache_bytes = B * L * D_QK * 2
        distinct = cache_bytes * STEPS_PER_GRAPH <= DISTINCT_CACHE_BYTES
        first = paged_inputs(H, B, L)
        inputs = [first] + [
            paged_inputs(H, B, L) if distinct else (torch.randn_like(first[0]), *first[1:])
            for _ in range(STEPS_PER_GRAPH - 1)
        ]
        outs = [(torch.empty(B, H, V_DIM, dtype=torch.bfloat16, device="cuda"), torch.empty(B, H, device="cuda"))
                for _ in inputs]

        def step(i=0):
            mla_decode_triton(*inputs[i], *outs[i], SCALE, V_DIM)

        def steps():
            for i in range(STEPS_PER_GRAPH):
                step(i)

        row = dict(H=H, B=B, L=L, direct_us=median_us(step), graph_us=median_us(capture_cuda_graph(step).replay),
                   graph_per_step_of_8_us=median_us(capture_cuda_graph(steps).replay) / STEPS_PER_GRAPH,
                   distinct_caches=distinct)
        nbytes = cache_bytes + B * H * (D_QK + V_DIM) * 2
        row.update({k.replace("_us", "_tbps"): nbytes / (row[k] * 1e-6) / 1e12
                    for k in ("direct_us", "graph_us", "graph_per_step_of_8_us")})
        print(json.dumps(row), flush=True)
        del inputs, outs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
