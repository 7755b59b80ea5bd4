"""Random KDA inputs and error measures shared by the tests."""

import torch


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative RMS error ||x - ref|| / ||ref|| in fp64."""
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def kda_inputs(
    B: int,
    T: int,
    H: int,
    K: int,
    V: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    n_states: int | None = None,
    initial_state: bool = False,
    gate_floor_channels: int = 0,
    requires_grad: bool = False,
) -> dict:
    """q, k, v in `dtype`; g (log-decay, mostly in [-0.5, 0)) and the state in the accumulation
    dtype; beta in (0, 1). `gate_floor_channels` channels of every head get g = -1000."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    kw = dict(device=device)
    g = -torch.rand(B, T, H, K, dtype=acc, **kw) * 0.5
    if gate_floor_channels:
        g[..., :gate_floor_channels] = -1000.0
    inputs = dict(
        q=torch.randn(B, T, H, K, dtype=dtype, **kw),
        k=torch.randn(B, T, H, K, dtype=dtype, **kw),
        v=torch.randn(B, T, H, V, dtype=dtype, **kw),
        g=g,
        beta=torch.rand(B, T, H, dtype=dtype, **kw),
        initial_state=torch.randn(n_states or B, H, K, V, dtype=acc, **kw) if initial_state else None,
    )
    if requires_grad:
        for x in inputs.values():
            if x is not None:
                x.requires_grad_(True)
    return inputs
