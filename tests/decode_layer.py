"""A decode-time KDA layer core with its state pools as module buffers, for the compile, export and
CUDA-graph tests of kda_decode / causal_conv1d_update."""

import torch

import kda_ops


class DecodeLayer(torch.nn.Module):
    """Short conv of the packed q/k/v projections, then the recurrent KDA step, both against
    in-place pools (non-persistent buffers: fixed addresses, as a model's caches)."""

    def __init__(self, slots: int, H: int, K: int, V: int, W: int = 4, *, dtype=torch.float32, device="cpu"):
        super().__init__()
        self.H, self.K, self.V = H, K, V
        D = H * (2 * K + V)
        self.register_buffer("conv_weight", torch.randn(D, W, device=device).to(dtype) * 0.5)
        self.register_buffer("conv_state", torch.randn(slots, D, W - 1, device=device).to(dtype), persistent=False)
        self.register_buffer("state", torch.randn(slots, H, K, V, device=device), persistent=False)

    def forward(self, x, g, beta, state_indices):
        B, T, _ = x.shape
        xc = kda_ops.causal_conv1d_update(x, self.conv_state, self.conv_weight, state_indices=state_indices)
        q, k, v = xc.split([self.H * self.K, self.H * self.K, self.H * self.V], dim=-1)
        return kda_ops.kda_decode(
            q.reshape(B, T, self.H, self.K),
            k.reshape(B, T, self.H, self.K),
            v.reshape(B, T, self.H, self.V),
            g,
            beta,
            self.state,
            state_indices=state_indices,
            use_qk_l2norm=True,
        )


def layer_inputs(B: int, T: int, layer: DecodeLayer, slots: int):
    """(x, g, beta, state_indices): distinct random slots, about a quarter of the rows padding."""
    H, K, V = layer.H, layer.K, layer.V
    device, dtype = layer.conv_state.device, layer.conv_state.dtype
    indices = torch.randperm(slots, device=device)[:B].to(torch.int32)
    indices[torch.rand(B, device=device) < 0.25] = -1
    return (
        torch.randn(B, T, H * (2 * K + V), device=device).to(dtype),
        -torch.rand(B, T, H, K, device=device) * 0.5,
        torch.rand(B, T, H, device=device),
        indices,
    )


def twin(layer: DecodeLayer) -> DecodeLayer:
    """An independent copy with the same weights and pool contents."""
    other = DecodeLayer(
        layer.state.shape[0], layer.H, layer.K, layer.V, layer.conv_weight.shape[1],
        dtype=layer.conv_state.dtype, device=layer.state.device,
    )
    other.load_state_dict(layer.state_dict())
    other.conv_state.copy_(layer.conv_state)
    other.state.copy_(layer.state)
    return other
