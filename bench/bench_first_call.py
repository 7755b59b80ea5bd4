"""First call of every op: the wall time of one call in a fresh Python process with an empty Triton
cache (TRITON_CACHE_DIR), so it includes the JIT compile of every kernel the call launches (kda_ops
never autotunes). Inputs are built and kda_ops imported before the clock starts; the clock stops
after a device synchronize.

    pytest bench/bench_first_call.py --benchmark-json=bench/results/<gpu>/first_call.json

extra_info: op "<op>_first_call", provider, shape (as the op's own suite records it), ms (the wall
time). Issue #4 bounds the chunked forward + backward at 30 s: tests/test_chunk_kda_bwd_kernel.py
asserts that, this suite reports it.
"""

import os
import subprocess
import sys

import pytest

CHUNK_KDA_INPUTS = """
from kda_ops import chunk_kda
x = [torch.randn(B, T, H, K, device="cuda").bfloat16().requires_grad_() for _ in range(3)]
g = (-torch.rand(B, T, H, K, device="cuda") * 0.5).requires_grad_()
beta = torch.rand(B, T, H, device="cuda").bfloat16().requires_grad_()
do = torch.randn(B, T, H, V, device="cuda").bfloat16()
"""
KDA_DECODE_INPUTS = """
from kda_ops import kda_decode
q, k = (torch.randn(B, T, H, K, device="cuda").bfloat16() for _ in range(2))
v = torch.randn(B, T, H, V, device="cuda").bfloat16()
g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, device="cuda"))
beta = torch.rand(B, T, H, device="cuda").bfloat16()
state = torch.randn(B, H, K, V, device="cuda") * 0.1
"""
MLA_DECODE_INPUTS = """
from kda_ops import mla_decode
kv_cache = torch.randn(B * L // block_size, block_size, D_qk, device="cuda").bfloat16()
block_table = torch.arange(B * L // block_size, device="cuda", dtype=torch.int32).view(B, -1)
seq_lens = torch.full((B,), L, device="cuda", dtype=torch.int32)
q = torch.randn(B, H, D_qk, device="cuda").bfloat16()
"""
CHUNK_KDA_SHAPE = dict(B=1, T=8192, H=16, K=128, V=128)
CASES = [
    pytest.param(
        "chunk_kda_fwd", CHUNK_KDA_SHAPE, CHUNK_KDA_INPUTS,
        "chunk_kda(*x, g, beta, use_qk_l2norm=True)",
        id="chunk_kda_fwd",
    ),
    pytest.param(
        "chunk_kda_fwdbwd", CHUNK_KDA_SHAPE, CHUNK_KDA_INPUTS,
        "o, _ = chunk_kda(*x, g, beta, use_qk_l2norm=True)\ntorch.autograd.grad(o, [*x, g, beta], do)",
        id="chunk_kda_fwdbwd",
    ),
    pytest.param(
        "kda_decode", dict(B=1, T=1, H=32, K=128, V=128), KDA_DECODE_INPUTS,
        "kda_decode(q, k, v, g, beta, state, use_qk_l2norm=True)",
        id="kda_decode",
    ),
    pytest.param(
        "mla_decode", dict(B=1, L=4096, H=32, D_qk=576, D_v=512, block_size=64), MLA_DECODE_INPUTS,
        "mla_decode(q, kv_cache, block_table, seq_lens, scale=192**-0.5, v_dim=D_v)",
        id="mla_decode",
    ),
]


def first_call_seconds(shape: dict, inputs: str, call: str, triton_cache_dir) -> float:
    """Runs `inputs` then times `call` in a fresh interpreter whose Triton cache is
    triton_cache_dir; the shape's keys are variables of both."""
    script = "\n".join([
        "import time, torch",
        *(f"{name} = {value!r}" for name, value in shape.items()),
        inputs,
        "torch.cuda.synchronize()",
        "start = time.perf_counter()",
        call,
        "torch.cuda.synchronize()",
        "print(time.perf_counter() - start)",
    ])
    env = {**os.environ, "TRITON_CACHE_DIR": str(triton_cache_dir)}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return float(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("op, shape, inputs, call", CASES)
def test_first_call(benchmark, tmp_path, op, shape, inputs, call):
    seconds = benchmark.pedantic(first_call_seconds, args=(shape, inputs, call, tmp_path / "triton-cache"), rounds=1, iterations=1)
    benchmark.extra_info.update(op=f"{op}_first_call", provider="kda_ops", shape=shape, ms=seconds * 1e3)
