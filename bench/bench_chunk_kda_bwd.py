"""Forward + backward of chunked KDA: kda_ops (Triton kernels through kda::chunk_kda_fwd and
kda::chunk_kda_bwd) against fla-core's `chunk_kda`, side by side in one process, same inputs and
flags (bf16, K = V = 128, precomputed fp32 log-decay gate, no in-kernel norm, no initial or final
state; gradients for q, k, v, g, beta).

Both providers first pass the same correctness check against the fp32 chunked backward
reference (relative RMS error <= 0.008 for dq, dk, dv and <= 0.02 for dg, dbeta, DESIGN.md's
bars); a provider that fails it fails its test and reports no time. Device time is the median
of triton.testing.do_bench over one forward + backward; peak memory is
torch.cuda.max_memory_allocated over one forward + backward, absolute and above what was
allocated before it (inputs and the output cotangent). FLOPs: the forward's
6·T·d² + 3·T·C·d + T·C² per head (kda_math.md §6), times 3 for forward + backward (the backward
counted as twice the forward, the usual convention).

    pytest bench/bench_chunk_kda_bwd.py --benchmark-json=bench/results/<gpu>/chunk_kda_fwdbwd.json
"""

import pytest
import torch
import triton

from kda_ops import chunk_kda
from kda_ops.meta.chunk_kda import CHUNK_SIZE
from kda_ops.meta.chunk_kda_bwd import chunk_kda_bwd_reference
from kda_ops.meta.kda_recurrent import l2norm

K = V = 128
NAMES = ("dq", "dk", "dv", "dg", "dbeta")
BARS = dict(dq=0.008, dk=0.008, dv=0.008, dg=0.02, dbeta=0.02)

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


def _forward_backward(provider, x):
    """A closure running one forward + backward and returning (dq, dk, dv, dg, dbeta)."""
    fn = _chunk_kda_of(provider)
    leaves = [x[n].detach().requires_grad_() for n in ("q", "k", "v", "g", "beta")]

    def run():
        o, _ = fn(*leaves, scale=K**-0.5)
        return torch.autograd.grad(o, leaves, x["do"])

    return run


def _flops(B, T, H):
    C, d = CHUNK_SIZE, K
    return 3 * B * H * (6 * T * d * d + 3 * T * C * d + T * C * C)


def _rel_rms(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


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
    errors = {name: _rel_rms(grad, r) for name, grad, r in zip(NAMES, run(), ref)}
    del ref
    for name, err in errors.items():
        assert err <= BARS[name], f"{provider}: {name} relative RMS error {err:.2e} > {BARS[name]}"

    peak, peak_extra = _peak_memory(run)
    ms = triton.testing.do_bench(run, return_mode="median")
    benchmark.extra_info.update(
        op="chunk_kda_fwdbwd",
        provider=provider,
        shape=dict(B=B, T=T, H=H, K=K, V=V),
        ms=ms,
        tflops=_flops(B, T, H) / (ms * 1e-3) / 1e12,
        peak_memory_bytes=peak,
        peak_memory_above_inputs_bytes=peak_extra,
        rel_rms_errors=errors,
    )

    def run_sync():
        run()
        torch.cuda.synchronize()

    benchmark.pedantic(run_sync, rounds=10, warmup_rounds=1)
