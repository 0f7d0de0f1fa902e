"""Checks of state-dict entries, shared by ``Subspace`` and ``TWA``.

Both ``load_state_dict``s run every check before they change anything, so each check here only
reads and raises ``ValueError`` naming the entry and what was expected.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import torch
from torch import Tensor


def require_keys(state: Mapping, keys: set[str], what: str) -> None:
    if not isinstance(state, Mapping):
        raise ValueError(f"{what} must be a dict, got {type(state).__name__}")
    missing = keys - set(state)
    if missing:
        raise ValueError(f"{what} is missing {sorted(missing)}")


def int_entry(state: Mapping, key: str, low: int, high: int | None, what: str) -> int:
    """``state[key]`` as an int in ``[low, high]`` (no upper bound for None)."""
    value = state[key]
    if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_floating_point:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} entry {key!r} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{what} entry {key!r} is {value}, expected {bound}")
    return int(value)


def tensor_entry(
    value, key: str, shape: tuple[int, ...], dtype: torch.dtype | None, what: str, *, finite: bool = True
) -> Tensor:
    """Check that ``value`` is a tensor of ``shape`` and ``dtype`` (any floating dtype for None),
    finite when ``finite``; return it. Reads the tensor's values (a host sync for device ones)."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{what} entry {key!r} must be a tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{what} entry {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    if dtype is None:
        if not value.dtype.is_floating_point:
            raise ValueError(f"{what} entry {key!r} has dtype {value.dtype}, expected floating point")
    elif value.dtype != dtype:
        raise ValueError(f"{what} entry {key!r} has dtype {value.dtype}, expected {dtype}")
    if finite and value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{what} entry {key!r} holds nan or inf")
    return value
