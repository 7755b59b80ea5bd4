"""Forward of chunked KDA: kda_ops (Triton kernels through kda::chunk_kda_fwd) against fla-core's
`chunk_kda`, side by side in one process, same inputs and flags (bf16, K = V = 128, precomputed
fp32 log-decay gate, no in-kernel norm, no initial or final state).

Both providers first pass the same correctness check against the fp32 chunked reference
(relative RMS error of o <= 0.005); a provider that fails it fails its test and reports no time.
Device time is the median of triton.testing.do_bench; extra_info follows DESIGN.md's results
format. FLOPs per head ≈ 6·T·d² + 3·T·C·d + T·C² (kda_math.md §6).

    pytest bench/bench_chunk_kda.py --benchmark-json=bench/results/<gpu>/chunk_kda_fwd.json
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton

from kda_ops import chunk_kda
from kda_ops.meta.chunk_kda import CHUNK_SIZE, chunk_kda_fwd_reference
from kda_ops.meta.kda_recurrent import l2norm

K = V = 128
BAR = 0.005

SHAPES = [
    pytest.param(1, 8192, 16, id="B1-T8192-H16"),
    pytest.param(8, 4096, 32, id="B8-T4096-H32"),
    pytest.param(1, 32768, 32, id="B1-T32768-H32"),
]
PROVIDERS = [pytest.param("kda_ops", id="kda_ops"), pytest.param("fla", id="fla")]


def _fla_chunk_kda():
    try:
        from fla.ops.kda import chunk_kda as fla_chunk_kda
    except ImportError:
        pytest.skip("fla-core is not installed")
    return fla_chunk_kda


def _inputs(B, T, H, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    return dict(
        q=randn(B, T, H, K).bfloat16(),
        k=l2norm(randn(B, T, H, K)).bfloat16(),  # unit keys: no in-kernel norm for either provider
        v=randn(B, T, H, V).bfloat16(),
        g=-torch.rand(B, T, H, K, device="cuda", generator=gen) * 0.5,
        beta=torch.rand(B, T, H, device="cuda", generator=gen).bfloat16(),
    )


def _forward(provider, x):
    scale = K**-0.5
    if provider == "kda_ops":
        return lambda: chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=scale)[0]
    fla_chunk_kda = _fla_chunk_kda()
    return lambda: fla_chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=scale)[0]


def _flops(B, T, H):
    C, d = CHUNK_SIZE, K
    return B * H * (6 * T * d * d + 3 * T * C * d + T * C * C)


def _rel_rms(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("B, T, H", SHAPES)
def test_chunk_kda_fwd(benchmark, provider, B, T, H):
    x = _inputs(B, T, H)
    fwd = _forward(provider, x)
    ref, _ = chunk_kda_fwd_reference(
        x["q"].float(), x["k"].float(), x["v"].float(), x["g"], x["beta"].float(), None, None, K**-0.5, False, False
    )
    err = _rel_rms(fwd(), ref)
    del ref
    assert err <= BAR, f"{provider}: relative RMS error {err:.2e} > {BAR}"

    ms = triton.testing.do_bench(fwd, return_mode="median")
    benchmark.extra_info.update(
        op="chunk_kda_fwd",
        provider=provider,
        shape=dict(B=B, T=T, H=H, K=K, V=V),
        ms=ms,
        tflops=_flops(B, T, H) / (ms * 1e-3) / 1e12,
        rel_rms_error=err,
    )

    def run():
        fwd()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=10, warmup_rounds=1)


_FIRST_CALL = textwrap.dedent(
    """
    import time, torch
    from kda_ops import chunk_kda
    B, T, H, K = {B}, {T}, {H}, {K}
    x = [torch.randn(B, T, H, K, device="cuda").bfloat16() for _ in range(3)]
    g = -torch.rand(B, T, H, K, device="cuda") * 0.5
    beta = torch.rand(B, T, H, device="cuda").bfloat16()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    chunk_kda(*x, g, beta, use_qk_l2norm=True)
    torch.cuda.synchronize()
    print(time.perf_counter() - t0)
    """
)


def test_chunk_kda_fwd_first_call(benchmark, tmp_path):
    """Wall time of the op's first call in a fresh process with an empty Triton cache (JIT
    compile of both kernels included; no autotuning)."""
    B, T, H = 1, 8192, 16
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton-cache")}
    code = _FIRST_CALL.format(B=B, T=T, H=H, K=K)

    def first_call():
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return float(run.stdout.strip().splitlines()[-1])

    seconds = benchmark.pedantic(first_call, rounds=1, iterations=1)
    benchmark.extra_info.update(
        op="chunk_kda_fwd_first_call", provider="kda_ops", shape=dict(B=B, T=T, H=H, K=K, V=V), ms=seconds * 1e3
    )
