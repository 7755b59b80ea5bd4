"""Random KDA inputs and error measures shared by the tests."""

import math
from contextlib import contextmanager
from unittest import mock

import torch

from kda_ops.meta.kda_recurrent import l2norm


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


def kernel_check_inputs(
    B: int,
    T: int,
    H: int,
    K: int,
    V: int,
    *,
    n_seqs: int,
    initial_state: bool,
    l2norm_in_op: bool,
    gate_floor: bool,
    dtype: torch.dtype = torch.bfloat16,
    beta_dtype: torch.dtype | None = None,
    device: str = "cuda",
) -> dict:
    """Inputs for the GPU kernel checks: q, k, v in `dtype`; g fp32 log-decay in [-0.5, 0) with, if `gate_floor`, two channels of
    every head and ~2% of all entries at -1000; k unit-norm unless the op normalises it (the
    delta rule needs ||k|| <= 1 to stay bounded)."""
    q = torch.randn(B, T, H, K, device=device)
    k = torch.randn(B, T, H, K, device=device)
    if not l2norm_in_op:
        k = l2norm(k)
    g = -torch.rand(B, T, H, K, device=device) * 0.5
    if gate_floor:
        g[..., :2] = -1000.0
        g = torch.where(torch.rand_like(g) < 0.02, torch.full_like(g, -1000.0), g)
    return dict(
        q=q.to(dtype),
        k=k.to(dtype),
        v=torch.randn(B, T, H, V, device=device).to(dtype),
        g=g,
        beta=torch.rand(B, T, H, device=device).to(beta_dtype or dtype),
        initial_state=torch.randn(n_seqs, H, K, V, device=device) if initial_state else None,
    )


@contextmanager
def poisoned_scratch():
    """While active, torch.empty returns NaN-filled floating tensors and -1-filled integer ones:
    a kernel that reads launcher scratch it never wrote fails its comparison instead of passing
    on the zeroed pages a fresh CPU allocation happens to hand out."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -1)

    with mock.patch.object(torch, "empty", empty):
        yield



GATE_LOWER_BOUND = -5.0  # the bounded gate's L in tests: the bottom of docs/kda_math.md §2's range


def kimi_gate_inputs(
    B: int, T: int, H: int, K: int, *, z_dtype: torch.dtype, strong_head: bool, device: str = "cpu", generator=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z [B, T, H, K] in z_dtype, A_log [H], dt_bias [H*K] fp32) for the in-op Kimi gate
    g = -exp(A_log)·softplus(z + dt_bias): decays mostly in (-1, 0), channel 1 past softplus's
    threshold (z + dt_bias > 20, the identity branch) and, with strong_head, head 0 at
    exp(A_log) = 16, the top of the checkpoint's initial range, where channel 1 decays by
    g ≈ -400 a token (the cumulative gate of a chunk reaches ~ -26000)."""
    kw = dict(device=device, generator=generator)
    z = torch.randn(B, T, H, K, **kw) * 2 - 2
    z[..., 1] = 25.0
    A_log = torch.randn(H, **kw) * 0.5 - 1
    if strong_head:
        A_log[0] = math.log(16.0)
    return z.to(z_dtype), A_log, torch.randn(H * K, **kw) * 0.5
