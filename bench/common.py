"""Helpers shared by the benchmark suites (imported by bench_*.py and bench scripts only)."""

import torch


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative RMS error ||x - ref|| / ||ref||, in fp64."""
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm()).item()


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
