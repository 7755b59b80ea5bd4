"""Naive recurrent KDA: the ground truth every other KDA path is compared against.

One token at a time, exactly the recurrence of docs/kda_math.md §1, computed in the accumulation
dtype (fp64 for fp64 inputs, fp32 otherwise). Slow by design; use it on short sequences. Also
the Kimi gate (docs/kda_math.md §2) and its backward, which the ops can apply themselves.
"""

import torch
import torch.nn.functional as F


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum(x^2) + 1e-6) over the last dim (eps inside the sqrt, as the checkpoint uses)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def kda_gate(
    z: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, lower_bound: float | None = None
) -> torch.Tensor:
    """The Kimi gate [B, T, H, K] in the accumulation dtype, from the pre-activation z [B, T, H, K],
    A_log [H] and dt_bias [H*K] (docs/kda_math.md §2), with the operations of the model's gate in
    its order, so the values match it bit for bit:
    g = -exp(A_log[h]) * softplus(z + dt_bias), unbounded below (lower_bound None), or the bounded
    form g = lower_bound * sigmoid(exp(A_log[h]) * (z + dt_bias)), in (lower_bound, 0)."""
    acc = accumulation_dtype(z.dtype)
    H, K = z.shape[2:]
    s = z.to(acc) + dt_bias.to(acc).view(H, K)
    if lower_bound is None:
        return -A_log.to(acc).exp()[:, None] * F.softplus(s)
    return lower_bound * torch.sigmoid(A_log.to(acc).exp()[:, None] * s)


def kda_gate_bwd(
    z: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, dg: torch.Tensor, lower_bound: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of kda_gate for the cotangent dg [B, T, H, K]: (dz [B, T, H, K], dA_log [H],
    ddt_bias [H*K]) in the accumulation dtype. With s = z + dt_bias and a = e^A:
    - g = -a·softplus(s): dz = -a·softplus'(s)·dg (softplus' = sigmoid, 1 above torch's
      threshold 20, as autograd takes it) and dA_log = Σ_{b,t,k} g·dg (∂g/∂A_log = g);
    - g = L·σ(a·s): dz = L·σ'(a·s)·a·dg with σ' = (1 − σ)·σ, in autograd's order, so dz equals
      autograd's through kda_gate bit for bit (the kernels take σ(u)·σ(−u), exact in the upper
      tail too), and dA_log = Σ_{b,t,k} s·dz (∂g/∂A_log = s·∂g/∂z);
    ddt_bias = Σ_{b,t} dz either way."""
    acc = accumulation_dtype(z.dtype)
    H, K = z.shape[2:]
    s = z.to(acc) + dt_bias.to(acc).view(H, K)
    a = A_log.to(acc).exp()[:, None]  # [H, 1]
    dg = dg.to(acc)
    if lower_bound is None:
        dz = -a * torch.where(s > 20, 1.0, torch.sigmoid(s)) * dg
        dA_log = (-a * F.softplus(s) * dg).sum((0, 1, 3))
    else:
        y = torch.sigmoid(a * s)
        dz = (dg * lower_bound) * (1 - y) * y * a
        dA_log = (s * dz).sum((0, 1, 3))
    return dz, dA_log, dz.sum((0, 1)).view(H * K)


def sequence_bounds(cu_seqlens: torch.Tensor | None, total: int) -> list[tuple[int, int]]:
    """Host list of (start, end) per sequence. Reads cu_seqlens: reference/test use only."""
    if cu_seqlens is None:
        return [(0, total)]
    edges = [int(x) for x in cu_seqlens]
    return list(zip(edges[:-1], edges[1:]))


def recurrent_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H, K] log-decay; beta [B, T, H];
    initial_state [N, H, K, V]; cu_seqlens [N+1] with B == 1 for packed sequences.

    Returns o [B, T, H, V] in v's dtype and the final state [N, H, K, V] in the accumulation
    dtype (or None).
    """
    acc = accumulation_dtype(q.dtype)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    q, k, v, g, beta = (x.to(acc) for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    o = torch.zeros(B, T, H, V, dtype=acc, device=q.device)
    if cu_seqlens is None:
        bounds = [(b, 0, T) for b in range(B)]
    else:
        bounds = [(0, s, e) for s, e in sequence_bounds(cu_seqlens, T)]
    finals = []
    for n, (b, start, end) in enumerate(bounds):
        if initial_state is None:
            S = torch.zeros(H, K, V, dtype=acc, device=q.device)
        else:
            S = initial_state[n].to(acc)
        for t in range(start, end):
            S = S * g[b, t].exp()[..., None]
            u = beta[b, t][:, None] * (v[b, t] - torch.einsum("hkv,hk->hv", S, k[b, t]))
            S = S + k[b, t][..., None] * u[:, None, :]
            o[b, t] = torch.einsum("hkv,hk->hv", S, q[b, t] * scale)
        finals.append(S)
    final_state = torch.stack(finals) if output_final_state else None
    return o.to(v.dtype), final_state
