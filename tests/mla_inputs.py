"""Random paged latent caches for the MLA decode tests, with every row and block-table entry that
no sequence owns poisoned, so a kernel or reference that reads one shows it."""

from dataclasses import dataclass

import torch

BAD_PAGE_IDS = (10**6, -1)  # written alternately into the unused block-table entries


@dataclass
class PagedCache:
    kv_cache: torch.Tensor  # [num_blocks, block_size, D_qk], NaN wherever no sequence owns the row
    block_table: torch.Tensor  # [B, max_blocks] int32, out-of-range ids past each sequence's pages
    seq_lens: torch.Tensor  # [B] int32
    owned: torch.Tensor  # [num_blocks, block_size] bool: the row holds a token of some sequence
    used: torch.Tensor  # [B, max_blocks] bool: the entry names a page of its sequence
    tokens: list[torch.Tensor]  # per sequence, its rows in token order, [L_b, D_qk]


def paged_cache(
    lens: list[int],
    block_size: int,
    d_qk: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    num_blocks: int | None = None,
    max_blocks: int | None = None,
    generator: torch.Generator | None = None,
) -> PagedCache:
    """Sequences of the given lengths on randomly permuted pages of a random N(0, 1) cache.
    Defaults: two spare pages beyond those used, and one spare block-table entry per row."""
    pages_per_seq = [-(-n // block_size) for n in lens]
    used_pages = sum(pages_per_seq)
    num_blocks = used_pages + 2 if num_blocks is None else num_blocks
    max_blocks = max(pages_per_seq, default=0) + 1 if max_blocks is None else max_blocks
    assert num_blocks >= used_pages and max_blocks >= max(pages_per_seq, default=0)

    kv_cache = torch.randn(num_blocks, block_size, d_qk, generator=generator, dtype=torch.float64).to(dtype)
    perm = torch.randperm(num_blocks, generator=generator)[:used_pages].tolist()
    block_table = torch.empty(len(lens), max_blocks, dtype=torch.int32)
    owned = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    used = torch.zeros(len(lens), max_blocks, dtype=torch.bool)
    tokens = []
    for b, (n, n_pages) in enumerate(zip(lens, pages_per_seq)):
        pages, perm = perm[:n_pages], perm[n_pages:]
        block_table[b, :n_pages] = torch.tensor(pages, dtype=torch.int32)
        for j in range(n_pages, max_blocks):
            block_table[b, j] = BAD_PAGE_IDS[(b + j) % 2]
        used[b, :n_pages] = True
        for j, page in enumerate(pages):
            owned[page, : min(block_size, n - j * block_size)] = True
        tokens.append(kv_cache[pages].reshape(-1, d_qk)[:n].to(device))
    kv_cache[~owned] = float("nan")
    return PagedCache(
        kv_cache=kv_cache.to(device),
        block_table=block_table.to(device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        owned=owned.to(device),
        used=used.to(device),
        tokens=tokens,
    )
