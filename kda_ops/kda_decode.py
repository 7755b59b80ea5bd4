"""kda::kda_decode and kda::causal_conv1d_update: decode steps against in-place state pools, and
the public `kda_decode`, `causal_conv1d_update` and `causal_conv1d` functions.

The two public ops are `triton_op`s: CUDA tensors run the Triton kernels of kernels/kda_decode.py
(launched through wrap_triton, so Inductor sees them and CUDA graphs capture them). Other tensors
(CPU; fp64, a checking dtype) take the exact PyTorch references, registered as the opaque ops
kda::kda_decode_reference / kda::causal_conv1d_update_reference. Neither path reads tensor data on
the host, so both are safe inside CUDA graphs. Contracts: meta/kda_decode.py.
"""

from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op, triton_op

from .kernels.kda_decode import causal_conv1d_update_fwd, kda_decode_fwd
from .meta.kda_decode import (
    causal_conv1d,
    causal_conv1d_update_meta,
    causal_conv1d_update_reference,
    kda_decode_meta,
    kda_decode_reference,
)

__all__ = ["causal_conv1d", "causal_conv1d_update", "kda_decode"]


def _runs_triton(t: Tensor) -> bool:
    return t.device.type == "cuda" and t.dtype != torch.float64


def _slot_per_row(state_indices: Optional[Tensor], B: int, device: torch.device) -> Tensor:
    """The kernels always read a slot index per row; None means row b uses slot b."""
    if state_indices is None:
        return torch.arange(B, dtype=torch.int32, device=device)
    return state_indices.contiguous()


@custom_op("kda::kda_decode_reference", mutates_args=("state",))
def _kda_decode_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    state: Tensor,
    state_indices: Optional[Tensor],
    scale: float,
    use_qk_l2norm: bool,
    A_log: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    gate_lower_bound: Optional[float] = None,
) -> Tensor:
    return kda_decode_reference(
        q, k, v, g, beta, state, state_indices, scale, use_qk_l2norm, A_log, dt_bias, gate_lower_bound
    )


_kda_decode_reference.register_fake(kda_decode_meta)


@triton_op("kda::kda_decode", mutates_args=("state",))
def kda_decode_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    state: Tensor,
    state_indices: Optional[Tensor],
    scale: float,
    use_qk_l2norm: bool,
    A_log: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    gate_lower_bound: Optional[float] = None,
) -> Tensor:
    """T recurrent KDA steps per row against the state pool (updated in place); returns o. With
    A_log and dt_bias, g is the gate's pre-activation and the kernel computes the decay (the
    bounded form when gate_lower_bound is given)."""
    if not _runs_triton(q):
        return torch.ops.kda.kda_decode_reference(
            q, k, v, g, beta, state, state_indices, scale, use_qk_l2norm, A_log, dt_bias, gate_lower_bound
        )
    o = kda_decode_meta(
        q, k, v, g, beta, state, state_indices, scale, use_qk_l2norm, A_log, dt_bias, gate_lower_bound, token_flat=True
    )
    kda_decode_fwd(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        g.contiguous(),
        beta.contiguous(),
        state,
        _slot_per_row(state_indices, q.shape[0], q.device),
        o,
        scale,
        use_qk_l2norm,
        None if A_log is None else A_log.contiguous(),
        None if dt_bias is None else dt_bias.contiguous(),
        gate_lower_bound,
    )
    return o.view(v.shape)


@custom_op("kda::causal_conv1d_update_reference", mutates_args=("conv_state",))
def _causal_conv1d_update_reference(
    x: Tensor, conv_state: Tensor, weight: Tensor, state_indices: Optional[Tensor]
) -> Tensor:
    return causal_conv1d_update_reference(x, conv_state, weight, state_indices)


_causal_conv1d_update_reference.register_fake(causal_conv1d_update_meta)


@triton_op("kda::causal_conv1d_update", mutates_args=("conv_state",))
def causal_conv1d_update_op(x: Tensor, conv_state: Tensor, weight: Tensor, state_indices: Optional[Tensor]) -> Tensor:
    """SiLU(causal depthwise conv) of T new tokens per row against the conv-state pool (updated in
    place); returns y."""
    if not _runs_triton(x):
        return torch.ops.kda.causal_conv1d_update_reference(x, conv_state, weight, state_indices)
    y = causal_conv1d_update_meta(x, conv_state, weight, state_indices, token_flat=True)
    causal_conv1d_update_fwd(
        x.contiguous(),
        conv_state,
        weight.contiguous(),
        _slot_per_row(state_indices, x.shape[0], x.device),
        y,
    )
    return y.view(x.shape)


def kda_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    state: Tensor,
    *,
    state_indices: Optional[Tensor] = None,
    scale: Optional[float] = None,
    use_qk_l2norm: bool = False,
    A_log: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    gate_lower_bound: Optional[float] = None,
) -> Tensor:
    """Recurrent KDA decode: T = 1..8 new tokens per sequence against a state pool, in place.

    Args:
        q, k: [B, T, H, K] bf16/fp16/fp32 (fp64 on the reference path, for checks).
        v: [B, T, H, V], q's dtype.
        g: [B, T, H, K] fp32 log-space per-channel decay (fp64 with fp64 inputs); or, when A_log
            and dt_bias are given, the gate's pre-activation z (q's dtype or fp32), from which the
            op computes the decay -exp(A_log[h]) * softplus(z + dt_bias) in fp32 (in the kernel
            on CUDA: no separate gate kernel).
        beta: [B, T, H] write strength, q's dtype or fp32.
        state: [S, H, K, V] fp32 contiguous pool of recurrent states (fp64 with fp64 inputs).
            Row b advances slot state_indices[b] by its T tokens, in place; other slots keep
            their bits. Keep it a module buffer so compiled decode steps replay in CUDA graphs.
        state_indices: [B] int32/int64 device tensor of slots; a negative index (-1) marks a
            padding row: its output is zeros and the pool is not touched for it. None: row b
            uses slot b (needs S >= B). Two valid rows naming one slot, or an index >= S, are
            undefined (never checked: that would read the indices on the host).
        scale: query scale, default K ** -0.5. Keep it constant per model: a new value recompiles.
        use_qk_l2norm: L2-normalise q and k per head inside the op (x / sqrt(sum x^2 + 1e-6)).
        A_log: [H] fp32 log of the per-head decay rate (the checkpoint's [1, 1, H, 1] viewed as [H]).
        dt_bias: [H*K] fp32 per-channel gate bias. Both or neither.
        gate_lower_bound: a finite float L < 0, only with A_log and dt_bias: the bounded gate
            g = L * sigmoid(exp(A_log[h]) * (z + dt_bias)), in (L, 0), in place of the softplus
            form. Keep it constant per model: a new value recompiles.

    Returns:
        o [B, T, H, V] in v's dtype.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    bound = None if gate_lower_bound is None else float(gate_lower_bound)
    return kda_decode_op(q, k, v, g, beta, state, state_indices, float(scale), use_qk_l2norm, A_log, dt_bias, bound)


def causal_conv1d_update(
    x: Tensor, conv_state: Tensor, weight: Tensor, *, state_indices: Optional[Tensor] = None
) -> Tensor:
    """Short-convolution decode: SiLU of a depthwise causal conv (no bias) over T = 1..8 new
    tokens per sequence, continuing from a conv-state pool that is updated in place.

    Args:
        x: [B, T, D] bf16/fp16/fp32 (fp64 on the reference path, for checks).
        conv_state: [S, D, W-1] contiguous pool in x's dtype; conv_state[s, d, c] is the input of
            channel d (W-1-c) tokens back (column W-2 the newest), the layout `causal_conv1d`
            returns as its final state. Row b reads slot state_indices[b] and leaves the last W-1
            inputs there; other slots keep their bits.
        weight: [D, W], 2 <= W <= 4, x's dtype or fp32 (the checkpoint's [D, 1, W] conv weight
            viewed as [D, W]).
        state_indices: [B] int32/int64 device tensor of slots, -1 for padding rows (output zeros,
            pool untouched), None for slot b = row b (needs S >= B); same rules as kda_decode.

    Returns:
        y [B, T, D] in x's dtype.
    """
    return causal_conv1d_update_op(x, conv_state, weight, state_indices)
