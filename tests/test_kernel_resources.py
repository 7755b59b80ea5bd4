"""The chunked KDA backward's own Triton kernels and the MLA decode split kernel fit an H100
(sm_90): compiled offline for sm_90 at the launch configurations their launchers use, each needs
at most 200 KB of shared memory per block (the hardware allows 232448 bytes; the margin is for
other triton versions, the GPU machine runs 3.6) — bench/check_kernel_resources.py does the
compiling and the ptxas report.

CPU only, ~60 s: the state, dstate, wy, intra and finish kernels at K = V = 100 (masked tails)
and 256 (the largest tiles of the scans), bf16 and fp32 (the largest operands), every feature
switched on; the forward scan at fp32, K = 256 (within the hardware limit: it cannot keep the
margin); the split kernel at 16, 32 and 64+ heads in bf16 (its pipelined KV tile buffers
are the largest allocation).
`python bench/check_kernel_resources.py` covers every kernel of the package at every supported
dim and dtype; its --sass summary (static instruction mix and loop lengths) is checked on the
forward scan and on a hand-written disassembly.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import triton

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "check_kernel_resources.py"
MARGIN_SHARED = 200 * 1024
KERNELS = tuple(f"chunk_kda_bwd_{name}_kernel" for name in ("state", "dstate", "wy", "intra", "finish"))
ROW = re.compile(r"^(\w+)\s+(.+?)\s+(-?\d+)\s+(-?\d+)\s+(-?\d+)/(-?\d+)\s+(.+)$")


def _ptxas() -> str | None:
    if "nvidia" not in triton.backends.backends:
        return None
    try:
        tool = triton.knobs.nvidia.ptxas
    except (RuntimeError, AttributeError, OSError):
        return None
    return None if tool is None else tool.path


def _check(*args, family="chunk_kda_bwd", match="chunk_kda_bwd_") -> subprocess.CompletedProcess:
    if _ptxas() is None:
        pytest.skip("no ptxas for sm_90: triton's NVIDIA backend or its bundled ptxas is missing "
                    "(set TRITON_PTXAS_PATH to a CUDA 12.x ptxas)")
    cmd = [sys.executable, str(SCRIPT), "--kernels", family, "--match", match, "--jobs", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _rows(stdout: str) -> list[tuple]:
    return [m.groups() for line in stdout.splitlines() if (m := ROW.match(line)) and m.group(1) in KERNELS]


def test_chunk_backward_kernels_fit_sm90_shared_memory():
    run = _check("--dims", "100,256", "--dtypes", "bf16,fp32", "--variants", "full", "--max-shared", str(MARGIN_SHARED))
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = _rows(run.stdout)
    assert sorted(r[0] for r in rows) == sorted(KERNELS * 4), run.stdout  # 2 dims x 2 dtypes each
    for kernel, config, shared, registers, *_ in rows:
        assert 0 < int(shared) <= MARGIN_SHARED, f"{kernel} {config}: {shared} bytes of shared memory"
        assert 0 < int(registers) <= 255, f"{kernel} {config}: {registers} registers"


def test_mla_decode_split_kernel_fits_sm90_shared_memory():
    """At 5 stages Triton gives the paged KV tile two buffers (three with wgmma at 64 heads per
    program); the heuristic's BLOCK_N must leave them room beside the q block (64 heads once
    asked for 295936 bytes)."""
    run = _check("--dtypes", "bf16", "--variants", "plain", "--max-shared", str(MARGIN_SHARED),
                 family="mla_decode", match="mla_decode_split")
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [m.groups() for line in run.stdout.splitlines() if (m := ROW.match(line)) and m.group(1) == "mla_decode_split_kernel"]
    assert len(rows) == 3, run.stdout  # BLOCK_H 16, 32 and 64 (128 heads share 64's tile)
    for _, config, shared, *_ in rows:
        assert 0 < int(shared) <= MARGIN_SHARED, f"{config}: {shared} bytes of shared memory"


def test_forward_scan_fits_sm90_at_fp32_k256():
    """The forward scan's largest operands, fp32 at K = 256 (three [64, 256] fp32 tiles, 192 KB):
    its launch config must stay within the hardware's 232448 bytes (BV = 32 asked for 245760)."""
    run = _check("--dims", "256", "--dtypes", "fp32", "--variants", "full", family="chunk_kda_fwd",
                 match="chunk_kda_fwd_scan")
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "chunk_kda_fwd_scan_kernel" in run.stdout, run.stdout


def test_check_fails_over_the_shared_memory_limit():
    """The exit status the test above relies on: a limit below what a kernel needs fails the run."""
    run = _check("--dims", "64", "--dtypes", "bf16", "--variants", "plain", "--max-shared", "4096")
    assert run.returncode == 1, run.stdout + run.stderr
    assert re.search(r"shared \d+ > 4096", run.stdout), run.stdout


def test_sass_mix_counts_instructions_opcodes_and_loops():
    """The --sass summary on nvdisasm's text: predicated instructions count, labels resolve to the
    next instruction's address, and only a backward branch makes a loop."""
    sys.path.insert(0, str(SCRIPT.parent))
    from check_kernel_resources import sass_mix

    sass = """
        /*0000*/                   IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;
    .L_x_0:
        /*0010*/                   HGMMA.64x32x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0020*/               @P0 IADD3 R2, R2, 0x1, RZ ;
        /*0030*/               @P0 BRA `(.L_x_0) ;
        /*0040*/              @!P1 BRA `(.L_x_1) ;
        /*0050*/                   IADD3 R3, R3, 0x1, RZ ;
    .L_x_1:
        /*0060*/                   EXIT ;
    """
    assert sass_mix(sass, top=2) == "7 instr, 1 mma: IADD3 2, BRA 2; loops 3"


def test_sass_summary_of_the_forward_scan():
    """--sass prints the machine code's shape under each row: the forward scan's chunk loop and
    its wgmma (HGMMA) instructions."""
    run = _check("--dims", "128", "--dtypes", "bf16", "--variants", "plain", "--sass", family="chunk_kda_fwd",
                 match="chunk_kda_fwd_scan")
    assert run.returncode == 0, run.stdout + run.stderr
    summary = re.search(r"SASS (\d+) instr, (\d+) mma: .*; loops (\d+)", run.stdout)
    assert summary and int(summary.group(2)) > 0, run.stdout
    assert 0 < int(summary.group(3)) < int(summary.group(1)), run.stdout

