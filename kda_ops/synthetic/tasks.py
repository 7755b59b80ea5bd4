"""Synthetic sequence tasks of the Kimi Linear report (recall and state tracking), sampled on the fly
on the generator's device from a seeded `torch.Generator`.

Every task's `sample(batch_size, seq_len, generator)` returns a `Batch`:
- input_ids [B, T] int64: the tokens the model reads;
- targets [B, T] int64: the token to predict at each position (teacher forcing: where a target
  exists, the next input token is that target), IGNORE_INDEX (-100, cross_entropy's default
  ignore_index) at positions without one;
- loss_mask [B, T] bool: True exactly where targets holds a token.
The sequence length must be even. The same seed on the same device gives the same batches (CPU and
CUDA generators draw different streams). Sampling is a fixed number of tensor operations, with no
host synchronisation and no Python loop over positions.

Formats (token ids are task-local; `vocab_size` is one more than the largest id):

Palindrome(alphabet_size A): ids 0 = SEP, 1..A = symbols. With n = T/2 random symbols x,
    position  0 .. n-1           n        n+1 .. 2n-1
    input     x_0 .. x_{n-1}     SEP      x_{n-1} .. x_1
    target    (none)             x_{n-1}  x_{n-2} .. x_0
  i.e. from SEP on the model writes x backwards; the n positions from SEP on are scored.

MultiQueryAssociativeRecall(num_pairs D, num_keys NK, num_values NV): ids 0..NK-1 = keys,
  NK..NK+NV-1 = values. D key-value pairs with distinct keys, then Q = T/2 - D queries, each a key
  drawn uniformly from the D stored keys followed by its value:
    input   = k_1 v_1 ... k_D v_D  q_1 a_1 ... q_Q a_Q
    targets = (none over the pairs) a_1  -  ... a_Q  -
  The target at each query key is the value stored with it (T >= 2D + 2). D is fixed per task, so a
  longer sequence asks more queries about the same number of pairs.

Stack(num_stacks S = 64, num_values V): ids 0..S-1 = PUSH_s, S..2S-1 = POP_s, 2S..2S+V-1 = values.
  T/2 operations of two tokens each, on S independent LIFO stacks, all empty at the start:
    push: PUSH_s v    (v a random value; no target)
    pop:  POP_s  v    (target at POP_s: v, the value on top of stack s, which it removes)
  Each operation picks its stack uniformly; the stack's depth then follows a random walk reflected
  at zero: from an empty stack the operation is a push, otherwise push or pop with probability
  1/2 each, so no pop ever meets an empty stack.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


class Batch(NamedTuple):
    input_ids: Tensor  # [B, T] int64
    targets: Tensor  # [B, T] int64, IGNORE_INDEX where loss_mask is False
    loss_mask: Tensor  # [B, T] bool


def _check_length(task: str, seq_len: int, minimum: int) -> None:
    if seq_len % 2 or seq_len < minimum:
        raise ValueError(f"{task}: seq_len must be even and at least {minimum}, got {seq_len}")


def _randint(high: int, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    return torch.randint(0, high, shape, generator=generator, device=generator.device)


def _batch(input_ids: Tensor, targets: Tensor) -> Batch:
    return Batch(input_ids, targets, targets != IGNORE_INDEX)


@dataclass(frozen=True)
class Palindrome:
    alphabet_size: int = 64
    name = "palindrome"

    SEP = 0

    @property
    def vocab_size(self) -> int:
        return 1 + self.alphabet_size

    def sample(self, batch_size: int, seq_len: int, generator: torch.Generator) -> Batch:
        _check_length(self.name, seq_len, 2)
        n = seq_len // 2
        symbols = 1 + _randint(self.alphabet_size, (batch_size, n), generator)
        backwards = symbols.flip(1)
        sep = torch.full((batch_size, 1), self.SEP, dtype=symbols.dtype, device=symbols.device)
        input_ids = torch.cat([symbols, sep, backwards[:, :-1]], dim=1)
        targets = torch.cat([torch.full_like(symbols, IGNORE_INDEX), backwards], dim=1)
        return _batch(input_ids, targets)


@dataclass(frozen=True)
class MultiQueryAssociativeRecall:
    num_pairs: int
    num_keys: int = 256
    num_values: int = 256
    name = "mqar"

    def __post_init__(self) -> None:
        if not 1 <= self.num_pairs <= self.num_keys:
            raise ValueError(f"mqar: num_pairs must be in [1, num_keys={self.num_keys}], got {self.num_pairs}")

    @property
    def vocab_size(self) -> int:
        return self.num_keys + self.num_values

    def sample(self, batch_size: int, seq_len: int, generator: torch.Generator) -> Batch:
        D = self.num_pairs
        _check_length(self.name, seq_len, 2 * D + 2)
        Q = seq_len // 2 - D
        device = generator.device
        # Distinct keys: the first D of a random permutation of the key ids.
        keys = torch.rand(batch_size, self.num_keys, generator=generator, device=device).argsort(dim=1, stable=True)[:, :D]
        values = self.num_keys + _randint(self.num_values, (batch_size, D), generator)
        asked = _randint(D, (batch_size, Q), generator)
        query_keys, answers = keys.gather(1, asked), values.gather(1, asked)
        pairs = torch.stack([keys, values], dim=2).view(batch_size, 2 * D)
        queries = torch.stack([query_keys, answers], dim=2).view(batch_size, 2 * Q)
        ignored_pairs = torch.full_like(pairs, IGNORE_INDEX)
        query_targets = torch.stack([answers, torch.full_like(answers, IGNORE_INDEX)], dim=2).view(batch_size, 2 * Q)
        return _batch(torch.cat([pairs, queries], dim=1), torch.cat([ignored_pairs, query_targets], dim=1))


@dataclass(frozen=True)
class Stack:
    num_stacks: int = 64
    num_values: int = 384
    name = "stack"

    @property
    def vocab_size(self) -> int:
        return 2 * self.num_stacks + self.num_values

    def sample(self, batch_size: int, seq_len: int, generator: torch.Generator) -> Batch:
        _check_length(self.name, seq_len, 2)
        S, N = self.num_stacks, seq_len // 2
        stack = _randint(S, (batch_size, N), generator)
        step = 2 * _randint(2, (batch_size, N), generator) - 1
        # Per stack, a +-1 walk over its own operations; its absolute value is a valid depth
        # sequence (reflected at zero): rising = push, falling = pop from a non-empty stack.
        walk = (F.one_hot(stack, S) * step[..., None]).cumsum(1).gather(2, stack[..., None]).squeeze(2)
        depth_after, depth_before = walk.abs(), (walk - step).abs()
        is_push = depth_after > depth_before
        # On one stack, the pushes reaching depth d and the pops leaving depth d alternate in time,
        # starting with a push; so sorted by (stack, level d, time), each pop directly follows the
        # push it removes.
        level = torch.where(is_push, depth_after, depth_before)
        time = torch.arange(N, device=stack.device)
        order = ((stack * (N + 1) + level) * N + time).argsort(1)
        matched = torch.empty_like(order).scatter_(1, order, order.roll(1, dims=1))
        pushed = 2 * S + _randint(self.num_values, (batch_size, N), generator)
        value = torch.where(is_push, pushed, pushed.gather(1, matched))
        op = torch.where(is_push, stack, S + stack)
        input_ids = torch.stack([op, value], dim=2).view(batch_size, seq_len)
        pop_target = torch.where(is_push, IGNORE_INDEX, value)
        targets = torch.stack([pop_target, torch.full_like(value, IGNORE_INDEX)], dim=2).view(batch_size, seq_len)
        return _batch(input_ids, targets)

