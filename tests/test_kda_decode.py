"""kda::kda_decode and kda::causal_conv1d_update on the reference path (CPU), and the prefill conv
causal_conv1d: numerics against the naive recurrence / a naive conv, state-pool semantics (slots,
padding rows, untouched slots bit-exact), prefill -> decode continuity, opcheck, contract errors,
torch.compile and torch.export with the pools as module buffers."""

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from decode_layer import DecodeLayer, layer_inputs, twin
from kda_inputs import rel_rms
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode

import kda_ops
from kda_ops.meta._contract import ContractError
from kda_ops.meta.kda_recurrent import l2norm, recurrent_kda

F64 = torch.float64


def decode_inputs(B, T, H, K, V, *, dtype=F64, beta_dtype=None, use_qk_l2norm=True):
    """q, k, v in dtype; g (log-decay in [-0.5, 0)) in the accumulation dtype; beta in (0, 1).
    Without the in-op norm k is normalised here, so the delta rule stays contractive."""
    acc = F64 if dtype == F64 else torch.float32
    k = torch.randn(B, T, H, K, dtype=acc)
    if not use_qk_l2norm:
        k = l2norm(k)
    return dict(
        q=torch.randn(B, T, H, K, dtype=dtype),
        k=k.to(dtype),
        v=torch.randn(B, T, H, V, dtype=dtype),
        g=-torch.rand(B, T, H, K, dtype=acc) * 0.5,
        beta=torch.rand(B, T, H, dtype=beta_dtype or dtype),
    )


def random_pool(S, *shape, dtype=torch.float32, nan_slots=()):
    pool = torch.randn(S, *shape, dtype=dtype)
    for s in nan_slots:
        pool[s] = float("nan")
    return pool


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Bit-exact equality (NaN payloads included)."""
    ints = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    assert a.shape == b.shape, what
    assert torch.equal(a.view(ints[a.dtype]), b.view(ints[b.dtype])), f"{what}: bits changed"


def rows_of(x: dict, rows: list[int]) -> dict:
    return {n: t[rows] for n, t in x.items()}


# ------------------------------------------------------------------------------------------------
# kda_decode numerics


DECODE_CASES = [
    pytest.param(dict(T=1, K=12, V=20, l2=False), id="T1-K12V20"),
    pytest.param(dict(T=1, K=20, V=12, l2=True), id="T1-K20V12-l2norm"),
    pytest.param(dict(T=4, K=12, V=20, l2=False), id="T4-K12V20"),
    pytest.param(dict(T=4, K=20, V=12, l2=True), id="T4-K20V12-l2norm"),
    pytest.param(dict(T=8, K=6, V=10, l2=True), id="T8-K6V10-l2norm"),
]


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_matches_recurrence_fp64(case):
    B, H, S = 4, 3, 9
    x = decode_inputs(B, case["T"], H, case["K"], case["V"], use_qk_l2norm=case["l2"])
    pool = random_pool(S, H, case["K"], case["V"], dtype=F64)
    slots = torch.randperm(S)[:B]
    before = pool.clone()
    o = kda_ops.kda_decode(**x, state=pool, state_indices=slots.to(torch.int32), scale=0.3, use_qk_l2norm=case["l2"])
    o_ref, s_ref = recurrent_kda(
        **x, scale=0.3, initial_state=before[slots], output_final_state=True, use_qk_l2norm=case["l2"]
    )
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pool[slots], s_ref, rtol=1e-12, atol=1e-12)
    unused = [s for s in range(S) if s not in slots.tolist()]
    assert_bits_equal(pool[unused], before[unused], "unused slots")


ACCURACY_CASES = [
    pytest.param(torch.float32, torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, torch.bfloat16, id="bf16"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16-beta-fp32"),
]


@pytest.mark.parametrize("dtype, beta_dtype", ACCURACY_CASES)
def test_decode_low_precision_inputs_meet_the_bars(dtype, beta_dtype):
    """Against the fp64 recurrence on the same (rounded) inputs: o and state within 0.005."""
    B, T, H, K, V, S = 3, 4, 2, 32, 24, 5
    x = decode_inputs(B, T, H, K, V, dtype=dtype, beta_dtype=beta_dtype)
    pool = random_pool(S, H, K, V)
    slots = torch.tensor([3, 0, 4], dtype=torch.int32)
    before = pool.clone()
    o = kda_ops.kda_decode(**x, state=pool, state_indices=slots, use_qk_l2norm=True)
    assert o.dtype == dtype
    x64 = {n: t.double() for n, t in x.items()}
    o_ref, s_ref = recurrent_kda(
        **x64, initial_state=before[slots.long()].double(), output_final_state=True, use_qk_l2norm=True
    )
    assert rel_rms(o, o_ref) <= 0.005
    assert rel_rms(pool[slots.long()], s_ref) <= 0.005


PADDING_CASES = [
    pytest.param([3, -1, 5, -1], id="padding-slot0-unused"),
    pytest.param([-1, 0, 4], id="padding-slot0-used"),
    pytest.param([6, 2, 0, 1], id="no-padding-shuffled"),
    pytest.param([-1, -1], id="all-padding"),
]


@pytest.mark.parametrize("indices", PADDING_CASES)
def test_decode_padding_rows_and_untouched_slots(indices):
    """Padding rows (NaN inputs) give zeros and write nothing; slots no valid row names (NaN or
    random) keep their bits, slot 0 included; valid rows match the recurrence."""
    B, T, H, K, V, S = len(indices), 3, 2, 10, 7, 7
    x = decode_inputs(B, T, H, K, V)
    pad = [b for b, s in enumerate(indices) if s < 0]
    valid = [b for b, s in enumerate(indices) if s >= 0]
    used = [indices[b] for b in valid]
    unused = [s for s in range(S) if s not in used]
    for t in x.values():
        t[pad] = float("nan")
    pool = random_pool(S, H, K, V, dtype=F64, nan_slots=unused[1::2])
    before = pool.clone()
    o = kda_ops.kda_decode(**x, state=pool, state_indices=torch.tensor(indices), use_qk_l2norm=True)
    assert torch.equal(o[pad], torch.zeros_like(o[pad]))
    assert_bits_equal(pool[unused], before[unused], "unused slots")
    if valid:
        o_ref, s_ref = recurrent_kda(
            **rows_of(x, valid), initial_state=before[used], output_final_state=True, use_qk_l2norm=True
        )
        torch.testing.assert_close(o[valid], o_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pool[used], s_ref, rtol=1e-12, atol=1e-12)


def test_decode_without_indices_uses_slot_b():
    B, T, H, K, V, S = 3, 2, 2, 8, 8, 5
    x = decode_inputs(B, T, H, K, V)
    pool = random_pool(S, H, K, V, dtype=F64, nan_slots=[4])
    before = pool.clone()
    o = kda_ops.kda_decode(**x, state=pool, use_qk_l2norm=True)
    o_ref, s_ref = recurrent_kda(**x, initial_state=before[:B], output_final_state=True, use_qk_l2norm=True)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pool[:B], s_ref, rtol=1e-12, atol=1e-12)
    assert_bits_equal(pool[B:], before[B:], "slots >= B")


CONTINUITY_CASES = [
    pytest.param(None, [2, 1, 3], id="batch2-T70-then-2-1-3"),
    pytest.param([0, 5, 75], [1, 4], id="varlen-5-70-then-1-4"),
]


@pytest.mark.parametrize("cu, steps", CONTINUITY_CASES)
def test_decode_continues_chunked_prefill(cu, steps):
    """chunk_kda over the prompt, its final states into pool slots, then decode steps: equal to
    the naive recurrence over prompt + decoded tokens."""
    H, K, V, S, n_dec = 2, 12, 10, 6, sum(steps)
    lengths = [70, 70] if cu is None else [cu[i + 1] - cu[i] for i in range(len(cu) - 1)]
    N = len(lengths)
    full = [decode_inputs(1, L + n_dec, H, K, V) for L in lengths]
    prompt = [{n: t[:, :L] for n, t in f.items()} for f, L in zip(full, lengths)]
    if cu is None:
        packed = {n: torch.cat([p[n] for p in prompt]) for n in prompt[0]}
        cu_seqlens = None
    else:
        packed = {n: torch.cat([p[n] for p in prompt], dim=1) for n in prompt[0]}
        cu_seqlens = torch.tensor(cu, dtype=torch.int32)
    _, final = kda_ops.chunk_kda(**packed, output_final_state=True, use_qk_l2norm=True, cu_seqlens=cu_seqlens)
    pool = random_pool(S, H, K, V, dtype=F64)
    slots = torch.tensor([4, 1][:N], dtype=torch.int32)
    pool[slots.long()] = final
    outputs, t0 = [], 0
    for T in steps:
        step = {n: torch.cat([f[n][:, L + t0 : L + t0 + T] for f, L in zip(full, lengths)]) for n in full[0]}
        outputs.append(kda_ops.kda_decode(**step, state=pool, state_indices=slots, use_qk_l2norm=True))
        t0 += T
    decoded = torch.cat(outputs, dim=1)
    for i, (f, L) in enumerate(zip(full, lengths)):
        o_ref, s_ref = recurrent_kda(**f, output_final_state=True, use_qk_l2norm=True)
        torch.testing.assert_close(decoded[i], o_ref[0, L:], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(pool[slots[i]], s_ref[0], rtol=1e-10, atol=1e-10)


def gate_inputs(B, T, H, K, *, dtype=F64):
    """The in-op gate's inputs: z [B, T, H, K] in dtype, with channel 0 where exp(z) overflows
    fp32 (softplus must take its identity branch above 20) and channel 1 far below 0; A_log [H],
    dt_bias [H*K] in the accumulation dtype."""
    acc = F64 if dtype == F64 else torch.float32
    z = torch.randn(B, T, H, K, dtype=acc) * 8
    z[..., 0] = 100.0
    z[..., 1] = -40.0
    return z.to(dtype), torch.randn(H, dtype=acc) * 0.5 - 2, torch.randn(H * K, dtype=acc)


def naive_gate(z, A_log, dt_bias, lower_bound=None):
    """-exp(A_log[h]) * softplus(z + dt_bias), softplus written out (docs/kda_math.md §2); with
    lower_bound L, L * sigmoid(exp(A_log[h]) * (z + dt_bias)), sigmoid written out."""
    H, K = z.shape[2:]
    x = z.double() + dt_bias.double().view(H, K)
    a = A_log.double().exp()[:, None]  # [H, 1]
    if lower_bound is not None:
        return lower_bound / (1 + torch.exp(-a * x))
    softplus = torch.where(x > 20, x, torch.log1p(torch.exp(x)))
    return -a * softplus


IN_OP_GATE_CASES = [
    pytest.param(1, True, None, id="T1-l2norm"),
    pytest.param(5, False, None, id="T5"),
    pytest.param(1, True, -5.0, id="bounded-T1-l2norm"),
    pytest.param(5, False, -0.7, id="bounded-T5"),
]


@pytest.mark.parametrize("T, l2, lower_bound", IN_OP_GATE_CASES)
def test_decode_in_op_gate_matches_recurrence_fp64(T, l2, lower_bound):
    """g as the gate's pre-activation with A_log and dt_bias (and gate_lower_bound): equal to the
    recurrence over the gate computed by the written-out formula. A bounded case also checks that
    the op's output is not the softplus form's."""
    B, H, K, V, S = 3, 2, 10, 6, 5
    x = decode_inputs(B, T, H, K, V, use_qk_l2norm=l2)
    z, A_log, dt_bias = gate_inputs(B, T, H, K)
    pool = random_pool(S, H, K, V, dtype=F64)
    slots = torch.tensor([4, -1, 1])
    before = pool.clone()
    o = kda_ops.kda_decode(
        **dict(x, g=z),
        state=pool,
        state_indices=slots,
        use_qk_l2norm=l2,
        A_log=A_log,
        dt_bias=dt_bias,
        gate_lower_bound=lower_bound,
    )
    valid, used = [0, 2], [4, 1]
    if lower_bound is not None:
        o_softplus = recurrent_kda(
            **rows_of(dict(x, g=naive_gate(z, A_log, dt_bias)), valid), initial_state=before[used], use_qk_l2norm=l2
        )[0]
        assert not torch.allclose(o[valid], o_softplus), "the bounded gate gave the softplus form's output"
    o_ref, s_ref = recurrent_kda(
        **rows_of(dict(x, g=naive_gate(z, A_log, dt_bias, lower_bound)), valid),
        initial_state=before[used],
        output_final_state=True,
        use_qk_l2norm=l2,
    )
    torch.testing.assert_close(o[valid], o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pool[used], s_ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(o[1], torch.zeros_like(o[1]))
    unused = [0, 2, 3]
    assert_bits_equal(pool[unused], before[unused], "unused slots")


MODEL_GATE_CASES = [
    pytest.param(torch.bfloat16, None, id="bf16-z"),
    pytest.param(torch.float32, None, id="fp32-z"),
    pytest.param(torch.bfloat16, -5.0, id="bounded-bf16-z"),
]


@pytest.mark.parametrize("dtype, lower_bound", MODEL_GATE_CASES)
def test_decode_in_op_gate_is_bitwise_the_models_gate(dtype, lower_bound):
    """The reference path gives the same bits as precomputing g the way the model does (z cast to
    fp32, + dt_bias, softplus, times -exp(A_log) of shape [1, 1, H, 1]; bounded: lower_bound times
    the sigmoid of exp(A_log) times z + dt_bias) and passing it as g."""
    B, T, H, K, V, S = 2, 2, 3, 16, 8, 2
    x = decode_inputs(B, T, H, K, V, dtype=dtype)
    z, A_log, dt_bias = gate_inputs(B, T, H, K, dtype=dtype)
    pool = random_pool(S, H, K, V)
    pool_model = pool.clone()
    s = (z.float().view(B, T, -1) + dt_bias).view(B, T, H, K)
    if lower_bound is None:
        g = -A_log.view(1, 1, H, 1).exp() * F.softplus(s)
    else:
        g = lower_bound * torch.sigmoid(A_log.view(1, 1, H, 1).exp() * s)
    o = kda_ops.kda_decode(
        **dict(x, g=z), state=pool, use_qk_l2norm=True, A_log=A_log, dt_bias=dt_bias, gate_lower_bound=lower_bound
    )
    o_model = kda_ops.kda_decode(**dict(x, g=g), state=pool_model, use_qk_l2norm=True)
    assert_bits_equal(o, o_model, "o")
    assert_bits_equal(pool, pool_model, "state")


# ------------------------------------------------------------------------------------------------
# short convolution: prefill (causal_conv1d) and decode (causal_conv1d_update)


def naive_conv(x_seq, weight, init):
    """One sequence: x_seq [L, D], weight [D, W], init [D, W-1] -> (SiLU(conv) [L, D], last W-1
    inputs [D, W-1]), by explicit loops in fp64."""
    W = weight.shape[1]
    ext = torch.cat([init.t(), x_seq]).double()  # [W-1+L, D]
    y = ext.new_empty(x_seq.shape)
    for t in range(x_seq.shape[0]):
        y[t] = F.silu(sum(weight[:, j].double() * ext[t + j] for j in range(W)))
    return y, ext[-(W - 1) :].t()


PREFILL_CASES = [
    pytest.param(dict(lengths=[6, 6], cu=False, init=False, W=4), id="batch-no-init"),
    pytest.param(dict(lengths=[6, 6], cu=False, init=True, W=4), id="batch-init"),
    pytest.param(dict(lengths=[1, 2, 9], cu=True, init=True, W=4), id="varlen-short-seqs-init"),
    pytest.param(dict(lengths=[0, 4, 3], cu=True, init=True, W=3), id="varlen-empty-seq-W3"),
    pytest.param(dict(lengths=[5, 1], cu=True, init=False, W=2), id="varlen-W2"),
]


@pytest.mark.parametrize("case", PREFILL_CASES)
def test_causal_conv1d_matches_naive_conv(case):
    D, W, lengths = 5, case["W"], case["lengths"]
    N = len(lengths)
    weight = torch.randn(D, W, dtype=F64)
    init = torch.randn(N, D, W - 1, dtype=F64) if case["init"] else None
    seqs = [torch.randn(L, D, dtype=F64) for L in lengths]
    if case["cu"]:
        x = torch.cat(seqs)[None]
        cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int64)
    else:
        x, cu_seqlens = torch.stack(seqs), None
    y, final = kda_ops.causal_conv1d(x, weight, initial_state=init, cu_seqlens=cu_seqlens)
    y_seqs = y[0].split(lengths) if case["cu"] else list(y)
    for n in range(N):
        y_ref, final_ref = naive_conv(seqs[n], weight, init[n] if init is not None else torch.zeros(D, W - 1, dtype=F64))
        torch.testing.assert_close(y_seqs[n], y_ref, rtol=1e-12, atol=1e-12)
        assert torch.equal(final[n], final_ref), f"final state of sequence {n}"


def test_causal_conv1d_compiles_once_for_three_lengths():
    """Varlen prefill conv under torch.compile(fullgraph=True): one frame for three packed
    lengths (the first marked dynamic), equal to eager."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    conv = torch.compile(kda_ops.causal_conv1d, backend=counter, fullgraph=True)
    D, W = 6, 4
    weight = torch.randn(D, W)
    for i, lengths in enumerate(([3, 9], [1, 4, 20], [7, 2])):
        x = torch.randn(1, sum(lengths), D)
        cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
        init = torch.randn(len(lengths), D, W - 1)
        if i == 0:
            torch._dynamo.mark_dynamic(x, 1)
            torch._dynamo.mark_dynamic(cu_seqlens, 0)
            torch._dynamo.mark_dynamic(init, 0)
        for got, want in zip(conv(x, weight, init, cu_seqlens), kda_ops.causal_conv1d(x, weight, init, cu_seqlens)):
            torch.testing.assert_close(got, want)
    assert counter.frame_count == 1


CONV_DECODE_CASES = [
    pytest.param(F64, 4, [2, 1, 3], id="fp64-W4-steps-2-1-3"),
    pytest.param(torch.float32, 4, [1, 1, 8], id="fp32-W4-steps-1-1-8"),
    pytest.param(F64, 3, [1, 2], id="fp64-W3"),
]


@pytest.mark.parametrize("dtype, W, steps", CONV_DECODE_CASES)
def test_conv_decode_continues_prefill(dtype, W, steps):
    """Prefill over the prompt, final conv states into shuffled pool slots, then decode steps:
    outputs equal the prefill over the whole sequence, the pool ends with its final state."""
    B, T0, D, S = 3, 7, 6, 5
    x = torch.randn(B, T0 + sum(steps), D, dtype=dtype)
    weight = torch.randn(D, W, dtype=dtype)
    _, prompt_state = kda_ops.causal_conv1d(x[:, :T0], weight)
    pool = torch.randn(S, D, W - 1, dtype=dtype)
    slots = torch.tensor([2, 4, 0], dtype=torch.int32)
    pool[slots.long()] = prompt_state
    outputs, t0 = [], T0
    for T in steps:
        outputs.append(kda_ops.causal_conv1d_update(x[:, t0 : t0 + T], pool, weight, state_indices=slots))
        t0 += T
    y_full, final_full = kda_ops.causal_conv1d(x, weight)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else {}
    torch.testing.assert_close(torch.cat(outputs, dim=1), y_full[:, T0:], **tol)
    assert torch.equal(pool[slots.long()], final_full)


@pytest.mark.parametrize("indices", PADDING_CASES)
def test_conv_decode_padding_rows_and_untouched_slots(indices):
    B, T, D, W, S = len(indices), 2, 6, 4, 7
    x = torch.randn(B, T, D, dtype=F64)
    weight = torch.randn(D, W, dtype=F64)
    pad = [b for b, s in enumerate(indices) if s < 0]
    valid = [b for b, s in enumerate(indices) if s >= 0]
    used = [indices[b] for b in valid]
    unused = [s for s in range(S) if s not in used]
    x[pad] = float("nan")
    pool = random_pool(S, D, W - 1, dtype=F64, nan_slots=unused[1::2])
    before = pool.clone()
    y = kda_ops.causal_conv1d_update(x, pool, weight, state_indices=torch.tensor(indices, dtype=torch.int32))
    assert torch.equal(y[pad], torch.zeros_like(y[pad]))
    assert_bits_equal(pool[unused], before[unused], "unused slots")
    for b, s in zip(valid, used):
        y_ref, final_ref = naive_conv(x[b], weight, before[s])
        torch.testing.assert_close(y[b], y_ref, rtol=1e-12, atol=1e-12)
        assert torch.equal(pool[s], final_ref)


def test_conv_decode_without_indices_uses_slot_b():
    B, T, D, W, S = 2, 3, 4, 4, 4
    x = torch.randn(B, T, D)
    weight = torch.randn(D, W)
    pool = torch.randn(S, D, W - 1)
    before = pool.clone()
    y = kda_ops.causal_conv1d_update(x, pool, weight)
    y_ref, final_ref = kda_ops.causal_conv1d(x, weight, initial_state=before[:B])
    torch.testing.assert_close(y, y_ref)
    assert torch.equal(pool[:B], final_ref)
    assert_bits_equal(pool[B:], before[B:], "slots >= B")


# ------------------------------------------------------------------------------------------------
# opcheck


def _decode_op_args(with_indices: bool, l2: bool, dtype=torch.float32):
    B, T, H, K, V, S = 3, 2, 2, 8, 6, 5
    x = decode_inputs(B, T, H, K, V, dtype=dtype, use_qk_l2norm=l2)
    indices = torch.tensor([4, -1, 1], dtype=torch.int32) if with_indices else None
    return (x["q"], x["k"], x["v"], x["g"], x["beta"], torch.randn(S, H, K, V), indices, 0.35, l2)


def _conv_op_args(with_indices: bool):
    B, T, D, W, S = 3, 2, 6, 4, 4
    indices = torch.tensor([3, 0, -1], dtype=torch.int64) if with_indices else None
    return (torch.randn(B, T, D), torch.randn(S, D, W - 1), torch.randn(D, W), indices)


def _gated_decode_op_args(with_indices: bool, l2: bool):
    """_decode_op_args (bf16 inputs) with a bf16 gate pre-activation in place of g, then A_log and
    dt_bias."""
    args = list(_decode_op_args(with_indices, l2, torch.bfloat16))
    B, T, H, K = args[0].shape
    z, A_log, dt_bias = gate_inputs(B, T, H, K, dtype=torch.bfloat16)
    args[3] = z
    return (*args, A_log, dt_bias)


def _bounded_gate_decode_op_args(with_indices: bool, l2: bool):
    """_gated_decode_op_args, then gate_lower_bound."""
    return (*_gated_decode_op_args(with_indices, l2), -5.0)


OPCHECK_CASES = [
    pytest.param(_decode_op_args, True, True, id="indices-l2norm"),
    pytest.param(_decode_op_args, False, False, id="no-indices"),
    pytest.param(_gated_decode_op_args, True, True, id="in-op-gate-indices-l2norm"),
    pytest.param(_gated_decode_op_args, False, False, id="in-op-gate-no-indices"),
    pytest.param(_bounded_gate_decode_op_args, True, True, id="bounded-gate-indices-l2norm"),
    pytest.param(_bounded_gate_decode_op_args, False, False, id="bounded-gate-no-indices"),
]


@pytest.mark.parametrize("make_args, with_indices, l2", OPCHECK_CASES)
def test_opcheck_kda_decode(make_args, with_indices, l2):
    torch.library.opcheck(torch.ops.kda.kda_decode.default, make_args(with_indices, l2))
    torch.library.opcheck(torch.ops.kda.kda_decode_reference.default, make_args(with_indices, l2))


@pytest.mark.parametrize("with_indices", [pytest.param(True, id="indices"), pytest.param(False, id="no-indices")])
def test_opcheck_causal_conv1d_update(with_indices):
    torch.library.opcheck(torch.ops.kda.causal_conv1d_update.default, _conv_op_args(with_indices))
    torch.library.opcheck(torch.ops.kda.causal_conv1d_update_reference.default, _conv_op_args(with_indices))


# ------------------------------------------------------------------------------------------------
# contract errors: eager and under FakeTensorMode, nothing written


def _decode_kwargs():
    B, T, H, K, V, S = 2, 2, 2, 4, 6, 3
    x = decode_inputs(B, T, H, K, V, dtype=torch.float32)
    return dict(**x, state=torch.randn(S, H, K, V), state_indices=torch.tensor([2, 0], dtype=torch.int32))


DECODE_CONTRACT_CASES = [
    pytest.param("q", lambda a: dict(q=a["q"].to(torch.int32)), "dtype", id="q-int"),
    pytest.param("q", lambda a: dict(q=torch.randn(2, 9, 2, 4)), "1 to 8 tokens", id="q-9-tokens"),
    pytest.param("k", lambda a: dict(k=a["k"].to(torch.bfloat16)), "dtype", id="k-dtype"),
    pytest.param("v", lambda a: dict(v=torch.randn(3, 2, 2, 6)), "shape", id="v-batch-mismatch"),
    pytest.param("g", lambda a: dict(g=a["g"].to(torch.bfloat16)), "dtype", id="g-not-fp32"),
    pytest.param("beta", lambda a: dict(beta=a["beta"][..., 0]), "3-d", id="beta-ndim"),
    pytest.param("state", lambda a: dict(state=a["state"].to(torch.bfloat16)), "dtype", id="state-dtype"),
    pytest.param("state", lambda a: dict(state=torch.randn(3, 2, 5, 6)), "shape", id="state-K"),
    pytest.param("state", lambda a: dict(state=a["state"][0]), "4-d", id="state-ndim"),
    pytest.param("state", lambda a: dict(state=torch.randn(6, 2, 4, 6)[::2]), "contiguous", id="state-strided"),
    pytest.param("state_indices", lambda a: dict(state_indices=a["state_indices"].float()), "dtype", id="indices-float"),
    pytest.param(
        "state_indices", lambda a: dict(state_indices=torch.tensor([0, 1, 2], dtype=torch.int32)), "shape",
        id="indices-length",
    ),
    pytest.param(
        "state",
        lambda a: dict(**decode_inputs(4, 2, 2, 4, 6, dtype=torch.float32), state_indices=None),
        "at least B = 4 slots",
        id="no-indices-pool-smaller-than-batch",
    ),
    pytest.param("dt_bias", lambda a: dict(A_log=torch.zeros(2)), "a tensor when A_log", id="A_log-without-dt_bias"),
    pytest.param("A_log", lambda a: dict(dt_bias=torch.zeros(8)), "a tensor when dt_bias", id="dt_bias-without-A_log"),
    pytest.param("A_log", lambda a: dict(A_log=torch.zeros(1, 1, 2, 1), dt_bias=torch.zeros(8)), "1-d", id="A_log-4d"),
    pytest.param("A_log", lambda a: dict(A_log=torch.zeros(3), dt_bias=torch.zeros(8)), "shape", id="A_log-H"),
    pytest.param(
        "A_log", lambda a: dict(A_log=torch.zeros(2, dtype=torch.bfloat16), dt_bias=torch.zeros(8)), "dtype",
        id="A_log-bf16",
    ),
    pytest.param("dt_bias", lambda a: dict(A_log=torch.zeros(2), dt_bias=torch.zeros(2, 4)), "1-d", id="dt_bias-2d"),
    pytest.param("dt_bias", lambda a: dict(A_log=torch.zeros(2), dt_bias=torch.zeros(6)), "shape", id="dt_bias-HK"),
    pytest.param(
        "g", lambda a: dict(g=a["g"].to(torch.float16), A_log=torch.zeros(2), dt_bias=torch.zeros(8)), "dtype",
        id="in-op-gate-g-not-q-dtype",
    ),
    pytest.param(
        "gate_lower_bound", lambda a: dict(gate_lower_bound=-5.0), "None without A_log and dt_bias",
        id="gate_lower_bound-without-gate",
    ),
    pytest.param(
        "gate_lower_bound", lambda a: dict(A_log=torch.zeros(2), dt_bias=torch.zeros(8), gate_lower_bound=0.0),
        "a finite float < 0", id="gate_lower_bound-zero",
    ),
    pytest.param(
        "gate_lower_bound", lambda a: dict(A_log=torch.zeros(2), dt_bias=torch.zeros(8), gate_lower_bound=2.0),
        "a finite float < 0", id="gate_lower_bound-positive",
    ),
    pytest.param(
        "gate_lower_bound",
        lambda a: dict(A_log=torch.zeros(2), dt_bias=torch.zeros(8), gate_lower_bound=float("-inf")),
        "a finite float < 0", id="gate_lower_bound-minus-inf",
    ),
    pytest.param(
        "gate_lower_bound",
        lambda a: dict(A_log=torch.zeros(2), dt_bias=torch.zeros(8), gate_lower_bound=float("nan")),
        "a finite float < 0", id="gate_lower_bound-nan",
    ),
]


@pytest.mark.parametrize("name, corrupt, expected", DECODE_CONTRACT_CASES)
@pytest.mark.parametrize("fake", [pytest.param(False, id="eager"), pytest.param(True, id="fake")])
def test_decode_contract_errors_name_the_argument(name, corrupt, expected, fake):
    a = _decode_kwargs()
    a.update(corrupt(a))
    pattern = rf"kda_decode: argument '{name}' expected .*{expected}"
    if fake:
        mode = FakeTensorMode()
        a = {n: (mode.from_tensor(t) if isinstance(t, torch.Tensor) else t) for n, t in a.items()}
        with pytest.raises(ContractError, match=pattern):
            kda_ops.kda_decode(**a)
        return
    pool_before = a["state"].clone()
    with pytest.raises(ContractError, match=pattern):
        kda_ops.kda_decode(**a)
    assert_bits_equal(a["state"], pool_before, "pool after a failing call")


def _conv_kwargs():
    B, T, D, W, S = 2, 2, 6, 4, 3
    return dict(
        x=torch.randn(B, T, D),
        conv_state=torch.randn(S, D, W - 1),
        weight=torch.randn(D, W),
        state_indices=torch.tensor([1, -1], dtype=torch.int32),
    )


CONV_CONTRACT_CASES = [
    pytest.param("x", lambda a: a["x"].to(torch.int64), "dtype", id="x-int"),
    pytest.param("x", lambda a: torch.randn(2, 9, 6), "1 to 8 tokens", id="x-9-tokens"),
    pytest.param("weight", lambda a: torch.randn(6, 1, 4), "2-d", id="weight-checkpoint-shape"),
    pytest.param("weight", lambda a: torch.randn(5, 4), "shape", id="weight-D"),
    pytest.param("weight", lambda a: torch.randn(6, 5), "width", id="weight-W5"),
    pytest.param("conv_state", lambda a: a["conv_state"].double(), "dtype", id="state-dtype"),
    pytest.param("conv_state", lambda a: torch.randn(3, 6, 4), "shape", id="state-width"),
    pytest.param("conv_state", lambda a: torch.randn(3, 6, 6)[..., ::2], "contiguous", id="state-strided"),
    pytest.param("state_indices", lambda a: a["state_indices"].to(torch.int16), "dtype", id="indices-int16"),
    pytest.param("state_indices", lambda a: torch.tensor([[0], [1]]), "1-d", id="indices-ndim"),
]


@pytest.mark.parametrize("name, corrupt, expected", CONV_CONTRACT_CASES)
@pytest.mark.parametrize("fake", [pytest.param(False, id="eager"), pytest.param(True, id="fake")])
def test_conv_contract_errors_name_the_argument(name, corrupt, expected, fake):
    a = _conv_kwargs()
    a[name] = corrupt(a)
    pattern = rf"causal_conv1d_update: argument '{name}' expected .*{expected}"
    if fake:
        mode = FakeTensorMode()
        a = {n: mode.from_tensor(t) for n, t in a.items()}
        with pytest.raises(ContractError, match=pattern):
            kda_ops.causal_conv1d_update(**a)
        return
    pool_before = a["conv_state"].clone()
    with pytest.raises(ContractError, match=pattern):
        kda_ops.causal_conv1d_update(**a)
    assert_bits_equal(a["conv_state"], pool_before, "pool after a failing call")


def test_prefill_conv_contract_errors():
    x, weight = torch.randn(2, 5, 6), torch.randn(6, 4)
    with pytest.raises(ContractError, match=r"causal_conv1d: argument 'x' expected batch size 1"):
        kda_ops.causal_conv1d(x, weight, cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(ContractError, match=r"causal_conv1d: argument 'initial_state' expected shape"):
        kda_ops.causal_conv1d(x, weight, initial_state=torch.randn(2, 6, 4))


# ------------------------------------------------------------------------------------------------
# torch.compile and torch.export with the pools as module buffers


def _assert_same_step(compiled_out, eager_out, compiled: DecodeLayer, eager: DecodeLayer):
    torch.testing.assert_close(compiled_out, eager_out)
    torch.testing.assert_close(compiled.state, eager.state)
    torch.testing.assert_close(compiled.conv_state, eager.conv_state)


def test_compile_fullgraph_one_frame_across_steps():
    """New inputs and new slot indices every step: one frame, results equal to eager."""
    torch._dynamo.reset()
    slots, T = 8, 2
    layer = DecodeLayer(slots, 2, 8, 6)
    eager = twin(layer)
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(layer, backend=counter, fullgraph=True)
    for _ in range(4):
        inputs = layer_inputs(4, T, layer, slots)
        _assert_same_step(step(*inputs), eager(*inputs), layer, eager)
    assert counter.frame_count == 1


def test_compile_dynamic_batch_one_frame():
    torch._dynamo.reset()
    slots = 8
    layer = DecodeLayer(slots, 2, 8, 6)
    eager = twin(layer)
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(layer, backend=counter, fullgraph=True)
    for i, B in enumerate((4, 7, 3)):
        inputs = layer_inputs(B, 1, layer, slots)
        if i == 0:
            for t in inputs:
                torch._dynamo.mark_dynamic(t, 0)
        _assert_same_step(step(*inputs), eager(*inputs), layer, eager)
    assert counter.frame_count == 1


def test_export_save_load_run(tmp_path):
    slots = 6
    layer = DecodeLayer(slots, 2, 8, 6)
    eager = twin(layer)
    B = torch.export.Dim("B", min=2, max=slots)
    batch = {0: B}
    ep = torch.export.export(
        twin(layer), layer_inputs(4, 1, layer, slots), dynamic_shapes=(batch, batch, batch, batch)
    )
    path = tmp_path / "kda_decode_layer.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path).module()
    for B in (5, 3):
        inputs = layer_inputs(B, 1, layer, slots)
        torch.testing.assert_close(loaded(*inputs), eager(*inputs))
    torch.testing.assert_close(loaded.state, eager.state)
    torch.testing.assert_close(loaded.conv_state, eager.conv_state)
