"""Chunked KDA, forward and forward + backward: kda_ops (Triton kernels through
kda::chunk_kda_fwd / kda::chunk_kda_bwd) against fla-core's `chunk_kda`, side by side in one
process, same inputs and flags (bf16, K = V = 128, precomputed fp32 log-decay gate, no in-kernel
norm, no initial or final state; gradients for q, k, v, g, beta).

Both providers first pass the same correctness check against the fp32 chunked references
(relative RMS error of o <= 0.005; of dq, dk, dv <= 0.008 and of dg, dbeta <= 0.02, DESIGN.md's
bars); a provider that fails it fails its test and reports no time. Device time is the median of
triton.testing.do_bench; extra_info follows DESIGN.md's results format. FLOPs per head of the
forward ≈ 6·T·d² + 3·T·C·d + T·C² (kda_math.md §6); forward + backward counts 3× that (the
backward as twice the forward, the usual convention). Mandatory bytes: the forward reads q, k,
v, g, beta and writes o; the backward reads them again with do and writes a gradient of each
input, so forward + backward = 3·inputs + o + do. floor_ms = max(bytes / copy bandwidth, FLOPs /
matmul rate) with both ceilings measured in the same run (conftest's `ceilings`, recorded in
machine_info), of_floor = floor_ms / ms. Peak memory of forward + backward is
torch.cuda.max_memory_allocated over one call, absolute and above what was allocated before it
(inputs and the output cotangent).

Shapes: the issue's three, and a sequence-length sweep at B = 1, H = 16 (T = 2048 … 32768, with
the issue's T = 8192) for the speed-against-T plot.

    pytest bench/bench_chunk_kda.py --benchmark-json=bench/results/<gpu>/chunk_kda.json
"""

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

INPUT_NAMES = ("q", "k", "v", "g", "beta")

SHAPES = [
    pytest.param(1, 2048, 16, id="B1-T2048-H16"),
    pytest.param(1, 4096, 16, id="B1-T4096-H16"),
    pytest.param(1, 8192, 16, id="B1-T8192-H16"),
    pytest.param(1, 16384, 16, id="B1-T16384-H16"),
    pytest.param(1, 32768, 16, id="B1-T32768-H16"),
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


def _forward_bytes(x):
    """q, k, v, g, beta read, o written (o has do's shape and dtype)."""
    return sum(x[n].nbytes for n in INPUT_NAMES) + x["do"].nbytes


def _forward_backward_bytes(x):
    """The forward's bytes, then the inputs and do read and one gradient per input written."""
    return _forward_bytes(x) + 2 * sum(x[n].nbytes for n in INPUT_NAMES) + x["do"].nbytes


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("B, T, H", SHAPES)
def test_chunk_kda_fwd(benchmark, ceilings, provider, B, T, H):
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
        **ceilings.floor_fields(ms, _forward_bytes(x), _forward_flops(B, T, H)),
        rel_rms_error=err,
    )

    def run():
        fwd()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=10, warmup_rounds=1)


def _forward_backward(provider, x):
    """A closure running one forward + backward and returning (dq, dk, dv, dg, dbeta)."""
    fn = _chunk_kda_of(provider)
    leaves = [x[n].detach().requires_grad_() for n in INPUT_NAMES]

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
def test_chunk_kda_fwdbwd(benchmark, ceilings, provider, B, T, H):
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
        **ceilings.floor_fields(ms, _forward_backward_bytes(x), 3 * _forward_flops(B, T, H)),
        peak_memory_bytes=peak,
        peak_memory_above_inputs_bytes=peak_extra,
        rel_rms_errors=errors,
    )

    def run_sync():
        run()
        torch.cuda.synchronize()

    benchmark.pedantic(run_sync, rounds=10, warmup_rounds=1)

