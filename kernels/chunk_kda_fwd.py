"""Triton kernels of the chunked KDA forward (kda::chunk_kda_fwd); math in docs/kda_math.md §3.

Chunk length BT = 64, split into four sub-chunks of BC = 16 rows. The per-chunk work runs in
three kernels shaped like fla-core's pipeline: small programs of one warp over 16-row blocks
where the work is arithmetic, wide memory-bound ones elsewhere; then one scan.

1. `chunk_kda_fwd_gate_kernel`, per (chunk, head), memory-bound: the q/k L2 norms (to rqk), the
   chunk-local cumulative gate G (fp32, to gc), G_last (to gl), qg = scale·q̂⊙e^G and
   kg = k̂⊙e^(G_last − G). With the in-op gate (A_log, dt_bias given) it first computes
   g = −e^(A_log)·softplus(z + dt_bias), or with a gate_lower_bound L the bounded
   g = L·σ(e^(A_log)·(z + dt_bias)), from the pre-activation z the op received as g.
2. `chunk_kda_fwd_intra_kernel`, per (sub-chunk, chunk, head) on one warp: the sub-chunk's rows
   of A_qk (scale, with its diagonal) and A_kk (strictly lower, without β), fp32, as whole rows
   of the chunk with zeros above: the earlier sub-chunks' columns on tensor cores anchored at
   the sub-chunk's first row, the diagonal block at that one anchor where G falls by at most
   ONE_ANCHOR_MAX_FALL across the sub-chunk, else by levels (below).
3. `chunk_kda_fwd_solve_kernel`, per (chunk, head) on one warp: T = (I + β⊙A_kk)^-1 on [16, 16]
   blocks (forward substitution inside the four diagonal blocks, batched, then the six merges
   T_rc = −T_rr·Σ_{c <= j < r} A_rj·T_jc in tf32x3), w = T(β⊙k̂⊙e^G) and u = T(β⊙v).
4. `chunk_kda_fwd_scan_kernel`, per (sequence, head, V tile), sequential over the sequence's
   chunks with the state tile S [K, BV] in registers (fp32). Per chunk it forms
   v_new = u − w·S, writes o = qg·S + A_qk·v_new and updates S ← e^(G_last)⊙S + kgᵀ·v_new.
   The output is fused into the scan, so the per-chunk states h never reach HBM (fla writes
   them, B·NT·H·K·V bf16, ~67 MB at B1 T8192 H16, and reads them back in another kernel).

Under autograd the forward keeps G, A_qk, T and the norms for the backward (the residuals,
≈ 1 KB per token and head): the kernels write them into the residual buffers, and the solve
stores T (STORE_RESIDUALS). Inference writes G, the norms and A_kk to scratch and no T.

History (H100, bench/NOTES.md has the numbers): a first prep / intra / wy split ran 4-warp
programs over the whole chunk (120 + 400 + 350 µs at B1 T8192 H16); one fused 4-warp,
255-register kernel by levels measured the same ~870 µs; this split into 1-warp sub-chunk
programs took the whole forward from 7.13 to 5.72 ms at B8 T4096 H32.

Precision: u, A_qk and A_kk are stored in fp32 (rounding u or A_qk to bf16 costs as much
relative error as rounding o itself), w, qg, kg in the input dtype; the scan's w·S and qg·S use
the input dtype, its A_qk·v_new and kgᵀ·v_new fp32 (tf32) operands. bf16 inputs land at
~2–2.7e-3 relative RMS error against the fp32 recurrence (bar 5e-3), most of it the bf16
rounding of o.

Numerics. G, A, T, S and every accumulator are fp32; only differences G_i − G_j with i >= j are
exponentiated (g <= 0, so each factor is <= 1 and nothing overflows, even for gates of −1000),
except in the diagonal block's one-anchor form: there e^(G_i − G_j) = e^(G_i − G_a)·e^(G_a − G_j)
with a the sub-chunk's first row (never later than j, so no rounding leaks from future tokens) and
the second factor up to e^ONE_ANCHOR_MAX_FALL, which a run-time test of the K tile's fall
G_a − G_(a+15) bounds; one [16, 16] product per matrix and K tile. Otherwise levels: a strictly
lower pair (i, j) of a sub-chunk belongs to level b, the highest bit where i and j differ; with a =
the last row of the lower half of their aligned 2^(b+1)-row block, j <= a < i and
e^(G_i − G_j) = e^(G_i − G_a)·e^(G_a − G_j) with both exponents <= 0: exact (if a factor underflows,
the true product, smaller than either, underflows too), and the anchor is never a later row than i,
so no rounding leaks from future tokens. Each level costs one exponential per element of [16, BK]
and two [16, 16] tensor-core products in LaunchConfig.diag_precision: plain tf32 for 16-bit inputs
(o's error 2.2e-3 against 2.1e-3 for an exact elementwise diagonal, which measured 24% slower in the
intra kernel; bench/NOTES.md), tf32x3 for fp32 inputs. G_last is read off the last row of G exactly
(a masked sum adds zeros). The L2 norm is a row scaling of the q and k tiles. Rows past the end of a
sequence are loaded as q = k = v = 0, beta = 0, g = 0, which leaves the state unchanged and keeps
G_last equal to G at the last real row; where G is read back, such rows read G_last.

Varlen (B = 1, device `cu_seqlens`, N sequences): the per-chunk kernels run over an upper bound
of chunk slots, (T + (BT−1)·N) // BT >= Σ_n cdiv(len_n, BT), from shapes only; a device-side table
built by a small kernel (no host read) maps each slot to its sequence, and
slots past the last chunk exit at once. The scan reads its sequence's bounds from cu_seqlens.

Index tensors (cu_seqlens and the chunk table) are loaded in the kernel bodies, never by a
@triton.jit helper: torch's analysis of what a kernel writes (the one Inductor relies on) takes a
pointer passed to a helper as written once anything the helper returns enters a store's address,
and Inductor would clone such an input for the kernel and copy it back (tests/test_triton_writes.py).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

BT = 64  # chunk length
BC = 16  # sub-chunk length (tl.dot needs M, N, K >= 16)
# The diagonal blocks take one anchor (the sub-chunk's first row) where G falls by at most this
# across the sub-chunk in every channel of a K tile, else they go by levels (gates of −1000).
# The factors stay within e^±40 ≈ 2.4e17^±1: the backward's products of them with the C×C
# gradients overflow fp32 only past |dA·k| ≈ 1e21, and a factor that flushes to zero (below
# 2^−126) drops at most 2^−126·e^40 ≈ 3e-21·|k| from an entry.
ONE_ANCHOR_MAX_FALL = tl.constexpr(40.0)


@triton.jit
def _row(b_x, o_r, r):
    """Row r of a [R, C] block as [C], exactly (the other rows contribute +0)."""
    return tl.sum(tl.where(o_r[:, None] == r, b_x, 0.0), axis=0)


@triton.jit
def _first_row_anchor(b_G, o_r, BC: tl.constexpr):
    """G at a sub-chunk's first row a ([BK] of the [BC, BK] block b_G) and whether the diagonal
    block may take that one anchor: G falls by at most ONE_ANCHOR_MAX_FALL from a to the last row
    in every channel of the tile. Both intra kernels decide by it, so forward and backward take
    the same path for the same gate."""
    b_Ga = _row(b_G, o_r, 0)
    return b_Ga, tl.max(b_Ga - _row(b_G, o_r, BC - 1), axis=0) <= ONE_ANCHOR_MAX_FALL


@triton.jit
def _load_rows(p_base, o_t, m_t, o_d, m_d, STRIDE: tl.constexpr):
    """[R, D] fp32 block of rows o_t of a [*, STRIDE] row-major tensor, zero where masked."""
    p = p_base + o_t[:, None] * STRIDE + o_d[None, :]
    return tl.load(p, mask=m_t[:, None] & m_d[None, :], other=0.0).to(tl.float32)


@triton.jit
def _store_rows(p_base, b_x, o_t, m_t, o_d, m_d, STRIDE: tl.constexpr):
    p = p_base + o_t[:, None] * STRIDE + o_d[None, :]
    tl.store(p, b_x.to(p_base.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])


@triton.jit
def _load_gate(p_G, o_t, m_t, o_k, m_k, b_gl, STRIDE: tl.constexpr):
    """[R, BK] cumulative gate G of rows o_t; rows past the sequence end read G_last (they are the
    zero-gate padding of the reference), so G never increases down a chunk and every
    exponent of a difference G_i − G_j with i >= j stays <= 0."""
    return tl.where(m_t[:, None], _load_rows(p_G, o_t, m_t, o_k, m_k, STRIDE), b_gl[None, :])


@triton.jit
def _level_factors(p_G, b_G, b_gl, t_a, o_r, eos, o_k, m_k, b: tl.constexpr, STRIDE: tl.constexpr):
    """Level b of a sub-chunk's diagonal block (rows t_a + o_r, G of them b_G [BC, BK]): m_hi [BC],
    the rows on the upper side of their level-b block, and b_e [BC, BK], e^(G_i − G_a) on those
    rows and e^(G_a − G_j) on the others, a the last row of the block's lower half: all <= 1."""
    m_hi = ((o_r >> b) & 1) == 1
    o_a = t_a + ((o_r >> b) << b) + tl.where(m_hi, -1, (1 << b) - 1)  # [BC] anchor rows
    b_Ga = _load_gate(p_G, o_a, o_a < eos, o_k, m_k, b_gl, STRIDE)  # [BC, BK]
    return m_hi, tl.exp(tl.where(m_hi[:, None], b_G - b_Ga, b_Ga - b_G))


@triton.jit
def softplus(x):
    """torch's softplus: the identity above 20 (log(1 + e^x) rounds to x there); the exponential
    takes min(x, 20), so the branch not taken never overflows either (e^x does past 88)."""
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def sigmoid(x):
    """σ(x) from e^(−|x|) <= 1: no exponential overflows in either tail (tl.sigmoid's e^(−x) does)."""
    b_e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0, b_e) / (1.0 + b_e)


@triton.jit
def kimi_gate(b_s, b_a, gate_lower_bound, BOUNDED_GATE: tl.constexpr):
    """The Kimi gate (fp32) from s = z + dt_bias and a = e^(A_log[h]): −a·softplus(s), or with
    BOUNDED_GATE gate_lower_bound·σ(a·s). Shared by the chunk forward's gate kernel and kda_decode."""
    if BOUNDED_GATE:
        b_g = tl.cast(gate_lower_bound, tl.float32) * sigmoid(b_a * b_s)
    else:
        b_g = -b_a * softplus(b_s)
    return b_g


@triton.jit
def chunk_kda_fwd_gate_kernel(
    q,
    k,
    g,
    A_log,
    dt_bias,
    gate_lower_bound,
    gc,
    qg,
    kg,
    gl,
    rqk,
    cu_seqlens,
    chunk_seq,
    chunk_offsets,
    T,
    N,
    NT,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    USE_QK_L2NORM: tl.constexpr,
    USE_GATE_IN_KERNEL: tl.constexpr,
    BOUNDED_GATE: tl.constexpr,
):
    """Per (chunk, head), memory-bound: the q/k norms (to rqk, with the L2 norm), G = the
    chunk-local cumsum of g (to gc), G_last (to gl), qg = scale·q̂⊙e^G and kg = k̂⊙e^(G_last − G).
    USE_GATE_IN_KERNEL: g holds the pre-activation z and g = −e^(A_log)·softplus(z + dt_bias), or
    with BOUNDED_GATE g = gate_lower_bound·σ(e^(A_log)·(z + dt_bias))."""
    scale = tl.cast(scale, tl.float32)  # Inductor passes Python floats as fp64; eager as fp32
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    if IS_VARLEN:  # i_t is a chunk slot: the table gives its sequence, N for an unused slot
        i_n = tl.load(chunk_seq + i_t).to(tl.int32)
        if i_n >= N:
            return
        bos, eos = tl.load(cu_seqlens + i_n).to(tl.int64), tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        t0, i_s = bos + (i_t - tl.load(chunk_offsets + i_n).to(tl.int32)) * BT, i_t
    else:
        t0, eos, i_s = i_b.to(tl.int64) * T + i_t * BT, i_b.to(tl.int64) * T + T, i_b * NT + i_t
    o_i = tl.arange(0, BT)
    o_t = t0 + o_i  # [BT] token rows
    m_t = o_t < eos
    p_q, p_k, p_g = q + i_h * K, k + i_h * K, g + i_h * K

    # [BT] x 2: 1 / sqrt(sum(x^2) + 1e-6) of the q and k rows (ones without the norm)
    b_rq = tl.zeros([BT], dtype=tl.float32)
    b_rk = tl.zeros([BT], dtype=tl.float32)
    if USE_QK_L2NORM:
        for i_k in range(tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            b_x = _load_rows(p_q, o_t, m_t, o_k, m_k, H * K)
            b_rq += tl.sum(b_x * b_x, axis=1)
            b_x = _load_rows(p_k, o_t, m_t, o_k, m_k, H * K)
            b_rk += tl.sum(b_x * b_x, axis=1)
        b_rq = tl.rsqrt(b_rq + 1e-6)
        b_rk = tl.rsqrt(b_rk + 1e-6)
        tl.store(rqk + (o_t * H + i_h) * 2, b_rq, mask=m_t)
        tl.store(rqk + (o_t * H + i_h) * 2 + 1, b_rk, mask=m_t)
    else:
        b_rq += 1.0
        b_rk += 1.0
    if USE_GATE_IN_KERNEL:
        b_a = tl.exp(tl.load(A_log + i_h).to(tl.float32))
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_g = _load_rows(p_g, o_t, m_t, o_k, m_k, H * K)  # [BT, BK]
        if USE_GATE_IN_KERNEL:  # padded rows keep g = 0
            b_bias = tl.load(dt_bias + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)  # [BK]
            b_g = tl.where(m_t[:, None], kimi_gate(b_g + b_bias[None, :], b_a, gate_lower_bound, BOUNDED_GATE), 0.0)
        b_G = tl.cumsum(b_g, axis=0)  # [BT, BK]
        _store_rows(gc + i_h * K, b_G, o_t, m_t, o_k, m_k, H * K)
        # padded rows add g = 0, so the last row is G at the last real row
        b_gl = _row(b_G, o_i, BT - 1)  # [BK]
        tl.store(gl + (i_s * H + i_h).to(tl.int64) * K + o_k, b_gl, mask=m_k)
        b_q = _load_rows(p_q, o_t, m_t, o_k, m_k, H * K) * b_rq[:, None]  # [BT, BK]
        b_k = _load_rows(p_k, o_t, m_t, o_k, m_k, H * K) * b_rk[:, None]  # [BT, BK]
        _store_rows(qg + i_h * K, scale * b_q * tl.exp(b_G), o_t, m_t, o_k, m_k, H * K)
        _store_rows(kg + i_h * K, b_k * tl.exp(b_gl[None, :] - b_G), o_t, m_t, o_k, m_k, H * K)


@triton.jit
def chunk_kda_fwd_intra_kernel(
    q,
    k,
    gc,
    gl,
    rqk,
    aqk,
    akk,
    cu_seqlens,
    chunk_seq,
    chunk_offsets,
    T,
    N,
    NT,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    USE_QK_L2NORM: tl.constexpr,
    DIAG_PRECISION: tl.constexpr,
):
    """Per (sub-chunk, chunk, head), the BC rows R of one sub-chunk: A_qk[R, :] (scale, with its
    diagonal) and A_kk[R, :] (strictly lower, without β) as whole rows of the chunk, zeros above.

    The earlier sub-chunks' columns J on tensor cores, anchored at n = R's first row: for
    j < n <= i, e^(G_i − G_j) = e^(G_i − G_n)·e^(G_n − G_j), both factors <= 1, so
    [BC, BK] rows q̂_R e^(G_R − G_n) meet [BT, BK] rows k̂_J e^(G_n − G_J) (the rows from n on
    masked to zero). The diagonal block at R's first row where G falls little across R (two
    [BC, BK] exponentials and two [BC, BC] products in DIAG_PRECISION per K tile), else by levels
    (the module docstring: four exponentials and eight products), A_qk's diagonal q̂_i·k̂_i as a
    row sum."""
    scale = tl.cast(scale, tl.float32)  # Inductor passes Python floats as fp64; eager as fp32
    i_c, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    if IS_VARLEN:  # i_t is a chunk slot: the table gives its sequence, N for an unused slot
        i_n = tl.load(chunk_seq + i_t).to(tl.int32)
        if i_n >= N:
            return
        bos, eos = tl.load(cu_seqlens + i_n).to(tl.int64), tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        t0, i_s = bos + (i_t - tl.load(chunk_offsets + i_n).to(tl.int32)) * BT, i_t
    else:
        t0, eos, i_s = i_b.to(tl.int64) * T + i_t * BT, i_b.to(tl.int64) * T + T, i_b * NT + i_t
    t_a = t0 + i_c * BC  # the sub-chunk's first row
    if t_a >= eos:  # past the sequence end: no rows to write
        return

    o_r = tl.arange(0, BC)
    o_t = t_a + o_r  # [BC] the sub-chunk's token rows R
    m_t = o_t < eos
    o_j = tl.arange(0, BT)
    o_tj = t0 + o_j  # [BT] the chunk's rows as columns
    m_j = o_tj < t_a  # [BT] the earlier sub-chunks' rows J (real rows: they precede t_a)
    p_q, p_k, p_G = q + i_h * K, k + i_h * K, gc + i_h * K
    if USE_QK_L2NORM:
        b_rq = tl.load(rqk + (o_t * H + i_h) * 2, mask=m_t, other=0.0)  # [BC]
        b_rk = tl.load(rqk + (o_t * H + i_h) * 2 + 1, mask=m_t, other=0.0)  # [BC]
        b_rj = tl.load(rqk + (o_tj * H + i_h) * 2 + 1, mask=m_j, other=0.0)  # [BT]
    else:
        b_rq = tl.full([BC], 1.0, dtype=tl.float32)
        b_rk = b_rq
        b_rj = tl.full([BT], 1.0, dtype=tl.float32)

    b_Aq = tl.zeros([BC, BT], dtype=tl.float32)  # columns J (zero from n on)
    b_Ak = tl.zeros([BC, BT], dtype=tl.float32)
    b_Dq = tl.zeros([BC, BC], dtype=tl.float32)  # the diagonal block, columns R
    b_Dk = tl.zeros([BC, BC], dtype=tl.float32)
    b_dqk = tl.zeros([BC], dtype=tl.float32)  # q̂_i·k̂_i, the diagonal of A_qk
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_gl = tl.load(gl + (i_s * H + i_h).to(tl.int64) * K + o_k, mask=m_k, other=0.0)  # [BK] G_last
        b_G = _load_gate(p_G, o_t, m_t, o_k, m_k, b_gl, H * K)  # [BC, BK]
        b_q = _load_rows(p_q, o_t, m_t, o_k, m_k, H * K) * b_rq[:, None]  # [BC, BK] q̂
        b_k = _load_rows(p_k, o_t, m_t, o_k, m_k, H * K) * b_rk[:, None]  # [BC, BK] k̂
        if i_c > 0:
            b_gn = tl.load(p_G + t_a * H * K + o_k, mask=m_k, other=0.0)  # [BK] G at n (a real row)
            b_en = tl.exp(b_G - b_gn[None, :])  # [BC, BK] e^(G_R − G_n) <= 1
            b_Gj = _load_rows(p_G, o_tj, m_j, o_k, m_k, H * K)
            b_ej = tl.exp(tl.where(m_j[:, None], b_gn[None, :] - b_Gj, float("-inf")))  # [BT, BK] <= 1
            b_kj = _load_rows(p_k, o_tj, m_j, o_k, m_k, H * K) * b_rj[:, None] * b_ej  # [BT, BK]
            b_Aq = tl.dot(b_q * b_en, tl.trans(b_kj), acc=b_Aq)
            b_Ak = tl.dot(b_k * b_en, tl.trans(b_kj), acc=b_Ak)
        b_dqk += tl.sum(b_q * b_k, axis=1)
        b_Ga, one_anchor = _first_row_anchor(b_G, o_r, BC)  # [BK] G at the sub-chunk's first row a
        if one_anchor:
            # the whole block at one anchor: for a <= j <= i, e^(G_i − G_a) <= 1 and
            # e^(G_a − G_j) <= e^ONE_ANCHOR_MAX_FALL
            b_kc = tl.trans(b_k * tl.exp(b_Ga[None, :] - b_G))  # [BK, BC]
            b_ei = tl.exp(b_G - b_Ga[None, :])  # [BC, BK]
            m_low = o_r[:, None] > o_r[None, :]  # [BC, BC] j < i
            b_Dq += tl.where(m_low, tl.dot(b_q * b_ei, b_kc, input_precision=DIAG_PRECISION), 0.0)
            b_Dk += tl.where(m_low, tl.dot(b_k * b_ei, b_kc, input_precision=DIAG_PRECISION), 0.0)
        else:
            # by levels: pairs (i, j) of level b meet at the anchor a, the last row of the lower
            # half of their 2^(b+1)-row block, so j <= a < i
            for b in tl.static_range(4):
                m_hi, b_e = _level_factors(p_G, b_G, b_gl, t_a, o_r, eos, o_k, m_k, b, H * K)
                b_kc = tl.trans(tl.where(m_hi[:, None], 0.0, b_k * b_e))  # [BK, BC] columns j of the pairs
                m_lvl = (o_r[:, None] >> (b + 1)) == (o_r[None, :] >> (b + 1))  # [BC, BC] within one block
                b_qr = tl.where(m_hi[:, None], b_q * b_e, 0.0)  # [BC, BK] rows i of the pairs
                b_kr = tl.where(m_hi[:, None], b_k * b_e, 0.0)
                b_Dq += tl.where(m_lvl, tl.dot(b_qr, b_kc, input_precision=DIAG_PRECISION), 0.0)
                b_Dk += tl.where(m_lvl, tl.dot(b_kr, b_kc, input_precision=DIAG_PRECISION), 0.0)

    b_Dq = tl.where(o_r[:, None] == o_r[None, :], b_dqk[:, None], b_Dq)
    m_blk = (o_j >= i_c * BC) & (o_j < i_c * BC + BC)  # [BT] R's own columns
    p_row = o_t[:, None] * (H * BT) + i_h * BT  # [BC, 1]
    m_rest = m_t[:, None] & ~m_blk[None, :]
    tl.store(aqk + p_row + o_j[None, :], b_Aq * scale, mask=m_rest)
    tl.store(akk + p_row + o_j[None, :], b_Ak, mask=m_rest)
    tl.store(aqk + p_row + i_c * BC + o_r[None, :], b_Dq * scale, mask=m_t[:, None])
    tl.store(akk + p_row + i_c * BC + o_r[None, :], b_Dk, mask=m_t[:, None])


@triton.jit
def _akk_block(p_akk, t0, eos, b_beta, R: tl.constexpr, C: tl.constexpr, BC: tl.constexpr, STRIDE: tl.constexpr):
    """[BC, BC] block (R, C) of β⊙A_kk (rows of sub-chunk R, columns of sub-chunk C), zero past the end."""
    o_c = tl.arange(0, BC)
    o_t = t0 + R * BC + o_c
    m_t = o_t < eos
    b_a = tl.load(p_akk + o_t[:, None] * STRIDE + C * BC + o_c[None, :], mask=m_t[:, None], other=0.0)
    return b_a * b_beta[:, None]


@triton.jit
def _wy_rows(b_T0, b_T1, b_T2, b_T3, b_x0, b_x1, b_x2, b_x3):
    """Σ_{c <= r} T_rc·X_c for one row block r, given its four T blocks (zeros past the diagonal)."""
    b_y = tl.dot(b_T0, b_x0)
    b_y = tl.dot(b_T1, b_x1, acc=b_y)
    b_y = tl.dot(b_T2, b_x2, acc=b_y)
    return tl.dot(b_T3, b_x3, acc=b_y)


@triton.jit
def chunk_kda_fwd_solve_kernel(
    k,
    v,
    beta,
    gc,
    rqk,
    akk,
    tkk,
    w,
    u,
    cu_seqlens,
    chunk_seq,
    chunk_offsets,
    T,
    N,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    USE_QK_L2NORM: tl.constexpr,
    STORE_RESIDUALS: tl.constexpr,
):
    """Per (chunk, head) on [BC, BC] blocks, for one warp (fla-core's inter_solve layout): T =
    (I + β⊙A_kk)^-1 from the intra kernel's A_kk by forward substitution inside the four
    diagonal blocks (batched), then the block merges T_rc = −T_rr·Σ_{c <= j < r} A_rj·T_jc
    (tf32x3), to tkk under STORE_RESIDUALS; w = T(β⊙k̂⊙e^G) and u = T(β⊙v) per sub-chunk row
    block, as [BC, BC] × [BC, BK] products."""
    tl.static_assert(BT == 4 * BC)
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    if IS_VARLEN:  # i_t is a chunk slot: the table gives its sequence, N for an unused slot
        i_n = tl.load(chunk_seq + i_t).to(tl.int32)
        if i_n >= N:
            return
        bos, eos = tl.load(cu_seqlens + i_n).to(tl.int64), tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        t0 = bos + (i_t - tl.load(chunk_offsets + i_n).to(tl.int32)) * BT
    else:
        t0, eos = i_b.to(tl.int64) * T + i_t * BT, i_b.to(tl.int64) * T + T
    o_c = tl.arange(0, BC)
    o_t0, o_t1, o_t2, o_t3 = t0 + o_c, t0 + BC + o_c, t0 + 2 * BC + o_c, t0 + 3 * BC + o_c  # [BC] rows per block
    m_t0, m_t1, m_t2, m_t3 = o_t0 < eos, o_t1 < eos, o_t2 < eos, o_t3 < eos
    p_beta = beta + i_h
    b_b0 = tl.load(p_beta + o_t0 * H, mask=m_t0, other=0.0).to(tl.float32)  # [BC] β per block
    b_b1 = tl.load(p_beta + o_t1 * H, mask=m_t1, other=0.0).to(tl.float32)
    b_b2 = tl.load(p_beta + o_t2 * H, mask=m_t2, other=0.0).to(tl.float32)
    b_b3 = tl.load(p_beta + o_t3 * H, mask=m_t3, other=0.0).to(tl.float32)
    p_akk = akk + i_h * BT
    S: tl.constexpr = H * BT

    # [4, BC, BC] inverses of the diagonal blocks (I + N), N strictly lower: X = (I + N)^-1 − I
    # by forward substitution, row i from rows j < i
    o_r3 = tl.arange(0, 4)[:, None, None] * BC + o_c[None, :, None]  # [4, BC, 1] chunk rows
    o_j3 = tl.arange(0, 4)[:, None, None] * BC + o_c[None, None, :]  # [4, 1, BC] chunk columns
    m_r3 = (t0 + o_r3) < eos
    b_beta3 = tl.load(p_beta + (t0 + o_r3) * H, mask=m_r3, other=0.0).to(tl.float32)  # [4, BC, 1]
    b_N = tl.load(p_akk + (t0 + o_r3) * S + o_j3, mask=m_r3, other=0.0) * b_beta3
    b_X = -b_N
    for i in range(1, BC):
        m_i = (o_c == i)[None, :, None]
        b_a = -tl.sum(tl.where(m_i, b_N, 0.0), axis=1)  # [4, BC]
        b_a += tl.sum(b_a[:, :, None] * b_X, axis=1)
        b_X = tl.where(m_i, b_a[:, None, :], b_X)
    b_X += (o_c[:, None] == o_c[None, :]).to(tl.float32)[None, :, :]
    # the four [BC, BC] blocks: [4, BC, BC] -> [BC, BC, 2, 2] (block 2a + b at [..., a, b])
    b_Xe, b_Xo = tl.split(tl.reshape(tl.permute(b_X, (1, 2, 0)), (BC, BC, 2, 2)))
    b_T00, b_T22 = tl.split(b_Xe)
    b_T11, b_T33 = tl.split(b_Xo)

    # the off-diagonal blocks of β⊙A_kk and the merges, row block by row block
    b_A10 = _akk_block(p_akk, t0, eos, b_b1, 1, 0, BC, S)
    b_T10 = -tl.dot(b_T11, tl.dot(b_A10, b_T00, input_precision="tf32x3"), input_precision="tf32x3")
    b_A20 = _akk_block(p_akk, t0, eos, b_b2, 2, 0, BC, S)
    b_A21 = _akk_block(p_akk, t0, eos, b_b2, 2, 1, BC, S)
    b_T21 = -tl.dot(b_T22, tl.dot(b_A21, b_T11, input_precision="tf32x3"), input_precision="tf32x3")
    b_y = tl.dot(b_A20, b_T00, input_precision="tf32x3")
    b_y = tl.dot(b_A21, b_T10, acc=b_y, input_precision="tf32x3")
    b_T20 = -tl.dot(b_T22, b_y, input_precision="tf32x3")
    b_A30 = _akk_block(p_akk, t0, eos, b_b3, 3, 0, BC, S)
    b_A31 = _akk_block(p_akk, t0, eos, b_b3, 3, 1, BC, S)
    b_A32 = _akk_block(p_akk, t0, eos, b_b3, 3, 2, BC, S)
    b_T32 = -tl.dot(b_T33, tl.dot(b_A32, b_T22, input_precision="tf32x3"), input_precision="tf32x3")
    b_y = tl.dot(b_A31, b_T11, input_precision="tf32x3")
    b_y = tl.dot(b_A32, b_T21, acc=b_y, input_precision="tf32x3")
    b_T31 = -tl.dot(b_T33, b_y, input_precision="tf32x3")
    b_y = tl.dot(b_A30, b_T00, input_precision="tf32x3")
    b_y = tl.dot(b_A31, b_T10, acc=b_y, input_precision="tf32x3")
    b_y = tl.dot(b_A32, b_T20, acc=b_y, input_precision="tf32x3")
    b_T30 = -tl.dot(b_T33, b_y, input_precision="tf32x3")
    b_Z = tl.zeros([BC, BC], dtype=tl.float32)

    if STORE_RESIDUALS:
        # T as whole rows of the chunk ([BT, BT], zeros above the diagonal blocks) for the backward
        p_tkk = tkk + i_h * BT
        _store_rows(p_tkk, b_T00, o_t0, m_t0, o_c, o_c < BC, S)
        _store_rows(p_tkk + BC, b_Z, o_t0, m_t0, o_c, o_c < BC, S)
        _store_rows(p_tkk + 2 * BC, b_Z, o_t0, m_t0, o_c, o_c < BC, S)
        _store_rows(p_tkk + 3 * BC, b_Z, o_t0, m_t0, o_c, o_c < BC, S)
        _store_rows(p_tkk, b_T10, o_t1, m_t1, o_c, o_c < BC, S)
        _store_rows(p_tkk + BC, b_T11, o_t1, m_t1, o_c, o_c < BC, S)
        _store_rows(p_tkk + 2 * BC, b_Z, o_t1, m_t1, o_c, o_c < BC, S)
        _store_rows(p_tkk + 3 * BC, b_Z, o_t1, m_t1, o_c, o_c < BC, S)
        _store_rows(p_tkk, b_T20, o_t2, m_t2, o_c, o_c < BC, S)
        _store_rows(p_tkk + BC, b_T21, o_t2, m_t2, o_c, o_c < BC, S)
        _store_rows(p_tkk + 2 * BC, b_T22, o_t2, m_t2, o_c, o_c < BC, S)
        _store_rows(p_tkk + 3 * BC, b_Z, o_t2, m_t2, o_c, o_c < BC, S)
        _store_rows(p_tkk, b_T30, o_t3, m_t3, o_c, o_c < BC, S)
        _store_rows(p_tkk + BC, b_T31, o_t3, m_t3, o_c, o_c < BC, S)
        _store_rows(p_tkk + 2 * BC, b_T32, o_t3, m_t3, o_c, o_c < BC, S)
        _store_rows(p_tkk + 3 * BC, b_T33, o_t3, m_t3, o_c, o_c < BC, S)

    if USE_QK_L2NORM:  # [BC] x 4: β/||k|| per block
        b_k0 = b_b0 * tl.load(rqk + (o_t0 * H + i_h) * 2 + 1, mask=m_t0, other=0.0)
        b_k1 = b_b1 * tl.load(rqk + (o_t1 * H + i_h) * 2 + 1, mask=m_t1, other=0.0)
        b_k2 = b_b2 * tl.load(rqk + (o_t2 * H + i_h) * 2 + 1, mask=m_t2, other=0.0)
        b_k3 = b_b3 * tl.load(rqk + (o_t3 * H + i_h) * 2 + 1, mask=m_t3, other=0.0)
    else:
        b_k0, b_k1, b_k2, b_k3 = b_b0, b_b1, b_b2, b_b3
    p_k, p_G, p_w = k + i_h * K, gc + i_h * K, w + i_h * K
    # w = T (β k̂ e^G), per K tile: [BC, BK] X_c per block, then each row block's sum
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_x0 = _load_rows(p_k, o_t0, m_t0, o_k, m_k, H * K) * b_k0[:, None] * tl.exp(_load_rows(p_G, o_t0, m_t0, o_k, m_k, H * K))
        b_x1 = _load_rows(p_k, o_t1, m_t1, o_k, m_k, H * K) * b_k1[:, None] * tl.exp(_load_rows(p_G, o_t1, m_t1, o_k, m_k, H * K))
        b_x2 = _load_rows(p_k, o_t2, m_t2, o_k, m_k, H * K) * b_k2[:, None] * tl.exp(_load_rows(p_G, o_t2, m_t2, o_k, m_k, H * K))
        b_x3 = _load_rows(p_k, o_t3, m_t3, o_k, m_k, H * K) * b_k3[:, None] * tl.exp(_load_rows(p_G, o_t3, m_t3, o_k, m_k, H * K))
        _store_rows(p_w, tl.dot(b_T00, b_x0), o_t0, m_t0, o_k, m_k, H * K)
        _store_rows(p_w, tl.dot(b_T11, b_x1, acc=tl.dot(b_T10, b_x0)), o_t1, m_t1, o_k, m_k, H * K)
        _store_rows(p_w, _wy_rows(b_T20, b_T21, b_T22, b_Z, b_x0, b_x1, b_x2, b_x3), o_t2, m_t2, o_k, m_k, H * K)
        _store_rows(p_w, _wy_rows(b_T30, b_T31, b_T32, b_T33, b_x0, b_x1, b_x2, b_x3), o_t3, m_t3, o_k, m_k, H * K)
    p_v, p_u = v + i_h * V, u + i_h * V
    # u = T (β v), per V tile
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_x0 = _load_rows(p_v, o_t0, m_t0, o_v, m_v, H * V) * b_b0[:, None]
        b_x1 = _load_rows(p_v, o_t1, m_t1, o_v, m_v, H * V) * b_b1[:, None]
        b_x2 = _load_rows(p_v, o_t2, m_t2, o_v, m_v, H * V) * b_b2[:, None]
        b_x3 = _load_rows(p_v, o_t3, m_t3, o_v, m_v, H * V) * b_b3[:, None]
        _store_rows(p_u, tl.dot(b_T00, b_x0), o_t0, m_t0, o_v, m_v, H * V)
        _store_rows(p_u, tl.dot(b_T11, b_x1, acc=tl.dot(b_T10, b_x0)), o_t1, m_t1, o_v, m_v, H * V)
        _store_rows(p_u, _wy_rows(b_T20, b_T21, b_T22, b_Z, b_x0, b_x1, b_x2, b_x3), o_t2, m_t2, o_v, m_v, H * V)
        _store_rows(p_u, _wy_rows(b_T30, b_T31, b_T32, b_T33, b_x0, b_x1, b_x2, b_x3), o_t3, m_t3, o_v, m_v, H * V)


@triton.jit
def chunk_kda_fwd_scan_kernel(
    w,
    u,
    qg,
    kg,
    aqk,
    gl,
    o,
    h0,
    ht,
    cu_seqlens,
    chunk_offsets,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    if IS_VARLEN:
        bos, eos = tl.load(cu_seqlens + i_n).to(tl.int64), tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        i_s0 = tl.load(chunk_offsets + i_n).to(tl.int64)  # the sequence's first chunk slot
    else:
        bos, eos, i_s0 = i_n.to(tl.int64) * T, i_n.to(tl.int64) * T + T, i_n.to(tl.int64) * NT

    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_i = tl.arange(0, BT)
    m_kv = m_k[:, None] & m_v[None, :]
    # [BK, BV] state tile, fp32 for the whole sequence
    p_h = (i_n * H + i_h).to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    if USE_INITIAL_STATE:
        b_h = tl.load(h0 + p_h, mask=m_kv, other=0.0).to(tl.float32)
    else:
        b_h = tl.zeros([BK, BV], dtype=tl.float32)

    for i_t in range(tl.cdiv(eos - bos, BT)):
        o_t = bos + i_t * BT + o_i
        m_t = o_t < eos
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        # loads that do not depend on the state (pipelined across iterations)
        b_w = tl.load(w + (o_t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0)  # [BT, BK]
        b_qg = tl.load(qg + (o_t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0)  # [BT, BK]
        b_kg = tl.load(kg + (o_t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0)  # [BT, BK]
        b_u = tl.load(u + (o_t[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0)  # [BT, BV] fp32
        b_A = tl.load(aqk + (o_t[:, None] * H + i_h) * BT + o_i[None, :], mask=m_t[:, None], other=0.0)  # [BT, BT] fp32
        b_gl = tl.load(gl + ((i_s0 + i_t) * H + i_h) * K + o_k, mask=m_k, other=0.0)  # [BK] G_last

        # [BK, BV] the state as an operand in the input dtype (its rounding costs little: w, qg
        # are small next to u and A_qk v_new)
        b_hc = b_h.to(b_w.dtype)
        # [BT, BV] delta-rule correction against the state entering the chunk, kept fp32: the
        # output and the state update are dominated by it
        b_vn = b_u - tl.dot(b_w, b_hc)
        # [BT, BV] output: inter-chunk part through the state + intra-chunk part (fp32 operands)
        b_o = tl.dot(b_qg, b_hc) + tl.dot(b_A, b_vn)
        tl.store(o + (o_t[:, None] * H + i_h) * V + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_tv)
        # [BK, BV] decay the state to the chunk end and add the chunk's writes
        b_h = b_h * tl.exp(b_gl)[:, None] + tl.dot(tl.trans(b_kg.to(tl.float32)), b_vn)

    if STORE_FINAL_STATE:
        tl.store(ht + p_h, b_h, mask=m_kv)


DIAG_PRECISIONS = ("tf32", "tf32x3", "ieee")


@dataclass(frozen=True)
class LaunchConfig:
    """Tiles, warps and stages of the four kernels (gate, intra, solve, scan) and the tl.dot
    precision of the intra kernel's diagonal blocks; a pure function of (K, V, dtype)."""

    gate_bk: int
    gate_warps: int
    intra_bk: int
    intra_warps: int
    intra_stages: int
    solve_bk: int
    solve_bv: int
    solve_warps: int
    solve_stages: int
    scan_bk: int
    scan_bv: int
    scan_warps: int
    scan_stages: int
    diag_precision: str  # one of DIAG_PRECISIONS; why tf32 for 16-bit inputs: the module docstring

    def __post_init__(self):
        if self.diag_precision not in DIAG_PRECISIONS:
            raise ValueError(f"LaunchConfig.diag_precision must be one of {DIAG_PRECISIONS}, "
                             f"got {self.diag_precision!r}")


def launch_config(K: int, V: int, dtype: torch.dtype) -> LaunchConfig:
    """Deterministic launch configuration keyed on the head dims and dtype (never on B or T).

    The per-chunk kernels work on 16-row sub-chunks, so one warp holds a whole [16, BK] tile
    and no layout change crosses warps: the intra kernel on 1 warp with BK = 16 (2 warps or
    BK = 32: 7-20% slower; BK = 64 spills), the solve on 1 warp with [16, 32] tiles of k and v
    (2 or 4 warps: 25-110% slower), the memory-bound gate with BK = 32 on 4 warps.
    The scan holds the whole key dimension of the state (BK = next power of two >= K, at least
    16 for tl.dot) and takes BV = 32: its programs are sequential over chunks, so few programs
    leave SMs idle (B·H·V/BV of them) while small tiles make every V tile re-read w, qg, kg and
    A_qk; 32 was the best single choice over the three benchmark shapes. Its [BT, BK] operand
    tiles are double-buffered while they fit in shared memory (16-bit K <= 128). fp32 at K = 256
    is the exception: its three [BT, 256] fp32 operand tiles alone are 192 KB, and with BV = 32
    the scan asked for 245760 bytes of shared memory, over the 232448 a block may have on an
    H100; it takes BV = 16 on 8 warps (229376 bytes, no spills; 4 warps spill 352 B).
    Chosen from bench/tune_chunk_kda_fwd.py on an H100 (bench/NOTES.md).
    """
    scan_bk = max(16, triton.next_power_of_2(K))
    wide = dtype == torch.float32
    widest = wide and scan_bk > 128
    return LaunchConfig(
        gate_bk=min(32, scan_bk),
        gate_warps=4,
        intra_bk=16,
        intra_warps=1,
        intra_stages=3,
        solve_bk=min(32, scan_bk),
        solve_bv=min(32, max(16, triton.next_power_of_2(V))),
        solve_warps=1,
        solve_stages=3,
        scan_bk=scan_bk,
        scan_bv=16 if widest else 32,
        scan_warps=8 if widest else 4,
        scan_stages=2 if scan_bk * (2 if wide else 1) <= 128 else 1,
        # fp32 inputs keep an fp32-accurate diagonal: tf32's 2^-11 would be most of their error
        diag_precision="tf32x3" if wide else "tf32",
    )


def _direct(kernel):
    return kernel


@triton.jit
def chunk_kda_fwd_table_kernel(cu_seqlens, chunk_seq, chunk_offsets, N, SLOTS, BT: tl.constexpr, BLOCK: tl.constexpr):
    """Per block of BLOCK chunk slots (and of BLOCK entries of chunk_offsets):
    chunk_offsets[n] = Σ_{m<n} cdiv(len_m, BT) and chunk_seq[c] = #{n : chunk_offsets[n+1] <= c},
    i.e. the sequence of slot c, N for slots past the last chunk. Every program scans all N
    sequences itself, so programs do not depend on each other."""
    i_p = tl.program_id(0)
    o_x = i_p * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] slots, and indices into chunk_offsets
    b_seq = tl.zeros([BLOCK], dtype=tl.int32)
    b_carry = tl.zeros([], dtype=tl.int32)  # chunks of the sequences before this block
    for i_n0 in range(0, N, BLOCK):
        o_n = i_n0 + tl.arange(0, BLOCK)
        m_n = o_n < N
        b_len = tl.load(cu_seqlens + o_n + 1, mask=m_n, other=0) - tl.load(cu_seqlens + o_n, mask=m_n, other=0)
        b_cnt = (b_len.to(tl.int32) + BT - 1) // BT  # [BLOCK] chunks per sequence
        b_end = b_carry + tl.cumsum(b_cnt, axis=0)  # [BLOCK] chunk_offsets[o_n + 1]
        m_end = (b_end[None, :] <= o_x[:, None]) & m_n[None, :]  # [BLOCK, BLOCK]
        b_seq += tl.sum(m_end.to(tl.int32), axis=1)
        m_own = m_n & (o_n + 1 >= i_p * BLOCK) & (o_n + 1 < (i_p + 1) * BLOCK)
        tl.store(chunk_offsets + o_n + 1, b_end, mask=m_own)
        b_carry += tl.sum(b_cnt, axis=0)
    tl.store(chunk_seq + o_x, b_seq, mask=o_x < SLOTS)
    tl.store(chunk_offsets + o_x, tl.zeros([BLOCK], dtype=tl.int32), mask=o_x == 0)


def chunk_table(
    cu_seqlens: torch.Tensor, T: int, launch: Callable = wrap_triton
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Device-side chunk index for packed sequences, from shapes and one small kernel.

    Returns (chunk_seq [slots] int32: the sequence of each chunk slot, N for unused slots;
    chunk_offsets [N + 1] int32: the first slot of each sequence; slots), where
    slots = (T + (BT − 1)·N) // BT bounds Σ_n cdiv(len_n, BT) for any lengths summing to T.
    A Triton kernel rather than torch ops: Inductor (torch 2.11) compiled torch.searchsorted on
    this table off by one, and the kernels then read out of bounds.
    """
    N = cu_seqlens.shape[0] - 1
    slots = (T + (BT - 1) * N) // BT
    chunk_seq = torch.empty((slots,), dtype=torch.int32, device=cu_seqlens.device)
    chunk_offsets = torch.empty((N + 1,), dtype=torch.int32, device=cu_seqlens.device)
    block = 128
    grid = (triton.cdiv(max(slots, N + 1), block),)
    launch(chunk_kda_fwd_table_kernel)[grid](cu_seqlens, chunk_seq, chunk_offsets, N, slots, BT=BT, BLOCK=block)
    return chunk_seq, chunk_offsets, slots


def chunk_index(cu_seqlens: torch.Tensor | None, B: int, T: int, launch: Callable) -> tuple[tuple, int, int]:
    """How the per-chunk and scan kernels find their chunks: (index, rows, slots).

    index = (cu_seqlens, chunk_seq, chunk_offsets, T, N, NT), the kernels' index arguments in
    their order; rows: program rows of the per-chunk kernels (chunks per sequence, or chunk slots
    when varlen, B = 1); slots: chunk slots in all (per-chunk buffers such as G_last)."""
    if cu_seqlens is None:
        NT = triton.cdiv(T, BT)
        return (None, None, None, T, B, NT), NT, B * NT
    chunk_seq, chunk_offsets, slots = chunk_table(cu_seqlens, T, launch)
    return (cu_seqlens, chunk_seq, chunk_offsets, T, cu_seqlens.shape[0] - 1, slots), slots, slots


def scan_buffers(q: torch.Tensor, v: torch.Tensor, slots: int) -> dict[str, torch.Tensor]:
    """Uninitialised w, u, qg, kg (token-flat [B*T, H, *]) and gl ([slots, H, K]): what the scans
    read besides A_qk, as the forward's gate and solve kernels or the backward's prep kernel write them.

    w, qg, kg in the input dtype; u (and A_qk) in fp32: rounding either to bf16 costs as much
    relative error as rounding o itself (~1.7e-3 each), w, qg, kg ~2e-4 together. Every buffer
    a kernel writes is token-flat, [B*T, ...]: see meta/chunk_kda.py empty_tokens (pytorch#181735).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt, f32, dev = q.dtype, torch.float32, q.device
    return dict(
        w=torch.empty((B * T, H, K), dtype=dt, device=dev),
        u=torch.empty((B * T, H, V), dtype=f32, device=dev),
        qg=torch.empty((B * T, H, K), dtype=dt, device=dev),
        kg=torch.empty((B * T, H, K), dtype=dt, device=dev),
        gl=torch.empty((slots, H, K), dtype=f32, device=dev),
    )


def run_chunk_kernels(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    index: tuple,
    rows: int,
    slots: int,
    scale: float,
    use_qk_l2norm: bool,
    cfg: LaunchConfig,
    launch: Callable,
    residuals: dict[str, torch.Tensor] | None = None,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    gate_lower_bound: float | None = None,
) -> dict[str, torch.Tensor]:
    """Allocates what the per-chunk kernels write for the scans and launches gate, intra and
    solve (q, k, v, g, beta contiguous; index, rows, slots from chunk_index): returns w, u, qg,
    kg, aqk (A_qk) and gl (G_last). With residuals (gc, aqk, tkk, rqk preallocated as
    chunk_kda_residuals_meta makes them) G, A_qk and the q/k norms go there and the solve runs
    with STORE_RESIDUALS, writing T to tkk; without, G, the norms and A_kk are scratch. With
    A_log and dt_bias (contiguous), g is the gate's pre-activation z (the bounded form with
    gate_lower_bound).

    A_qk and A_kk in fp32 (see scan_buffers for why).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    f32, dev = torch.float32, q.device
    x = scan_buffers(q, v, slots)
    saved = residuals or {}
    x["aqk"] = saved.get("aqk", torch.empty((B * T, H, BT), dtype=f32, device=dev))
    gc = saved.get("gc", torch.empty((B * T, H, K), dtype=f32, device=dev))
    rqk = saved.get("rqk", torch.empty((B * T, H, 2) if use_qk_l2norm else (0,), dtype=f32, device=dev))
    akk = torch.empty((B * T, H, BT), dtype=f32, device=dev)
    common = dict(IS_VARLEN=index[0] is not None, USE_QK_L2NORM=use_qk_l2norm)
    launch(chunk_kda_fwd_gate_kernel)[(rows, B * H)](
        q, k, g, A_log, dt_bias, gate_lower_bound, gc, x["qg"], x["kg"], x["gl"], rqk, *index, scale,
        H=H, K=K, BT=BT, BK=cfg.gate_bk, USE_GATE_IN_KERNEL=A_log is not None,
        BOUNDED_GATE=gate_lower_bound is not None, **common, num_warps=cfg.gate_warps,
    )
    launch(chunk_kda_fwd_intra_kernel)[(BT // BC, rows, B * H)](
        q, k, gc, x["gl"], rqk, x["aqk"], akk, *index, scale,
        H=H, K=K, BT=BT, BC=BC, BK=cfg.intra_bk, DIAG_PRECISION=cfg.diag_precision, **common,
        num_warps=cfg.intra_warps, num_stages=cfg.intra_stages,
    )
    launch(chunk_kda_fwd_solve_kernel)[(rows, B * H)](
        k, v, beta, gc, rqk, akk, saved.get("tkk"), x["w"], x["u"], *index,
        H=H, K=K, V=V, BT=BT, BC=BC, BK=cfg.solve_bk, BV=cfg.solve_bv, STORE_RESIDUALS=residuals is not None,
        **common, num_warps=cfg.solve_warps, num_stages=cfg.solve_stages,
    )
    return x


def chunk_kda_fwd_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    scale: float,
    use_qk_l2norm: bool,
    o: torch.Tensor,
    final_state: torch.Tensor,
    launch: Callable = _direct,
    config: LaunchConfig | None = None,
    residuals: dict[str, torch.Tensor] | None = None,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    gate_lower_bound: float | None = None,
) -> None:
    """Runs the chunked KDA forward into preallocated outputs.

    o (v's dtype, contiguous: [B, T, H, V], or token-flat [B*T, H, V] as the op passes it) and
    final_state [N, H, K, V] fp32 are written in full; final_state may be an empty [0] tensor
    (final state not requested). residuals: gc, aqk, tkk, rqk as chunk_kda_residuals_meta
    allocates them, written in full for chunk_kda_bwd_triton (None: nothing kept). Inputs follow
    meta/chunk_kda.py's contract (validated by the caller). `launch` wraps each kernel before its
    launch: torch.library.wrap_triton inside the op, the identity when tests call directly.
    `config` overrides launch_config (bench/tune_chunk_kda_fwd.py sweeps it). With A_log [H] and
    dt_bias [H*K], g is the gate's pre-activation z and the gate kernel computes the decay (the
    bounded form with gate_lower_bound).
    """
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    gate = {} if A_log is None else dict(
        A_log=A_log.contiguous(), dt_bias=dt_bias.contiguous(), gate_lower_bound=gate_lower_bound
    )
    B, T, H, K = q.shape
    V = v.shape[-1]
    cfg = config or launch_config(K, V, q.dtype)
    index, rows, slots = chunk_index(cu_seqlens, B, T, launch)
    _, _, chunk_offsets, _, N, NT = index
    x = run_chunk_kernels(q, k, v, g, beta, index, rows, slots, scale, use_qk_l2norm, cfg, launch, residuals, **gate)
    w, u, qg, kg, aqk, gl = (x[name] for name in ("w", "u", "qg", "kg", "aqk", "gl"))
    store_final = final_state.dim() == 4
    grid_scan = (triton.cdiv(V, cfg.scan_bv), N * H)
    launch(chunk_kda_fwd_scan_kernel)[grid_scan](
        w, u, qg, kg, aqk, gl, o,
        initial_state, final_state if store_final else None,
        cu_seqlens, chunk_offsets,
        T, NT,
        H=H, K=K, V=V, BT=BT, BK=cfg.scan_bk, BV=cfg.scan_bv,
        USE_INITIAL_STATE=initial_state is not None,
        STORE_FINAL_STATE=store_final,
        IS_VARLEN=cu_seqlens is not None,
        num_warps=cfg.scan_warps,
        num_stages=cfg.scan_stages,
    )
