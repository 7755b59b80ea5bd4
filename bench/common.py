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
