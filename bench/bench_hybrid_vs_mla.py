"""The Kimi Linear report's headline on one GPU: the hybrid (KDA:MLA 3:1) against the same model
with every layer MLA, at long contexts.

    pytest bench/bench_hybrid_vs_mla.py --benchmark-json=bench/results/<gpu>/hybrid_vs_mla.json

Models: the kimi-linear-48b preset's shape (hidden 2304, 27 layers, MLA at layers 3, 7, ..., 23,
26 and KDA elsewhere, 32 KDA heads of 128, MLA 32 heads with a 512 + 64 latent, vocabulary
163840), scaled to fit one GPU by giving each MoE layer NUM_EXPERTS experts all routed (top-8 of
8 instead of top-8 of 256: the active expert work per token of the 48B model, 6.9 GB of bf16
weights in all), random weights; "all_mla" is the same config with every layer MLA (6.5 GB).
One model is on the GPU at a time.

Computed from shapes (extra_info, no timing): "latent_bytes_per_token" (MLA latent rows),
"kda_state_bytes_per_sequence" (fp32 states and conv states, length-independent),
"largest_batch" (sequences of L tokens whose caches fit in the free memory after the weights,
less RESERVE_BYTES) and "longest_context_at_batch_1".

Measured: one decode step (CUDA-graph replay of the model's decode step, kda_ops.generation's
"cuda_graph" runner) at context L = 128k, 512k and 1M, at batch 1 and at the largest batch. The
context is declared, not generated: random cache contents and seq_lens = L, reset before every
timed round of DECODE_STEPS steps, so the step reads and attends to exactly L cached tokens.
extra_info "ms" = one step, "ms_per_token" = ms / B (the report's time per output token at a
batch), "tokens_per_s" = B / ms, "gbps" = bytes a step must read / ms with bytes = weights
(embedding excluded) + B · (L · latent_bytes_per_token + 2 · kda_state_bytes_per_sequence).
And eager prefill of one sequence of 8k and 32k tokens ("ms", "tokens_per_s",
"peak_gb" = torch.cuda.max_memory_allocated). Longer prefills are not timed: at 32k the all-MLA
prefill already takes seconds (its attention is quadratic in T), and the model's MLA prefill
builds a [T, T] mask, so 128k would need 17 GB for the mask alone. Times are medians of
host-timed rounds ending with a device synchronize.
"""

import dataclasses

import pytest
import torch
from common import declare_context, median_round_ms

from kda_ops import KimiLinearConfig, KimiLinearForCausalLM
from kda_ops.generation import DecodeRunner

NUM_EXPERTS = 8
BLOCK_SIZE = 64
HEADROOM = 64  # cache capacity beyond L for the capture's warm-up steps and a timed round
DECODE_STEPS = 5
RESERVE_BYTES = 3 * 2**30  # activations, the graph's pool and the split-KV workspace at the largest batch
PATTERNS = [pytest.param("hybrid", id="hybrid"), pytest.param("all_mla", id="all_mla")]
K128, K512, M1 = 128 * 1024, 512 * 1024, 1024 * 1024
DECODE_CASES = [
    pytest.param(K128, "1", id="L128k-B1"),
    pytest.param(K128, "largest", id="L128k-Blargest"),
    pytest.param(K512, "1", id="L512k-B1"),
    pytest.param(K512, "largest", id="L512k-Blargest"),
    pytest.param(M1, "1", id="L1M-B1"),
    pytest.param(M1, "largest", id="L1M-Blargest"),
]
PREFILL_LENGTHS = [pytest.param(8192, id="T8192"), pytest.param(32768, id="T32768")]


def scaled_48b_config(pattern: str) -> KimiLinearConfig:
    config = dataclasses.replace(
        KimiLinearConfig.preset("kimi-linear-48b"), num_experts=NUM_EXPERTS, num_experts_per_token=NUM_EXPERTS
    )
    if pattern == "all_mla":
        config = dataclasses.replace(config, full_attn_layers=list(range(config.num_hidden_layers)), kda_layers=[])
    return config


@pytest.fixture(scope="module", params=PATTERNS)
def pattern(request):
    return request.param


@pytest.fixture(scope="module")
def model(pattern):
    """pytest groups the tests by pattern and drops one model before building the next. Built on
    the meta device and drawn on the GPU: the CPU path takes over a minute for 3.5 B parameters."""
    torch.cuda.empty_cache()
    with torch.device("meta"):
        model = KimiLinearForCausalLM(scaled_48b_config(pattern), dtype=torch.bfloat16)
    return model.to_empty(device="cuda").init_weights(0, generator_device="cuda").eval()


def drop_caches(model) -> int:
    """Replaces the model's caches by a one-page cache and returns the free device memory."""
    model.allocate_caches(1, BLOCK_SIZE, BLOCK_SIZE)
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def cache_bytes_per_sequence(config: KimiLinearConfig, capacity: int) -> int:
    return capacity * config.latent_cache_bytes_per_token() + config.kda_state_bytes_per_sequence()


def weight_bytes_read_per_step(model) -> int:
    """Every weight but the embedding table, of which a step reads one row per sequence."""
    embedding = model.model.embed_tokens.weight
    return sum(p.nbytes for p in model.parameters() if p is not embedding)


@pytest.mark.parametrize("L, batch", DECODE_CASES)
def test_decode_at_long_context(benchmark, pattern, model, L, batch):
    config = model.config
    capacity = L + HEADROOM
    free = drop_caches(model)
    per_sequence = cache_bytes_per_sequence(config, capacity)
    largest_batch = (free - RESERVE_BYTES) // per_sequence
    longest_context = (free - RESERVE_BYTES - config.kda_state_bytes_per_sequence()) // config.latent_cache_bytes_per_token()
    B = 1 if batch == "1" else largest_batch
    if B < 1:
        pytest.skip(f"{pattern} at L={L}: one sequence needs {per_sequence / 1e9:.1f} GB, {(free - RESERVE_BYTES) / 1e9:.1f} GB free")
    model.allocate_caches(B, capacity, BLOCK_SIZE)
    slots = torch.arange(B, device="cuda")
    tokens = torch.randint(0, config.vocab_size, (B,), device="cuda")
    declare_context(model, L)
    runner = DecodeRunner(model, slots, "cuda_graph")

    def steps():
        for _ in range(DECODE_STEPS):
            runner(tokens)

    ms = median_round_ms(benchmark, steps, setup=lambda: model.seq_lens.fill_(L)) / DECODE_STEPS
    step_bytes = weight_bytes_read_per_step(model) + B * (
        L * config.latent_cache_bytes_per_token() + 2 * config.kda_state_bytes_per_sequence()
    )
    benchmark.group = f"decode L={L} B={batch}"
    benchmark.extra_info.update(
        op="model_decode",
        provider="kda_ops",
        mode="cuda_graph",
        model=pattern,
        shape={"B": B, "L": L, "kda_layers": len(config.kda_layers), "mla_layers": len(config.full_attn_layers)},
        ms=ms,
        ms_per_token=ms / B,
        tokens_per_s=B / (ms * 1e-3),
        gbps=step_bytes / (ms * 1e-3) / 1e9,
        latent_bytes_per_token=config.latent_cache_bytes_per_token(),
        kda_state_bytes_per_sequence=config.kda_state_bytes_per_sequence(),
        largest_batch=largest_batch,
        longest_context_at_batch_1=longest_context,
        free_gb=free / 1e9,
    )


@pytest.mark.parametrize("T", PREFILL_LENGTHS)
def test_prefill_batch_1(benchmark, pattern, model, T):
    drop_caches(model)
    model.allocate_caches(1, T, BLOCK_SIZE)
    ids = torch.randint(0, model.config.vocab_size, (T,), device="cuda")
    cu_seqlens = torch.tensor([0, T], dtype=torch.int32, device="cuda")
    slots = torch.arange(1, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        ms = median_round_ms(
            benchmark, lambda: model.prefill(ids, cu_seqlens, slots), setup=lambda: model.reset_sequences(slots), rounds=3
        )
    benchmark.group = f"prefill T={T}"
    benchmark.extra_info.update(
        op="model_prefill",
        provider="kda_ops",
        mode="eager",
        model=pattern,
        shape={"B": 1, "T": T, "kda_layers": len(model.config.kda_layers), "mla_layers": len(model.config.full_attn_layers)},
        ms=ms,
        tokens_per_s=T / (ms * 1e-3),
        peak_gb=torch.cuda.max_memory_allocated() / 1e9,
    )
