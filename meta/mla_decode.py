"""kda::mla_decode: input contract, fake (meta) allocation, the absorbed paged reference (the CPU
implementation and the test oracle) and an unabsorbed MLA attention used to check it.
Math and cache layout: docs/mla_decode.md §2-3.

Absorbed decode is multi-query attention with one KV head whose keys and values share storage:
for sequence b and head h, over its tokens j < seq_lens[b],

    s_hj = scale * (q[b, h] · kv_j),   o[b, h] = Σ_j softmax_j(s_h)_j · kv_j[:v_dim],
    lse[b, h] = log Σ_j exp(s_hj)      (natural log of the scaled scores)

where token t of sequence b is kv_cache[block_table[b, t // block_size], t % block_size].
A sequence of length 0 (a padded batch row) gets o = 0 and lse = -inf, the log-sum-exp of no
terms; nothing divides by zero. Rows past a sequence's length and block-table entries past
ceil(seq_len / block_size) are never read, whatever they hold. A length above the table's
capacity (max_blocks * block_size) is treated as that capacity.
"""

import torch

from ._contract import check_tensor, fail
from .kda_recurrent import accumulation_dtype

OP = "mla_decode"
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def check_mla_decode_inputs(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    v_dim: int,
) -> None:
    """q [B, H, D_qk]; kv_cache [num_blocks, block_size, D_qk] in q's dtype; block_table
    [B, max_blocks] int32; seq_lens [B] int32; 1 <= v_dim <= D_qk. The last dimension of q and
    kv_cache must be contiguous (the kernel reads rows of D_qk values)."""
    check_tensor(OP, "q", q, ndim=3, dtypes=INPUT_DTYPES)
    B, H, D = q.shape
    device = q.device
    check_tensor(OP, "kv_cache", kv_cache, ndim=3, dtypes=(q.dtype,), device=device)
    if kv_cache.shape[2] != D:
        fail(OP, "kv_cache", f"shape [num_blocks, block_size, {D}] (D_qk of q)", f"shape {list(kv_cache.shape)}")
    if kv_cache.shape[0] < 1 or kv_cache.shape[1] < 1:
        fail(OP, "kv_cache", "at least one block of at least one row", f"shape {list(kv_cache.shape)}")
    check_tensor(OP, "block_table", block_table, ndim=2, dtypes=(torch.int32,), device=device)
    if block_table.shape[0] != B or block_table.shape[1] < 1:
        fail(OP, "block_table", f"shape [{B}, max_blocks] (B of q, max_blocks >= 1)", f"shape {list(block_table.shape)}")
    check_tensor(OP, "seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,), device=device)
    if seq_lens.shape[0] != B:
        fail(OP, "seq_lens", f"shape [{B}] (B of q)", f"shape {list(seq_lens.shape)}")
    if v_dim < 1 or v_dim > D:
        fail(OP, "v_dim", f"1 <= v_dim <= {D} (D_qk of q)", str(v_dim))
    for name, t in (("q", q), ("kv_cache", kv_cache)):
        if t.stride(2) != 1 and t.shape[2] > 1:
            fail(OP, name, "a contiguous last dimension (stride 1)", f"strides {list(t.stride())}")


def mla_decode_meta(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    v_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validates and allocates (o [B, H, v_dim] in q's dtype, lse [B, H] in the accumulation
    dtype: fp32, or fp64 for fp64 inputs), both contiguous."""
    check_mla_decode_inputs(q, kv_cache, block_table, seq_lens, scale, v_dim)
    B, H, _ = q.shape
    o = torch.empty((B, H, v_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H), dtype=accumulation_dtype(q.dtype), device=q.device)
    return o, lse


def gather_paged_tokens(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """All max_blocks * block_size token rows of every sequence, [B, L, D_qk], and their validity
    [B, L] (t < seq_len). Invalid rows are zeros whatever the cache or the table holds there:
    page ids are clamped into the cache so any entry can be indexed, and the rows they fetch are
    selected away with torch.where (a NaN row times a zero weight would still be NaN). No host
    read of the table or the lengths."""
    num_blocks, block_size, _ = kv_cache.shape
    capacity = block_table.shape[1] * block_size
    t = torch.arange(capacity, device=kv_cache.device)
    valid = t[None, :] < seq_lens[:, None].long()  # [B, L]
    pages = block_table[:, t // block_size].long().clamp(0, num_blocks - 1)  # [B, L]
    rows = kv_cache[pages, (t % block_size)[None, :]]  # [B, L, D_qk]
    rows = torch.where(valid[..., None], rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    return rows, valid


def mla_decode_reference(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    v_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed paged MLA decode in the accumulation dtype, vectorised over the batch; same
    contract and outputs as mla_decode_meta."""
    o_out, lse_out = mla_decode_meta(q, kv_cache, block_table, seq_lens, scale, v_dim)
    acc = accumulation_dtype(q.dtype)
    rows, valid = gather_paged_tokens(kv_cache, block_table, seq_lens)
    rows = rows.to(acc)
    s = torch.einsum("bhd,bld->bhl", q.to(acc), rows) * scale
    s = torch.where(valid[:, None, :], s, float("-inf"))  # [B, H, L]
    lse = torch.logsumexp(s, dim=-1)  # [B, H]; -inf for an empty sequence
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])  # 0 at every invalid j
    o = torch.einsum("bhl,blv->bhv", p, rows[..., :v_dim])
    o_out.copy_(o)
    lse_out.copy_(lse)
    return o_out, lse_out


def mla_attention_unabsorbed(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    ckv_tokens: torch.Tensor,
    kpe_tokens: torch.Tensor,
    w_uk: torch.Tensor,
    w_uv: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA attention of one query token over one sequence, keys and values decompressed per head
    (no absorption): the form the absorbed op must equal (docs/mla_decode.md §2).

    q_nope [H, d_nope], q_pe [H, d_rope]; ckv_tokens [L, d_latent], kpe_tokens [L, d_rope] (the
    cached latent and shared key of each token); w_uk [H, d_nope, d_latent], w_uv [H, d_v,
    d_latent]. Returns (o [H, d_v], lse [H]) in the inputs' dtype; for L = 0, o = 0 and lse = -inf.
    """
    H = q_nope.shape[0]
    k_nope = torch.einsum("hnc,lc->hln", w_uk, ckv_tokens)  # [H, L, d_nope]
    k = torch.cat([k_nope, kpe_tokens[None].expand(H, -1, -1)], dim=-1)  # [H, L, d_nope + d_rope]
    v = torch.einsum("hvc,lc->hlv", w_uv, ckv_tokens)  # [H, L, d_v]
    s = torch.einsum("hd,hld->hl", torch.cat([q_nope, q_pe], dim=-1), k) * scale
    o = torch.einsum("hl,hlv->hv", torch.softmax(s, dim=-1), v)
    return o, torch.logsumexp(s, dim=-1)


CACHE_WRITE_OP = "mla_cache_write"
SLOT_DTYPES = (torch.int32, torch.int64)


def check_mla_cache_write_inputs(kv_cache: torch.Tensor, rows: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """kv_cache [num_blocks, block_size, D]; rows [N, D] in the cache's dtype; slot_mapping [N]
    int32/int64; all on one device, the last dimension of kv_cache and rows contiguous."""
    check_tensor(CACHE_WRITE_OP, "kv_cache", kv_cache, ndim=3, dtypes=INPUT_DTYPES)
    check_tensor(CACHE_WRITE_OP, "rows", rows, ndim=2, dtypes=(kv_cache.dtype,), device=kv_cache.device)
    if rows.shape[1] != kv_cache.shape[2]:
        fail(CACHE_WRITE_OP, "rows", f"shape [N, {kv_cache.shape[2]}] (the cache's row width)", f"shape {list(rows.shape)}")
    check_tensor(CACHE_WRITE_OP, "slot_mapping", slot_mapping, ndim=1, dtypes=SLOT_DTYPES, device=kv_cache.device)
    if slot_mapping.shape[0] != rows.shape[0]:
        fail(CACHE_WRITE_OP, "slot_mapping", f"shape [{rows.shape[0]}] (N of rows)", f"shape {list(slot_mapping.shape)}")
    for name, t in (("kv_cache", kv_cache), ("rows", rows)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            fail(CACHE_WRITE_OP, name, "a contiguous last dimension (stride 1)", f"strides {list(t.stride())}")


def mla_cache_write_meta(kv_cache: torch.Tensor, rows: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Validates; the op writes kv_cache in place and returns nothing."""
    check_mla_cache_write_inputs(kv_cache, rows, slot_mapping)


def mla_cache_write_reference(kv_cache: torch.Tensor, rows: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """kv_cache[s // block_size, s % block_size] = rows[i] for s = slot_mapping[i]; a slot outside
    [0, num_blocks * block_size) (e.g. -1, a padded batch row) writes nothing. Slots must be
    distinct. The rows are written as given (no rounding: rows are in the cache's dtype)."""
    mla_cache_write_meta(kv_cache, rows, slot_mapping)
    num_blocks, block_size, _ = kv_cache.shape
    keep = (slot_mapping >= 0) & (slot_mapping < num_blocks * block_size)
    slots = slot_mapping[keep].long()  # a boolean mask: the reference runs eagerly only (opaque op)
    kv_cache[slots // block_size, slots % block_size] = rows[keep]
