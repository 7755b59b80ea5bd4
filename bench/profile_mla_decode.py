"""Where the time of one kda::mla_decode step goes: per-kernel CUDA time (torch.profiler, mean
over --calls eager calls) of the split and combine kernels, beside the CUDA-graph replay median
(triton.testing.do_bench, L2 flushed) that bench_mla_decode.py reports. Same inputs as the
benchmark (D_qk = 576, v_dim = 512, block size 64, bf16, full-length sequences).

    python bench/profile_mla_decode.py --shapes 32,128,4096 32,1,32768
    python bench/profile_mla_decode.py --shapes 32,128,4096 --configs 16,64,8,5,1 32,64,8,5,1

--configs: block_h,block_n,num_warps,num_stages,programs_per_sm per entry; default
the launch table's row for each shape.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parent))
from bench_mla_decode import D_QK, SCALE, V_DIM, paged_inputs  # noqa: E402
from common import capture_cuda_graph, kernel_times  # noqa: E402

from kda_ops.kernels.mla_decode import MLADecodeConfig, mla_decode_config, mla_decode_triton  # noqa: E402


def parse_config(text: str) -> MLADecodeConfig:
    block_h, block_n, warps, stages, pps = (int(x) for x in text.split(","))
    return MLADecodeConfig(block_h=block_h, block_n=block_n, num_warps=warps, num_stages=stages,
                           programs_per_sm=pps)


def profile_config(H: int, B: int, L: int, config: MLADecodeConfig, calls: int) -> dict:
    q, kv_cache, block_table, seq_lens = paged_inputs(H, B, L)
    o = torch.empty(B, H, V_DIM, dtype=q.dtype, device="cuda")
    lse = torch.empty(B, H, device="cuda")

    def step():
        mla_decode_triton(q, kv_cache, block_table, seq_lens, o, lse, SCALE, V_DIM, config=config)

    kernels = kernel_times(step, calls)
    graph_ms = triton.testing.do_bench(capture_cuda_graph(step).replay, return_mode="median")
    cache_bytes = B * L * D_QK * kv_cache.element_size()
    return dict(H=H, B=B, L=L, config=dataclasses.asdict(config), kernels_us=kernels, graph_us=graph_ms * 1e3,
                graph_tbps=cache_bytes / (graph_ms * 1e-3) / 1e12)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["32,128,4096", "32,1,32768"], help="H,B,L triples")
    parser.add_argument("--configs", nargs="+", type=parse_config, help="default: the launch table's")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = []
    for shape in args.shapes:
        H, B, L = (int(s) for s in shape.split(","))
        for config in args.configs or [mla_decode_config(H, D_QK, V_DIM, torch.bfloat16, torch.device("cuda"))]:
            row = profile_config(H, B, L, config, args.calls)
            results.append(row)
            print(f"\nH{H} B{B} L{L} {config}: graph {row['graph_us']:.1f} us ({row['graph_tbps']:.2f} TB/s of cache)")
            for name, us in row["kernels_us"].items():
                print(f"  {us:9.1f} us  {name[:100]}")
    if args.out:
        machine = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
        args.out.write_text(json.dumps(dict(machine=machine, results=results), indent=1))


if __name__ == "__main__":
    main()
