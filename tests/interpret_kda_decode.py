"""Runs the kda_decode and causal_conv1d_update Triton kernels under TRITON_INTERPRET=1 on CPU
against meta's references; exits non-zero on any mismatch.

Run as a script (test_kda_decode_kernel.py starts it in a subprocess, because TRITON_INTERPRET must
be set before triton is first imported). Tiny shapes: non-power-of-two K, V and D, several V and D
tiles, T = 1..8, in-kernel L2 norm on/off, bf16/fp16/fp32 inputs, fp32 beta with bf16 inputs, the
gate computed in the kernel from z, A_log, dt_bias (both softplus branches; the bounded form, both
sigmoid tails, its output checked to differ from the softplus form's), conv widths 2..4,
padding rows with NaN inputs, an index past the pool (treated as padding), outputs pre-filled with
NaN, unused slots NaN-poisoned and compared bit-exactly.
"""

import os
import sys
import warnings

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("interpret_kda_decode.py needs TRITON_INTERPRET=1 in its environment")

# the kernels must not overflow anywhere, masked lanes and untaken branches included (numpy warns
# on inf/NaN)
warnings.simplefilter("error", RuntimeWarning)

import torch

from kda_ops.kernels.kda_decode import causal_conv1d_update_fwd, kda_decode_fwd
from kda_ops.meta.kda_decode import causal_conv1d_update_reference, kda_decode_reference

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

# (id, B, T, H, K, V, S, state_indices (None: slot b), l2norm, dtype, beta dtype, gate in kernel,
#  gate lower bound (None: the softplus form))
DECODE_CASES = [
    ("fp32-T1-K12V20-l2", 3, 1, 2, 12, 20, 6, [4, -1, 0], True, FP32, FP32, False, None),
    ("fp32-T3-K16V8", 2, 3, 2, 16, 8, 4, [1, 3], False, FP32, FP32, False, None),
    ("bf16-T2-K20V12-l2-beta32", 3, 2, 1, 20, 12, 5, [-1, 2, 0], True, BF16, FP32, False, None),
    ("fp16-T8-K8V16-slot-b", 2, 8, 1, 8, 16, 3, None, True, FP16, FP16, False, None),
    ("fp32-index-past-pool", 2, 2, 1, 8, 8, 3, [3, 1], True, FP32, FP32, False, None),
    ("bf16-all-padding", 2, 2, 2, 8, 8, 3, [-1, -1], True, BF16, BF16, False, None),
    ("gate-fp32-T3-K12V20", 3, 3, 2, 12, 20, 5, [2, -1, 4], False, FP32, FP32, True, None),
    ("gate-bf16-T1-K20V12-l2", 2, 1, 3, 20, 12, 4, [3, 0], True, BF16, BF16, True, None),
    ("gate-fp16-T8-K8V16-slot-b", 2, 8, 1, 8, 16, 2, None, True, FP16, FP32, True, None),
    ("bounded-gate-fp32-T3-K12V20", 3, 3, 2, 12, 20, 5, [2, -1, 4], False, FP32, FP32, True, -5.0),
    ("bounded-gate-bf16-T2-K20V12-l2", 2, 2, 3, 20, 12, 4, [3, 0], True, BF16, BF16, True, -0.7),
    ("bounded-gate-fp16-T8-K8V16-slot-b", 2, 8, 1, 8, 16, 2, None, True, FP16, FP32, True, -5.0),
]

# (id, B, T, D, W, S, state_indices (None: slot b), dtype, weight dtype)
CONV_CASES = [
    ("fp32-W4-T1-D40", 3, 1, 40, 4, 5, [2, -1, 0], FP32, FP32),
    ("bf16-W4-T3-D300-wfp32", 2, 3, 300, 4, 3, [0, 2], BF16, FP32),
    ("fp32-W3-T2-D20", 2, 2, 20, 3, 4, [-1, 3], FP32, FP32),
    ("fp16-W2-T8-D9-slot-b", 2, 8, 9, 2, 2, None, FP16, FP16),
    ("fp32-W4-index-past-pool", 2, 2, 8, 4, 2, [2, 0], FP32, FP32),
]


def poison_unused(pool: torch.Tensor, slots: list[int]) -> list[int]:
    """NaN into every other slot no valid row uses (the rest keep random values); returns them."""
    unused = [s for s in range(pool.shape[0]) if s not in slots]
    for s in unused[1::2]:
        pool[s] = float("nan")
    return unused


def pool_rows(indices: list[int] | None, B: int, S: int) -> tuple[torch.Tensor, list[int], list[int]]:
    """(state_indices tensor, valid rows, their slots); an index < 0 or >= S is padding."""
    indices = list(range(B)) if indices is None else indices
    valid = [b for b, s in enumerate(indices) if 0 <= s < S]
    return torch.tensor(indices, dtype=torch.int32), valid, [indices[b] for b in valid]


def compare(name: str, what: str, got: torch.Tensor, want: torch.Tensor) -> list[str]:
    try:
        torch.testing.assert_close(got, want)
    except AssertionError as e:
        return [f"{name}: {what}: {str(e).splitlines()[0]}"]
    return []


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({4: torch.int32, 2: torch.int16}[x.element_size()])


def check_pool_and_padding(name, out, pool, before, valid, unused) -> list[str]:
    failures = []
    padding = [b for b in range(out.shape[0]) if b not in valid]
    if not torch.equal(out[padding], torch.zeros_like(out[padding])):
        failures.append(f"{name}: padding rows are not zeros")
    if not torch.isfinite(out[valid]).all():
        failures.append(f"{name}: output has NaN/Inf in valid rows (unwritten elements)")
    if not torch.equal(bits(pool[unused]), bits(before[unused])):
        failures.append(f"{name}: unused slots changed")
    return failures


def gate_inputs(B, T, H, K, dtype, in_kernel: bool, bounded: bool):
    """(g, A_log, dt_bias): the log-decay in (-0.5, 0] and None, None; or, for the in-kernel gate,
    its pre-activation z in dtype (channel 0 where exp(z) overflows fp32, so softplus must take its
    identity branch; channel 1 far below 0), A_log [H] and dt_bias [H*K] in fp32. Bounded: A_log
    near 0, so exp(A_log) * (z + dt_bias) puts channel 0 and 1 in the sigmoid's tails (g = the
    bound, g = 0) and spreads the other channels over its slope."""
    if not in_kernel:
        return -torch.rand(B, T, H, K) * 0.5, None, None
    z = torch.randn(B, T, H, K) * 4
    z[..., 0] = 100.0
    z[..., 1] = -30.0
    return z.to(dtype), torch.randn(H) * 0.5 - (0 if bounded else 3), torch.randn(H * K)


def run_decode_case(case) -> list[str]:
    name, B, T, H, K, V, S, indices, l2, dtype, beta_dtype, in_kernel, lower_bound = case
    q = torch.randn(B, T, H, K).to(dtype)
    k = torch.randn(B, T, H, K)
    k = (k if l2 else k / k.norm(dim=-1, keepdim=True)).to(dtype)
    v = torch.randn(B, T, H, V).to(dtype)
    g, A_log, dt_bias = gate_inputs(B, T, H, K, dtype, in_kernel, lower_bound is not None)
    beta = torch.rand(B, T, H).to(beta_dtype)
    state_indices, valid, slots = pool_rows(indices, B, S)
    padding = [b for b in range(B) if b not in valid]
    for x in (q, k, v, g, beta):
        x[padding] = float("nan")
    pool = torch.randn(S, H, K, V)
    unused = poison_unused(pool, slots)
    before = pool.clone()
    o = torch.full((B, T, H, V), float("nan"), dtype=dtype)
    kda_decode_fwd(q, k, v, g, beta, pool, state_indices, o, K**-0.5, l2, A_log, dt_bias, lower_bound)

    failures = check_pool_and_padding(name, o, pool, before, valid, unused)
    if valid:

        def reference(bound):
            ref_pool = before.clone()
            ref_o = kda_decode_reference(
                q[valid], k[valid], v[valid], g[valid], beta[valid], ref_pool, state_indices[valid], K**-0.5, l2,
                A_log, dt_bias, bound,
            )
            return ref_o, ref_pool

        ref_o, ref_pool = reference(lower_bound)
        failures += compare(name, "o", o[valid], ref_o)
        failures += compare(name, "state", pool[slots], ref_pool[slots])
        # the bounded case must tell the two forms apart: its o is not the softplus form's
        if lower_bound is not None and not compare(name, "o", o[valid], reference(None)[0]):
            failures.append(f"{name}: o equals the softplus gate's (the bound is not exercised)")
    return failures


def run_conv_case(case) -> list[str]:
    name, B, T, D, W, S, indices, dtype, weight_dtype = case
    x = torch.randn(B, T, D).to(dtype)
    weight = torch.randn(D, W).to(weight_dtype)
    state_indices, valid, slots = pool_rows(indices, B, S)
    padding = [b for b in range(B) if b not in valid]
    x[padding] = float("nan")
    pool = torch.randn(S, D, W - 1).to(dtype)
    unused = poison_unused(pool, slots)
    before = pool.clone()
    y = torch.full((B, T, D), float("nan"), dtype=dtype)
    causal_conv1d_update_fwd(x, pool, weight, state_indices, y)

    failures = check_pool_and_padding(name, y, pool, before, valid, unused)
    if valid:
        ref_pool = before.clone()
        ref_y = causal_conv1d_update_reference(x[valid], ref_pool, weight, state_indices[valid])
        failures += compare(name, "y", y[valid], ref_y)
        if not torch.equal(pool[slots], ref_pool[slots]):
            failures.append(f"{name}: conv state differs from the reference (copies of inputs: must be exact)")
    return failures


def main() -> int:
    torch.manual_seed(0)
    failures = []
    runs = [(run_decode_case, c) for c in DECODE_CASES] + [(run_conv_case, c) for c in CONV_CASES]
    for run, case in runs:
        case_failures = run(case)
        print(f"{'FAIL' if case_failures else 'ok  '} {case[0]}")
        failures += case_failures
    for f in failures:
        print(f, file=sys.stderr)
    print(f"{len(runs)} cases, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
