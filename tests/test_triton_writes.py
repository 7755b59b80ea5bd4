"""What torch sees our Triton kernels write, checked on CPU.

The ops' CUDA bodies are traced on fake CUDA tensors with dynamic sizes, functionalized as
AOTAutograd does for Inductor, so that every launch becomes a triton_kernel_wrapper_functional
node whose tensors_to_clone names the tensors the kernel writes, found by torch's analysis of the
kernel's TTIR (were it to fail, torch would take every input as written). The analysis asks
Triton for the current target: a stand-in driver reports an sm90 CUDA target; mla_decode_triton,
which sizes its grid by the SM count, gets an H100's SM count and compute capability from a
stand-in. No GPU is needed.

1. Every launch writes exactly the tensors it stores to: outputs, workspaces and the state of ops
   with mutates_args, and no tensor it only reads. The analysis is conservative across calls to
   @triton.jit helpers: a helper's result counts as derived from every argument of the call, so
   an index tensor (cu_seqlens, the chunk table, seq_lens) that a helper loads counts as written
   once the offset the helper returns enters a store's address. Inductor then clones that input
   for the kernel and copies it back (a mutated input: extra kernels, and CUDA-graph trees skip
   graphs with mutated inputs). Our kernels load index tensors in their own bodies and pass the
   loaded values to helpers.
2. No written tensor has a size-1 dim with a symbolic stride, as a [B, T, ...] buffer has with
   B = 1 and a dynamic T (the packed prefill): torch 2.11's Inductor fails to decompose such a
   launch (pytorch#181735, an AssertionError in decompose_triton_kernel_wrapper_functional; fixed
   in later torch, so compiling here cannot show it).
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
from torch.library import wrap_triton
from triton.backends.compiler import GPUTarget

import kda_ops  # noqa: F401  (registers the ops)
from kda_ops.kernels import mla_decode as mla_decode_kernels
from kda_ops.meta.chunk_kda import chunk_kda_residuals_meta

H, K, V = 2, 16, 32  # K = 16: one K tile in the backward's intra kernel (its [NK, 2, ...] partial sums)
S, W = 4, 4  # decode: state-pool slots, conv width
MLA_H, MLA_D, MLA_V, MLA_PAGE = 16, 576, 512, 16
H100_SMS = 132


class _Sm90Driver:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


@pytest.fixture
def shapes(monkeypatch):
    """Triton's current target reported as sm90 and the device as an H100 (SM count, capability),
    a fake mode (its CUDA tensors need no GPU) and a factory of dynamic sizes."""
    monkeypatch.setattr(triton.runtime.driver, "_active", _Sm90Driver())
    monkeypatch.setattr(mla_decode_kernels, "device_sm_count_and_arch", lambda device: (H100_SMS, (9, 0)))
    env = ShapeEnv()

    def dynamic(name: str, hint: int):
        return env.create_symintnode(env.create_symbol(hint, ConstantSource(name)), hint=hint)

    return FakeTensorMode(shape_env=env), dynamic


def _launches(fn, mode, *args) -> list[tuple[str, dict, list[str]]]:
    """(kernel, arguments, names of the arguments it writes) of every Triton launch in fn."""
    with mode:
        gm = make_fx(dispatch_functionalize(fn))(*args)
    launches = gm.graph.find_nodes(op="call_function", target=torch.ops.higher_order.triton_kernel_wrapper_functional)
    assert launches, "no Triton launch was traced: the ops took their reference path"
    return [
        (kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__, n.kwargs["kwargs"], n.kwargs["tensors_to_clone"])
        for n in launches
    ]


def _written(fn, mode, *args) -> list[tuple[str, str, torch.Tensor]]:
    """(kernel, argument, fake value) of every tensor a Triton launch in fn writes."""
    return [
        (kernel, name, kwargs[name].meta["val"]) for kernel, kwargs, names in _launches(fn, mode, *args) for name in names
    ]


def _kda_inputs(T, *, dtype=torch.bfloat16):
    q, k = (torch.randn(1, T, H, K, dtype=dtype, device="cuda") for _ in range(2))
    v = torch.randn(1, T, H, V, dtype=dtype, device="cuda")
    g = torch.randn(1, T, H, K, dtype=torch.float32, device="cuda")
    beta = torch.rand(1, T, H, dtype=dtype, device="cuda")
    return q, k, v, g, beta


# ---- 1. every launch writes exactly what it stores to ---------------------------------------------


def _varlen_inputs(dynamic, varlen):
    """(cu_seqlens, initial state, final-state gradient) of N packed sequences, or three Nones."""
    if not varlen:
        return None, None, None
    N = dynamic("N", 3)
    cu_seqlens = torch.zeros(N + 1, dtype=torch.int32, device="cuda")
    return cu_seqlens, *(torch.randn(N, H, K, V, device="cuda") for _ in range(2))


def _chunk_kda_fwd(dynamic, varlen, save=False):
    T = dynamic("T", 100)
    q, k, v, g, beta = _kda_inputs(T)
    cu_seqlens, h0, _ = _varlen_inputs(dynamic, varlen)

    def fwd(q, k, v, g, beta, h0, cu_seqlens):
        return torch.ops.kda.chunk_kda_fwd(q, k, v, g, beta, h0, cu_seqlens, K**-0.5, varlen, varlen, save)

    return fwd, (q, k, v, g, beta, h0, cu_seqlens)


def _chunk_kda_bwd(dynamic, varlen, residuals=False):
    T = dynamic("T", 100)
    q, k, v, g, beta = _kda_inputs(T)
    do = torch.randn(1, T, H, V, dtype=q.dtype, device="cuda")
    cu_seqlens, h0, dht = _varlen_inputs(dynamic, varlen)
    saved = chunk_kda_residuals_meta(q, varlen, save=True) if residuals else (None,) * 4

    def bwd(q, k, v, g, beta, h0, cu_seqlens, do, dht, *saved):
        return torch.ops.kda.chunk_kda_bwd(q, k, v, g, beta, h0, cu_seqlens, do, dht, K**-0.5, varlen, *saved)

    return bwd, (q, k, v, g, beta, h0, cu_seqlens, do, dht, *saved)


def _kda_decode(dynamic, gate):
    T = dynamic("T", 4)
    q, k, v, g, beta = _kda_inputs(T)
    state = torch.zeros(S, H, K, V, device="cuda")
    slots = torch.zeros(1, dtype=torch.int32, device="cuda")
    A_log, dt_bias = (torch.randn(H, device="cuda"), torch.randn(H * K, device="cuda")) if gate else (None, None)

    def decode(q, k, v, g, beta, state, slots, A_log, dt_bias):
        return torch.ops.kda.kda_decode(q, k, v, g, beta, state, slots, K**-0.5, gate, A_log, dt_bias)

    return decode, (q, k, v, g, beta, state, slots, A_log, dt_bias)


def _causal_conv1d_update(dynamic):
    T = dynamic("T", 4)
    x = torch.randn(1, T, H * K, dtype=torch.bfloat16, device="cuda")
    conv_state = torch.zeros(S, H * K, W - 1, dtype=x.dtype, device="cuda")
    weight = torch.randn(H * K, W, dtype=x.dtype, device="cuda")
    slots = torch.zeros(1, dtype=torch.int32, device="cuda")
    return torch.ops.kda.causal_conv1d_update, (x, conv_state, weight, slots)


def _mla_inputs(dynamic):
    B = dynamic("B", 3)
    q = torch.randn(B, MLA_H, MLA_D, dtype=torch.bfloat16, device="cuda")
    kv_cache = torch.randn(8, MLA_PAGE, MLA_D, dtype=q.dtype, device="cuda")
    block_table = torch.zeros(B, 4, dtype=torch.int32, device="cuda")
    seq_lens = torch.zeros(B, dtype=torch.int32, device="cuda")
    return q, kv_cache, block_table, seq_lens


def _mla_decode(dynamic):
    def decode(q, kv_cache, block_table, seq_lens):
        return torch.ops.kda.mla_decode(q, kv_cache, block_table, seq_lens, MLA_D**-0.5, MLA_V)

    return decode, _mla_inputs(dynamic)


def _mla_decode_one_page_tiles(dynamic):
    """Tiles as tall as a page (one scalar page id per tile; the table's 64-token tiles span four
    16-token pages): the launcher is called with the config, as the tune script does."""
    config = mla_decode_kernels.MLADecodeConfig(
        block_h=16, block_n=MLA_PAGE, num_warps=4, num_stages=5, programs_per_sm=1
    )

    def decode(q, kv_cache, block_table, seq_lens):
        o = torch.empty(q.shape[0], MLA_H, MLA_V, dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[0], MLA_H, dtype=torch.float32, device=q.device)
        mla_decode_kernels.mla_decode_triton(
            q, kv_cache, block_table, seq_lens, o, lse, MLA_D**-0.5, MLA_V, config=config, launch=wrap_triton
        )
        return o, lse

    return decode, _mla_inputs(dynamic)


def _mla_cache_write(dynamic):
    N = dynamic("N", 3)
    kv_cache = torch.randn(8, MLA_PAGE, MLA_D, dtype=torch.bfloat16, device="cuda")
    rows = torch.randn(N, MLA_D, dtype=kv_cache.dtype, device="cuda")
    slot_mapping = torch.zeros(N, dtype=torch.int64, device="cuda")

    return torch.ops.kda.mla_cache_write, (kv_cache, rows, slot_mapping)


_TABLE = ("chunk_kda_fwd_table_kernel", "chunk_offsets chunk_seq")
_FWD_GATE = "gc gl kg qg"  # the norms (rqk) too with the in-kernel L2 norm
_FWD_INTRA = ("chunk_kda_fwd_intra_kernel", "akk aqk")
# (id, inputs and op, [(kernel, the arguments it writes), per launch in order])
WRITE_CASES = [
    ("chunk_kda_fwd-plain", lambda d: _chunk_kda_fwd(d, False), [
        ("chunk_kda_fwd_gate_kernel", _FWD_GATE),
        _FWD_INTRA,
        ("chunk_kda_fwd_solve_kernel", "u w"),
        ("chunk_kda_fwd_scan_kernel", "o"),
    ]),
    ("chunk_kda_fwd-varlen-h0-final-l2norm", lambda d: _chunk_kda_fwd(d, True), [
        _TABLE,
        ("chunk_kda_fwd_gate_kernel", _FWD_GATE + " rqk"),
        _FWD_INTRA,
        ("chunk_kda_fwd_solve_kernel", "u w"),
        ("chunk_kda_fwd_scan_kernel", "ht o"),
    ]),
    ("chunk_kda_fwd-residuals", lambda d: _chunk_kda_fwd(d, False, save=True), [
        ("chunk_kda_fwd_gate_kernel", _FWD_GATE),
        _FWD_INTRA,
        ("chunk_kda_fwd_solve_kernel", "tkk u w"),
        ("chunk_kda_fwd_scan_kernel", "o"),
    ]),
    ("chunk_kda_fwd-varlen-h0-final-l2norm-residuals", lambda d: _chunk_kda_fwd(d, True, save=True), [
        _TABLE,
        ("chunk_kda_fwd_gate_kernel", _FWD_GATE + " rqk"),
        _FWD_INTRA,
        ("chunk_kda_fwd_solve_kernel", "tkk u w"),
        ("chunk_kda_fwd_scan_kernel", "ht o"),
    ]),
    ("chunk_kda_bwd-plain", lambda d: _chunk_kda_bwd(d, False), [
        ("chunk_kda_fwd_gate_kernel", _FWD_GATE),
        _FWD_INTRA,
        ("chunk_kda_fwd_solve_kernel", "tkk u w"),
        ("chunk_kda_bwd_state_kernel", "h v_new"),
        ("chunk_kda_bwd_dstate_kernel", "dh dv_new"),
        ("chunk_kda_bwd_wy_kernel", "db dv dv_new mkk mqk"),
        ("chunk_kda_bwd_intra_kernel", "db dg dglp dk dq"),
        ("chunk_kda_bwd_finish_kernel", "dbeta dg"),
    ]),
    ("chunk_kda_bwd-varlen-h0-dht-l2norm", lambda d: _chunk_kda_bwd(d, True), [
        _TABLE,
        ("chunk_kda_fwd_gate_kernel", _FWD_GATE + " rqk"),
        _FWD_INTRA,
        ("chunk_kda_fwd_solve_kernel", "tkk u w"),
        ("chunk_kda_bwd_state_kernel", "h v_new"),
        ("chunk_kda_bwd_dstate_kernel", "dh dh0 dv_new"),
        ("chunk_kda_bwd_wy_kernel", "db dv dv_new mkk mqk"),
        ("chunk_kda_bwd_intra_kernel", "db dg dglp dk dq ds"),
        ("chunk_kda_bwd_finish_kernel", "dbeta dg dk dq"),
    ]),
    ("chunk_kda_bwd-varlen-h0-dht-l2norm-residuals", lambda d: _chunk_kda_bwd(d, True, residuals=True), [
        _TABLE,
        ("chunk_kda_bwd_prep_kernel", "gl kg qg u w"),
        ("chunk_kda_bwd_state_kernel", "h v_new"),
        ("chunk_kda_bwd_dstate_kernel", "dh dh0 dv_new"),
        ("chunk_kda_bwd_wy_kernel", "db dv dv_new mkk mqk"),
        ("chunk_kda_bwd_intra_kernel", "db dg dglp dk dq ds"),
        ("chunk_kda_bwd_finish_kernel", "dbeta dg dk dq"),
    ]),
    ("kda_decode-plain", lambda d: _kda_decode(d, False), [("kda_decode_kernel", "o state")]),
    ("kda_decode-gate-l2norm", lambda d: _kda_decode(d, True), [("kda_decode_kernel", "o state")]),
    ("causal_conv1d_update", _causal_conv1d_update, [("causal_conv1d_update_kernel", "conv_state y")]),
    ("mla_decode", _mla_decode, [
        ("mla_decode_split_kernel", "lse_part o_part part_span"),
        ("mla_decode_combine_kernel", "lse o"),
    ]),
    ("mla_decode-one-page-tiles", _mla_decode_one_page_tiles, [
        ("mla_decode_split_kernel", "lse_part o_part part_span"),
        ("mla_decode_combine_kernel", "lse o"),
    ]),
    ("mla_cache_write", _mla_cache_write, [("mla_cache_write_kernel", "kv_cache")]),
]


@pytest.mark.parametrize("build, expected", [pytest.param(b, e, id=i) for i, b, e in WRITE_CASES])
def test_kernels_write_exactly_what_they_store_to(shapes, build, expected):
    mode, dynamic = shapes
    with mode:
        fn, args = build(dynamic)
    launches = _launches(fn, mode, *args)
    assert [kernel for kernel, _, _ in launches] == [kernel for kernel, _ in expected]
    wrong = [
        f"{kernel}: counted as written but not expected {sorted(set(got) - set(want.split()))}, "
        f"expected but not counted {sorted(set(want.split()) - set(got))}"
        for (kernel, _, got), (_, want) in zip(launches, expected)
        if set(got) != set(want.split())
    ]
    assert not wrong, "\n".join(wrong)


# ---- 2. no written tensor has a size-1 dim with a symbolic stride ---------------------------------


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


@pytest.mark.parametrize("build", [_chunk_kda_fwd, _chunk_kda_bwd])
@pytest.mark.parametrize("varlen", [pytest.param(True, id="varlen-h0-final-l2norm"), pytest.param(False, id="plain")])
def test_chunk_kda_writes_no_size1_dim_with_symbolic_stride(shapes, build, varlen):
    mode, dynamic = shapes
    with mode:
        fn, args = build(dynamic, varlen)
    _assert_no_size1_dim_with_symbolic_stride(_written(fn, mode, *args))


@pytest.mark.parametrize("build", [lambda d: _kda_decode(d, True), _causal_conv1d_update], ids=["kda_decode", "conv"])
def test_decode_ops_write_no_size1_dim_with_symbolic_stride(shapes, build):
    mode, dynamic = shapes
    with mode:
        fn, args = build(dynamic)
    _assert_no_size1_dim_with_symbolic_stride(_written(fn, mode, *args))
