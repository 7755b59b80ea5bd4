"""The models trained on the synthetic tasks: small Kimi-Linear stacks (kda_ops' model, every layer
with a dense MLP, no MoE) with the per-channel KDA gate, or with a per-head scalar gate (the gated
delta net special case, run through the same chunk_kda op by broadcasting the head's gate over its
K channels).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import KimiLinearConfig
from ..layers import KimiDeltaAttention
from ..meta.kda_recurrent import accumulation_dtype
from ..model import KimiLinearForCausalLM

LAYER_KINDS = ("kda", "mla")
GATE_KINDS = ("channel", "head")


def synthetic_config(
    vocab_size: int,
    layers: tuple[str, ...] = ("kda", "kda"),
    num_heads: int = 2,
    head_dim: int = 128,
) -> KimiLinearConfig:
    """A Kimi-Linear config of len(layers) layers ("kda" or "mla" each), num_heads heads of
    head_dim in both attention kinds, hidden size num_heads * head_dim, a dense SwiGLU MLP of 4x the
    hidden size in every layer, and MLA with a latent of 4 * head_dim and a shared key of
    head_dim / 2 (512 and 64 at head_dim 128, as in the released model)."""
    unknown = sorted(set(layers) - set(LAYER_KINDS))
    if unknown:
        raise ValueError(f"synthetic_config: layer kinds must be among {LAYER_KINDS}, got {unknown}")
    hidden = num_heads * head_dim
    return KimiLinearConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        full_attn_layers=[i for i, kind in enumerate(layers) if kind == "mla"],
        kda_num_heads=num_heads,
        kda_head_dim=head_dim,
        num_attention_heads=num_heads,
        kv_lora_rank=4 * head_dim,
        qk_nope_head_dim=head_dim,
        qk_rope_head_dim=head_dim // 2,
        v_head_dim=head_dim,
        intermediate_size=4 * hidden,
        first_k_dense_replace=len(layers),  # every layer dense: no MoE
        model_max_length=1 << 20,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


class ScalarGateDeltaAttention(KimiDeltaAttention):
    """KDA with one decay per head and token (gated delta net):
    g[b, t, h, :] = -exp(A_log[h]) * softplus(f_b(f_a(x))[b, t, h] + dt_bias[h]), the same value on
    all K channels. Everything else is KimiDeltaAttention's."""

    def __init__(self, config: KimiLinearConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__(config, dtype)
        H, K = config.kda_num_heads, config.kda_head_dim
        self.f_b_proj = nn.Linear(K, H, bias=False, dtype=dtype)
        self.dt_bias = nn.Parameter(torch.zeros(H, dtype=torch.float32))

    def _gate(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The log-decay g itself (the ops' in-kernel gate is per channel), and no gate parameters."""
        B, T, _ = x.shape
        acc = accumulation_dtype(x.dtype)
        f = self.f_b_proj(self.f_a_proj(x)).to(acc) + self.dt_bias.to(acc)
        g = -self.A_log.to(acc).exp() * F.softplus(f.view(B, T, self.num_heads, 1))
        return g.expand(B, T, self.num_heads, self.head_dim), {}


def synthetic_model(config: KimiLinearConfig, gate: str = "channel", seed: int = 0) -> KimiLinearForCausalLM:
    """An fp32 model with initialised weights (KimiLinearForCausalLM.init_weights(seed)); gate
    "channel" keeps KDA's per-channel decay, "head" swaps every KDA layer for ScalarGateDeltaAttention."""
    if gate not in GATE_KINDS:
        raise ValueError(f"synthetic_model: gate must be one of {GATE_KINDS}, got {gate!r}")
    model = KimiLinearForCausalLM(config, dtype=torch.float32)
    if gate == "head":
        for layer in model.model.layers:
            if layer.is_kda:
                layer.self_attn = ScalarGateDeltaAttention(config, torch.float32)
    return model.init_weights(seed)
