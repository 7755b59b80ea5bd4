"""kda::chunk_kda with the Kimi gate computed two ways, side by side (issue #4's fused-gate item):
forward and forward + backward at the issue's shapes, bf16, K = V = 128, no in-kernel norm, no
initial or final state.

    pytest bench/bench_chunk_kda_gate.py --benchmark-json=bench/results/<gpu>/chunk_kda_gate.json

The gate is g = -exp(A_log)·softplus(z + dt_bias), or its bounded form g = L·sigmoid(exp(A_log)·(z +
dt_bias)) with L = BOUND (docs/kda_math.md §2; providers named *_bounded). Every provider starts
from the same tensors, as the model holds them: q, k, v, beta and the gate's pre-activation z
[B, T, H, K] in bf16, A_log [H] and dt_bias [H·K] fp32. Providers, each one
torch.compile(fullgraph=True) function (Inductor; its backward compiled by AOTAutograd):
- inductor_gate: the gate in torch ops (meta's kda_gate, the model's operations in its order),
  which Inductor fuses into its own kernels before the op (and their backward after it), then
  chunk_kda(g).
- kernel_gate: chunk_kda(z, A_log=, dt_bias=): the op's gate kernel computes g before its
  chunk-local cumsum and its finish kernel turns dg into dz and the parameters' gradients.
- inductor_gate_bounded, kernel_gate_bounded: the same two with the bounded form (gate_lower_bound=).
- chunk_only: chunk_kda(g) on a g computed beforehand (its gradient is g's): no gate at all, the
  floor the others approach.
The forward runs under no_grad; forward + backward takes the gradients of q, k, v, beta and of
z, A_log, dt_bias (of g for chunk_only). Each provider first passes a correctness check against
the fp32 chunked references (relative RMS error of o <= 0.005; dq, dk, dv <= 0.008; dz (dg),
dbeta, dA_log, ddt_bias <= 0.02); one that fails reports no time. extra_info: ms, the median of
triton.testing.do_bench; TFLOP/s of the chunked math (bench_chunk_kda.py's count); kernels, the
CUDA microseconds per call of every kernel launched (torch.profiler, kernel names as launched);
for forward + backward the peak memory.
"""

import pytest
import torch
import triton
from bench_chunk_kda import GRAD_BARS, O_BAR, _forward_flops, _peak_memory
from common import kernel_times, rel_rms

from kda_ops import chunk_kda
from kda_ops.meta.chunk_kda import chunk_kda_fwd_reference
from kda_ops.meta.chunk_kda_bwd import chunk_kda_bwd_reference
from kda_ops.meta.kda_recurrent import kda_gate, l2norm

K = V = 128
SHAPES = [
    pytest.param(1, 8192, 16, id="B1-T8192-H16"),
    pytest.param(8, 4096, 32, id="B8-T4096-H32"),
    pytest.param(1, 32768, 32, id="B1-T32768-H32"),
]
PROVIDERS = [
    pytest.param(p, id=p)
    for p in ("inductor_gate", "kernel_gate", "inductor_gate_bounded", "kernel_gate_bounded", "chunk_only")
]
BOUND = -5.0  # the bounded form's L: the bottom of docs/kda_math.md §2's range
# gradient name -> (input it belongs to, bar)
GRADS = dict(dq=("q", GRAD_BARS["dq"]), dk=("k", GRAD_BARS["dk"]), dv=("v", GRAD_BARS["dv"]),
             dz=("z", GRAD_BARS["dg"]), dbeta=("beta", GRAD_BARS["dbeta"]),
             dA_log=("A_log", GRAD_BARS["dg"]), ddt_bias=("dt_bias", GRAD_BARS["dg"]))


def _inputs(B, T, H, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    return dict(
        q=randn(B, T, H, K).bfloat16(),
        k=l2norm(randn(B, T, H, K)).bfloat16(),
        v=randn(B, T, H, V).bfloat16(),
        z=(randn(B, T, H, K) * 2 - 2).bfloat16(),
        beta=torch.rand(B, T, H, device="cuda", generator=gen).bfloat16(),
        A_log=randn(H) * 0.5 - 1,  # mild decays: dA_log stays well-conditioned for the check (see the GPU test)
        dt_bias=randn(H * K) * 0.5,
        do=randn(B, T, H, V).bfloat16(),
    )


def _inductor_gate(q, k, v, z, beta, A_log, dt_bias):
    return chunk_kda(q, k, v, kda_gate(z, A_log, dt_bias), beta, scale=K**-0.5)[0]


def _kernel_gate(q, k, v, z, beta, A_log, dt_bias):
    return chunk_kda(q, k, v, z, beta, scale=K**-0.5, A_log=A_log, dt_bias=dt_bias)[0]


def _inductor_gate_bounded(q, k, v, z, beta, A_log, dt_bias):
    return chunk_kda(q, k, v, kda_gate(z, A_log, dt_bias, BOUND), beta, scale=K**-0.5)[0]


def _kernel_gate_bounded(q, k, v, z, beta, A_log, dt_bias):
    return chunk_kda(q, k, v, z, beta, scale=K**-0.5, A_log=A_log, dt_bias=dt_bias, gate_lower_bound=BOUND)[0]


def _chunk_only(q, k, v, g, beta):
    return chunk_kda(q, k, v, g, beta, scale=K**-0.5)[0]


FUNCTIONS = dict(
    inductor_gate=_inductor_gate,
    kernel_gate=_kernel_gate,
    inductor_gate_bounded=_inductor_gate_bounded,
    kernel_gate_bounded=_kernel_gate_bounded,
    chunk_only=_chunk_only,
)


def _bound(provider):
    """The provider's gate_lower_bound: BOUND for the bounded form, None for softplus."""
    return BOUND if provider.endswith("_bounded") else None


_compiled = {}


def _function(provider):
    """provider's compiled function (one per provider: later shapes recompile it, then dynamic)."""
    if provider not in _compiled:
        _compiled[provider] = torch.compile(FUNCTIONS[provider], fullgraph=True)
    return _compiled[provider]


def _arguments(provider, x):
    """The provider's inputs: the gate's for the two gate providers, g (computed now) for chunk_only."""
    if provider == "chunk_only":
        return dict(q=x["q"], k=x["k"], v=x["v"], g=kda_gate(x["z"], x["A_log"], x["dt_bias"]), beta=x["beta"])
    return {n: x[n] for n in ("q", "k", "v", "z", "beta", "A_log", "dt_bias")}


def _reference_args(x):
    return (x["q"].float(), x["k"].float(), x["v"].float(), x["z"].float(), x["beta"].float(), None, None)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("B, T, H", SHAPES)
def test_chunk_kda_gate_fwd(benchmark, provider, B, T, H):
    x = _inputs(B, T, H)
    fn, args = _function(provider), _arguments(provider, x)

    @torch.no_grad()
    def fwd():
        return fn(*args.values())

    ref, _ = chunk_kda_fwd_reference(
        *_reference_args(x), K**-0.5, False, False, x["A_log"], x["dt_bias"], _bound(provider)
    )
    err = rel_rms(fwd(), ref)
    del ref
    assert err <= O_BAR, f"{provider}: relative RMS error {err:.2e} > {O_BAR}"
    ms = triton.testing.do_bench(fwd, return_mode="median")
    benchmark.group = f"chunk_kda gate fwd B={B} T={T} H={H}"
    benchmark.extra_info.update(
        op="chunk_kda_gate_fwd", provider=provider, shape=dict(B=B, T=T, H=H, K=K, V=V), ms=ms,
        tflops=_forward_flops(B, T, H) / (ms * 1e-3) / 1e12, kernels=kernel_times(fwd, 3), rel_rms_error=err,
    )

    def run():
        fwd()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=10, warmup_rounds=1)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("B, T, H", SHAPES)
def test_chunk_kda_gate_fwdbwd(benchmark, provider, B, T, H):
    x = _inputs(B, T, H)
    fn = _function(provider)
    leaves = {n: t.detach().requires_grad_() for n, t in _arguments(provider, x).items()}

    def run():
        return dict(zip(leaves, torch.autograd.grad(fn(*leaves.values()), list(leaves.values()), x["do"])))

    ref = chunk_kda_bwd_reference(
        *_reference_args(x), x["do"].float(), None, K**-0.5, False, x["A_log"], x["dt_bias"], _bound(provider)
    )
    ref = dict(zip(("dq", "dk", "dv", "dz", "dbeta", "dh0", "dA_log", "ddt_bias"), ref))
    grads = run()
    if provider == "chunk_only":  # g's gradient stands for z's; no parameter gradients
        ref["dz"] = chunk_kda_bwd_reference(
            *_reference_args(dict(x, z=leaves["g"].detach())), x["do"].float(), None, K**-0.5, False
        )[3]
        grads["z"] = grads.pop("g")
    errors = {name: rel_rms(grads[leaf], ref[name]) for name, (leaf, _) in GRADS.items() if leaf in grads}
    del ref, grads
    for name, err in errors.items():
        assert err <= GRADS[name][1], f"{provider}: {name} relative RMS error {err:.2e} > {GRADS[name][1]}"

    peak, peak_extra = _peak_memory(run)
    ms = triton.testing.do_bench(run, return_mode="median")
    benchmark.group = f"chunk_kda gate fwdbwd B={B} T={T} H={H}"
    benchmark.extra_info.update(
        op="chunk_kda_gate_fwdbwd", provider=provider, shape=dict(B=B, T=T, H=H, K=K, V=V), ms=ms,
        tflops=3 * _forward_flops(B, T, H) / (ms * 1e-3) / 1e12, kernels=kernel_times(run, 3),
        peak_memory_bytes=peak, peak_memory_above_inputs_bytes=peak_extra, rel_rms_errors=errors,
    )

    def run_sync():
        run()
        torch.cuda.synchronize()

    benchmark.pedantic(run_sync, rounds=10, warmup_rounds=1)
