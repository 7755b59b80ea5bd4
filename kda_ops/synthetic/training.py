"""Training and evaluation of a model on a synthetic task (kda_ops.synthetic.tasks): AdamW with linear warmup
and cosine decay, the loss and accuracy on the scored positions only, the forward + loss compiled
with torch.compile(fullgraph=True), bf16 autocast over fp32 weights, and held-out evaluation at
several sequence lengths.

The training batches come from generator seed 2 * seed, the held-out ones from 2 * seed + 1, so the
two streams never coincide for any pair of seeds.
"""

import math
import time
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tasks import Batch


class Task(Protocol):
    name: str
    vocab_size: int

    def sample(self, batch_size: int, seq_len: int, generator: torch.Generator) -> Batch: ...


@dataclass(frozen=True)
class TrainingSettings:
    seq_len: int
    steps: int
    batch_size: int = 64
    lr: float = 1e-3
    warmup_fraction: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 4
    seed: int = 0
    device: str = "cpu"
    autocast_dtype: torch.dtype | None = None  # None: fp32 throughout
    compile_backend: str | None = "inductor"  # None: eager
    converged_accuracy: float = 0.99


class Metrics(NamedTuple):
    loss: Tensor  # mean cross-entropy over the scored positions
    correct: Tensor  # scored positions whose argmax is the target
    scored: Tensor  # scored positions
    solved: Tensor  # sequences with every scored position correct


def learning_rate(step: int, settings: TrainingSettings) -> float:
    """Linear warmup over the first warmup_fraction of the steps (step counts from 1), then cosine
    decay to zero at the last step."""
    warmup = max(1, round(settings.warmup_fraction * settings.steps))
    if step <= warmup:
        return settings.lr * step / warmup
    progress = (step - warmup) / max(1, settings.steps - warmup)
    return settings.lr * 0.5 * (1 + math.cos(math.pi * progress))


def masked_metrics(model: nn.Module, batch: Batch, autocast_dtype: torch.dtype | None) -> Metrics:
    with torch.autocast(batch.input_ids.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(batch.input_ids)
    logits = logits.float()
    # Unscored targets hold IGNORE_INDEX, cross_entropy's default ignore_index: they add zero.
    losses = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="none")
    scored = batch.loss_mask.sum()
    right = (logits.argmax(-1) == batch.targets) & batch.loss_mask
    solved = (right == batch.loss_mask).all(1).sum()
    return Metrics(losses.sum() / scored, right.sum(), scored, solved)


def _optimizer(model: nn.Module, settings: TrainingSettings) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (embeddings, projections, conv filters) only, not on norms,
    decay rates or biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": settings.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = torch.device(settings.device).type == "cuda"
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), fused=fused)


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[Batch], autocast_dtype: torch.dtype | None) -> dict:
    """Eager forward over held-out batches: mean loss, token accuracy over the scored positions, and
    the fraction of sequences solved entirely."""
    was_training = model.training
    model.eval()
    totals = [masked_metrics(model, batch, autocast_dtype) for batch in batches]
    model.train(was_training)
    scored = sum(m.scored for m in totals)
    return {
        "loss": (sum(m.loss * m.scored for m in totals) / scored).item(),
        "accuracy": (sum(m.correct for m in totals) / scored).item(),
        "sequence_accuracy": sum(m.solved for m in totals).item() / sum(b.input_ids.shape[0] for b in batches),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(task: Task, model: nn.Module, settings: TrainingSettings, eval_lengths: tuple[int, ...]) -> dict:
    """Trains model in place on task at settings.seq_len (which must be among eval_lengths) and
    returns the record:
    - curve: one entry per evaluation (before training, every eval_every steps and after the last
      step) with step, lr, train_loss (mean over the steps since the previous entry; None before
      training), train_seconds so far, and eval[str(length)] = evaluate() on held-out batches of
      each eval length;
    - steps_to_converge: first evaluated step whose accuracy at the training length reaches
      converged_accuracy, or None;
    - train_seconds (evaluation excluded, compilation included), first_step_seconds (includes the
      compilation), step_ms (mean over the later steps)."""
    if settings.seq_len not in eval_lengths:
        raise ValueError(f"train: eval_lengths {eval_lengths} must include the training length {settings.seq_len}")
    device = torch.device(settings.device)
    model.to(device).train()
    train_stream = torch.Generator(device=device).manual_seed(2 * settings.seed)
    eval_stream = torch.Generator(device=device).manual_seed(2 * settings.seed + 1)
    held_out = {
        str(length): [task.sample(settings.batch_size, length, eval_stream) for _ in range(settings.eval_batches)]
        for length in eval_lengths
    }
    optimizer = _optimizer(model, settings)
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def loss_and_metrics(batch: Batch) -> Metrics:
        return masked_metrics(model, batch, settings.autocast_dtype)

    def evaluate_all() -> dict:
        return {length: evaluate(model, batches, settings.autocast_dtype) for length, batches in held_out.items()}

    step_fn = loss_and_metrics
    if settings.compile_backend is not None:
        step_fn = torch.compile(loss_and_metrics, fullgraph=True, backend=settings.compile_backend, dynamic=False)

    curve = [{"step": 0, "lr": 0.0, "train_loss": None, "train_seconds": 0.0, "eval": evaluate_all()}]
    steps_to_converge = None
    loss_sum, steps_since_record = torch.zeros((), device=device), 0
    train_seconds = first_step_seconds = 0.0
    _synchronize(device)
    segment_start = time.perf_counter()
    for step in range(1, settings.steps + 1):
        lr = learning_rate(step, settings)
        for group in optimizer.param_groups:
            group["lr"] = lr
        metrics = step_fn(task.sample(settings.batch_size, settings.seq_len, train_stream))
        metrics.loss.backward()
        nn.utils.clip_grad_norm_(params, settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += metrics.loss.detach()
        steps_since_record += 1
        if step == 1:
            _synchronize(device)
            first_step_seconds = time.perf_counter() - segment_start
        if step % settings.eval_every and step != settings.steps:
            continue
        _synchronize(device)
        train_seconds += time.perf_counter() - segment_start
        results = evaluate_all()
        train_loss = loss_sum.item() / steps_since_record
        curve.append({"step": step, "lr": lr, "train_loss": train_loss, "train_seconds": train_seconds, "eval": results})
        if steps_to_converge is None and results[str(settings.seq_len)]["accuracy"] >= settings.converged_accuracy:
            steps_to_converge = step
        loss_sum.zero_()
        steps_since_record = 0
        segment_start = time.perf_counter()
    later_steps = settings.steps - 1
    return {
        "curve": curve,
        "steps_to_converge": steps_to_converge,
        "train_seconds": train_seconds,
        "first_step_seconds": first_step_seconds,
        "step_ms": 1e3 * (train_seconds - first_step_seconds) / later_steps if later_steps else None,
    }
