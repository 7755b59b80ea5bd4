"""Helpers shared by the benchmark suites (imported by bench_*.py and bench scripts only)."""

import torch
import triton


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative RMS error ||x - ref|| / ||ref||, in fp64."""
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm()).item()


def time_graph_replay(benchmark, graph: torch.cuda.CUDAGraph, nbytes: int, **extra_info) -> None:
    """Records extra_info with ms = median of triton.testing.do_bench over graph replays (L2 flushed
    between them) and gbps = nbytes / ms; pytest-benchmark's own statistics time replay + sync."""
    ms = triton.testing.do_bench(graph.replay, return_mode="median")

    def replay_and_sync():
        graph.replay()
        torch.cuda.synchronize()

    benchmark.extra_info.update(extra_info, ms=ms, gbps=nbytes / (ms * 1e-3) / 1e9)
    benchmark.pedantic(replay_and_sync, rounds=20, warmup_rounds=2)


def capture_cuda_graph(step, warmup: int = 3) -> torch.cuda.CUDAGraph:
    """Runs `step` on a side stream (JIT compile, allocator warm-up), then captures one call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def median_round_ms(benchmark, run_round, setup=None, rounds: int = 5, warmup_rounds: int = 1) -> float:
    """Times run_round() with benchmark.pedantic (setup() before each round, untimed) and returns
    the median round in milliseconds, synchronising the device at the end of every round."""

    def timed_round():
        run_round()
        torch.cuda.synchronize()

    def untimed_setup():  # pytest-benchmark takes a non-None return of setup as (args, kwargs)
        setup()

    benchmark.pedantic(timed_round, setup=setup and untimed_setup, rounds=rounds, warmup_rounds=warmup_rounds)
    return benchmark.stats.stats.median * 1e3


@torch.no_grad()
def declare_context(model, length: int) -> None:
    """Makes every cache slot of the model hold `length` tokens without running them: random
    latent rows and KDA states, seq_lens = length. Decode then reads and attends to exactly what a
    sequence of that length would leave, so its time at a long context costs milliseconds to take."""
    for attn in model.mla_layers():
        attn.latent_cache.normal_()
    for attn in model.kda_layers():
        attn.recurrent_state.normal_(0, 0.01)
        for pool in (attn.q_conv_state, attn.k_conv_state, attn.v_conv_state):
            pool.normal_()
    model.seq_lens.fill_(length)
