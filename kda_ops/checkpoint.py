"""Checkpoint IO in the released checkpoint's format: a directory with config.json and either
model.safetensors or shards listed by model.safetensors.index.json ({"weight_map": {name: file}}).

Loading validates every tensor name and shape against the model before reading any data, and only
returns a model once every tensor has been copied in: a broken checkpoint raises CheckpointError
naming the missing, unexpected or wrongly shaped tensors and leaves nothing behind.
"""

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import KimiLinearConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
NAMES_SHOWN = 20


class CheckpointError(ValueError):
    """A checkpoint that does not match the model its config describes."""


def _tensor_files(path: str) -> dict[str, str]:
    """Tensor name -> safetensors file holding it."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    single = os.path.join(path, SINGLE_FILE)
    if not os.path.exists(single):
        raise CheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def _stored_shapes_and_dtypes(files: dict[str, str]) -> dict[str, tuple[list[int], str]]:
    out = {}
    for file in sorted(set(files.values())):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if files.get(name) == file:
                    tensor_slice = f.get_slice(name)
                    out[name] = (list(tensor_slice.get_shape()), tensor_slice.get_dtype())
        missing_here = [n for n, fl in files.items() if fl == file and n not in out]
        if missing_here:
            raise CheckpointError(f"{file}: the index lists tensors the file lacks: {_listed(missing_here)}")
    return out


def _listed(names) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
    return ", ".join(names[:NAMES_SHOWN]) + more


def _expected_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def check_tensors(expected: dict[str, torch.Tensor], stored: dict[str, tuple[list[int], str]], path: str) -> None:
    """Raises CheckpointError naming every missing, unexpected and wrongly shaped tensor."""
    problems = []
    missing = expected.keys() - stored.keys()
    unexpected = stored.keys() - expected.keys()
    if missing:
        problems.append(f"missing tensors: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_listed(unexpected)}")
    wrong = [
        f"{name} (expected {list(t.shape)}, found {stored[name][0]})"
        for name, t in expected.items()
        if name in stored and list(t.shape) != stored[name][0]
    ]
    if wrong:
        problems.append(f"wrongly shaped tensors: {_listed(wrong)}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match its config: " + "; ".join(problems))


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def load_pretrained(model_class, path: str, dtype: torch.dtype | None = None, device=None):
    """A model_class(config, dtype) with the checkpoint's weights. dtype defaults to the stored
    dtype of model.embed_tokens.weight; A_log, dt_bias and the router correction bias stay fp32."""
    path = os.fspath(path)
    config = KimiLinearConfig.from_json(path)
    files = _tensor_files(path)
    stored = _stored_shapes_and_dtypes(files)
    if dtype is None:
        embed = stored.get("model.embed_tokens.weight")
        dtype = _SAFETENSORS_DTYPES.get(embed[1], torch.float32) if embed else torch.get_default_dtype()
    with torch.device("meta"):
        model = model_class(config, dtype)
    check_tensors(_expected_tensors(model), stored, path)
    device = torch.device(device if device is not None else "cpu")
    state = {}
    for file in sorted(set(files.values())):
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name in f.keys():
                if files[name] == file:
                    state[name] = f.get_tensor(name)
    model = model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.load_state_dict(state, strict=not config.tie_word_embeddings)
    return model


def save_pretrained(model: torch.nn.Module, path: str, max_shard_bytes: int | None = None) -> None:
    """Writes config.json and the weights: one model.safetensors, or shards of at most
    max_shard_bytes each plus model.safetensors.index.json."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    model.config.to_json(os.path.join(path, "config.json"))
    # Clones: state-dict entries of stacked experts are views of one tensor, which safetensors refuses.
    tensors = {name: t.detach().to("cpu").clone() for name, t in _expected_tensors(model).items()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, os.path.join(path, SINGLE_FILE), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
        f.write("\n")
