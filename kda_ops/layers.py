"""The attention layers of Kimi Linear: KDA (Kimi Delta Attention) and MLA (NoPE multi-head latent
attention), with parameter names and semantics of the released checkpoint
(docs/kimi_linear_model.md, docs/mla_decode.md).

Each layer runs in one of three modes, chosen by its `batch` argument:
- None: whole sequences [B, T, D] from an empty state (training, scoring); no caches touched.
- PrefillBatch: sequences packed into [1, total, D] with cu_seqlens; each continues from its cache
  slot (KDA state and conv states, MLA latent rows) and leaves its final state there.
- DecodeBatch: one new token per sequence [B, 1, D] against the caches, updated in place.
Cache buffers are attached by `allocate_cache` (non-persistent buffers: fixed addresses for CUDA
graphs, absent from the state dict).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .chunk_kda import chunk_kda
from .config import KimiLinearConfig
from .kda_decode import causal_conv1d, causal_conv1d_update, kda_decode
from .meta.kda_recurrent import accumulation_dtype
from .meta.mla_decode import gather_paged_tokens
from .mla_decode import mla_cache_write, mla_decode


class PrefillBatch(NamedTuple):
    """Sequences packed along dim 1 of a [1, total] batch. All tensors live on the model's device."""

    cu_seqlens: Tensor  # [N + 1] int32, sequence boundaries in the packed batch
    slots: Tensor  # [N] int64, cache slot of each sequence
    token_seq: Tensor  # [total] int64, sequence index (0..N-1) of each packed token
    positions: Tensor  # [total] int64, position of each token in its sequence, cached prefix included
    prefix_lens: Tensor  # [N] int32, tokens each sequence already has in the cache
    block_table: Tensor  # [slots, max_blocks] int32, latent-cache pages of every slot
    attend_to_cache: bool  # MLA also attends to the cached prefix (False: every prefix is empty)


class DecodeBatch(NamedTuple):
    slots: Tensor  # [B] int64, cache slot of each row
    positions: Tensor  # [B] int64, position of the new token (= tokens already cached)
    block_table: Tensor  # [slots, max_blocks] int32


class RMSNorm(nn.Module):
    """weight * x / sqrt(mean(x^2) + eps), computed in fp32 (fp64 for fp64 inputs)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        acc = accumulation_dtype(x.dtype)
        xf = x.to(acc)
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.to(acc)).to(x.dtype)


class ShortConvolution(nn.Module):
    """Depthwise causal convolution without bias followed by SiLU; weight [D, 1, W] as stored in the
    checkpoint (`q_conv1d.weight`)."""

    def __init__(self, channels: int, width: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, width, dtype=dtype))

    def forward(
        self, x: Tensor, initial_state: Tensor | None = None, cu_seqlens: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(y [B, T, D], final conv state [N, D, W-1])."""
        return causal_conv1d(x, self.weight.squeeze(1), initial_state, cu_seqlens)

    def step(self, x: Tensor, conv_state: Tensor, slots: Tensor) -> Tensor:
        return causal_conv1d_update(x, conv_state, self.weight.squeeze(1), state_indices=slots)


def _linear(in_features: int, out_features: int, dtype: torch.dtype | None) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=False, dtype=dtype)


class KimiDeltaAttention(nn.Module):
    def __init__(self, config: KimiLinearConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        D, H, K = config.hidden_size, config.kda_num_heads, config.kda_head_dim
        P, W = H * K, config.short_conv_kernel_size
        self.num_heads, self.head_dim, self.eps = H, K, config.rms_norm_eps
        self.scale = K**-0.5
        self.gate_lower_bound = config.kda_gate_lower_bound
        self.q_proj, self.k_proj, self.v_proj = (_linear(D, P, dtype) for _ in range(3))
        self.q_conv1d, self.k_conv1d, self.v_conv1d = (ShortConvolution(P, W, dtype) for _ in range(3))
        self.f_a_proj, self.f_b_proj = _linear(D, K, dtype), _linear(K, P, dtype)
        self.dt_bias = nn.Parameter(torch.zeros(P, dtype=torch.float32))
        self.A_log = nn.Parameter(torch.zeros(1, 1, H, 1, dtype=torch.float32))
        self.b_proj = _linear(D, H, dtype)
        self.g_a_proj, self.g_b_proj = _linear(D, K, dtype), _linear(K, P, dtype)
        self.o_norm = RMSNorm(K, config.rms_norm_eps, dtype)
        self.o_proj = _linear(P, D, dtype)

    def allocate_cache(self, num_slots: int, dtype: torch.dtype, device: torch.device) -> None:
        """State pools, one slot per sequence: the recurrent state [S, H, K, V] in fp32 (fp64 for an
        fp64 model) and the three conv states [S, H*K, W-1] in the model's dtype."""
        H, K, P = self.num_heads, self.head_dim, self.num_heads * self.head_dim
        W = self.q_conv1d.weight.shape[-1]
        acc = accumulation_dtype(dtype)
        self.register_buffer("recurrent_state", torch.zeros(num_slots, H, K, K, dtype=acc, device=device), persistent=False)
        for name in ("q_conv_state", "k_conv_state", "v_conv_state"):
            self.register_buffer(name, torch.zeros(num_slots, P, W - 1, dtype=dtype, device=device), persistent=False)

    def reset_cache(self, slots: Tensor) -> None:
        for pool in (self.recurrent_state, self.q_conv_state, self.k_conv_state, self.v_conv_state):
            pool.index_fill_(0, slots, 0)

    def _gate(self, x: Tensor) -> tuple[Tensor, dict]:
        """The gate as chunk_kda and kda_decode take it: the pre-activation z = f_b(f_a(x))
        [B, T, H, K] and A_log, dt_bias (and the config's bound), from which the ops compute
        g = -exp(A_log) * softplus(z + dt_bias), or L * sigmoid(exp(A_log) * (z + dt_bias)), in
        their kernels (faster than the same operations in torch before them, even fused by
        Inductor: bench/NOTES.md, bench_kda_decode_gate.py)."""
        B, T, _ = x.shape
        acc = accumulation_dtype(x.dtype)
        z = self.f_b_proj(self.f_a_proj(x)).view(B, T, self.num_heads, self.head_dim)
        return z, dict(
            A_log=self.A_log.to(acc).view(-1), dt_bias=self.dt_bias.to(acc), gate_lower_bound=self.gate_lower_bound
        )

    def _beta(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.b_proj(x).to(accumulation_dtype(x.dtype)))

    def _output(self, x: Tensor, o: Tensor) -> Tensor:
        """Per-head RMSNorm of o [B, T, H, V] times sigmoid(g_b(g_a(x))), in fp32, then o_proj."""
        B, T, _ = x.shape
        acc = accumulation_dtype(x.dtype)
        of = o.to(acc)
        of = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + self.eps) * self.o_norm.weight.to(acc)
        gate = torch.sigmoid(self.g_b_proj(self.g_a_proj(x)).to(acc)).view(B, T, self.num_heads, self.head_dim)
        return self.o_proj((of * gate).to(x.dtype).reshape(B, T, -1))

    def forward(self, x: Tensor, batch: PrefillBatch | DecodeBatch | None = None) -> Tensor:
        if isinstance(batch, DecodeBatch):
            return self._decode(x, batch)
        B, T, _ = x.shape
        shape = (B, T, self.num_heads, self.head_dim)
        cu_seqlens = None if batch is None else batch.cu_seqlens
        convs = ((self.q_proj, self.q_conv1d), (self.k_proj, self.k_conv1d), (self.v_proj, self.v_conv1d))
        pools = (None, None, None) if batch is None else (self.q_conv_state, self.k_conv_state, self.v_conv_state)
        qkv = []
        for (proj, conv), pool in zip(convs, pools):
            initial = None if pool is None else pool.index_select(0, batch.slots)
            y, final = conv(proj(x), initial, cu_seqlens)
            if pool is not None:
                pool.index_copy_(0, batch.slots, final)
            qkv.append(y.view(shape))
        g, gate = self._gate(x)
        initial_state = None if batch is None else self.recurrent_state.index_select(0, batch.slots)
        o, final_state = chunk_kda(
            *qkv,
            g,
            self._beta(x),
            scale=self.scale,
            initial_state=initial_state,
            output_final_state=batch is not None,
            use_qk_l2norm=True,
            cu_seqlens=cu_seqlens,
            **gate,
        )
        if batch is not None:
            self.recurrent_state.index_copy_(0, batch.slots, final_state)
        return self._output(x, o)

    def _decode(self, x: Tensor, batch: DecodeBatch) -> Tensor:
        B, T, _ = x.shape
        shape = (B, T, self.num_heads, self.head_dim)
        q = self.q_conv1d.step(self.q_proj(x), self.q_conv_state, batch.slots).view(shape)
        k = self.k_conv1d.step(self.k_proj(x), self.k_conv_state, batch.slots).view(shape)
        v = self.v_conv1d.step(self.v_proj(x), self.v_conv_state, batch.slots).view(shape)
        g, gate = self._gate(x)
        o = kda_decode(
            q, k, v, g, self._beta(x), self.recurrent_state, state_indices=batch.slots, scale=self.scale,
            use_qk_l2norm=True, **gate,
        )
        return self._output(x, o)


class MultiHeadLatentAttention(nn.Module):
    """NoPE MLA. Prefill: causal scaled-dot-product attention over keys/values decompressed by
    kv_b_proj. Decode: absorbed into kda::mla_decode over the paged latent cache, whose rows are
    [RMSNorm(ckv) (kv_lora_rank) | k_pe (qk_rope_head_dim)]."""

    def __init__(self, config: KimiLinearConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        D, H = config.hidden_size, config.num_attention_heads
        self.num_heads = H
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.latent_dim = config.kv_lora_rank
        self.scale = config.mla_qk_head_dim**-0.5
        self.q_proj = _linear(D, H * config.mla_qk_head_dim, dtype)
        self.kv_a_proj_with_mqa = _linear(D, config.mla_cache_dim, dtype)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, config.mla_kv_norm_eps, dtype)
        self.kv_b_proj = _linear(config.kv_lora_rank, H * (self.nope_dim + self.v_dim), dtype)
        self.o_proj = _linear(H * self.v_dim, D, dtype)

    def allocate_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device) -> None:
        cache = torch.zeros(num_blocks, block_size, self.latent_dim + self.rope_dim, dtype=dtype, device=device)
        self.register_buffer("latent_cache", cache, persistent=False)

    def _latent_rows(self, x: Tensor) -> Tensor:
        """[..., latent + rope] cache rows of the tokens x: [RMSNorm(ckv) | k_pe]."""
        ckv, kpe = self.kv_a_proj_with_mqa(x).split([self.latent_dim, self.rope_dim], dim=-1)
        return torch.cat([self.kv_a_layernorm(ckv), kpe], dim=-1)

    def _attend(self, q: Tensor, rows: Tensor, mask: Tensor | None) -> Tensor:
        """q [B, T, H, nope+rope] over keys/values decompressed from rows [B, L, latent+rope];
        causal when mask is None, else the boolean mask [T, L] (True = attend). Returns [B, T, D]."""
        B, T = q.shape[:2]
        L = rows.shape[1]
        ckv, kpe = rows.split([self.latent_dim, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(ckv).view(B, L, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, kpe[:, :, None, :].expand(B, L, self.num_heads, self.rope_dim)], dim=-1)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scale,
        )
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.num_heads * self.v_dim))

    def _write_rows(self, rows: Tensor, slots: Tensor, positions: Tensor, block_table: Tensor) -> None:
        """latent_cache[page of (slot, position), position % block_size] = row, for each row [n, C],
        through kda::mla_cache_write (slots computed on the device)."""
        block_size = self.latent_cache.shape[1]
        pages = block_table[slots, positions // block_size].long()
        slot_mapping = pages * block_size + positions % block_size
        mla_cache_write(self.latent_cache, rows.to(self.latent_cache.dtype).contiguous(), slot_mapping)

    def forward(self, x: Tensor, batch: PrefillBatch | DecodeBatch | None = None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.nope_dim + self.rope_dim)
        rows = self._latent_rows(x)
        if batch is None:
            return self._attend(q, rows, None)
        if isinstance(batch, DecodeBatch):
            return self._decode(q, rows, batch)
        return self._prefill(q, rows, batch)

    def _prefill(self, q: Tensor, rows: Tensor, batch: PrefillBatch) -> Tensor:
        """Packed sequences [1, total]: each token attends causally to its own sequence, and with
        attend_to_cache also to the sequence's cached prefix; the new rows enter the cache."""
        key_rows, key_seq, key_pos = rows, batch.token_seq, batch.positions
        key_valid = torch.ones_like(batch.token_seq, dtype=torch.bool)
        if batch.attend_to_cache:
            tables = batch.block_table.index_select(0, batch.slots)
            prefix, prefix_valid = gather_paged_tokens(self.latent_cache, tables, batch.prefix_lens)  # [N, L, C]
            N, L = prefix_valid.shape
            prefix_seq = torch.arange(N, device=q.device).repeat_interleave(L)
            prefix_pos = torch.arange(L, device=q.device).repeat(N)
            key_rows = torch.cat([prefix.reshape(1, N * L, -1).to(rows.dtype), rows], dim=1)
            key_seq = torch.cat([prefix_seq, key_seq])
            key_pos = torch.cat([prefix_pos, key_pos])
            key_valid = torch.cat([prefix_valid.reshape(-1), key_valid])
        mask = (
            (key_seq[None, :] == batch.token_seq[:, None])
            & (key_pos[None, :] <= batch.positions[:, None])
            & key_valid[None, :]
        )
        out = self._attend(q, key_rows, mask)
        self._write_rows(rows[0], batch.slots[batch.token_seq], batch.positions, batch.block_table)
        return out

    def _absorbed_weights(self) -> tuple[Tensor, Tensor]:
        """(W_UK [H, nope, latent], W_UV [H, v, latent]) from kv_b_proj (per head: nope rows of W_UK,
        then v rows of W_UV)."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.latent_dim)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def _decode(self, q: Tensor, rows: Tensor, batch: DecodeBatch) -> Tensor:
        B = q.shape[0]
        w_uk, w_uv = self._absorbed_weights()
        q_nope, q_pe = q[:, 0].split([self.nope_dim, self.rope_dim], dim=-1)  # [B, H, *]
        q_absorbed = torch.cat([torch.einsum("bhn,hnc->bhc", q_nope, w_uk), q_pe], dim=-1)
        self._write_rows(rows[:, 0], batch.slots, batch.positions, batch.block_table)
        o_latent, _ = mla_decode(
            q_absorbed.to(self.latent_cache.dtype).contiguous(),
            self.latent_cache,
            batch.block_table.index_select(0, batch.slots),
            (batch.positions + 1).to(torch.int32),
            scale=self.scale,
            v_dim=self.latent_dim,
        )
        o = torch.einsum("bhc,hvc->bhv", o_latent.to(q.dtype), w_uv)
        return self.o_proj(o.reshape(B, 1, self.num_heads * self.v_dim))
