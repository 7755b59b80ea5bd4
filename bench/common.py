"""Helpers shared by the benchmark suites (imported by bench_*.py and bench scripts only)."""

from collections import defaultdict
from dataclasses import dataclass

import torch
import triton
from torch.profiler import ProfilerActivity, profile

CEILING_COPY_BYTES = 2**30  # bytes of the copied tensor: 20x the H100's L2
CEILING_MATMUL_N = 8192


@dataclass(frozen=True)
class Ceilings:
    """The device's measured copy bandwidth (bytes read + written per second) and dense bf16 matmul
    rate: what a kernel's floor divides its mandatory bytes and FLOPs by."""

    copy_gbps: float
    matmul_tflops: float

    def floor_fields(self, ms: float, nbytes: int, flops: int = 0) -> dict:
        """extra_info's floor_ms = max(nbytes / copy bandwidth, flops / matmul rate) and of_floor
        = floor_ms / ms (1.0: the kernel runs at its floor)."""
        floor_ms = max(nbytes / (self.copy_gbps * 1e9), flops / (self.matmul_tflops * 1e12)) * 1e3
        return {"floor_ms": floor_ms, "of_floor": floor_ms / ms}


def _copy_gbps() -> float:
    """Bytes read + written per second by a device-to-device copy_ of CEILING_COPY_BYTES."""
    src = torch.randn(CEILING_COPY_BYTES // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * CEILING_COPY_BYTES / (ms * 1e-3) / 1e9


def _matmul_tflops() -> float:
    """2·N³ FLOPs per second of an N = CEILING_MATMUL_N bf16 torch.matmul on random inputs."""
    n = CEILING_MATMUL_N
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: torch.matmul(a, b, out=c), return_mode="median")
    return 2 * n**3 / (ms * 1e-3) / 1e12


def measure_ceilings() -> Ceilings:
    """do_bench medians of a large copy and a large matmul, then the cached buffers handed back."""
    ceilings = Ceilings(copy_gbps=_copy_gbps(), matmul_tflops=_matmul_tflops())
    torch.cuda.empty_cache()
    return ceilings


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative RMS error ||x - ref|| / ||ref||, in fp64."""
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm()).item()


def time_graph_replay(benchmark, graph: torch.cuda.CUDAGraph, ceilings: Ceilings, nbytes: int, flops: int = 0, **extra_info) -> None:
    """Records extra_info with ms = median of triton.testing.do_bench over graph replays (L2 flushed
    between them), gbps = nbytes / ms and the floor fields of (nbytes, flops); pytest-benchmark's
    own statistics time replay + sync."""
    ms = triton.testing.do_bench(graph.replay, return_mode="median")

    def replay_and_sync():
        graph.replay()
        torch.cuda.synchronize()

    benchmark.extra_info.update(extra_info, ms=ms, gbps=nbytes / (ms * 1e-3) / 1e9, **ceilings.floor_fields(ms, nbytes, flops))
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


def kernel_times(run, calls: int) -> dict[str, float]:
    """Mean CUDA microseconds per call of each kernel `run` launches."""
    for _ in range(2):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run()
        torch.cuda.synchronize()
    totals = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time
    return {name: t / calls for name, t in sorted(totals.items(), key=lambda kv: -kv[1])}
