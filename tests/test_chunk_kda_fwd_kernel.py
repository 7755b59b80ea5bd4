"""The Triton chunked KDA forward (kernels/chunk_kda_fwd.py) against the reference ladder.

CPU: the kernels under TRITON_INTERPRET=1 on tiny shapes (interpret_chunk_kda_fwd.py, run in a
subprocess because the interpreter must be switched on before triton is first imported).
GPU (@pytest.mark.gpu): bf16 inputs against the fp32 references at the accuracy bar of
DESIGN.md (relative RMS error <= 0.005 for o and the final state), full coverage of the outputs,
opcheck on CUDA and the kernels inside a fullgraph torch.compile.
"""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kda_inputs import kernel_check_inputs, rel_rms

from kda_ops import chunk_kda
from kda_ops.kernels.chunk_kda_fwd import chunk_kda_fwd_triton, launch_config
from kda_ops.meta.chunk_kda import RESIDUAL_NAMES, chunk_kda_fwd_reference, chunk_kda_residuals_meta
from kda_ops.meta.kda_recurrent import recurrent_kda

BAR = 0.005  # o and final state, bf16 inputs vs the fp32 recurrence (DESIGN.md)
NAIVE_MAX_T = 2048  # longer sequences are checked against the chunked fp32 reference


@pytest.mark.interpret
def test_interpreted_kernels_match_reference():
    script = Path(__file__).with_name("interpret_chunk_kda_fwd.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr


def test_launch_config_rejects_unknown_diag_precision():
    with pytest.raises(ValueError, match="diag_precision"):
        dataclasses.replace(launch_config(128, 128, torch.bfloat16), diag_precision="bf16")


def _reference(x, cu_seqlens, scale, l2):
    """fp32 ground truth on the same (rounded) inputs: the naive recurrence, or the chunked
    reference for long sequences (validated against the recurrence in
    test_chunked_reference_matches_recurrence)."""
    f32 = {name: (t.float() if t is not None else None) for name, t in x.items()}
    if f32["q"].shape[1] <= NAIVE_MAX_T:
        return recurrent_kda(
            f32["q"], f32["k"], f32["v"], f32["g"], f32["beta"], scale=scale, initial_state=f32["initial_state"],
            output_final_state=True, use_qk_l2norm=l2, cu_seqlens=cu_seqlens,
        )
    return chunk_kda_fwd_reference(
        f32["q"], f32["k"], f32["v"], f32["g"], f32["beta"], f32["initial_state"], cu_seqlens, scale, True, l2
    )


# (B, T, H, K, V, cu_seqlens, initial state, in-op L2 norm, gates at -1000)
CASES = [
    pytest.param(2, 63, 2, 64, 64, None, True, True, True, id="T63-K64-h0-l2-gate1000"),
    pytest.param(2, 64, 2, 100, 100, None, False, False, True, id="T64-K100-gate1000"),
    pytest.param(2, 65, 2, 128, 128, None, True, True, False, id="T65-K128-h0-l2"),
    pytest.param(1, 500, 2, 256, 256, None, False, True, True, id="T500-K256-l2-gate1000"),
    pytest.param(1, 1000, 2, 128, 128, None, True, False, True, id="T1000-K128-h0-gate1000"),
    pytest.param(1, 1000, 2, 100, 100, None, True, True, False, id="T1000-K100-h0-l2"),
    pytest.param(1, 2048, 2, 64, 64, None, False, True, False, id="T2048-K64-l2"),
    pytest.param(1, 2048, 2, 256, 256, None, True, False, True, id="T2048-K256-h0-gate1000"),
    pytest.param(1, 8192, 2, 128, 128, None, True, True, True, id="T8192-K128-h0-l2-gate1000"),
    pytest.param(1, 8192, 1, 256, 256, None, False, False, False, id="T8192-K256"),
    pytest.param(1, 2000, 2, 128, 128, [0, 15, 100, 300, 1200, 2000], True, True, True, id="varlen-K128-h0-l2-gate1000"),
    pytest.param(1, 2000, 2, 256, 256, [0, 15, 100, 300, 1200, 2000], False, False, True, id="varlen-K256-gate1000"),
    pytest.param(1, 2000, 2, 100, 100, [0, 15, 100, 300, 1200, 2000], True, False, False, id="varlen-K100-h0"),
    pytest.param(1, 2000, 2, 64, 64, [0, 0, 15, 100, 300, 1200, 2000], True, True, False, id="varlen-empty-seq-K64-h0-l2"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("B, T, H, K, V, cu, initial_state, l2, gate_floor", CASES)
def test_forward_bf16_within_bar(B, T, H, K, V, cu, initial_state, l2, gate_floor):
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32, device="cuda")
    n = B if cu is None else len(cu) - 1
    x = kernel_check_inputs(B, T, H, K, V, n_seqs=n, initial_state=initial_state, l2norm_in_op=l2, gate_floor=gate_floor)
    o, final_state = chunk_kda(
        **x, output_final_state=True, use_qk_l2norm=l2, cu_seqlens=cu_seqlens
    )
    ref_o, ref_final = _reference(x, cu_seqlens, K**-0.5, l2)
    assert o.dtype == torch.bfloat16 and final_state.dtype == torch.float32
    assert torch.isfinite(o).all() and torch.isfinite(final_state).all()
    assert rel_rms(o, ref_o) <= BAR
    assert rel_rms(final_state, ref_final) <= BAR


@pytest.mark.gpu
def test_forward_diag_tf32x3_within_bar():
    """The diagonal blocks in tf32x3 instead of launch_config's tf32, through the launcher: the
    same bar, so both precisions stay covered."""
    cu = [0, 15, 100, 300, 1200, 2000]
    cu_seqlens = torch.tensor(cu, dtype=torch.int32, device="cuda")
    n, T, H, K = len(cu) - 1, cu[-1], 2, 128
    x = kernel_check_inputs(1, T, H, K, K, n_seqs=n, initial_state=True, l2norm_in_op=True, gate_floor=True)
    config = dataclasses.replace(launch_config(K, K, torch.bfloat16), diag_precision="tf32x3")
    o = torch.full((1, T, H, K), float("nan"), dtype=torch.bfloat16, device="cuda")
    final_state = torch.full((n, H, K, K), float("nan"), device="cuda")
    chunk_kda_fwd_triton(*x.values(), cu_seqlens, K**-0.5, True, o, final_state, config=config)
    ref_o, ref_final = _reference(x, cu_seqlens, K**-0.5, True)
    assert rel_rms(o, ref_o) <= BAR
    assert rel_rms(final_state, ref_final) <= BAR


@pytest.mark.gpu
def test_forward_one_million_tokens_matches_chunked_reference():
    """The long run of the chunk issue: B=1, H=4, T=1,048,576 (16,384 chunks through one state
    scan), finite and within the bar of the fp32 chunked reference on the same inputs."""
    x = kernel_check_inputs(1, 1 << 20, 4, 128, 128, n_seqs=1, initial_state=True, l2norm_in_op=True, gate_floor=True)
    o, final_state = chunk_kda(**x, output_final_state=True, use_qk_l2norm=True)
    assert torch.isfinite(o).all() and torch.isfinite(final_state).all()
    ref_o, ref_final = _reference(x, None, 128**-0.5, True)
    assert rel_rms(o, ref_o) <= BAR
    assert rel_rms(final_state, ref_final) <= BAR


# (dtype, beta dtype, K = V): the other input dtypes the kernels take, same bar; fp32 at
# K = 256 has the largest shared-memory tiles of the scans (it once over-ran them)
DTYPE_CASES = [
    pytest.param(torch.float16, torch.float16, 128, id="fp16"),
    pytest.param(torch.float32, torch.float32, 128, id="fp32"),
    pytest.param(torch.float32, torch.float32, 256, id="fp32-K256"),
    pytest.param(torch.bfloat16, torch.float32, 128, id="bf16-beta-fp32"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, beta_dtype, K", DTYPE_CASES)
def test_forward_other_dtypes_within_bar(dtype, beta_dtype, K):
    x = kernel_check_inputs(2, 300, 2, K, K, n_seqs=2, initial_state=True, l2norm_in_op=True, gate_floor=True,
                dtype=dtype, beta_dtype=beta_dtype)
    o, final_state = chunk_kda(**x, output_final_state=True, use_qk_l2norm=True)
    ref_o, ref_final = _reference(x, None, K**-0.5, True)
    assert o.dtype == dtype
    assert rel_rms(o, ref_o) <= BAR
    assert rel_rms(final_state, ref_final) <= BAR


@pytest.mark.gpu
@pytest.mark.parametrize(
    "T, K, cu",
    [
        pytest.param(63, 64, None, id="T63-K64"),
        pytest.param(3000, 128, [0, 1, 15, 100, 300, 1200, 3000], id="varlen-K128"),
    ],
)
def test_chunked_reference_matches_recurrence(T, K, cu):
    """The chunked fp32 reference that judges T > NAIVE_MAX_T, against the fp64 recurrence: it
    must sit far below the bar it is used to check."""
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32, device="cuda")
    n = 1 if cu is None else len(cu) - 1
    x = kernel_check_inputs(1, T, 2, K, K, n_seqs=n, initial_state=True, l2norm_in_op=True, gate_floor=True, dtype=torch.float32)
    o, final_state = chunk_kda_fwd_reference(*x.values(), cu_seqlens, K**-0.5, True, True)
    x64 = {name: t.double() for name, t in x.items()}
    ref_o, ref_final = recurrent_kda(
        x64["q"], x64["k"], x64["v"], x64["g"], x64["beta"], scale=K**-0.5, initial_state=x64["initial_state"],
        output_final_state=True, use_qk_l2norm=True, cu_seqlens=cu_seqlens,
    )
    assert rel_rms(o, ref_o) <= BAR / 10
    assert rel_rms(final_state, ref_final) <= BAR / 10


@pytest.mark.gpu
@pytest.mark.parametrize(
    "B, T, K, V, cu, final",
    [
        pytest.param(2, 65, 100, 100, None, True, id="T65-K100"),
        pytest.param(1, 2000, 256, 256, [0, 15, 100, 300, 1200, 2000], True, id="varlen-K256"),
        pytest.param(1, 130, 64, 64, [0, 1, 64, 130], False, id="varlen-K64-no-final"),
    ],
)
def test_launcher_writes_every_element(B, T, K, V, cu, final):
    """The launcher on NaN-prefilled outputs: every element is written, and the op (which
    allocates its outputs) returns the same bits."""
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int64, device="cuda")
    n = B if cu is None else len(cu) - 1
    H = 2
    x = kernel_check_inputs(B, T, H, K, V, n_seqs=n, initial_state=True, l2norm_in_op=True, gate_floor=True)
    o = torch.full((B, T, H, V), float("nan"), dtype=torch.bfloat16, device="cuda")
    final_state = torch.full((n, H, K, V) if final else (0,), float("nan"), device="cuda")
    chunk_kda_fwd_triton(*x.values(), cu_seqlens, K**-0.5, True, o, final_state)
    assert torch.isfinite(o).all() and torch.isfinite(final_state).all()
    op_o, op_final, *residuals = torch.ops.kda.chunk_kda_fwd(*x.values(), cu_seqlens, K**-0.5, final, True)
    assert torch.equal(o, op_o)
    assert torch.equal(final_state, op_final)
    assert all(r.numel() == 0 for r in residuals), "nothing is kept without save_for_backward"
    saved = chunk_kda_residuals_meta(x["q"], True, save=True)
    for r in saved:
        r.fill_(float("nan"))
    chunk_kda_fwd_triton(*x.values(), cu_seqlens, K**-0.5, True, o, final_state,
                         residuals=dict(zip(RESIDUAL_NAMES, saved)))
    assert torch.equal(o, op_o), "keeping the residuals changed o"
    assert all(torch.isfinite(r).all() for r in saved), "a residual has unwritten (NaN) elements"


@pytest.mark.gpu
@pytest.mark.parametrize(
    "cu, initial_state, final",
    [
        pytest.param(None, True, True, id="h0-final"),
        pytest.param(None, False, False, id="plain"),
        pytest.param([0, 5, 70, 75], True, True, id="varlen-h0-final"),
    ],
)
def test_opcheck_cuda(cu, initial_state, final):
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32, device="cuda")
    B, T = (2, 70) if cu is None else (1, 75)
    n = B if cu is None else len(cu) - 1
    x = kernel_check_inputs(B, T, 2, 64, 64, n_seqs=n, initial_state=initial_state, l2norm_in_op=True, gate_floor=True)
    torch.library.opcheck(torch.ops.kda.chunk_kda_fwd.default, (*x.values(), cu_seqlens, 0.125, final, True))
    torch.library.opcheck(torch.ops.kda.chunk_kda_fwd.default, (*x.values(), cu_seqlens, 0.125, final, True, True))


@pytest.mark.gpu
@pytest.mark.parametrize("varlen", [pytest.param(False, id="dense"), pytest.param(True, id="varlen")])
def test_compile_fullgraph_emits_the_kernels(varlen):
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    cu_seqlens = torch.tensor([0, 15, 100, 300], dtype=torch.int32, device="cuda") if varlen else None
    B, n = (1, 3) if varlen else (2, 2)
    x = kernel_check_inputs(B, 300, 2, 128, 128, n_seqs=n, initial_state=True, l2norm_in_op=True, gate_floor=True)

    def f(q, k, v, g, beta, initial_state):
        o, s = chunk_kda(q, k, v, g, beta, initial_state=initial_state, output_final_state=True,
                         use_qk_l2norm=True, cu_seqlens=cu_seqlens)
        return o * 2, s

    (o, s), codes = run_and_get_code(torch.compile(f, fullgraph=True), *x.values())
    code = "\n".join(codes)
    for name in ("gate", "intra", "solve", "scan"):
        assert f"chunk_kda_fwd_{name}_kernel" in code
    # the same kernels with the same arguments (scale cast to fp32 in the kernel, whatever float
    # type the caller passes): eager's values bit for bit
    o_eager, s_eager = f(*x.values())
    assert torch.equal(o, o_eager) and torch.equal(s, s_eager)
    ref_o, ref_final = _reference(x, cu_seqlens, 128**-0.5, True)
    assert rel_rms(o, 2 * ref_o) <= BAR and rel_rms(s, ref_final) <= BAR


@pytest.mark.gpu
def test_compile_reduce_overhead_varlen_captures_a_cuda_graph():
    """cu_seqlens as a plain input of a reduce-overhead region: the kernels only read it, so
    Inductor counts no input as mutated and CUDA-graph trees capture the region (a mutated input
    makes them skip it; tests/test_triton_writes.py checks torch's view of the writes on CPU)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cu_seqlens = torch.tensor([0, 15, 100, 300], dtype=torch.int32, device="cuda")
    x = kernel_check_inputs(1, 300, 2, 128, 128, n_seqs=3, initial_state=True, l2norm_in_op=True, gate_floor=True)

    def f(q, k, v, g, beta, initial_state, cu_seqlens):
        return chunk_kda(q, k, v, g, beta, initial_state=initial_state, output_final_state=True,
                         use_qk_l2norm=True, cu_seqlens=cu_seqlens)

    o_eager, s_eager = f(*x.values(), cu_seqlens)
    step = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        torch.compiler.cudagraph_mark_step_begin()
        o, s = step(*x.values(), cu_seqlens)
        assert torch.equal(o, o_eager) and torch.equal(s, s_eager)
    assert counters["inductor"]["cudagraph_skips"] == 0
