"""What the Kimi gate costs next to kda::chunk_kda when Inductor fuses it into one pointwise
kernel before the op (the model's way): the upper bound of what fusing the gate into the chunk
kernels could save (issue #4 asks to build that fusion if it beats the Inductor-fused gate).

    python bench/probe_chunk_kda_gate.py > bench/results/<gpu>/chunk_kda_gate_probe.log

At the issue's benchmark shapes (bf16, K = V = 128), a torch.compile(fullgraph=True) training step
loss = <chunk_kda(q, k, v, g, beta), do> with g = -exp(A_log)·softplus(z + dt_bias) computed in
torch ops (meta's kda_gate) from z [B, T, H, K] bf16, A_log [H] and dt_bias [H·K] fp32, forward
and backward (gradients for z, A_log, dt_bias and the rest). Reported: the mean CUDA time per
step of every kernel (torch.profiler), split into the chunk kernels and the rest (the gate's
forward and backward kernels, Inductor's), and the step's do_bench median.
"""

import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parent))
from bench_chunk_kda import K, V, _inputs  # noqa: E402
from common import kernel_times  # noqa: E402

from kda_ops import chunk_kda  # noqa: E402
from kda_ops.meta.kda_recurrent import kda_gate  # noqa: E402

SHAPES = [(1, 8192, 16), (8, 4096, 32), (1, 32768, 32)]  # (B, T, H)


def loss(q, k, v, z, beta, A_log, dt_bias, do):
    o, _ = chunk_kda(q, k, v, kda_gate(z, A_log, dt_bias), beta)
    return (o.float() * do.float()).sum()


def main():
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    compiled = torch.compile(loss, fullgraph=True)  # AOTAutograd compiles its backward as well
    for B, T, H in SHAPES:
        x = _inputs(B, T, H)
        gen = torch.Generator(device="cuda").manual_seed(1)
        z = (torch.randn(B, T, H, K, device="cuda", generator=gen) * 2).bfloat16().requires_grad_()
        A_log = (torch.randn(H, device="cuda", generator=gen) * 0.5 - 1).requires_grad_()
        dt_bias = torch.randn(H * K, device="cuda", generator=gen).requires_grad_()
        leaves = [x[n].requires_grad_() for n in ("q", "k", "v", "beta")]
        args = (*leaves[:3], z, leaves[3], A_log, dt_bias, x["do"])

        def run():
            for t in (*leaves, z, A_log, dt_bias):
                t.grad = None
            compiled(*args).backward()

        times = kernel_times(run, 5)
        chunk = sum(us for name, us in times.items() if name.startswith("chunk_kda_"))
        rest = {name: us for name, us in times.items() if not name.startswith("chunk_kda_")}
        ms = triton.testing.do_bench(run, return_mode="median")
        print(f"\nB={B} T={T} H={H} K={K} V={V}: step {ms * 1e3:.1f} us (do_bench); kernels: chunk {chunk:.1f} us, "
              f"the rest {sum(rest.values()):.1f} us ({100 * sum(rest.values()) / (chunk + sum(rest.values())):.1f}%)")
        for name, us in rest.items():
            print(f"  {us:9.1f} us  {name[:110]}")
        del x, z, leaves, args
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
