r"""A subspace sharded along D across ``torch.distributed`` ranks, and the TWA step over it.

Pass ``process_group`` to ``Subspace`` and every rank of the group holds one contiguous range of
the D trainable values (ZeRO-style): rank r owns columns ``[r S, min((r + 1) S, D))`` with
``S = ceil(D / world)``, i.e. ``basis[:, shard]`` (about ``2 K D / world`` bytes in fp16), the
matching slices of the anchor and of the mean, and an fp32 buffer of S values for the step. The
small state (scales, the sample coordinates, the K coordinates and their momentum) is identical
on every rank. The parameters themselves stay replicated, as DDP keeps them.

``Subspace.add()`` orthogonalises shard by shard (CGS2, the passes of ``reference.orthogonalize_``
with fp64 dot products); only O(K) numbers cross the network per pass:

1. each rank: ``c1_r = P_r^T v_r`` and ``||v_r||^2``; all-reduce (sum) of K + 1 values;
2. each rank: ``v1_r = v_r - P_r c1``, ``c2_r = P_r^T v1_r``, ``||v1_r||^2``; all-reduce (sum) of
   K + 1 values, and ``max |v1_r|``; all-reduce (max) of 1 value (it sets the column's scale);
3. each rank writes its slice of the new column, scaled like the others; nothing is sent.

``TWA.step()`` on such a subspace:

1. gradients averaged over the ranks: a reduce-scatter of the flat fp32 gradient (D values)
   leaves each rank the mean of its shard; under DDP, which has averaged them already, each rank
   just reads its shard;
2. ``c_r = P_r^T g_r``, then an all-reduce (sum) of K fp32 values gives ``c = P^T g`` everywhere;
3. the K-dimensional SGD step runs identically on every rank (same inputs, same bits);
4. each rank writes ``w_r = w0_r + P_r alpha``; an all-gather of the weights (D values) brings
   the replicated parameters up to date.

With ring collectives a reduce-scatter or an all-gather of N bytes sends ``(world - 1) / world * N``
per rank and an all-reduce twice that, so steps 1 and 4 cost one DDP gradient all-reduce and the
subspace itself adds K floats. The published DDP scheme keeps whole basis rows per rank and adds
a second all-reduce of D floats per step on top of DDP's: 4 x 25.6M = 102 MB at ResNet-50 size,
where this one all-reduces 4 K = 256 bytes for K = 64.

Example (``torchrun --nproc-per-node=N train.py``; one process per GPU, replicated model)::

    dist.init_process_group("nccl")         # "gloo" for CPU tensors
    space = Subspace(model, max_rank=64, process_group=dist.group.WORLD)
    for epoch in range(E):
        train_one_epoch(ddp_model)          # any optimizer
        space.add()                         # every rank, same weights: each keeps its shard
    opt = TWA(model, space, lr=0.3, momentum=0.9)   # plain model: TWA averages the gradients
    for x, y in local_loader:               # each rank its share of the global batch
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()

Every function here that communicates is a collective: all ranks of the group must call it, in the
same order. Layout mismatches are detected by an all-gather of a small fingerprint, so ranks that
disagree raise ``ValueError`` together instead of waiting for each other.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from . import _backend, _ops, reference

if TYPE_CHECKING:
    from .subspace import ParamLayout, Subspace

logger = logging.getLogger(__name__)
T = TypeVar("T")


# torch 2.13 renamed the tensor-in/tensor-out collectives; the old names warn there and are the
# only ones before it. Looked up at call time: builds without distributed support lack both.
def _all_gather_single(output: Tensor, input: Tensor, group) -> None:
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(output, input, group=group)


def _reduce_scatter_single(output: Tensor, input: Tensor, group) -> None:
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
    _all_gather_single(everyone, mine, group=group)
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
    replicated = torch.cat(
        [torch.as_tensor(state["scales"]).double().cpu().reshape(-1)]
        + [torch.as_tensor(c).double().cpu().reshape(-1) for c in state["coords"]]
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
    _all_gather_single(flags, torch.tensor([int(error is not None)], device=device), group=group)
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


# ---------------------------------------------------------------------------------------------
# the parameters' shard


def shard_pieces(layout: ParamLayout, start: int, stop: int) -> list[tuple[int, int, int]]:
    """``(parameter index, begin, end)`` of the flattened parameters' values in ``[start, stop)``.

    Concatenated in order, the pieces are exactly the shard.
    """
    pieces = []
    for i, (offset, n) in enumerate(zip(layout.offsets, layout.numels, strict=True)):
        a, b = max(start, offset), min(stop, offset + n)
        if a < b:
            pieces.append((i, a - offset, b - offset))
    return pieces


def _piece_views(buffer: Tensor, pieces: list[tuple[int, int, int]]) -> list[Tensor]:
    views, at = [], 0
    for _, a, b in pieces:
        views.append(buffer[at : at + b - a])
        at += b - a
    return views


def flatten_shard(
    layout: ParamLayout, tensors: Sequence[Tensor], shard: tuple[int, int], device: torch.device
) -> Tensor:
    """The shard ``[start, stop)`` of the flattened ``tensors`` as a new fp32 tensor."""
    start, stop = shard
    pieces = shard_pieces(layout, start, stop)
    out = torch.empty(stop - start, dtype=torch.float32, device=device)
    sources = [tensors[i].reshape(-1)[a:b] for i, a, b in pieces]
    torch._foreach_copy_(_piece_views(out, pieces), sources)
    return out


def all_gather_flat(local: Tensor, D: int, group) -> Tensor:
    """Collective: the fp32 [D] vector whose shards the ranks hold (``local`` is this rank's)."""
    world, _ = world_and_rank(group)
    S = shard_size(D, world)
    shard = torch.zeros(S, dtype=torch.float32, device=local.device)
    shard[: local.numel()] = local
    flat = torch.empty(world * S, dtype=torch.float32, device=local.device)
    _all_gather_single(flat, shard, group=group)
    return flat[:D]


# ---------------------------------------------------------------------------------------------
# Subspace.add() on a shard


def orthogonalize_(basis: Tensor, scales: Tensor, sample: Tensor, rank: int, group) -> Tensor:
    """CGS2 of a sample sharded along D: ``reference.orthogonalize_`` with its sums all-reduced.

    ``basis`` [K, n] is this rank's columns of the basis, ``sample`` fp32 [n] its slice of the
    sample; ``scales`` [K] is the same on every rank. Three passes over the local columns with
    fp64 accumulation; pass 1 all-reduces K + 1 values, pass 2 K + 1 values and a maximum. The
    stored slices share one scale per column, set from the global ``max |v1|`` and ``||u||``.

    Returns fp64 ``[c1 + c2 (rank values), ||u||, ||v||]`` (global, the same on every rank).
    """

    def reduce(tensor: Tensor, op: str) -> None:
        all_reduce_(tensor, group, dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)

    return reference.orthogonalize_(basis, scales, sample, rank, all_reduce=reduce)


# ---------------------------------------------------------------------------------------------
# the TWA step on a sharded subspace


@dataclasses.dataclass(frozen=True)
class CommBytes:
    """Payload bytes of the collectives of one sharded ``TWA.step()`` (fp32 values)."""

    gradients: int  # reduce-scatter of the padded flat gradient; 0 when DDP averaged it already
    coordinates: int  # all-reduce of the K coordinate gradients
    weights: int  # all-gather of the padded flat weights

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class ShardedStep:
    """The buffers and collectives of ``TWA`` on a sharded subspace.

    ``flat`` is fp32 ``[world * S]``: the flat parameters (or gradients) in their first D values,
    zeros after them, so that rank r's shard is ``flat[r S : (r + 1) S]`` for every collective.
    ``shard`` fp32 [S] receives this rank's gradient and weights.
    """

    def __init__(self, subspace: Subspace, params: list[Tensor], average_gradients: bool) -> None:
        group = subspace.process_group
        self.group = group
        self.world, self.me = world_and_rank(group)
        self.average_gradients = average_gradients
        D, device = subspace.dim, subspace.device
        self.start, self.stop = subspace.shard
        S = shard_size(D, self.world)
        self.flat = torch.zeros(self.world * S, dtype=torch.float32, device=device)
        self.flat_views = subspace.layout.views(self.flat)
        self.shard = torch.zeros(S, dtype=torch.float32, device=device)
        self.local = self.shard[: self.stop - self.start]
        self._pieces = shard_pieces(subspace.layout, self.start, self.stop)
        self._piece_views = _piece_views(self.local, self._pieces)

    def comm_bytes(self, K: int) -> CommBytes:
        padded = 4 * self.flat.numel()
        return CommBytes(gradients=padded if self.average_gradients else 0, coordinates=4 * K,
                         weights=padded)  # fmt: skip

    def project(self, basis: Tensor, scales: Tensor, x: Tensor, backend: str) -> Tensor:
        """``P^T x`` for x this rank's slice of a [D] vector: fp32 [K], the same on every rank."""
        return all_reduce_(_ops.project(basis, scales, x, backend), self.group)

    def _gather_grads(self, params: list[Tensor]) -> None:
        if self.average_gradients:
            from .functional import gather_grads_

            gather_grads_(params, self.flat_views)
            _reduce_scatter_single(self.shard, self.flat, group=self.group)
            self.shard.mul_(1.0 / self.world)
            return
        with_grad = [(v, params[i].grad.reshape(-1)[a:b])
                     for v, (i, a, b) in zip(self._piece_views, self._pieces, strict=True)
                     if params[i].grad is not None]  # fmt: skip
        without = [v for v, (i, _, _) in zip(self._piece_views, self._pieces, strict=True)
                   if params[i].grad is None]  # fmt: skip
        if with_grad:
            views, grads = zip(*with_grad, strict=True)
            torch._foreach_copy_(list(views), list(grads))
        if without:
            torch._foreach_zero_(without)

    def write_weights(
        self, params: list[Tensor], w0: Tensor, basis: Tensor, scales: Tensor, alpha: Tensor, backend: str
    ) -> None:
        """``params <- w0 + P alpha``: this rank's shard, then an all-gather of all of them."""
        _ops.reconstruct_(self.local, w0, basis, scales, alpha, backend)
        _all_gather_single(self.flat, self.shard, group=self.group)
        with torch.no_grad():
            torch._foreach_copy_([p.detach() for p in params], self.flat_views)

    def step(
        self,
        params: list[Tensor],
        w0: Tensor,
        basis: Tensor,
        scales: Tensor,
        alpha: Tensor,
        momentum_buffer: Tensor,
        counters: Tensor,
        gram: Tensor,
        pw0: Tensor,
        *,
        lr: float,
        momentum: float,
        dampening: float,
        weight_decay: float,
        nesterov: bool,
        backend: str,
    ) -> None:
        """One TWA step with K + 2 D values communicated (K + D under DDP); no host sync."""
        concrete = _backend.resolve(backend, self.flat.device)
        self._gather_grads(params)
        coord_grad = self.project(basis, scales, self.local, concrete)
        _ops.subspace_step_(
            alpha, momentum_buffer, counters, coord_grad, gram, pw0,
            lr, momentum, dampening, weight_decay, nesterov, concrete,
        )  # fmt: skip
        self.write_weights(params, w0, basis, scales, alpha, concrete)

    def log_comm(self, K: int, D: int) -> None:
        if self.me != 0:
            return
        b = self.comm_bytes(K)
        grads = (
            f"reduce-scatter {_fmt(b.gradients)} of gradients, "
            if b.gradients
            else "no gradient collective (DDP averages them), "
        )
        logger.info(
            "TWA sharded over %d ranks (D=%d, K=%d): per step %sall-reduce %s of coordinates, "
            "all-gather %s of weights; the published scheme adds an all-reduce of %s to DDP's",
            self.world, D, K, grads, _fmt(b.coordinates), _fmt(b.weights), _fmt(4 * D),
        )  # fmt: skip


def _fmt(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    exponent = min(int(math.log(n, 1024)), 3)
    return f"{n / 1024**exponent:.1f} {('B', 'KiB', 'MiB', 'GiB')[exponent]}"


def wrapped_by_ddp(params) -> bool:
    """True when ``params`` is a ``DistributedDataParallel`` module (its backward averages)."""
    return isinstance(params, torch.nn.parallel.DistributedDataParallel)
