"""Feed-forward blocks of Kimi Linear: the dense SwiGLU MLP (first layers, shared expert) and the
sigmoid-routed mixture of experts (docs/kimi_linear_model.md, "MoE").

Experts are stored stacked ([E, I, D] for w1/w3, [E, D, I] for w2) so the hot path is a handful of
batched kernels, never a Python loop over experts; the state dict still uses the checkpoint's
per-expert names `experts.{j}.w1.weight` (w1 = gate, w3 = up, w2 = down) through state-dict hooks.

Two static-shape computations, no host synchronisation in either:
- "dense": every expert on every token, combined with the routing weights scattered to [N, E].
  E / top_k times the FLOPs of the routed work, but a few large batched matmuls; it wins when
  tokens are few (decode) or experts few (the micro/small configs), and it runs anywhere
  (CPU, fp64, autograd).
- "grouped": (token, expert) pairs sorted by expert and run through torch.nn.functional.grouped_mm
  with device-side offsets: only the routed FLOPs. For prefill of large configs on CUDA in bf16,
  the only place grouped_mm has fast kernels.
`MoE.mode = "auto"` picks grouped for CUDA bf16 inputs with more than `grouped_min_tokens`
tokens and dense otherwise (the token count is a static shape, so the choice never syncs).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import KimiLinearConfig

EXPERT_WEIGHTS = ("w1", "w2", "w3")
# Public from torch 2.10 on; the private name has the same signature in earlier releases.
grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class MLP(nn.Module):
    """down_proj(SiLU(gate_proj x) * up_proj x)."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """`gate.weight` [E, D] and `gate.e_score_correction_bias` [E] (fp32, frozen)."""

    def __init__(self, config: KimiLinearConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        E = config.num_experts
        self.top_k = config.num_experts_per_token
        self.renormalize = config.moe_renormalize
        self.scaling = config.routed_scaling_factor
        self.groups = config.num_expert_group if config.use_grouped_topk else 1
        self.top_groups = config.topk_group if config.use_grouped_topk else 1
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size, dtype=dtype))
        # Used only to choose experts (no gradient reaches it): adjusted by load balancing, not by SGD.
        self.e_score_correction_bias = nn.Parameter(torch.zeros(E, dtype=torch.float32), requires_grad=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [N, D] -> (experts [N, top_k] int64, weights [N, top_k] fp32 (fp64 for fp64 x)).

        Experts are chosen by sigmoid(logits) + correction bias (within the best groups when the
        experts are grouped); weights are the unbiased scores of the chosen experts, renormalised
        to sum to one, times routed_scaling_factor."""
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        scores = torch.sigmoid(F.linear(x.to(acc), self.weight.to(acc)))
        biased = scores + self.e_score_correction_bias.to(acc)
        if self.groups > 1:
            N, E = biased.shape
            grouped = biased.view(N, self.groups, E // self.groups)
            group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [N, groups]
            best = group_score.topk(self.top_groups, dim=-1).indices
            keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)
            biased = grouped.masked_fill(~keep[..., None], float("-inf")).view(N, E)
        experts = biased.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, experts)
        if self.renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return experts, weights * self.scaling


class StackedExperts(nn.Module):
    """E SwiGLU experts stored as w1, w3 [E, I, D] and w2 [E, D, I]."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, intermediate, hidden, dtype=dtype))
        self.w3 = nn.Parameter(torch.empty(num_experts, intermediate, hidden, dtype=dtype))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, intermediate, dtype=dtype))
        self.register_state_dict_post_hook(_experts_to_checkpoint_names)
        self.register_load_state_dict_pre_hook(_experts_from_checkpoint_names)

    def dense(self, x: Tensor, experts: Tensor, weights: Tensor) -> Tensor:
        """Σ_e w[n, e] expert_e(x_n), every expert on every token. x [N, D]."""
        N = x.shape[0]
        combine = torch.zeros(N, self.num_experts, dtype=weights.dtype, device=x.device)
        combine = combine.scatter(1, experts, weights)  # [N, E]
        gate = torch.einsum("nd,eid->eni", x, self.w1)
        up = torch.einsum("nd,eid->eni", x, self.w3)
        out = torch.einsum("eni,edi->end", F.silu(gate) * up, self.w2)  # [E, N, D]
        return torch.einsum("end,ne->nd", out.to(weights.dtype), combine).to(x.dtype)

    def grouped(self, x: Tensor, experts: Tensor, weights: Tensor) -> Tensor:
        """Only the routed work: pairs sorted by expert through grouped_mm, offsets on the device."""
        N, top_k = experts.shape
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)
        tokens = order // top_k
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        offsets = counts.cumsum(0, dtype=torch.int32)
        xs = x.index_select(0, tokens)
        gate = grouped_mm(xs, self.w1.transpose(1, 2), offs=offsets)
        up = grouped_mm(xs, self.w3.transpose(1, 2), offs=offsets)
        out = grouped_mm(F.silu(gate) * up, self.w2.transpose(1, 2), offs=offsets)  # [N * top_k, D]
        pair_weights = weights.reshape(-1).index_select(0, order)
        combined = torch.zeros(N, x.shape[1], dtype=weights.dtype, device=x.device)
        combined.index_add_(0, tokens, out.to(weights.dtype) * pair_weights[:, None])
        return combined.to(x.dtype)


def _experts_to_checkpoint_names(module: StackedExperts, state_dict: dict, prefix: str, local_metadata) -> None:
    for name in EXPERT_WEIGHTS:
        stacked = state_dict.pop(prefix + name)
        for j in range(module.num_experts):
            state_dict[f"{prefix}{j}.{name}.weight"] = stacked[j]


def _experts_from_checkpoint_names(
    module: StackedExperts, state_dict: dict, prefix: str, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
) -> None:
    """Stacks experts.{j}.wN.weight into experts.wN when every expert's tensor is present; otherwise
    leaves the keys alone so load_state_dict reports them as unexpected and experts.wN as missing."""
    for name in EXPERT_WEIGHTS:
        keys = [f"{prefix}{j}.{name}.weight" for j in range(module.num_experts)]
        if all(key in state_dict for key in keys):
            state_dict[prefix + name] = torch.stack([state_dict.pop(key) for key in keys])


class MoE(nn.Module):
    """`block_sparse_moe`: router `gate`, routed `experts`, and `shared_experts`."""

    def __init__(self, config: KimiLinearConfig, dtype: torch.dtype | None = None, mode: str = "auto") -> None:
        super().__init__()
        if mode not in ("auto", "dense", "grouped"):
            raise ValueError(f"MoE mode must be 'auto', 'dense' or 'grouped', got {mode!r}")
        if mode == "grouped" and grouped_mm is None:
            raise ValueError("MoE mode 'grouped' needs torch.nn.functional.grouped_mm (torch >= 2.8)")
        self.mode = mode
        self.grouped_min_tokens = 64
        self.gate = Router(config, dtype)
        self.experts = StackedExperts(config.num_experts, config.hidden_size, config.moe_intermediate_size, dtype)
        self.shared_experts = MLP(
            config.hidden_size, config.moe_intermediate_size * config.num_shared_experts, dtype
        ) if config.num_shared_experts > 0 else None

    def _use_grouped(self, x: Tensor) -> bool:
        if self.mode != "auto":
            return self.mode == "grouped"
        return grouped_mm is not None and x.is_cuda and x.dtype == torch.bfloat16 and x.shape[0] > self.grouped_min_tokens

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        experts, weights = self.gate(flat)
        if self._use_grouped(flat):
            out = self.experts.grouped(flat, experts, weights)
        else:
            out = self.experts.dense(flat, experts, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape)
