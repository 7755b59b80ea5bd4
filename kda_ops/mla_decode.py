"""kda::mla_decode: absorbed MLA decode over a paged latent cache, and the public `mla_decode`;
kda::mla_cache_write: the new tokens' rows into that cache, and the public `mla_cache_write`.

The public op is a `triton_op` so that Inductor sees its Triton kernels (split-KV + combine,
kernels/mla_decode.py) for bf16/fp16/fp32 CUDA tensors. The exact PyTorch reference is the opaque
op kda::mla_decode_reference, which the public op calls for every other input (CPU, fp64).
"""

import torch
from torch import Tensor
from torch.library import custom_op, triton_op, wrap_triton

from .kernels.mla_cache_write import mla_cache_write_triton
from .kernels.mla_decode import mla_decode_triton
from .meta.mla_decode import mla_cache_write_meta, mla_cache_write_reference, mla_decode_meta, mla_decode_reference


@custom_op("kda::mla_decode_reference", mutates_args=())
def _mla_decode_reference(
    q: Tensor, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor, scale: float, v_dim: int
) -> tuple[Tensor, Tensor]:
    return mla_decode_reference(q, kv_cache, block_table, seq_lens, scale, v_dim)


_mla_decode_reference.register_fake(mla_decode_meta)


@triton_op("kda::mla_decode", mutates_args=())
def mla_decode_op(
    q: Tensor, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor, scale: float, v_dim: int
) -> tuple[Tensor, Tensor]:
    """Absorbed paged MLA decode: (o [B, H, v_dim] in q's dtype, lse [B, H] fp32, fp64 for fp64
    inputs). See meta/mla_decode.py for the contract and the math."""
    if q.device.type != "cuda" or q.dtype == torch.float64:
        return torch.ops.kda.mla_decode_reference(q, kv_cache, block_table, seq_lens, scale, v_dim)
    o, lse = mla_decode_meta(q, kv_cache, block_table, seq_lens, scale, v_dim)
    mla_decode_triton(q, kv_cache, block_table, seq_lens, o, lse, scale, v_dim, launch=wrap_triton)
    return o, lse


def mla_decode(
    q: Tensor,
    kv_cache: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    *,
    scale: float,
    v_dim: int = 512,
) -> tuple[Tensor, Tensor]:
    """Multi-head latent attention decode, absorbed form, over a paged latent cache.

    One query token per sequence attends to that sequence's cached tokens; keys are the full
    D_qk-wide cache rows and values their first v_dim columns (docs/mla_decode.md §2):
    s_hj = scale * q[b, h] · kv_j,  o[b, h] = Σ_j softmax(s_h)_j kv_j[:v_dim].
    Token t of sequence b is kv_cache[block_table[b, t // block_size], t % block_size].

    Args:
        q: [B, H, D_qk] bf16/fp16/fp32 (fp64 takes the exact reference path), e.g. D_qk = 576 =
            W_UKᵀ q_nope (512) | q_pe (64), or 512 with no shared key slice. Last dim contiguous.
        kv_cache: [num_blocks, block_size, D_qk] in q's dtype, last dim contiguous.
        block_table: [B, max_blocks] int32 page ids. Entries past a sequence's last page are
            never read and may hold anything (e.g. -1).
        seq_lens: [B] int32 tokens per sequence. Rows past a length are never read. A length of 0
            (a padded batch row) gives o = 0 and lse = -inf; a length above max_blocks *
            block_size counts as that capacity. Neither tensor is read on the host.
        scale: softmax scale, e.g. (qk_nope_head_dim + qk_rope_head_dim) ** -0.5 = 192 ** -0.5
            for Kimi Linear (not D_qk ** -0.5). Keep it constant: a new value recompiles.
        v_dim: the value width, 1 <= v_dim <= D_qk (512 for the 512 + 64 latent cache).

    Returns:
        o [B, H, v_dim] in q's dtype, and lse [B, H], the natural log-sum-exp of the scaled
        scores per (sequence, head), fp32 (fp64 for fp64 inputs), for merging partial attention.
    """
    return mla_decode_op(q, kv_cache, block_table, seq_lens, float(scale), v_dim)


@custom_op("kda::mla_cache_write_reference", mutates_args=("kv_cache",))
def _mla_cache_write_reference(kv_cache: Tensor, rows: Tensor, slot_mapping: Tensor) -> None:
    mla_cache_write_reference(kv_cache, rows, slot_mapping)


_mla_cache_write_reference.register_fake(mla_cache_write_meta)


@triton_op("kda::mla_cache_write", mutates_args=("kv_cache",))
def mla_cache_write_op(kv_cache: Tensor, rows: Tensor, slot_mapping: Tensor) -> None:
    """rows [N, D] into kv_cache [num_blocks, block_size, D] at slot_mapping [N], in place. See
    meta/mla_decode.py for the contract."""
    if kv_cache.device.type != "cuda" or kv_cache.dtype == torch.float64:
        torch.ops.kda.mla_cache_write_reference(kv_cache, rows, slot_mapping)
        return
    mla_cache_write_meta(kv_cache, rows, slot_mapping)
    mla_cache_write_triton(kv_cache, rows, slot_mapping, launch=wrap_triton)


def mla_cache_write(kv_cache: Tensor, rows: Tensor, slot_mapping: Tensor) -> None:
    """Appends tokens to a paged latent cache: kv_cache[s // block_size, s % block_size] = rows[i]
    for s = slot_mapping[i], in place, with the slots read on the device (CUDA-graph safe).

    Args:
        kv_cache: [num_blocks, block_size, D] bf16/fp16/fp32/fp64, last dim contiguous; the cache
            kda::mla_decode reads (D = 576 = RMSNorm(ckv) 512 | k_pe 64 for Kimi Linear).
        rows: [N, D] in kv_cache's dtype, last dim contiguous: the new tokens' cache rows.
        slot_mapping: [N] int32/int64 flat slots page * block_size + offset, e.g.
            block_table[b, t // block_size] * block_size + t % block_size for token t of sequence
            b. A slot outside [0, num_blocks * block_size) (-1 for a padded batch row) writes
            nothing. Valid slots must be distinct.
    """
    mla_cache_write_op(kv_cache, rows, slot_mapping)
