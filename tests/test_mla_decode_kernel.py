"""The MLA decode Triton kernels and the cache-write kernel: under TRITON_INTERPRET=1 on CPU (in a
subprocess), and on a CUDA device at the real shapes (`pytest -m gpu tests/test_mla_decode_kernel.py`): accuracy against
the fp64 reference, poisoned pages, opcheck, torch.compile and CUDA-graph replay."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from kda_inputs import rel_rms
from mla_inputs import paged_cache
from torch._dynamo.testing import CompileCounterWithBackend

import kda_ops
from kda_ops.kernels.mla_decode import MLADecodeConfig, mla_decode_triton

SCALE = 192**-0.5  # Kimi Linear: (qk_nope_head_dim + qk_rope_head_dim) ** -0.5
O_BAR, LSE_BAR = 5e-3, 1e-3  # relative RMS error of bf16 inputs against the fp64 reference


def test_kernels_under_triton_interpreter():
    """tests/interpret_mla_decode.py in a subprocess: TRITON_INTERPRET must be set before triton is
    first imported, and this process has imported it already."""
    script = Path(__file__).with_name("interpret_mla_decode.py")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    passed = re.search(r"^(\d+) of (\d+) cases passed$", result.stdout, re.MULTILINE)
    assert passed and passed.group(1) == passed.group(2) and int(passed.group(2)) > 0, report


def _check_against_reference(o, lse, q, kv_cache, block_table, seq_lens, v_dim):
    ref_o, ref_lse = torch.ops.kda.mla_decode_reference(q.double(), kv_cache.double(), block_table, seq_lens, SCALE, v_dim)
    nonempty = seq_lens > 0
    assert torch.isfinite(o).all() and torch.isfinite(lse[nonempty]).all()
    assert (o[~nonempty] == 0).all() and (lse[~nonempty] == float("-inf")).all()
    assert rel_rms(o[nonempty], ref_o[nonempty]) <= O_BAR
    assert rel_rms(lse[nonempty], ref_lse[nonempty]) <= LSE_BAR


GPU_CASES = [
    pytest.param(16, 64, 576, id="H16-bs64"),
    pytest.param(16, 32, 576, id="H16-bs32"),
    pytest.param(32, 16, 576, id="H32-bs16"),
    pytest.param(32, 64, 576, id="H32-bs64"),
    pytest.param(128, 32, 576, id="H128-bs32"),
    pytest.param(32, 64, 512, id="H32-bs64-dqk512"),
]


MIXED_LENGTHS = [0, 1, 63, 64, 65, 4096, 32768]


def _launch_and_check(lens, H, block_size, d_qk, config=None):
    """The direct launch on a bf16 batch of the given lengths on NaN-poisoned pages, into
    NaN-prefilled outputs, checked against the reference: (args, o, lse)."""
    cache = paged_cache(lens, block_size, d_qk, dtype=torch.bfloat16, device="cuda")
    args = (torch.randn(len(lens), H, d_qk, device="cuda").bfloat16(), cache.kv_cache, cache.block_table, cache.seq_lens)
    o = torch.full((len(lens), H, 512), float("nan"), dtype=torch.bfloat16, device="cuda")
    lse = torch.full((len(lens), H), float("nan"), device="cuda")
    mla_decode_triton(*args, o, lse, SCALE, 512, config=config)
    _check_against_reference(o, lse, *args, 512)
    return args, o, lse


@pytest.mark.gpu
@pytest.mark.parametrize("H, block_size, d_qk", GPU_CASES)
def test_gpu_mixed_lengths_bf16(H, block_size, d_qk):
    """One batch of lengths 0, 1, 63, 64, 65, 4096 and 32768 on NaN-poisoned pages: the direct
    launch (NaN-prefilled outputs) meets the bars, and the op returns the same bits."""
    args, o, lse = _launch_and_check(MIXED_LENGTHS, H, block_size, d_qk)
    o_op, lse_op = kda_ops.mla_decode(*args, scale=SCALE, v_dim=512)
    assert torch.equal(o_op, o) and torch.equal(lse_op, lse)


@pytest.mark.gpu
def test_gpu_balanced_deal_ranges_across_sequences():
    """More sequences than programs (200 lengths in [0, 700), H = 32): no piece size fits, so the
    split kernel deals balanced ranges that cross sequences; the mixed batches above take the
    aligned deal."""
    _launch_and_check([(i * 37) % 700 for i in range(200)], 32, 64, 576)


SWEPT_CONFIGS = [  # tiles other than the table's: one KV buffer, 64 padded heads (wgmma), two programs per SM
    pytest.param(MLADecodeConfig(block_h=32, block_n=32, num_warps=4, num_stages=5, programs_per_sm=2), id="bh32-bn32-w4-s5-pps2"),
    pytest.param(MLADecodeConfig(block_h=32, block_n=64, num_warps=8, num_stages=2, programs_per_sm=1), id="bh32-bn64-s2"),
    pytest.param(MLADecodeConfig(block_h=64, block_n=32, num_warps=8, num_stages=2, programs_per_sm=2), id="bh64-bn32-pps2"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("config", SWEPT_CONFIGS)
def test_gpu_swept_configs_mixed_lengths(config):
    """The tuning sweep's other tiles meet the bars on the mixed-length poisoned batch at H = 32."""
    _launch_and_check(MIXED_LENGTHS, 32, 64, 576, config=config)


def _small_cuda_args(lens=(0, 1, 100, 300)):
    cache = paged_cache(list(lens), 64, 576, dtype=torch.bfloat16, device="cuda", num_blocks=40)
    q = torch.randn(len(lens), 32, 576, device="cuda").bfloat16()
    return q, cache.kv_cache, cache.block_table, cache.seq_lens


@pytest.mark.gpu
def test_gpu_opcheck():
    torch.library.opcheck(torch.ops.kda.mla_decode.default, (*_small_cuda_args(), SCALE, 512))


def _decode(q, kv_cache, block_table, seq_lens):
    return kda_ops.mla_decode(q, kv_cache, block_table, seq_lens, scale=SCALE, v_dim=512)


@pytest.mark.gpu
def test_gpu_compile_inductor_fullgraph():
    """Inductor compiles the user kernels itself (triton_op); one frame across batch and table
    sizes."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(_decode, backend=counter, fullgraph=True)
    for i, lens in enumerate(((0, 1, 100, 300), (5, 700), (64, 65, 3, 0, 129, 1000))):
        args = _small_cuda_args(lens)
        if i == 0:
            for t in (args[0], args[2], args[3]):
                torch._dynamo.mark_dynamic(t, 0)
            torch._dynamo.mark_dynamic(args[2], 1)
        o, lse = compiled(*args)
        _check_against_reference(o, lse, *args, 512)
    assert counter.frame_count == 1


@pytest.mark.gpu
def test_gpu_compile_reduce_overhead_captures_a_cuda_graph():
    """seq_lens and the block table as plain inputs of a reduce-overhead region: the kernels only
    read them, so Inductor counts no input as mutated and CUDA-graph trees capture the region (a
    mutated input makes them skip it; tests/test_triton_writes.py checks torch's view of the
    writes on CPU)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    args = _small_cuda_args()
    step = torch.compile(_decode, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        torch.compiler.cudagraph_mark_step_begin()
        o, lse = step(*args)
        _check_against_reference(o, lse, *args, 512)
    assert counters["inductor"]["cudagraph_skips"] == 0


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_with_changing_lengths_and_tables():
    """One captured graph serves steps whose lengths (so also split counts), block tables and
    poisoned pages all change; each replay equals an eager call and meets the bars."""
    B, H, block_size, num_blocks, max_blocks = 4, 32, 64, 400, 80
    static_q = torch.zeros(B, H, 576, dtype=torch.bfloat16, device="cuda")
    static_cache = torch.zeros(num_blocks, block_size, 576, dtype=torch.bfloat16, device="cuda")
    static_table = torch.zeros(B, max_blocks, dtype=torch.int32, device="cuda")
    static_lens = torch.zeros(B, dtype=torch.int32, device="cuda")

    def load_step(lens):
        cache = paged_cache(lens, block_size, 576, dtype=torch.bfloat16, device="cuda", num_blocks=num_blocks, max_blocks=max_blocks)
        static_q.copy_(torch.randn(B, H, 576, device="cuda"))
        static_cache.copy_(cache.kv_cache)
        static_table.copy_(cache.block_table)
        static_lens.copy_(cache.seq_lens)

    def step():
        return _decode(static_q, static_cache, static_table, static_lens)

    load_step([1, 2, 3, 4])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_o, graph_lse = step()

    for lens in ([1, 0, 64, 65], [5000, 3, 0, 4096], [0, 0, 0, 0], [129, 2000, 5120, 1]):
        load_step(lens)
        graph.replay()
        o, lse = graph_o.clone(), graph_lse.clone()
        eager_o, eager_lse = step()
        assert torch.equal(o, eager_o) and torch.equal(lse, eager_lse)
        _check_against_reference(o, lse, static_q, static_cache, static_table, static_lens, 512)


@pytest.mark.gpu
def test_gpu_cache_write_in_a_graph_with_changing_slots():
    """kda::mla_cache_write on CUDA: opcheck, then one captured graph replayed with new rows and
    slot mappings (-1 = padded row) writes exactly what the reference writes."""
    kv_cache = torch.randn(40, 64, 576, device="cuda").bfloat16()
    rows = torch.zeros(8, 576, dtype=torch.bfloat16, device="cuda")
    slots = torch.full((8,), -1, dtype=torch.int64, device="cuda")
    torch.library.opcheck(torch.ops.kda.mla_cache_write.default, (kv_cache.clone(), rows.clone(), slots.clone()))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        kda_ops.mla_cache_write(kv_cache, rows, slots)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kda_ops.mla_cache_write(kv_cache, rows, slots)
    for _ in range(3):
        rows.copy_(torch.randn(8, 576, device="cuda"))
        slots.copy_(torch.randperm(40 * 64, device="cuda")[:8])
        slots[torch.randint(0, 8, (2,), device="cuda")] = -1
        expected = kv_cache.clone()
        torch.ops.kda.mla_cache_write_reference(expected, rows, slots)
        graph.replay()
        assert torch.equal(kv_cache, expected)
        keep = slots >= 0
        assert torch.equal(kv_cache.view(-1, 576)[slots[keep]], rows[keep])
