"""No tensor that a Triton kernel writes inside our triton_ops has a size-1 dim with a symbolic
stride, as a [B, T, ...] buffer has with B = 1 and a dynamic T (the packed prefill): torch 2.11's
Inductor fails to decompose such a launch (pytorch#181735, an AssertionError in
decompose_triton_kernel_wrapper_functional; fixed in later torch, so compiling here cannot show it).

The ops' CUDA bodies are traced on fake CUDA tensors with a dynamic T, functionalized as AOTAutograd
does for Inductor, so that every launch becomes a triton_kernel_wrapper_functional node whose
tensors_to_clone names the tensors the kernel writes, found by torch's analysis of the kernel's
TTIR (were it to fail, torch would take every input as written, and the [1, T, ...] inputs would
fail here as they would in Inductor). The analysis asks Triton for the current target: a stand-in
driver reports an sm90 CUDA target, so no GPU is needed.
"""

import pytest
import torch
import triton
from torch._dynamo.source import ConstantSource
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import ShapeEnv, is_concrete_int
from triton.backends.compiler import GPUTarget

import kda_ops  # noqa: F401  (registers the ops)

H, K, V = 2, 16, 32  # K = 16: one K tile in the backward's intra kernel (its [NK, 2, ...] partial sums)


class _Sm90Driver:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


@pytest.fixture
def shapes(monkeypatch):
    """Triton's current target reported as sm90, a fake mode (its CUDA tensors need no GPU) and a
    factory of dynamic sizes."""
    monkeypatch.setattr(triton.runtime.driver, "_active", _Sm90Driver())
    env = ShapeEnv()

    def dynamic(name: str, hint: int):
        return env.create_symintnode(env.create_symbol(hint, ConstantSource(name)), hint=hint)

    return FakeTensorMode(shape_env=env), dynamic


def _written(fn, mode, *args) -> list[tuple[str, str, torch.Tensor]]:
    """(kernel, argument, fake value) of every tensor a Triton launch in fn writes."""
    with mode:
        gm = make_fx(dispatch_functionalize(fn))(*args)
    launches = gm.graph.find_nodes(op="call_function", target=torch.ops.higher_order.triton_kernel_wrapper_functional)
    assert launches, "no Triton launch was traced: the ops took their reference path"
    return [
        (kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__, name, n.kwargs["kwargs"][name].meta["val"])
        for n in launches
        for name in n.kwargs["tensors_to_clone"]
    ]


def _has_size1_dim_with_symbolic_stride(t: torch.Tensor) -> bool:
    return any(
        is_concrete_int(size) and size == 1 and not is_concrete_int(stride) for size, stride in zip(t.shape, t.stride())
    )


def _assert_no_size1_dim_with_symbolic_stride(written) -> None:
    bad = [
        f"{kernel}: {name} shape {list(t.shape)} stride {list(t.stride())}"
        for kernel, name, t in written
        if _has_size1_dim_with_symbolic_stride(t)
    ]
    assert not bad, "written tensors with a size-1 dim of symbolic stride:\n" + "\n".join(bad)


def _kda_inputs(T, *, dtype=torch.bfloat16):
    q, k = (torch.randn(1, T, H, K, dtype=dtype, device="cuda") for _ in range(2))
    v = torch.randn(1, T, H, V, dtype=dtype, device="cuda")
    g = torch.randn(1, T, H, K, dtype=torch.float32, device="cuda")
    beta = torch.rand(1, T, H, dtype=dtype, device="cuda")
    return q, k, v, g, beta


@pytest.mark.parametrize("varlen", [pytest.param(True, id="varlen-h0-final-l2norm"), pytest.param(False, id="plain")])
def test_chunk_kda_fwd_and_bwd_write_no_size1_dim_with_symbolic_stride(shapes, varlen):
    mode, dynamic = shapes
    T = dynamic("T", 100)
    with mode:
        q, k, v, g, beta = _kda_inputs(T)
        do = torch.randn(1, T, H, V, dtype=q.dtype, device="cuda")
        if varlen:
            N = dynamic("N", 3)
            cu_seqlens = torch.zeros(N + 1, dtype=torch.int32, device="cuda")
            h0, dht = (torch.randn(N, H, K, V, device="cuda") for _ in range(2))
        else:
            cu_seqlens = h0 = dht = None

    def fwd(q, k, v, g, beta, h0, cu_seqlens):
        return torch.ops.kda.chunk_kda_fwd(q, k, v, g, beta, h0, cu_seqlens, K**-0.5, varlen, varlen)

    def bwd(q, k, v, g, beta, h0, cu_seqlens, do, dht):
        return torch.ops.kda.chunk_kda_bwd(q, k, v, g, beta, h0, cu_seqlens, do, dht, K**-0.5, varlen)

    _assert_no_size1_dim_with_symbolic_stride(_written(fwd, mode, q, k, v, g, beta, h0, cu_seqlens))
    _assert_no_size1_dim_with_symbolic_stride(_written(bwd, mode, q, k, v, g, beta, h0, cu_seqlens, do, dht))


def test_decode_ops_write_no_size1_dim_with_symbolic_stride(shapes):
    mode, dynamic = shapes
    T, S, W = dynamic("T", 4), 4, 4
    with mode:
        q, k, v, z, beta = _kda_inputs(T)
        state = torch.zeros(S, H, K, V, device="cuda")
        slots = torch.zeros(1, dtype=torch.int32, device="cuda")
        A_log, dt_bias = torch.randn(H, device="cuda"), torch.randn(H * K, device="cuda")
        x = torch.randn(1, T, H * K, dtype=q.dtype, device="cuda")
        conv_state = torch.zeros(S, H * K, W - 1, dtype=q.dtype, device="cuda")
        weight = torch.randn(H * K, W, dtype=q.dtype, device="cuda")

    def decode(q, k, v, z, beta, state, slots, A_log, dt_bias):
        return torch.ops.kda.kda_decode(q, k, v, z, beta, state, slots, K**-0.5, True, A_log, dt_bias)

    def conv(x, conv_state, weight, slots):
        return torch.ops.kda.causal_conv1d_update(x, conv_state, weight, slots)

    _assert_no_size1_dim_with_symbolic_stride(_written(decode, mode, q, k, v, z, beta, state, slots, A_log, dt_bias))
    _assert_no_size1_dim_with_symbolic_stride(_written(conv, mode, x, conv_state, weight, slots))
