"""Input-contract helpers shared by the ops' contracts.

Every check raises before anything is allocated or written, names the op and the argument, and
states what was expected and what was received. Only shapes, dtypes and devices are read, so the
same checks run unchanged on real tensors and under FakeTensorMode.
"""

from collections.abc import Sequence

import torch


class ContractError(ValueError):
    """An op input that violates the op's contract."""


def _fmt_shape(shape: Sequence) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def fail(op: str, name: str, expected: str, got: str) -> None:
    raise ContractError(f"kda::{op}: argument '{name}' expected {expected}, got {got}")


def check_tensor(
    op: str,
    name: str,
    t,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> None:
    if not isinstance(t, torch.Tensor):
        fail(op, name, "a tensor", type(t).__name__)
    if ndim is not None and t.dim() != ndim:
        fail(op, name, f"a {ndim}-d tensor", f"shape {_fmt_shape(t.shape)} ({t.dim()}-d)")
    if dtypes is not None and t.dtype not in dtypes:
        fail(op, name, "dtype " + " or ".join(str(d) for d in dtypes), str(t.dtype))
    if device is not None and t.device != device:
        fail(op, name, f"device {device} (the device of the other inputs)", str(t.device))


def check_shape(op: str, name: str, t: torch.Tensor, expected: Sequence, what: str = "") -> None:
    """`expected` may hold None for a dimension that is free."""
    ok = t.dim() == len(expected) and all(e is None or s == e for s, e in zip(t.shape, expected))
    if not ok:
        shown = _fmt_shape("*" if e is None else e for e in expected)
        fail(op, name, f"shape {shown}{' ' + what if what else ''}", f"shape {_fmt_shape(t.shape)}")
