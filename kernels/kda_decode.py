"""Triton kernels of kda::kda_decode and kda::causal_conv1d_update, and their launchers.

kda_decode_kernel: one program per (batch row b, head h, V-tile of BV columns). The program holds
the [K, BV] fp32 state tile in registers across the T new tokens (K whole: the delta rule's kᵀS
reduces over all of K, while V columns are independent), so every state byte is read once and
written once — the op is memory-bound (docs/kda_math.md §5). The slot index is loaded on the device;
a padding row (index < 0, or >= S) stores zeros to o and neither reads nor writes the pool. With
USE_GATE_IN_KERNEL, g holds the gate's pre-activation z and the kernel computes the log-decay
-exp(A_log[h]) * softplus(z + dt_bias) itself, saving the separate elementwise gate launch; with
BOUNDED_GATE as well, the bounded form gate_lower_bound * sigmoid(exp(A_log[h]) * (z + dt_bias)).

causal_conv1d_update_kernel: one program per (batch row b, D-tile of BD channels). The last W-1
inputs of each channel are held in registers, shifted once per new token, and written back to the
slot at the end.

Launch configs are deterministic functions of the head / channel sizes (no autotune). The launchers
write into preallocated outputs and take contiguous tensors.
"""

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .chunk_kda_fwd import kimi_gate

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _launchable(kernel):
    """wrap_triton makes a launch traceable inside a triton_op. Under the interpreter (CPU tests)
    the kernel is launched directly: torch < 2.13 rejects interpreted kernels in wrap_triton."""
    return kernel if INTERPRET else wrap_triton(kernel)


@triton.jit
def kda_decode_kernel(
    q,
    k,
    v,
    g,
    beta,
    state,
    state_indices,
    o,
    A_log,
    dt_bias,
    gate_lower_bound,
    scale,
    T,
    S,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_QK_L2NORM: tl.constexpr,
    USE_GATE_IN_KERNEL: tl.constexpr,
    BOUNDED_GATE: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)  # Inductor passes Python floats as fp64; eager as fp32
    i_bh, i_v = tl.program_id(0).to(tl.int64), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_s = tl.load(state_indices + i_b).to(tl.int64)
    is_valid = (i_s >= 0) & (i_s < S)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_h = m_k[:, None] & m_v[None, :] & is_valid

    p_h = state + (i_s * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
    # [BK, BV]
    b_h = tl.load(p_h, mask=m_h, other=0.0)
    if USE_GATE_IN_KERNEL:
        b_A = tl.exp(tl.load(A_log + i_h).to(tl.float32))
        # [BK]
        b_bias = tl.load(dt_bias + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    for i_t in range(T):
        i_tok = (i_b * T + i_t) * H + i_h
        # [BK]
        b_q = tl.load(q + i_tok * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(k + i_tok * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_g = tl.load(g + i_tok * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        if USE_GATE_IN_KERNEL:
            b_g = kimi_gate(b_g + b_bias, b_A, gate_lower_bound, BOUNDED_GATE)
        # [BV]
        b_v = tl.load(v + i_tok * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_beta = tl.load(beta + i_tok).to(tl.float32)
        if USE_QK_L2NORM:
            b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q) + 1e-6)
            b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k) + 1e-6)
        b_h = b_h * tl.exp(b_g)[:, None]
        # [BV]
        b_u = b_beta * (b_v - tl.sum(b_h * b_k[:, None], 0))
        b_h = b_h + b_k[:, None] * b_u[None, :]
        # [BV]
        b_o = tl.sum(b_h * (b_q * scale)[:, None], 0)
        b_o = tl.where(is_valid, b_o, 0.0)
        tl.store(o + i_tok * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    tl.store(p_h, b_h, mask=m_h)


class DecodeConfig(NamedTuple):
    BK: int
    BV: int
    num_warps: int
    num_stages: int


def kda_decode_config(K: int, V: int) -> DecodeConfig:
    """BK covers K; V tiles of up to 64 columns (256-byte state rows per program); warps so that a
    thread holds ~128 state values; no software pipelining (the token loop is short).

    From bench/tune_kda_decode.py on an H100 (bf16, H = 32; bench/results/h100/
    kda_decode_tune.json): at K = V = 128 this config is within 1% of the best swept one at
    B = 64 and 256 (2.6-2.8 TB/s),
    within 4% at B = 8, and 9% behind BV = 32 / 1 warp at T = 4; at K = 64 and 256 the same rule
    (1 and 4 warps) is within 1% of the best. The state is fp32 whatever the input dtype, so the
    input dtype does not enter; the batch size never does.
    """
    BK = triton.next_power_of_2(K)
    BV = min(triton.next_power_of_2(V), 64)
    return DecodeConfig(BK=BK, BV=BV, num_warps=max(1, BK * BV // (32 * 128)), num_stages=1)


def kda_decode_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    state_indices: torch.Tensor,
    o: torch.Tensor,
    scale: float,
    use_qk_l2norm: bool,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    gate_lower_bound: float | None = None,
    config: DecodeConfig | None = None,
) -> None:
    """Writes o [B, T, H, V] (or token-flat [B*T, H, V]) and advances state [S, H, K, V] (fp32)
    in place at state_indices [B].

    q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H, K] fp32 log-decay, or with A_log [H] and
    dt_bias [H*K] (fp32) the gate's pre-activation (q's dtype or fp32); gate_lower_bound L < 0
    (with A_log) selects the bounded gate L * sigmoid(exp(A_log[h]) * (z + dt_bias)); beta [B, T, H];
    all contiguous. config overrides kda_decode_config (bench/tune_kda_decode.py sweeps it).
    """
    B, T, H, K = q.shape
    V = v.shape[3]
    cfg = config or kda_decode_config(K, V)
    grid = (B * H, triton.cdiv(V, cfg.BV))
    _launchable(kda_decode_kernel)[grid](
        q,
        k,
        v,
        g,
        beta,
        state,
        state_indices,
        o,
        A_log,
        dt_bias,
        gate_lower_bound,
        scale,
        T,
        state.shape[0],
        H=H,
        K=K,
        V=V,
        BK=cfg.BK,
        BV=cfg.BV,
        USE_QK_L2NORM=use_qk_l2norm,
        USE_GATE_IN_KERNEL=A_log is not None,
        BOUNDED_GATE=gate_lower_bound is not None,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


@triton.jit
def _load_column(base, o_row, m_row, NCOL: tl.constexpr, COL: tl.constexpr, BR: tl.constexpr):
    """Column COL of a row-major [*, NCOL] tensor at rows o_row, as fp32 [BR]; zeros when COL < 0."""
    if COL >= 0:
        b_col = tl.load(base + o_row * NCOL + COL, mask=m_row, other=0.0).to(tl.float32)
    else:
        b_col = tl.zeros([BR], dtype=tl.float32)
    return b_col


@triton.jit
def _store_column(base, o_row, m_row, b_col, NCOL: tl.constexpr, COL: tl.constexpr):
    """Stores b_col into column COL of a row-major [*, NCOL] tensor; nothing when COL < 0."""
    if COL >= 0:
        tl.store(base + o_row * NCOL + COL, b_col.to(base.dtype.element_ty), mask=m_row)


@triton.jit
def causal_conv1d_update_kernel(
    x,
    conv_state,
    weight,
    state_indices,
    y,
    T,
    S,
    D: tl.constexpr,
    W: tl.constexpr,
    BD: tl.constexpr,
):
    i_b, i_d = tl.program_id(0).to(tl.int64), tl.program_id(1)
    i_s = tl.load(state_indices + i_b).to(tl.int64)
    is_valid = (i_s >= 0) & (i_s < S)

    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    m_s = m_d & is_valid

    # Registers by lag (tokens back). A kernel narrower than 4 is the width-4 kernel with zero
    # taps at the missing lags: weight column W-1-lag multiplies the input `lag` tokens back, and
    # conv-state column W-1-lag holds it.
    # [BD]
    b_w0 = _load_column(weight, o_d, m_d, W, W - 1, BD)
    b_w1 = _load_column(weight, o_d, m_d, W, W - 2, BD)
    b_w2 = _load_column(weight, o_d, m_d, W, W - 3, BD)
    b_w3 = _load_column(weight, o_d, m_d, W, W - 4, BD)
    p_cs = conv_state + i_s * D * (W - 1)
    b_x1 = _load_column(p_cs, o_d, m_s, W - 1, W - 2, BD)
    b_x2 = _load_column(p_cs, o_d, m_s, W - 1, W - 3, BD)
    b_x3 = _load_column(p_cs, o_d, m_s, W - 1, W - 4, BD)
    for i_t in range(T):
        i_tok = i_b * T + i_t
        # [BD]
        b_x0 = tl.load(x + i_tok * D + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_y = b_w3 * b_x3 + b_w2 * b_x2 + b_w1 * b_x1 + b_w0 * b_x0
        b_y = b_y * tl.sigmoid(b_y)
        b_y = tl.where(is_valid, b_y, 0.0)
        tl.store(y + i_tok * D + o_d, b_y.to(y.dtype.element_ty), mask=m_d)
        b_x3, b_x2, b_x1 = b_x2, b_x1, b_x0
    _store_column(p_cs, o_d, m_s, b_x1, W - 1, W - 2)
    _store_column(p_cs, o_d, m_s, b_x2, W - 1, W - 3)
    _store_column(p_cs, o_d, m_s, b_x3, W - 1, W - 4)


class ConvConfig(NamedTuple):
    BD: int
    num_warps: int


def causal_conv1d_update_config(D: int) -> ConvConfig:
    """Up to 256 channels per program, 4 per thread; the kernel is small and latency-bound."""
    BD = min(triton.next_power_of_2(D), 256)
    return ConvConfig(BD=BD, num_warps=max(1, BD // 128))


def causal_conv1d_update_fwd(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    state_indices: torch.Tensor,
    y: torch.Tensor,
) -> None:
    """Writes y [B, T, D] (or token-flat [B*T, D]) = SiLU(causal depthwise conv) and shifts the
    T new inputs into conv_state [S, D, W-1] (x's dtype) in place at state_indices [B].

    x [B, T, D]; weight [D, W] with 2 <= W <= 4; all contiguous.
    """
    B, T, D = x.shape
    W = weight.shape[1]
    cfg = causal_conv1d_update_config(D)
    grid = (B, triton.cdiv(D, cfg.BD))
    _launchable(causal_conv1d_update_kernel)[grid](
        x,
        conv_state,
        weight,
        state_indices,
        y,
        T,
        conv_state.shape[0],
        D=D,
        W=W,
        BD=cfg.BD,
        num_warps=cfg.num_warps,
    )
