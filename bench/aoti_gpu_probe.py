"""Isolates the `aoti_load_package` crash seen on the GPU image (torch 2.11.0+cu130: a segfault in
torch/export/pt2_archive/_package.py::_load_aoti for every package, even a Linear+ReLU; see
docs/torch_library.md §5) and looks for a loading path that works.

Every variant runs in its own fresh subprocess (python -X faulthandler) with a timeout, and prints
one summary line:
    NAME: ok (...) | crashed with signal 11 (SIGSEGV) after step '...' at File ... | error: ... |
    timed out after N s after step '...' | skipped: ...
Children report progress as "STEP: ..." lines, so a crash names the last step it reached, and
faulthandler's dump gives the innermost Python frame. Full logs and summary.json go to --out.

Variants (packages are built first, each build in its own subprocess too):
  build_*                 Linear(64,64)+ReLU exported and packaged: default, cubins embedded in the
                          .so (aot_inductor.embed_kernel_binary), C++ sources only
                          (aot_inductor.package_cpp_only), the legacy .so (torch._inductor.aot_compile),
                          a CPU-device package; the kda_ops micro model (fp32) via kda_ops.export_model
  load_default            torch._inductor.aoti_load_package(path)
  load_steps              the steps of _load_aoti one by one: load_metadata_from_package,
                          codecache.get_device_information, AOTIModelPackageLoader(...), run
  load_single_threaded    aoti_load_package(path, run_single_threaded=True)
  load_device_index_0     aoti_load_package(path, device_index=0)
  load_loader_direct      torch._C._aoti.AOTIModelPackageLoader directly (skips the Python metadata
                          and device-information checks)
  load_after_cuda_init    torch.cuda.init() and a CUDA allocation before loading
  load_after_triton_init  Triton's active driver initialised before loading
  load_fresh_tmp_dirs     TMPDIR and TORCHINDUCTOR_CACHE_DIR pointing at fresh directories
  load_embedded_kernels   the package with cubins embedded in the .so
  load_cpp_only           the C++-sources-only package (the loader must build it)
  load_extracted_so       the package unzipped, its .so run by AOTIModelContainerRunnerCuda
  load_legacy_so          the legacy .so through torch._export.aot_load (deprecated API; #172739
                          reports a segfault there for models with buffer constants)
  load_in_building_process  compile and load in one process
  load_cpu_package        a CPU-device package, loaded and run on the CPU of the GPU image
  model_decode_step_aoti  the micro model's decode-step package vs its torch.export program, one step
  model_generate_aoti     kda_ops.load_exported(use_aoti=True).generate vs the eager model, 8 tokens
  model_generate_program  the same through the torch.export programs (control: no AOTI)

usage (repository root, on the GPU machine):
  python bench/aoti_gpu_probe.py [--out DIR] [--timeout S] [--only NAME,NAME] [--skip-model]
  python bench/aoti_gpu_probe.py --device cpu      (self-check of the script on a CPU machine)

Time: the CPU self-check took 2.5 min for the Linear variants and 1.8 min for the model ones
(2 cores, torch 2.13); CUDA builds add nvcc/Triton compiles. Where one call is limited to 10
minutes, run `--skip-model` and `--only model_decode_step_aoti,model_generate_aoti,
model_generate_program` as two calls (same --out: each call rebuilds what its variants need).
"""

import argparse
import glob
import inspect
import json
import os
import signal
import subprocess
import sys
import time
import zipfile

LINEAR_FEATURES = 64
MODEL_MAX_BATCH, MODEL_MAX_LEN, MODEL_NEW_TOKENS = 2, 64, 8


def step(message: str) -> None:
    print(f"STEP: {message}", flush=True)


def result(message: str) -> None:
    print(f"RESULT: {message}", flush=True)


# ---------------------------------------------------------------------------------- child side


def _linear_io(work: str, device: str):
    import torch

    saved = torch.load(os.path.join(work, "linear_io.pt"))
    return saved["x"].to(device), saved["expected"].to(device)


def _check_linear(output, work: str, device: str) -> None:
    import torch

    _, expected = _linear_io(work, device)
    output = output[0] if isinstance(output, (list, tuple)) else output
    step("compare with eager")
    difference = (output.float() - expected.float()).abs().max().item()
    if not torch.allclose(output, expected, rtol=1e-3, atol=1e-3):
        raise AssertionError(f"output differs from eager: max |diff| {difference:.3e}")
    result(f"matches eager (max |diff| {difference:.1e})")


def _export_linear(work: str, device: str):
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(LINEAR_FEATURES, LINEAR_FEATURES), torch.nn.ReLU()).to(device).eval()
    x = torch.randn(8, LINEAR_FEATURES, device=device)
    with torch.no_grad():
        expected = model(x)
    torch.save(dict(x=x.cpu(), expected=expected.cpu()), os.path.join(work, "linear_io.pt"))
    step("torch.export.export")
    return model, x, torch.export.export(model, (x,))


def _package(work: str, device: str, name: str, inductor_configs: dict | None) -> str:
    import torch._inductor

    _, _, exported = _export_linear(work, device)
    step(f"aoti_compile_and_package {inductor_configs or {}}")
    path = os.path.join(work, f"{name}.pt2")
    torch._inductor.aoti_compile_and_package(exported, package_path=path, inductor_configs=inductor_configs)
    return path


def build_linear(work, device):
    result(f"wrote {_package(work, device, 'linear', None)}")


def build_linear_embedded_kernels(work, device):
    result(f"wrote {_package(work, device, 'linear_embedded', {'aot_inductor.embed_kernel_binary': True})}")


def build_linear_cpp_only(work, device):
    result(f"wrote {_package(work, device, 'linear_cpp_only', {'aot_inductor.package_cpp_only': True})}")


def build_linear_cpu(work, device):
    result(f"wrote {_package(work, 'cpu', 'linear_cpu', None)}")


def build_linear_legacy_so(work, device):
    import torch._inductor

    _, x, exported = _export_linear(work, device)
    step("torch._inductor.aot_compile (legacy .so)")
    so_path = torch._inductor.aot_compile(exported.module(), (x,))
    with open(os.path.join(work, "legacy_so_path.txt"), "w") as f:
        f.write(so_path)
    result(f"wrote {so_path}")


def build_model(work, device):
    import torch

    import kda_ops

    step("kda_ops.export_model(micro, fp32)")
    metadata = kda_ops.export_model(
        kda_ops.KimiLinearConfig.preset("micro"),
        os.path.join(work, "micro_model"),
        device=device,
        dtype=torch.float32,
        max_batch=MODEL_MAX_BATCH,
        max_len=MODEL_MAX_LEN,
        batch_buckets=(MODEL_MAX_BATCH,),
        progress=step,
    )
    result(f"exported in {metadata['export_seconds']}; AOTI runtime ops {metadata['kda_ops']['aoti_runtime']}")


def _run_package(path: str, work: str, device: str, **load_kwargs) -> None:
    import torch._inductor

    step(f"aoti_load_package {load_kwargs or ''}")
    runner = torch._inductor.aoti_load_package(path, **load_kwargs)
    x, _ = _linear_io(work, device)
    step("run")
    output = runner(x)
    _check_linear(output, work, device)


def load_default(work, device):
    _run_package(os.path.join(work, "linear.pt2"), work, device)


def load_steps(work, device):
    import torch
    from torch._inductor.codecache import get_device_information
    from torch.export.pt2_archive._package import AOTICompiledModel

    path = os.path.join(work, "linear.pt2")
    step("AOTIModelPackageLoader.load_metadata_from_package")
    metadata = torch._C._aoti.AOTIModelPackageLoader.load_metadata_from_package(path, "model")
    step(f"codecache.get_device_information({metadata.get('AOTI_DEVICE_KEY')!r})")
    get_device_information(metadata["AOTI_DEVICE_KEY"])
    step("AOTIModelPackageLoader(path, 'model', False, 1, -1)")
    loader = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, -1)
    x, _ = _linear_io(work, device)
    step("run")
    _check_linear(AOTICompiledModel(loader)(x), work, device)


def load_single_threaded(work, device):
    import torch._inductor

    if "run_single_threaded" not in inspect.signature(torch._inductor.aoti_load_package).parameters:
        result("skipped: aoti_load_package has no run_single_threaded argument in this torch")
        return
    _run_package(os.path.join(work, "linear.pt2"), work, device, run_single_threaded=True)


def load_device_index_0(work, device):
    import torch._inductor

    if "device_index" not in inspect.signature(torch._inductor.aoti_load_package).parameters:
        result("skipped: aoti_load_package has no device_index argument in this torch")
        return
    _run_package(os.path.join(work, "linear.pt2"), work, device, device_index=0)


def load_loader_direct(work, device):
    import torch
    from torch.export.pt2_archive._package import AOTICompiledModel

    step("torch._C._aoti.AOTIModelPackageLoader(path, 'model', False, 1, -1)")
    loader = torch._C._aoti.AOTIModelPackageLoader(os.path.join(work, "linear.pt2"), "model", False, 1, -1)
    x, _ = _linear_io(work, device)
    step("run")
    _check_linear(AOTICompiledModel(loader)(x), work, device)


def load_after_cuda_init(work, device):
    import torch

    step("torch.cuda.init() and an allocation")
    torch.cuda.init()
    torch.zeros(1, device=device)
    torch.cuda.synchronize()
    _run_package(os.path.join(work, "linear.pt2"), work, device)


def load_after_triton_init(work, device):
    import triton

    step("triton.runtime.driver.active.get_current_target()")
    target = triton.runtime.driver.active.get_current_target()
    step(f"triton target {target}")
    _run_package(os.path.join(work, "linear.pt2"), work, device)


def load_fresh_tmp_dirs(work, device):
    step(f"TMPDIR={os.environ.get('TMPDIR')} TORCHINDUCTOR_CACHE_DIR={os.environ.get('TORCHINDUCTOR_CACHE_DIR')}")
    _run_package(os.path.join(work, "linear.pt2"), work, device)


def load_embedded_kernels(work, device):
    _run_package(os.path.join(work, "linear_embedded.pt2"), work, device)


def load_cpp_only(work, device):
    _run_package(os.path.join(work, "linear_cpp_only.pt2"), work, device)


def _container_runner(so_path: str, device: str, cubin_dir: str):
    import torch

    if device == "cpu":
        step("AOTIModelContainerRunnerCpu(so, 1)")
        return torch._C._aoti.AOTIModelContainerRunnerCpu(so_path, 1)
    step(f"AOTIModelContainerRunnerCuda(so, 1, {device!r}, {cubin_dir!r})")
    return torch._C._aoti.AOTIModelContainerRunnerCuda(so_path, 1, device, cubin_dir)


def load_extracted_so(work, device):
    target = os.path.join(work, "linear_extracted")
    step(f"unzip linear.pt2 to {target}")
    with zipfile.ZipFile(os.path.join(work, "linear.pt2")) as archive:
        archive.extractall(target)
    so_files = glob.glob(os.path.join(target, "**", "*.so"), recursive=True)
    if len(so_files) != 1:
        raise RuntimeError(f"expected one .so in the package, found {so_files}")
    runner = _container_runner(so_files[0], device, os.path.dirname(so_files[0]))
    x, _ = _linear_io(work, device)
    step("run")
    _check_linear(runner.run([x]), work, device)


def load_legacy_so(work, device):
    import torch._export

    with open(os.path.join(work, "legacy_so_path.txt")) as f:
        so_path = f.read()
    step(f"torch._export.aot_load({so_path!r}, {device!r})")
    runner = torch._export.aot_load(so_path, device)
    x, _ = _linear_io(work, device)
    step("run")
    _check_linear(runner(x), work, device)


def load_in_building_process(work, device):
    path = _package(work, device, "linear_same_process", None)
    _run_package(path, work, device)


def load_cpu_package(work, device):
    _run_package(os.path.join(work, "linear_cpu.pt2"), work, "cpu")


def model_decode_step_aoti(work, device):
    import torch
    import torch._inductor

    import kda_ops  # noqa: F401  (registers the kda ops the programs call)

    directory = os.path.join(work, "micro_model")
    with open(os.path.join(directory, "metadata.json")) as f:
        metadata = json.load(f)
    entry = metadata["programs"]["decode"][str(MODEL_MAX_BATCH)]

    def caches():
        return tuple(
            torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]), device=device) for spec in metadata["caches"]
        )

    tokens = torch.arange(1, MODEL_MAX_BATCH + 1, device=device)
    slots = torch.arange(MODEL_MAX_BATCH, device=device)
    step("torch.export.load decode program (reference)")
    program = torch.export.load(os.path.join(directory, entry["exported"])).module()
    program_caches = caches()
    with torch.no_grad():
        expected = program(tokens, slots, program_caches)
    step("aoti_load_package decode package")
    runner = torch._inductor.aoti_load_package(os.path.join(directory, entry["aoti"]))
    package_caches = caches()
    step("run decode step")
    with torch.no_grad():
        output = runner(tokens, slots, package_caches)
    step("compare logits and caches with the torch.export program")
    torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-4)
    for spec, got, want in zip(metadata["caches"], package_caches, program_caches):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m, name=spec["name"]: f"{name}: {m}")
    result(f"logits and {len(package_caches)} caches match (max |diff| {(output - expected).abs().max().item():.1e})")


def _generate_with_artifacts(work, device, use_aoti: bool) -> None:
    import torch

    import kda_ops

    step(f"kda_ops.load_exported(use_aoti={use_aoti})")
    exported = kda_ops.load_exported(os.path.join(work, "micro_model"), use_aoti=use_aoti)
    prompts = [[5, 3, 9, 1, 7], [2, 8, 4, 6, 1, 3, 5, 7, 9, 11, 13]]
    step("generate")
    tokens = exported.generate(prompts, MODEL_NEW_TOKENS, greedy=True)
    step("eager model with the same weights")
    model = kda_ops.KimiLinearForCausalLM(kda_ops.KimiLinearConfig.preset("micro"), dtype=torch.float32).init_weights(0)
    expected = model.to(device).eval().generate(prompts, MODEL_NEW_TOKENS, greedy=True)
    if tokens != expected:
        raise AssertionError(f"tokens differ from eager: {tokens} vs {expected}")
    result(f"{MODEL_NEW_TOKENS} greedy tokens x {len(prompts)} prompts = eager")


def model_generate_aoti(work, device):
    _generate_with_artifacts(work, device, use_aoti=True)


def model_generate_program(work, device):
    _generate_with_artifacts(work, device, use_aoti=False)


def environment(work, device):
    import torch
    import triton

    gpu = torch.cuda.get_device_name() if device != "cpu" else "cpu run"
    result(
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, {gpu}, "
        f"python {sys.version.split()[0]}"
    )


# ---------------------------------------------------------------------------------- parent side

# name -> (function, builds it needs, needs CUDA, extra environment (values may use {work}))
VARIANTS = {
    "environment": (environment, [], False, {}),
    "build_linear": (build_linear, [], False, {}),
    "build_linear_embedded_kernels": (build_linear_embedded_kernels, [], True, {}),
    "build_linear_cpp_only": (build_linear_cpp_only, [], False, {}),
    "build_linear_legacy_so": (build_linear_legacy_so, [], False, {}),
    "build_linear_cpu": (build_linear_cpu, [], False, {}),
    "load_default": (load_default, ["build_linear"], False, {}),
    "load_steps": (load_steps, ["build_linear"], False, {}),
    "load_single_threaded": (load_single_threaded, ["build_linear"], False, {}),
    "load_device_index_0": (load_device_index_0, ["build_linear"], True, {}),
    "load_loader_direct": (load_loader_direct, ["build_linear"], False, {}),
    "load_after_cuda_init": (load_after_cuda_init, ["build_linear"], True, {}),
    "load_after_triton_init": (load_after_triton_init, ["build_linear"], True, {}),
    "load_fresh_tmp_dirs": (
        load_fresh_tmp_dirs,
        ["build_linear"],
        False,
        {"TMPDIR": "{work}/fresh_tmp", "TORCHINDUCTOR_CACHE_DIR": "{work}/fresh_inductor_cache"},
    ),
    "load_embedded_kernels": (load_embedded_kernels, ["build_linear_embedded_kernels"], True, {}),
    "load_cpp_only": (load_cpp_only, ["build_linear_cpp_only"], False, {}),
    "load_extracted_so": (load_extracted_so, ["build_linear"], False, {}),
    "load_legacy_so": (load_legacy_so, ["build_linear_legacy_so"], False, {}),
    "load_in_building_process": (load_in_building_process, [], False, {}),
    "load_cpu_package": (load_cpu_package, ["build_linear_cpu"], False, {}),
    "build_model": (build_model, [], False, {}),
    "model_decode_step_aoti": (model_decode_step_aoti, ["build_model"], False, {}),
    "model_generate_aoti": (model_generate_aoti, ["build_model"], False, {}),
    "model_generate_program": (model_generate_program, ["build_model"], False, {}),
}
MODEL_VARIANTS = ("build_model", "model_decode_step_aoti", "model_generate_aoti", "model_generate_program")


def _last(lines: list[str], prefix: str) -> str | None:
    found = [line[len(prefix) :].strip() for line in lines if line.startswith(prefix)]
    return found[-1] if found else None


def _innermost_frame(stderr: str) -> str | None:
    """faulthandler lists the crashing thread's frames most recent first after 'Current thread'."""
    lines = stderr.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Current thread"):
            frames = [frame.strip() for frame in lines[i + 1 :] if frame.strip().startswith("File ")]
            return frames[0] if frames else None
    return None


def run_variant(name: str, work: str, device: str, timeout: float, log_dir: str) -> tuple[str, str]:
    """(status, one-line summary) of one variant run in a fresh process."""
    _, _, _, extra_env = VARIANTS[name]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for key, value in extra_env.items():
        env[key] = value.format(work=work)
        if key in ("TMPDIR", "TORCHINDUCTOR_CACHE_DIR"):
            os.makedirs(env[key], exist_ok=True)
    command = [sys.executable, "-X", "faulthandler", os.path.abspath(__file__), "--child", name, "--work", work, "--device", device]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        stdout, stderr, code = done.stdout, done.stderr, done.returncode
    except subprocess.TimeoutExpired as expired:
        stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        stderr = expired.stderr.decode() if isinstance(expired.stderr, bytes) else (expired.stderr or "")
        code = None
    seconds = time.perf_counter() - start
    with open(os.path.join(log_dir, f"{name}.log"), "w") as f:
        f.write(f"$ {' '.join(command)}\nreturn code {code}, {seconds:.1f} s\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    lines = stdout.splitlines()
    last_step = _last(lines, "STEP:")
    after = f" after step '{last_step}'" if last_step else ""
    if code is None:
        return "timeout", f"timed out after {timeout:.0f} s{after}"
    if code < 0:
        signame = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else "?"
        frame = _innermost_frame(stderr)
        return "crashed", f"crashed with signal {-code} ({signame}){after}" + (f" at {frame}" if frame else "")
    outcome = _last(lines, "RESULT:")
    if code == 0 and outcome is not None:
        status = "skipped" if outcome.startswith("skipped") else "ok"
        return status, (outcome if status == "skipped" else f"ok ({outcome}, {seconds:.1f} s)")
    error_lines = [line for line in stderr.strip().splitlines() if line.strip()]
    error = error_lines[-1] if error_lines else f"exit code {code}, no output"
    return "error", f"error{after}: {error[:400]}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "gpu-out"), "aoti_probe"))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per variant (default 300)")
    parser.add_argument("--only", help="comma-separated variant names (their builds run too)")
    parser.add_argument("--skip-model", action="store_true", help="skip the kda_ops micro-model variants")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        VARIANTS[args.child][0](args.work, args.device)
        return 0

    names = list(VARIANTS)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - set(VARIANTS)
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
        wanted |= {build for name in wanted for build in VARIANTS[name][1]} | {"environment"}
        names = [n for n in names if n in wanted]
    if args.skip_model:
        names = [n for n in names if n not in MODEL_VARIANTS]
    work = os.path.abspath(os.path.join(args.out, "work"))
    logs = os.path.abspath(os.path.join(args.out, "logs"))
    os.makedirs(work, exist_ok=True)
    os.makedirs(logs, exist_ok=True)

    statuses: dict[str, str] = {}
    summary = {}
    for name in names:
        _, builds, needs_cuda, _ = VARIANTS[name]
        failed_builds = [b for b in builds if statuses.get(b) != "ok"]
        if needs_cuda and args.device == "cpu":
            status, line = "skipped", "skipped: needs CUDA"
        elif failed_builds:
            status, line = "skipped", f"skipped: {', '.join(failed_builds)} did not succeed"
        else:
            status, line = run_variant(name, work, args.device, args.timeout, logs)
        statuses[name] = status
        summary[name] = dict(status=status, summary=line)
        print(f"{name}: {line}", flush=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"logs: {logs}; summary: {os.path.join(args.out, 'summary.json')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
