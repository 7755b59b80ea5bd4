"""kda::chunk_kda_fwd / kda::chunk_kda_bwd as torch.library ops: opcheck, gradcheck, contract
errors, torch.compile and torch.export (CPU reference path)."""

import pytest
import torch
import torch._dynamo
from kda_inputs import GATE_LOWER_BOUND, kda_inputs, kimi_gate_inputs
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode

import kda_ops
from kda_ops.meta._contract import ContractError
from kda_ops.meta.kda_recurrent import kda_gate, recurrent_kda

OPCHECK_CASES = [
    pytest.param(dict(initial_state=False, varlen=False, final=False, l2norm=False), id="plain"),
    pytest.param(dict(initial_state=True, varlen=False, final=True, l2norm=True), id="h0-final-l2norm"),
    pytest.param(dict(initial_state=True, varlen=True, final=True, l2norm=False), id="varlen-h0-final"),
    pytest.param(dict(initial_state=False, varlen=True, final=False, l2norm=True), id="varlen-l2norm"),
]


def _op_args(case, dtype=torch.float32, requires_grad=True):
    if case["varlen"]:
        cu_seqlens = torch.tensor([0, 5, 70, 75], dtype=torch.int32)
        x = kda_inputs(1, 75, 2, 16, 8, dtype=dtype, n_states=3, initial_state=case["initial_state"])
    else:
        cu_seqlens = None
        x = kda_inputs(2, 70, 2, 16, 8, dtype=dtype, initial_state=case["initial_state"])
    for t in x.values():
        if t is not None:
            t.requires_grad_(requires_grad)
    return (x["q"], x["k"], x["v"], x["g"], x["beta"], x["initial_state"], cu_seqlens, 0.25, case["final"], case["l2norm"])


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck_chunk_kda_fwd(case):
    torch.library.opcheck(torch.ops.kda.chunk_kda_fwd.default, _op_args(case))
    torch.library.opcheck(torch.ops.kda.chunk_kda_fwd_reference.default, _op_args(case, requires_grad=False))


@pytest.mark.parametrize("case", OPCHECK_CASES)
@pytest.mark.parametrize("with_dht", [pytest.param(True, id="dht"), pytest.param(False, id="no-dht")])
def test_opcheck_chunk_kda_bwd(case, with_dht):
    q, k, v, g, beta, h0, cu_seqlens, scale, _, l2norm = _op_args(case, requires_grad=False)
    n = 3 if cu_seqlens is not None else 2
    do = torch.randn_like(v)
    dht = torch.randn(n, 2, 16, 8) if with_dht else None
    args = (q, k, v, g, beta, h0, cu_seqlens, do, dht, scale, l2norm)
    torch.library.opcheck(torch.ops.kda.chunk_kda_bwd.default, args)
    torch.library.opcheck(torch.ops.kda.chunk_kda_bwd_reference.default, args)


def _in_op_gate_args(varlen, dtype=torch.float32):
    """_op_args with g replaced by the gate's pre-activation z, then A_log and dt_bias."""
    q, k, v, g, beta, h0, cu_seqlens, scale, final, l2norm = _op_args(
        dict(initial_state=varlen, varlen=varlen, final=varlen, l2norm=varlen), dtype, requires_grad=False
    )
    z, A_log, dt_bias = kimi_gate_inputs(*g.shape, z_dtype=dtype, strong_head=True)
    return (q, k, v, z, beta, h0, cu_seqlens, scale, final, l2norm), A_log.to(dtype), dt_bias.to(dtype)


# (varlen with h0, final state and the L2 norm; the bounded form's lower bound, None for softplus)
IN_OP_GATE_CASES = [
    pytest.param(False, None, id="dense"),
    pytest.param(True, None, id="varlen-h0-final-l2norm"),
    pytest.param(False, GATE_LOWER_BOUND, id="bounded-dense"),
    pytest.param(True, GATE_LOWER_BOUND, id="bounded-varlen-h0-final-l2norm"),
]


@pytest.mark.parametrize("varlen, bound", IN_OP_GATE_CASES)
def test_opcheck_in_op_gate(varlen, bound):
    args, A_log, dt_bias = _in_op_gate_args(varlen)
    torch.library.opcheck(torch.ops.kda.chunk_kda_fwd.default, (*args, False, A_log, dt_bias, bound))
    q, k, v, z, beta, h0, cu_seqlens, scale, _, l2norm = args
    dht = torch.randn(3, 2, 16, 8) if varlen else None
    bwd_args = (q, k, v, z, beta, h0, cu_seqlens, torch.randn_like(v), dht, scale, l2norm)
    torch.library.opcheck(
        torch.ops.kda.chunk_kda_bwd.default, (*bwd_args, None, None, None, None, A_log, dt_bias, bound)
    )


@pytest.mark.parametrize("varlen, bound", IN_OP_GATE_CASES)
def test_in_op_gate_matches_gate_before_the_op(varlen, bound):
    """chunk_kda(z, A_log, dt_bias) against chunk_kda(kda_gate(z, A_log, dt_bias)) with autograd
    through meta's gate (fp64): outputs and every gradient, dz, dA_log and ddt_bias included."""
    args, A_log, dt_bias = _in_op_gate_args(varlen, torch.float64)
    q, k, v, z, beta, h0, cu_seqlens, scale, _, l2norm = args
    leaves = [t.requires_grad_() for t in (q, k, v, z, beta, A_log, dt_bias)]
    kw = dict(scale=scale, initial_state=h0, output_final_state=True, use_qk_l2norm=l2norm, cu_seqlens=cu_seqlens)
    o, s = kda_ops.chunk_kda(q, k, v, z, beta, A_log=A_log, dt_bias=dt_bias, gate_lower_bound=bound, **kw)
    o_ref, s_ref = kda_ops.chunk_kda(q, k, v, kda_gate(z, A_log, dt_bias, bound), beta, **kw)
    do, ds = torch.randn_like(o), torch.randn_like(s)
    grads = torch.autograd.grad((o, s), leaves, (do, ds))
    grads_ref = torch.autograd.grad((o_ref, s_ref), leaves, (do, ds))
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(("q", "k", "v", "z", "beta", "A_log", "dt_bias"), grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"d{name}: {m}")


GRADCHECK_CASES = [
    pytest.param(dict(B=1, T=5, initial_state=True, l2norm=False), None, id="T5-h0"),
    pytest.param(dict(B=2, T=67, initial_state=True, l2norm=True), None, id="T67-h0-l2norm"),
    pytest.param(dict(B=1, T=9, initial_state=True, l2norm=True), [0, 1, 4, 9], id="varlen-1-3-5"),
]


@pytest.mark.parametrize("case, lengths", GRADCHECK_CASES)
def test_gradcheck_every_input(case, lengths):
    case = dict(case)
    l2norm = case.pop("l2norm")
    cu_seqlens = None if lengths is None else torch.tensor(lengths)
    n = case["B"] if lengths is None else len(lengths) - 1
    x = kda_inputs(T=case["T"], B=case["B"], H=2, K=4, V=3, n_states=n, initial_state=case["initial_state"], requires_grad=True)

    def f(q, k, v, g, beta, h0):
        o, s = kda_ops.chunk_kda(
            q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm=l2norm, cu_seqlens=cu_seqlens
        )
        return o, s

    # Full Jacobians on the smallest cases; random projections (fast_mode) past one chunk.
    torch.autograd.gradcheck(f, tuple(x.values()), eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=case["T"] > 8)


def test_backward_matches_autograd_through_recurrence():
    """The op's gradients equal autograd through the naive recurrence (fp64)."""
    x = kda_inputs(1, 70, 2, 12, 10, initial_state=True, gate_floor_channels=2, requires_grad=True)
    leaves = [t for t in x.values()]
    o, s = kda_ops.chunk_kda(**x, output_final_state=True, use_qk_l2norm=True)
    o_ref, s_ref = recurrent_kda(**x, output_final_state=True, use_qk_l2norm=True)
    do, ds = torch.randn_like(o), torch.randn_like(s)
    grads = torch.autograd.grad((o, s), leaves, (do, ds))
    grads_ref = torch.autograd.grad((o_ref, s_ref), leaves, (do, ds))
    for name, a, b in zip(x, grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"d{name}: {m}")


def test_without_final_state_returns_none_and_differentiates():
    x = kda_inputs(1, 20, 2, 8, 8, initial_state=True, requires_grad=True)
    o, s = kda_ops.chunk_kda(**x)
    assert s is None
    o.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in x.values())


def test_final_state_alone_differentiates():
    """A loss of the final state only: autograd hands the backward no output gradient (no
    zero-filled ones are materialised), which it treats as zero."""
    x = kda_inputs(1, 70, 2, 4, 3, initial_state=True, requires_grad=True)

    def final_state(q, k, v, g, beta, h0):
        return kda_ops.chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)[1]

    torch.autograd.gradcheck(final_state, tuple(x.values()), eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=True)


def _valid_inputs():
    x = kda_inputs(1, 8, 2, 4, 4, dtype=torch.float32, initial_state=True)
    return dict(q=x["q"], k=x["k"], v=x["v"], g=x["g"], beta=x["beta"], initial_state=x["initial_state"])


CONTRACT_CASES = [
    pytest.param("k", lambda x: x["k"].to(torch.float16), "dtype", id="k-dtype"),
    pytest.param("v", lambda x: x["v"][:, :5], "shape", id="v-length"),
    pytest.param("g", lambda x: x["g"].to(torch.bfloat16), "dtype", id="g-not-fp32"),
    pytest.param("beta", lambda x: x["beta"][..., None], "3-d", id="beta-ndim"),
    pytest.param("q", lambda x: x["q"][0], "4-d", id="q-ndim"),
    pytest.param("initial_state", lambda x: x["initial_state"][:, :1], "shape", id="h0-heads"),
    pytest.param("initial_state", lambda x: x["initial_state"].double(), "dtype", id="h0-dtype"),
    pytest.param("k", lambda x: x["k"].to("meta"), "device", id="k-device"),
]


@pytest.mark.parametrize("name, corrupt, expected", CONTRACT_CASES)
@pytest.mark.parametrize("fake", [pytest.param(False, id="eager"), pytest.param(True, id="fake")])
def test_contract_errors_name_the_argument(name, corrupt, expected, fake):
    x = _valid_inputs()
    x[name] = corrupt(x)
    if fake:
        mode = FakeTensorMode()
        x = {n: mode.from_tensor(t) for n, t in x.items()}
    with pytest.raises(ContractError, match=rf"'{name}' expected .*{expected}"):
        kda_ops.chunk_kda(**x, output_final_state=True)


GATE_CONTRACT_CASES = [
    pytest.param("dt_bias", dict(dt_bias=None), "a tensor when A_log is given", id="dt_bias-missing"),
    pytest.param("A_log", dict(A_log=None), "a tensor when dt_bias is given", id="A_log-missing"),
    pytest.param("A_log", dict(A_log=torch.zeros(2, dtype=torch.float16)), "dtype", id="A_log-dtype"),
    pytest.param("dt_bias", dict(dt_bias=torch.zeros(4)), "shape", id="dt_bias-shape"),
    pytest.param("g", dict(g=torch.zeros(1, 8, 2, 4, dtype=torch.float16)), "dtype", id="z-dtype"),
    pytest.param("gate_lower_bound", dict(gate_lower_bound=0.0), "a finite float < 0", id="bound-zero"),
    pytest.param("gate_lower_bound", dict(gate_lower_bound=float("-inf")), "a finite float < 0", id="bound-inf"),
    pytest.param("gate_lower_bound", dict(gate_lower_bound=-5.0, A_log=None, dt_bias=None), "None without A_log",
                 id="bound-without-gate"),
]


@pytest.mark.parametrize("name, change, expected", GATE_CONTRACT_CASES)
@pytest.mark.parametrize("fake", [pytest.param(False, id="eager"), pytest.param(True, id="fake")])
def test_in_op_gate_contract_errors(name, change, expected, fake):
    """With the in-op gate g may be z in q's dtype or fp32; A_log [H] and dt_bias [H*K] come together."""
    x = dict(_valid_inputs(), A_log=torch.zeros(2), dt_bias=torch.zeros(8))
    x.update(change)
    if fake:
        mode = FakeTensorMode()
        x = {n: t if t is None or isinstance(t, float) else mode.from_tensor(t) for n, t in x.items()}
    with pytest.raises(ContractError, match=rf"'{name}' expected .*{expected}"):
        kda_ops.chunk_kda(**x, output_final_state=True)


def _residuals(B, T, H, K, l2norm):
    """Correctly shaped residuals of kda::chunk_kda_fwd (save_for_backward on the Triton path)."""
    gc, aqk, tkk = torch.zeros(B * T, H, K), torch.zeros(B * T, H, 64), torch.zeros(B * T, H, 64)
    return dict(gc=gc, aqk=aqk, tkk=tkk, rqk=torch.zeros(B * T, H, 2) if l2norm else torch.zeros(0))


RESIDUAL_CONTRACT_CASES = [
    pytest.param("tkk", lambda r: None, False, "a tensor .*all together", id="tkk-missing"),
    pytest.param("aqk", lambda r: r["aqk"][..., :32], False, "shape", id="aqk-columns"),
    pytest.param("gc", lambda r: r["gc"].double(), False, "dtype", id="gc-dtype"),
    pytest.param("rqk", lambda r: torch.zeros(8, 2, 2), False, "shape", id="rqk-without-l2norm"),
    pytest.param("rqk", lambda r: r["rqk"][:4], True, "shape", id="rqk-rows"),
]


@pytest.mark.parametrize("name, corrupt, l2norm, expected", RESIDUAL_CONTRACT_CASES)
@pytest.mark.parametrize("fake", [pytest.param(False, id="eager"), pytest.param(True, id="fake")])
def test_backward_residual_contract_errors(name, corrupt, l2norm, expected, fake):
    x = _valid_inputs()
    residuals = _residuals(1, 8, 2, 4, l2norm)
    residuals[name] = corrupt(residuals)
    do = torch.randn_like(x["v"])
    tensors = dict(x, do=do, **residuals)
    if fake:
        mode = FakeTensorMode()
        tensors = {n: None if t is None else mode.from_tensor(t) for n, t in tensors.items()}
    t = tensors
    with pytest.raises(ContractError, match=rf"'{name}' expected {expected}"):
        torch.ops.kda.chunk_kda_bwd(t["q"], t["k"], t["v"], t["g"], t["beta"], t["initial_state"], None, t["do"],
                                    None, 0.5, l2norm, t["gc"], t["aqk"], t["tkk"], t["rqk"])


def test_forward_keeps_residuals_only_on_the_triton_path():
    """On the reference path save_for_backward leaves the four residuals empty; autograd then
    recomputes everything (the residual path is covered by the GPU tests)."""
    x = _valid_inputs()
    outs = torch.ops.kda.chunk_kda_fwd(*x.values(), None, 0.5, True, False, True)
    assert len(outs) == 6 and all(r.shape == (0,) and r.dtype == torch.float32 for r in outs[2:])


def test_varlen_contract_requires_batch_one():
    x = kda_inputs(2, 8, 2, 4, 4, dtype=torch.float32)
    with pytest.raises(ContractError, match=r"'q' expected batch size 1"):
        kda_ops.chunk_kda(**x, cu_seqlens=torch.tensor([0, 3, 8]))


def _train_step(q, k, v, g, beta, h0):
    o, s = kda_ops.chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm=True)
    return o.square().mean() + s.square().mean()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_one_frame_for_three_lengths(backend):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    step = torch.compile(_train_step, backend=counter, fullgraph=True)
    for i, T in enumerate((16, 70, 130)):
        x = kda_inputs(1, T, 2, 8, 8, dtype=torch.float32, initial_state=True, requires_grad=True)
        if i == 0:
            for name in ("q", "k", "v", "g", "beta"):
                torch._dynamo.mark_dynamic(x[name], 1)
        loss = step(*x.values())
        grads = torch.autograd.grad(loss, list(x.values()))
        loss_ref = _train_step(*x.values())
        grads_ref = torch.autograd.grad(loss_ref, list(x.values()))
        torch.testing.assert_close(loss, loss_ref)
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b)
    assert counter.frame_count == 1


@pytest.mark.parametrize("bound", [pytest.param(None, id="softplus"), pytest.param(GATE_LOWER_BOUND, id="bounded")])
def test_compile_fullgraph_in_op_gate(bound):
    """A training step through the in-op gate compiles to one frame; gradients of z, A_log and
    dt_bias match eager."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def step(q, k, v, z, beta, A_log, dt_bias):
        o, _ = kda_ops.chunk_kda(
            q, k, v, z, beta, use_qk_l2norm=True, A_log=A_log, dt_bias=dt_bias, gate_lower_bound=bound
        )
        return o.square().mean()

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    args, A_log, dt_bias = _in_op_gate_args(False)
    leaves = [t.requires_grad_() for t in (*args[:5], A_log, dt_bias)]
    grads = torch.autograd.grad(compiled(*leaves), leaves)
    grads_ref = torch.autograd.grad(step(*leaves), leaves)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)
    assert counter.frame_count == 1


class _KDAModule(torch.nn.Module):
    def forward(self, q, k, v, g, beta, h0):
        return kda_ops.chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm=True)


def test_export_save_load_roundtrip(tmp_path):
    x = kda_inputs(1, 70, 2, 8, 8, dtype=torch.float32, initial_state=True)
    T = torch.export.Dim("T", min=2, max=4096)
    seq = {1: T}
    ep = torch.export.export(
        _KDAModule(), tuple(x.values()),
        dynamic_shapes=(seq, seq, seq, seq, seq, None),
    )
    path = tmp_path / "chunk_kda.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path).module()
    y = kda_inputs(1, 33, 2, 8, 8, dtype=torch.float32, initial_state=True)
    for got, want in zip(loaded(*y.values()), _KDAModule()(*y.values())):
        torch.testing.assert_close(got, want)
