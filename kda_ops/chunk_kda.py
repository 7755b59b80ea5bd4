"""kda::chunk_kda_fwd and kda::chunk_kda_bwd (joined by register_autograd), and the public
`chunk_kda` function. Under autograd the forward keeps, besides its inputs, the Triton path's
residuals (the chunk-local gate G, A_qk, T and the q/k norms; meta/chunk_kda.py
chunk_kda_residuals_meta), and the backward reads them instead of recomputing them.

The two public ops are `triton_op`s so that Inductor sees their Triton kernels. Their exact
PyTorch references are registered as the opaque ops kda::chunk_kda_fwd_reference /
kda::chunk_kda_bwd_reference; the public ops call them for tensors the Triton path does not serve
(CPU). Being opaque, the references stay single nodes under torch.compile, so a dynamic sequence
length does not specialise on their Python loops.
"""

from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op, triton_op, wrap_triton

from .kernels.chunk_kda_bwd import chunk_kda_bwd_triton
from .kernels.chunk_kda_fwd import chunk_kda_fwd_triton
from .meta.chunk_kda import (
    RESIDUAL_NAMES,
    check_chunk_kda_residuals,
    chunk_kda_bwd_meta,
    chunk_kda_fwd_meta,
    chunk_kda_fwd_reference,
    chunk_kda_residuals_meta,
)
from .meta.chunk_kda_bwd import chunk_kda_bwd_reference


@custom_op("kda::chunk_kda_fwd_reference", mutates_args=())
def _chunk_kda_fwd_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    scale: float,
    output_final_state: bool,
    use_qk_l2norm: bool,
    A_log: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    gate_lower_bound: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    return chunk_kda_fwd_reference(
        q, k, v, g, beta, initial_state, cu_seqlens, scale, output_final_state, use_qk_l2norm, A_log, dt_bias,
        gate_lower_bound,
    )


_chunk_kda_fwd_reference.register_fake(chunk_kda_fwd_meta)


@custom_op("kda::chunk_kda_bwd_reference", mutates_args=())
def _chunk_kda_bwd_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    do: Tensor,
    dht: Optional[Tensor],
    scale: float,
    use_qk_l2norm: bool,
    A_log: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    gate_lower_bound: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return chunk_kda_bwd_reference(
        q, k, v, g, beta, initial_state, cu_seqlens, do, dht, scale, use_qk_l2norm, A_log, dt_bias, gate_lower_bound
    )


_chunk_kda_bwd_reference.register_fake(chunk_kda_bwd_meta)


def _triton_serves(q: Tensor) -> bool:
    """The Triton kernels run CUDA tensors in bf16, fp16 and fp32; the references run the rest."""
    return q.device.type == "cuda" and q.dtype != torch.float64


@triton_op("kda::chunk_kda_fwd", mutates_args=())
def chunk_kda_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    scale: float,
    output_final_state: bool,
    use_qk_l2norm: bool,
    save_for_backward: bool = False,
    A_log: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    gate_lower_bound: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Chunked KDA forward: (o [B, T, H, V] in v's dtype, final state [N, H, K, V] fp32 or an
    empty [0] tensor when output_final_state is False, then the residuals gc, aqk, tkk, rqk that
    kda::chunk_kda_bwd reads instead of recomputing them: fp32, shaped as
    meta/chunk_kda.py chunk_kda_residuals_meta says when save_for_backward is set and the Triton
    kernels run, else four empty [0] tensors). With A_log and dt_bias, g is the gate's
    pre-activation z (the in-op gate; its bounded form with gate_lower_bound). See
    meta/chunk_kda.py for the contract.
    CUDA tensors (bf16/fp16/fp32) run the Triton kernels; CPU and fp64 run the reference."""
    residuals = chunk_kda_residuals_meta(q, use_qk_l2norm, save_for_backward and _triton_serves(q))
    if not _triton_serves(q):
        o, final_state = torch.ops.kda.chunk_kda_fwd_reference(
            q, k, v, g, beta, initial_state, cu_seqlens, scale, output_final_state, use_qk_l2norm, A_log, dt_bias,
            gate_lower_bound,
        )
        return (o, final_state, *residuals)
    o, final_state = chunk_kda_fwd_meta(
        q, k, v, g, beta, initial_state, cu_seqlens, scale, output_final_state, use_qk_l2norm, A_log, dt_bias,
        gate_lower_bound, token_flat=True,
    )
    chunk_kda_fwd_triton(
        q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm, o, final_state, launch=wrap_triton,
        residuals=dict(zip(RESIDUAL_NAMES, residuals)) if save_for_backward else None, A_log=A_log, dt_bias=dt_bias,
        gate_lower_bound=gate_lower_bound,
    )
    return (o.view(v.shape), final_state, *residuals)


@triton_op("kda::chunk_kda_bwd", mutates_args=())
def chunk_kda_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    do: Tensor,
    dht: Optional[Tensor],
    scale: float,
    use_qk_l2norm: bool,
    gc: Optional[Tensor] = None,
    aqk: Optional[Tensor] = None,
    tkk: Optional[Tensor] = None,
    rqk: Optional[Tensor] = None,
    A_log: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    gate_lower_bound: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Chunked KDA backward: (dq, dk, dv, dg, dbeta, dh0, dA_log, ddt_bias), dh0 an empty [0]
    tensor when there is no initial state. gc, aqk, tkk, rqk: kda::chunk_kda_fwd's residuals for
    the same inputs (all or none; read, never written); without them the backward recomputes
    them. With A_log and dt_bias (the in-op gate; its bounded form with gate_lower_bound) g is
    the pre-activation z, dg its gradient, and dA_log, ddt_bias theirs; without, those two are
    empty [0] tensors. CUDA tensors (bf16/fp16/fp32) run the Triton kernels; CPU and fp64 run the
    reference, which recomputes everything and ignores residuals."""
    residuals = (gc, aqk, tkk, rqk)
    if not _triton_serves(q):
        check_chunk_kda_residuals("chunk_kda_bwd", q, residuals, use_qk_l2norm)
        return torch.ops.kda.chunk_kda_bwd_reference(
            q, k, v, g, beta, initial_state, cu_seqlens, do, dht, scale, use_qk_l2norm, A_log, dt_bias,
            gate_lower_bound,
        )
    dq, dk, dv, dg, dbeta, dh0, dA_log, ddt_bias = chunk_kda_bwd_meta(
        q, k, v, g, beta, initial_state, cu_seqlens, do, dht, scale, use_qk_l2norm, A_log, dt_bias,
        gate_lower_bound, residuals, token_flat=True,
    )
    chunk_kda_bwd_triton(
        q, k, v, g, beta, initial_state, cu_seqlens, do, dht, scale, use_qk_l2norm,
        dq, dk, dv, dg, dbeta, dh0, dA_log, ddt_bias, launch=wrap_triton,
        residuals=None if gc is None else {name: r.contiguous() for name, r in zip(RESIDUAL_NAMES, residuals)},
        A_log=A_log, dt_bias=dt_bias, gate_lower_bound=gate_lower_bound,
    )
    return (
        dq.view(q.shape), dk.view(k.shape), dv.view(v.shape), dg.view(g.shape), dbeta.view(beta.shape), dh0,
        dA_log, ddt_bias,
    )


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, g, beta, initial_state, cu_seqlens, scale, _, use_qk_l2norm, _, A_log, dt_bias, gate_lower_bound = inputs
    residuals = output[2:]
    ctx.mark_non_differentiable(*residuals)
    # no zero-filled gradients for the residuals (≈ 1 KB per token and head) or an unused output
    ctx.set_materialize_grads(False)
    kept = residuals[0].dim() == 3  # [0] when nothing was kept
    ctx.save_for_backward(
        q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, *(residuals if kept else ())
    )
    ctx.scale, ctx.use_qk_l2norm, ctx.gate_lower_bound = scale, use_qk_l2norm, gate_lower_bound


def _backward(ctx, do: Optional[Tensor], dht: Optional[Tensor], *residual_grads):
    q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, *residuals = ctx.saved_tensors
    residuals = residuals or [None] * len(RESIDUAL_NAMES)
    if do is None:  # only the final state reached the loss
        do = torch.zeros_like(v)
    if dht is not None and dht.numel() == 0:
        dht = None  # the forward returned no final state
    dq, dk, dv, dg, dbeta, dh0, dA_log, ddt_bias = torch.ops.kda.chunk_kda_bwd(
        q, k, v, g, beta, initial_state, cu_seqlens, do, dht, ctx.scale, ctx.use_qk_l2norm,
        *residuals, A_log, dt_bias, ctx.gate_lower_bound,
    )
    in_op_gate = A_log is not None
    return (
        dq, dk, dv, dg, dbeta, (dh0 if initial_state is not None else None), None, None, None, None, None,
        dA_log if in_op_gate else None, ddt_bias if in_op_gate else None, None,
    )


chunk_kda_fwd.register_autograd(_backward, setup_context=_setup_context)


def chunk_kda(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
    cu_seqlens: Optional[Tensor] = None,
    A_log: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    gate_lower_bound: Optional[float] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """Kimi Delta Attention over whole sequences (prefill and training), differentiable.

    Args:
        q, k: [B, T, H, K] bf16/fp16/fp32 (fp64 on CPU for checks).
        v: [B, T, H, V], q's dtype.
        g: [B, T, H, K] fp32 log-space per-channel decay (<= 0; any magnitude, -1000 is exact);
            or, when A_log and dt_bias are given, the Kimi gate's pre-activation z (q's dtype or
            fp32), from which the op computes the decay -exp(A_log[h]) * softplus(z + dt_bias) in
            fp32 inside its kernels, with gradients for z, A_log and dt_bias (or, with
            gate_lower_bound, the bounded decay gate_lower_bound * sigmoid(exp(A_log[h]) * (z + dt_bias))).
        beta: [B, T, H] write strength, q's dtype or fp32.
        scale: query scale, default K ** -0.5. Keep it constant per model: a new value recompiles.
        initial_state: [N, H, K, V] fp32 state per sequence, or None for zeros.
        output_final_state: also return the final state [N, H, K, V] fp32.
        use_qk_l2norm: L2-normalise q and k per head inside the op (backward goes through it).
        cu_seqlens: [N + 1] int32/int64 device tensor of packed sequence boundaries (B must be 1);
            its values are never read on the host and are not validated.
        A_log: [H] fp32 log of the per-head decay rate (the checkpoint's [1, 1, H, 1] viewed as [H]).
        dt_bias: [H*K] fp32 per-channel gate bias. Both or neither.
        gate_lower_bound: L, a finite float < 0 (e.g. -5): the in-op gate's bounded form, each
            token's decay in (L, 0). Needs A_log and dt_bias. Keep it constant per model.

    Returns:
        o [B, T, H, V] in v's dtype, and the final state (None unless output_final_state).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    inputs = (q, k, v, g, beta, initial_state, A_log, dt_bias)
    save = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
    o, final_state, *_ = chunk_kda_fwd(
        q, k, v, g, beta, initial_state, cu_seqlens, float(scale), output_final_state, use_qk_l2norm, save,
        A_log, dt_bias, None if gate_lower_bound is None else float(gate_lower_bound),
    )
    return o, (final_state if output_final_state else None)
