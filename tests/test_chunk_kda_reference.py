"""The reference ladder, first rung: chunked PyTorch KDA vs the naive recurrence in fp64."""

import pytest
import torch
from kda_inputs import kda_inputs

from kda_ops.meta.chunk_kda import chunk_kda_fwd_reference
from kda_ops.meta.kda_recurrent import recurrent_kda

CASES = [
    pytest.param(dict(B=2, T=1, H=2, K=16, V=16), id="T1"),
    pytest.param(dict(B=2, T=63, H=2, K=20, V=12), id="T63-K20-V12"),
    pytest.param(dict(B=1, T=64, H=3, K=32, V=24), id="T64"),
    pytest.param(dict(B=2, T=65, H=2, K=20, V=12, initial_state=True), id="T65-h0"),
    pytest.param(dict(B=1, T=130, H=2, K=36, V=20, initial_state=True, l2norm=True), id="T130-h0-l2norm"),
    pytest.param(dict(B=1, T=1000, H=2, K=24, V=16, gate_floor_channels=4), id="T1000-gates-1000"),
    pytest.param(dict(B=2, T=200, H=2, K=16, V=8, gate_floor_channels=16, initial_state=True), id="T200-all-gates-1000"),
]


@pytest.mark.parametrize("case", CASES)
def test_chunked_matches_recurrence(case):
    case = dict(case)
    l2norm = case.pop("l2norm", False)
    x = kda_inputs(**case)
    scale = case["K"] ** -0.5
    o_ref, s_ref = recurrent_kda(**x, scale=scale, output_final_state=True, use_qk_l2norm=l2norm)
    o, s = chunk_kda_fwd_reference(**x, cu_seqlens=None, scale=scale, output_final_state=True, use_qk_l2norm=l2norm)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)


VARLEN_CASES = [
    pytest.param([1, 15, 200], False, id="lens-1-15-200"),
    pytest.param([200, 1, 15, 64, 65], True, id="lens-200-1-15-64-65-h0"),
]


@pytest.mark.parametrize("lengths, initial_state", VARLEN_CASES)
def test_chunked_varlen_matches_recurrence(lengths, initial_state):
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    x = kda_inputs(1, sum(lengths), 2, 20, 12, n_states=len(lengths), initial_state=initial_state, gate_floor_channels=2)
    o_ref, s_ref = recurrent_kda(**x, output_final_state=True, use_qk_l2norm=True, cu_seqlens=cu_seqlens)
    o, s = chunk_kda_fwd_reference(**x, cu_seqlens=cu_seqlens, scale=20**-0.5, output_final_state=True, use_qk_l2norm=True)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)


def test_varlen_equals_separate_sequences():
    """Packing is only a layout: each packed sequence equals the same sequence run alone."""
    lengths = [7, 64, 90]
    cu_seqlens = torch.tensor([0, 7, 71, 161])
    x = kda_inputs(1, sum(lengths), 2, 16, 16, n_states=3, initial_state=True)
    o, s = chunk_kda_fwd_reference(**x, cu_seqlens=cu_seqlens, scale=0.25, output_final_state=True, use_qk_l2norm=False)
    for n, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        alone = {name: t[:, start:end] for name, t in x.items() if name != "initial_state"}
        o_n, s_n = chunk_kda_fwd_reference(
            **alone, initial_state=x["initial_state"][n : n + 1], cu_seqlens=None, scale=0.25,
            output_final_state=True, use_qk_l2norm=False,
        )
        torch.testing.assert_close(o[:, start:end], o_n, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s[n : n + 1], s_n, rtol=1e-12, atol=1e-12)


def test_low_precision_inputs_meet_the_bar():
    """bf16 inputs through the fp32 chunked path stay within the published bar of the fp32
    recurrence on the same (bf16-rounded) inputs."""
    from kda_inputs import rel_rms

    x = kda_inputs(1, 300, 2, 64, 64, dtype=torch.bfloat16, initial_state=True, gate_floor_channels=3)
    ref_in = {n: (t.float() if t is not None else None) for n, t in x.items()}
    o_ref, s_ref = recurrent_kda(**ref_in, output_final_state=True, use_qk_l2norm=True)
    o, s = chunk_kda_fwd_reference(**x, cu_seqlens=None, scale=64**-0.5, output_final_state=True, use_qk_l2norm=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel_rms(o, o_ref) <= 0.005
    assert rel_rms(s, s_ref) <= 0.005
