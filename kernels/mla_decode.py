"""Split-KV (flash-decoding) Triton kernels for absorbed MLA decode over a paged latent cache.
Math and layouts: docs/mla_decode.md; the op contract and reference: kda_ops.meta.mla_decode.

Two launches with a grid that depends on shapes and the static config only, never on the values
of seq_lens, so one CUDA graph serves every step:

1. `mla_decode_split_kernel`, grid (B * head_blocks, num_splits). A program takes BLOCK_H heads of
   one sequence (all of them when H <= BLOCK_H) and one contiguous range of that sequence's
   tokens. Its range is computed on the device from seq_lens: the sequence is cut into
   min(cdiv(seq_len, MIN_SPLIT_TOKENS), num_splits) splits of equal length rounded up to
   BLOCK_N, so short sequences use few programs and long ones all of them; a program whose
   range starts past the sequence's end exits at once. Each [BLOCK_N, D_qk] tile is loaded once
   through the block table; its first V columns are the values. Online softmax in base 2
   (log2(e) folded into the scale). Partial o (normalised, fp32) and partial log2-sum-exp go to
   a workspace [B, num_splits, H, V] / [B, num_splits, H].
2. `mla_decode_combine_kernel`, grid (B, H): merges the non-empty splits of one (sequence, head)
   with log-sum-exp and writes o (in o's dtype) and lse (natural log). A sequence of length 0
   gets o = 0, lse = -inf.

num_splits (the grid's second dimension) is cdiv(target_programs, B * head_blocks) clamped to
[1, max_splits]: a function of the batch *shape*, symbolic under torch.compile.
"""

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

LN2 = tl.constexpr(math.log(2.0))


@triton.jit
def _load_seq_len(seq_lens, i_b, stride_sl, capacity):
    """seq_lens[i_b] clamped to [0, capacity]: a sequence never reads past its block table."""
    return tl.minimum(tl.maximum(tl.load(seq_lens + i_b * stride_sl), 0), capacity)


@triton.jit
def _split_len(seq_len, num_splits, MIN_SPLIT_TOKENS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tokens per split of a sequence of seq_len tokens: a multiple of BLOCK_N, at least BLOCK_N.
    The sequence's non-empty splits are the first cdiv(seq_len, split_len)."""
    n_splits = tl.maximum(tl.minimum(tl.cdiv(seq_len, MIN_SPLIT_TOKENS), num_splits), 1)
    return tl.maximum(tl.cdiv(tl.cdiv(seq_len, n_splits), BLOCK_N) * BLOCK_N, BLOCK_N)


@triton.jit
def mla_decode_split_kernel(
    q,
    kv_cache,
    block_table,
    seq_lens,
    o_split,
    lse_split,
    qk_scale,
    H,
    page_size,
    max_blocks,
    num_splits,
    stride_q_b,
    stride_q_h,
    stride_kv_block,
    stride_kv_row,
    stride_bt_b,
    stride_bt_n,
    stride_sl,
    V: tl.constexpr,
    D_ROPE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_R: tl.constexpr,
    MIN_SPLIT_TOKENS: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):
    DOT_PRECISION: tl.constexpr = "ieee" if IEEE_DOT else "tf32"
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    n_hb = tl.cdiv(H, BLOCK_H)
    i_b, i_hb = i_bh // n_hb, i_bh % n_hb
    i_b64 = i_b.to(tl.int64)

    seq_len = _load_seq_len(seq_lens, i_b64, stride_sl, max_blocks * page_size)
    split_len = _split_len(seq_len, num_splits, MIN_SPLIT_TOKENS, BLOCK_N)
    bos = i_s * split_len
    if bos >= seq_len:
        return
    eos = tl.minimum(bos + split_len, seq_len)

    o_h = i_hb * BLOCK_H + tl.arange(0, BLOCK_H)
    o_v = tl.arange(0, BLOCK_V)
    o_r = tl.arange(0, BLOCK_R)
    m_h = o_h < H
    m_v = o_v < V
    m_r = o_r < D_ROPE

    p_q = q + i_b64 * stride_q_b + o_h[:, None] * stride_q_h  # [BLOCK_H, 1]
    b_q = tl.load(p_q + o_v[None, :], mask=m_h[:, None] & m_v[None, :], other=0.0)  # [BLOCK_H, BLOCK_V]
    if D_ROPE > 0:
        b_qr = tl.load(p_q + V + o_r[None, :], mask=m_h[:, None] & m_r[None, :], other=0.0)  # [BLOCK_H, BLOCK_R]

    b_m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)  # [BLOCK_H] running max (log2 domain)
    b_l = tl.zeros([BLOCK_H], dtype=tl.float32)  # [BLOCK_H] running sum of exp2
    b_acc = tl.zeros([BLOCK_H, BLOCK_V], dtype=tl.float32)  # [BLOCK_H, BLOCK_V]
    p_bt = block_table + i_b64 * stride_bt_b
    for i_n in range(bos, eos, BLOCK_N):
        o_n = i_n + tl.arange(0, BLOCK_N)
        m_n = o_n < eos
        b_page = tl.load(p_bt + (o_n // page_size) * stride_bt_n, mask=m_n, other=0).to(tl.int64)  # [BLOCK_N]
        p_kv = kv_cache + b_page[:, None] * stride_kv_block + (o_n % page_size)[:, None] * stride_kv_row  # [BLOCK_N, 1]
        b_kv = tl.load(p_kv + o_v[None, :], mask=m_n[:, None] & m_v[None, :], other=0.0)  # [BLOCK_N, BLOCK_V]
        b_s = tl.dot(b_q, tl.trans(b_kv), input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_N]
        if D_ROPE > 0:
            b_kr = tl.load(p_kv + V + o_r[None, :], mask=m_n[:, None] & m_r[None, :], other=0.0)  # [BLOCK_N, BLOCK_R]
            b_s += tl.dot(b_qr, tl.trans(b_kr), input_precision=DOT_PRECISION)
        # Inductor may pass qk_scale as an fp64 scalar: the cast keeps the softmax state fp32.
        b_s = tl.where(m_n[None, :], (b_s * qk_scale).to(tl.float32), float("-inf"))  # [BLOCK_H, BLOCK_N]
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))  # [BLOCK_H]; finite: every tile holds a token
        b_alpha = tl.exp2(b_m - b_m_new)  # [BLOCK_H]
        b_p = tl.exp2(b_s - b_m_new[:, None])  # [BLOCK_H, BLOCK_N]
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_pv = tl.dot(b_p.to(b_kv.dtype), b_kv, input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_V]
        b_acc = b_acc * b_alpha[:, None] + b_pv
        b_m = b_m_new

    o_ws = (i_b64 * num_splits + i_s) * H + o_h  # [BLOCK_H] rows of the workspace
    tl.store(o_split + o_ws[:, None] * V + o_v[None, :], b_acc / b_l[:, None], mask=m_h[:, None] & m_v[None, :])
    tl.store(lse_split + o_ws, b_m + tl.log2(b_l), mask=m_h)


@triton.jit
def mla_decode_combine_kernel(
    o_split,
    lse_split,
    seq_lens,
    o,
    lse,
    H,
    page_size,
    max_blocks,
    num_splits,
    stride_sl,
    stride_o_b,
    stride_o_h,
    stride_lse_b,
    stride_lse_h,
    V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_S: tl.constexpr,
    MIN_SPLIT_TOKENS: tl.constexpr,
):
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    i_b64 = i_b.to(tl.int64)

    seq_len = _load_seq_len(seq_lens, i_b64, stride_sl, max_blocks * page_size)
    n_valid = tl.cdiv(seq_len, _split_len(seq_len, num_splits, MIN_SPLIT_TOKENS, BLOCK_N))

    o_s = tl.arange(0, BLOCK_S)
    o_v = tl.arange(0, BLOCK_V)
    m_v = o_v < V
    b_lse_s = tl.load(lse_split + (i_b64 * num_splits + o_s) * H + i_h, mask=o_s < n_valid, other=float("-inf"))  # [BLOCK_S]
    b_m = tl.where(n_valid > 0, tl.max(b_lse_s, 0), 0.0)  # the largest split lse; 0 when there is none
    b_l = tl.sum(tl.exp2(b_lse_s - b_m), 0)  # exp2(-inf) = 0 for the splits past n_valid

    b_acc = tl.zeros([BLOCK_V], dtype=tl.float32)  # [BLOCK_V]
    for i_s in range(0, n_valid):
        i_ws = (i_b64 * num_splits + i_s) * H + i_h
        b_w = tl.exp2(tl.load(lse_split + i_ws) - b_m)
        b_acc += b_w * tl.load(o_split + i_ws * V + o_v, mask=m_v, other=0.0)  # [BLOCK_V]

    b_l = tl.where(n_valid > 0, b_l, 1.0)  # an empty sequence sums nothing and divides by 1
    b_lse = tl.where(n_valid > 0, (b_m + tl.log2(b_l)) * LN2, float("-inf"))
    tl.store(o + i_b64 * stride_o_b + i_h * stride_o_h + o_v, (b_acc / b_l).to(o.dtype.element_ty), mask=m_v)
    tl.store(lse + i_b64 * stride_lse_b + i_h * stride_lse_h, b_lse)


@dataclass(frozen=True)
class MLADecodeConfig:
    """Launch configuration of the split kernel (the combine kernel derives its own)."""

    block_h: int  # heads per program; >= 16 (the smallest MMA tile), extra heads masked
    block_n: int  # tokens per KV tile
    num_warps: int
    num_stages: int
    max_splits: int  # the most programs one sequence's tokens are spread over
    min_split_tokens: int  # a sequence is split only into ranges of at least this many tokens
    target_programs: int  # split-kernel programs per launch that num_splits aims at


# Rows (most heads or None for any, BLOCK_H, BLOCK_N) by bytes per element, first match wins;
# 8 warps, 2 stages. Checked offline by compiling for sm_90a with ptxas -v at D_qk = 576,
# v_dim = 512: no register spills. 16 and 32 heads use mma.sync; 64 heads per program reach
# wgmma (M = 64). fp32 (exact IEEE dots) keeps 16 heads and 32-token tiles.
_TILES = {2: ((16, 16, 64), (32, 32, 64), (None, 64, 32)), 4: ((None, 16, 32),)}
SMEM_TILE_BYTES = 72 * 1024  # one pipelined [BLOCK_N, D_qk] KV tile: caps BLOCK_N for wide rows


@lru_cache(maxsize=None)
def _target_programs(device: torch.device) -> int:
    """Two programs per SM on CUDA. The interpreter has no SMs; 8 makes tiny tests split."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def mla_decode_config(num_heads: int, head_dim: int, v_dim: int, dtype: torch.dtype, device: torch.device) -> MLADecodeConfig:
    """Deterministic heuristic keyed on heads, head dims, dtype and the device (never on batch or
    sequence lengths): the _TILES row for the head count, BLOCK_N capped so a KV tile fits
    SMEM_TILE_BYTES."""
    block_h, block_n = next((h, n) for max_heads, h, n in _TILES[dtype.itemsize] if max_heads is None or num_heads <= max_heads)
    padded_row = _block_v(v_dim) + (_block_r(head_dim - v_dim) if head_dim > v_dim else 0)
    tile_rows = max(1, SMEM_TILE_BYTES // (padded_row * dtype.itemsize))
    block_n = max(16, min(block_n, 1 << (tile_rows.bit_length() - 1)))  # a power of two <= tile_rows
    return MLADecodeConfig(
        block_h=block_h,
        block_n=block_n,
        num_warps=8,
        num_stages=2,
        max_splits=64,
        min_split_tokens=2 * block_n,
        target_programs=_target_programs(device),
    )


def _block_v(v_dim: int) -> int:
    return max(16, triton.next_power_of_2(v_dim))


def _block_r(rope_dim: int) -> int:
    return max(16, triton.next_power_of_2(rope_dim))


def _launch_directly(kernel):
    return kernel


def mla_decode_triton(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    v_dim: int,
    *,
    config: MLADecodeConfig | None = None,
    launch=_launch_directly,
) -> None:
    """Writes absorbed MLA decode into the preallocated o [B, H, v_dim] (last dim contiguous)
    and lse [B, H] fp32.

    q [B, H, D_qk], kv_cache [num_blocks, block_size, D_qk] (bf16, fp16 or fp32, last dim
    contiguous), block_table [B, max_blocks] int32, seq_lens [B] int32; inputs are assumed to
    satisfy the op contract (kda_ops.meta.mla_decode). `launch` wraps each kernel before its launch
    (the op passes torch.library.wrap_triton); `config` overrides the heuristic (tests).
    Allocates only a fixed fp32 workspace sized by shapes; never reads tensor data on the host.
    """
    B, H, D = q.shape
    page_size, max_blocks = kv_cache.shape[1], block_table.shape[1]
    if config is None:
        config = mla_decode_config(H, D, v_dim, q.dtype, q.device)
    head_blocks = triton.cdiv(H, config.block_h)
    programs_per_split = torch.sym_max(B * head_blocks, 1)
    num_splits = torch.sym_max(1, torch.sym_min(config.max_splits, (config.target_programs + programs_per_split - 1) // programs_per_split))
    o_split = torch.empty((B, num_splits, H, v_dim), dtype=torch.float32, device=q.device)
    lse_split = torch.empty((B, num_splits, H), dtype=torch.float32, device=q.device)

    launch(mla_decode_split_kernel)[(B * head_blocks, num_splits)](
        q,
        kv_cache,
        block_table,
        seq_lens,
        o_split,
        lse_split,
        scale * math.log2(math.e),
        H,
        page_size,
        max_blocks,
        num_splits,
        q.stride(0),
        q.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        block_table.stride(0),
        block_table.stride(1),
        seq_lens.stride(0),
        V=v_dim,
        D_ROPE=D - v_dim,
        BLOCK_H=config.block_h,
        BLOCK_N=config.block_n,
        BLOCK_V=_block_v(v_dim),
        BLOCK_R=_block_r(D - v_dim),
        MIN_SPLIT_TOKENS=config.min_split_tokens,
        IEEE_DOT=q.dtype == torch.float32,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    launch(mla_decode_combine_kernel)[(B, H)](
        o_split,
        lse_split,
        seq_lens,
        o,
        lse,
        H,
        page_size,
        max_blocks,
        num_splits,
        seq_lens.stride(0),
        o.stride(0),
        o.stride(1),
        lse.stride(0),
        lse.stride(1),
        V=v_dim,
        BLOCK_N=config.block_n,
        BLOCK_V=_block_v(v_dim),
        BLOCK_S=triton.next_power_of_2(config.max_splits),
        MIN_SPLIT_TOKENS=config.min_split_tokens,
        num_warps=4,
        num_stages=1,
    )
