"""Chunked KDA, forward and forward + backward: kda_ops (Triton kernels through
kda::chunk_kda_fwd / kda::chunk_kda_bwd) against fla-core's `chunk_kda`, side by side in one
process, same inputs and flags (bf16, K = V = 128, precomputed fp32 log-decay gate, no in-kernel
norm, no initial or final state; gradients for q, k, v, g, beta).

Both providers first pass the same correctness check against the fp32 chunked references
(relative RMS error of o <= 0.005; of dq, dk, dv <= 0.008 and of dg, dbeta <= 0.02, DESIGN.md's
bars); a provider that fails it fails its test and reports no time. Device time is the median of
triton.testing.do_bench; extra_info follows DESIGN.md's results format. FLOPs per head of the
forward ≈ 6·T·d² + 3·T·C·d + T·C² (kda_math.md §6); forward + backward counts 3× that (the
backward as twice the forward, the usual convention). Peak memory of forward + backward is
torch.cuda.max_memory_allocated over one call, absolute and above what was allocated before it
(inputs and the output cotangent).

    pytest bench/bench_chunk_kda.py --benchmark-json=bench/results/<gpu>/chunk_kda.json
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton
from common import rel_rms

from kda_ops import chunk_kda
from kda_ops.meta.chunk_kda import CHUNK_SIZE, chunk_kda_fwd_reference
from kda_ops.meta.chunk_kda_bwd import chunk_kda_bwd_reference
from kda_ops.meta.kda_recurrent import l2norm

K = V = 128
O_BAR = 0.005
GRAD_NAMES = ("dq", "dk", "dv", "dg", "dbeta")
GRAD_BARS = dict(dq=0.008, dk=0.008, dv=0.008, dg=0.02, dbeta=0.02)

SHAPES = [
    pytest.param(1, 8192, 16, id="B1-T8192-H16"),
    pytest.param(8, 4096, 32, id="B8-T4096-H32"),
    pytest.param(1, 32768, 32, id="B1-T32768-H32"),
]
PROVIDERS = [pytest.param("kda_ops", id="kda_ops"), pytest.param("fla", id="fla")]


def _chunk_kda_of(provider):
    if provider == "kda_ops":
        return chunk_kda
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
        do=randn(B, T, H, V).bfloat16(),
    )


def _forward_flops(B, T, H):
    C, d = CHUNK_SIZE, K
    return B * H * (6 * T * d * d + 3 * T * C * d + T * C * C)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("B, T, H", SHAPES)
def test_chunk_kda_fwd(benchmark, provider, B, T, H):
    x = _inputs(B, T, H)
    fn = _chunk_kda_of(provider)

    def fwd():
        return fn(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=K**-0.5)[0]

    ref, _ = chunk_kda_fwd_reference(
        x["q"].float(), x["k"].float(), x["v"].float(), x["g"], x["beta"].float(), None, None, K**-0.5, False, False
    )
    err = rel_rms(fwd(), ref)
    del ref
    assert err <= O_BAR, f"{provider}: relative RMS error {err:.2e} > {O_BAR}"

    ms = triton.testing.do_bench(fwd, return_mode="median")
    benchmark.extra_info.update(
        op="chunk_kda_fwd",
        provider=provider,
        shape=dict(B=B, T=T, H=H, K=K, V=V),
        ms=ms,
        tflops=_forward_flops(B, T, H) / (ms * 1e-3) / 1e12,
        rel_rms_error=err,
    )

    def run():
        fwd()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=10, warmup_rounds=1)


def _forward_backward(provider, x):
    """A closure running one forward + backward and returning (dq, dk, dv, dg, dbeta)."""
    fn = _chunk_kda_of(provider)
    leaves = [x[n].detach().requires_grad_() for n in ("q", "k", "v", "g", "beta")]

    def run():
        o, _ = fn(*leaves, scale=K**-0.5)
        return torch.autograd.grad(o, leaves, x["do"])

    return run


def _peak_memory(run):
    """(peak bytes allocated during one run, peak above what was allocated before it)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads = run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del grads
    return peak, peak - before


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("B, T, H", SHAPES)
def test_chunk_kda_fwdbwd(benchmark, provider, B, T, H):
    x = _inputs(B, T, H)
    run = _forward_backward(provider, x)
    ref = chunk_kda_bwd_reference(
        x["q"].float(), x["k"].float(), x["v"].float(), x["g"], x["beta"].float(), None, None,
        x["do"].float(), None, K**-0.5, False,
    )
    errors = {name: rel_rms(grad, r) for name, grad, r in zip(GRAD_NAMES, run(), ref)}
    del ref
    for name, err in errors.items():
        assert err <= GRAD_BARS[name], f"{provider}: {name} relative RMS error {err:.2e} > {GRAD_BARS[name]}"

    peak, peak_extra = _peak_memory(run)
    ms = triton.testing.do_bench(run, return_mode="median")
    benchmark.extra_info.update(
        op="chunk_kda_fwdbwd",
        provider=provider,
        shape=dict(B=B, T=T, H=H, K=K, V=V),
        ms=ms,
        tflops=3 * _forward_flops(B, T, H) / (ms * 1e-3) / 1e12,
        peak_memory_bytes=peak,
        peak_memory_above_inputs_bytes=peak_extra,
        rel_rms_errors=errors,
    )

    def run_sync():
        run()
        torch.cuda.synchronize()

    benchmark.pedantic(run_sync, rounds=10, warmup_rounds=1)


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
