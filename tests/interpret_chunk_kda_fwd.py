"""Runs the chunked KDA forward Triton kernels under TRITON_INTERPRET=1 on CPU against meta's
fp32 chunked reference; exits non-zero on any mismatch.

Run as a script (test_chunk_kda_fwd_kernel.py starts it in a subprocess, because
TRITON_INTERPRET must be set before triton is first imported). Tiny shapes, every feature:
T < 64, T = 64, T not a multiple of 64, several chunks, non-power-of-two K and V, initial state
on/off, final state on/off, in-kernel L2 norm, gates of -1000, varlen with tiny sequences,
half-precision storage of the intermediates with fp32 beta (fp16: the interpreter's bf16
tl.dot is wrong in triton 3.7.1; bf16 is covered by the GPU tests), the in-op Kimi gate (g is
z, with A_log and dt_bias; kda_inputs.kimi_gate_inputs) in both forms, softplus and bounded. The launcher's scratch
starts as NaN (kda_inputs.poisoned_scratch), so a kernel that reads scratch it never wrote fails.

The oracle is meta's chunked reference in fp64. fp32 kernels must be as accurate as the same
reference run in fp32, within a factor of 3 (seen up to 1.6 over seeds): with gates of -1000 the cumulative gate reaches
-64000 and both lose ~1e-4 to its fp32 rounding, so a fixed tight bar would test the rounding,
not the kernels.
"""

import os
import sys
import warnings

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("interpret_chunk_kda_fwd.py needs TRITON_INTERPRET=1 in its environment")

# the kernels must not overflow anywhere, masked lanes included (numpy warns on inf/NaN)
warnings.simplefilter("error", RuntimeWarning)

import torch

from kda_ops.kernels.chunk_kda_fwd import chunk_kda_fwd_triton, chunk_table
from kda_ops.meta.chunk_kda import chunk_kda_fwd_reference
from kda_ops.meta.kda_recurrent import l2norm
from kda_inputs import GATE_LOWER_BOUND, kimi_gate_inputs, poisoned_scratch, rel_rms

# (id, B, T, H, K, V, cu_seqlens, initial state, final state, l2norm, -1000 gates, dtype, beta dtype,
#  in-op gate: None, "softplus" or "bounded" (GATE_LOWER_BOUND); -1000 gates then mean a head at
#  exp(A_log) = 16)
CASES = [
    ("T1-K32-h0", 1, 1, 1, 32, 32, None, True, True, False, False, torch.float32, torch.float32, None),
    ("T20-K20V12-l2", 1, 20, 1, 20, 12, None, False, True, True, True, torch.float32, torch.float32, None),
    ("T64-K32-h0-gate1000", 1, 64, 1, 32, 32, None, True, True, False, True, torch.float32, torch.float32, None),
    ("B2-T70-K32-h0-l2-nofinal", 2, 70, 1, 32, 32, None, True, False, True, False, torch.float32, torch.float32, None),
    ("T130-H2-K32V16-gate1000", 1, 130, 2, 32, 16, None, False, True, False, True, torch.float32, torch.float32, None),
    ("varlen-1-15-100-h0-l2-gate1000", 1, 100, 1, 32, 32, [0, 1, 15, 100], True, True, True, True, torch.float32,
     torch.float32, None),
    ("fp16-T70-K32-h0-l2-beta32", 1, 70, 1, 32, 32, None, True, True, True, False, torch.float16, torch.float32, None),
    ("in-op-gate-T130-H2-K40V16-strong", 1, 130, 2, 40, 16, None, False, True, False, True, torch.float32,
     torch.float32, "softplus"),
    ("in-op-gate-varlen-0-3-67-h0-l2", 1, 70, 1, 32, 32, [0, 0, 3, 70], True, True, True, False, torch.float32,
     torch.float32, "softplus"),
    ("in-op-gate-fp16-T70-K32-l2-beta32", 1, 70, 1, 32, 32, None, False, True, True, False, torch.float16,
     torch.float32, "softplus"),
    ("bounded-gate-T130-H2-K40V16-strong", 1, 130, 2, 40, 16, None, True, True, False, True, torch.float32,
     torch.float32, "bounded"),
    ("bounded-gate-varlen-0-3-67-l2", 1, 70, 1, 32, 32, [0, 0, 3, 70], False, True, True, False, torch.float32,
     torch.float32, "bounded"),
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
    return q.to(dtype), k.to(dtype), v.to(dtype), g, beta


def _to(x, dtype):
    return None if x is None else x.to(dtype)


def run_case(case, gen) -> list[str]:
    name, B, T, H, K, V, cu, h0, final, l2, gate1000, dtype, beta_dtype, in_op_gate = case
    q, k, v, g, beta = make_inputs(B, T, H, K, V, gate1000 and not in_op_gate, l2, dtype, beta_dtype, gen)
    gate = {}
    if in_op_gate:
        g, A_log, dt_bias = kimi_gate_inputs(B, T, H, K, z_dtype=dtype, strong_head=gate1000, generator=gen)
        g[..., 2] = 100.0  # e^z overflows fp32 here: neither side of softplus's branch may form it
        gate = dict(A_log=A_log, dt_bias=dt_bias)
        if in_op_gate == "bounded":
            gate["gate_lower_bound"] = GATE_LOWER_BOUND
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    N = B if cu is None else len(cu) - 1
    initial_state = torch.randn(N, H, K, V, generator=gen) if h0 else None
    scale = K**-0.5
    o = torch.full((B, T, H, V), float("nan"), dtype=dtype)
    final_state = torch.full((N, H, K, V) if final else (0,), float("nan"))
    with poisoned_scratch():
        chunk_kda_fwd_triton(q, k, v, g, beta, initial_state, cu_seqlens, scale, l2, o, final_state, **gate)
    args = (q, k, v, g, beta, initial_state)
    ref64 = chunk_kda_fwd_reference(
        *(_to(x, torch.float64) for x in args), cu_seqlens, scale, True, l2,
        **{n: p.double() if torch.is_tensor(p) else p for n, p in gate.items()},
    )
    ref32 = chunk_kda_fwd_reference(*(_to(x, torch.float32) for x in args), cu_seqlens, scale, True, l2, **gate)
    failures = []
    checks = [("o", o, 0)] + ([("final_state", final_state, 1)] if final else [])
    for what, x, i in checks:
        if not torch.isfinite(x).all():
            failures.append(f"{name}: {what} has NaN/Inf (unwritten or overflowed elements)")
            continue
        err = rel_rms(x, ref64[i])
        # fp16 stores w, u, qg, kg, A_qk and o in fp16: a few roundings of 2^-11 each
        tol = 3 * rel_rms(ref32[i], ref64[i]) + 1e-6 if dtype == torch.float32 else 1e-3
        print(f"{name:34s} {what:12s} rel err {err:.2e} (bar {tol:.1e})")
        if not err <= tol:
            failures.append(f"{name}: {what} rel err {err:.3e} > {tol:.1e}")
    if not final and final_state.numel() != 0:
        failures.append(f"{name}: final state not requested but written")
    return failures


def check_chunk_table(gen) -> list[str]:
    """The varlen slot -> sequence table against host-built lists, including empty sequences
    and more sequences than one block of the table kernel (128)."""
    many = torch.randint(0, 150, (200,), generator=gen)
    many[::7] = 0
    cases = [[0, 15, 100, 300], [0, 0, 15, 100, 300, 1200, 2000], [0, 64, 128, 129, 129]]
    cases.append([0] + many.cumsum(0).tolist())
    failures = []
    for cu in cases:
        lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
        counts = [-(-n_len // 64) for n_len in lens]
        want_seq = [n for n, c in enumerate(counts) for _ in range(c)]
        want_offsets = [sum(counts[:n]) for n in range(len(counts) + 1)]
        chunk_seq, chunk_offsets, slots = chunk_table(torch.tensor(cu, dtype=torch.int64), cu[-1], lambda kernel: kernel)
        want_seq += [len(lens)] * (slots - len(want_seq))
        if chunk_seq.tolist() != want_seq or chunk_offsets.tolist() != want_offsets:
            failures.append(f"chunk table of {len(lens)} sequences differs from the host-built one")
    print(f"chunk table: {len(cases)} cases, {len(failures)} failures")
    return failures


def main() -> int:
    gen = torch.Generator().manual_seed(0)
    failures = check_chunk_table(gen)
    failures += [f for case in CASES for f in run_case(case, gen)]
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
