"""kda::kda_decode and kda::causal_conv1d_update: the decode-time ops that advance per-sequence
state pools in place. Input contracts, fake (meta) implementations and the pure-PyTorch references
(the CPU implementation and the test oracle); plus `causal_conv1d`, the whole-sequence short
convolution that produces the conv state decode continues from.

State pools and slots. A pool holds one state per slot: the recurrent KDA state pool is
[S, H, K, V] in the accumulation dtype (fp32; fp64 for fp64 inputs), key-major; the conv state pool
is [S, D, W-1] in the input dtype, D-major: conv_state[s, d, c] is the input of channel d
(W-1-c) tokens back, so column W-2 holds the newest input. Row b of a decode batch uses slot
state_indices[b] (int32 or int64, [B], a device tensor); a negative index (-1 by convention) marks a
padding row: its output is zeros and no slot is read or written. With state_indices None, row b
uses slot b (S >= B). Every slot that no valid row names keeps its bits.

Undefined (documented, never checked: checking would read the indices on the host): two valid rows
naming the same slot, and indices >= S. The references raise on an index >= S; the Triton kernels
treat it like padding instead of writing outside the pool.

Decode ops take T = 1..8 consecutive new tokens per sequence (a longer run is prefill: chunk_kda and
causal_conv1d).

The gate. kda_decode takes g either as the log-decay (accumulation dtype) or, when A_log [H] and
dt_bias [H*K] are given, as the gate's pre-activation z (q's dtype or the accumulation dtype), from
which the op computes g = -exp(A_log[h]) * softplus(z + dt_bias) (docs/kda_math.md §2; `kda_gate`),
or, with a finite gate_lower_bound L < 0 as well, the bounded form
g = L * sigmoid(exp(A_log[h]) * (z + dt_bias)), in (L, 0).
"""

import torch
import torch.nn.functional as F

from ._contract import check_shape, check_tensor, fail
from .chunk_kda import INDEX_DTYPES, INPUT_DTYPES, check_gate_parameters, check_kda_token_inputs, empty_tokens
from .kda_recurrent import accumulation_dtype, kda_gate, l2norm

MAX_DECODE_TOKENS = 8
MIN_CONV_WIDTH = 2
MAX_CONV_WIDTH = 4


def _check_decode_tokens(op: str, name: str, t: torch.Tensor) -> None:
    if not 1 <= t.shape[1] <= MAX_DECODE_TOKENS:
        fail(op, name, f"1 to {MAX_DECODE_TOKENS} tokens per sequence (dim 1)", f"shape {list(t.shape)}")


def _check_pool(op: str, name: str, pool: torch.Tensor, expected: tuple, what: str, dtype, device) -> None:
    check_tensor(op, name, pool, ndim=len(expected), dtypes=(dtype,), device=device)
    check_shape(op, name, pool, expected, what)
    if not pool.is_contiguous():
        fail(op, name, "a contiguous tensor (it is updated in place)", f"strides {list(pool.stride())}")


def _check_state_indices(
    op: str, pool_name: str, pool: torch.Tensor, state_indices: torch.Tensor | None, B: int, device
) -> None:
    if state_indices is None:
        if pool.shape[0] < B:
            fail(op, pool_name, f"at least B = {B} slots when state_indices is None", f"shape {list(pool.shape)}")
        return
    check_tensor(op, "state_indices", state_indices, ndim=1, dtypes=INDEX_DTYPES, device=device)
    check_shape(op, "state_indices", state_indices, (B,), "([B], one slot per batch row)")


def check_kda_decode_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    state_indices: torch.Tensor | None,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    gate_lower_bound: float | None = None,
) -> None:
    op = "kda_decode"
    check_tensor(op, "q", q, ndim=4, dtypes=INPUT_DTYPES)
    _check_decode_tokens(op, "q", q)  # before k, v, ... are compared with q: q's length is the error
    check_gate_parameters(op, q, A_log, dt_bias, gate_lower_bound)  # before g: they decide which dtypes g may have
    check_kda_token_inputs(op, q, k, v, g, beta, raw_gate=A_log is not None)
    device, acc = q.device, accumulation_dtype(q.dtype)
    B, T, H, K = q.shape
    V = v.shape[3]
    _check_pool(op, "state", state, (None, H, K, V), "([S, H, K, V] with H, K of q and V of v)", acc, device)
    _check_state_indices(op, "state", state, state_indices, B, device)


def kda_decode_meta(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    state_indices: torch.Tensor | None,
    scale: float,
    use_qk_l2norm: bool,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    gate_lower_bound: float | None = None,
    token_flat: bool = False,
) -> torch.Tensor:
    """Validates and allocates o [B, T, H, V] (contiguous, v's dtype; token_flat: [B*T, H, V],
    see empty_tokens)."""
    check_kda_decode_inputs(q, k, v, g, beta, state, state_indices, A_log, dt_bias, gate_lower_bound)
    return empty_tokens(v.shape, v.dtype, v.device, token_flat)


def slots_and_validity(
    state_indices: torch.Tensor | None, B: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot [B] int64, valid [B] bool) as device tensors; no host read."""
    if state_indices is None:
        return torch.arange(B, device=device), torch.ones(B, dtype=torch.bool, device=device)
    slots = state_indices.long()
    return slots, slots >= 0


def _rows_mask(valid: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return valid.view(-1, *([1] * (like.dim() - 1)))


def gather_rows(pool: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """pool[slots[b]] for valid rows, zeros for padding rows (whose slot is never read)."""
    rows = pool.index_select(0, torch.where(valid, slots, 0))
    return torch.where(_rows_mask(valid, rows), rows, 0)


def scatter_rows_(pool: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor) -> None:
    """pool[slots[b]] = rows[b] for every valid row b, in place, without a host sync; every slot no
    valid row names keeps its bits.

    index_copy_ needs a target for every row, so padding rows target slot 0 and carry the value slot
    0 must end with: the row of the valid b that names slot 0 if there is one, else slot 0's current
    content. All writes to slot 0 are then bit-identical and their order does not matter.
    """
    names_slot0 = valid & (slots == 0)
    first = names_slot0.to(torch.int32).argmax().view(1)
    slot0 = torch.where(names_slot0.any(), rows.index_select(0, first), pool[:1])
    targets = torch.where(valid, slots, 0)
    pool.index_copy_(0, targets, torch.where(_rows_mask(valid, rows), rows, slot0))


def kda_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence (docs/kda_math.md §1) for a batch of states.

    q, k, g [N, H, K]; v [N, H, V]; beta [N, H]; state [N, H, K, V]; all in one dtype.
    Returns (o [N, H, V], new state).
    """
    state = state * g.exp()[..., None]
    u = beta[..., None] * (v - torch.einsum("nhkv,nhk->nhv", state, k))
    state = state + k[..., None] * u[..., None, :]
    return torch.einsum("nhkv,nhk->nhv", state, q * scale), state


def kda_decode_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    state_indices: torch.Tensor | None,
    scale: float,
    use_qk_l2norm: bool,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    gate_lower_bound: float | None = None,
) -> torch.Tensor:
    """The exact recurrence, token by token, in the accumulation dtype; same contract and output as
    kda_decode_meta, and `state` updated in place at the valid slots. No host synchronisation."""
    o = kda_decode_meta(q, k, v, g, beta, state, state_indices, scale, use_qk_l2norm, A_log, dt_bias, gate_lower_bound)
    acc = accumulation_dtype(q.dtype)
    B, T = q.shape[:2]
    slots, valid = slots_and_validity(state_indices, B, q.device)
    if A_log is not None:
        g = kda_gate(g, A_log, dt_bias, gate_lower_bound)
    q, k, v, g, beta = (x.to(acc) for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    h = gather_rows(state, slots, valid)
    outputs = []
    for t in range(T):
        o_t, h = kda_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], h, scale)
        outputs.append(o_t)
    o_all = torch.stack(outputs, dim=1)
    o.copy_(torch.where(_rows_mask(valid, o_all), o_all, 0))
    scatter_rows_(state, slots, valid, h)
    return o


def _check_conv_weight(op: str, weight: torch.Tensor, D: int, x_dtype: torch.dtype, device) -> int:
    acc = accumulation_dtype(x_dtype)
    check_tensor(op, "weight", weight, ndim=2, dtypes=(x_dtype, acc) if x_dtype != acc else (acc,), device=device)
    check_shape(op, "weight", weight, (D, None), "([D, W], D of x; the checkpoint's [D, 1, W] squeezed)")
    W = weight.shape[1]
    if not MIN_CONV_WIDTH <= W <= MAX_CONV_WIDTH:
        fail(op, "weight", f"a kernel width W in [{MIN_CONV_WIDTH}, {MAX_CONV_WIDTH}]", f"shape {list(weight.shape)}")
    return W


def check_causal_conv1d_update_inputs(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, state_indices: torch.Tensor | None
) -> None:
    op = "causal_conv1d_update"
    check_tensor(op, "x", x, ndim=3, dtypes=INPUT_DTYPES)
    B, _, D = x.shape
    _check_decode_tokens(op, "x", x)
    W = _check_conv_weight(op, weight, D, x.dtype, x.device)
    _check_pool(op, "conv_state", conv_state, (None, D, W - 1), "([S, D, W-1], D of x, W of weight)", x.dtype, x.device)
    _check_state_indices(op, "conv_state", conv_state, state_indices, B, x.device)


def causal_conv1d_update_meta(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    state_indices: torch.Tensor | None,
    token_flat: bool = False,
) -> torch.Tensor:
    """Validates and allocates y [B, T, D] (contiguous, x's dtype; token_flat: [B*T, D], see
    empty_tokens)."""
    check_causal_conv1d_update_inputs(x, conv_state, weight, state_indices)
    return empty_tokens(x.shape, x.dtype, x.device, token_flat)


def causal_conv1d_update_reference(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, state_indices: torch.Tensor | None
) -> torch.Tensor:
    """y[b, t, d] = SiLU(sum_j weight[d, j] * x_ext[b, d, t + j]) where x_ext is the slot's W-1
    stored inputs followed by the T new ones; the slot then keeps the last W-1 of x_ext. Computed
    in the accumulation dtype; no host synchronisation."""
    y = causal_conv1d_update_meta(x, conv_state, weight, state_indices)
    acc = accumulation_dtype(x.dtype)
    B, T, _ = x.shape
    W = weight.shape[1]
    slots, valid = slots_and_validity(state_indices, B, x.device)
    x_ext = torch.cat([gather_rows(conv_state, slots, valid), x.transpose(1, 2)], dim=2)  # [B, D, W-1+T]
    windows = x_ext.unfold(2, W, 1).to(acc)  # [B, D, T, W]
    y_all = F.silu((windows * weight.to(acc)[None, :, None, :]).sum(-1)).transpose(1, 2)  # [B, T, D]
    y.copy_(torch.where(_rows_mask(valid, y_all), y_all, 0))
    scatter_rows_(conv_state, slots, valid, x_ext[:, :, T:])
    return y


def check_causal_conv1d_inputs(
    x: torch.Tensor, weight: torch.Tensor, initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None
) -> int:
    """Returns N, the number of sequences."""
    op = "causal_conv1d"
    check_tensor(op, "x", x, ndim=3, dtypes=INPUT_DTYPES)
    B, _, D = x.shape
    W = _check_conv_weight(op, weight, D, x.dtype, x.device)
    if cu_seqlens is None:
        n = B
    else:
        check_tensor(op, "cu_seqlens", cu_seqlens, ndim=1, dtypes=INDEX_DTYPES, device=x.device)
        if cu_seqlens.shape[0] < 2:
            fail(op, "cu_seqlens", "at least 2 entries [0, ..., T]", f"shape [{cu_seqlens.shape[0]}]")
        if B != 1:
            fail(op, "x", "batch size 1 when cu_seqlens packs the sequences", f"batch size {B}")
        n = cu_seqlens.shape[0] - 1
    if initial_state is not None:
        check_tensor(op, "initial_state", initial_state, ndim=3, dtypes=(x.dtype,), device=x.device)
        check_shape(op, "initial_state", initial_state, (n, D, W - 1), "([N, D, W-1], N = number of sequences)")
    return n


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution + SiLU over whole sequences, and the conv state decode
    continues from.

    x [B, T, D] (or [1, T, D] packed, with cu_seqlens [N+1]); weight [D, W], x's dtype or the
    accumulation dtype; initial_state [N, D, W-1] in x's dtype: the W-1 inputs before each
    sequence (zeros when None). Returns y [B, T, D] in x's dtype and the final conv state
    [N, D, W-1] in x's dtype (the last W-1 inputs of each sequence, reaching into its initial state
    when the sequence is shorter than W-1). Pure PyTorch, no host read of cu_seqlens: it traces
    under torch.compile with a dynamic T.
    """
    n = check_causal_conv1d_inputs(x, weight, initial_state, cu_seqlens)
    acc = accumulation_dtype(x.dtype)
    B, T, D = x.shape
    W = weight.shape[1]
    total = B * T
    if cu_seqlens is None:
        bounds = torch.arange(B + 1, device=x.device) * T
    else:
        bounds = cu_seqlens.long()
    if initial_state is None:
        history = x.new_zeros(n * (W - 1), D)
    else:
        history = initial_state.transpose(1, 2).reshape(n * (W - 1), D)
    # One table of every input a tap can read: the tokens, then each sequence's W-1 earlier inputs.
    source = torch.cat([x.reshape(total, D), history])

    def source_rows(positions: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        """Row of `source` holding token position `positions` of sequence `seq` (a position before
        the sequence's start reads its initial state)."""
        offset = positions - bounds[seq]
        return torch.where(offset >= 0, positions, total + seq * (W - 1) + (W - 1) + offset)

    tokens = torch.arange(total, device=x.device)
    # Sequence of each token as a count of the sequence ends at or before it (Inductor in torch
    # 2.11 cannot lower searchsorted over a slice such as bounds[1:]).
    token_seq = (tokens[:, None] >= bounds[None, 1:]).sum(1)
    taps = tokens[:, None] - (W - 1) + torch.arange(W, device=x.device)  # [total, W]
    windows = source[source_rows(taps, token_seq[:, None])].to(acc)  # [total, W, D]
    y = F.silu((windows * weight.to(acc).t()).sum(1)).to(x.dtype).view(B, T, D)
    seqs = torch.arange(n, device=x.device)
    last = bounds[1:, None] - (W - 1) + torch.arange(W - 1, device=x.device)  # [N, W-1]
    final_state = source[source_rows(last, seqs[:, None])].transpose(1, 2).contiguous()  # [N, D, W-1]
    return y, final_state
