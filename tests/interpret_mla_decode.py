"""Runs the MLA decode Triton kernels (split-KV + combine) and the cache-write kernel under
TRITON_INTERPRET=1 on CPU against meta's references; exits non-zero on any mismatch.

Run as a script (test_mla_decode_kernel.py starts it in a subprocess, because TRITON_INTERPRET must
be set before triton is first imported). Tiny shapes, every path: a length-0 row, lengths within
one tile and over several, both deals of tiles to programs (pieces inside one sequence, and
balanced ranges that cross sequences), fewer tiles than programs, one sequence over all programs,
partials merged over several combine steps (also with fewer tiles than programs, some programs
idle), a batch over one chunk of the tile count, two head blocks, no shared-key slice (D_qk =
v_dim), non-power-of-two widths, pages smaller than a tile and not a power of two, pages of two
tiles (one scalar page id per tile), lengths above the table's capacity, strided q / cache / block
table. Unowned cache rows are NaN and unused table entries out of range; outputs and the launcher's
scratch (kda_inputs.poisoned_scratch) start as NaN. fp32 and fp16 (the interpreter multiplies bf16
as raw integers, so bf16 runs only in the GPU tests). The cache write: int32 and int64 slots,
skipped slots (-1, past the cache), a strided cache and rows; every row it must not write stays
bit-identical.
"""

import os
import sys

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("interpret_mla_decode.py needs TRITON_INTERPRET=1 in its environment")

import torch
from kda_inputs import poisoned_scratch, rel_rms
from mla_inputs import paged_cache

from kda_ops.kernels.mla_cache_write import mla_cache_write_triton
from kda_ops.kernels.mla_decode import MLADecodeConfig, mla_decode_triton
from kda_ops.meta.mla_decode import mla_cache_write_reference, mla_decode_reference

# 4 "SMs" in the interpreter: 8 programs share the tiles of a launch.
TWO_PER_SM = MLADecodeConfig(block_h=16, block_n=16, num_warps=4, num_stages=1, programs_per_sm=2)
# 16 programs: a sequence's span can pass the combine's 8 partials per step
SIXTEEN_PROGRAMS = MLADecodeConfig(block_h=16, block_n=16, num_warps=4, num_stages=1, programs_per_sm=4)
# 64 programs: a span of more than 32 partials takes several of the combine's tall steps
SIXTY_FOUR_PROGRAMS = MLADecodeConfig(block_h=16, block_n=16, num_warps=4, num_stages=1, programs_per_sm=16)
# id, lens, H, D_qk, v_dim, block_size, dtype, config (None: the heuristic), variant:
# "strided" inputs, or "over-capacity": a row that fills its table is passed as length 1000
CASES = [
    ("B3-H4-D80V64-bs16-default", [0, 5, 40], 4, 80, 64, 16, torch.float32, None, ""),
    ("B3-H4-D80V64-bs16-default-fp16", [0, 5, 40], 4, 80, 64, 16, torch.float16, None, ""),
    ("aligned-pieces-mixed-lengths", [0, 5, 40, 68, 17], 4, 80, 64, 16, torch.float32, TWO_PER_SM, ""),
    ("balanced-ranges-across-sequences", [40, 0, 70, 33, 64, 17, 50, 5, 80, 48, 1, 65], 4, 80, 64, 16, torch.float32, TWO_PER_SM, ""),
    ("fewer-tiles-than-programs", [3, 0, 2], 4, 80, 64, 16, torch.float32, TWO_PER_SM, ""),
    ("one-sequence-all-programs", [200], 4, 80, 64, 16, torch.float32, TWO_PER_SM, ""),
    ("H20-two-head-blocks-fp16", [33, 0, 70], 20, 48, 32, 16, torch.float16, TWO_PER_SM, ""),
    ("H20-two-head-blocks", [33, 0, 70], 20, 48, 32, 16, torch.float32, TWO_PER_SM, ""),
    ("combine-steps-long-among-short", [200, 1, 1, 1, 1, 1, 1, 1], 4, 80, 64, 16, torch.float32, SIXTEEN_PROGRAMS, ""),
    ("combine-steps-fewer-tiles-than-programs", [200, 0, 0, 0], 4, 80, 64, 16, torch.float32, SIXTEEN_PROGRAMS, ""),
    ("combine-tall-steps", [3, 1000, 20], 2, 48, 32, 16, torch.float32, SIXTY_FOUR_PROGRAMS, ""),
    ("batch-over-one-length-chunk", [i % 3 for i in range(300)], 2, 32, 32, 16, torch.float32, TWO_PER_SM, ""),
    ("no-shared-key-D32V32", [1, 33, 16], 3, 32, 32, 16, torch.float32, None, ""),
    ("two-tiles-per-page", [0, 5, 40, 68, 17], 4, 80, 64, 32, torch.float32, TWO_PER_SM, ""),
    ("two-tiles-per-page-fp16", [70, 0, 31, 33], 4, 80, 64, 32, torch.float16, TWO_PER_SM, ""),
    ("non-pow2-V48-D60-page12", [0, 11, 12, 13, 50], 5, 60, 48, 12, torch.float32, TWO_PER_SM, ""),
    ("strided-q-cache-table", [7, 0, 45], 4, 80, 64, 16, torch.float32, TWO_PER_SM, "strided"),
    ("over-capacity-length", [48, 5], 4, 80, 64, 16, torch.float32, TWO_PER_SM, "over-capacity"),
]


def run_case(case) -> list[str]:
    name, lens, H, D, V, block_size, dtype, config, variant = case
    capacity = -(-max(lens) // block_size) * block_size
    cache = paged_cache(lens, block_size, D, dtype=dtype, max_blocks=capacity // block_size)
    q = torch.randn(len(lens), H, D).to(dtype)
    kv_cache, block_table, seq_lens = cache.kv_cache, cache.block_table, cache.seq_lens
    if variant == "over-capacity":
        seq_lens = torch.where(seq_lens == capacity, 1000, seq_lens).to(torch.int32)
    if variant == "strided":
        q = torch.cat([q, torch.full_like(q[..., :8], float("nan"))], dim=-1)[..., :D]
        kv_cache = torch.cat([torch.full_like(kv_cache[:1], float("nan")), kv_cache])[1:]
        block_table = torch.cat([block_table, block_table], dim=1)[:, : block_table.shape[1]]
        assert q.stride(1) != D and block_table.stride(0) != block_table.shape[1]
    scale = D**-0.5
    o = torch.full((len(lens), H, V), float("nan"), dtype=dtype)
    lse = torch.full((len(lens), H), float("nan"))
    with poisoned_scratch():
        mla_decode_triton(q, kv_cache, block_table, seq_lens, o, lse, scale, V, config=config)
    ref_o, ref_lse = mla_decode_reference(q.double(), kv_cache.double(), block_table, cache.seq_lens, scale, V)

    failures = []
    nonempty = torch.tensor(lens) > 0
    if not torch.isfinite(o).all() or not torch.isfinite(lse[nonempty]).all():
        failures.append(f"{name}: NaN/Inf in the outputs (unwritten elements or a poisoned row read)")
    if not (o[~nonempty] == 0).all() or not (lse[~nonempty] == float("-inf")).all():
        failures.append(f"{name}: a length-0 row is not o = 0, lse = -inf")
    # fp32: rounding only; fp16: p is rounded to fp16 for the PV product (the bars of DESIGN.md)
    tol_o, tol_lse = (1e-5, 1e-5) if dtype == torch.float32 else (5e-3, 1e-3)
    err_o, err_lse = rel_rms(o[nonempty], ref_o[nonempty]), rel_rms(lse[nonempty], ref_lse[nonempty])
    print(f"{name:32s} o rel err {err_o:.2e}  lse rel err {err_lse:.2e}")
    if not err_o <= tol_o:
        failures.append(f"{name}: o rel err {err_o:.3e} > {tol_o:.0e}")
    if not err_lse <= tol_lse:
        failures.append(f"{name}: lse rel err {err_lse:.3e} > {tol_lse:.0e}")
    return failures


# id, num_blocks, block_size, D, slots (-1 and num_blocks * block_size are skipped), slot dtype, strided
WRITE_CASES = [
    ("write-int64-skips", 5, 16, 80, [3, -1, 79, 16, 80, 40], torch.int64, False),
    ("write-int32-page12-D60", 4, 12, 60, [0, 47, -5, 13], torch.int32, False),
    ("write-strided-cache-and-rows", 3, 16, 48, [2, 33, -1], torch.int64, True),
]


def run_write_case(case) -> list[str]:
    name, num_blocks, block_size, D, slots, slot_dtype, strided = case
    kv_cache = torch.randn(num_blocks, block_size, D + 8 if strided else D)[..., :D]
    rows = torch.randn(len(slots), D + 8 if strided else D)[:, :D]
    slot_mapping = torch.tensor(slots, dtype=slot_dtype)
    expected = kv_cache.clone()
    mla_cache_write_reference(expected, rows, slot_mapping)
    mla_cache_write_triton(kv_cache, rows, slot_mapping)
    written = sum(0 <= s < num_blocks * block_size for s in slots)
    print(f"{name:32s} {written} rows written")
    return [] if torch.equal(kv_cache, expected) else [f"{name}: the cache differs from the reference's (a row missing, wrong or extra)"]


def main() -> int:
    torch.manual_seed(0)
    failures = [f for case in CASES for f in run_case(case)]
    failures += [f for case in WRITE_CASES for f in run_write_case(case)]
    for f in failures:
        print("FAIL", f)
    n_cases = len(CASES) + len(WRITE_CASES)
    print(f"{n_cases - len({f.split(':')[0] for f in failures})} of {n_cases} cases passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
