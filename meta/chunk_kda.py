"""kda::chunk_kda_fwd / kda::chunk_kda_bwd: input contract, fake (meta) implementations and the
chunked pure-PyTorch forward reference (the CPU implementation). Math: docs/kda_math.md §3.

Dtypes: q, k, v share one dtype (bf16, fp16, fp32 or fp64); g, initial_state and the final state
use the accumulation dtype (fp64 for fp64 inputs, fp32 otherwise); beta is q's dtype or the
accumulation dtype.

The gate. g is the log-decay, or, when A_log [H] and dt_bias [H*K] (fp32, or the accumulation
dtype) are given, the gate's pre-activation z (q's dtype or the accumulation dtype), from which the
op computes g = -exp(A_log[h]) * softplus(z + dt_bias) in the accumulation dtype, or with a
gate_lower_bound L (a finite float < 0) the bounded form g = L * sigmoid(exp(A_log[h]) * (z +
dt_bias)) (docs/kda_math.md §2; kda_recurrent.kda_gate). The backward then returns dz as g's
gradient and the gradients of A_log and dt_bias.
"""

import math
from collections.abc import Sequence

import torch

from ._contract import check_shape, check_tensor, fail
from .kda_recurrent import accumulation_dtype, kda_gate, l2norm

CHUNK_SIZE = 64
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def empty_tokens(shape: Sequence[int], dtype: torch.dtype, device: torch.device, token_flat: bool) -> torch.Tensor:
    """An uninitialised contiguous tensor of a [B, T, ...] shape, or with token_flat as [B*T, ...]:
    the Triton paths allocate what their kernels write token-flat and return [B, T, ...] views,
    because with B = 1 and a dynamic T the size-1 dim's symbolic stride breaks Inductor's
    decomposition of a kernel launch that writes the tensor (torch 2.11, pytorch#181735)."""
    if token_flat:
        shape = (shape[0] * shape[1], *shape[2:])
    return torch.empty(shape, dtype=dtype, device=device)


def check_kda_token_inputs(
    op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, *, raw_gate=False
) -> None:
    """The per-token KDA inputs every KDA op takes: q, k [B, T, H, K] and v [B, T, H, V] in one
    input dtype, g [B, T, H, K] in the accumulation dtype, beta [B, T, H] in either. raw_gate: g is
    the gate's pre-activation (kda_decode computes the decay from it), in either dtype."""
    check_tensor(op, "q", q, ndim=4, dtypes=INPUT_DTYPES)
    device, acc = q.device, accumulation_dtype(q.dtype)
    either = (q.dtype, acc) if q.dtype != acc else (acc,)
    B, T, H, K = q.shape
    check_tensor(op, "k", k, ndim=4, dtypes=(q.dtype,), device=device)
    check_shape(op, "k", k, (B, T, H, K), "(the shape of q)")
    check_tensor(op, "v", v, ndim=4, dtypes=(q.dtype,), device=device)
    check_shape(op, "v", v, (B, T, H, None), "([B, T, H, V] with B, T, H of q)")
    check_tensor(op, "g", g, ndim=4, dtypes=either if raw_gate else (acc,), device=device)
    check_shape(op, "g", g, (B, T, H, K), "(the shape of q)")
    check_tensor(op, "beta", beta, ndim=3, dtypes=either, device=device)
    check_shape(op, "beta", beta, (B, T, H), "([B, T, H] of q)")


def check_gate_parameters(
    op: str,
    q: torch.Tensor,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    gate_lower_bound: float | None = None,
) -> None:
    """A_log [H] and dt_bias [H*K] of the in-op gate: both or neither, fp32 or the accumulation
    dtype; gate_lower_bound (the bounded form) only with them, a finite float < 0."""
    if (A_log is None) != (dt_bias is None):
        given, missing = ("A_log", "dt_bias") if dt_bias is None else ("dt_bias", "A_log")
        fail(op, missing, f"a tensor when {given} is given (the in-op gate needs both)", "None")
    if gate_lower_bound is not None:
        if A_log is None:
            fail(op, "gate_lower_bound", "None without A_log and dt_bias (it bounds the in-op gate)", repr(gate_lower_bound))
        if not (math.isfinite(gate_lower_bound) and gate_lower_bound < 0):
            fail(op, "gate_lower_bound", "a finite float < 0", repr(gate_lower_bound))
    if A_log is None:
        return
    acc = accumulation_dtype(q.dtype)
    H, K = q.shape[2:]
    params = (torch.float32, acc) if acc != torch.float32 else (acc,)
    check_tensor(op, "A_log", A_log, ndim=1, dtypes=params, device=q.device)
    check_shape(op, "A_log", A_log, (H,), "([H], H of q)")
    check_tensor(op, "dt_bias", dt_bias, ndim=1, dtypes=params, device=q.device)
    check_shape(op, "dt_bias", dt_bias, (H * K,), "([H*K], H, K of q)")


def check_chunk_kda_inputs(
    op: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    gate_lower_bound: float | None,
) -> int:
    """Validates the inputs shared by forward and backward; returns N, the number of sequences."""
    check_tensor(op, "q", q, ndim=4, dtypes=INPUT_DTYPES)
    check_gate_parameters(op, q, A_log, dt_bias, gate_lower_bound)  # before g: they decide which dtypes g may have
    check_kda_token_inputs(op, q, k, v, g, beta, raw_gate=A_log is not None)
    device, acc = q.device, accumulation_dtype(q.dtype)
    B, H, K = q.shape[0], q.shape[2], q.shape[3]
    if cu_seqlens is None:
        n = B
    else:
        check_tensor(op, "cu_seqlens", cu_seqlens, ndim=1, dtypes=INDEX_DTYPES, device=device)
        if cu_seqlens.shape[0] < 2:
            fail(op, "cu_seqlens", "at least 2 entries [0, ..., T]", f"shape [{cu_seqlens.shape[0]}]")
        if B != 1:
            fail(op, "q", "batch size 1 when cu_seqlens packs the sequences", f"batch size {B}")
        n = cu_seqlens.shape[0] - 1
    if initial_state is not None:
        check_tensor(op, "initial_state", initial_state, ndim=4, dtypes=(acc,), device=device)
        check_shape(op, "initial_state", initial_state, (n, H, K, v.shape[-1]), "([N, H, K, V], N = number of sequences)")
    return n


def chunk_kda_fwd_meta(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    scale: float,
    output_final_state: bool,
    use_qk_l2norm: bool,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    gate_lower_bound: float | None = None,
    token_flat: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validates and allocates (o [B, T, H, V] in v's dtype, final_state [N, H, K, V] in the
    accumulation dtype, or an empty [0] tensor when output_final_state is False). token_flat: o as
    [B*T, H, V] (see empty_tokens)."""
    n = check_chunk_kda_inputs(
        "chunk_kda_fwd", q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, gate_lower_bound
    )
    acc = accumulation_dtype(q.dtype)
    o = empty_tokens(v.shape, v.dtype, v.device, token_flat)
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    shape = (n, H, K, V) if output_final_state else (0,)
    return o, torch.empty(shape, dtype=acc, device=q.device)


RESIDUAL_NAMES = ("gc", "aqk", "tkk", "rqk")


def _residual_shapes(q: torch.Tensor, use_qk_l2norm: bool) -> tuple[tuple, ...]:
    B, T, H, K = q.shape
    return (B * T, H, K), (B * T, H, CHUNK_SIZE), (B * T, H, CHUNK_SIZE), ((B * T, H, 2) if use_qk_l2norm else (0,))


def chunk_kda_residuals_meta(q: torch.Tensor, use_qk_l2norm: bool, save: bool) -> tuple[torch.Tensor, ...]:
    """What the Triton forward keeps for its backward, allocated (RESIDUAL_NAMES, fp32,
    token-flat): gc [B*T, H, K] the chunk-local cumulative gate, aqk [B*T, H, 64] A_qk and tkk
    [B*T, H, 64] T = (I + A_kk)^-1 as whole rows of their chunk, rqk [B*T, H, 2] the reciprocal
    q and k row norms ([0] without the L2 norm). Four empty [0] tensors unless save."""
    shapes = _residual_shapes(q, use_qk_l2norm) if save else ((0,),) * 4
    return tuple(torch.empty(shape, dtype=torch.float32, device=q.device) for shape in shapes)


def check_chunk_kda_residuals(op: str, q: torch.Tensor, residuals: Sequence, use_qk_l2norm: bool) -> None:
    """Validates the forward's residuals handed to the backward: all four, or all None."""
    given = [r is not None for r in residuals]
    if not any(given):
        return
    if not all(given):
        missing = RESIDUAL_NAMES[given.index(False)]
        fail(op, missing, "a tensor (the residuals gc, aqk, tkk and rqk come all together or not at all)", "None")
    for name, r, shape in zip(RESIDUAL_NAMES, residuals, _residual_shapes(q, use_qk_l2norm)):
        check_tensor(op, name, r, dtypes=(torch.float32,), device=q.device)
        check_shape(op, name, r, shape, "(kda::chunk_kda_fwd's residual for these inputs)")


def chunk_kda_bwd_meta(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    do: torch.Tensor,
    dht: torch.Tensor | None,
    scale: float,
    use_qk_l2norm: bool,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    gate_lower_bound: float | None = None,
    residuals: Sequence = (None, None, None, None),
    token_flat: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Validates and allocates (dq, dk, dv, dg, dbeta, dh0, dA_log, ddt_bias); each gradient has
    its input's shape and dtype (token_flat: [B*T, ...], see empty_tokens); dh0 is an empty [0]
    tensor when there is no initial state, dA_log and ddt_bias when there is no in-op gate (then
    fp32). residuals: the forward's (gc, aqk, tkk, rqk) or four Nones."""
    op = "chunk_kda_bwd"
    n = check_chunk_kda_inputs(op, q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, gate_lower_bound)
    check_chunk_kda_residuals(op, q, residuals, use_qk_l2norm)
    check_tensor(op, "do", do, dtypes=(v.dtype,), device=v.device)
    check_shape(op, "do", do, v.shape, "(the shape of v)")
    if dht is not None:
        acc = accumulation_dtype(q.dtype)
        check_tensor(op, "dht", dht, ndim=4, dtypes=(acc,), device=q.device)
        check_shape(op, "dht", dht, (n, q.shape[2], q.shape[3], v.shape[3]), "([N, H, K, V], the final state's shape)")
    grads = tuple(empty_tokens(x.shape, x.dtype, x.device, token_flat) for x in (q, k, v, g, beta))
    if initial_state is None:
        dh0 = torch.empty((0,), dtype=g.dtype, device=g.device)
    else:
        dh0 = torch.empty(initial_state.shape, dtype=initial_state.dtype, device=initial_state.device)
    if A_log is None:
        gate_grads = tuple(torch.empty((0,), dtype=torch.float32, device=q.device) for _ in range(2))
    else:
        gate_grads = (torch.empty_like(A_log), torch.empty_like(dt_bias))
    return (*grads, dh0, *gate_grads)


def pack_to_padded(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[1, T, ...] packed -> [N, T, ...], sequence n at rows [0, len_n), zeros after.

    Padding with zeros is exact for KDA: a token with k = v = q = 0, beta = 0 and g = 0 leaves the
    state unchanged. Shapes depend only on input shapes (no host read of cu_seqlens).
    """
    total = x.shape[1]
    starts, lens = cu_seqlens[:-1].long(), (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    t = torch.arange(total, device=x.device)
    valid = t[None, :] < lens[:, None]  # [N, T]
    index = (starts[:, None] + t[None, :]).clamp(max=total - 1)
    padded = x[0][index]  # [N, T, ...]
    return padded * valid.view(*valid.shape, *([1] * (x.dim() - 2))).to(x.dtype)


def padded_to_pack(xp: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_to_padded: [N, T, ...] -> [1, T, ...]."""
    total = xp.shape[1]
    p = torch.arange(total, device=xp.device)
    seq = torch.searchsorted(cu_seqlens[1:].long(), p, right=True).clamp(max=xp.shape[0] - 1)
    return xp[seq, p - cu_seqlens[:-1].long()[seq]][None]


def chunk_local_cumsum(g: torch.Tensor, chunk_size: int = CHUNK_SIZE) -> torch.Tensor:
    """[B, NT*C, H, K] -> cumulative sum restarting at every chunk."""
    B, T, H, K = g.shape
    return g.view(B, T // chunk_size, chunk_size, H, K).cumsum(2).view(B, T, H, K)


def chunk_kda_fwd_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    scale: float,
    output_final_state: bool,
    use_qk_l2norm: bool,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    gate_lower_bound: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked KDA forward (C = 64) in the accumulation dtype; same contract and outputs as
    chunk_kda_fwd_meta. Exact for any gate: only exp(G_i - G_j) with i >= j is formed."""
    o_out, final_out = chunk_kda_fwd_meta(
        q, k, v, g, beta, initial_state, cu_seqlens, scale, output_final_state, use_qk_l2norm, A_log, dt_bias,
        gate_lower_bound,
    )
    acc = accumulation_dtype(q.dtype)
    if A_log is not None:
        g = kda_gate(g, A_log, dt_bias, gate_lower_bound)
    q, k, v, g, beta = (x.to(acc) for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if cu_seqlens is not None:
        q, k, v, g, beta = (pack_to_padded(x, cu_seqlens) for x in (q, k, v, g, beta))
    o, final_state = chunked_delta_rule(q, k, v, g, beta, scale, initial_state)
    if cu_seqlens is not None:
        o = padded_to_pack(o, cu_seqlens)
    o_out.copy_(o)
    if output_final_state:
        final_out.copy_(final_state)
    return o_out, final_out


def pad_to_chunks(x: torch.Tensor, chunk_size: int = CHUNK_SIZE) -> torch.Tensor:
    """Zero-pads dim 1 to a multiple of the chunk size (exact: see pack_to_padded)."""
    pad = -x.shape[1] % chunk_size
    if pad == 0:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1)


def intra_chunk(
    q: torch.Tensor, k: torch.Tensor, gc: torch.Tensor, beta: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk, [B, H, C, K] inputs with gc the chunk-local cumulative gate.

    Returns A_qk (lower triangular incl. diagonal, scale applied) and A_kk (strictly lower, beta
    applied), both [B, H, C, C]; every exponent is G_i - G_j with i >= j.
    """
    C = q.shape[-2]
    incl = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    diff = gc[..., :, None, :] - gc[..., None, :, :]  # [B, H, C(i), C(j), K]
    decay = diff.masked_fill(~incl[..., None], float("-inf")).exp()
    a_qk = torch.einsum("bhid,bhjd,bhijd->bhij", q, k, decay) * scale
    a_kk = torch.einsum("bhid,bhjd,bhijd->bhij", k, k, decay) * beta[..., None]
    return a_qk, a_kk.tril(-1)


def wy_inverse(a_kk: torch.Tensor) -> torch.Tensor:
    """(I + A_kk)^-1 for strictly lower A_kk [.., C, C] (unit lower-triangular solve)."""
    eye = torch.eye(a_kk.shape[-1], dtype=a_kk.dtype, device=a_kk.device).expand_as(a_kk)
    return torch.linalg.solve_triangular(eye + a_kk, eye, upper=False, unitriangular=True)


def chunked_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked KDA over [B, T, H, *] (already normalised, accumulation dtype). Returns o
    [B, T, H, V] and the final state [B, H, K, V]."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v, g, beta = (pad_to_chunks(x) for x in (q, k, v, g, beta))
    gc = chunk_local_cumsum(g)
    C = CHUNK_SIZE

    def chunk(x: torch.Tensor, i: int) -> torch.Tensor:  # [B, C, H, *] -> [B, H, C, *]
        return x[:, i * C : (i + 1) * C].transpose(1, 2)

    if initial_state is None:
        S = q.new_zeros(B, H, K, V)
    else:
        S = initial_state.to(q.dtype)
    o = torch.empty(B, q.shape[1], H, V, dtype=q.dtype, device=q.device)
    for i in range(q.shape[1] // C):
        b_q, b_k, b_v, b_g, b_beta = (chunk(x, i) for x in (q, k, v, gc, beta))
        a_qk, a_kk = intra_chunk(b_q, b_k, b_g, b_beta, scale)
        t_inv = wy_inverse(a_kk)
        w = t_inv @ (b_beta[..., None] * b_k * b_g.exp())  # [B, H, C, K]
        u = t_inv @ (b_beta[..., None] * b_v)  # [B, H, C, V]
        v_new = u - w @ S
        o[:, i * C : (i + 1) * C] = ((scale * b_q * b_g.exp()) @ S + a_qk @ v_new).transpose(1, 2)
        g_last = b_g[..., -1:, :]  # [B, H, 1, K]
        S = g_last.exp().transpose(-1, -2) * S + (b_k * (g_last - b_g).exp()).transpose(-1, -2) @ v_new
    return o[:, :T], S
