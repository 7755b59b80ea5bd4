"""Per-kernel GPU time of chunked KDA, forward and forward + backward, for kda_ops and fla-core.

The benchmark (bench_chunk_kda.py) says how fast each provider is; this says where the time goes:
torch.profiler over several calls, CUDA time per kernel name averaged per call, printed as a table
and written as JSON. Same inputs and flags as the benchmark.

    python bench/profile_chunk_kda.py --shapes 1,8192,16 8,4096,32 --out prof.json
    python bench/profile_chunk_kda.py --providers kda_ops --diag-precision tf32x3

--diag-precision runs kda_ops' per-chunk kernel (the forward's, and the backward's rerun) with
that precision of the diagonal blocks instead of launch_config's default.
"""

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parent))
from bench_chunk_kda import K, _forward_backward, _inputs  # noqa: E402
from common import kernel_times  # noqa: E402

from kda_ops import chunk_kda  # noqa: E402
from kda_ops.kernels import chunk_kda_bwd, chunk_kda_fwd  # noqa: E402


def _provider_fn(provider):
    if provider == "kda_ops":
        return chunk_kda
    from fla.ops.kda import chunk_kda as fla_chunk_kda

    return fla_chunk_kda


def use_diag_precision(diag_precision: str) -> None:
    """Makes the op's launchers take this diagonal precision: both ask launch_config at every call."""
    default = chunk_kda_fwd.launch_config

    def config(K, V, dtype):
        return dataclasses.replace(default(K, V, dtype), diag_precision=diag_precision)

    chunk_kda_fwd.launch_config = config
    chunk_kda_bwd.fwd_launch_config = config


def profile_shape(provider, B, T, H, calls):
    x = _inputs(B, T, H)
    fn = _provider_fn(provider)

    def fwd():
        return fn(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=K**-0.5)

    return dict(fwd=kernel_times(fwd, calls), fwdbwd=kernel_times(_forward_backward(provider, x), calls))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["1,8192,16"], help="B,T,H triples")
    parser.add_argument("--providers", nargs="+", default=["kda_ops", "fla"])
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--diag-precision", choices=chunk_kda_fwd.DIAG_PRECISIONS, help="default: launch_config's")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.diag_precision:
        use_diag_precision(args.diag_precision)
    results = []
    for shape in args.shapes:
        B, T, H = (int(s) for s in shape.split(","))
        for provider in args.providers:
            times = profile_shape(provider, B, T, H, args.calls)
            results.append(dict(provider=provider, B=B, T=T, H=H, K=K, **times))
            for direction in ("fwd", "fwdbwd"):
                total = sum(times[direction].values())
                print(f"\n{provider} B{B} T{T} H{H} {direction}: {total:.1f} us of kernels per call")
                for name, us in times[direction].items():
                    print(f"  {us:9.1f} us  {name[:110]}")
    if args.out:
        machine = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       kda_ops_commit=os.environ.get("KDA_OPS_COMMIT", "unknown"))
        diag_precision = chunk_kda_fwd.launch_config(K, K, torch.bfloat16).diag_precision  # kda_ops'
        args.out.write_text(json.dumps(dict(machine=machine, diag_precision=diag_precision, results=results), indent=1))


if __name__ == "__main__":
    main()
