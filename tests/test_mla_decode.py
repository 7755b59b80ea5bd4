"""kda::mla_decode on the CPU reference path: the absorbed paged op against unabsorbed MLA
attention, poisoned caches, dtypes, opcheck, contract errors (eager and fake), torch.compile and
torch.export."""

import re

import pytest
import torch
import torch._dynamo
from mla_inputs import paged_cache
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode

import kda_ops
from kda_ops.meta._contract import ContractError
from kda_ops.meta.mla_decode import mla_attention_unabsorbed, mla_decode_reference

TINY = dict(H=4, d_nope=8, d_rope=8, d_latent=16, d_v=8)
KIMI = dict(H=4, d_nope=128, d_rope=64, d_latent=512, d_v=128)
NO_ROPE = dict(H=3, d_nope=16, d_rope=0, d_latent=32, d_v=16)

IDENTITY_CASES = [
    pytest.param([1], 16, TINY, id="L1-bs16"),
    pytest.param([63], 16, TINY, id="L63-bs16"),
    pytest.param([64], 64, TINY, id="L64-bs64"),
    pytest.param([65], 64, TINY, id="L65-bs64"),
    pytest.param([0, 1, 63, 64, 65, 130], 16, TINY, id="mixed-0-1-63-64-65-130-bs16"),
    pytest.param([65, 0, 64, 1, 63], 64, TINY, id="mixed-65-0-64-1-63-bs64"),
    pytest.param([0, 3, 17, 40], 16, KIMI, id="kimi-576-512-mixed-bs16"),
    pytest.param([5, 0, 33], 16, NO_ROPE, id="no-shared-key-dqk-eq-vdim"),
]


@pytest.mark.parametrize("lens, block_size, dims", IDENTITY_CASES)
def test_absorbed_equals_unabsorbed_attention(lens, block_size, dims):
    """Absorbed paged decode, then W_UV, equals ordinary attention over per-head decompressed keys
    and values (fp64); the poisoned rows and table entries do not reach the result."""
    H, d_nope, d_rope, d_latent, d_v = (dims[k] for k in ("H", "d_nope", "d_rope", "d_latent", "d_v"))
    B, scale = len(lens), (d_nope + d_rope) ** -0.5
    cache = paged_cache(lens, block_size, d_latent + d_rope)
    w_uk = torch.randn(H, d_nope, d_latent, dtype=torch.float64) / d_latent**0.5
    w_uv = torch.randn(H, d_v, d_latent, dtype=torch.float64) / d_latent**0.5
    q_nope = torch.randn(B, H, d_nope, dtype=torch.float64)
    q_pe = torch.randn(B, H, d_rope, dtype=torch.float64)
    q = torch.cat([torch.einsum("bhn,hnc->bhc", q_nope, w_uk), q_pe], dim=-1)  # absorbed query

    o_lat, lse = kda_ops.mla_decode(q, cache.kv_cache, cache.block_table, cache.seq_lens, scale=scale, v_dim=d_latent)

    assert o_lat.shape == (B, H, d_latent) and o_lat.dtype == torch.float64
    assert lse.shape == (B, H) and lse.dtype == torch.float64
    o = torch.einsum("bhc,hvc->bhv", o_lat, w_uv)
    for b, tokens in enumerate(cache.tokens):
        ref_o, ref_lse = mla_attention_unabsorbed(
            q_nope[b], q_pe[b], tokens[:, :d_latent], tokens[:, d_latent:], w_uk, w_uv, scale
        )
        torch.testing.assert_close(o[b], ref_o)
        torch.testing.assert_close(lse[b], ref_lse)
        if lens[b] == 0:  # a padded row: exactly zeros and -inf
            assert torch.equal(o_lat[b], torch.zeros_like(o_lat[b]))
            assert torch.equal(lse[b], torch.full_like(lse[b], float("-inf")))
        else:
            assert torch.isfinite(o_lat[b]).all() and torch.isfinite(lse[b]).all()


NEVER_READ_CASES = [
    pytest.param([0, 1, 63, 64, 65], 16, id="bs16"),
    pytest.param([65, 0, 130, 7], 64, id="bs64"),
]


@pytest.mark.parametrize("lens, block_size", NEVER_READ_CASES)
def test_unowned_rows_and_unused_entries_never_read(lens, block_size):
    """Changing every row no sequence owns (NaN -> +inf, -inf, huge) and every unused table entry
    (other out-of-range ids, then valid page ids) leaves both outputs bit-identical."""
    cache = paged_cache(lens, block_size, 24, dtype=torch.float32)
    q = torch.randn(len(lens), 4, 24)
    args = dict(scale=0.3, v_dim=16)
    o, lse = kda_ops.mla_decode(q, cache.kv_cache, cache.block_table, cache.seq_lens, **args)
    assert torch.isfinite(o).all()
    for poison, bad_id in ((float("inf"), 2**31 - 1), (float("-inf"), -(2**31)), (3e38, 0)):
        kv_cache = cache.kv_cache.clone()
        kv_cache[~cache.owned] = poison
        block_table = torch.where(cache.used, cache.block_table, bad_id)
        o2, lse2 = kda_ops.mla_decode(q, kv_cache, block_table, cache.seq_lens, **args)
        assert torch.equal(o2, o) and torch.equal(lse2, lse)


DTYPE_CASES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]


@pytest.mark.parametrize("dtype", DTYPE_CASES)
def test_low_precision_inputs_match_fp64(dtype):
    """bf16/fp16/fp32 inputs: o in q's dtype and lse fp32, equal to the fp64 computation on the
    same (rounded) inputs up to one rounding of o to the output dtype."""
    cache = paged_cache([0, 9, 64, 100], 16, 24, dtype=dtype)
    q = torch.randn(4, 4, 24).to(dtype)
    o, lse = kda_ops.mla_decode(q, cache.kv_cache, cache.block_table, cache.seq_lens, scale=0.3, v_dim=16)
    ref_o, ref_lse = mla_decode_reference(q.double(), cache.kv_cache.double(), cache.block_table, cache.seq_lens, 0.3, 16)
    assert o.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(o, ref_o.to(dtype))
    torch.testing.assert_close(lse, ref_lse.float())


def test_capacity_clamps_long_lengths():
    """A length above max_blocks * block_size reads exactly the table's capacity."""
    cache = paged_cache([32, 5], 16, 24, max_blocks=2)
    q = torch.randn(2, 4, 24, dtype=torch.float64)
    over = torch.tensor([1000, 5], dtype=torch.int32)
    o, lse = kda_ops.mla_decode(q, cache.kv_cache, cache.block_table, over, scale=0.3, v_dim=16)
    ref_o, ref_lse = kda_ops.mla_decode(q, cache.kv_cache, cache.block_table, cache.seq_lens, scale=0.3, v_dim=16)
    assert torch.equal(o, ref_o) and torch.equal(lse, ref_lse)


def _op_args(dtype=torch.float32):
    cache = paged_cache([0, 1, 17, 40], 16, 24, dtype=dtype)
    q = torch.randn(4, 3, 24).to(dtype)
    return (q, cache.kv_cache, cache.block_table, cache.seq_lens, 0.25, 16)


@pytest.mark.parametrize(
    "op",
    [
        pytest.param(torch.ops.kda.mla_decode.default, id="mla_decode"),
        pytest.param(torch.ops.kda.mla_decode_reference.default, id="mla_decode_reference"),
    ],
)
def test_opcheck(op):
    torch.library.opcheck(op, _op_args())


def _set(i, value):
    def edit(args):
        return args[:i] + (value(args[i]) if callable(value) else value,) + args[i + 1 :]

    return edit


Q, KV, BT, SL, SCALE, VDIM = range(6)

CONTRACT_CASES = [
    pytest.param(_set(Q, lambda t: t.to(torch.int32)), "q", "dtype", id="q-int-dtype"),
    pytest.param(_set(Q, lambda t: t[0]), "q", "3-d", id="q-2d"),
    pytest.param(_set(Q, lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)), "q", "contiguous last dimension", id="q-strided-last-dim"),
    pytest.param(_set(KV, lambda t: t.double()), "kv_cache", "dtype torch.float32", id="kv-dtype-mismatch"),
    pytest.param(_set(KV, lambda t: t[..., :20]), "kv_cache", "shape [num_blocks, block_size, 24]", id="kv-wrong-dqk"),
    pytest.param(_set(KV, lambda t: t[None]), "kv_cache", "3-d", id="kv-4d"),
    pytest.param(_set(KV, lambda t: t.to("meta")), "kv_cache", "device cpu", id="kv-other-device"),
    pytest.param(_set(BT, lambda t: t.long()), "block_table", "dtype torch.int32", id="bt-int64"),
    pytest.param(_set(BT, lambda t: t[:3]), "block_table", "shape [4, max_blocks]", id="bt-batch-mismatch"),
    pytest.param(_set(BT, lambda t: t[0]), "block_table", "2-d", id="bt-1d"),
    pytest.param(_set(SL, lambda t: t.long()), "seq_lens", "dtype torch.int32", id="sl-int64"),
    pytest.param(_set(SL, lambda t: t[:2]), "seq_lens", "shape [4]", id="sl-batch-mismatch"),
    pytest.param(_set(SL, lambda t: t[:, None]), "seq_lens", "1-d", id="sl-2d"),
    pytest.param(_set(VDIM, 25), "v_dim", "1 <= v_dim <= 24", id="vdim-too-large"),
    pytest.param(_set(VDIM, 0), "v_dim", "1 <= v_dim <= 24", id="vdim-zero"),
]


@pytest.mark.parametrize("edit, name, expected", CONTRACT_CASES)
@pytest.mark.parametrize("fake", [pytest.param(False, id="eager"), pytest.param(True, id="fake")])
def test_contract_errors_name_the_argument(edit, name, expected, fake):
    args = edit(_op_args())
    if fake:
        mode = FakeTensorMode(allow_non_fake_inputs=False)
        args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
    q, kv_cache, block_table, seq_lens, scale, v_dim = args
    pattern = rf"kda::mla_decode: argument '{name}' expected .*{re.escape(expected)}.*, got "
    with pytest.raises(ContractError, match=pattern):
        if fake:
            with mode:
                kda_ops.mla_decode(q, kv_cache, block_table, seq_lens, scale=scale, v_dim=v_dim)
        else:
            kda_ops.mla_decode(q, kv_cache, block_table, seq_lens, scale=scale, v_dim=v_dim)


def _decode_and_scale(q, kv_cache, block_table, seq_lens):
    o, lse = kda_ops.mla_decode(q, kv_cache, block_table, seq_lens, scale=0.3, v_dim=16)
    return o * 2.0, lse


def test_compile_fullgraph_one_frame_across_batch_and_table_sizes():
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_decode_and_scale, backend=counter, fullgraph=True)
    for i, (lens, max_blocks) in enumerate((([0, 17, 40], 4), ([5, 64, 1, 30, 2], 6), ([100, 3], 9))):
        cache = paged_cache(lens, 16, 24, num_blocks=16, max_blocks=max_blocks)
        q = torch.randn(len(lens), 4, 24, dtype=torch.float64)
        args = (q, cache.kv_cache, cache.block_table, cache.seq_lens)
        if i == 0:
            torch._dynamo.mark_dynamic(q, 0)
            torch._dynamo.mark_dynamic(cache.block_table, 0)
            torch._dynamo.mark_dynamic(cache.block_table, 1)
            torch._dynamo.mark_dynamic(cache.seq_lens, 0)
        out, ref = compiled(*args), _decode_and_scale(*args)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert counter.frame_count == 1


class _Decode(torch.nn.Module):
    def forward(self, q, kv_cache, block_table, seq_lens):
        return kda_ops.mla_decode(q, kv_cache, block_table, seq_lens, scale=0.3, v_dim=16)


def test_export_save_load_run(tmp_path):
    cache = paged_cache([0, 17, 40], 16, 24, dtype=torch.float32)
    args = (torch.randn(3, 4, 24), cache.kv_cache, cache.block_table, cache.seq_lens)
    ep = torch.export.export(_Decode(), args)
    assert any(node.target is torch.ops.kda.mla_decode.default for node in ep.graph.nodes)
    path = tmp_path / "mla_decode.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    torch.testing.assert_close(loaded.module()(*args), _Decode()(*args), rtol=0, atol=0)
