"""Kimi-Linear model speed (the small preset: 4 KDA + 2 MLA layers with production head dims, bf16,
random weights): decode time per output token run eagerly, compiled (torch.compile,
mode="reduce-overhead", fullgraph) and as a manually captured CUDA graph, at batch 1 and 64; and
prefill tokens/s of one sequence of 4k and 32k tokens, eager and compiled (dynamic length).

    pytest bench/bench_model.py --benchmark-json=bench/results/<gpu>/model.json

Decode runs the model's own DecodeRunner (kda_ops.generation) at a context of CONTEXT tokens
declared in the caches (random contents, seq_lens = CONTEXT, reset before every timed round of
DECODE_STEPS steps). extra_info: "ms" = one decode step (the time per output token of every
sequence), "tokens_per_s" = B / step; prefill "ms" = one prefill call, "tokens_per_s" = T / ms.
Times are medians of host-timed rounds that end with a device synchronize: eager rounds include
the Python dispatch a user pays. "first_call_s" is the first call of a fresh runner or prefill
function (JIT, and for compiled modes the torch.compile time; the compiled prefill compiles once
for both lengths, at the first).
"""

import time

import pytest
import torch
from common import declare_context, median_round_ms

from kda_ops import KimiLinearConfig, KimiLinearForCausalLM
from kda_ops.generation import DecodeRunner

PRESET = "small"
CONTEXT = 1024
DECODE_STEPS = 20
MAX_BATCH = 64
MAX_PREFILL = 32768
DECODE_CASES = [
    pytest.param("eager", 1, id="eager-B1"),
    pytest.param("compiled", 1, id="compiled-B1"),
    pytest.param("cuda_graph", 1, id="cuda_graph-B1"),
    pytest.param("eager", 64, id="eager-B64"),
    pytest.param("compiled", 64, id="compiled-B64"),
    pytest.param("cuda_graph", 64, id="cuda_graph-B64"),
]
PREFILL_CASES = [
    pytest.param("eager", 4096, id="eager-T4096"),
    pytest.param("compiled", 4096, id="compiled-T4096"),
    pytest.param("eager", 32768, id="eager-T32768"),
    pytest.param("compiled", 32768, id="compiled-T32768"),
]


@pytest.fixture(scope="module")
def model():
    model = KimiLinearForCausalLM(KimiLinearConfig.preset(PRESET), dtype=torch.bfloat16).init_weights(0).cuda().eval()
    model.allocate_caches(MAX_BATCH, max(CONTEXT + 64, MAX_PREFILL))
    return model


@pytest.fixture(scope="module")
def prefill_functions(model):
    """One compiled prefill for every length (dynamic), so the second length reuses its graph."""
    return {"eager": model.prefill, "compiled": torch.compile(model.prefill, fullgraph=True, dynamic=True)}


def _seconds(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


@pytest.mark.parametrize("mode, B", DECODE_CASES)
def test_model_decode(benchmark, model, mode, B):
    slots = torch.arange(B, device="cuda")
    tokens = torch.randint(0, model.config.vocab_size, (B,), device="cuda")
    declare_context(model, CONTEXT)
    with torch.no_grad():
        runner = DecodeRunner(model, slots, mode)
        first_call_s = _seconds(lambda: runner(tokens))

        def steps():
            for _ in range(DECODE_STEPS):
                runner(tokens)

        ms = median_round_ms(benchmark, steps, setup=lambda: model.seq_lens.fill_(CONTEXT)) / DECODE_STEPS
    benchmark.group = f"model decode B={B}"
    benchmark.extra_info.update(
        op="model_decode",
        provider="kda_ops",
        mode=mode,
        shape={"preset": PRESET, "B": B, "context": CONTEXT},
        ms=ms,
        tokens_per_s=B / (ms * 1e-3),
        first_call_s=first_call_s,
    )


@pytest.mark.parametrize("mode, T", PREFILL_CASES)
def test_model_prefill(benchmark, model, prefill_functions, mode, T):
    prefill = prefill_functions[mode]
    ids = torch.randint(0, model.config.vocab_size, (T,), device="cuda")
    cu_seqlens = torch.tensor([0, T], dtype=torch.int32, device="cuda")
    slots = torch.arange(1, device="cuda")
    with torch.no_grad():
        model.reset_sequences(slots)
        first_call_s = _seconds(lambda: prefill(ids, cu_seqlens, slots))
        ms = median_round_ms(benchmark, lambda: prefill(ids, cu_seqlens, slots), setup=lambda: model.reset_sequences(slots))
    benchmark.group = f"model prefill T={T}"
    benchmark.extra_info.update(
        op="model_prefill",
        provider="kda_ops",
        mode=mode,
        shape={"preset": PRESET, "B": 1, "T": T},
        ms=ms,
        tokens_per_s=T / (ms * 1e-3),
        first_call_s=first_call_s,
    )
