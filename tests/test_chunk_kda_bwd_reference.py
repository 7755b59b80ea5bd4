"""The chunked analytic KDA backward (meta/chunk_kda_bwd.py) against torch.autograd through the
naive recurrence (meta/kda_recurrent.py): every gradient, fp64 to ~1e-9, plus one fp32 check."""

import zlib

import pytest
import torch
import torch.nn.functional as F

from kda_ops.meta.chunk_kda_bwd import chunk_kda_bwd_reference
from kda_ops.meta.kda_recurrent import kda_gate, recurrent_kda
from kda_inputs import rel_rms

NAMES = ("dq", "dk", "dv", "dg", "dbeta", "dh0")


def make_inputs(seed, B, lengths, H, K, V, *, h0, dht, l2norm, gate, dtype):
    """Fresh random inputs; lengths is T (B sequences of T tokens) or the list of varlen sequence
    lengths packed into B = 1."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    T = sum(lengths) if isinstance(lengths, list) else lengths
    N = len(lengths) if isinstance(lengths, list) else B
    q = randn(B, T, H, K)
    # Without the in-op norm, keep |k| near 1 so the delta rule stays contractive.
    k = randn(B, T, H, K) * (1.0 if l2norm else K**-0.5)
    v = randn(B, T, H, V)
    g = F.logsigmoid(randn(B, T, H, K) + 3.0)  # mostly mild decay: the state carries across chunks
    if gate in ("-1000", "-1000-channel"):
        g[..., 0] = -1000.0  # one channel forgets everything at every token
    if gate == "-1000":
        hit = torch.rand(B, T, H, K, generator=gen, dtype=dtype) < 0.1
        g = g.masked_fill(hit, -1000.0)  # and scattered full resets elsewhere
    beta = torch.rand(B, T, H, generator=gen, dtype=dtype)
    cu_seqlens = None
    if isinstance(lengths, list):
        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    initial_state = randn(N, H, K, V) if h0 else None
    do = randn(B, T, H, V)
    d_final = randn(N, H, K, V) if dht else None
    return dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state, cu_seqlens=cu_seqlens, do=do, dht=d_final)


def autograd_reference(inp, scale, l2norm):
    """Gradients of <o, do> + <final_state, dht> through the fp64 naive recurrence."""
    leaves = [inp[n].double().requires_grad_() for n in ("q", "k", "v", "g", "beta")]
    h0 = inp["initial_state"]
    if h0 is not None:
        leaves.append(h0.double().requires_grad_())
    o, final = recurrent_kda(
        *leaves[:5],
        scale=scale,
        initial_state=leaves[5] if h0 is not None else None,
        output_final_state=True,
        use_qk_l2norm=l2norm,
        cu_seqlens=inp["cu_seqlens"],
    )
    loss = (o * inp["do"].double()).sum()
    if inp["dht"] is not None:
        loss = loss + (final * inp["dht"].double()).sum()
    return torch.autograd.grad(loss, leaves)


def run_chunked(inp, scale, l2norm):
    return chunk_kda_bwd_reference(
        inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], inp["initial_state"], inp["cu_seqlens"],
        inp["do"], inp["dht"], scale, l2norm,
    )


CASES = [
    # id: B, T or varlen lengths, H, K, V, h0, dht, l2norm, gate, scale
    pytest.param(1, 1, 2, 20, 12, True, True, False, "mild", None, id="T1-h0-dht"),
    pytest.param(1, 1, 2, 20, 12, False, True, True, "mild", None, id="T1-dht-l2norm"),
    pytest.param(1, 63, 2, 20, 12, True, False, False, "mild", None, id="T63-h0"),
    pytest.param(1, 64, 2, 20, 12, False, True, True, "mild", 0.3, id="T64-dht-l2norm"),
    pytest.param(1, 65, 2, 12, 20, True, True, True, "mild", None, id="T65-h0-dht-l2norm-K12V20"),
    pytest.param(1, 130, 2, 20, 12, False, False, False, "mild", None, id="T130-plain"),
    pytest.param(1, 130, 2, 20, 12, True, True, False, "-1000-channel", None, id="T130-h0-dht-channel-1000"),
    pytest.param(1, 130, 2, 20, 12, True, True, False, "-1000", None, id="T130-h0-dht-gate-1000"),
    pytest.param(1, 130, 1, 20, 12, True, True, True, "-1000", 0.5, id="T130-h0-dht-l2norm-gate-1000"),
    pytest.param(2, 130, 2, 20, 12, True, True, False, "mild", None, id="B2-T130-h0-dht"),
    pytest.param(2, 65, 2, 20, 12, False, False, True, "-1000", None, id="B2-T65-l2norm-gate-1000"),
    pytest.param(1, [1, 15, 200], 2, 20, 12, True, True, False, "mild", None, id="varlen-1-15-200-h0-dht"),
    pytest.param(1, [1, 15, 200], 2, 20, 12, False, False, True, "-1000", None, id="varlen-1-15-200-l2norm-gate-1000"),
    pytest.param(1, [200, 1, 15], 1, 20, 12, True, False, True, "-1000", None, id="varlen-200-1-15-h0-l2norm-gate-1000"),
]


@pytest.mark.parametrize("B, lengths, H, K, V, h0, dht, l2norm, gate, scale", CASES)
def test_matches_autograd_fp64(request, B, lengths, H, K, V, h0, dht, l2norm, gate, scale):
    seed = zlib.crc32(request.node.callspec.id.encode())  # distinct per case, reproducible
    inp = make_inputs(seed, B, lengths, H, K, V, h0=h0, dht=dht, l2norm=l2norm, gate=gate, dtype=torch.float64)
    scale = K**-0.5 if scale is None else scale
    got = run_chunked(inp, scale, l2norm)
    ref = autograd_reference(inp, scale, l2norm)

    sources = [inp[n] for n in ("q", "k", "v", "g", "beta")]
    for name, x, src in zip(NAMES, got, sources):
        assert x.shape == src.shape and x.dtype == src.dtype and x.is_contiguous(), name
    if h0:
        assert got[5].shape == inp["initial_state"].shape and got[5].dtype == torch.float64
    else:
        assert got[5].shape == (0,)
    for name, x, r in zip(NAMES, got, ref):
        assert torch.isfinite(x).all(), name
        if r.norm() == 0:  # e.g. dg at T = 1 without an initial state: g acts on a zero state
            assert x.abs().max() < 1e-14, name
        else:
            assert rel_rms(x, r) < 1e-9, f"{name}: relative error {rel_rms(x, r):.3e}"


def test_fp32_matches_fp64_ground_truth():
    # Scattered -1000 resets are left to the fp64 cases: they push the chunk-local cumulative gate
    # to ~-6000, where fp32 G_i - G_j loses ~1e-4 relative (the chunked forward has the same floor).
    inp = make_inputs(7, 1, [1, 15, 200], 2, 20, 12, h0=True, dht=True, l2norm=True, gate="-1000-channel", dtype=torch.float32)
    scale = 20**-0.5
    got = run_chunked(inp, scale, True)
    ref = autograd_reference(inp, scale, True)
    for name, x, r in zip(NAMES, got, ref):
        assert x.dtype == torch.float32 and torch.isfinite(x).all(), name
        assert rel_rms(x, r) < 1e-4, f"{name}: relative RMS error {rel_rms(x, r):.3e}"


GATE_CASES = [
    # id: B, T or varlen lengths, h0, dht, l2norm
    pytest.param(2, 130, False, False, False, id="B2-T130-plain"),
    pytest.param(1, [1, 15, 200], True, True, True, id="varlen-1-15-200-h0-dht-l2norm"),
]


@pytest.mark.parametrize("B, lengths, h0, dht, l2norm", GATE_CASES)
@pytest.mark.parametrize("bound", [pytest.param(None, id="softplus"), pytest.param(-5.0, id="bounded")])
def test_in_op_gate_matches_autograd_fp64(request, B, lengths, h0, dht, l2norm, bound):
    """With A_log and dt_bias, g is the pre-activation z: dz, dA_log and ddt_bias against autograd
    through meta's kda_gate (softplus or bounded) and the naive recurrence; z reaches past
    softplus's threshold (20) and, bounded, saturates the sigmoid at both ends."""
    seed = zlib.crc32(request.node.callspec.id.encode())
    H, K, V = 2, 20, 12
    inp = make_inputs(seed, B, lengths, H, K, V, h0=h0, dht=dht, l2norm=l2norm, gate="mild", dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(inp["g"].shape, generator=gen, dtype=torch.float64) * 4
    z[..., 1] = 25.0  # the identity branch of softplus
    A_log = torch.randn(H, generator=gen, dtype=torch.float64) * 0.5 - 1
    dt_bias = torch.randn(H * K, generator=gen, dtype=torch.float64)
    scale = K**-0.5
    got = chunk_kda_bwd_reference(
        inp["q"], inp["k"], inp["v"], z, inp["beta"], inp["initial_state"], inp["cu_seqlens"],
        inp["do"], inp["dht"], scale, l2norm, A_log, dt_bias, bound,
    )
    leaves = [x.clone().requires_grad_() for x in (z, A_log, dt_bias)]
    g = kda_gate(*leaves, bound)
    ref_inp = dict(inp, g=g.detach())
    dg = autograd_reference(ref_inp, scale, l2norm)[3]
    ref = torch.autograd.grad(g, leaves, dg)
    for name, x, r in zip(("dz", "dA_log", "ddt_bias"), (got[3], got[6], got[7]), ref):
        assert x.shape == r.shape and x.dtype == torch.float64, name
        assert rel_rms(x, r) < 1e-9, f"{name}: relative error {rel_rms(x, r):.3e}"
    plain = run_chunked(ref_inp, scale, l2norm)
    for name, x, r in zip(NAMES, got, plain):
        if name != "dg":
            assert torch.equal(x, r), name
