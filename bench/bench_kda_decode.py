"""kda::kda_decode vs fla's fused_recurrent_kda: one decode step (T = 1), H = 32, K = V = 128,
bf16 inputs, fp32 state, q/k L2 norm in the kernel, in CUDA graphs.

    pytest bench/bench_kda_decode.py --benchmark-json=bench/results/<gpu>/kda_decode.json

Each provider first passes the same correctness check on the same inputs (o and the new state
within 0.005 relative RMS of the fp32 recurrence); a provider that fails it is not timed. Then one
step is captured in a CUDA graph and timed with triton.testing.do_bench (median, L2 flushed
between replays): extra_info["ms"]. extra_info["gbps"] = state bytes read + written
(2 · B · H · K · V · 4) / ms — the op's mandatory traffic (bench/NOTES.md); floor_ms = those bytes /
the copy bandwidth measured in the same run (conftest's `ceilings`; the FLOPs, 4·K·V per head, are
negligible), of_floor = floor_ms / ms. pytest-benchmark's own statistics time a graph replay +
synchronize on the host.

kda_ops advances slots of a pool in place (state_indices = a permutation of the B slots);
fla's public fused_recurrent_kda reads an initial state [B, H, K, V] and writes a new final state:
the same state bytes. fla is skipped when fla-core is not installed.
"""

import pytest
import torch
from common import capture_cuda_graph, rel_rms, time_graph_replay

import kda_ops
from kda_ops.meta.kda_recurrent import recurrent_kda

try:
    from fla.ops.kda import fused_recurrent_kda
except ImportError:
    fused_recurrent_kda = None

H, K, V = 32, 128, 128
BATCHES = [pytest.param(B, id=f"B{B}") for B in (1, 8, 64, 256)]
PROVIDERS = [pytest.param("kda_ops", id="kda_ops"), pytest.param("fla", id="fla")]



def _inputs(B: int):
    q = torch.randn(B, 1, H, K, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, 1, H, K, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, 1, H, V, device="cuda", dtype=torch.bfloat16)
    g = torch.nn.functional.logsigmoid(torch.randn(B, 1, H, K, device="cuda"))
    beta = torch.rand(B, 1, H, device="cuda", dtype=torch.bfloat16)
    state = torch.randn(B, H, K, V, device="cuda") * 0.1
    return q, k, v, g, beta, state


def _step_fn(provider: str, q, k, v, g, beta, state):
    """(step, read_result): step() runs one decode step; read_result() -> (o, new states of
    rows 0..B-1) after it."""
    B = q.shape[0]
    if provider == "kda_ops":
        slots = torch.randperm(B, device="cuda").to(torch.int32)
        pool = torch.empty_like(state)
        pool[slots.long()] = state
        out = {}

        def step():
            out["o"] = kda_ops.kda_decode(q, k, v, g, beta, pool, state_indices=slots, use_qk_l2norm=True)

        return step, lambda: (out["o"], pool[slots.long()])
    if fused_recurrent_kda is None:
        pytest.skip("fla-core is not installed")
    out = {}

    def step():
        out["o"], out["state"] = fused_recurrent_kda(
            q, k, v, g, beta, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True
        )

    return step, lambda: (out["o"], out["state"])


def _check_correct(provider: str, B: int) -> None:
    q, k, v, g, beta, state = _inputs(B)
    step, read_result = _step_fn(provider, q, k, v, g, beta, state.clone())
    step()
    o, new_state = read_result()
    o_ref, state_ref = recurrent_kda(
        q.float(), k.float(), v.float(), g, beta.float(), initial_state=state, output_final_state=True, use_qk_l2norm=True
    )
    errors = {"o": rel_rms(o, o_ref), "state": rel_rms(new_state, state_ref)}
    assert all(e <= 0.005 for e in errors.values()), f"{provider} B={B}: rel RMS {errors} > 0.005"



@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("B", BATCHES)
def test_kda_decode(benchmark, ceilings, provider, B):
    _check_correct(provider, B)
    step, _ = _step_fn(provider, *_inputs(B))
    graph = capture_cuda_graph(step)
    benchmark.group = f"kda_decode B={B}"
    time_graph_replay(
        benchmark,
        graph,
        ceilings,
        2 * B * H * K * V * 4,
        op="kda_decode",
        provider=provider,
        shape={"B": B, "T": 1, "H": H, "K": K, "V": V},
    )
