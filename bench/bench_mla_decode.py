"""kda::mla_decode vs an absorbed PyTorch baseline: one decode step over a paged latent cache,
D_qk = 576, v_dim = 512, block size 64, bf16, every sequence of length L, in CUDA graphs.

    pytest bench/bench_mla_decode.py --benchmark-json=bench/results/<gpu>/mla_decode.json

Each provider first passes the same correctness check on the same inputs (o within 0.005 and lse
within 0.001 relative RMS of the fp32 reference, kda::mla_decode_reference); a provider that
fails it is not timed. Then one step is captured in a CUDA graph and timed with
triton.testing.do_bench (median, L2 flushed between replays): extra_info["ms"].
extra_info["gbps"] = (cache rows read B·L·576·2 + q B·H·576·2 + o B·H·512·2 bytes) / ms — the
op's mandatory traffic (bench/NOTES.md). FLOPs = 2·B·H·L·(576 + 512) (scores and values).
floor_ms = max(bytes / copy bandwidth, FLOPs / matmul rate), both measured in the same run
(conftest's `ceilings`), of_floor = floor_ms / ms. pytest-benchmark's own statistics time a graph
replay + synchronize on the host.

The "torch" provider is absorbed MLA decode written in PyTorch: gather every page through the
block table, scores in fp32 (bf16 scores miss the bar: 0.0066 relative RMS at L = 4096), masked
fp32 softmax, probabilities in bf16 times the bf16 values (the kernel's own rounding).
"""

import pytest
import torch
from common import capture_cuda_graph, rel_rms, time_graph_replay

import kda_ops

D_QK, V_DIM, BLOCK_SIZE, SCALE = 576, 512, 64, 192**-0.5
SHAPES = [
    pytest.param(H, B, L, id=f"H{H}-B{B}-L{L}")
    for H in (16, 32)
    for B in (1, 32, 128)
    for L in (4096, 32768)
]
PROVIDERS = [pytest.param("kda_ops", id="kda_ops"), pytest.param("torch", id="torch")]
REFERENCE_BATCH = 8  # sequences per fp32 reference call (bounds its gathered copy of the cache)



def paged_inputs(H: int, B: int, L: int):
    """Full-length sequences on randomly permuted pages; every table entry is a used page."""
    pages = L // BLOCK_SIZE
    kv_cache = torch.randn(B * pages, BLOCK_SIZE, D_QK, device="cuda", dtype=torch.bfloat16)
    block_table = torch.randperm(B * pages, device="cuda").to(torch.int32).view(B, pages)
    seq_lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    q = torch.randn(B, H, D_QK, device="cuda", dtype=torch.bfloat16)
    return q, kv_cache, block_table, seq_lens


def torch_absorbed_decode(q, kv_cache, block_table, seq_lens, scale, v_dim):
    B, H, D = q.shape
    kv = kv_cache[block_table.long()].view(B, -1, D)  # [B, L, D]
    s = torch.einsum("bhd,bld->bhl", q.float(), kv.float()) * scale
    past_end = torch.arange(kv.shape[1], device=q.device)[None, :] >= seq_lens[:, None]
    s = s.masked_fill(past_end[:, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).to(q.dtype)
    return torch.matmul(p, kv[..., :v_dim]), lse


def _provider(name: str):
    if name == "kda_ops":
        return lambda q, kv_cache, block_table, seq_lens: kda_ops.mla_decode(q, kv_cache, block_table, seq_lens, scale=SCALE, v_dim=V_DIM)
    return lambda q, kv_cache, block_table, seq_lens: torch_absorbed_decode(q, kv_cache, block_table, seq_lens, SCALE, V_DIM)


def reference(q, kv_cache, block_table, seq_lens):
    """fp32 kda::mla_decode_reference (o, lse), REFERENCE_BATCH sequences per call."""
    kv_cache32 = kv_cache.float()
    ref = [
        torch.ops.kda.mla_decode_reference(
            q[i : i + REFERENCE_BATCH].float(), kv_cache32, block_table[i : i + REFERENCE_BATCH], seq_lens[i : i + REFERENCE_BATCH], SCALE, V_DIM
        )
        for i in range(0, q.shape[0], REFERENCE_BATCH)
    ]
    return torch.cat([r[0] for r in ref]), torch.cat([r[1] for r in ref])


def _check_correct(provider: str, H: int, B: int, L: int) -> None:
    args = paged_inputs(H, B, L)
    o, lse = _provider(provider)(*args)
    ref_o, ref_lse = reference(*args)
    errors = {"o": rel_rms(o, ref_o), "lse": rel_rms(lse, ref_lse)}
    assert errors["o"] <= 0.005 and errors["lse"] <= 0.001, f"{provider} H={H} B={B} L={L}: rel RMS {errors}"



@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("H, B, L", SHAPES)
def test_mla_decode(benchmark, ceilings, provider, H, B, L):
    _check_correct(provider, H, B, L)
    args = paged_inputs(H, B, L)
    fn = _provider(provider)
    graph = capture_cuda_graph(lambda: fn(*args))
    benchmark.group = f"mla_decode H={H} B={B} L={L}"
    time_graph_replay(
        benchmark,
        graph,
        ceilings,
        (B * L * D_QK + B * H * D_QK + B * H * V_DIM) * 2,
        2 * B * H * L * (D_QK + V_DIM),
        op="mla_decode",
        provider=provider,
        shape={"B": B, "L": L, "H": H, "D_qk": D_QK, "D_v": V_DIM, "block_size": BLOCK_SIZE},
    )
