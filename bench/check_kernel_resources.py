"""Compiles every Triton kernel of kda_ops for sm_90 (H100) at each launch configuration its
heuristics produce for the supported head dims and dtypes, and prints what each needs per block:
shared memory (Triton's allocation), registers per thread and spill stores/loads (ptxas -v).
No GPU is needed: triton.compile targets GPUTarget("cuda", 90, 32) on any machine, and ptxas
ships in the triton wheel.

The launch arguments are not restated here: each op's launcher (chunk_kda_fwd_triton,
chunk_kda_bwd_triton, kda_decode_fwd, causal_conv1d_update_fwd, mla_decode_triton) runs on small
CPU tensors with its kernel launches intercepted, so every kernel is compiled with exactly the
arguments, constexprs, num_warps and num_stages that its launcher passes. Runtime integers that
the launch passed as multiples of 16 are compiled as such, as Triton's JIT specialises them on
the GPU (without it the paged loads of mla_decode are not vectorised, never pipelined, and their
shared memory is underestimated), pointers as 16-byte aligned (torch's
allocations are).

Each op runs in up to three variants: `plain` (dense batch, every optional feature off), `full`
(varlen cu_seqlens, initial state, final-state gradient, in-kernel L2 norm, the gate computed in
the kernels; for the decode ops a multi-token step) and `bounded` (`full` with the gate's bounded
form), so every side of every constexpr feature switch is compiled.

Exits 1 when a kernel fails to compile or needs more shared memory per block than --max-shared
(default: the H100's 232448 bytes), or, with --no-spills, when ptxas spills registers; 2 when
there is nothing to check (no ptxas, or no launch matched the filters).

    python bench/check_kernel_resources.py                       # everything (minutes)
    python bench/check_kernel_resources.py --kernels chunk_kda_bwd --dims 256 --dtypes bf16,fp32
    python bench/check_kernel_resources.py --kernels chunk_kda_fwd --match scan --dims 128 --sass

--sass adds each kernel's static machine code shape (sass_mix): instructions, tensor-core
products, the commonest opcodes and each loop's length, to compare two versions of a kernel
offline before timing them.
"""

import argparse
import collections
import functools
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget

from kda_ops.kernels import chunk_kda_bwd, chunk_kda_fwd, kda_decode, mla_decode
from kda_ops.meta.chunk_kda import RESIDUAL_NAMES, chunk_kda_residuals_meta

H100_SHARED_BYTES = 232448  # cudaDevAttrMaxSharedMemoryPerBlockOptin on an H100 (227 KB)
TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DIMS = (64, 100, 128, 256)  # supported K and V of the KDA ops
MLA_HEADS = (16, 32, 64, 128)  # one per row of mla_decode's tile table, and the largest
MLA_DIMS = (576, 512)  # D_qk = 512 latent + 64 shared rope key, v_dim = 512
FAMILIES = ("chunk_kda_fwd", "chunk_kda_bwd", "kda_decode", "mla_decode")
_TYPE_NAMES = {
    torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int32: "i32", torch.int64: "i64", torch.bool: "i1",
}


@dataclass(frozen=True)
class Launch:
    """One kernel launch as a launcher made it, reduced to what the compiler sees."""

    family: str
    case: str  # dims, dtype, variant
    kernel: str  # attribute name of the @triton.jit function in its module
    module: str
    signature: tuple  # ((name, type or "constexpr"), ...) in parameter order
    constexprs: tuple  # ((name, value), ...)
    divisible: tuple  # indices of the integer arguments passed as multiples of 16
    num_warps: int
    num_stages: int

    def key(self):
        return (self.module, self.kernel, self.signature, self.constexprs, self.divisible, self.num_warps, self.num_stages)

    def config(self) -> str:
        shown = {n: v for n, v in self.constexprs if n.startswith("B") or n in ("D", "W")}
        shown = " ".join(f"{n}={v}" for n, v in shown.items() if n not in ("BT", "BC"))
        return f"{self.case} | {shown} warps={self.num_warps} stages={self.num_stages}"


@dataclass
class Resources:
    shared: int = -1
    registers: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    error: str = ""
    seconds: float = 0.0
    sass: str = ""  # with --sass: sass_mix of the kernel's machine code


@dataclass
class _Recorder:
    """Stands in for a launcher's `launch` wrapper: records kernel[grid](*args, **kwargs)."""

    family: str
    case: str
    launches: list = field(default_factory=list)

    def __call__(self, kernel):
        return _Grid(self, kernel)

    def record(self, kernel, args, kwargs):
        fn = kernel  # a triton.runtime.jit.JITFunction
        kwargs = dict(kwargs)
        num_warps = kwargs.pop("num_warps", 4)
        num_stages = kwargs.pop("num_stages", 3)  # triton's default on CUDA
        bound = dict(zip(fn.arg_names, args))
        bound.update(kwargs)
        signature, constexprs, divisible = [], [], []
        for param in fn.params:
            name = param.name
            if name not in bound and param.default is inspect.Parameter.empty:
                raise TypeError(f"{fn.__name__}: no value for {name}")
            value = bound[name] if name in bound else param.default
            if param.is_constexpr or value is None:
                signature.append((name, "constexpr"))
                constexprs.append((name, value))
            elif isinstance(value, torch.Tensor):
                signature.append((name, "*" + _TYPE_NAMES[value.dtype]))
            elif isinstance(value, bool):
                signature.append((name, "i1"))
            elif isinstance(value, int):
                signature.append((name, "i32" if -(2**31) <= value < 2**31 else "i64"))
                if value % 16 == 0:
                    divisible.append(len(signature) - 1)
            elif isinstance(value, float):
                signature.append((name, "fp32"))
            else:
                raise TypeError(f"{fn.__name__}: argument {name} of type {type(value).__name__}")
        self.launches.append(
            Launch(self.family, self.case, fn.__name__, fn.__module__, tuple(signature), tuple(constexprs),
                   tuple(divisible), num_warps, num_stages)
        )


@dataclass
class _Grid:
    recorder: _Recorder
    kernel: object

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.recorder.record(self.kernel, args, kwargs)


def _chunk_inputs(K, V, dtype, variant):
    """Small CPU inputs of the chunked ops: B=2 dense, or three packed sequences (varlen)."""
    full = variant != "plain"
    B, T, H = (1, 200, 2) if full else (2, 130, 2)
    x = dict(
        q=torch.randn(B, T, H, K).to(dtype), k=torch.randn(B, T, H, K).to(dtype),
        v=torch.randn(B, T, H, V).to(dtype), g=-torch.rand(B, T, H, K), beta=torch.rand(B, T, H).to(dtype),
    )
    cu = torch.tensor([0, 15, 100, T], dtype=torch.int32) if full else None
    n = 3 if full else B
    h0 = torch.randn(n, H, K, V) if full else None
    # the full variant computes the gate in the kernels from its pre-activation
    gate = dict(A_log=torch.zeros(H), dt_bias=torch.zeros(H * K)) if full else {}
    if full:
        x["g"] = x["g"].to(dtype)
    bound = dict(gate_lower_bound=-5.0) if variant == "bounded" else {}
    return x, cu, n, h0, gate, bound


def _launches_chunk_fwd(K, V, dtype, variant, rec):
    x, cu, n, h0, gate, bound = _chunk_inputs(K, V, dtype, variant)
    full = variant != "plain"
    B, T, H = x["q"].shape[:3]
    o = torch.empty(B, T, H, V, dtype=dtype)
    final = torch.empty(n, H, K, V) if full else torch.empty(0)
    chunk_kda_fwd.chunk_kda_fwd_triton(x["q"], x["k"], x["v"], x["g"], x["beta"], h0, cu, K**-0.5, full, o, final,
                                       launch=rec, **gate, **bound)


def _launches_chunk_bwd(K, V, dtype, variant, rec):
    x, cu, n, h0, gate, bound = _chunk_inputs(K, V, dtype, variant)
    full = variant != "plain"
    B, T, H = x["q"].shape[:3]
    do = torch.randn(B, T, H, V).to(dtype)
    dht = torch.randn(n, H, K, V) if full else None
    outs = [torch.empty_like(x[name]) for name in ("q", "k", "v", "g", "beta")]
    dh0 = torch.empty(n, H, K, V) if full else torch.empty(0)
    gate_grads = [torch.empty_like(p) for p in gate.values()] or [torch.empty(0), torch.empty(0)]
    for residuals in (None, dict(zip(RESIDUAL_NAMES, chunk_kda_residuals_meta(x["q"], full, save=True)))):
        chunk_kda_bwd.chunk_kda_bwd_triton(x["q"], x["k"], x["v"], x["g"], x["beta"], h0, cu, do, dht, K**-0.5, full,
                                           *outs, dh0, *gate_grads, launch=rec, residuals=residuals, **gate,
                                           **bound)


def _launches_kda_decode(K, V, dtype, variant, rec):
    full = variant != "plain"
    B, T, H, S = 3, (2 if full else 1), 2, 4
    q, k = torch.randn(B, T, H, K).to(dtype), torch.randn(B, T, H, K).to(dtype)
    v, g = torch.randn(B, T, H, V).to(dtype), -torch.rand(B, T, H, K)
    beta, state = torch.rand(B, T, H).to(dtype), torch.zeros(S, H, K, V)
    slots = torch.tensor([0, -1, 2], dtype=torch.int32)
    o = torch.empty(B, T, H, V, dtype=dtype)
    if full:  # the gate computed in the kernel from its pre-activation
        g, A_log, dt_bias = g.to(dtype), torch.zeros(H), torch.zeros(H * K)
    else:
        A_log = dt_bias = None
    with mock.patch.object(kda_decode, "_launchable", rec):
        kda_decode.kda_decode_fwd(q, k, v, g, beta, state, slots, o, K**-0.5, full, A_log, dt_bias,
                                  -5.0 if variant == "bounded" else None)
        D, W = H * K, 4  # the conv of the key projection: H·K channels, width 4
        xin = torch.randn(B, T, D).to(dtype)
        kda_decode.causal_conv1d_update_fwd(xin, torch.zeros(S, D, W - 1, dtype=dtype), torch.randn(D, W).to(dtype),
                                            slots, torch.empty_like(xin))


def _launches_mla_decode(num_heads, dtype, variant, rec):
    full = variant != "plain"
    D, v_dim = MLA_DIMS
    B, page, blocks = (3 if full else 1), 16, 4
    q = torch.randn(B, num_heads, D).to(dtype)
    cache = torch.randn(B * blocks, page, D).to(dtype)
    table = torch.arange(B * blocks, dtype=torch.int32).reshape(B, blocks)
    lens = torch.tensor([page * blocks] * B, dtype=torch.int32)
    o = torch.empty(B, num_heads, v_dim, dtype=dtype)
    lse = torch.empty(B, num_heads)
    mla_decode.mla_decode_triton(q, cache, table, lens, o, lse, D**-0.5, v_dim, launch=rec)


def collect(families, dims, dtypes, variants) -> list[Launch]:
    """Every distinct (kernel, arguments, config) the launchers produce, in a stable order."""
    launches, seen = [], set()
    for family in families:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            for variant in variants:
                if family == "mla_decode":
                    calls = [(f"H={h} D={MLA_DIMS[0]}/{MLA_DIMS[1]}", (h,)) for h in MLA_HEADS]
                else:
                    calls = [(f"K={d} V={d}", (d, d)) for d in dims]
                for what, dim_args in calls:
                    rec = _Recorder(family, f"{what} {dtype_name} {variant}")
                    fn = {
                        "chunk_kda_fwd": _launches_chunk_fwd,
                        "chunk_kda_bwd": _launches_chunk_bwd,
                        "kda_decode": _launches_kda_decode,
                        "mla_decode": _launches_mla_decode,
                    }[family]
                    fn(*dim_args, dtype, variant, rec)
                    for launch in rec.launches:
                        if launch.key() not in seen:
                            seen.add(launch.key())
                            launches.append(launch)
    return launches


def ptxas_path() -> str | None:
    """The ptxas triton compiles sm_90 code with (TRITON_PTXAS_PATH or the wheel's), if it runs."""
    try:
        tool = triton.knobs.nvidia.ptxas
        return tool.path if tool is not None else None
    except (RuntimeError, AttributeError, OSError):
        return None


def _ptxas_report(ptx: str, sass: bool = False) -> tuple[int, int, int, str]:
    """(registers, spill store bytes, spill load bytes, sass_mix or "") from ptxas -v with
    triton's own flags; the SASS from nvdisasm beside ptxas in triton's wheel."""
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = os.path.join(tmp, "kernel.ptx"), os.path.join(tmp, "kernel.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run(
            [ptxas_path(), "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", src, "-o", cubin],
            capture_output=True, text=True, check=True,
        )
        mix = ""
        if sass:
            nvdisasm = os.path.join(os.path.dirname(ptxas_path()), "nvdisasm")
            mix = sass_mix(subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout)
    log = run.stderr + run.stdout
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return registers, int(spills.group(1)), int(spills.group(2)), mix


_SASS_LABEL = re.compile(r"^(\.L_x_\d+):")
_SASS_INSTRUCTION = re.compile(r"^/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)\S*\s*(.*)")


def sass_mix(sass: str, top: int = 8) -> str:
    """The static shape of a kernel's machine code (nvdisasm -c text): its instruction count, how
    many of them are tensor-core products (HGMMA: wgmma, HMMA: mma.sync), the commonest opcodes,
    and the length of each loop (a backward branch's body) in instructions, e.g. "1216 instr, 40
    mma: IMAD 207, IADD3 148, ...; loops 716". Static counts: a loop body runs once per iteration,
    the rest once per program."""
    instructions, labels, pending = [], {}, []
    for line in sass.splitlines():
        line = line.strip()
        if label := _SASS_LABEL.match(line):
            pending.append(label.group(1))
        elif m := _SASS_INSTRUCTION.match(line):
            address = int(m.group(1), 16)
            labels.update((name, address) for name in pending)
            pending = []
            instructions.append((address, m.group(2), m.group(3)))
    counts = collections.Counter(op for _, op, _ in instructions)
    loops = []
    for address, op, operands in instructions:
        target = re.search(r"\((\.L_x_\d+)\)", operands) if op == "BRA" else None
        if target and labels.get(target.group(1), address) < address:
            loops.append(sum(labels[target.group(1)] <= a <= address for a, _, _ in instructions))
    shown = ", ".join(f"{op} {n}" for op, n in counts.most_common(top))
    mma = counts["HGMMA"] + counts["HMMA"]
    return f"{len(instructions)} instr, {mma} mma: {shown}; loops {' '.join(map(str, loops)) or 'none'}"


def compile_one(launch: Launch, sass: bool = False) -> Resources:
    start = time.perf_counter()
    module = {m.__name__: m for m in (chunk_kda_bwd, chunk_kda_fwd, kda_decode, mla_decode)}[launch.module]
    fn = getattr(module, launch.kernel)
    signature = dict(launch.signature)
    attrs = {(i,): [["tt.divisibility", 16]] for i, (_, t) in enumerate(launch.signature)
             if t.startswith("*") or i in launch.divisible}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=dict(launch.constexprs), attrs=attrs)
    try:
        compiled = triton.compile(src, target=TARGET,
                                  options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
        registers, stores, loads, mix = _ptxas_report(compiled.asm["ptx"], sass)
    except Exception as e:  # noqa: BLE001 - reported per kernel, the run goes on
        return Resources(error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}",
                         seconds=time.perf_counter() - start)
    return Resources(compiled.metadata.shared, registers, stores, loads, seconds=time.perf_counter() - start,
                     sass=mix)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", default=",".join(FAMILIES), help=f"op families, of {', '.join(FAMILIES)}")
    parser.add_argument("--dims", default=",".join(map(str, DIMS)), help="K = V values of the KDA ops")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="input dtypes")
    parser.add_argument("--variants", default="plain,full", help="of plain, full, bounded")
    parser.add_argument("--match", default="", help="only kernels whose name contains this")
    parser.add_argument("--max-shared", type=int, default=H100_SHARED_BYTES, help="bytes of shared memory per block")
    parser.add_argument("--no-spills", action="store_true", help="fail on any register spill")
    parser.add_argument("--sass", action="store_true",
                        help="also print each kernel's static SASS: instructions, commonest opcodes, loop lengths")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    families = [f for f in args.kernels.split(",") if f]
    unknown = set(families) - set(FAMILIES) | set(args.dtypes.split(",")) - set(DTYPES)
    if unknown:
        parser.error(f"unknown: {', '.join(sorted(unknown))}")
    if ptxas_path() is None:
        print("ptxas not found (neither TRITON_PTXAS_PATH nor triton's wheel has one)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    launches = collect(families, [int(d) for d in args.dims.split(",")], args.dtypes.split(","),
                       args.variants.split(","))
    launches = [launch for launch in launches if args.match in launch.kernel]
    if not launches:
        print("no kernel launches matched", file=sys.stderr)
        return 2
    print(f"triton {triton.__version__}, ptxas {triton.knobs.nvidia.ptxas.version} (sm_90a), {len(launches)} compiles, "
          f"shared-memory limit {args.max_shared} B", flush=True)
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(functools.partial(compile_one, sass=args.sass), launches))

    header = f"{'kernel':34s} {'config':78s} {'shared':>7s} {'regs':>4s} {'spill st/ld':>11s}  status"
    print(header)
    print("-" * len(header))
    failures = 0
    for launch, res in zip(launches, results):
        problems = []
        if res.error:
            problems.append(res.error)
        else:
            if res.shared > args.max_shared:
                problems.append(f"shared {res.shared} > {args.max_shared}")
            if args.no_spills and (res.spill_stores or res.spill_loads):
                problems.append("spills")
        failures += bool(problems)
        status = "; ".join(problems) if problems else ("ok" if not res.spill_stores else "ok (spills)")
        print(f"{launch.kernel:34s} {launch.config():78s} {res.shared:7d} {res.registers:4d} "
              f"{res.spill_stores:5d}/{res.spill_loads:<5d}  {status}")
        if res.sass:
            print(f"    SASS {res.sass}")
    print(f"{failures} of {len(launches)} over the limits" if failures else f"all {len(launches)} within the limits")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
