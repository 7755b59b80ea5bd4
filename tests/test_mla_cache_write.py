"""kda::mla_cache_write on the CPU reference path (the Triton kernel runs under the interpreter in
test_mla_decode_kernel.py and on CUDA there): rows land in their slots and nowhere else, skipped
slots, opcheck, contract errors (eager and fake), torch.compile, and a write then a decode."""

import re

import pytest
import torch
import torch._dynamo
from mla_inputs import paged_cache
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode

import kda_ops
from kda_ops.meta._contract import ContractError
from kda_ops.mla_decode import mla_cache_write

SLOT_CASES = [
    pytest.param([5, 0, 63], torch.int64, id="int64"),
    pytest.param([7, -1, 12, 2], torch.int32, id="int32-padded-row"),
    pytest.param([-1, 64, 1000, 3], torch.int64, id="past-the-cache-skipped"),
]


@pytest.mark.parametrize("slots, slot_dtype", SLOT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rows_land_in_their_slots_only(slots, slot_dtype, dtype):
    num_blocks, block_size, D = 4, 16, 24
    kv_cache = torch.randn(num_blocks, block_size, D).to(dtype)
    before = kv_cache.clone()
    rows = torch.randn(len(slots), D).to(dtype)
    mla_cache_write(kv_cache, rows, torch.tensor(slots, dtype=slot_dtype))
    expected = before.view(-1, D).clone()
    for i, s in enumerate(slots):
        if 0 <= s < num_blocks * block_size:
            expected[s] = rows[i]
    assert torch.equal(kv_cache.view(-1, D), expected)
    assert not torch.equal(kv_cache, before)


def test_write_then_decode_reads_the_new_rows():
    """The rows written at block_table[b, t // bs] * bs + t % bs are token t of sequence b."""
    cache = paged_cache([5, 17], 8, 24, dtype=torch.float64, num_blocks=8, max_blocks=4)
    new_rows = torch.randn(2, 24, dtype=torch.float64)
    positions = cache.seq_lens.long()
    slots = cache.block_table.long().gather(1, (positions // 8)[:, None])[:, 0] * 8 + positions % 8
    valid_table = torch.where(cache.used | (torch.arange(4)[None] == (positions // 8)[:, None]), cache.block_table, -1)
    kv_cache = torch.nan_to_num(cache.kv_cache)
    mla_cache_write(kv_cache, new_rows, slots)
    q = torch.randn(2, 3, 24, dtype=torch.float64)
    o, _ = kda_ops.mla_decode(q, kv_cache, valid_table, (cache.seq_lens + 1), scale=0.3, v_dim=16)
    for b in range(2):
        keys = torch.cat([cache.tokens[b], new_rows[b : b + 1]])
        p = torch.softmax(0.3 * q[b] @ keys.T, dim=-1)
        torch.testing.assert_close(o[b], p @ keys[:, :16])


def _op_args():
    return (torch.randn(3, 8, 24), torch.randn(4, 24), torch.tensor([3, -1, 17, 23]))


@pytest.mark.parametrize(
    "op",
    [
        pytest.param(torch.ops.kda.mla_cache_write.default, id="mla_cache_write"),
        pytest.param(torch.ops.kda.mla_cache_write_reference.default, id="mla_cache_write_reference"),
    ],
)
def test_opcheck(op):
    torch.library.opcheck(op, _op_args())


CONTRACT_CASES = [
    pytest.param(lambda a: (a[0].double(), *a[1:]), "rows", "dtype torch.float64", id="rows-dtype"),
    pytest.param(lambda a: (a[0], a[1][:, :20], a[2]), "rows", "shape [N, 24]", id="rows-width"),
    pytest.param(lambda a: (a[0], a[1], a[2][:3]), "slot_mapping", "shape [4]", id="slot-count"),
    pytest.param(lambda a: (a[0], a[1], a[2].float()), "slot_mapping", "dtype torch.int32 or torch.int64", id="slot-dtype"),
    pytest.param(lambda a: (a[0][0], *a[1:]), "kv_cache", "a 3-d tensor", id="cache-rank"),
    pytest.param(lambda a: (a[0].transpose(1, 2).contiguous().transpose(1, 2), *a[1:]), "kv_cache", "a contiguous last dimension", id="cache-strides"),
]


@pytest.mark.parametrize("fake", [False, True], ids=["eager", "fake"])
@pytest.mark.parametrize("edit, name, expected", CONTRACT_CASES)
def test_contract_errors_name_the_argument(edit, name, expected, fake):
    args = edit(_op_args())
    before = args[0].clone()
    if fake:
        with FakeTensorMode() as mode:
            args = tuple(mode.from_tensor(t) for t in args)
            with pytest.raises(ContractError, match=f"'{name}' expected .*{re.escape(expected)}"):
                mla_cache_write(*args)
        return
    with pytest.raises(ContractError, match=f"'{name}' expected .*{re.escape(expected)}"):
        mla_cache_write(*args)
    assert torch.equal(args[0], before)


def test_compile_fullgraph_one_frame_across_token_counts():
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")

    @torch.compile(backend=counter, fullgraph=True)
    def write(kv_cache, rows, slots):
        mla_cache_write(kv_cache, rows * 2, slots)

    kv_cache = torch.zeros(3, 8, 24)
    for n in (2, 5, 7):
        rows, slots = torch.randn(n, 24), torch.randperm(24)[:n]
        slots[0] = -1
        if n == 2:
            torch._dynamo.mark_dynamic(rows, 0)
            torch._dynamo.mark_dynamic(slots, 0)
        write(kv_cache, rows, slots)
        assert torch.equal(kv_cache.view(-1, 24)[slots[1:]], rows[1:] * 2)
    assert counter.frame_count == 1
