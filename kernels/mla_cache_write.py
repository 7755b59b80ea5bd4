"""Triton kernel of kda::mla_cache_write: copies new tokens' [ckv | kpe] rows into their slots of
the paged latent cache, in place. Contract and reference: kda_ops.meta.mla_decode.

Grid (N,), one row per program: the slot is loaded on the device (no host read), so one CUDA
graph serves every step; a slot outside the cache (-1 for a padded batch row) stores nothing.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def mla_cache_write_kernel(
    kv_cache,
    rows,
    slot_mapping,
    num_slots,
    stride_kv_block,
    stride_kv_row,
    stride_rows,
    stride_slot,
    D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    i_slot = tl.load(slot_mapping + i_n * stride_slot).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    m_d = (o_d < D) & (i_slot >= 0) & (i_slot < num_slots)  # [BLOCK_D]; all off for a skipped slot
    b_row = tl.load(rows + i_n * stride_rows + o_d, mask=m_d)  # [BLOCK_D]
    p_kv = kv_cache + (i_slot // PAGE_SIZE) * stride_kv_block + (i_slot % PAGE_SIZE) * stride_kv_row
    tl.store(p_kv + o_d, b_row, mask=m_d)


def _launch_directly(kernel):
    return kernel


def mla_cache_write_triton(kv_cache: torch.Tensor, rows: torch.Tensor, slot_mapping: torch.Tensor, *, launch=_launch_directly) -> None:
    """kv_cache [num_blocks, block_size, D] <- rows [N, D] at slot_mapping [N] (int32/int64);
    inputs are assumed to satisfy the op contract. `launch` wraps the kernel (wrap_triton)."""
    num_blocks, page_size, D = kv_cache.shape
    launch(mla_cache_write_kernel)[(rows.shape[0],)](
        kv_cache,
        rows,
        slot_mapping,
        num_blocks * page_size,
        kv_cache.stride(0),
        kv_cache.stride(1),
        rows.stride(0),
        slot_mapping.stride(0),
        D=D,
        PAGE_SIZE=int(page_size),
        BLOCK_D=triton.next_power_of_2(D),
        num_warps=4,
    )
