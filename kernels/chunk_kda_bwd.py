"""Triton kernels of the chunked KDA backward (kda::chunk_kda_bwd); math in docs/kda_math.md §3 and
the derivation in meta/chunk_kda_bwd.py (the oracle these kernels are tested against).

Under autograd the forward op keeps four residuals (meta/chunk_kda.py RESIDUAL_NAMES): the
chunk-local cumulative gate G, A_qk and T = (I + A_kk)^-1 (fp32) and the q/k row norms; the
backward recomputes the rest. Chunk length BT = 64 in sub-chunks of BC = 16 rows; six kernels:

1. what the scans read, G_last, qg = scale·q⊙e^G, kg = k⊙e^(G_last−G), w = T(β⊙k⊙e^G) and
   u = T(β⊙v), per (chunk, head), by the forward's formulas:
   - from the residuals, `chunk_kda_bwd_prep_kernel`: memory-bound, no A and no inverse;
   - without them (kda::chunk_kda_bwd called on inputs alone), by a rerun of the forward's
     per-chunk kernels (gate, intra, solve with STORE_RESIDUALS), which also store the residuals in
     buffers of the backward's own. Either way the WY backward reads T and does not invert
     I + A_kk again.
2. `chunk_kda_bwd_state_kernel`, one program per (sequence, head, V tile), forward over chunks:
   stores the state entering each chunk, h = S₀ (input dtype), and v_new = u − w·S₀ (fp32).
3. `chunk_kda_bwd_dstate_kernel`, same grid, backward over chunks with the state gradient dS in
   registers (fp32): stores dh = dS₁ (the gradient of the state leaving each chunk, input
   dtype) and dv_new = A_qkᵀ·dO + kg·dS₁ (fp32), steps dS₀ = e^(G_last)⊙dS₁ + qgᵀ·dO − wᵀ·dv_new
   and writes dh0.
4. everything else, fully parallel over chunks, in three kernels:
   (a) `chunk_kda_bwd_wy_kernel`, per (chunk, head), over V tiles, from Tᵀ (T as the
       forward's solve kernel stored it, loaded transposed): dv_b = Tᵀ·dv_new → dv = β⊙dv_b,
       the dβ term Σ_v dv_b⊙v, and the two C×C gradients dA_qk = dO·v_newᵀ and
       dA_kk = −dv_b·v_newᵀ (strictly lower). The latter is the reference's −Tᵀ·dT·Tᵀ simplified: dT =
       dv_new·(β⊙v − β⊙k⊙e^G·S₀)ᵀ and that bracket is T⁻¹·v_new, so −Tᵀ·dT·Tᵀ =
       −Tᵀ·dv_new·v_newᵀ; it needs no pass over K. dv_b goes back over dv_new; the masked
       M_qk = scale·dA_qk and M_kk = dA_kk go to their own buffers.
   (b) `chunk_kda_bwd_intra_kernel`, per (K tile, 16-row sub-chunk, chunk, head), on 2 warps:
       over V tiles of h and dh, dO·S₀ᵀ, dv_b·S₀ᵀ (the WY gradient Tᵀ·dw with
       dw = −dv_new·S₀ᵀ), v_new·dS₁ᵀ and Σ_v dS₁⊙S₀ for its rows; the intra-chunk backward of
       A_qk and A_kk with the per-channel gate; dq, dk (or the norm's input gradient dy, fp32)
       and dG (into dg's buffer). dβ, the norm's row dots Σ_d y·dy and G_last's gradient need
       every K tile or every sub-chunk: each program writes its part.
   (c) `chunk_kda_bwd_finish_kernel`, per (chunk, head): dg = the reverse chunk-local cumsum of
       dG plus G_last's gradient (the sum of the sub-chunks' parts), dβ from its parts and,
       with the in-kernel L2 norm, the norm's backward dx = r·(dy − y·(y·dy)); with the in-op
       gate, dz from dg and per-chunk parts of dA_log and d dt_bias (summed by the launcher).
   The intra kernel first owned every row of a chunk per K tile ([64, BK] tiles on 4 warps,
   the diagonal gathered row by row across the four sub-chunks): 12.9 ms at B8 T4096 H32,
   8.5 ms in fla-core's sub-chunk layout (bench/NOTES.md, "Sub-chunk intra kernel").
   v1 ran (a)-(c) as one kernel per (chunk, head) with an inner loop over K tiles: 255
   registers, one 8-warp program per SM, the state tiles and the [64, V] operands reloaded for
   every K tile, [64, 64] × [64, 16] products for 16-row blocks: 3.8 ms at B1 T8192 H16
   (bench/NOTES.md, "Chunked KDA backward v2", has the cost analysis).

Saved vs recomputed. Between forward and backward: the op's inputs and the residuals, ≈ 1 KB
per token and head at K = 128 (G 512 B, A_qk and T 256 B each, the norms 8 B; fla keeps A_qk,
T and G as well). The backward holds, besides inputs, residuals and gradients: w, qg, kg (input
dtype) until the reverse scan is done; u (fp32) until the forward scan is done; M_qk and M_kk
(fp32, [B, T, H, 64]; over A_qk and T's buffers when the backward made them itself), h and dh
(per chunk K×V, input dtype), v_new and dv_new (fp32, [B, T, H, V]) until the end, the
parts of dβ (fp32 [K/BK + 1, B, T, H]) and of G_last's gradient (fp32 [chunks, 4, H, K]); with the L2 norm two fp32 [B, T, H, K] workspaces and
the parts of the row dots (fp32 [K/BK, 2, B, T, H]). fla's backward materialises w, u, qg,
kg, h, dh, v_new and fp32 dq, dk, dg, dA workspaces as well; bench/bench_chunk_kda.py records
both peaks.

Precision. h and dh are stored in the input dtype: they are only ever operands of tl.dot, which
takes bf16 operands anyway, and the scans form v_new and dv_new from the same rounded states, so
the backward stays consistent with them. v_new and dv_new stay fp32 (each enters several
gradients). G, T, the state and its gradient, and every accumulator are fp32.

Numerics of the gate. Only G_i − G_j with i ≥ j, G_last − G and G are exponentiated (all ≤ 0;
rows past the sequence end read G = G_last, the reference's zero-gate padding). The intra
kernel's off-diagonal 16×16 blocks run on tensor cores with one anchor per sum: the row sums of
its rows R over earlier sub-chunks J anchor at n = R's first row (j < n ≤ i, so
e^(G_i − G_j) = e^(G_i − G_n)·e^(G_n − G_j), both factors ≤ 1 and exact), the column sums over
later sub-chunks I at R's last row. The diagonal block takes the forward's one anchor (R's first
row) where G falls by at most ONE_ANCHOR_MAX_FALL across R, else goes by its levels: a pair
(i, j) of level b (the highest bit where i and j differ) meets at the anchor a, the last row of
the lower half of their 2^(b+1)-row block (j ≤ a < i), so each level is one [16, BK]
exponential with exponents ≤ 0 and four [16, 16] products of the masked M blocks, in the
forward's diagonal precision (tf32 for 16-bit inputs, tf32x3 for fp32). Gates of −1000 stay
exact.

Resources (sm_90, checked offline by bench/check_kernel_resources.py for every launch config of
launch_config, see its docstring): the intra kernel's [16, 32] tiles on 2 warps take 255
registers with 0-64 B of spills; no [64, 64] tile lives across its loops.

Varlen (B = 1, device `cu_seqlens`): the forward's chunk table (slot → sequence, from device
ops, no host read) drives the parallel kernels; the scans read their sequence's bounds and first
slot. As in the forward, every kernel loads these index tensors in its own body.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..meta.chunk_kda import RESIDUAL_NAMES, chunk_kda_residuals_meta
from .chunk_kda_fwd import (
    BC,
    BT,
    _first_row_anchor,
    _level_factors,
    _load_gate,
    _load_rows,
    _store_rows,
    chunk_index,
    run_chunk_kernels,
    scan_buffers,
    sigmoid,
    softplus,
)
from .chunk_kda_fwd import launch_config as fwd_launch_config


@triton.jit
def _l2norm_bwd_rows(p_x, p_dy, p_dx, o_t, m_t, b_r, b_s, K: tl.constexpr, BK: tl.constexpr, STRIDE: tl.constexpr):
    """dx = r·(dy − y·s) over rows o_t, y = x·r and s = Σ_d y·dy per row (already reduced)."""
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_x = _load_rows(p_x, o_t, m_t, o_k, m_k, STRIDE)
        b_dy = _load_rows(p_dy, o_t, m_t, o_k, m_k, STRIDE)
        _store_rows(p_dx, b_r[:, None] * (b_dy - b_x * (b_r * b_s)[:, None]), o_t, m_t, o_k, m_k, STRIDE)


@triton.jit
def chunk_kda_bwd_prep_kernel(
    q,
    k,
    v,
    beta,
    gc,
    rqk,
    tkk,
    qg,
    kg,
    gl,
    w,
    u,
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
    BK: tl.constexpr,
    BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    USE_QK_L2NORM: tl.constexpr,
):
    """Per (chunk, head), from the forward's residuals G (gc), T (tkk) and the q/k norms (rqk):
    what the scans read, by the forward gate and solve kernels' formulas: G_last (to gl, G at the chunk's
    last row), qg = scale·q̂⊙e^G, kg = k̂⊙e^(G_last − G), w = T(β⊙k̂⊙e^G) and u = T(β⊙v), q̂ and k̂
    the rows scaled by their norms. Memory-bound: no A, no inverse."""
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
    t_last = tl.minimum(t0 + BT, eos) - 1  # the chunk's last row
    if USE_QK_L2NORM:
        b_rq = tl.load(rqk + (o_t * H + i_h) * 2, mask=m_t, other=0.0)  # [BT]
        b_rk = tl.load(rqk + (o_t * H + i_h) * 2 + 1, mask=m_t, other=0.0)  # [BT]
    else:
        b_rq = tl.full([BT], 1.0, dtype=tl.float32)
        b_rk = tl.full([BT], 1.0, dtype=tl.float32)
    b_beta = tl.load(beta + o_t * H + i_h, mask=m_t, other=0.0).to(tl.float32)  # [BT]
    b_kb = b_beta * b_rk  # [BT]
    b_T = tl.load(tkk + (o_t[:, None] * H + i_h) * BT + o_i[None, :], mask=m_t[:, None], other=0.0)  # [BT, BT]
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_G = _load_rows(gc + i_h * K, o_t, m_t, o_k, m_k, H * K)  # [BT, BK]
        b_gl = tl.load(gc + (t_last * H + i_h) * K + o_k, mask=m_k, other=0.0)  # [BK]
        tl.store(gl + (i_s * H + i_h).to(tl.int64) * K + o_k, b_gl, mask=m_k)
        b_q = _load_rows(q + i_h * K, o_t, m_t, o_k, m_k, H * K) * b_rq[:, None]  # [BT, BK]
        _store_rows(qg + i_h * K, scale * b_q * tl.exp(b_G), o_t, m_t, o_k, m_k, H * K)
        b_k = _load_rows(k + i_h * K, o_t, m_t, o_k, m_k, H * K)  # [BT, BK]
        _store_rows(kg + i_h * K, (b_k * b_rk[:, None]) * tl.exp(b_gl[None, :] - b_G), o_t, m_t, o_k, m_k, H * K)
        _store_rows(w + i_h * K, tl.dot(b_T, b_k * b_kb[:, None] * tl.exp(b_G)), o_t, m_t, o_k, m_k, H * K)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_x = _load_rows(v + i_h * V, o_t, m_t, o_v, m_v, H * V) * b_beta[:, None]  # [BT, BV]
        _store_rows(u + i_h * V, tl.dot(b_T, b_x), o_t, m_t, o_v, m_v, H * V)


@triton.jit
def chunk_kda_bwd_state_kernel(
    w,
    u,
    kg,
    gl,
    h,
    v_new,
    h0,
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
    o_kv = o_k[:, None] * V + o_v[None, :]
    # [BK, BV] state tile, fp32 for the whole sequence
    if USE_INITIAL_STATE:
        b_h = tl.load(h0 + (i_n * H + i_h).to(tl.int64) * K * V + o_kv, mask=m_kv, other=0.0).to(tl.float32)
    else:
        b_h = tl.zeros([BK, BV], dtype=tl.float32)

    for i_t in range(tl.cdiv(eos - bos, BT)):
        o_t = bos + i_t * BT + o_i
        m_t = o_t < eos
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        # Loads do not depend on the state (the pipeliner prefetches them when num_stages > 1).
        # Each [BT, BK] operand is loaded next to its product: its shared-memory copy then is
        # dead before the next one is made (at K = 256 in fp32 they are 64 KB each)
        b_u = tl.load(u + (o_t[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0)  # [BT, BV] fp32
        b_gl = tl.load(gl + ((i_s0 + i_t) * H + i_h) * K + o_k, mask=m_k, other=0.0)  # [BK] G_last

        # [BK, BV] the state entering the chunk, rounded as the forward rounds it for its products
        b_hc = b_h.to(h.dtype.element_ty)
        tl.store(h + ((i_s0 + i_t) * H + i_h) * K * V + o_kv, b_hc, mask=m_kv)
        # [BT, BV] v_new = u − w·S₀ (fp32: it enters dA_qk, dA_kk and dk)
        b_w = tl.load(w + (o_t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0)  # [BT, BK]
        b_vn = b_u - tl.dot(b_w, b_hc)
        tl.store(v_new + (o_t[:, None] * H + i_h) * V + o_v[None, :], b_vn, mask=m_tv)
        b_kg = tl.load(kg + (o_t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0)  # [BT, BK]
        # [BK, BV] decay to the chunk end and add the chunk's writes
        b_h = b_h * tl.exp(b_gl)[:, None] + tl.dot(tl.trans(b_kg.to(tl.float32)), b_vn)


@triton.jit
def chunk_kda_bwd_dstate_kernel(
    qg,
    kg,
    w,
    aqk,
    gl,
    do,
    dht,
    dh,
    dv_new,
    dh0,
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
    USE_FINAL_STATE_GRAD: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
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
    o_kv = o_k[:, None] * V + o_v[None, :]
    p_state = (i_n * H + i_h).to(tl.int64) * K * V + o_kv
    # [BK, BV] gradient of the state leaving the current chunk, fp32
    if USE_FINAL_STATE_GRAD:
        b_dh = tl.load(dht + p_state, mask=m_kv, other=0.0).to(tl.float32)
    else:
        b_dh = tl.zeros([BK, BV], dtype=tl.float32)

    n_chunks = tl.cdiv(eos - bos, BT)
    for i_r in range(n_chunks):
        i_t = n_chunks - 1 - i_r
        o_t = bos + i_t * BT + o_i
        m_t = o_t < eos
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        # Loads do not depend on dS (the pipeliner prefetches them when num_stages > 1). Each
        # [BT, BK] operand is loaded next to its product: its shared-memory copy then is dead
        # before the next one is made (at K = 256 in fp32 they are 64 KB each)
        b_do = tl.load(do + (o_t[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0)  # [BT, BV]
        m_a = m_t[:, None] & (o_i[:, None] >= o_i[None, :])
        b_A = tl.load(aqk + (o_t[:, None] * H + i_h) * BT + o_i[None, :], mask=m_a, other=0.0)  # [BT, BT] fp32
        b_gl = tl.load(gl + ((i_s0 + i_t) * H + i_h) * K + o_k, mask=m_k, other=0.0)  # [BK] G_last

        # [BK, BV] dS₁ rounded once: stored for the intra kernel and used here, consistently
        b_dhc = b_dh.to(dh.dtype.element_ty)
        tl.store(dh + ((i_s0 + i_t) * H + i_h) * K * V + o_kv, b_dhc, mask=m_kv)
        # [BT, BV] dv_new = A_qkᵀ·dO + kg·dS₁ (fp32)
        b_kg = tl.load(kg + (o_t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0)  # [BT, BK]
        b_dvn = tl.dot(tl.trans(b_A), b_do.to(tl.float32)) + tl.dot(b_kg, b_dhc)
        tl.store(dv_new + (o_t[:, None] * H + i_h) * V + o_v[None, :], b_dvn, mask=m_tv)
        # [BK, BV] dS₀ = e^(G_last)⊙dS₁ + qgᵀ·dO − wᵀ·dv_new
        b_qg = tl.load(qg + (o_t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0)  # [BT, BK]
        b_qgdo = tl.dot(tl.trans(b_qg), b_do)
        b_w = tl.load(w + (o_t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0)  # [BT, BK]
        b_dh = b_dh * tl.exp(b_gl)[:, None] + b_qgdo - tl.dot(tl.trans(b_w.to(tl.float32)), b_dvn)

    if USE_INITIAL_STATE:
        tl.store(dh0 + p_state, b_dh, mask=m_kv)


@triton.jit
def chunk_kda_bwd_wy_kernel(
    v,
    beta,
    do,
    tkk,
    mqk,
    mkk,
    v_new,
    dv_new,
    dv,
    db,
    cu_seqlens,
    chunk_seq,
    chunk_offsets,
    T,
    N,
    NT,
    scale,
    H: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """Per (chunk, head), over V tiles: dv_b = Tᵀ·dv_new (over dv_new) with T = (I + A_kk)^-1 as
    the forward's solve kernel stored it (STORE_RESIDUALS), dv = β⊙dv_b, dβ's v term (slot 0 of
    db) and the intra-chunk backward's M_qk = scale·dO·v_newᵀ (to mqk) and M_kk = −dv_b·v_newᵀ
    (to mkk, which may be tkk itself: each program reads its T rows before it writes), both
    masked to where the forward's A is nonzero."""
    scale = tl.cast(scale, tl.float32)  # Inductor passes Python floats as fp64; eager as fp32
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

    o_i = tl.arange(0, BT)
    o_t = t0 + o_i  # [BT] token rows
    m_t = o_t < eos
    b_beta = tl.load(beta + o_t * H + i_h, mask=m_t, other=0.0).to(tl.float32)  # [BT]
    p_T = tkk + i_h * BT
    # [BT, BT] Tᵀ, element (i, j) from T's row j; T's rows past eos read as zero, harmless:
    # dv_new is zero there
    b_Tt = tl.load(p_T + o_t[None, :] * (H * BT) + o_i[:, None], mask=m_t[None, :], other=0.0)
    b_dAqk = tl.zeros([BT, BT], dtype=tl.float32)
    b_dAkk = tl.zeros([BT, BT], dtype=tl.float32)
    b_db = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_vn = _load_rows(v_new + i_h * V, o_t, m_t, o_v, m_v, H * V)  # [BT, BV]
        b_dvb = tl.dot(b_Tt, _load_rows(dv_new + i_h * V, o_t, m_t, o_v, m_v, H * V))  # [BT, BV]
        _store_rows(dv + i_h * V, b_dvb * b_beta[:, None], o_t, m_t, o_v, m_v, H * V)
        _store_rows(dv_new + i_h * V, b_dvb, o_t, m_t, o_v, m_v, H * V)
        b_db += tl.sum(b_dvb * _load_rows(v + i_h * V, o_t, m_t, o_v, m_v, H * V), axis=1)
        b_dAqk += tl.dot(_load_rows(do + i_h * V, o_t, m_t, o_v, m_v, H * V), tl.trans(b_vn))
        b_dAkk -= tl.dot(b_dvb, tl.trans(b_vn))
    # every thread's loads of T precede any thread's store of M_kk over it
    tl.debug_barrier()
    b_Mqk = tl.where(o_i[:, None] >= o_i[None, :], b_dAqk * scale, 0.0)  # [BT, BT]
    b_Mkk = tl.where(o_i[:, None] > o_i[None, :], b_dAkk, 0.0)  # [BT, BT]
    _store_rows(mqk + i_h * BT, b_Mqk, o_t, m_t, o_i, o_i < BT, H * BT)
    _store_rows(mkk + i_h * BT, b_Mkk, o_t, m_t, o_i, o_i < BT, H * BT)
    tl.store(db + o_t * H + i_h, b_db, mask=m_t)


@triton.jit
def chunk_kda_bwd_intra_kernel(
    q,
    k,
    beta,
    do,
    gc,
    mqk,
    mkk,
    gl,
    rqk,
    h,
    dh,
    v_new,
    dvb,
    dq,
    dk,
    dg,
    dglp,
    db,
    ds,
    cu_seqlens,
    chunk_seq,
    chunk_offsets,
    T,
    N,
    NT,
    NTH,
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
    DIAG_PRECISION: tl.constexpr,
):
    """Per (K tile × sub-chunk, chunk, head), the BC rows R of one sub-chunk: the products with
    the states S₀ and dS₁ over V, the intra-chunk backward of A_qk and A_kk with the per-channel
    gate, dq, dk (or the norm's input dy), and dG (to dg; the finish kernel takes the chunk's
    reverse cumsum); the K tile's part of dβ (slot 1 + i_k of db), with the L2 norm of the row
    dots Σ_d y·dy (ds), and this sub-chunk's part of G_last's gradient (to dglp [slots, NC, H, K]).

    fla-core's layout of the same work: [BC, BK] tiles, one program per sub-chunk; the diagonal
    block at one anchor or by levels, as the forward's intra kernel (bench/NOTES.md has the
    measurements)."""
    scale = tl.cast(scale, tl.float32)  # Inductor passes Python floats as fp64; eager as fp32
    i_kc, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NC: tl.constexpr = BT // BC
    i_k, i_c = i_kc // NC, i_kc % NC
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
    if t_a >= eos:  # past the sequence end: nothing of this sub-chunk is stored or summed
        return

    o_r = tl.arange(0, BC)
    o_t = t_a + o_r  # [BC] the sub-chunk's token rows R
    m_t = o_t < eos
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    p_q, p_k, p_G = q + i_h * K, k + i_h * K, gc + i_h * K
    p_Mq, p_Mk = mqk + i_h * BT, mkk + i_h * BT  # [*, H * BT] rows of M_qk, M_kk
    p_state = (i_s * H + i_h).to(tl.int64) * K * V  # this chunk's S₀ in h, dS₁ in dh
    b_beta = tl.load(beta + o_t * H + i_h, mask=m_t, other=0.0).to(tl.float32)  # [BC]
    # [BC] x 2: 1/||x|| per row of q and k, as the forward's gate kernel stored them (ones
    # without the norm)
    if USE_QK_L2NORM:
        b_rq = tl.load(rqk + (o_t * H + i_h) * 2, mask=m_t, other=0.0)
        b_rk = tl.load(rqk + (o_t * H + i_h) * 2 + 1, mask=m_t, other=0.0)
    else:
        b_rq = tl.full([BC], 1.0, dtype=tl.float32)
        b_rk = b_rq
    b_gl = tl.load(gl + (i_s * H + i_h).to(tl.int64) * K + o_k, mask=m_k, other=0.0)  # [BK] G_last
    b_G = _load_gate(p_G, o_t, m_t, o_k, m_k, b_gl, H * K)  # [BC, BK]

    # [BC, BK] x 3: dO·S₀ᵀ, dv_b·S₀ᵀ, v_new·dS₁ᵀ; [BK] Σ_v dS₁⊙S₀
    b_Pq = tl.zeros([BC, BK], dtype=tl.float32)
    b_Pw = tl.zeros([BC, BK], dtype=tl.float32)
    b_Pl = tl.zeros([BC, BK], dtype=tl.float32)
    b_hdh = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        p_kv = p_state + o_k[:, None] * V + o_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        b_h = tl.load(h + p_kv, mask=m_kv, other=0.0)  # [BK, BV] S₀ (input dtype)
        b_dh = tl.load(dh + p_kv, mask=m_kv, other=0.0).to(tl.float32)  # [BK, BV] dS₁
        b_hdh += tl.sum(b_h.to(tl.float32) * b_dh, axis=1)
        m_tv = m_t[:, None] & m_v[None, :]
        p_tv = (o_t[:, None] * H + i_h) * V + o_v[None, :]
        b_Pq = tl.dot(tl.load(do + p_tv, mask=m_tv, other=0.0), tl.trans(b_h), acc=b_Pq)
        b_Pw = tl.dot(tl.load(dvb + p_tv, mask=m_tv, other=0.0), tl.trans(b_h.to(tl.float32)), acc=b_Pw)
        b_Pl = tl.dot(tl.load(v_new + p_tv, mask=m_tv, other=0.0), tl.trans(b_dh), acc=b_Pl)

    # [BC, BK] accumulators: A_q = dq̂; A_y = the gradient of β_i·k̂_i through A_kk's rows and
    # through w, before β; A_c = the column sums of the intra-chunk backward; A_l = the
    # gradient of k̂ through k̂⊙e^(G_last − G)
    b_eG = tl.exp(b_G)
    b_Aq = scale * b_Pq * b_eG
    # Tᵀ·dw with dw = −dv_new·S₀ᵀ, i.e. −dv_b·S₀ᵀ: the gradient of β⊙k̂⊙e^G through w
    b_Ay = -b_Pw * b_eG
    b_Al = b_Pl * tl.exp(b_gl[None, :] - b_G)  # e^(G_last − G) <= 1
    b_Ac = tl.zeros([BC, BK], dtype=tl.float32)
    b_q = _load_rows(p_q, o_t, m_t, o_k, m_k, H * K) * b_rq[:, None]  # [BC, BK] q̂
    b_k = _load_rows(p_k, o_t, m_t, o_k, m_k, H * K) * b_rk[:, None]  # [BC, BK] k̂

    # row sums over the earlier sub-chunks J, anchored at n = R's first row: for j < n <= i,
    # e^(G_i − G_j) = e^(G_i − G_n)·e^(G_n − G_j), both factors <= 1. [BC, BC] blocks M[R, J]
    # against [BC, BK] rows k̂_J e^(G_n − G_J), then one scaling by e^(G_R − G_n)
    if i_c > 0:
        b_gn = tl.load(p_G + t_a * H * K + o_k, mask=m_k, other=0.0)  # [BK] G at n (a real row)
        b_sq = tl.zeros([BC, BK], dtype=tl.float32)
        b_sk = tl.zeros([BC, BK], dtype=tl.float32)
        for i_j in range(0, i_c):
            o_tj = t0 + i_j * BC + o_r  # [BC] rows J, real: they precede n
            m_tj = o_tj < eos
            b_kj = _load_rows(p_k, o_tj, m_tj, o_k, m_k, H * K)
            if USE_QK_L2NORM:
                b_kj *= tl.load(rqk + (o_tj * H + i_h) * 2 + 1, mask=m_tj, other=0.0)[:, None]
            b_kj *= tl.exp(b_gn[None, :] - _load_rows(p_G, o_tj, m_tj, o_k, m_k, H * K))
            o_m = o_t[:, None] * (H * BT) + (i_j * BC + o_r)[None, :]  # [BC, BC] M[R, J]
            b_sq = tl.dot(tl.load(p_Mq + o_m, mask=m_t[:, None], other=0.0), b_kj, acc=b_sq)
            b_sk = tl.dot(tl.load(p_Mk + o_m, mask=m_t[:, None], other=0.0), b_kj, acc=b_sk)
        b_en = tl.exp(b_G - b_gn[None, :])  # [BC, BK] e^(G_R − G_n) <= 1
        b_Aq += b_sq * b_en
        b_Ay += b_sk * b_en
    # column sums over the later sub-chunks I (only when R is whole and a later row is real),
    # anchored at n' = R's last row: for j <= n' < i, e^(G_i − G_j) = e^(G_i − G_n')·e^(G_n' − G_j).
    # [BC, BC] blocks M[I, R]ᵀ against [BC, BK] rows q̂_I e^(G_I − G_n') and β_I k̂_I e^(G_I − G_n'),
    # then one scaling by e^(G_n' − G_R)
    if t_a + BC < eos:
        b_gm = tl.load(p_G + (t_a + BC - 1) * H * K + o_k, mask=m_k, other=0.0)  # [BK] G at n'
        b_sc = tl.zeros([BC, BK], dtype=tl.float32)
        for i_i in range(i_c + 1, NC):
            o_ti = t0 + i_i * BC + o_r  # [BC] rows I
            m_ti = o_ti < eos
            b_ei = tl.exp(_load_gate(p_G, o_ti, m_ti, o_k, m_k, b_gl, H * K) - b_gm[None, :])  # [BC, BK] <= 1
            b_qi = _load_rows(p_q, o_ti, m_ti, o_k, m_k, H * K) * b_ei
            b_ki = _load_rows(p_k, o_ti, m_ti, o_k, m_k, H * K) * b_ei
            b_bi = tl.load(beta + o_ti * H + i_h, mask=m_ti, other=0.0).to(tl.float32)  # [BC]
            if USE_QK_L2NORM:
                b_qi *= tl.load(rqk + (o_ti * H + i_h) * 2, mask=m_ti, other=0.0)[:, None]
                b_bi *= tl.load(rqk + (o_ti * H + i_h) * 2 + 1, mask=m_ti, other=0.0)
            b_ki *= b_bi[:, None]
            o_m = o_ti[None, :] * (H * BT) + (i_c * BC + o_r)[:, None]  # [BC, BC] M[I, R]ᵀ
            b_sc = tl.dot(tl.load(p_Mq + o_m, mask=m_ti[None, :], other=0.0), b_qi, acc=b_sc)
            b_sc = tl.dot(tl.load(p_Mk + o_m, mask=m_ti[None, :], other=0.0), b_ki, acc=b_sc)
        b_Ac += b_sc * tl.exp(b_gm[None, :] - b_G)
    # the diagonal block, as the forward's intra kernel takes it: at one anchor where G falls
    # little across the sub-chunk, else by levels
    o_m = o_t[:, None] * (H * BT) + (i_c * BC + o_r)[None, :]  # [BC, BC] M[R, R]
    b_Mq = tl.load(p_Mq + o_m, mask=m_t[:, None], other=0.0)
    b_Mk = tl.load(p_Mk + o_m, mask=m_t[:, None], other=0.0)
    m_eye = o_r[:, None] == o_r[None, :]
    b_dMq = tl.sum(tl.where(m_eye, b_Mq, 0.0), axis=1)  # [BC] M_qk[i, i] (M_kk's is zero)
    b_Aq += b_dMq[:, None] * b_k
    b_Ac += b_dMq[:, None] * b_q
    b_bk = b_beta[:, None] * b_k  # [BC, BK] β_i k̂_i
    b_Ga, one_anchor = _first_row_anchor(b_G, o_r, BC)  # [BK] G at the sub-chunk's first row a
    if one_anchor:
        # for a <= j < i: row sums e^(G_i − G_a)·Σ_j M_ij k̂_j e^(G_a − G_j), column sums
        # e^(G_a − G_j)·Σ_i M_ij q̂_i e^(G_i − G_a) (and β_i k̂_i for M_kk)
        m_low = o_r[:, None] > o_r[None, :]  # [BC, BC] j < i
        b_Mqs = tl.where(m_low, b_Mq, 0.0)
        b_Mks = tl.where(m_low, b_Mk, 0.0)
        b_ei = tl.exp(b_G - b_Ga[None, :])  # [BC, BK] <= 1
        b_ej = tl.exp(b_Ga[None, :] - b_G)  # [BC, BK] <= e^ONE_ANCHOR_MAX_FALL
        b_kj = b_k * b_ej
        b_Aq += b_ei * tl.dot(b_Mqs, b_kj, input_precision=DIAG_PRECISION)
        b_Ay += b_ei * tl.dot(b_Mks, b_kj, input_precision=DIAG_PRECISION)
        b_sc = tl.dot(tl.trans(b_Mqs), b_q * b_ei, input_precision=DIAG_PRECISION)
        b_Ac += b_ej * tl.dot(tl.trans(b_Mks), b_bk * b_ei, acc=b_sc, input_precision=DIAG_PRECISION)
    else:
        # by levels: the pairs (i, j) of level b meet at the anchor a, the last row of the lower
        # half of their 2^(b+1)-row block, j <= a < i
        for b in tl.static_range(4):
            m_hi, b_e = _level_factors(p_G, b_G, b_gl, t_a, o_r, eos, o_k, m_k, b, H * K)
            # [BC, BC] the level-b pairs: i upper, j lower, one block
            m_lvl = ((o_r[:, None] >> (b + 1)) == (o_r[None, :] >> (b + 1))) & m_hi[:, None] & ~m_hi[None, :]
            b_Mqb = tl.where(m_lvl, b_Mq, 0.0)
            b_Mkb = tl.where(m_lvl, b_Mk, 0.0)
            b_klo = tl.where(m_hi[:, None], 0.0, b_k * b_e)  # [BC, BK] k̂_j e^(G_a − G_j)
            b_Aq += b_e * tl.dot(b_Mqb, b_klo, input_precision=DIAG_PRECISION)
            b_Ay += b_e * tl.dot(b_Mkb, b_klo, input_precision=DIAG_PRECISION)
            b_qhi = tl.where(m_hi[:, None], b_q * b_e, 0.0)  # [BC, BK] q̂_i e^(G_i − G_a)
            b_khi = tl.where(m_hi[:, None], b_bk * b_e, 0.0)
            b_sc = tl.dot(tl.trans(b_Mqb), b_qhi, input_precision=DIAG_PRECISION)
            b_Ac += b_e * tl.dot(tl.trans(b_Mkb), b_khi, acc=b_sc, input_precision=DIAG_PRECISION)

    b_bAy = b_beta[:, None] * b_Ay
    b_dk = b_Ac + b_bAy + b_Al
    b_dG = b_q * b_Aq + b_k * (b_bAy - b_Ac - b_Al)
    _store_rows(dg + i_h * K, b_dG, o_t, m_t, o_k, m_k, H * K)
    _store_rows(dq + i_h * K, b_Aq, o_t, m_t, o_k, m_k, H * K)
    _store_rows(dk + i_h * K, b_dk, o_t, m_t, o_k, m_k, H * K)
    # G_last enters through k̂⊙e^(G_last − G) of every row and through the decay of S₀: this
    # sub-chunk's part (the first sub-chunk adds the decay's)
    b_dgl = tl.sum(b_k * b_Al, axis=0)
    if i_c == 0:
        b_dgl += tl.exp(b_gl) * b_hdh
    tl.store(dglp + ((i_s * NC + i_c).to(tl.int64) * H + i_h) * K + o_k, b_dgl, mask=m_k)
    o_p = o_t * H + i_h  # [BC] (token, head) of the rows in the partial sums
    tl.store(db + (1 + i_k).to(tl.int64) * NTH + o_p, tl.sum(b_k * b_Ay, axis=1), mask=m_t)
    if USE_QK_L2NORM:
        tl.store(ds + (2 * i_k).to(tl.int64) * NTH + o_p, tl.sum(b_q * b_Aq, axis=1), mask=m_t)
        tl.store(ds + (2 * i_k + 1).to(tl.int64) * NTH + o_p, tl.sum(b_k * b_dk, axis=1), mask=m_t)


@triton.jit
def chunk_kda_bwd_finish_kernel(
    q,
    k,
    rqk,
    dqn,
    dkn,
    dg,
    dglp,
    db,
    ds,
    dq,
    dk,
    dbeta,
    z,
    A_log,
    dt_bias,
    gate_lower_bound,
    dz,
    dAp,
    dbp,
    cu_seqlens,
    chunk_seq,
    chunk_offsets,
    T,
    N,
    NT,
    NTH,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    NK: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    USE_QK_L2NORM: tl.constexpr,
    USE_GATE_IN_KERNEL: tl.constexpr,
    BOUNDED_GATE: tl.constexpr,
):
    """Per (chunk, head): dg = the reverse cumulative sum of the intra kernel's dG over the chunk
    (G_i = Σ_{s <= i} g_s) plus G_last's gradient, the sum of the sub-chunks' parts (G_last is
    the last row's G, so its gradient reaches every g of the chunk); dβ, the sum of the wy
    kernel's and every K tile's part; with the L2 norm, its backward dx = r·(dy − y·(y·dy))
    over the dy the intra kernel parked in dqn, dkn.
    USE_GATE_IN_KERNEL (g = −e^A·softplus(s), s = z + dt_bias, A = A_log[h]): dg stays in its
    fp32 buffer and dz = −e^A·softplus'(s)·dg goes to dz; the chunk's parts of the parameter
    gradients, Σ_rows dz to dbp [slots, H, K] (d dt_bias) and Σ_rows,k g·dg to dAp [slots, H]
    (dA_log), are summed over chunks by the launcher. BOUNDED_GATE (g = L·σ(e^A·s), L =
    gate_lower_bound): dz = L·e^A·σ(e^A·s)·σ(−e^A·s)·dg and dA_log's part Σ_rows,k s·dz."""
    NC: tl.constexpr = BT // BC
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

    o_t = t0 + tl.arange(0, BT)  # [BT] token rows
    m_t = o_t < eos
    o_c = tl.arange(0, NC)
    m_c = t0 + o_c * BC < eos  # [NC] sub-chunks holding a real row (the others wrote no part)
    b_dA = tl.zeros([BK], dtype=tl.float32)  # the chunk's part of dA_log, per channel of a K tile
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        p_gl = dglp + ((i_s * NC + o_c[:, None]).to(tl.int64) * H + i_h) * K + o_k[None, :]  # [NC, BK]
        b_dgl = tl.sum(tl.load(p_gl, mask=m_c[:, None] & m_k[None, :], other=0.0), axis=0)  # [BK]
        b_dG = _load_rows(dg + i_h * K, o_t, m_t, o_k, m_k, H * K)  # [BT, BK]
        b_dg = tl.cumsum(b_dG, axis=0, reverse=True) + b_dgl[None, :]  # [BT, BK]
        if USE_GATE_IN_KERNEL:
            b_a = tl.exp(tl.load(A_log + i_h).to(tl.float32))
            b_bias = tl.load(dt_bias + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)  # [BK]
            b_s = _load_rows(z + i_h * K, o_t, m_t, o_k, m_k, H * K) + b_bias[None, :]  # [BT, BK]
            b_dg = tl.where(m_t[:, None], b_dg, 0.0)  # padded rows add nothing to the sums
            if BOUNDED_GATE:
                # σ'(u) = σ(u)·σ(−u) = e/(1 + e)² with e = e^(−|u|) <= 1, u = e^A·s: no overflow
                b_e = tl.exp(-tl.abs(b_a * b_s))  # [BT, BK]
                b_dsig = b_e / ((1.0 + b_e) * (1.0 + b_e))  # [BT, BK]
                b_dz = tl.cast(gate_lower_bound, tl.float32) * b_a * b_dsig * b_dg
                b_dA += tl.sum(b_s * b_dz, axis=0)  # ∂g/∂A_log = s·∂g/∂z
            else:
                # softplus' = sigmoid, 1 where softplus is the identity (as torch's autograd takes it)
                b_dz = -b_a * tl.where(b_s > 20.0, 1.0, sigmoid(b_s)) * b_dg
                b_dA += tl.sum(-b_a * softplus(b_s) * b_dg, axis=0)  # ∂g/∂A_log = g
            _store_rows(dz + i_h * K, b_dz, o_t, m_t, o_k, m_k, H * K)
            tl.store(dbp + (i_s * H + i_h).to(tl.int64) * K + o_k, tl.sum(b_dz, axis=0), mask=m_k)
        else:
            _store_rows(dg + i_h * K, b_dg, o_t, m_t, o_k, m_k, H * K)
    if USE_GATE_IN_KERNEL:
        tl.store(dAp + i_s * H + i_h, tl.sum(b_dA, axis=0))
    o_p = o_t * H + i_h  # [BT]
    # partial sums are NTH apart; stepping a pointer keeps the offsets 64-bit
    p_db = db + o_p
    b_db = tl.zeros([BT], dtype=tl.float32)
    for _ in range(NK + 1):
        b_db += tl.load(p_db, mask=m_t, other=0.0)
        p_db += NTH
    tl.store(dbeta + o_p, b_db.to(dbeta.dtype.element_ty), mask=m_t)
    if USE_QK_L2NORM:
        p_ds = ds + o_p
        b_sq = tl.zeros([BT], dtype=tl.float32)  # [BT] x 2: Σ_d y·dy of q and k
        b_sk = tl.zeros([BT], dtype=tl.float32)
        for _ in range(NK):
            b_sq += tl.load(p_ds, mask=m_t, other=0.0)
            b_sk += tl.load(p_ds + NTH, mask=m_t, other=0.0)
            p_ds += 2 * NTH
        b_rq = tl.load(rqk + o_p * 2, mask=m_t, other=0.0)
        b_rk = tl.load(rqk + o_p * 2 + 1, mask=m_t, other=0.0)
        _l2norm_bwd_rows(q + i_h * K, dqn + i_h * K, dq + i_h * K, o_t, m_t, b_rq, b_sq, K, BK, H * K)
        _l2norm_bwd_rows(k + i_h * K, dkn + i_h * K, dk + i_h * K, o_t, m_t, b_rk, b_sk, K, BK, H * K)


@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes and warps of the backward's own kernels (the forward's kernels keep the
    forward's configuration); a pure function of (K, V, dtype)."""

    scan_bk: int
    scan_bv: int
    scan_warps: int
    scan_stages: int
    wy_bv: int
    wy_warps: int
    wy_stages: int
    intra_bk: int
    intra_bv: int
    intra_warps: int
    intra_stages: int
    finish_bk: int
    finish_gate_bk: int
    prep_bk: int
    prep_bv: int
    prep_warps: int


def launch_config(K: int, V: int, dtype: torch.dtype) -> LaunchConfig:
    """Deterministic launch configuration keyed on the head dims and dtype (never on B or T).

    The scans hold the whole key dimension of their state tile (BK = next power of two >= K, at
    least 16 for tl.dot) with BV = 32: they are sequential over chunks, so fewer programs
    (B·H·V/BV) leave SMs idle while narrower tiles make every V tile re-read the [BT, K] operands;
    BV = 32 measured 7-8% faster backward than 16 at the two large benchmark shapes and 2.5%
    slower at B1 T8192 H16, where 128 programs under-fill the 132 SMs (bench/NOTES.md). K = 256
    in half precision and fp32 at K <= 128 keep BV = 16: at 32 their dstate kernel spills
    (16-376 B, ptxas). fp32 at K = 256 takes BV = 32 though its dstate kernel then spills 368 B:
    at BV = 16 on 8 warps Triton 3.6 builds a state kernel that reads past its own shared-memory
    allocation (an illegal access on the H100, located by compute-sanitizer). Their
    [BT, BK] operand tiles are loaded next to their products (one shared-memory copy live at a
    time), double-buffered while that fits (K <= 128 in half precision), and take 8 warps at
    K = 256 to spread the registers.

    The intra kernel runs one program per (32-wide K tile, 16-row sub-chunk) with 32-wide V
    tiles on 2 warps and 2 stages: with the diagonal block by levels, the fastest of 8 tiles,
    warps and stages at the three benchmark shapes (1 warp 22-29% slower: its registers run
    out); 12-14% ahead of the row-by-row diagonal it replaced, at its best on 1 warp
    (bench/NOTES.md).
    The wy kernel holds Tᵀ and the two C×C gradients ([64, 64] fp32) over 32-wide V tiles on 4
    warps and 3 stages: 80-96 KB of shared memory and no spills, so two programs per SM; 8 warps
    (one program per SM) measured 45% slower at B8 T4096 H32, 16- or 64-wide V tiles 25-32%.
    The prep kernel holds T ([64, 64] fp32) over 32-wide K and V tiles on 4 warps: no other tile
    or warp count swept made the backward faster.
    The finish kernel takes 64-wide K tiles, 32-wide with the in-op gate: its softplus, sigmoid
    and two reductions per element took the kernel from 128 to 210 registers at 64 (ptxas), and
    32 measured 23-24% faster there (1110 → 859 µs at B8 T4096 H32) and within 1-6% without the
    gate (bench/NOTES.md).
    """
    scan_bk = max(16, triton.next_power_of_2(K))
    wide = dtype == torch.float32
    scan_bv = (32 if scan_bk > 128 else 16) if wide else (32 if scan_bk <= 128 else 16)
    return LaunchConfig(
        scan_bk=scan_bk,
        scan_bv=min(scan_bv, max(16, triton.next_power_of_2(V))),
        scan_warps=4 if scan_bk <= 128 else 8,
        scan_stages=2 if scan_bk * (2 if wide else 1) <= 128 else 1,
        wy_bv=min(32, max(16, triton.next_power_of_2(V))),
        wy_warps=4,
        wy_stages=3,
        intra_bk=min(32, scan_bk),
        intra_bv=min(32, max(16, triton.next_power_of_2(V))),
        intra_warps=2,
        intra_stages=2,
        finish_bk=min(64, scan_bk),
        finish_gate_bk=min(32, scan_bk),
        prep_bk=min(32, scan_bk),
        prep_bv=min(32, max(16, triton.next_power_of_2(V))),
        prep_warps=4,
    )


def _direct(kernel):
    return kernel


def chunk_kda_bwd_triton(
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
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    dg: torch.Tensor,
    dbeta: torch.Tensor,
    dh0: torch.Tensor,
    dA_log: torch.Tensor,
    ddt_bias: torch.Tensor,
    launch: Callable = _direct,
    residuals: dict[str, torch.Tensor] | None = None,
    config: LaunchConfig | None = None,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    gate_lower_bound: float | None = None,
) -> None:
    """Runs the chunked KDA backward into preallocated outputs (those of chunk_kda_bwd_meta).

    dq, dk, dv, dg, dbeta have their inputs' dtypes and shapes (or are token-flat, [B*T, ...], as
    the op passes them), are contiguous and are written in full; dh0 is [N, H, K, V] fp32 when
    there is an initial state, else an empty [0] tensor (not written). With A_log [H] and dt_bias
    [H*K] (the in-op gate; g is the pre-activation z; the bounded form with gate_lower_bound) dg
    receives dz and dA_log, ddt_bias their gradients; without, dA_log and ddt_bias are empty [0]
    tensors (not written).
    dht (None = zero) is the gradient of the final state. residuals: gc, aqk, tkk, rqk as
    chunk_kda_fwd_triton wrote them for the same inputs (read, never written); None reruns the
    forward's per-chunk kernels instead. Inputs follow meta/chunk_kda.py's contract (validated by the
    caller). `launch` wraps each kernel before its launch: torch.library.wrap_triton inside the
    op, the identity when tests call directly. `config` overrides launch_config
    (bench/tune_chunk_kda_bwd.py sweeps it).
    """
    q, k, v, g, beta, do = (x.contiguous() for x in (q, k, v, g, beta, do))
    use_gate = A_log is not None
    gate = dict(
        A_log=A_log.contiguous(), dt_bias=dt_bias.contiguous(), gate_lower_bound=gate_lower_bound
    ) if use_gate else {}
    B, T, H, K = q.shape
    V = v.shape[-1]
    fwd_cfg = fwd_launch_config(K, V, q.dtype)
    cfg = config or launch_config(K, V, q.dtype)
    is_varlen = cu_seqlens is not None
    index, rows, slots = chunk_index(cu_seqlens, B, T, launch)
    _, _, chunk_offsets, _, N, NT = index
    dt, f32, dev = q.dtype, torch.float32, q.device
    grid_chunks = (rows, B * H)
    grid_scan = (triton.cdiv(V, cfg.scan_bv), N * H)
    common = dict(IS_VARLEN=is_varlen, USE_QK_L2NORM=use_qk_l2norm)

    # 1. what the scans read: G_last, qg, kg, w, u (and A_qk). From the forward's residuals (G,
    # A_qk, T, the q/k norms) by a memory-bound kernel; without them by a rerun of the forward's
    # per-chunk kernels, which store the same residuals in buffers of the backward's own.
    if residuals is None:
        residuals = dict(zip(RESIDUAL_NAMES, chunk_kda_residuals_meta(q, use_qk_l2norm, save=True)))
        x = run_chunk_kernels(
            q, k, v, g, beta, index, rows, slots, scale, use_qk_l2norm, fwd_cfg, launch, residuals, **gate
        )
        mqk, mkk = residuals["aqk"], residuals["tkk"]  # the wy kernel's M over A_qk and T (read first)
    else:
        x = scan_buffers(q, v, slots)
        launch(chunk_kda_bwd_prep_kernel)[grid_chunks](
            q, k, v, beta, residuals["gc"], residuals["rqk"], residuals["tkk"],
            x["qg"], x["kg"], x["gl"], x["w"], x["u"],
            *index, scale,
            H=H, K=K, V=V, BT=BT, BK=cfg.prep_bk, BV=cfg.prep_bv, **common,
            num_warps=cfg.prep_warps,
        )
        mqk, mkk = (torch.empty((B * T, H, BT), dtype=f32, device=dev) for _ in range(2))
    w, u, qg, kg, gl = (x.pop(name) for name in ("w", "u", "qg", "kg", "gl"))
    aqk, gc, rqk, tkk = (residuals[name] for name in ("aqk", "gc", "rqk", "tkk"))

    # 2. chunk-entry states and v_new
    h = torch.empty((slots, H, K, V), dtype=dt, device=dev)
    v_new = torch.empty((B * T, H, V), dtype=f32, device=dev)
    launch(chunk_kda_bwd_state_kernel)[grid_scan](
        w, u, kg, gl, h, v_new, initial_state,
        cu_seqlens, chunk_offsets,
        T, NT,
        H=H, K=K, V=V, BT=BT, BK=cfg.scan_bk, BV=cfg.scan_bv,
        USE_INITIAL_STATE=initial_state is not None,
        IS_VARLEN=is_varlen,
        num_warps=cfg.scan_warps,
        num_stages=cfg.scan_stages,
    )
    del u

    # 3. reverse scan: state gradients per chunk, dv_new, dh0
    dh = torch.empty((slots, H, K, V), dtype=dt, device=dev)
    dv_new = torch.empty((B * T, H, V), dtype=f32, device=dev)
    launch(chunk_kda_bwd_dstate_kernel)[grid_scan](
        qg, kg, w, aqk, gl, do, dht, dh, dv_new, dh0 if initial_state is not None else None,
        cu_seqlens, chunk_offsets,
        T, NT,
        H=H, K=K, V=V, BT=BT, BK=cfg.scan_bk, BV=cfg.scan_bv,
        USE_FINAL_STATE_GRAD=dht is not None,
        USE_INITIAL_STATE=initial_state is not None,
        IS_VARLEN=is_varlen,
        num_warps=cfg.scan_warps,
        num_stages=cfg.scan_stages,
    )
    del qg, kg, w

    # 4. everything else, per chunk: the WY backward and the C×C gradients (wy), then per (K
    # tile, sub-chunk) the products with the states and the intra-chunk backward (intra), then
    # dg's chunk-local reverse cumsum, dβ and the norm's backward (finish). dv_new's buffer takes
    # dv_b (each program its own rows); db, ds and dglp hold per-program partial sums, reduced
    # by finish
    NK = triton.cdiv(K, cfg.intra_bk)
    NTH = B * T * H
    db = torch.empty((NK + 1, B * T, H), dtype=f32, device=dev)
    if use_qk_l2norm:
        dqn = torch.empty((B * T, H, K), dtype=f32, device=dev)
        dkn = torch.empty((B * T, H, K), dtype=f32, device=dev)
        ds = torch.empty((NK * 2, B * T, H), dtype=f32, device=dev)  # [NK, 2] merged: NK may be 1
    else:
        dqn, dkn, ds = dq, dk, None
    launch(chunk_kda_bwd_wy_kernel)[grid_chunks](
        v, beta, do, tkk, mqk, mkk, v_new, dv_new, dv, db,
        *index, scale,
        H=H, V=V, BT=BT, BV=cfg.wy_bv, IS_VARLEN=is_varlen,
        num_warps=cfg.wy_warps,
        num_stages=cfg.wy_stages,
    )
    NC = BT // BC
    dglp = torch.empty((slots, NC, H, K), dtype=f32, device=dev)  # the sub-chunks' parts of G_last's gradient
    # with the in-op gate dG and dg stay fp32 in a buffer of their own and dg's buffer takes dz;
    # per-chunk parts of the parameter gradients (zeros: unused varlen slots write none)
    dG = torch.empty((B * T, H, K), dtype=f32, device=dev) if use_gate else dg
    part = torch.zeros if is_varlen else torch.empty
    dAp = part((slots, H), dtype=f32, device=dev) if use_gate else None
    dbp = part((slots, H, K), dtype=f32, device=dev) if use_gate else None
    launch(chunk_kda_bwd_intra_kernel)[(NK * NC, rows, B * H)](
        q, k, beta, do, gc, mqk, mkk, gl, rqk, h, dh, v_new, dv_new, dqn, dkn, dG, dglp, db, ds,
        *index, NTH, scale,
        H=H, K=K, V=V, BT=BT, BC=BC, BK=cfg.intra_bk, BV=cfg.intra_bv, **common,
        DIAG_PRECISION=fwd_cfg.diag_precision,
        num_warps=cfg.intra_warps,
        num_stages=cfg.intra_stages,
    )
    launch(chunk_kda_bwd_finish_kernel)[grid_chunks](
        q, k, rqk, dqn, dkn, dG, dglp, db, ds, dq, dk, dbeta,
        g, gate.get("A_log"), gate.get("dt_bias"), gate_lower_bound, dg if use_gate else None, dAp, dbp,
        *index, NTH,
        H=H, K=K, BT=BT, BC=BC, BK=cfg.finish_gate_bk if use_gate else cfg.finish_bk, NK=NK,
        USE_GATE_IN_KERNEL=use_gate, BOUNDED_GATE=gate_lower_bound is not None, **common,
    )
    if use_gate:
        dA_log.copy_(dAp.sum(0))
        ddt_bias.copy_(dbp.sum(0).view(H * K))
