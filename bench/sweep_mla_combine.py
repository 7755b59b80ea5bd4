"""Times mla_decode_combine_kernel alone, on the partials of a real split-kernel run, over its tile
[BLOCK_S partials (BLOCK_S_TALL when a sequence has more than BLOCK_S), BLOCK_VC value columns],
num_warps and num_stages: the evidence behind the combine's fixed launch in kernels/mla_decode.py
(bench/NOTES.md, "kda::mla_decode"). BLOCK_S_TALL = BLOCK_S is a fixed step height.

    python bench/sweep_mla_combine.py > bench/results/<gpu>/mla_combine_sweep.log

Shapes: bench_mla_decode.py's inputs at the (H, B, L) below. Per shape one mla_decode_triton call
runs with its launches recorded; the combine launch is then repeated with each tile (grid
(B, H, cdiv(V, BLOCK_VC))), checked against the first call's o, and timed with
triton.testing.do_bench (median, L2 flushed: the partials come from DRAM, where in a decode step
they are still in L2, so absolute times run high; the comparison between tiles is what counts).
"""

import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parent))
from bench_mla_decode import SCALE, V_DIM, paged_inputs  # noqa: E402

from kda_ops.kernels.mla_decode import mla_decode_triton  # noqa: E402

SHAPES = [(32, 1, 32768), (32, 1, 4096), (32, 32, 4096), (32, 128, 4096), (16, 1, 32768), (16, 128, 4096)]  # (H, B, L)
TILES = [  # (BLOCK_S, BLOCK_S_TALL, BLOCK_VC, num_warps, num_stages)
    (8, 8, 512, 4, 3), (16, 16, 512, 4, 3), (64, 64, 64, 4, 3),
    (8, 16, 512, 4, 3), (8, 32, 512, 4, 3), (8, 32, 512, 8, 3), (8, 64, 512, 8, 3),
]


class RecordedKernel:
    """kernel[grid](...) that launches and appends (kernel, args, kwargs) to `launches`."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches.append((self.kernel, args, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return run


def main():
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for H, B, L in SHAPES:
        q, kv_cache, block_table, seq_lens = paged_inputs(H, B, L)
        o = torch.empty(B, H, V_DIM, dtype=q.dtype, device="cuda")
        lse = torch.empty(B, H, device="cuda")
        launches = []
        mla_decode_triton(q, kv_cache, block_table, seq_lens, o, lse, SCALE, V_DIM,
                          launch=lambda kernel: RecordedKernel(kernel, launches))
        torch.cuda.synchronize()
        kernel, args, kwargs = launches[1]
        expected = o.clone()
        for block_s, block_s_tall, block_vc, warps, stages in TILES:
            tile = dict(kwargs, BLOCK_S=block_s, BLOCK_S_TALL=block_s_tall, BLOCK_VC=block_vc, num_warps=warps,
                        num_stages=stages)
            grid = (B, H, triton.cdiv(V_DIM, block_vc))

            def combine():
                kernel[grid](*args, **tile)

            o.fill_(float("nan"))
            combine()
            torch.cuda.synchronize()
            ok = torch.allclose(o.float(), expected.float(), atol=1e-2, rtol=1e-2)
            us = triton.testing.do_bench(combine, return_mode="median") * 1e3
            print(f"H{H} B{B} L{L} BLOCK_S={block_s:3d} BLOCK_S_TALL={block_s_tall:3d} BLOCK_VC={block_vc:3d} "
                  f"warps={warps} stages={stages}: "
                  f"{us:7.1f} us {'ok' if ok else 'MISMATCH'}", flush=True)


if __name__ == "__main__":
    main()
