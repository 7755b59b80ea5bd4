"""Deployment artifacts for a Kimi-Linear model: torch.export programs and AOTInductor packages of
its prefill and its decode step, written to one directory by `export_model`, and `load_exported`,
which generates with them (in a fresh process: nothing but the directory and kda_ops is needed).

Directory layout:
  metadata.json              config, dtype, device, bounds, batch buckets, cache layout, the kda ops
                             the artifacts call, torch/triton/kda-ops versions, sha256 of each file
  prefill.pt2                torch.export program of the prefill
  decode_batch{B}.pt2        torch.export program of the decode step, one per batch bucket B
  prefill.aoti.pt2, decode_batch{B}.aoti.pt2
                             the same programs compiled by AOTInductor (absent with aoti=False)

Program contracts (`caches` is the tuple of cache tensors in metadata["caches"] order):
  prefill(input_ids [total] int64, lengths [N] int32, slots [N] int64, caches) -> logits [N, vocab]
      N sequences packed back to back (no padding), each of lengths[n] >= 1 tokens, continuing from
      cache slot slots[n] (distinct, < max_batch); returns each sequence's last-token logits.
      Dynamic: 1 <= N <= max_batch, 1 <= total <= max_batch * max_len. To start new sequences,
      first zero the slots' rows of the caches marked "reset_per_slot" (the loader does).
  decode_batch{B}(tokens [B] int64, slots [B] int64, caches) -> logits [B, vocab]
      One new token per row for distinct slots; static shapes.

Caches are explicit inputs that the programs update in place (torch.export keeps the in-place
updates on its inputs; an AOTInductor package writes into the tensors it is given). Not module
buffers: the prefill and every decode program are separate programs (and packages) that must work
on one set of caches, while each would own a private copy of a buffer (AOTInductor bakes buffers
into the package as constants). Not returned as new outputs either: that copies every cache on
every decode step. In place, the caches keep fixed addresses, as CUDA-graph replay requires.

Load-time requirement: the programs call `kda::` ops, which exist only once kda_ops is imported.
torch.export.load cannot deserialize the programs without them, and an AOTInductor CPU package
calls the ops' PyTorch references (Python custom ops) back through its proxy executor at run time,
so the loading process must import kda_ops; `load_exported` lives in kda_ops, so using it does.
metadata["kda_ops"]["aoti_runtime"] lists the ops a package calls back (on CUDA the triton_op
kernels are compiled into the package instead).
"""

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import time
import zipfile
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .config import PRESETS, KimiLinearConfig
from .generation import _as_prompt_lists, sampling_loop
from .model import KimiLinearForCausalLM
from .moe import MoE

FORMAT_NAME = "kda-ops-export"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
PREFILL_NAME = "prefill"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class ArtifactError(RuntimeError):
    """An artifact directory that cannot be used: a missing, corrupted or incompatible file."""


class ExportBoundsError(ValueError):
    """A request outside the bounds (max_batch, max_len) the artifacts were exported for."""


def decode_name(batch: int) -> str:
    return f"decode_batch{batch}"


def exported_file(name: str) -> str:
    return f"{name}.pt2"


def aoti_file(name: str) -> str:
    return f"{name}.aoti.pt2"


def default_batch_buckets(max_batch: int) -> list[int]:
    """Powers of two below max_batch, then max_batch itself."""
    buckets = []
    size = 1
    while size < max_batch:
        buckets.append(size)
        size *= 2
    return buckets + [max_batch]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ArtifactError(f"{METADATA_FILE}: unknown dtype {name!r}")
    return dtype


# ---------------------------------------------------------------------------------- programs


class _CacheInputs(nn.Module):
    """Runs a method of the model with the given tensors standing in as its cache buffers."""

    def __init__(self, model: KimiLinearForCausalLM, cache_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.cache_names = list(cache_names)

    @contextlib.contextmanager
    def _installed(self, caches: tuple[Tensor, ...]):
        owners = []
        try:
            for name, tensor in zip(self.cache_names, caches, strict=True):
                owner_path, _, leaf = name.rpartition(".")
                owner = self.model.get_submodule(owner_path)
                owner.register_buffer(leaf, tensor, persistent=False)
                owners.append((owner, leaf))
            yield
        finally:
            for owner, leaf in owners:
                delattr(owner, leaf)


class PrefillProgram(_CacheInputs):
    def forward(self, input_ids: Tensor, lengths: Tensor, slots: Tensor, caches: tuple[Tensor, ...]) -> Tensor:
        # Lengths rather than cu_seqlens as the input: cu_seqlens[1:] would have the compound size
        # (N + 1) - 1, on which tracing guards N >= 2; built here its size simplifies to N.
        cu_seqlens = nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        with self._installed(caches):
            return self.model.prefill(input_ids, cu_seqlens, slots)


class DecodeProgram(_CacheInputs):
    def forward(self, tokens: Tensor, slots: Tensor, caches: tuple[Tensor, ...]) -> Tensor:
        with self._installed(caches):
            return self.model.decode_step(tokens, slots)


@contextlib.contextmanager
def _export_caches(model: KimiLinearForCausalLM, max_batch: int, max_len: int, block_size: int):
    """Allocates the model's caches for the bounds and takes them out of the model, yielding
    (specs, tensors): the block table stays a (constant) buffer, everything else becomes an input.
    A spec records whether model.reset_sequences zeroes the cache per slot. The model's own
    caches, if any, are put back afterwards."""
    saved_buffers = {name: buf for name, buf in model.named_buffers()}
    saved_block_size = model.__dict__.get("block_size")
    try:
        model.allocate_caches(max_batch, max_len, block_size)
        caches = {name: buf for name, buf in model.named_buffers() if name != "block_table"}
        with torch.no_grad():
            for tensor in caches.values():
                tensor.fill_(1)
            model.reset_sequences(torch.arange(max_batch, device=model.device))
            specs = [
                dict(name=name, shape=list(t.shape), dtype=_dtype_name(t.dtype), reset_per_slot=bool((t == 0).all()))
                for name, t in caches.items()
            ]
            for tensor in caches.values():
                tensor.zero_()
        for name in caches:
            owner_path, _, leaf = name.rpartition(".")
            delattr(model.get_submodule(owner_path), leaf)
        yield specs, tuple(caches.values())
    finally:
        for name, _ in list(model.named_buffers()):
            owner_path, _, leaf = name.rpartition(".")
            delattr(model.get_submodule(owner_path), leaf)
        for name, buf in saved_buffers.items():
            owner_path, _, leaf = name.rpartition(".")
            model.get_submodule(owner_path).register_buffer(leaf, buf, persistent=False)
        model.__dict__.pop("block_size", None)
        if saved_block_size is not None:
            model.block_size = saved_block_size


@contextlib.contextmanager
def _moe_path_fixed_for_any_token_count(model: KimiLinearForCausalLM):
    """MoE "auto" compares the token count with grouped_min_tokens (for CUDA bf16 inputs), which a
    dynamic token count cannot be specialised on: the exported prefill takes auto's long-prompt
    choice for every prompt size."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    saved = [m.grouped_min_tokens for m in moes]
    for m in moes:
        m.grouped_min_tokens = 0
    try:
        yield
    finally:
        for m, value in zip(moes, saved):
            m.grouped_min_tokens = value


def _prefill_example(max_batch: int, max_len: int, vocab: int, device: torch.device):
    """Example inputs with N != total and neither 0 nor 1 where the dim is dynamic (torch.export
    specialises a dim whose example size is 0 or 1)."""
    lengths = [min(3, max_len), min(2, max_len)][: min(max_batch, 2)]
    total = sum(lengths)
    input_ids = torch.arange(total, device=device) % vocab
    return (
        input_ids,
        torch.tensor(lengths, dtype=torch.int32, device=device),
        torch.arange(len(lengths), device=device),
    )


def _prefill_dynamic_shapes(max_batch: int, max_len: int, num_caches: int):
    tokens = torch.export.Dim("prefill_tokens", min=1, max=max_batch * max_len)
    sequences = torch.export.Dim("prefill_sequences", min=1, max=max_batch) if max_batch > 1 else None
    per_sequence = {0: sequences} if sequences is not None else None
    return ({0: tokens}, per_sequence, per_sequence, tuple(None for _ in range(num_caches)))


def _kda_ops_in(program: torch.export.ExportedProgram) -> list[str]:
    ops = {
        node.target.name()
        for node in program.graph.nodes
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "kda"
    }
    return sorted(op.split(".")[0] for op in ops)


def _ops_called_back_by_package(package_path: str) -> list[str]:
    """Custom ops an AOTInductor package calls through its proxy executor (its wrapper json)."""
    targets = set()
    with zipfile.ZipFile(package_path) as archive:
        for name in archive.namelist():
            if name.endswith("wrapper.json"):
                targets |= set(re.findall(r'"target":\s*"(kda::[^"]+)"', archive.read(name).decode()))
    return sorted(targets)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _versions() -> dict:
    import triton

    try:
        kda_ops_version = importlib.metadata.version("kda-ops")
    except importlib.metadata.PackageNotFoundError:
        kda_ops_version = "unknown"
    return dict(
        torch=torch.__version__,
        triton=triton.__version__,
        kda_ops=kda_ops_version,
        python=platform.python_version(),
        cuda=torch.version.cuda,
    )


def _model_for_export(model_or_config, device, dtype, seed: int) -> KimiLinearForCausalLM:
    if isinstance(model_or_config, KimiLinearConfig):
        device = torch.device(device or "cpu")
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        model = KimiLinearForCausalLM(model_or_config, dtype=dtype).init_weights(seed)
        return model.to(device).eval()
    if not isinstance(model_or_config, KimiLinearForCausalLM):
        raise TypeError(f"export_model: expected a KimiLinearForCausalLM or a KimiLinearConfig, got {type(model_or_config).__name__}")
    model = model_or_config
    requested = None if device is None else torch.device(device)
    if requested is not None and (requested.type, requested.index or model.device.index) != (model.device.type, model.device.index):
        raise ValueError(f"export_model: the model is on {model.device}, not {device}; move it first or leave device unset")
    if dtype is not None and dtype != model.dtype:
        raise ValueError(f"export_model: the model is {model.dtype}, not {dtype}; convert it first or leave dtype unset")
    return model


def _validate_bounds(max_batch: int, max_len: int, batch_buckets: Sequence[int] | None, block_size: int) -> list[int]:
    if max_batch < 1:
        raise ValueError(f"export_model: max_batch must be >= 1, got {max_batch}")
    if max_len < 2:
        raise ValueError(f"export_model: max_len must be >= 2 (a prompt token and a new one), got {max_len}")
    if block_size < 1:
        raise ValueError(f"export_model: block_size must be >= 1, got {block_size}")
    buckets = sorted(set(batch_buckets)) if batch_buckets else default_batch_buckets(max_batch)
    if buckets[0] < 1 or buckets[-1] != max_batch:
        raise ValueError(f"export_model: batch buckets must lie in [1, max_batch] and include max_batch={max_batch}, got {buckets}")
    return buckets


def aoti_inductor_configs(device: torch.device, overrides: dict | None) -> dict:
    """The Inductor configs of export_model's AOTInductor compiles: `overrides` over, on CUDA,
    triton.autotune_at_compile_time = False.

    Compile-time autotuning benchmarks each generated Triton kernel alone on synthetic inputs, so
    a kernel that gathers through a computed index (the prefill's short-conv gather over the
    packed sequences) reads random indices and trips its bounds assert: a device-side assert that
    ends the compile (pytorch#192143, seen for the prefill on an H100 with torch 2.11). With it
    off, Inductor tunes those kernels while running the graph on the real example inputs."""
    defaults = {"triton.autotune_at_compile_time": False} if device.type == "cuda" else {}
    return {**defaults, **(overrides or {})}


@torch.no_grad()
def export_model(
    model_or_config: KimiLinearForCausalLM | KimiLinearConfig,
    out_dir: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    max_batch: int = 4,
    max_len: int = 256,
    batch_buckets: Sequence[int] | None = None,
    block_size: int = 64,
    aoti: bool = True,
    aoti_configs: dict | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Writes the deployment artifacts (see the module docstring) to out_dir and returns the
    metadata it wrote to out_dir/metadata.json.

    model_or_config: a model (exported on its device in its dtype; device/dtype, when given, must
        match) or a config (a model with random weights from `seed` is built on `device`, default
        CPU, in `dtype`, default bf16 on CUDA and fp32 otherwise).
    max_batch: most sequences per prefill and per decode step (the caches' slot count).
    max_len: most tokens per sequence, prompt and new tokens together.
    batch_buckets: decode batch sizes to export (default: powers of two below max_batch, and
        max_batch); a batch runs in the smallest bucket that holds it, padded with idle slots.
    aoti: also compile every program with AOTInductor (the slow part: tens of seconds per
        program on a small CPU).
    aoti_configs: Inductor config overrides for those compiles (aoti_compile_and_package's
        inductor_configs), recorded in the metadata; on CUDA they go over
        `aoti_inductor_configs`' default.
    The model is left as it was (its own caches, if any, are restored)."""
    say = progress or (lambda message: None)
    buckets = _validate_bounds(max_batch, max_len, batch_buckets, block_size)
    model = _model_for_export(model_or_config, device, dtype, seed)
    device = model.device
    aoti_configs = aoti_inductor_configs(device, aoti_configs)
    os.makedirs(out_dir, exist_ok=True)
    metadata_path = os.path.join(out_dir, METADATA_FILE)
    if os.path.exists(metadata_path):
        os.remove(metadata_path)  # written last: an interrupted export leaves no usable directory

    seconds: dict[str, float] = {}
    files: dict[str, dict] = {}
    ops_in_programs: set[str] = set()
    ops_called_back: set[str] = set()

    def export_program(name: str, program: nn.Module, args: tuple, dynamic_shapes=None) -> None:
        start = time.perf_counter()
        exported = torch.export.export(program, args, dynamic_shapes=dynamic_shapes)
        path = os.path.join(out_dir, exported_file(name))
        torch.export.save(exported, path)
        seconds[exported_file(name)] = time.perf_counter() - start
        ops_in_programs.update(_kda_ops_in(exported))
        say(f"  {exported_file(name)}: exported in {seconds[exported_file(name)]:.1f} s")
        if aoti:
            from torch._inductor import aoti_compile_and_package

            start = time.perf_counter()
            package = os.path.join(out_dir, aoti_file(name))
            # a copy: aoti_compile_and_package adds its own keys to the dict it is given
            aoti_compile_and_package(exported, package_path=package, inductor_configs=dict(aoti_configs))
            seconds[aoti_file(name)] = time.perf_counter() - start
            ops_called_back.update(_ops_called_back_by_package(package))
            say(f"  {aoti_file(name)}: compiled by AOTInductor in {seconds[aoti_file(name)]:.1f} s")

    with _export_caches(model, max_batch, max_len, block_size) as (cache_specs, caches):
        names = [spec["name"] for spec in cache_specs]
        say(f"prefill: up to {max_batch} sequences, {max_batch * max_len} tokens")
        with _moe_path_fixed_for_any_token_count(model):
            example = _prefill_example(max_batch, max_len, model.config.vocab_size, device)
            export_program(
                PREFILL_NAME, PrefillProgram(model, names), (*example, caches), _prefill_dynamic_shapes(max_batch, max_len, len(caches))
            )
        for batch in buckets:
            say(f"decode step: batch {batch}")
            tokens = torch.zeros(batch, dtype=torch.long, device=device)
            slots = torch.arange(batch, device=device)
            export_program(decode_name(batch), DecodeProgram(model, names), (tokens, slots, caches))

    for name in [PREFILL_NAME] + [decode_name(b) for b in buckets]:
        for file in [exported_file(name)] + ([aoti_file(name)] if aoti else []):
            path = os.path.join(out_dir, file)
            files[file] = dict(sha256=_sha256(path), bytes=os.path.getsize(path))

    metadata = dict(
        format=FORMAT_NAME,
        format_version=FORMAT_VERSION,
        config=model.config.to_dict(),
        dtype=_dtype_name(model.dtype),
        device=device.type,
        bounds=dict(max_batch=max_batch, max_len=max_len, max_prefill_tokens=max_batch * max_len, block_size=block_size),
        batch_buckets=buckets,
        caches=cache_specs,
        programs=dict(
            prefill=dict(exported=exported_file(PREFILL_NAME), aoti=aoti_file(PREFILL_NAME) if aoti else None),
            decode={
                str(b): dict(exported=exported_file(decode_name(b)), aoti=aoti_file(decode_name(b)) if aoti else None)
                for b in buckets
            },
        ),
        kda_ops=dict(in_programs=sorted(ops_in_programs), aoti_runtime=sorted(ops_called_back)),
        aoti_configs=aoti_configs if aoti else {},
        load_requirements="import kda_ops before loading (kda_ops.load_exported does): the programs call kda:: ops",
        files=files,
        export_seconds={k: round(v, 2) for k, v in seconds.items()},
        versions=_versions(),
    )
    with open(metadata_path, "w") as f:
        json.dump(metadata, f, indent=2)
        f.write("\n")
    say(f"wrote {out_dir}")
    return metadata


# ---------------------------------------------------------------------------------- loading


def _read_metadata(directory: str) -> dict:
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.exists(path):
        raise ArtifactError(f"{path}: missing; {directory} is not a complete kda_ops export (export_model writes it last)")
    try:
        with open(path) as f:
            metadata = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{path}: unreadable or corrupted ({type(error).__name__}: {error})") from error
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path}: not a kda_ops export metadata file (format {FORMAT_NAME!r} expected)")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format version {metadata.get('format_version')}, this kda_ops reads version {FORMAT_VERSION}; re-export"
        )
    required = ("config", "dtype", "device", "bounds", "batch_buckets", "caches", "programs", "files")
    missing = [key for key in required if key not in metadata]
    if missing:
        raise ArtifactError(f"{path}: corrupted, lacks {missing}")
    return metadata


def _checked_path(directory: str, metadata: dict, file: str, verify: bool) -> str:
    path = os.path.join(directory, file)
    if not os.path.exists(path):
        raise ArtifactError(f"{path}: missing (listed in {METADATA_FILE}); re-export or restore the file")
    expected = metadata["files"].get(file)
    if expected is None:
        raise ArtifactError(f"{os.path.join(directory, METADATA_FILE)}: has no checksum for {file}; corrupted metadata")
    if verify:
        found = _sha256(path)
        if found != expected["sha256"]:
            raise ArtifactError(
                f"{path}: corrupted or replaced after export (sha256 {found[:16]}..., "
                f"{METADATA_FILE} records {expected['sha256'][:16]}...)"
            )
    return path


def _load_program(path: str, use_aoti: bool, metadata: dict) -> Callable:
    built_with = metadata.get("versions", {}).get("torch", "unknown")
    what = "an AOTInductor package" if use_aoti else "a torch.export program"
    try:
        if use_aoti:
            from torch._inductor import aoti_load_package

            return aoti_load_package(path)
        return torch.export.load(path).module()
    except Exception as error:
        raise ArtifactError(
            f"{path}: cannot be loaded as {what} ({type(error).__name__}: {str(error).strip()[:300]}); "
            f"exported with torch {built_with}, running torch {torch.__version__}"
        ) from error


class ExportedKimiLinear:
    """Generates with the artifacts of `export_model`: the prefill program, then the decode program
    of the smallest batch bucket that holds the batch. Holds its own caches (allocated once, for
    max_batch sequences of max_len tokens). Same `generate` API as KimiLinearForCausalLM.generate
    without its decode-mode and compile options."""

    def __init__(self, directory: str, metadata: dict, prefill: Callable, decoders: dict[int, Callable], use_aoti: bool):
        self.directory = directory
        self.metadata = metadata
        self.uses_aoti = use_aoti
        self.config = KimiLinearConfig.from_dict(metadata["config"])
        self.dtype = _dtype_from_name(metadata["dtype"])
        self.device = torch.device(metadata["device"])
        self.max_batch = metadata["bounds"]["max_batch"]
        self.max_len = metadata["bounds"]["max_len"]
        self.batch_buckets = sorted(decoders)
        self._prefill = prefill
        self._decoders = decoders
        self.caches = tuple(
            torch.zeros(spec["shape"], dtype=_dtype_from_name(spec["dtype"]), device=self.device) for spec in metadata["caches"]
        )
        self._reset_per_slot = [t for t, spec in zip(self.caches, metadata["caches"]) if spec["reset_per_slot"]]
        self._rows = 0  # sequences of the current batch
        self._bucket = 0
        self._longest = 0  # tokens of the current batch's longest sequence

    def _bucket_for(self, batch: int) -> int:
        if batch > self.max_batch:
            raise ExportBoundsError(
                f"{batch} sequences exceed max_batch={self.max_batch} of the artifacts in {self.directory} "
                f"(re-export with a larger --max-batch)"
            )
        return next(b for b in self.batch_buckets if b >= batch)

    def _check_length(self, tokens: int, what: str) -> None:
        if tokens > self.max_len:
            raise ExportBoundsError(
                f"{what} = {tokens} tokens exceeds max_len={self.max_len} of the artifacts in {self.directory} "
                f"(re-export with a larger --max-len)"
            )

    @torch.no_grad()
    def reset_slots(self, slots: Tensor) -> None:
        """Empties the cache slots so new sequences can start there."""
        for cache in self._reset_per_slot:
            cache.index_fill_(0, slots, 0)

    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]] | Tensor) -> Tensor:
        """Starts a new batch: the prompts (token lists, lengths may differ) in slots 0..N-1.
        Returns each prompt's last-token logits [N, vocab]."""
        prompt_lists = _as_prompt_lists(prompts)
        lengths = [len(p) for p in prompt_lists]
        bucket = self._bucket_for(len(prompt_lists))
        self._check_length(max(lengths), "the longest prompt")
        self.reset_slots(torch.arange(bucket, device=self.device))
        input_ids = torch.tensor([t for p in prompt_lists for t in p], dtype=torch.long).to(self.device)
        lengths_tensor = torch.tensor(lengths, dtype=torch.int32).to(self.device)
        slots = torch.arange(len(prompt_lists), device=self.device)
        logits = self._prefill(input_ids, lengths_tensor, slots, self.caches)
        self._rows, self._bucket, self._longest = len(prompt_lists), bucket, max(lengths)
        return logits

    @torch.no_grad()
    def decode_step(self, tokens: Tensor) -> Tensor:
        """One new token per sequence of the current batch: tokens [N] -> logits [N, vocab]."""
        if self._rows == 0:
            raise RuntimeError("decode_step: no batch; call prefill first")
        if tokens.shape != (self._rows,):
            raise ValueError(f"decode_step: expected tokens of shape [{self._rows}], got {list(tokens.shape)}")
        self._check_length(self._longest + 1, "the longest sequence after this step")
        padded = tokens.to(self.device, torch.long)
        if self._bucket > self._rows:  # idle slots fill the bucket; their rows are dropped
            padded = torch.cat([padded, padded.new_zeros(self._bucket - self._rows)])
        slots = torch.arange(self._bucket, device=self.device)
        logits = self._decoders[self._bucket](padded, slots, self.caches)
        self._longest += 1
        return logits[: self._rows]

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]] | Tensor,
        max_new_tokens: int,
        *,
        greedy: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        seed: int | None = None,
        stop_check_interval: int = 16,
        timings: dict | None = None,
    ) -> list[list[int]]:
        """New tokens for each prompt, cut after the first eos_token_id; options as
        kda_ops.generation.generate. Raises ExportBoundsError when the batch exceeds max_batch or
        a prompt plus max_new_tokens exceeds max_len."""
        prompt_lists = _as_prompt_lists(prompts)
        if max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
        self._bucket_for(len(prompt_lists))
        self._check_length(max(len(p) for p in prompt_lists) + max_new_tokens, "the longest prompt + max_new_tokens")
        device = self.device
        generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        sampling = dict(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        return sampling_loop(
            lambda: self.prefill(prompt_lists), self.decode_step, len(prompt_lists), max_new_tokens, device,
            sampling, eos_token_id, stop_check_interval, sum(len(p) for p in prompt_lists), timings,
        )


def load_exported(directory: str | os.PathLike, *, use_aoti: bool = True, verify_checksums: bool = True) -> ExportedKimiLinear:
    """Loads the artifacts written by export_model: the AOTInductor packages (use_aoti=True) or the
    torch.export programs (use_aoti=False). Needs kda_ops imported (the programs call kda:: ops;
    AOTInductor CPU packages call their Python references back at run time), which calling this
    function implies. Checks every file against the sha256 in metadata.json first
    (verify_checksums). Raises ArtifactError naming the file that is missing, corrupted or cannot
    be loaded."""
    directory = os.fspath(directory)
    metadata = _read_metadata(directory)
    if metadata["device"] == "cuda" and not torch.cuda.is_available():
        raise ArtifactError(f"{directory}: exported for CUDA, but no CUDA device is available here")
    kind = "aoti" if use_aoti else "exported"
    programs = metadata["programs"]
    if use_aoti and programs["prefill"]["aoti"] is None:
        raise ArtifactError(f"{directory}: exported without AOTInductor packages (--no-aoti); load with use_aoti=False")

    def load(entry: dict) -> Callable:
        return _load_program(_checked_path(directory, metadata, entry[kind], verify_checksums), use_aoti, metadata)

    prefill = load(programs["prefill"])
    decoders = {int(batch): load(entry) for batch, entry in programs["decode"].items()}
    return ExportedKimiLinear(directory, metadata, prefill, decoders, use_aoti)


# ---------------------------------------------------------------------------------- command line


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", choices=sorted(PRESETS), help="preset, with random weights from --seed")
    source.add_argument("--checkpoint", help="directory with config.json and safetensors weights")
    parser.add_argument("--out", required=True, help="artifact directory (created if missing)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--max-batch", type=int, default=4, help="most sequences per batch (default 4)")
    parser.add_argument("--max-len", type=int, default=256, help="most tokens per sequence, prompt included (default 256)")
    parser.add_argument("--batch-buckets", help="comma-separated decode batch sizes (default: powers of two and max-batch)")
    parser.add_argument("--block-size", type=int, default=64, help="MLA latent-cache page size (default 64)")
    parser.add_argument("--no-aoti", action="store_true", help="skip the AOTInductor packages")
    parser.add_argument("--seed", type=int, default=0, help="weights seed with --config")


def run_export_command(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda requested but no CUDA device is available", flush=True)
        return 2
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.checkpoint:
        source = KimiLinearForCausalLM.from_pretrained(args.checkpoint, dtype=dtype, device=device).eval()
    else:
        source = KimiLinearConfig.preset(args.config)
    buckets = [int(b) for b in args.batch_buckets.split(",")] if args.batch_buckets else None
    start = time.perf_counter()
    export_model(
        source,
        args.out,
        device=device,
        dtype=dtype,
        max_batch=args.max_batch,
        max_len=args.max_len,
        batch_buckets=buckets,
        block_size=args.block_size,
        aoti=not args.no_aoti,
        seed=args.seed,
        progress=lambda message: print(message, flush=True),
    )
    print(f"done in {time.perf_counter() - start:.1f} s", flush=True)
    return 0
