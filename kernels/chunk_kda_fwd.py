"""Triton kernels of the chunked KDA forward (kda::chunk_kda_fwd); math in docs/kda_math.md §3.

Two kernels, chunk length BT = 64 split into four sub-chunks of BC = 16 rows:

1. `chunk_kda_fwd_intra_kernel`, one program per (chunk, head), fully parallel. From q, k, v, g,
   beta of one chunk it computes the chunk-local cumulative gate G, A_qk, A_kk, the inverse
   T = (I + A_kk)^-1 and writes what the scan needs: w = T(β⊙k⊙e^G), u = T(β⊙v),
   qg = scale·q⊙e^G, kg = k⊙e^(G_last−G), A_qk (lower triangle) and e^(G_last). g is read twice
   (once for A, once for w/qg/kg after T is known) and the cumsum redone rather than G written
   to and read back from HBM: the second read of a 64-row chunk mostly hits L2.
2. `chunk_kda_fwd_scan_kernel`, one program per (sequence, head, V tile), sequential over the
   sequence's chunks with the state tile S [K, BV] in registers (fp32). Per chunk it forms
   v_new = u − w·S, writes o = qg·S + A_qk·v_new and updates S ← e^(G_last)⊙S + kgᵀ·v_new.
   The output is fused into the scan, so the per-chunk states h never reach HBM (fla writes
   them, B·NT·H·K·V bf16, ~67 MB at B1 T8192 H16, and reads them back in a third kernel).
   Small V tiles (BV = 16 or 32) give B·H·V/BV programs for the 132 SMs of an H100.

Numerics. G, A, T, S and every accumulator are fp32; only differences G_i − G_j with i ≥ j are
exponentiated (g ≤ 0, so each factor is ≤ 1 and nothing overflows, even for gates of −1000).
A_qk/A_kk use tensor cores off the diagonal: for row sub-chunk I > column sub-chunk J the
factorised form e^(G_i − G_a)·e^(G_a − G_j), anchored at a = the first row of sub-chunk I, is
exact: i ≥ a > j, so both exponents are ≤ 0, and if one factor underflows the true product
(smaller than either factor) underflows too. The anchor is never a later row than i, so no
rounding leaks from future tokens. The four diagonal 16×16 blocks are computed elementwise with
a [16, 16, BK] broadcast of e^(G_i − G_j), masked to j ≤ i before exponentiating. The carry of
the cumsum between sub-chunks, the anchors and G_last are read off rows of G exactly (a masked
sum adds zeros), so equal cumulative gates give exponents of exactly 0.

The inverse: forward substitution inside each 16×16 diagonal block, then the off-diagonal blocks
T_IJ = −T_II Σ_{J≤M<I} A_IM T_MJ (fp32 products in full precision). Rows past the end of a
sequence are loaded as q = k = v = 0, beta = 0, g = 0, which leaves the state unchanged and
keeps G_last equal to G at the last real row.

Varlen (B = 1, device `cu_seqlens`, N sequences): the intra kernel runs over an upper bound of
chunk slots, (T + (BT−1)·N) // BT ≥ Σ_n cdiv(len_n, BT), from shapes only; a device-side table
built with torch ops (cumsum, searchsorted; no host read) maps each slot to its sequence, and
slots past the last chunk exit at once. The scan reads its sequence's bounds from cu_seqlens.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

BT = 64  # chunk length
BC = 16  # sub-chunk length (tl.dot needs M, N, K >= 16)


@triton.jit
def _row(b_x, o_r, r):
    """Row r of a [R, C] block as [C], exactly (the other rows contribute +0)."""
    return tl.sum(tl.where(o_r[:, None] == r, b_x, 0.0), axis=0)


@triton.jit
def _load_rows(p_base, o_t, m_t, o_d, m_d, STRIDE: tl.constexpr):
    """[R, D] fp32 block of rows o_t of a [*, STRIDE] row-major tensor, zero where masked."""
    p = p_base + o_t[:, None] * STRIDE + o_d[None, :]
    return tl.load(p, mask=m_t[:, None] & m_d[None, :], other=0.0).to(tl.float32)


@triton.jit
def _diag_block(b_q, b_k, b_G, b_Aqk, b_Akk, o_c):
    """Accumulates the diagonal sub-chunk of A_qk and A_kk (incl. its diagonal) exactly."""
    m_ij = o_c[:, None] >= o_c[None, :]  # [BC, BC]
    # [BC, BC, BK]: masked before exp so no positive exponent is ever formed
    b_d = tl.where(m_ij[:, :, None], b_G[:, None, :] - b_G[None, :, :], float("-inf"))
    b_kd = b_k[None, :, :] * tl.exp(b_d)
    b_Aqk += tl.sum(b_q[:, None, :] * b_kd, axis=2)
    b_Akk += tl.sum(b_k[:, None, :] * b_kd, axis=2)
    return b_Aqk, b_Akk


@triton.jit
def _off_block(b_qe, b_ke, b_k, b_a, b_G, b_Aqk, b_Akk):
    """Accumulates an off-diagonal sub-chunk pair (I > J) on tensor cores.

    b_qe, b_ke are rows of sub-chunk I already scaled by e^(G_i − G_a); b_k, b_G are rows of
    sub-chunk J; b_a = G at the anchor row a (first row of I), so e^(G_a − G_j) <= 1.
    """
    b_r = b_k * tl.exp(b_a[None, :] - b_G)  # [BC, BK]
    b_Aqk += tl.dot(b_qe, tl.trans(b_r))
    b_Akk += tl.dot(b_ke, tl.trans(b_r))
    return b_Aqk, b_Akk


@triton.jit
def _invert_diag(b_A, o_c, BC: tl.constexpr):
    """(I + A)^-1 of a [BC, BC] strictly lower-triangular A by forward substitution (fp32)."""
    # rows < i already hold rows of X = (I + A)^-1 - I; rows >= i still hold -A
    b_X = -b_A
    for i in range(1, BC):
        b_a = _row(b_X, o_c, i)  # [BC] row i of -A, zero at columns >= i
        b_a += tl.sum(b_a[:, None] * b_X, axis=0)  # X_i = -A_i - sum_{j<i} A_ij X_j
        b_X = tl.where(o_c[:, None] == i, b_a[None, :], b_X)
    return b_X + (o_c[:, None] == o_c[None, :]).to(tl.float32)


@triton.jit
def _mm(b_a, b_b):
    """fp32 16x16 product in full fp32 precision (for the inverse)."""
    return tl.dot(b_a, b_b, input_precision="ieee")


@triton.jit
def _store_rows(p_base, b_x, o_t, m_t, o_d, m_d, STRIDE: tl.constexpr):
    p = p_base + o_t[:, None] * STRIDE + o_d[None, :]
    tl.store(p, b_x.to(p_base.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])


@triton.jit
def chunk_kda_fwd_intra_kernel(
    q,
    k,
    v,
    g,
    beta,
    w,
    u,
    qg,
    kg,
    aqk,
    gl,
    cu_seqlens,
    chunk_seq,
    chunk_offsets,
    T,
    N,
    NT,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    USE_QK_L2NORM: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    if IS_VARLEN:
        # i_t is a chunk slot; the table says which sequence (N = unused slot) and which chunk
        i_n = tl.load(chunk_seq + i_t).to(tl.int32)
        if i_n >= N:
            return
        i_c = i_t - tl.load(chunk_offsets + i_n).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        i_s = i_t
    else:
        i_c = i_t
        bos = i_b.to(tl.int64) * T
        eos = bos + T
        i_s = i_b * NT + i_t

    o_c = tl.arange(0, BC)
    # [BC] token rows of the four sub-chunks
    o_t0 = bos + i_c * BT + o_c
    o_t1 = o_t0 + BC
    o_t2 = o_t0 + 2 * BC
    o_t3 = o_t0 + 3 * BC
    m_t0, m_t1, m_t2, m_t3 = o_t0 < eos, o_t1 < eos, o_t2 < eos, o_t3 < eos
    p_q, p_k, p_g = q + i_h * K, k + i_h * K, g + i_h * K

    if USE_QK_L2NORM:
        # [BC] x 8: sums of squares over K, for x / sqrt(sum(x^2) + 1e-6)
        b_nq0 = tl.zeros([BC], dtype=tl.float32)
        b_nq1, b_nq2, b_nq3 = b_nq0, b_nq0, b_nq0
        b_nk0, b_nk1, b_nk2, b_nk3 = b_nq0, b_nq0, b_nq0, b_nq0
        for i_k in range(tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            b_x = _load_rows(p_q, o_t0, m_t0, o_k, m_k, H * K)
            b_nq0 += tl.sum(b_x * b_x, axis=1)
            b_x = _load_rows(p_q, o_t1, m_t1, o_k, m_k, H * K)
            b_nq1 += tl.sum(b_x * b_x, axis=1)
            b_x = _load_rows(p_q, o_t2, m_t2, o_k, m_k, H * K)
            b_nq2 += tl.sum(b_x * b_x, axis=1)
            b_x = _load_rows(p_q, o_t3, m_t3, o_k, m_k, H * K)
            b_nq3 += tl.sum(b_x * b_x, axis=1)
            b_x = _load_rows(p_k, o_t0, m_t0, o_k, m_k, H * K)
            b_nk0 += tl.sum(b_x * b_x, axis=1)
            b_x = _load_rows(p_k, o_t1, m_t1, o_k, m_k, H * K)
            b_nk1 += tl.sum(b_x * b_x, axis=1)
            b_x = _load_rows(p_k, o_t2, m_t2, o_k, m_k, H * K)
            b_nk2 += tl.sum(b_x * b_x, axis=1)
            b_x = _load_rows(p_k, o_t3, m_t3, o_k, m_k, H * K)
            b_nk3 += tl.sum(b_x * b_x, axis=1)
        b_rq0, b_rq1 = tl.rsqrt(b_nq0 + 1e-6), tl.rsqrt(b_nq1 + 1e-6)
        b_rq2, b_rq3 = tl.rsqrt(b_nq2 + 1e-6), tl.rsqrt(b_nq3 + 1e-6)
        b_rk0, b_rk1 = tl.rsqrt(b_nk0 + 1e-6), tl.rsqrt(b_nk1 + 1e-6)
        b_rk2, b_rk3 = tl.rsqrt(b_nk2 + 1e-6), tl.rsqrt(b_nk3 + 1e-6)

    # [BC, BC] blocks A_IJ of A_qk and A_kk (rows of sub-chunk I, columns of sub-chunk J)
    b_Aqk00 = tl.zeros([BC, BC], dtype=tl.float32)
    b_Aqk10, b_Aqk11 = b_Aqk00, b_Aqk00
    b_Aqk20, b_Aqk21, b_Aqk22 = b_Aqk00, b_Aqk00, b_Aqk00
    b_Aqk30, b_Aqk31, b_Aqk32, b_Aqk33 = b_Aqk00, b_Aqk00, b_Aqk00, b_Aqk00
    b_Akk00, b_Akk10, b_Akk11 = b_Aqk00, b_Aqk00, b_Aqk00
    b_Akk20, b_Akk21, b_Akk22 = b_Aqk00, b_Aqk00, b_Aqk00
    b_Akk30, b_Akk31, b_Akk32, b_Akk33 = b_Aqk00, b_Aqk00, b_Aqk00, b_Aqk00
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        # [BC, BK] x 4: chunk-local cumulative gate, carried across sub-chunks
        b_G0 = tl.cumsum(_load_rows(p_g, o_t0, m_t0, o_k, m_k, H * K), axis=0)
        b_G1 = _row(b_G0, o_c, BC - 1)[None, :] + tl.cumsum(_load_rows(p_g, o_t1, m_t1, o_k, m_k, H * K), axis=0)
        b_G2 = _row(b_G1, o_c, BC - 1)[None, :] + tl.cumsum(_load_rows(p_g, o_t2, m_t2, o_k, m_k, H * K), axis=0)
        b_G3 = _row(b_G2, o_c, BC - 1)[None, :] + tl.cumsum(_load_rows(p_g, o_t3, m_t3, o_k, m_k, H * K), axis=0)
        # [BC, BK] x 8: q and k rows (normalised if asked)
        b_q0 = _load_rows(p_q, o_t0, m_t0, o_k, m_k, H * K)
        b_q1 = _load_rows(p_q, o_t1, m_t1, o_k, m_k, H * K)
        b_q2 = _load_rows(p_q, o_t2, m_t2, o_k, m_k, H * K)
        b_q3 = _load_rows(p_q, o_t3, m_t3, o_k, m_k, H * K)
        b_k0 = _load_rows(p_k, o_t0, m_t0, o_k, m_k, H * K)
        b_k1 = _load_rows(p_k, o_t1, m_t1, o_k, m_k, H * K)
        b_k2 = _load_rows(p_k, o_t2, m_t2, o_k, m_k, H * K)
        b_k3 = _load_rows(p_k, o_t3, m_t3, o_k, m_k, H * K)
        if USE_QK_L2NORM:
            b_q0, b_q1, b_q2, b_q3 = b_q0 * b_rq0[:, None], b_q1 * b_rq1[:, None], b_q2 * b_rq2[:, None], b_q3 * b_rq3[:, None]
            b_k0, b_k1, b_k2, b_k3 = b_k0 * b_rk0[:, None], b_k1 * b_rk1[:, None], b_k2 * b_rk2[:, None], b_k3 * b_rk3[:, None]

        # diagonal sub-chunks: exact elementwise exponentials
        b_Aqk00, b_Akk00 = _diag_block(b_q0, b_k0, b_G0, b_Aqk00, b_Akk00, o_c)
        b_Aqk11, b_Akk11 = _diag_block(b_q1, b_k1, b_G1, b_Aqk11, b_Akk11, o_c)
        b_Aqk22, b_Akk22 = _diag_block(b_q2, b_k2, b_G2, b_Aqk22, b_Akk22, o_c)
        b_Aqk33, b_Akk33 = _diag_block(b_q3, b_k3, b_G3, b_Aqk33, b_Akk33, o_c)

        # off-diagonal sub-chunks, anchored at the first row of the row sub-chunk
        b_a = _row(b_G1, o_c, 0)  # [BK]
        b_e = tl.exp(b_G1 - b_a[None, :])  # [BC, BK] e^(G_i - G_a) <= 1
        b_qe, b_ke = b_q1 * b_e, b_k1 * b_e
        b_Aqk10, b_Akk10 = _off_block(b_qe, b_ke, b_k0, b_a, b_G0, b_Aqk10, b_Akk10)
        b_a = _row(b_G2, o_c, 0)
        b_e = tl.exp(b_G2 - b_a[None, :])
        b_qe, b_ke = b_q2 * b_e, b_k2 * b_e
        b_Aqk20, b_Akk20 = _off_block(b_qe, b_ke, b_k0, b_a, b_G0, b_Aqk20, b_Akk20)
        b_Aqk21, b_Akk21 = _off_block(b_qe, b_ke, b_k1, b_a, b_G1, b_Aqk21, b_Akk21)
        b_a = _row(b_G3, o_c, 0)
        b_e = tl.exp(b_G3 - b_a[None, :])
        b_qe, b_ke = b_q3 * b_e, b_k3 * b_e
        b_Aqk30, b_Akk30 = _off_block(b_qe, b_ke, b_k0, b_a, b_G0, b_Aqk30, b_Akk30)
        b_Aqk31, b_Akk31 = _off_block(b_qe, b_ke, b_k1, b_a, b_G1, b_Aqk31, b_Akk31)
        b_Aqk32, b_Akk32 = _off_block(b_qe, b_ke, b_k2, b_a, b_G2, b_Aqk32, b_Akk32)

    # A_qk: scale, lower triangle incl. diagonal; stored per token row as [BT] columns
    m_incl = o_c[:, None] >= o_c[None, :]
    p_a = aqk + i_h * BT
    _store_rows(p_a, tl.where(m_incl, b_Aqk00 * scale, 0.0), o_t0, m_t0, o_c, o_c < BC, H * BT)
    _store_rows(p_a, b_Aqk10 * scale, o_t1, m_t1, o_c, o_c < BC, H * BT)
    _store_rows(p_a, tl.where(m_incl, b_Aqk11 * scale, 0.0), o_t1, m_t1, BC + o_c, o_c < BC, H * BT)
    _store_rows(p_a, b_Aqk20 * scale, o_t2, m_t2, o_c, o_c < BC, H * BT)
    _store_rows(p_a, b_Aqk21 * scale, o_t2, m_t2, BC + o_c, o_c < BC, H * BT)
    _store_rows(p_a, tl.where(m_incl, b_Aqk22 * scale, 0.0), o_t2, m_t2, 2 * BC + o_c, o_c < BC, H * BT)
    _store_rows(p_a, b_Aqk30 * scale, o_t3, m_t3, o_c, o_c < BC, H * BT)
    _store_rows(p_a, b_Aqk31 * scale, o_t3, m_t3, BC + o_c, o_c < BC, H * BT)
    _store_rows(p_a, b_Aqk32 * scale, o_t3, m_t3, 2 * BC + o_c, o_c < BC, H * BT)
    _store_rows(p_a, tl.where(m_incl, b_Aqk33 * scale, 0.0), o_t3, m_t3, 3 * BC + o_c, o_c < BC, H * BT)

    # [BC] x 4: beta (zero past the sequence end)
    b_b0 = tl.load(beta + o_t0 * H + i_h, mask=m_t0, other=0.0).to(tl.float32)
    b_b1 = tl.load(beta + o_t1 * H + i_h, mask=m_t1, other=0.0).to(tl.float32)
    b_b2 = tl.load(beta + o_t2 * H + i_h, mask=m_t2, other=0.0).to(tl.float32)
    b_b3 = tl.load(beta + o_t3 * H + i_h, mask=m_t3, other=0.0).to(tl.float32)

    # T = (I + A_kk)^-1, A_kk = beta_i * (strictly lower part)
    m_strict = o_c[:, None] > o_c[None, :]
    b_T00 = _invert_diag(tl.where(m_strict, b_Akk00, 0.0) * b_b0[:, None], o_c, BC)
    b_T11 = _invert_diag(tl.where(m_strict, b_Akk11, 0.0) * b_b1[:, None], o_c, BC)
    b_T22 = _invert_diag(tl.where(m_strict, b_Akk22, 0.0) * b_b2[:, None], o_c, BC)
    b_T33 = _invert_diag(tl.where(m_strict, b_Akk33, 0.0) * b_b3[:, None], o_c, BC)
    b_Akk10 *= b_b1[:, None]
    b_Akk20 *= b_b2[:, None]
    b_Akk21 *= b_b2[:, None]
    b_Akk30 *= b_b3[:, None]
    b_Akk31 *= b_b3[:, None]
    b_Akk32 *= b_b3[:, None]
    # T_IJ = -T_II sum_{J <= M < I} A_IM T_MJ
    b_T10 = -_mm(b_T11, _mm(b_Akk10, b_T00))
    b_T21 = -_mm(b_T22, _mm(b_Akk21, b_T11))
    b_T32 = -_mm(b_T33, _mm(b_Akk32, b_T22))
    b_T20 = -_mm(b_T22, _mm(b_Akk20, b_T00) + _mm(b_Akk21, b_T10))
    b_T31 = -_mm(b_T33, _mm(b_Akk31, b_T11) + _mm(b_Akk32, b_T21))
    b_T30 = -_mm(b_T33, _mm(b_Akk30, b_T00) + _mm(b_Akk31, b_T10) + _mm(b_Akk32, b_T20))

    # w = T (beta k e^G), qg = scale q e^G, kg = k e^(G_last - G), e^(G_last); per K tile
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_G0 = tl.cumsum(_load_rows(p_g, o_t0, m_t0, o_k, m_k, H * K), axis=0)
        b_G1 = _row(b_G0, o_c, BC - 1)[None, :] + tl.cumsum(_load_rows(p_g, o_t1, m_t1, o_k, m_k, H * K), axis=0)
        b_G2 = _row(b_G1, o_c, BC - 1)[None, :] + tl.cumsum(_load_rows(p_g, o_t2, m_t2, o_k, m_k, H * K), axis=0)
        b_G3 = _row(b_G2, o_c, BC - 1)[None, :] + tl.cumsum(_load_rows(p_g, o_t3, m_t3, o_k, m_k, H * K), axis=0)
        b_gl = _row(b_G3, o_c, BC - 1)  # [BK] G_last (padded rows add g = 0)
        tl.store(gl + (i_s * H + i_h).to(tl.int64) * K + o_k, tl.exp(b_gl), mask=m_k)

        b_k0 = _load_rows(p_k, o_t0, m_t0, o_k, m_k, H * K)
        b_k1 = _load_rows(p_k, o_t1, m_t1, o_k, m_k, H * K)
        b_k2 = _load_rows(p_k, o_t2, m_t2, o_k, m_k, H * K)
        b_k3 = _load_rows(p_k, o_t3, m_t3, o_k, m_k, H * K)
        b_q0 = _load_rows(p_q, o_t0, m_t0, o_k, m_k, H * K)
        b_q1 = _load_rows(p_q, o_t1, m_t1, o_k, m_k, H * K)
        b_q2 = _load_rows(p_q, o_t2, m_t2, o_k, m_k, H * K)
        b_q3 = _load_rows(p_q, o_t3, m_t3, o_k, m_k, H * K)
        if USE_QK_L2NORM:
            b_q0, b_q1, b_q2, b_q3 = b_q0 * b_rq0[:, None], b_q1 * b_rq1[:, None], b_q2 * b_rq2[:, None], b_q3 * b_rq3[:, None]
            b_k0, b_k1, b_k2, b_k3 = b_k0 * b_rk0[:, None], b_k1 * b_rk1[:, None], b_k2 * b_rk2[:, None], b_k3 * b_rk3[:, None]

        p_x = qg + i_h * K
        _store_rows(p_x, b_q0 * scale * tl.exp(b_G0), o_t0, m_t0, o_k, m_k, H * K)
        _store_rows(p_x, b_q1 * scale * tl.exp(b_G1), o_t1, m_t1, o_k, m_k, H * K)
        _store_rows(p_x, b_q2 * scale * tl.exp(b_G2), o_t2, m_t2, o_k, m_k, H * K)
        _store_rows(p_x, b_q3 * scale * tl.exp(b_G3), o_t3, m_t3, o_k, m_k, H * K)
        p_x = kg + i_h * K
        _store_rows(p_x, b_k0 * tl.exp(b_gl[None, :] - b_G0), o_t0, m_t0, o_k, m_k, H * K)
        _store_rows(p_x, b_k1 * tl.exp(b_gl[None, :] - b_G1), o_t1, m_t1, o_k, m_k, H * K)
        _store_rows(p_x, b_k2 * tl.exp(b_gl[None, :] - b_G2), o_t2, m_t2, o_k, m_k, H * K)
        _store_rows(p_x, b_k3 * tl.exp(b_gl[None, :] - b_G3), o_t3, m_t3, o_k, m_k, H * K)

        # [BC, BK] x 4: beta k e^G
        b_x0 = b_k0 * b_b0[:, None] * tl.exp(b_G0)
        b_x1 = b_k1 * b_b1[:, None] * tl.exp(b_G1)
        b_x2 = b_k2 * b_b2[:, None] * tl.exp(b_G2)
        b_x3 = b_k3 * b_b3[:, None] * tl.exp(b_G3)
        p_x = w + i_h * K
        _store_rows(p_x, tl.dot(b_T00, b_x0), o_t0, m_t0, o_k, m_k, H * K)
        _store_rows(p_x, tl.dot(b_T10, b_x0) + tl.dot(b_T11, b_x1), o_t1, m_t1, o_k, m_k, H * K)
        b_y = tl.dot(b_T20, b_x0) + tl.dot(b_T21, b_x1) + tl.dot(b_T22, b_x2)
        _store_rows(p_x, b_y, o_t2, m_t2, o_k, m_k, H * K)
        b_y = tl.dot(b_T30, b_x0) + tl.dot(b_T31, b_x1) + tl.dot(b_T32, b_x2) + tl.dot(b_T33, b_x3)
        _store_rows(p_x, b_y, o_t3, m_t3, o_k, m_k, H * K)

    # u = T (beta v), per V tile
    p_v, p_u = v + i_h * V, u + i_h * V
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_x0 = _load_rows(p_v, o_t0, m_t0, o_v, m_v, H * V) * b_b0[:, None]
        b_x1 = _load_rows(p_v, o_t1, m_t1, o_v, m_v, H * V) * b_b1[:, None]
        b_x2 = _load_rows(p_v, o_t2, m_t2, o_v, m_v, H * V) * b_b2[:, None]
        b_x3 = _load_rows(p_v, o_t3, m_t3, o_v, m_v, H * V) * b_b3[:, None]
        _store_rows(p_u, tl.dot(b_T00, b_x0), o_t0, m_t0, o_v, m_v, H * V)
        _store_rows(p_u, tl.dot(b_T10, b_x0) + tl.dot(b_T11, b_x1), o_t1, m_t1, o_v, m_v, H * V)
        b_y = tl.dot(b_T20, b_x0) + tl.dot(b_T21, b_x1) + tl.dot(b_T22, b_x2)
        _store_rows(p_u, b_y, o_t2, m_t2, o_v, m_v, H * V)
        b_y = tl.dot(b_T30, b_x0) + tl.dot(b_T31, b_x1) + tl.dot(b_T32, b_x2) + tl.dot(b_T33, b_x3)
        _store_rows(p_u, b_y, o_t3, m_t3, o_v, m_v, H * V)


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
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        i_s0 = tl.load(chunk_offsets + i_n).to(tl.int64)  # slot of the sequence's first chunk
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
        i_s0 = i_n.to(tl.int64) * NT

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
        m_a = m_t[:, None] & (o_i[:, None] >= o_i[None, :])
        b_A = tl.load(aqk + (o_t[:, None] * H + i_h) * BT + o_i[None, :], mask=m_a, other=0.0)  # [BT, BT] fp32
        b_gl = tl.load(gl + ((i_s0 + i_t) * H + i_h) * K + o_k, mask=m_k, other=0.0)  # [BK]

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
        b_h = b_h * b_gl[:, None] + tl.dot(tl.trans(b_kg.to(tl.float32)), b_vn)

    if STORE_FINAL_STATE:
        tl.store(ht + p_h, b_h, mask=m_kv)


@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes and warps of the two kernels; a pure function of (K, V, dtype)."""

    intra_bk: int
    intra_bv: int
    intra_warps: int
    scan_bk: int
    scan_bv: int
    scan_warps: int
    scan_stages: int


def launch_config(K: int, V: int, dtype: torch.dtype) -> LaunchConfig:
    """Deterministic launch configuration keyed on the head dims and dtype (never on B or T).

    The scan holds the whole key dimension of the state (BK = next power of two >= K, at least
    16 for tl.dot) and takes BV = 16: its programs are sequential over chunks, so the number of
    programs, B·H·V/16, matters more than the work per program. Its three [BT, BK] operand tiles
    are double-buffered while they fit in shared memory (K <= 128), single-buffered above.
    The intra kernel tiles K by 32 (its four sub-chunks of q, k and G plus the [16, 16, BK]
    diagonal broadcast stay in registers).
    """
    scan_bk = max(16, triton.next_power_of_2(K))
    wide = dtype == torch.float32
    return LaunchConfig(
        intra_bk=min(32, scan_bk),
        intra_bv=min(32, max(16, triton.next_power_of_2(V))),
        intra_warps=4,
        scan_bk=scan_bk,
        scan_bv=16,
        scan_warps=4,
        scan_stages=2 if scan_bk * (2 if wide else 1) <= 128 else 1,
    )


def _direct(kernel):
    return kernel


def chunk_table(cu_seqlens: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Device-side chunk index for packed sequences, from shapes and device ops only.

    Returns (chunk_seq [slots] int32: the sequence of each chunk slot, N for unused slots;
    chunk_offsets [N + 1] int32: the first slot of each sequence; slots), where
    slots = (T + (BT − 1)·N) // BT bounds Σ_n cdiv(len_n, BT) for any lengths summing to T.
    """
    N = cu_seqlens.shape[0] - 1
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    counts = torch.div(lens + (BT - 1), BT, rounding_mode="floor")
    chunk_offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    slots = (T + (BT - 1) * N) // BT
    slot_ids = torch.arange(slots, dtype=torch.int64, device=cu_seqlens.device)
    chunk_seq = torch.searchsorted(chunk_offsets[1:].contiguous(), slot_ids, right=True, out_int32=True)
    return chunk_seq, chunk_offsets.to(torch.int32), slots


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
) -> None:
    """Runs the chunked KDA forward into preallocated outputs.

    o [B, T, H, V] (v's dtype) and final_state [N, H, K, V] fp32 are written in full;
    final_state may be an empty [0] tensor (final state not requested). Inputs follow
    meta/chunk_kda.py's contract (validated by the caller). `launch` wraps each kernel before
    its launch: torch.library.wrap_triton inside the op, the identity when tests call directly.
    """
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    B, T, H, K = q.shape
    V = v.shape[-1]
    cfg = launch_config(K, V, q.dtype)
    is_varlen = cu_seqlens is not None
    if is_varlen:
        N = cu_seqlens.shape[0] - 1
        chunk_seq, chunk_offsets, slots = chunk_table(cu_seqlens, T)
        NT = slots
    else:
        N = B
        chunk_seq = chunk_offsets = None
        NT = triton.cdiv(T, BT)
        slots = B * NT
    # w, qg, kg in the input dtype; u and A_qk in fp32: rounding either to bf16 costs as much
    # relative error as rounding o itself (~1.7e-3 each), w, qg, kg ~2e-4 together
    dt, f32 = q.dtype, torch.float32
    w = torch.empty((B, T, H, K), dtype=dt, device=q.device)
    qg = torch.empty((B, T, H, K), dtype=dt, device=q.device)
    kg = torch.empty((B, T, H, K), dtype=dt, device=q.device)
    u = torch.empty((B, T, H, V), dtype=f32, device=q.device)
    aqk = torch.empty((B, T, H, BT), dtype=f32, device=q.device)
    gl = torch.empty((slots, H, K), dtype=f32, device=q.device)

    grid_intra = (NT, B * H) if not is_varlen else (slots, H)
    launch(chunk_kda_fwd_intra_kernel)[grid_intra](
        q, k, v, g, beta, w, u, qg, kg, aqk, gl,
        cu_seqlens, chunk_seq, chunk_offsets,
        T, N, NT, scale,
        H=H, K=K, V=V, BT=BT, BC=BC, BK=cfg.intra_bk, BV=cfg.intra_bv,
        IS_VARLEN=is_varlen, USE_QK_L2NORM=use_qk_l2norm,
        num_warps=cfg.intra_warps,
    )
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
        IS_VARLEN=is_varlen,
        num_warps=cfg.scan_warps,
        num_stages=cfg.scan_stages,
    )
