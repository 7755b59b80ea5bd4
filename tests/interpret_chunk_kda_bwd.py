"""Runs the chunked KDA backward Triton kernels under TRITON_INTERPRET=1 on CPU against meta's
chunked backward reference; exits non-zero on any mismatch.

Run as a script (test_chunk_kda_bwd_kernel.py starts it in a subprocess, because
TRITON_INTERPRET must be set before triton is first imported). Tiny shapes, every feature:
T = 1, T < 64, T = 64, T not a multiple of 64, several chunks, several K and V tiles,
non-power-of-two K and V, initial state on/off, dht on/off, in-kernel L2 norm on/off, gates of
-1000, varlen with tiny and empty sequences (and an unused chunk slot), the forward's residuals
read back or recomputed (the backward must not write them), half-precision storage
of the intermediates with fp32 beta (fp16: the interpreter's bf16 tl.dot is wrong in triton
3.7.1; bf16 is covered by the GPU tests), the in-op Kimi gate in both forms, softplus and bounded
(g is z; dz, dA_log and ddt_bias too; kda_inputs.kimi_gate_inputs). Every gradient is written into a NaN-prefilled buffer,
so unwritten elements show, and the launchers' scratch starts as NaN (kda_inputs.poisoned_scratch).

The oracle is meta's chunked backward in fp64. fp32 kernels must be as accurate as the same
reference run in fp32, within a factor of 3: with gates of -1000 the cumulative gate reaches
-64000 and both lose ~1e-4 to its fp32 rounding, so a fixed tight bar would test that rounding,
not the kernels. fp16 stores w, qg, kg, h, dh and the gradients in fp16: a few roundings of
2^-11 each, bar 1e-3 (the forward's).
"""

import os
import sys

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("interpret_chunk_kda_bwd.py needs TRITON_INTERPRET=1 in its environment")

import torch

from kda_ops.kernels.chunk_kda_bwd import chunk_kda_bwd_triton
from kda_ops.kernels.chunk_kda_fwd import chunk_kda_fwd_triton
from kda_ops.meta.chunk_kda import RESIDUAL_NAMES, chunk_kda_bwd_meta, chunk_kda_fwd_meta, chunk_kda_residuals_meta
from kda_ops.meta.chunk_kda_bwd import chunk_kda_bwd_reference
from kda_ops.meta.kda_recurrent import l2norm
from kda_inputs import GATE_LOWER_BOUND, kimi_gate_inputs, poisoned_scratch

NAMES = ("dq", "dk", "dv", "dg", "dbeta", "dh0", "dA_log", "ddt_bias")
FP16_BAR = 1e-3

# (id, B, T, H, K, V, cu_seqlens, initial state, dht, l2norm, -1000 gates, dtype, beta dtype,
#  residuals: the forward kernels keep them and the backward reads them, else it recomputes them;
#  in-op gate: None, "softplus" or "bounded" (GATE_LOWER_BOUND); -1000 gates then mean a head at
#  exp(A_log) = 16)
CASES = [
    ("T1-K32-h0-dht-l2", 1, 1, 1, 32, 32, None, True, True, True, False, torch.float32, torch.float32, False, None),
    ("T20-K20V12-l2-gate1000", 1, 20, 1, 20, 12, None, False, False, True, True, torch.float32, torch.float32, False,
     False),
    ("T64-K32-h0-gate1000", 1, 64, 1, 32, 32, None, True, False, False, True, torch.float32, torch.float32, False,
     False),
    ("B2-T70-K32-h0-dht-l2", 2, 70, 1, 32, 32, None, True, True, True, False, torch.float32, torch.float32, False,
     False),
    ("T130-H2-K40V48-dht-gate1000", 1, 130, 2, 40, 48, None, False, True, False, True, torch.float32, torch.float32,
     False, None),
    ("varlen-1-15-100-h0-dht-l2-gate1000", 1, 100, 1, 32, 32, [0, 1, 15, 100], True, True, True, True,
     torch.float32, torch.float32, False, None),
    ("varlen-0-3-67-K20V24-h0-dht-l2", 1, 70, 1, 20, 24, [0, 0, 3, 70], True, True, True, False,
     torch.float32, torch.float32, False, None),
    ("fp16-T70-K32-h0-dht-l2-beta32", 1, 70, 1, 32, 32, None, True, True, True, False, torch.float16, torch.float32,
     False, None),
    ("residuals-T130-H2-K40V48-dht-gate1000", 1, 130, 2, 40, 48, None, False, True, False, True, torch.float32,
     torch.float32, True, None),
    ("residuals-varlen-0-3-67-K20V24-h0-dht-l2", 1, 70, 1, 20, 24, [0, 0, 3, 70], True, True, True, False,
     torch.float32, torch.float32, True, None),
    ("residuals-fp16-T70-K32-h0-dht-l2-beta32", 1, 70, 1, 32, 32, None, True, True, True, False, torch.float16,
     torch.float32, True, None),
    ("in-op-gate-T130-H2-K40V48-dht-strong", 1, 130, 2, 40, 48, None, False, True, False, True, torch.float32,
     torch.float32, False, "softplus"),
    ("in-op-gate-residuals-varlen-0-3-67-K20V24-h0-dht-l2", 1, 70, 1, 20, 24, [0, 0, 3, 70], True, True, True, False,
     torch.float32, torch.float32, True, "softplus"),
    ("in-op-gate-residuals-fp16-T70-K32-l2-beta32", 1, 70, 1, 32, 32, None, False, True, True, False, torch.float16,
     torch.float32, True, "softplus"),
    ("bounded-gate-T130-H2-K40V48-h0-dht-strong", 1, 130, 2, 40, 48, None, True, True, False, True, torch.float32,
     torch.float32, False, "bounded"),
    ("bounded-gate-residuals-varlen-0-3-67-K20V24-dht-l2", 1, 70, 1, 20, 24, [0, 0, 3, 70], False, True, True, False,
     torch.float32, torch.float32, True, "bounded"),
]


def make_inputs(B, T, H, K, V, gate1000, l2, dtype, beta_dtype, gen):
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    if not l2:
        k = l2norm(k)  # keeps the delta rule stable without the in-kernel norm
    v = torch.randn(B, T, H, V, generator=gen)
    g = -torch.nn.functional.softplus(torch.randn(B, T, H, K, generator=gen)) * 0.5
    if gate1000:
        g = torch.where(torch.rand(B, T, H, K, generator=gen) < 0.1, torch.full_like(g, -1000.0), g)
        g[..., 0] = -1000.0  # one channel forgets at every step
    beta = torch.rand(B, T, H, generator=gen).to(beta_dtype)
    do = torch.randn(B, T, H, V, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype), g, beta, do.to(dtype)


def _to(x, dtype):
    return None if x is None else x.to(dtype)


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def forward_residuals(q, k, v, g, beta, initial_state, cu_seqlens, scale, l2, gate) -> dict[str, torch.Tensor]:
    """The residuals as the forward kernels write them (NaN-prefilled, so unwritten rows show)."""
    residuals = dict(zip(RESIDUAL_NAMES, chunk_kda_residuals_meta(q, l2, save=True)))
    for r in residuals.values():
        r.fill_(float("nan"))
    o, final_state = chunk_kda_fwd_meta(q, k, v, g, beta, initial_state, cu_seqlens, scale, False, l2, **gate)
    with poisoned_scratch():
        chunk_kda_fwd_triton(
            q, k, v, g, beta, initial_state, cu_seqlens, scale, l2, o, final_state, residuals=residuals, **gate
        )
    return residuals


def run_case(case, gen) -> list[str]:
    name, B, T, H, K, V, cu, h0, with_dht, l2, gate1000, dtype, beta_dtype, from_residuals, in_op_gate = case
    q, k, v, g, beta, do = make_inputs(B, T, H, K, V, gate1000 and not in_op_gate, l2, dtype, beta_dtype, gen)
    gate = {}
    if in_op_gate:
        g, A_log, dt_bias = kimi_gate_inputs(B, T, H, K, z_dtype=dtype, strong_head=gate1000, generator=gen)
        gate = dict(A_log=A_log, dt_bias=dt_bias)
        if in_op_gate == "bounded":
            gate["gate_lower_bound"] = GATE_LOWER_BOUND
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    N = B if cu is None else len(cu) - 1
    initial_state = torch.randn(N, H, K, V, generator=gen) if h0 else None
    dht = torch.randn(N, H, K, V, generator=gen) if with_dht else None
    scale = K**-0.5
    residuals = None
    if from_residuals:
        residuals = forward_residuals(q, k, v, g, beta, initial_state, cu_seqlens, scale, l2, gate)
    kept = None if residuals is None else {n: r.clone() for n, r in residuals.items()}
    outs = chunk_kda_bwd_meta(q, k, v, g, beta, initial_state, cu_seqlens, do, dht, scale, l2, **gate)
    for out in outs:
        out.fill_(float("nan"))
    with poisoned_scratch():
        chunk_kda_bwd_triton(
            q, k, v, g, beta, initial_state, cu_seqlens, do, dht, scale, l2, *outs, residuals=residuals, **gate
        )
    failures = []
    if residuals is not None:
        failures += [f"{name}: the backward wrote the residual {n}" for n, r in residuals.items()
                     if not torch.equal(r.nan_to_num(), kept[n].nan_to_num())]
        failures += [f"{name}: the forward left rows of the residual {n} unwritten" for n, r in residuals.items()
                     if not torch.isfinite(r).all()]
    args = (q, k, v, g, beta, initial_state)
    ref64 = chunk_kda_bwd_reference(
        *(_to(x, torch.float64) for x in args), cu_seqlens, do.double(), _to(dht, torch.float64), scale, l2,
        **{n: p.double() if torch.is_tensor(p) else p for n, p in gate.items()},
    )
    ref32 = chunk_kda_bwd_reference(
        *(_to(x, torch.float32) for x in args), cu_seqlens, do.float(), dht, scale, l2, **gate
    )
    for what, x, r64, r32 in zip(NAMES, outs, ref64, ref32):
        if (what == "dh0" and not h0) or (what in ("dA_log", "ddt_bias") and not in_op_gate):
            if x.numel() != 0:
                failures.append(f"{name}: {what} must be empty without its input")
            continue
        if not torch.isfinite(x).all():
            failures.append(f"{name}: {what} has NaN/Inf (unwritten or overflowed elements)")
            continue
        err = rel_err(x, r64)
        tol = 3 * rel_err(r32, r64) + 1e-6 if dtype == torch.float32 else FP16_BAR
        print(f"{name:36s} {what:6s} rel err {err:.2e} (bar {tol:.1e})")
        if not err <= tol:
            failures.append(f"{name}: {what} rel err {err:.3e} > {tol:.1e}")
    return failures


def main() -> int:
    gen = torch.Generator().manual_seed(0)
    failures = [f for case in CASES for f in run_case(case, gen)]
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
