"""Split-KV (flash-decoding) Triton kernels for absorbed MLA decode over a paged latent cache.
Math and layouts: docs/mla_decode.md; the op contract and reference: kda_ops.meta.mla_decode.

Two launches whose grids and fp32 workspace depend on shapes and static configuration only
(batch size, heads, the launch config and the GPU's SM count), never on the values of seq_lens,
so one CUDA graph serves every step:

1. `mla_decode_split_kernel`, grid (P, head_blocks) with P = programs_per_sm * SMs / head_blocks.
   Every sequence is cut into cdiv(seq_len, BLOCK_N) tiles of BLOCK_N tokens, T in all, and each
   program derives its range of tiles from seq_lens on the device, by one of two deals:
   - aligned: the smallest piece size c in [cdiv(T, P), cdiv(T, P) + SPLIT_SLACK] that cuts each
     sequence into cdiv(tiles, c) pieces, at most P in all; program p takes piece p (in batch
     order), a range inside one sequence. No program pays twice for a range's fixed cost (q
     load, pipeline fill and drain, partial store), which SPLIT_SLACK tiles measure.
   - balanced, where no such c exists (many short sequences, or long ones just over a multiple
     of the share): program p takes tiles [p*T // P, (p+1)*T // P) whatever sequences they
     belong to, so every program streams the same bytes at any mix of lengths.
   Either way every program with tiles holds a tile at or after tile p. For each sequence its
   range touches it writes one partial (o normalised in fp32, log2-sum-exp) to workspace row
   b + p: the ranges are ordered, so (b, p) -> b + p is one-to-one, the workspace has B + P
   rows, and a sequence's partials are consecutive rows. The programs that hold a sequence's
   first and last tile write their p to part_span [2, B].
   Each [BLOCK_N, D_qk] tile is loaded once through the block table and its first V columns are
   the values: S = Q K^T [BLOCK_H, BLOCK_N], O += P V [BLOCK_H, V]. MMA M = BLOCK_H, so H < 64
   compiles to mma.sync. The transposed orientation (S^T = K Q^T, O^T += V^T P^T: wgmma at any
   head count) measured slower at every swept shape, with wgmma on both products too, and was
   removed (bench/NOTES.md).
2. `mla_decode_combine_kernel`, grid (B, H, cdiv(V, BLOCK_VC)) with BLOCK_VC covering all V
   (bench/sweep_mla_combine.py tries narrower): reads sequence b's span and merges its partials
   with log-sum-exp and writes o (in o's dtype) and lse (natural log). Its cost is per program
   (three loads, then the partials), not per byte: one program per output row keeps the count
   at B * H whatever P is, with nothing keyed on B (bench/NOTES.md). The step height is chosen
   at run time from the span: one BLOCK_S-row step for the few partials of a sequence in a
   large batch, BLOCK_S_TALL-row steps for the many of a small batch. A sequence of length 0
   gets o = 0, lse = -inf.

Both kernels load seq_lens in their own bodies and hand the lengths, not the pointer, to
@triton.jit helpers: torch's analysis of what a kernel writes (the one Inductor relies on) takes a
pointer passed to a helper as written once anything the helper returns enters a store's address
(here the workspace row of the sequence a tile belongs to), and Inductor would clone seq_lens for
the kernel and copy it back (tests/test_triton_writes.py).
"""

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

LN2 = tl.constexpr(math.log(2.0))
BLOCK_B = 256  # sequence lengths read per step of the on-device tile count
SEGMENT_COST_TOKENS = 128  # a range's fixed cost (q load, pipeline fill and drain, partial store) in tokens streamed (bench/NOTES.md)
COMBINE_BLOCK_S = 8  # partials a combine program merges per step, when a sequence has at most this many
COMBINE_BLOCK_S_TALL = 32  # partials per step when it has more


@triton.jit
def _tile_counts(b_len, capacity, BLOCK_N: tl.constexpr):
    """Tiles of sequences of lengths b_len: cdiv(b_len clamped to [0, capacity], BLOCK_N)."""
    return tl.cdiv(tl.minimum(tl.maximum(b_len, 0), capacity), BLOCK_N)


@triton.jit
def _load_kv_tile(
    kv_cache, p_bt, i_n, eos, stride_kv_block, stride_kv_row, stride_bt_n,
    V: tl.constexpr, D_ROPE: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """(m_n, b_kv, b_kr): tokens [i_n, i_n + BLOCK_N) of a sequence, read through its block table,
    as their value columns [BLOCK_N, BLOCK_V] and shared-key columns [BLOCK_N, BLOCK_R] (zeros
    when D_ROPE = 0); rows at or past eos are zeros and never read. i_n is a multiple of BLOCK_N,
    so where BLOCK_N divides PAGE_SIZE the tile lies in one page, addressed by one scalar page id
    (no page-id vector for the pipeliner to stage, fewer registers; bench/NOTES.md)."""
    o_n = i_n + tl.arange(0, BLOCK_N)
    o_v = tl.arange(0, BLOCK_V)
    o_r = tl.arange(0, BLOCK_R)
    m_n = o_n < eos
    if PAGE_SIZE % BLOCK_N == 0:
        i_page = tl.load(p_bt + (i_n // PAGE_SIZE) * stride_bt_n).to(tl.int64)  # i_n < eos: a used entry
        p_kv = kv_cache + i_page * stride_kv_block + (o_n % PAGE_SIZE)[:, None] * stride_kv_row  # [BLOCK_N, 1]
    else:
        b_page = tl.load(p_bt + (o_n // PAGE_SIZE) * stride_bt_n, mask=m_n, other=0).to(tl.int64)  # [BLOCK_N]
        p_kv = kv_cache + b_page[:, None] * stride_kv_block + (o_n % PAGE_SIZE)[:, None] * stride_kv_row  # [BLOCK_N, 1]
    b_kv = tl.load(p_kv + o_v[None, :], mask=m_n[:, None] & (o_v < V)[None, :], other=0.0)  # [BLOCK_N, BLOCK_V]
    b_kr = tl.load(p_kv + V + o_r[None, :], mask=m_n[:, None] & (o_r < D_ROPE)[None, :], other=0.0)  # [BLOCK_N, BLOCK_R]
    return m_n, b_kv, b_kr


@triton.jit
def _attend(
    p_q, p_bt, kv_cache, p_o, p_lse, bos, eos, qk_scale, o_h, m_h, H,
    stride_q_h, stride_kv_block, stride_kv_row, stride_bt_n,
    V: tl.constexpr, D_ROPE: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Tokens [bos, eos) of one sequence for heads o_h; writes the partial to p_o / p_lse."""
    o_v = tl.arange(0, BLOCK_V)
    o_r = tl.arange(0, BLOCK_R)
    m_v = o_v < V
    m_r = o_r < D_ROPE
    b_q = tl.load(p_q + o_h[:, None] * stride_q_h + o_v[None, :], mask=m_h[:, None] & m_v[None, :], other=0.0)  # [BLOCK_H, BLOCK_V]
    b_qr = tl.load(p_q + o_h[:, None] * stride_q_h + V + o_r[None, :], mask=m_h[:, None] & m_r[None, :], other=0.0)  # [BLOCK_H, BLOCK_R]

    b_m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)  # [BLOCK_H] running max (log2 domain)
    b_l = tl.zeros([BLOCK_H], dtype=tl.float32)  # [BLOCK_H] running sum of exp2
    b_acc = tl.zeros([BLOCK_H, BLOCK_V], dtype=tl.float32)  # [BLOCK_H, BLOCK_V]
    for i_n in range(bos, eos, BLOCK_N):
        m_n, b_kv, b_kr = _load_kv_tile(kv_cache, p_bt, i_n, eos, stride_kv_block, stride_kv_row, stride_bt_n,
                                        V, D_ROPE, PAGE_SIZE, BLOCK_N, BLOCK_V, BLOCK_R)
        b_s = tl.dot(b_q, tl.trans(b_kv), input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_N]
        b_s += tl.dot(b_qr, tl.trans(b_kr), input_precision=DOT_PRECISION)
        b_s = tl.where(m_n[None, :], b_s * qk_scale, float("-inf"))  # [BLOCK_H, BLOCK_N]
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))  # [BLOCK_H]; finite: every tile holds a token
        b_alpha = tl.exp2(b_m - b_m_new)  # [BLOCK_H]
        b_p = tl.exp2(b_s - b_m_new[:, None])  # [BLOCK_H, BLOCK_N]
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_kv.dtype), b_kv, input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_V]
        b_m = b_m_new

    tl.store(p_o + o_h[:, None] * V + o_v[None, :], b_acc / b_l[:, None], mask=m_h[:, None] & m_v[None, :])
    tl.store(p_lse + o_h, b_m + tl.log2(b_l), mask=m_h)


@triton.jit
def mla_decode_split_kernel(
    q,
    kv_cache,
    block_table,
    seq_lens,
    o_part,
    lse_part,
    part_span,
    qk_scale,
    B,
    H,
    max_blocks,
    num_programs,
    stride_q_b,
    stride_q_h,
    stride_kv_block,
    stride_kv_row,
    stride_bt_b,
    stride_bt_n,
    stride_sl,
    V: tl.constexpr,
    D_ROPE: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
    SPLIT_SLACK: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):
    DOT_PRECISION: tl.constexpr = "ieee" if IEEE_DOT else "tf32"
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor passes Python floats as fp64; eager as fp32
    i_p, i_hb = tl.program_id(0), tl.program_id(1)
    capacity = max_blocks * PAGE_SIZE
    b_total = 0  # tiles of the whole batch
    for i_b0 in range(0, B, BLOCK_B):
        o_b = i_b0 + tl.arange(0, BLOCK_B)
        b_len = tl.load(seq_lens + o_b * stride_sl, mask=o_b < B, other=0)  # [BLOCK_B]
        b_total += tl.sum(_tile_counts(b_len, capacity, BLOCK_N), 0)
    # The aligned deal: the smallest piece size c within SPLIT_SLACK tiles of the balanced share
    # that cuts every sequence into at most num_programs pieces in all, one piece per program.
    c_share = tl.maximum(tl.cdiv(b_total, num_programs), 1)
    c_piece = 0x7FFFFFFF  # no size fits: the balanced deal
    # One 1-D pass per candidate (N(c) falls with c: the last fit is the smallest). A single pass
    # over a [BLOCK_B, candidates] tile changed how the whole kernel compiles: 186 -> 168
    # registers at H = 16 and the tile loop up to 38% slower on the GPU (bench/NOTES.md).
    for i_c in tl.static_range(SPLIT_SLACK, -1, -1):
        n_pieces = 0
        for i_b0 in range(0, B, BLOCK_B):
            o_b = i_b0 + tl.arange(0, BLOCK_B)
            b_len = tl.load(seq_lens + o_b * stride_sl, mask=o_b < B, other=0)  # [BLOCK_B]
            n_pieces += tl.sum(tl.cdiv(_tile_counts(b_len, capacity, BLOCK_N), c_share + i_c), 0)
        c_piece = tl.where(n_pieces <= num_programs, c_share + i_c, c_piece)
    aligned = c_piece < 0x7FFFFFFF
    # Locate the unit the program starts at: its piece (aligned) or its first tile (balanced), the
    # sequence i_b that holds it, and i_b's first tile b_first (units are tiles when balanced).
    i_t = ((i_p.to(tl.int64) * b_total) // num_programs).to(tl.int32)
    t_end = (((i_p.to(tl.int64) + 1) * b_total) // num_programs).to(tl.int32)
    c_unit = tl.where(aligned, c_piece, 1)
    i_unit = tl.where(aligned, i_p, i_t)
    u_carry = 0
    i_b = 0
    u_first = 0  # units of the sequences before i_b
    b_first = 0
    for i_b0 in range(0, B, BLOCK_B):
        o_b = i_b0 + tl.arange(0, BLOCK_B)
        b_len = tl.load(seq_lens + o_b * stride_sl, mask=o_b < B, other=0)  # [BLOCK_B]
        b_tiles = _tile_counts(b_len, capacity, BLOCK_N)  # [BLOCK_B]
        b_units = tl.cdiv(b_tiles, c_unit)  # [BLOCK_B]
        b_end = u_carry + tl.cumsum(b_units, 0)  # [BLOCK_B] one past each sequence's last unit
        m_before = (b_end <= i_unit) & (o_b < B)  # sequences that end at or before the unit
        i_b += tl.sum(m_before.to(tl.int32), 0)
        u_first = tl.maximum(u_first, tl.max(tl.where(m_before, b_end, 0), 0))
        b_first += tl.sum(tl.where(m_before, b_tiles, 0), 0)
        u_carry += tl.sum(b_units, 0)
    if aligned:
        n_tiles = _tile_counts(tl.load(seq_lens + i_b.to(tl.int64) * stride_sl, mask=i_b < B, other=0), capacity, BLOCK_N)
        i_t = b_first + (i_p - u_first) * c_piece
        t_end = b_first + tl.minimum((i_p - u_first + 1) * c_piece, n_tiles)
    if i_t >= t_end:
        return

    o_h = i_hb * BLOCK_H + tl.arange(0, BLOCK_H)
    m_h = o_h < H
    # Walk the sequences the range [i_t, t_end) crosses; an empty one has no tiles and is skipped.
    while i_t < t_end:
        i_b64 = i_b.to(tl.int64)
        seq_len = tl.minimum(tl.maximum(tl.load(seq_lens + i_b64 * stride_sl), 0), capacity)
        seq_end = b_first + tl.cdiv(seq_len, BLOCK_N)
        seg_end = tl.minimum(seq_end, t_end)
        if seg_end > i_t:
            # the first and last program of sequence i_b's partials
            if (i_hb == 0) & (i_t == b_first):
                tl.store(part_span + i_b64, i_p)
            if (i_hb == 0) & (seg_end == seq_end):
                tl.store(part_span + B + i_b64, i_p)
            bos = (i_t - b_first) * BLOCK_N
            eos = tl.minimum((seg_end - b_first) * BLOCK_N, seq_len)
            p_q = q + i_b64 * stride_q_b
            p_bt = block_table + i_b64 * stride_bt_b
            o_ws = (i_b64 + i_p) * H  # workspace row b + p
            _attend(
                p_q, p_bt, kv_cache, o_part + o_ws * V, lse_part + o_ws, bos, eos, qk_scale, o_h, m_h, H,
                stride_q_h, stride_kv_block, stride_kv_row, stride_bt_n,
                V, D_ROPE, PAGE_SIZE, BLOCK_H, BLOCK_N, BLOCK_V, BLOCK_R, DOT_PRECISION,
            )
            i_t = seg_end
        b_first += tl.cdiv(seq_len, BLOCK_N)
        i_b += 1


@triton.jit
def _merge_partials(p_os, p_lses, n_parts, H, m_v, V: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_VC: tl.constexpr):
    """(max, sum, acc): the log-sum-exp merge of n_parts consecutive workspace rows (row stride
    H·V for p_os [BLOCK_VC], H for p_lses) in steps of BLOCK_S rows: m = max of their lse (log2),
    l = Σ 2^(lse − m), acc = Σ 2^(lse − m)·o [BLOCK_VC]."""
    b_m = tl.full([], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_VC], dtype=tl.float32)  # [BLOCK_VC]
    for i_s in range(0, n_parts, BLOCK_S):
        o_s = i_s + tl.arange(0, BLOCK_S)  # [BLOCK_S] rows of the span
        m_s = o_s < n_parts
        b_lse_s = tl.load(p_lses + o_s * H, mask=m_s, other=float("-inf"))  # [BLOCK_S]
        b_os = tl.load(p_os[None, :] + o_s[:, None].to(tl.int64) * H * V, mask=m_s[:, None] & m_v[None, :], other=0.0)  # [BLOCK_S, BLOCK_VC]
        b_m_new = tl.maximum(b_m, tl.max(b_lse_s, 0))  # finite: every step holds a partial
        b_alpha = tl.exp2(b_m - b_m_new)
        b_w = tl.exp2(b_lse_s - b_m_new)  # [BLOCK_S]
        b_l = b_l * b_alpha + tl.sum(b_w, 0)
        b_acc = b_acc * b_alpha + tl.sum(b_w[:, None] * b_os, 0)
        b_m = b_m_new
    return b_m, b_l, b_acc


@triton.jit
def mla_decode_combine_kernel(
    o_part,
    lse_part,
    part_span,
    seq_lens,
    o,
    lse,
    B,
    H,
    max_blocks,
    stride_sl,
    stride_o_b,
    stride_o_h,
    stride_lse_b,
    stride_lse_h,
    V: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_S_TALL: tl.constexpr,
    BLOCK_VC: tl.constexpr,
):
    i_b, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b64 = i_b.to(tl.int64)
    # three independent loads: the length, and the first and last partial row of the span
    n_tiles = _tile_counts(tl.load(seq_lens + i_b64 * stride_sl), max_blocks * PAGE_SIZE, BLOCK_N)
    i_r0 = tl.load(part_span + i_b64)
    n_parts = tl.load(part_span + B + i_b64) - i_r0 + 1
    o_v = i_v * BLOCK_VC + tl.arange(0, BLOCK_VC)
    m_v = o_v < V
    p_o = o + i_b64 * stride_o_b + i_h * stride_o_h + o_v
    if n_tiles == 0:  # the span was not written
        tl.store(p_o, tl.zeros([BLOCK_VC], dtype=tl.float32).to(o.dtype.element_ty), mask=m_v)
        if i_v == 0:
            tl.store(lse + i_b64 * stride_lse_b + i_h * stride_lse_h, float("-inf"))
        return

    p_os = o_part + (i_b64 + i_r0) * H * V + i_h * V + o_v  # [BLOCK_VC] the span's first partial
    p_lses = lse_part + (i_b64 + i_r0) * H + i_h
    # one program per output row whatever the split, so the step height follows the span at run
    # time: one short step covers the few partials of a sequence in a large batch, tall steps
    # keep more bytes in flight for the many partials of a small one (bench/NOTES.md)
    if n_parts <= BLOCK_S:
        b_m, b_l, b_acc = _merge_partials(p_os, p_lses, n_parts, H, m_v, V, BLOCK_S, BLOCK_VC)
    else:
        b_m, b_l, b_acc = _merge_partials(p_os, p_lses, n_parts, H, m_v, V, BLOCK_S_TALL, BLOCK_VC)
    tl.store(p_o, (b_acc / b_l).to(o.dtype.element_ty), mask=m_v)
    if i_v == 0:
        tl.store(lse + i_b64 * stride_lse_b + i_h * stride_lse_h, (b_m + tl.log2(b_l)) * LN2)


@dataclass(frozen=True)
class MLADecodeConfig:
    """Launch configuration of the split kernel (the combine kernel's is fixed)."""

    block_h: int  # heads per program, >= 16 (the smallest MMA tile); padded heads are masked
    block_n: int  # tokens per KV tile, also the unit in which the work is dealt out
    num_warps: int
    num_stages: int
    programs_per_sm: int  # split-kernel programs per SM; the grid is this times the SM count


# (arch, dtype, H, D_qk, v_dim) -> config: the winners of bench/tune_mla_decode.py on an H100
# (results/h100/mla_decode_tune.json). 5 and 7 stages: Triton's pipeliner spends stages on the
# page-id load that the tile load depends on, and only from 5 stages on does the KV tile get two
# buffers (three at 7), i.e. a load in flight while the dots read another (bench/NOTES.md).
_SM90 = (9, 0)
CONFIGS = {
    **{(_SM90, dtype, 32, 576, 512): MLADecodeConfig(block_h=32, block_n=64, num_warps=8, num_stages=5, programs_per_sm=1)
       for dtype in (torch.bfloat16, torch.float16)},
    **{(_SM90, dtype, 16, 576, 512): MLADecodeConfig(block_h=16, block_n=32, num_warps=4, num_stages=7, programs_per_sm=1)
       for dtype in (torch.bfloat16, torch.float16)},
}
SMEM_BUDGET = 200 * 1024  # the KV tile buffers and the q block; the rest of the 227 KB is scratch


@lru_cache(maxsize=None)
def device_sm_count_and_arch(device: torch.device) -> tuple[int, tuple[int, int] | None]:
    """(SMs, compute capability) of a CUDA device, static configuration read once. The
    interpreter (CPU) has no SMs: 4 makes tiny tests deal tiles to several programs."""
    if device.type != "cuda":
        return 4, None
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, (props.major, props.minor)


def heuristic_config(num_heads: int, head_dim: int, v_dim: int, dtype: torch.dtype) -> MLADecodeConfig:
    """All heads (up to 64; 16 for fp32, whose IEEE dots run on FMA registers) in one program, 8
    warps, 5 stages (see CONFIGS), one program per SM, and the widest power-of-two BLOCK_N <= 64
    whose KV tile buffers fit SMEM_BUDGET beside the q block: two buffers, three where the dots
    compile to wgmma (16-bit inputs, 64 heads per program), as Triton's pipeliner allocates them
    at 5 stages."""
    row_bytes = (_block_v(v_dim) + _block_r(head_dim - v_dim)) * dtype.itemsize
    block_h = min(64 if dtype.itemsize < 4 else 16, max(16, triton.next_power_of_2(num_heads)))
    tile_buffers = 3 if block_h >= 64 and dtype.itemsize == 2 else 2
    tile_rows = max(16, (SMEM_BUDGET - block_h * row_bytes) // (tile_buffers * row_bytes))
    return MLADecodeConfig(
        block_h=block_h,
        block_n=min(64, 1 << (tile_rows.bit_length() - 1)),
        num_warps=8,
        num_stages=5,
        programs_per_sm=1,
    )


def mla_decode_config(num_heads: int, head_dim: int, v_dim: int, dtype: torch.dtype, device: torch.device) -> MLADecodeConfig:
    """The CONFIGS row for (arch, dtype, heads, head dims), else the heuristic; never keyed on
    batch or sequence lengths."""
    _, arch = device_sm_count_and_arch(device)
    key = (arch, dtype, num_heads, head_dim, v_dim)
    return CONFIGS[key] if key in CONFIGS else heuristic_config(num_heads, head_dim, v_dim, dtype)


def _block_v(v_dim: int) -> int:
    return max(16, triton.next_power_of_2(v_dim))


def _block_r(rope_dim: int) -> int:
    """The shared-key tile width; 16 fully masked columns when there is no shared key."""
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
    (the op passes torch.library.wrap_triton); `config` overrides the table (tests, tuning).
    Allocates only a fixed fp32 workspace of B + P rows; never reads tensor data on the host.
    """
    B, H, D = q.shape
    page_size, max_blocks = int(kv_cache.shape[1]), block_table.shape[1]
    if config is None:  # head counts and dims are static in practice: int() keeps dict keys hashable
        config = mla_decode_config(int(H), int(D), v_dim, q.dtype, q.device)
    sm_count, _ = device_sm_count_and_arch(q.device)
    head_blocks = triton.cdiv(H, config.block_h)
    num_programs = max(1, config.programs_per_sm * sm_count // head_blocks)
    split_slack = max(1, SEGMENT_COST_TOKENS // config.block_n)  # tiles
    o_part = torch.empty((B + num_programs, H, v_dim), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((B + num_programs, H), dtype=torch.float32, device=q.device)
    part_span = torch.empty((2, B), dtype=torch.int32, device=q.device)  # first and last program p of each sequence's partials

    launch(mla_decode_split_kernel)[(num_programs, head_blocks)](
        q,
        kv_cache,
        block_table,
        seq_lens,
        o_part,
        lse_part,
        part_span,
        scale * math.log2(math.e),
        B,
        H,
        max_blocks,
        num_programs,
        q.stride(0),
        q.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        block_table.stride(0),
        block_table.stride(1),
        seq_lens.stride(0),
        V=v_dim,
        D_ROPE=D - v_dim,
        PAGE_SIZE=page_size,
        BLOCK_H=config.block_h,
        BLOCK_N=config.block_n,
        BLOCK_V=_block_v(v_dim),
        BLOCK_R=_block_r(D - v_dim),
        BLOCK_B=BLOCK_B,
        SPLIT_SLACK=split_slack,
        IEEE_DOT=q.dtype == torch.float32,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    block_vc = _block_v(v_dim)
    launch(mla_decode_combine_kernel)[(B, H, triton.cdiv(v_dim, block_vc))](
        o_part,
        lse_part,
        part_span,
        seq_lens,
        o,
        lse,
        B,
        H,
        max_blocks,
        seq_lens.stride(0),
        o.stride(0),
        o.stride(1),
        lse.stride(0),
        lse.stride(1),
        V=v_dim,
        PAGE_SIZE=page_size,
        BLOCK_N=config.block_n,
        BLOCK_S=COMBINE_BLOCK_S,
        BLOCK_S_TALL=COMBINE_BLOCK_S_TALL,
        BLOCK_VC=block_vc,
        num_warps=4,
        num_stages=3,
    )
