"""kda::kda_decode with the Kimi gate computed two ways, side by side: one decode step (T = 1),
H = 32, K = V = 128, bf16 inputs, fp32 state, q/k L2 norm in the kernel, in CUDA graphs.

    pytest bench/bench_kda_decode_gate.py --benchmark-json=bench/results/<gpu>/kda_decode_gate.json

The gate is g = -exp(A_log) * softplus(z + dt_bias) (docs/kda_math.md §2). Every provider gets the
same tensors as the model holds them: q, k, v and the gate's pre-activation z = f_b(f_a(x))
[B, 1, H·K] in bf16, beta fp32, A_log [1, 1, H, 1] and dt_bias [H·K] fp32. Providers, each a
torch.compile(fullgraph=True) step (Inductor, one graph per B):
- inductor_gate: the model's way (kda_ops/layers.py) — the gate in torch ops, which Inductor fuses
  into one pointwise kernel, then kda_decode(g).
- kernel_gate: kda_decode(z, A_log=, dt_bias=) — the gate computed inside the decode kernel.
- decode_only: kda_decode(g) with g computed before the step: the decode kernel alone, the floor
  both of the others approach.

Each provider first passes the same correctness check (o and the new state within 0.005 relative
RMS of the fp32 recurrence over meta's kda_gate); one that fails is not timed. The step is then
captured in a CUDA graph and timed with triton.testing.do_bench (median, L2 flushed between
replays): extra_info["ms"]; extra_info["gbps"] = state bytes read + written (2 · B · H · K · V · 4)
/ ms, floor_ms = those bytes / the copy bandwidth measured in the same run, of_floor = floor_ms /
ms; extra_info["kernels"] = the GPU kernels one step launches (profiled once, outside the graph).
"""

import pytest
import torch
import torch.nn.functional as F
from common import capture_cuda_graph, rel_rms, time_graph_replay
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import kda_ops
from kda_ops.meta.kda_recurrent import kda_gate
from kda_ops.meta.kda_recurrent import recurrent_kda

H, K, V = 32, 128, 128
BATCHES = [pytest.param(B, id=f"B{B}") for B in (1, 8, 64, 256)]
PROVIDERS = [pytest.param(p, id=p) for p in ("inductor_gate", "kernel_gate", "decode_only")]


def _inputs(B: int) -> dict:
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    return dict(
        q=torch.randn(B, 1, H, K, **bf16),
        k=torch.randn(B, 1, H, K, **bf16),
        v=torch.randn(B, 1, H, V, **bf16),
        z=torch.randn(B, 1, H * K, **bf16) * 2,
        beta=torch.rand(B, 1, H, device="cuda"),
        A_log=torch.randn(1, 1, H, 1, device="cuda") * 0.5 - 1,
        dt_bias=torch.randn(H * K, device="cuda"),
        state=torch.randn(B, H, K, V, device="cuda") * 0.1,
    )


def _reference_gate(x: dict) -> torch.Tensor:
    """g [B, 1, H, K] fp32 by meta's kda_gate."""
    B = x["z"].shape[0]
    return kda_gate(x["z"].view(B, 1, H, K), x["A_log"].view(H), x["dt_bias"])


def _inductor_gate_step(q, k, v, z, beta, A_log, dt_bias, pool, slots):
    """The gate as kda_ops/layers.py computes it, then the decode op."""
    B, T, _ = z.shape
    g = -A_log.exp() * F.softplus((z.float() + dt_bias).view(B, T, H, K))
    return kda_ops.kda_decode(q, k, v, g, beta, pool, state_indices=slots, use_qk_l2norm=True)


def _kernel_gate_step(q, k, v, z, beta, A_log, dt_bias, pool, slots):
    B, T, _ = z.shape
    return kda_ops.kda_decode(
        q, k, v, z.view(B, T, H, K), beta, pool, state_indices=slots, use_qk_l2norm=True,
        A_log=A_log.view(H), dt_bias=dt_bias,
    )


def _decode_only_step(q, k, v, g, beta, pool, slots):
    return kda_ops.kda_decode(q, k, v, g, beta, pool, state_indices=slots, use_qk_l2norm=True)


STEPS = {"inductor_gate": _inductor_gate_step, "kernel_gate": _kernel_gate_step, "decode_only": _decode_only_step}


def _step_fn(provider: str, x: dict):
    """(step, read_result): step() runs provider's compiled decode step on x's tensors;
    read_result() -> (o, new states of rows 0..B-1) after it. Row b's state sits at slot slots[b]."""
    B = x["q"].shape[0]
    slots = torch.randperm(B, device=x["q"].device).to(torch.int32)
    pool = torch.empty_like(x["state"])
    pool[slots.long()] = x["state"]
    if provider == "decode_only":
        gate = (_reference_gate(x), x["beta"])
    else:
        gate = (x["z"], x["beta"], x["A_log"], x["dt_bias"])
    args = (x["q"], x["k"], x["v"], *gate, pool, slots)
    compiled = torch.compile(STEPS[provider], fullgraph=True, dynamic=False)
    out = {}

    def step():
        out["o"] = compiled(*args)

    return step, lambda: (out["o"], pool[slots.long()])


def _check_correct(provider: str, B: int) -> None:
    x = _inputs(B)
    step, read_result = _step_fn(provider, x)
    step()
    o, new_state = read_result()
    o_ref, state_ref = recurrent_kda(
        x["q"].float(), x["k"].float(), x["v"].float(), _reference_gate(x), x["beta"],
        initial_state=x["state"], output_final_state=True, use_qk_l2norm=True,
    )
    errors = {"o": rel_rms(o, o_ref), "state": rel_rms(new_state, state_ref)}
    assert all(e <= 0.005 for e in errors.values()), f"{provider} B={B}: rel RMS {errors} > 0.005"


def _kernels_of(step) -> list[str]:
    """Names of the GPU kernels one call of step launches."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sorted(e.name for e in prof.events() if e.device_type == DeviceType.CUDA)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("B", BATCHES)
def test_kda_decode_gate(benchmark, ceilings, provider, B):
    _check_correct(provider, B)
    step, _ = _step_fn(provider, _inputs(B))
    graph = capture_cuda_graph(step)
    benchmark.group = f"kda_decode gate B={B}"
    time_graph_replay(
        benchmark,
        graph,
        ceilings,
        2 * B * H * K * V * 4,
        op="kda_decode_gate",
        provider=provider,
        shape={"B": B, "T": 1, "H": H, "K": K, "V": V},
        kernels=_kernels_of(step),
    )
