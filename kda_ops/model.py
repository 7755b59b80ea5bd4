"""KimiLinearForCausalLM: the Kimi-Linear hybrid model (KDA + NoPE MLA, MoE) on kda-ops, with the
released checkpoint's parameter names, static decode caches, varlen prefill and a decode step.

Cache layout (allocated once by `allocate_caches(max_batch, max_len)`, non-persistent buffers):
- per KDA layer: recurrent-state pool [max_batch, H, K, V] fp32 and q/k/v conv-state pools
  [max_batch, H*K, W-1] (slot s belongs to batch row s);
- per MLA layer: paged latent cache [max_batch * pages_per_seq, block_size, latent + rope];
- model: `block_table` [max_batch, pages_per_seq] int32 (slot s owns pages
  s*pages_per_seq ... (s+1)*pages_per_seq-1) and `seq_lens` [max_batch] int32, tokens cached per slot.
`prefill` and `decode_step` read and advance them in place, without reading any on the host.
"""

import math

import torch
from torch import Tensor, nn

from .checkpoint import load_pretrained, save_pretrained
from .config import KimiLinearConfig
from .generation import generate
from .layers import DecodeBatch, KimiDeltaAttention, MultiHeadLatentAttention, PrefillBatch, RMSNorm
from .moe import MLP, MoE


class DecoderLayer(nn.Module):
    def __init__(self, config: KimiLinearConfig, layer: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.is_kda = config.is_kda_layer(layer)
        attention = KimiDeltaAttention if self.is_kda else MultiHeadLatentAttention
        self.self_attn = attention(config, dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        if config.is_moe_layer(layer):
            self.block_sparse_moe = MoE(config, dtype)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, dtype)

    def feed_forward(self) -> nn.Module:
        return self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp

    def forward(self, h: Tensor, batch: PrefillBatch | DecodeBatch | None = None) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), batch)
        return h + self.feed_forward()(self.post_attention_layernorm(h))


class KimiLinearModel(nn.Module):
    def __init__(self, config: KimiLinearConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, i, dtype) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, input_ids: Tensor, batch: PrefillBatch | DecodeBatch | None = None) -> Tensor:
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, batch)
        return self.norm(h)


class KimiLinearForCausalLM(nn.Module):
    def __init__(self, config: KimiLinearConfig, dtype: torch.dtype | None = None) -> None:
        """Parameters in `dtype` (default: torch's default dtype), except A_log, dt_bias and the
        router's e_score_correction_bias, which stay fp32 as in the checkpoint. Weights are
        uninitialised until `init_weights` or a checkpoint load."""
        super().__init__()
        self.config = config
        self.model = KimiLinearModel(config, dtype)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids [B, T] -> logits [B, T, vocab]; whole sequences from an empty state, no caches.
        Differentiable."""
        return self.lm_head(self.model(input_ids))

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device=None) -> "KimiLinearForCausalLM":
        """Loads config.json + safetensors weights (see kda_ops.checkpoint); raises CheckpointError
        naming any missing, unexpected or wrongly shaped tensor, before any weight is read."""
        return load_pretrained(cls, path, dtype, device)

    def save_pretrained(self, path, max_shard_bytes: int | None = None) -> None:
        """Writes config.json and model.safetensors (or shards with an index)."""
        save_pretrained(self, path, max_shard_bytes)

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_weights(self, seed: int = 0, generator_device: str | torch.device = "cpu") -> "KimiLinearForCausalLM":
        """Random weights: normal(0, initializer_range) matrices, unit norms, decay rates A in
        [1, 16], dt in [1e-3, 0.1] (dt_bias = softplus^-1(dt)), zero router bias. Deterministic
        for a seed; drawn on generator_device: on the CPU (default) the same values whatever the
        model's device, on the model's GPU the only fast way for billions of parameters."""
        generator = torch.Generator(generator_device).manual_seed(seed)
        device = generator.device
        std = self.config.initializer_range

        def fill(p: Tensor, values: Tensor) -> None:
            p.copy_(values.to(p.dtype))

        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                fill(p, torch.ones(p.shape, device=device))
            elif leaf == "A_log":
                fill(p, torch.empty(p.shape, device=device).uniform_(1, 16, generator=generator).log())
            elif leaf == "dt_bias":
                dt = torch.empty(p.shape, device=device).uniform_(math.log(1e-3), math.log(0.1), generator=generator).exp()
                fill(p, dt + torch.log(-torch.expm1(-dt)))
            elif leaf == "e_score_correction_bias":
                fill(p, torch.zeros(p.shape, device=device))
            elif "conv1d" in name:
                bound = 1 / math.sqrt(p.shape[-1])
                fill(p, torch.empty(p.shape, device=device).uniform_(-bound, bound, generator=generator))
            else:
                fill(p, torch.empty(p.shape, device=device).normal_(0, std, generator=generator))
        return self

    # ------------------------------------------------------------------ caches
    def kda_layers(self) -> list[KimiDeltaAttention]:
        return [layer.self_attn for layer in self.model.layers if layer.is_kda]

    def mla_layers(self) -> list[MultiHeadLatentAttention]:
        return [layer.self_attn for layer in self.model.layers if not layer.is_kda]

    @property
    def cache_shape(self) -> tuple[int, int] | None:
        """(max_batch, max_len) of the allocated caches, or None."""
        if not hasattr(self, "seq_lens"):
            return None
        return self.seq_lens.shape[0], self.block_table.shape[1] * self.block_size

    def allocate_caches(self, max_batch: int, max_len: int, block_size: int = 64) -> None:
        """Static decode caches for up to max_batch sequences of up to max_len tokens each, on the
        model's device in its dtype. Replaces any earlier caches (their contents are lost)."""
        device, dtype = self.device, self.dtype
        pages_per_seq = -(-max_len // block_size)
        self.block_size = block_size
        for attn in self.kda_layers():
            attn.allocate_cache(max_batch, dtype, device)
        for attn in self.mla_layers():
            attn.allocate_cache(max_batch * pages_per_seq, block_size, dtype, device)
        table = torch.arange(max_batch * pages_per_seq, dtype=torch.int32, device=device).view(max_batch, pages_per_seq)
        self.register_buffer("block_table", table, persistent=False)
        self.register_buffer("seq_lens", torch.zeros(max_batch, dtype=torch.int32, device=device), persistent=False)

    @torch.no_grad()
    def reset_sequences(self, slots: Tensor) -> None:
        """Empties the cache slots (zero states, zero length) so new sequences can start there."""
        for attn in self.kda_layers():
            attn.reset_cache(slots)
        self.seq_lens.index_fill_(0, slots, 0)

    # ------------------------------------------------------------------ inference with caches
    def prefill(
        self,
        input_ids: Tensor,
        cu_seqlens: Tensor,
        slots: Tensor,
        *,
        attend_to_cache: bool = False,
        all_logits: bool = False,
    ) -> Tensor:
        """Runs N sequences packed into input_ids [total] (boundaries cu_seqlens [N+1] int32) through
        the model, each continuing from cache slot slots[n] and leaving its states there.

        attend_to_cache: the slots may already hold tokens (a prefill continued after earlier
        prefill/decode steps); MLA then also attends to those. Leave False when every slot was just
        reset: MLA attention then covers the new tokens only.
        Returns the logits of each sequence's last token [N, vocab], or of every token [total,
        vocab] with all_logits."""
        total = input_ids.shape[0]
        device = input_ids.device
        cu = cu_seqlens.long()
        # Sequence of each token as a comparison count: Inductor (torch 2.11) cannot lower
        # searchsorted over a slice such as cu[1:].
        token_seq = (torch.arange(total, device=device)[:, None] >= cu[None, 1:]).sum(1)
        prefix_lens = self.seq_lens.index_select(0, slots)
        positions = prefix_lens.long()[token_seq] + torch.arange(total, device=device) - cu[token_seq]
        batch = PrefillBatch(
            cu_seqlens=cu_seqlens,
            slots=slots,
            token_seq=token_seq,
            positions=positions,
            prefix_lens=prefix_lens,
            block_table=self.block_table,
            attend_to_cache=attend_to_cache,
        )
        h = self.model(input_ids[None], batch)[0]
        self.seq_lens.index_copy_(0, slots, prefix_lens + (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int32))
        if not all_logits:
            h = h.index_select(0, cu[1:] - 1)
        return self.lm_head(h)

    def decode_step(self, tokens: Tensor, slots: Tensor) -> Tensor:
        """One new token per sequence: tokens [B] for cache slots slots [B] -> logits [B, vocab].
        Advances every cache in place; no host synchronisation (CUDA-graph safe)."""
        positions = self.seq_lens.index_select(0, slots)
        batch = DecodeBatch(slots=slots, positions=positions.long(), block_table=self.block_table)
        h = self.model(tokens[:, None], batch)[:, 0]
        self.seq_lens.index_copy_(0, slots, positions + 1)
        return self.lm_head(h)

    def generate(self, prompts, max_new_tokens: int, **options) -> list[list[int]]:
        """New tokens for each prompt; options as kda_ops.generation.generate."""
        return generate(self, prompts, max_new_tokens, **options)
