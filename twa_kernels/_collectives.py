"""Collectives over a ``torch.distributed`` group, and the checks that keep ranks in step.

Every function that communicates is a collective: all ranks of the group call it, in the same
order. Ranks that disagree about what they hold (layout, state) raise ``ValueError`` together,
after an all-gather of a small fingerprint, instead of waiting forever in mismatched collectives.
The shard of rank r is ``[r S, min((r + 1) S, D))`` with ``S = ceil(D / world)``.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from . import _ops

if TYPE_CHECKING:
    from ._params import ParamLayout

T = TypeVar("T")


# torch 2.13 renamed the tensor-in/tensor-out collectives; the old names warn there and are the
# only ones before it. Looked up at call time: builds without distributed support lack both.
def all_gather_single(output: Tensor, input: Tensor, group) -> None:
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(output, input, group=group)


def reduce_scatter_single(output: Tensor, input: Tensor, group) -> None:
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(output, input, group=group)


def world_and_rank(group) -> tuple[int, int]:
    """``(size of the group, this process's rank in it)``."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "process_group was given but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group() first"
        )
    return dist.get_world_size(group), dist.get_rank(group)


def shard_size(D: int, world: int) -> int:
    """S = ceil(D / world): every shard has S columns but the last, which may have fewer."""
    return -(-D // world)


def shard_range(D: int, world: int, rank: int) -> tuple[int, int]:
    """The columns ``[start, stop)`` of rank ``rank``; raises ``ValueError`` if one would be empty.

    Equal shards of S columns (the last one shorter) make the padded buffer ``world * S`` the
    flat parameters in order, so one all-gather or reduce-scatter covers them without copies.
    """
    S = shard_size(D, world)
    if (world - 1) * S >= D:
        raise ValueError(
            f"D={D} trainable values cannot be sharded over {world} processes (the last would "
            f"get none with shards of {S}): use fewer processes or no process group"
        )
    start = rank * S
    return start, min(start + S, D)


# ---------------------------------------------------------------------------------------------
# agreement between ranks


def _fingerprint(layout: ParamLayout, max_rank: int, dtype: torch.dtype, tol: float) -> list[int]:
    described = json.dumps(layout.signature(), sort_keys=True).encode()
    return [
        layout.numel,
        len(layout.shapes),
        zlib.crc32(described),
        max_rank,
        _ops.STORAGE_DTYPES.index(dtype),
        zlib.crc32(repr(float(tol)).encode()),
    ]


_FINGERPRINT_FIELDS = ("D", "number of parameters", "parameter shapes and dtypes", "max_rank",
                       "storage dtype", "tol")  # fmt: skip


def _first_disagreement(values: list[int], group, device: torch.device):
    """Collective: ``(field, rank, rank 0's value, that rank's value)`` of the first difference."""
    world, _ = world_and_rank(group)
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    everyone = torch.empty(world * len(values), dtype=torch.int64, device=device)
    all_gather_single(everyone, mine, group=group)
    everyone = everyone.view(world, len(values)).cpu().tolist()
    for r in range(1, world):
        for field, (a, b) in enumerate(zip(everyone[0], everyone[r], strict=True)):
            if a != b:
                return field, r, a, b
    return None


def check_same_layout(
    layout: ParamLayout, max_rank: int, dtype: torch.dtype, tol: float, group, device: torch.device
) -> None:
    """Collective: raise ``ValueError`` on every rank unless all ranks describe the same subspace.

    Ranks that went on with different shapes would wait forever in mismatched collectives; an
    all-gather of 6 integers per rank finds the difference first.
    """
    found = _first_disagreement(_fingerprint(layout, max_rank, dtype, tol), group, device)
    if found is None:
        return
    field, r, a, b = found
    detail = f"rank 0 has {a}, rank {r} has {b}" if field in (0, 1, 3) else f"rank {r} differs from rank 0"
    raise ValueError(
        f"the ranks of the process group disagree on the subspace's {_FINGERPRINT_FIELDS[field]} "
        f"({detail}); every rank must build it from the same model with the same arguments"
    )


def check_same_state(state, group, device: torch.device) -> None:
    """Collective: raise ``ValueError`` unless every rank loaded shards of one saved subspace.

    The replicated part (rank, sample count, scales, sample coordinates) must be equal; files
    saved at different times would otherwise leave the ranks with different ranks K.
    """
    scales = torch.as_tensor(state["scales"])
    # An int8 basis's block scales belong to each rank's columns: only row scales are replicated.
    row_scales = [scales.double().cpu().reshape(-1)] if scales.dim() == 1 else []
    replicated = torch.cat(
        row_scales + [torch.as_tensor(c).double().cpu().reshape(-1) for c in state["coords"]]
    )
    values = [int(state["rank"]), int(state["num_samples"]), zlib.crc32(replicated.numpy().tobytes())]
    found = _first_disagreement(values, group, device)
    if found is not None:
        field, r, a, b = found
        what = ("rank", "num_samples", "scales and sample coordinates")[field]
        detail = f"rank 0 has {a}, rank {r} has {b}" if field < 2 else f"rank {r} differs from rank 0"
        raise ValueError(
            f"the state dicts of the ranks come from different subspaces ({what}: {detail}); "
            "load the files saved together by one group"
        )


def raise_together(error: Exception | None, group, device: torch.device, what: str) -> None:
    """Collective: re-raise ``error`` here, or raise ``ValueError`` if another rank had one.

    Used before a state changes on every rank, so that one rank's refusal does not leave the
    others waiting in the next collective.
    """
    world, _ = world_and_rank(group)
    flags = torch.empty(world, dtype=torch.int64, device=device)
    all_gather_single(flags, torch.tensor([int(error is not None)], device=device), group=group)
    if error is not None:
        raise error
    failed = [r for r, f in enumerate(flags.cpu().tolist()) if f]
    if failed:
        ranks = ", ".join(map(str, failed))
        raise ValueError(f"{what} failed on rank {ranks} (see the error there); nothing changed")


def check_together(check: Callable[[], T], group, device: torch.device, what: str) -> T:
    """``check()``; with a group, a collective: if it raises ``ValueError`` on any rank, all raise."""
    if group is None:
        return check()
    error = result = None
    try:
        result = check()
    except ValueError as e:
        error = e
    raise_together(error, group, device, what)
    return result


def all_reduce_(t: Tensor, group, op=None) -> Tensor:
    """In-place all-reduce (sum by default) over the group; returns ``t``."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return t


def all_gather_flat(local: Tensor, D: int, group) -> Tensor:
    """Collective: the fp32 [D] vector whose shards the ranks hold (``local`` is this rank's)."""
    world, _ = world_and_rank(group)
    S = shard_size(D, world)
    shard = torch.zeros(S, dtype=torch.float32, device=local.device)
    shard[: local.numel()] = local
    flat = torch.empty(world * S, dtype=torch.float32, device=local.device)
    all_gather_single(flat, shard, group=group)
    return flat[:D]
