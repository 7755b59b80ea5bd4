"""Deployment artifacts (kda_ops.export) on CPU, micro preset: export -> save -> load in a fresh
process -> the same logits and tokens as the eager model; bounds and damaged-artifact errors; the
command line.

Time (2 CPU cores): the torch.export fixture ~30 s (export + one worker process);
test_aoti_package_* is SLOW, ~70 s, almost all of it AOTInductor compiling the prefill and one
decode program; the rest ~40 s.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from kda_ops import KimiLinearConfig, KimiLinearForCausalLM, export_model, load_exported
from kda_ops.export import ArtifactError, ExportBoundsError, aoti_inductor_configs

WORKER = os.path.join(os.path.dirname(__file__), "exported_worker.py")
MAX_BATCH, MAX_LEN = 3, 32
BUCKETS = (1, 3)  # a batch of 2 runs in bucket 3 with one idle slot
DECODE_STEPS = 3
NEW_TOKENS = 16
# Export traces with 2 sequences of 5 tokens in all (a dim of example size 0 or 1 would be
# specialised); a single 1-token prompt checks that sizes of 1 run correctly too.
LOGIT_PROMPT_LENGTHS = {"prompt_len_1": 1, "prompt_len_5": 5, "prompt_len_13": 13}
GENERATE_PROMPT_LENGTHS = (5, 13)


def micro_model() -> KimiLinearForCausalLM:
    model = KimiLinearForCausalLM(KimiLinearConfig.preset("micro"), dtype=torch.float32).init_weights(0).eval()
    # Larger than the 0.02 default so logits are far from uniform and greedy choices are clear.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "conv1d" not in name:
                p.mul_(5)
    return model


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


LOGIT_PROMPTS = {case: prompt(n, seed=n) for case, n in LOGIT_PROMPT_LENGTHS.items()}
GENERATE_PROMPTS = [prompt(n, seed=100 + n) for n in GENERATE_PROMPT_LENGTHS]


@torch.no_grad()
def eager_logits(model: KimiLinearForCausalLM, ids: list[int], steps: int) -> list[torch.Tensor]:
    """Prefill logits then `steps` greedy decode-step logits, with caches of the exported bounds."""
    model.allocate_caches(MAX_BATCH, MAX_LEN)
    device = model.device
    slots = torch.arange(1, device=device)
    model.reset_sequences(slots)
    lengths = torch.tensor([0, len(ids)], dtype=torch.int32, device=device)
    out = [model.prefill(torch.tensor(ids, device=device), lengths, slots)]
    for _ in range(steps):
        out.append(model.decode_step(out[-1].argmax(-1), slots))
    return out


def run_worker(directory, tmp_path, *, use_aoti: bool, logit_prompts, decode_steps: int) -> dict:
    request = dict(
        use_aoti=use_aoti,
        logit_prompts=logit_prompts,
        decode_steps=decode_steps,
        generate_prompts=GENERATE_PROMPTS,
        max_new_tokens=NEW_TOKENS,
    )
    request_path, out_path = tmp_path / "request.json", tmp_path / "result.pt"
    request_path.write_text(json.dumps(request))
    done = subprocess.run(
        [sys.executable, WORKER, str(directory), str(request_path), str(out_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, f"worker failed ({done.returncode}):\n{done.stderr[-4000:]}"
    return torch.load(out_path)


@pytest.fixture(scope="module")
def model():
    return micro_model()


@pytest.fixture(scope="module")
def program_export(model, tmp_path_factory):
    """torch.export programs only (no AOTInductor). The model holds caches of its own before the
    export, which must come back untouched."""
    model.allocate_caches(1, 8)
    caches_before = dict(model.named_buffers())
    directory = tmp_path_factory.mktemp("exported_programs")
    metadata = export_model(model, directory, max_batch=MAX_BATCH, max_len=MAX_LEN, batch_buckets=BUCKETS, aoti=False)
    return dict(
        directory=directory,
        metadata=metadata,
        caches_before=caches_before,
        caches_after=dict(model.named_buffers()),
        cache_shape_after=model.cache_shape,
    )


@pytest.fixture(scope="module")
def program_results(program_export, tmp_path_factory):
    return run_worker(
        program_export["directory"],
        tmp_path_factory.mktemp("program_worker"),
        use_aoti=False,
        logit_prompts=list(LOGIT_PROMPTS.values()),
        decode_steps=DECODE_STEPS,
    )


@pytest.fixture(scope="module")
def loaded_programs(program_export):
    return load_exported(program_export["directory"], use_aoti=False)


# ---------------------------------------------------------------------------- fresh-process results


@pytest.mark.parametrize("case", list(LOGIT_PROMPTS), ids=list(LOGIT_PROMPTS))
def test_exported_program_in_fresh_process_gives_identical_logits(case, model, program_results):
    """Prefill and three greedy decode steps: bit-identical to the eager model (the programs run
    the same ATen ops and kda reference ops)."""
    expected = eager_logits(model, LOGIT_PROMPTS[case], DECODE_STEPS)
    got = program_results["logits"][list(LOGIT_PROMPTS).index(case)]
    assert len(got) == len(expected)
    for step, (e, g) in enumerate(zip(expected, got)):
        assert g.shape == e.shape, f"step {step}"
        assert torch.equal(g, e), f"step {step}: max |diff| {(g - e).abs().max().item()}"


def test_exported_program_in_fresh_process_generates_eager_tokens_in_a_padded_bucket(model, program_results):
    """Two prompts of different lengths decode in bucket 3 (one idle slot)."""
    assert program_results["tokens"] == model.generate(GENERATE_PROMPTS, NEW_TOKENS, greedy=True)


def test_aoti_package_in_fresh_process_generates_eager_tokens_slow(model, tmp_path):
    """SLOW (~70 s on 2 idle cores, more on a busy machine): AOTInductor CPU packages (prefill +
    the decode bucket of 2), loaded in a fresh process, greedy 16 tokens for two prompts of
    different lengths = eager. The kda ops run through the package's proxy executor (their Python
    references). Scalar C++ kernels (cpp.vec_isa_ok=False) compile ~40% faster than vectorised
    ones; this test is about loading and numerics, not CPU speed."""
    directory = tmp_path / "aoti"
    metadata = export_model(
        model,
        directory,
        max_batch=2,
        max_len=MAX_LEN,
        batch_buckets=(2,),
        aoti=True,
        aoti_configs={"cpp.vec_isa_ok": False},
    )
    assert metadata["kda_ops"]["aoti_runtime"] == [
        "kda::causal_conv1d_update_reference",
        "kda::chunk_kda_fwd_reference",
        "kda::kda_decode_reference",
        "kda::mla_cache_write_reference",
        "kda::mla_decode_reference",
    ]
    ids = LOGIT_PROMPTS["prompt_len_13"]
    results = run_worker(directory, tmp_path, use_aoti=True, logit_prompts=[ids], decode_steps=2)
    assert results["tokens"] == model.generate(GENERATE_PROMPTS, NEW_TOKENS, greedy=True)
    # Inductor fuses and reorders fp32 arithmetic: logits agree to rounding, not bit for bit.
    for e, g in zip(eager_logits(model, ids, 2), results["logits"][0]):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------- metadata, model state


def test_metadata_describes_the_export(model, program_export):
    metadata, directory = program_export["metadata"], program_export["directory"]
    assert json.loads((directory / "metadata.json").read_text()) == metadata
    assert KimiLinearConfig.from_dict(metadata["config"]).to_dict() == model.config.to_dict()
    assert (metadata["dtype"], metadata["device"]) == ("float32", "cpu")
    assert metadata["bounds"] == dict(max_batch=MAX_BATCH, max_len=MAX_LEN, max_prefill_tokens=MAX_BATCH * MAX_LEN, block_size=64)
    assert metadata["batch_buckets"] == list(BUCKETS)
    assert metadata["kda_ops"]["in_programs"] == [
        "kda::causal_conv1d_update",
        "kda::chunk_kda_fwd",
        "kda::kda_decode",
        "kda::mla_cache_write",
        "kda::mla_decode",
    ]
    assert metadata["versions"]["torch"] == torch.__version__
    assert sorted(metadata["files"]) == sorted(["prefill.pt2", "decode_batch1.pt2", "decode_batch3.pt2"])
    assert sorted(os.listdir(directory)) == sorted(["metadata.json", *metadata["files"]])
    names = [spec["name"] for spec in metadata["caches"]]
    assert "seq_lens" in names and "block_table" not in names  # the table is a constant of each program
    latent = [spec for spec in metadata["caches"] if spec["name"].endswith("latent_cache")]
    assert latent and not any(spec["reset_per_slot"] for spec in latent)  # guarded by seq_lens instead
    assert all(spec["reset_per_slot"] for spec in metadata["caches"] if spec["name"].endswith("recurrent_state"))


def test_export_leaves_the_model_caches_as_they_were(program_export):
    """(Compared right after the export: other tests reallocate the model's caches later.)"""
    before, after = program_export["caches_before"], program_export["caches_after"]
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)
    assert program_export["cache_shape_after"] == (1, 64)  # max_len 8 rounds up to one 64-token page


# ---------------------------------------------------------------------------- errors


BOUND_CASES = {
    "more_prompts_than_max_batch": ("max_batch=3", lambda m: m.generate([[1, 2]] * 4, 2, greedy=True)),
    "prompt_plus_new_tokens_over_max_len": ("max_len=32", lambda m: m.generate([[1] * 30], 3, greedy=True)),
    "prefill_prompt_over_max_len": ("max_len=32", lambda m: m.prefill([[1] * 33])),
    "decode_step_past_max_len": ("max_len=32", lambda m: (m.prefill([[1] * 32]), m.decode_step(torch.tensor([1])))),
}


@pytest.mark.parametrize("case", list(BOUND_CASES), ids=list(BOUND_CASES))
def test_out_of_bounds_request_names_the_bound(case, loaded_programs):
    bound, request = BOUND_CASES[case]
    with pytest.raises(ExportBoundsError, match=bound):
        request(loaded_programs)


def _flip_middle_bytes(path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(data)


def _truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE_CASES = {
    "missing_decode_program": ("decode_batch3.pt2", lambda d: (d / "decode_batch3.pt2").unlink(), {}, "missing"),
    "corrupted_prefill_program": ("prefill.pt2", lambda d: _flip_middle_bytes(d / "prefill.pt2"), {}, "corrupted"),
    "truncated_prefill_program_unverified": (
        "prefill.pt2",
        lambda d: _truncate(d / "prefill.pt2"),
        dict(verify_checksums=False),
        "cannot be loaded",
    ),
    "truncated_metadata": ("metadata.json", lambda d: _truncate(d / "metadata.json"), {}, "corrupted"),
    "missing_metadata": ("metadata.json", lambda d: (d / "metadata.json").unlink(), {}, "missing"),
    "aoti_requested_but_not_exported": (None, lambda d: None, dict(use_aoti=True), "use_aoti=False"),
}


@pytest.mark.parametrize("case", list(DAMAGE_CASES), ids=list(DAMAGE_CASES))
def test_damaged_artifacts_raise_naming_the_file(case, program_export, tmp_path):
    file, damage, options, problem = DAMAGE_CASES[case]
    directory = tmp_path / "damaged"
    shutil.copytree(program_export["directory"], directory)
    damage(directory)
    with pytest.raises(ArtifactError) as raised:
        load_exported(directory, **{"use_aoti": False, **options})
    message = str(raised.value)
    named = str(directory) if file is None else os.path.join(str(directory), file)
    assert named in message and problem in message, message


@pytest.mark.parametrize(
    "bounds, named",
    [(dict(max_batch=0), "max_batch"), (dict(max_len=1), "max_len"), (dict(max_batch=4, batch_buckets=(1, 2)), "max_batch=4")],
    ids=["max_batch_0", "max_len_1", "buckets_without_max_batch"],
)
def test_invalid_export_bounds_are_rejected_before_any_work(bounds, named, tmp_path):
    with pytest.raises(ValueError, match=named):
        export_model(KimiLinearConfig.preset("micro"), tmp_path / "never", **bounds)
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------------------- command line


def test_cli_export_writes_a_directory_that_generates(tmp_path):
    out = tmp_path / "cli"
    args = ["--config", "micro", "--out", str(out), "--max-batch", "2", "--max-len", "8", "--no-aoti"]
    done = subprocess.run(
        [sys.executable, "-m", "kda_ops", "export", *args], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "decode_batch2.pt2: exported" in done.stdout
    exported = load_exported(out, use_aoti=False)
    assert (exported.max_batch, exported.max_len, exported.batch_buckets) == (2, 8, [1, 2])
    eager = KimiLinearForCausalLM(KimiLinearConfig.preset("micro"), dtype=torch.float32).init_weights(0)
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    assert exported.generate(prompts, 3, greedy=True) == eager.generate(prompts, 3, greedy=True)


# ---------------------------------------------------------------------------- AOTInductor configs


def test_aoti_configs_turn_off_compile_time_autotuning_on_cuda_only():
    """It benchmarks kernels on random inputs, which trips the prefill's gather asserts
    (pytorch#192143); the caller's overrides still win."""
    assert aoti_inductor_configs(torch.device("cuda"), None) == {"triton.autotune_at_compile_time": False}
    assert aoti_inductor_configs(torch.device("cuda"), {"triton.autotune_at_compile_time": True, "max_autotune": True}) == {
        "triton.autotune_at_compile_time": True,
        "max_autotune": True,
    }
    assert aoti_inductor_configs(torch.device("cpu"), None) == {}
    assert aoti_inductor_configs(torch.device("cpu"), {"cpp.vec_isa_ok": False}) == {"cpp.vec_isa_ok": False}


# ---------------------------------------------------------------------------- CUDA (device tool)


@pytest.mark.gpu
def test_gpu_cuda_export_builds_packages_and_its_programs_generate_eager_tokens(tmp_path):
    """CUDA, fp32 micro model: export_model writes the programs and the AOTInductor packages
    (the prefill's compile needs aoti_inductor_configs' default), the packages call no op back
    (the triton_op kernels are compiled in), and the programs, loaded in a fresh process, give
    eager's logits and greedy tokens. Loading the packages themselves segfaults on the lent H100
    image for any package, a plain Linear included (bench/aoti_gpu_probe.py, bench/NOTES.md)."""
    model = micro_model().cuda()
    directory = tmp_path / "cuda"
    metadata = export_model(model, directory, max_batch=2, max_len=MAX_LEN, batch_buckets=(2,), aoti=True)
    assert metadata["device"] == "cuda"
    assert metadata["aoti_configs"] == {"triton.autotune_at_compile_time": False}
    assert metadata["kda_ops"]["aoti_runtime"] == []
    assert {"prefill.aoti.pt2", "decode_batch2.aoti.pt2"} <= set(metadata["files"])
    ids = LOGIT_PROMPTS["prompt_len_13"]
    results = run_worker(directory, tmp_path, use_aoti=False, logit_prompts=[ids], decode_steps=2)
    assert results["tokens"] == model.generate(GENERATE_PROMPTS, NEW_TOKENS, greedy=True)
    for e, g in zip(eager_logits(model, ids, 2), results["logits"][0]):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-4)
