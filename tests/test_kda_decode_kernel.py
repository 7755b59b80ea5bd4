"""The Triton kernels of kda::kda_decode and kda::causal_conv1d_update.

CPU: the kernels under TRITON_INTERPRET=1 against meta's references, in a subprocess
(interpret_kda_decode.py: the interpreter must be switched on before triton is first imported).
GPU (@pytest.mark.gpu): accuracy against the fp32 recurrence at production head sizes, pool
semantics, opcheck on CUDA, a manual CUDA graph replayed with new inputs and slots every step, and
torch.compile(mode="reduce-overhead") with the pools as module buffers.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from decode_layer import DecodeLayer, layer_inputs, twin
from kda_inputs import rel_rms

import kda_ops
from kda_ops.kernels.kda_decode import causal_conv1d_update_fwd, kda_decode_fwd
from kda_ops.meta.kda_decode import causal_conv1d_update_reference
from kda_ops.meta.kda_recurrent import kda_gate
from kda_ops.meta.kda_recurrent import recurrent_kda

INTERPRET_SCRIPT = Path(__file__).with_name("interpret_kda_decode.py")


@pytest.mark.interpret
def test_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, str(INTERPRET_SCRIPT)], env=env, capture_output=True, text=True, timeout=600
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert "cases, 0 failures" in result.stdout, report


# ------------------------------------------------------------------------------------------------
# GPU

BF16, FP32 = torch.bfloat16, torch.float32


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[x.element_size()])


def _decode_inputs(B, T, H, K, V, dtype, gate_floor=False):
    q = torch.randn(B, T, H, K, device="cuda").to(dtype)
    k = torch.randn(B, T, H, K, device="cuda").to(dtype)
    v = torch.randn(B, T, H, V, device="cuda").to(dtype)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, device="cuda")) * 0.5
    if gate_floor:
        g[..., :4] = -1000.0
    beta = torch.rand(B, T, H, device="cuda").to(dtype)
    return q, k, v, g, beta


def _gate_inputs(B, T, H, K, dtype):
    """The in-kernel gate's pre-activation z in dtype (channel 0 where exp(z) overflows fp32, so
    the gate there is about -1000 at the largest A_log; the bounded form's sigmoid saturates there:
    g = the bound), A_log [H] and dt_bias [H*K] in fp32."""
    z = torch.randn(B, T, H, K, device="cuda") * 4
    z[..., 0] = 100.0
    A_log = torch.linspace(-4.0, 2.3, H, device="cuda")
    return z.to(dtype), A_log, torch.randn(H * K, device="cuda")


GPU_DECODE_CASES = [
    pytest.param(BF16, 128, 128, 1, False, False, None, id="bf16-K128-T1"),
    pytest.param(BF16, 128, 128, 4, True, False, None, id="bf16-K128-T4-gate1000"),
    pytest.param(BF16, 128, 128, 8, False, False, None, id="bf16-K128-T8"),
    pytest.param(FP32, 128, 128, 1, False, False, None, id="fp32-K128-T1"),
    pytest.param(FP32, 128, 128, 8, True, False, None, id="fp32-K128-T8-gate1000"),
    pytest.param(BF16, 64, 64, 2, False, False, None, id="bf16-K64-T2"),
    pytest.param(FP32, 64, 64, 7, False, False, None, id="fp32-K64-T7"),
    pytest.param(BF16, 100, 100, 3, True, False, None, id="bf16-K100-T3-gate1000"),
    pytest.param(FP32, 100, 100, 5, False, False, None, id="fp32-K100-T5"),
    pytest.param(BF16, 256, 256, 6, False, False, None, id="bf16-K256-T6"),
    pytest.param(FP32, 256, 256, 1, False, False, None, id="fp32-K256-T1"),
    pytest.param(BF16, 128, 128, 1, False, True, None, id="bf16-K128-T1-gate-in-kernel"),
    pytest.param(BF16, 128, 128, 4, False, True, None, id="bf16-K128-T4-gate-in-kernel"),
    pytest.param(FP32, 100, 100, 3, False, True, None, id="fp32-K100-T3-gate-in-kernel"),
    pytest.param(BF16, 128, 128, 4, False, True, -5.0, id="bf16-K128-T4-bounded-gate-in-kernel"),
    pytest.param(FP32, 100, 100, 3, False, True, -0.7, id="fp32-K100-T3-bounded-gate-in-kernel"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, K, V, T, gate_floor, gate_in_kernel, gate_lower_bound", GPU_DECODE_CASES)
def test_gpu_decode_matches_fp32_recurrence(dtype, K, V, T, gate_floor, gate_in_kernel, gate_lower_bound):
    """o (pre-filled with NaN) and the state within 0.005 of the fp32 recurrence; padding rows
    zeros; unused slots (half NaN) bit-exact. With the gate in the kernel, the recurrence runs on
    meta's kda_gate of the same z, A_log, dt_bias (and gate_lower_bound: then o must also be
    further than 0.05 from the softplus form's)."""
    B, H, S = 6, 4, 11
    q, k, v, g, beta = _decode_inputs(B, T, H, K, V, dtype, gate_floor)
    A_log = dt_bias = None
    if gate_in_kernel:
        g, A_log, dt_bias = _gate_inputs(B, T, H, K, dtype)
    state_indices = torch.tensor([7, -1, 0, 3, 10, -1], dtype=torch.int32, device="cuda")
    valid = [0, 2, 3, 4]
    slots = [7, 0, 3, 10]
    unused = [s for s in range(S) if s not in slots]
    pool = torch.randn(S, H, K, V, device="cuda")
    pool[unused[1::2]] = float("nan")
    for x in (q, k, v, g, beta):
        x[[1, 5]] = float("nan")
    before = pool.clone()
    o = torch.full((B, T, H, V), float("nan"), dtype=dtype, device="cuda")
    kda_decode_fwd(q, k, v, g, beta, pool, state_indices, o, K**-0.5, True, A_log, dt_bias, gate_lower_bound)

    def recurrence(g_ref):
        return recurrent_kda(
            *(x[valid].float() for x in (q, k, v, g_ref, beta)),
            initial_state=before[slots],
            output_final_state=True,
            use_qk_l2norm=True,
        )

    o_ref, s_ref = recurrence(kda_gate(g, A_log, dt_bias, gate_lower_bound) if gate_in_kernel else g)
    assert rel_rms(o[valid], o_ref) <= 0.005
    assert rel_rms(pool[slots], s_ref) <= 0.005
    if gate_lower_bound is not None:
        assert rel_rms(o[valid], recurrence(kda_gate(g, A_log, dt_bias))[0]) > 0.05
    assert torch.equal(o[[1, 5]], torch.zeros_like(o[[1, 5]]))
    assert torch.equal(_bits(pool[unused]), _bits(before[unused]))


GPU_CONV_CASES = [
    pytest.param(BF16, BF16, 1536, 4, 1, id="bf16-D1536-W4-T1"),
    pytest.param(BF16, FP32, 1536, 4, 8, id="bf16-wfp32-D1536-W4-T8"),
    pytest.param(FP32, FP32, 300, 4, 3, id="fp32-D300-W4-T3"),
    pytest.param(BF16, BF16, 300, 3, 2, id="bf16-D300-W3-T2"),
    pytest.param(FP32, FP32, 4096, 2, 5, id="fp32-D4096-W2-T5"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, weight_dtype, D, W, T", GPU_CONV_CASES)
def test_gpu_conv_update_matches_reference(dtype, weight_dtype, D, W, T):
    B, S = 5, 8
    x = torch.randn(B, T, D, device="cuda").to(dtype)
    weight = torch.randn(D, W, device="cuda").to(weight_dtype)
    state_indices = torch.tensor([5, -1, 0, 2, 7], dtype=torch.int32, device="cuda")
    valid, slots = [0, 2, 3, 4], [5, 0, 2, 7]
    unused = [s for s in range(S) if s not in slots]
    pool = torch.randn(S, D, W - 1, device="cuda").to(dtype)
    pool[unused[1::2]] = float("nan")
    x[1] = float("nan")
    before = pool.clone()
    y = torch.full_like(x, float("nan"))
    causal_conv1d_update_fwd(x, pool, weight, state_indices, y)

    ref_pool = before.clone()
    y_ref = causal_conv1d_update_reference(x[valid], ref_pool, weight, state_indices[valid])
    torch.testing.assert_close(y[valid], y_ref)
    assert torch.equal(pool[slots], ref_pool[slots])
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    assert torch.equal(_bits(pool[unused]), _bits(before[unused]))


@pytest.mark.gpu
def test_gpu_causal_conv1d_prefill_compiles_with_inductor():
    """The prefill conv (pure PyTorch) through Inductor, varlen with a dynamic length: equal to
    eager, final conv state bit-exact."""
    torch._dynamo.reset()
    conv = torch.compile(kda_ops.causal_conv1d, fullgraph=True, dynamic=True)
    D, W = 1536, 4
    weight = torch.randn(D, W, device="cuda", dtype=BF16)
    for lengths in ([5, 300, 1], [70, 2]):
        x = torch.randn(1, sum(lengths), D, device="cuda", dtype=BF16)
        cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
        init = torch.randn(len(lengths), D, W - 1, device="cuda", dtype=BF16)
        y, final = conv(x, weight, init, cu_seqlens)
        y_ref, final_ref = kda_ops.causal_conv1d(x, weight, init, cu_seqlens)
        torch.testing.assert_close(y, y_ref)
        assert torch.equal(final, final_ref)


GPU_OPCHECK_CASES = [
    pytest.param(True, id="indices"),
    pytest.param(False, id="no-indices"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("with_indices", GPU_OPCHECK_CASES)
def test_gpu_opcheck(with_indices):
    B, T, H, K, V, S, D, W = 3, 2, 2, 64, 64, 5, 96, 4
    q, k, v, g, beta = _decode_inputs(B, T, H, K, V, BF16)
    indices = torch.tensor([4, -1, 1], dtype=torch.int32, device="cuda") if with_indices else None
    pool = torch.randn(S, H, K, V, device="cuda")
    torch.library.opcheck(torch.ops.kda.kda_decode.default, (q, k, v, g, beta, pool, indices, K**-0.5, True))
    z, A_log, dt_bias = _gate_inputs(B, T, H, K, BF16)
    gated = (q, k, v, z, beta, pool, indices, K**-0.5, True, A_log, dt_bias)
    torch.library.opcheck(torch.ops.kda.kda_decode.default, gated)
    torch.library.opcheck(torch.ops.kda.kda_decode.default, (*gated, -5.0))
    x = torch.randn(B, T, D, device="cuda", dtype=BF16)
    conv_args = (x, torch.randn(S, D, W - 1, device="cuda", dtype=BF16), torch.randn(D, W, device="cuda", dtype=BF16), indices)
    torch.library.opcheck(torch.ops.kda.causal_conv1d_update.default, conv_args)


@pytest.mark.gpu
def test_gpu_manual_cuda_graph_replays_new_inputs_and_slots():
    """One captured decode step replayed with new inputs and slot indices copied into its static
    buffers: every step equals the same ops run eagerly."""
    slots, B, T = 12, 6, 1
    layer = DecodeLayer(slots, 4, 128, 128, dtype=BF16, device="cuda")
    eager = twin(layer)
    static_inputs = layer_inputs(B, T, layer, slots)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # JIT compile before capture
            layer(*static_inputs)
    torch.cuda.current_stream().wait_stream(stream)
    layer.load_state_dict(eager.state_dict())
    layer.state.copy_(eager.state)
    layer.conv_state.copy_(eager.conv_state)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(*static_inputs)
    for _ in range(5):
        inputs = layer_inputs(B, T, layer, slots)
        for buffer, value in zip(static_inputs, inputs):
            buffer.copy_(value)
        graph.replay()
        expected = eager(*inputs)
        torch.testing.assert_close(static_out, expected, rtol=0, atol=0)
        torch.testing.assert_close(layer.state, eager.state, rtol=0, atol=0)
        torch.testing.assert_close(layer.conv_state, eager.conv_state, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_compile_reduce_overhead_no_cudagraph_skips():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    slots, B, T = 12, 6, 1
    layer = DecodeLayer(slots, 4, 128, 128, dtype=BF16, device="cuda")
    eager = twin(layer)
    step = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for _ in range(5):
        torch.compiler.cudagraph_mark_step_begin()
        inputs = layer_inputs(B, T, layer, slots)
        out = step(*inputs).clone()
        expected = eager(*inputs)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(layer.state, eager.state)
        torch.testing.assert_close(layer.conv_state, eager.conv_state)
    assert counters["inductor"]["cudagraph_skips"] == 0
