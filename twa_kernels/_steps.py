"""The TWA step over a list of parameters: one interface, one class per way of running it.

``TWA`` holds one step object, made by ``make_step``:

- ``LocalStep``: one process, one ``twa::step_`` op per step. Its reference implementation
  gathers the gradients into one flat fp32 buffer, projects, updates the coordinates,
  reconstructs the weights into the same buffer and copies them into the parameters; the Triton
  and CUDA ones are fused steps (``_triton.step``, ``csrc/step.cu``), which read the gradients
  and write the parameters in place through a parameter table (3 and 4 launches).
- ``ShardedStep``: the basis sharded along D over a process group (see ``distributed``): each
  rank projects its shard of the gradient with the chosen backend (``twa::project_grads``, the
  fused step's gradient kernel on Triton, under DDP; ``twa::project`` of the reduce-scattered
  shard otherwise), one all-reduce of K floats gives ``P^T g``, each rank writes its shard of
  the weights and an all-gather updates the replicated parameters.

- ``FSDPStep``: an FSDP2 model; each rank's basis covers its local parameter shards: the local
  projection, one all-reduce of K floats, the K-dimensional step, the local shards written in
  place (FSDP2's own collectives gather them).

All have ``project``, ``write_weights``, ``step``, ``step_blocks`` (per-block coordinates)
and ``comm_bytes``. Nothing in a step synchronises with the host, and nothing allocates memory
proportional to D: the copies go through ``torch._foreach_copy_`` into views made once.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import _collectives, _ops, _params

if TYPE_CHECKING:
    from .subspace import Subspace

logger = logging.getLogger(__name__)


def make_step(subspace: Subspace, params: list[Tensor], average_gradients: bool | None, ddp: bool):
    """The step object for ``subspace``: sharded when it has a process group.

    ``average_gradients`` None means: average over the ranks unless ``ddp`` (the params came
    wrapped in ``DistributedDataParallel``, whose backward has averaged them already).
    """
    if subspace.process_group is None:
        return LocalStep(subspace.layout, subspace.device)
    if subspace.fsdp:
        if average_gradients:
            raise ValueError(
                "average_gradients=True on an FSDP2 model: its reduce-scatter has averaged the "
                "gradients already (leave average_gradients as None)"
            )
        return FSDPStep(subspace)
    average = not ddp if average_gradients is None else average_gradients
    return ShardedStep(subspace, params, average)


@dataclasses.dataclass(frozen=True)
class CommBytes:
    """Payload bytes of the collectives of one sharded ``TWA.step()`` (fp32 values)."""

    gradients: int  # reduce-scatter of the padded flat gradient; 0 when DDP averaged it already
    coordinates: int  # all-reduce of the K coordinate gradients
    weights: int  # all-gather of the padded flat weights

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Hyper:
    """The SGD hyperparameters of one step, as ``torch.optim.SGD`` names them.

    ``lr`` is a 0-dim fp32 tensor on the device: the kernels read it there, so a step under
    ``torch.compile`` does not specialise on its value and a captured CUDA graph replays with the
    value the tensor holds at replay.
    """

    lr: Tensor
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool


@dataclasses.dataclass(frozen=True)
class BlockHyper:
    """The hyperparameters of one per-block step (``twa::block_step_``): ``rule`` "sgd" reads
    ``torch.optim.SGD``'s names, "adamw" ``torch.optim.AdamW``'s (betas as beta1, beta2)."""

    lr: Tensor
    rule: str
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    beta1: float = 0.0
    beta2: float = 0.0
    eps: float = 0.0

    def args(self) -> tuple:
        return (self.lr, self.rule, self.momentum, self.dampening, self.weight_decay, self.nesterov,
                self.beta1, self.beta2, self.eps)  # fmt: skip


def _subspace_step(alpha, momentum_buffer, counters, coord_grad, gram, pw0, hyper: Hyper, backend) -> None:
    _ops.subspace_step_(
        alpha, momentum_buffer, counters, coord_grad, gram, pw0,
        hyper.lr, hyper.momentum, hyper.dampening, hyper.weight_decay, hyper.nesterov, backend,
    )  # fmt: skip


class LocalStep:
    """The step on one process: one flat fp32 [D] workspace (gradients in, weights out) for the
    reference ops; the fused Triton and CUDA ones read the grads and write the parameters in
    place and leave it alone."""

    average_gradients = False

    def __init__(self, layout: _params.ParamLayout, device: torch.device) -> None:
        self.flat = torch.zeros(layout.numel, dtype=torch.float32, device=device)

    def comm_bytes(self, K: int) -> CommBytes:
        return CommBytes(gradients=0, coordinates=0, weights=0)

    def project(self, basis: Tensor, scales: Tensor, x: Tensor, backend: str) -> Tensor:
        """``P^T x`` for x fp32 [D]: fp32 [K]."""
        return _ops.project(basis, scales, x, backend)

    def write_weights(
        self, params: list[Tensor], w0: Tensor, basis: Tensor, scales: Tensor, coef: Tensor,
        segments: list[int] | None, backend: str,
    ) -> None:  # fmt: skip
        """``params <- w0 + P coef`` in place (each rounded to its dtype; with ``segments``, row
        ``segments[i]`` of coef for parameter i): ``twa::write_params_``, one launch on Triton and
        CUDA, through the flat buffer on the reference."""
        detached = [p.detach() for p in params]
        _ops.write_params_(detached, self.flat, w0, basis, scales, coef, segments, backend)

    def step_blocks(
        self, params: list[Tensor], w0: Tensor, basis: Tensor, scales: Tensor, alpha: Tensor, buf1: Tensor,
        buf2: Tensor, counters: Tensor, blocks, pw0: Tensor, hyper: BlockHyper, backend: str,
    ) -> None:  # fmt: skip
        """One step of per-block coordinates: the fused ``twa::step_blocks_``."""
        _ops.step_blocks_(
            params, [p.grad for p in params], self.flat, w0, basis, scales, alpha, buf1, buf2, counters,
            blocks.gram, pw0, blocks.inv_norms, blocks.coef, blocks.segments, *hyper.args(), backend,
        )  # fmt: skip

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
        hyper: Hyper,
        backend: str,
    ) -> None:
        """One TWA step: ``alpha <- SGD(alpha, P^T g)``, then ``params <- w0 + P alpha``.

        Args:
            params: the parameters, in the subspace's order (``p.grad`` may be None: zero gradient).
            w0: fp32 [D] origin. basis: [K, D] (the K used columns). scales: fp32 [K].
            alpha, momentum_buffer: fp32 [K]. counters: int64 [2]. gram: fp32 [K, K]. pw0: fp32 [K].
        """
        _ops.step_(
            params, [p.grad for p in params], self.flat, w0, basis, scales, alpha, momentum_buffer,
            counters, gram, pw0, hyper.lr, hyper.momentum, hyper.dampening, hyper.weight_decay,
            hyper.nesterov, backend,
        )  # fmt: skip


class _GroupStep:
    """What the two sharded steps share: each rank holds part of the basis, so a projection is
    the ranks' partial sums, all-reduced; a step projects the gradient (``project_grads``),
    all-reduces its K coordinates, takes the K-dimensional update (the same on every rank) and
    writes this rank's weights (``write_weights``), with no host synchronisation."""

    group = None

    def project(self, basis: Tensor, scales: Tensor, x: Tensor, backend: str) -> Tensor:
        """``P^T x`` for x the values this rank holds of a [D] vector: fp32 [K], the same on
        every rank."""
        return _collectives.all_reduce_(_ops.project(basis, scales, x, backend), self.group)

    def step(
        self, params: list[Tensor], w0: Tensor, basis: Tensor, scales: Tensor, alpha: Tensor,
        momentum_buffer: Tensor, counters: Tensor, gram: Tensor, pw0: Tensor, hyper: Hyper, backend: str,
    ) -> None:  # fmt: skip
        """One TWA step with the chosen backend's kernels on this rank's values; the bytes sent
        are ``comm_bytes``."""
        concrete = _ops.choose("step_", backend, basis)
        coord_grad = self.project_grads(params, basis, scales, concrete)
        _subspace_step(alpha, momentum_buffer, counters, coord_grad, gram, pw0, hyper, concrete)
        self.write_weights(params, w0, basis, scales, alpha, None, concrete)

    def step_blocks(
        self, params: list[Tensor], w0: Tensor, basis: Tensor, scales: Tensor, alpha: Tensor, buf1: Tensor,
        buf2: Tensor, counters: Tensor, blocks, pw0: Tensor, hyper: BlockHyper, backend: str,
    ) -> None:  # fmt: skip
        """One step of per-block coordinates: this rank's [L, K] projections all-reduced, the
        [L, K] step (the same on every rank), this rank's weights written."""
        concrete = _ops.choose("step_blocks_", backend, basis)
        coord = _collectives.all_reduce_(self.project_block_grads(params, basis, scales, blocks, concrete),
                                         self.group)  # fmt: skip
        _ops.block_step_(alpha, buf1, buf2, counters, coord, blocks.gram, pw0, blocks.inv_norms, blocks.coef,
                         *hyper.args(), concrete)  # fmt: skip
        self.write_weights(params, w0, basis, scales, blocks.coef, blocks.segments, concrete)


class ShardedStep(_GroupStep):
    """The buffers and collectives of ``TWA`` on a sharded subspace.

    ``flat`` is fp32 ``[world * S]``: the flat parameters (or gradients) in their first D values,
    zeros after them, so that rank r's shard is ``flat[r S : (r + 1) S]`` for every collective.
    ``shard`` fp32 [S] receives this rank's gradient and weights.
    """

    def __init__(self, subspace: Subspace, params: list[Tensor], average_gradients: bool) -> None:
        group = subspace.process_group
        self.group = group
        self.world, self.me = _collectives.world_and_rank(group)
        self.average_gradients = average_gradients
        D, device = subspace.dim, subspace.device
        self.start, self.stop = subspace.shard
        S = _collectives.shard_size(D, self.world)
        self.flat = torch.zeros(self.world * S, dtype=torch.float32, device=device)
        self.flat_views = subspace.layout.views(self.flat)
        self.shard = torch.zeros(S, dtype=torch.float32, device=device)
        self.local = self.shard[: self.stop - self.start]
        self._pieces = _params.shard_pieces(subspace.layout, self.start, self.stop)
        self._local_pieces = _params.piece_views(self.local, self._pieces)
        self.log_comm(subspace.rank, D)

    def local_gradient(self, params: list[Tensor]) -> Tensor:
        """This rank's shard of the gradient in ``buffer``: averaged over the ranks by a
        reduce-scatter, or (DDP averaged it already) copied from the grads' pieces."""
        if self.average_gradients:
            _params.copy_or_zero_(self.flat_views, [p.grad for p in params])
            _collectives.reduce_scatter_single(self.shard, self.flat, group=self.group)
            self.shard.mul_(1.0 / self.world)
        else:
            grads = self._cut([p.grad for p in params])
            _params.copy_or_zero_(_params.piece_views(self.local, self._pieces), grads)
        return self.local

    def _cut(self, tensors: list[Tensor | None]) -> list[Tensor | None]:
        """This rank's pieces of the flattened ``tensors`` (parameters or grads; None stays)."""
        return [None if tensors[i] is None else tensors[i].reshape(-1)[a:b] for i, a, b in self._pieces]

    def write_local(self, params: list[Tensor]) -> None:
        """``params <- `` every rank's ``buffer``, all-gathered."""
        _collectives.all_gather_single(self.flat, self.shard, group=self.group)
        with torch.no_grad():
            torch._foreach_copy_([p.detach() for p in params], self.flat_views)

    def comm_bytes(self, K: int) -> CommBytes:
        padded = 4 * self.flat.numel()
        return CommBytes(gradients=padded if self.average_gradients else 0, coordinates=4 * K,
                         weights=padded)  # fmt: skip

    def project_grads(self, params: list[Tensor], basis: Tensor, scales: Tensor, backend: str) -> Tensor:
        """``P^T g`` (fp32 [K], the same on every rank): each rank's ``P_r^T g_r``, all-reduced.

        Averaging: the reduce-scatter leaves the mean gradient of this shard in ``shard``, which
        ``project`` reads. Under DDP (averaged already): ``twa::project_grads`` on the pieces of
        the parameters in this shard, which the fused Triton kernel reads in place (the other
        backends copy them into ``shard`` first).
        """
        if self.average_gradients:
            return self.project(basis, scales, self.local_gradient(params), backend)
        pieces, grads = self._cut([p.detach() for p in params]), self._cut([p.grad for p in params])
        return _collectives.all_reduce_(
            _ops.project_grads(pieces, grads, self.local, basis, scales, None, backend), self.group
        )

    def write_weights(
        self, params: list[Tensor], w0: Tensor, basis: Tensor, scales: Tensor, coef: Tensor,
        segments: list[int] | None, backend: str,
    ) -> None:  # fmt: skip
        """``params <- w0 + P coef``: this rank's shard (``twa::reconstruct_``; with
        ``segments``, ``twa::write_params_`` on its pieces, each taking its parameter's row),
        then an all-gather of all of them."""
        if segments is None:
            _ops.reconstruct_(self.local, w0, basis, scales, coef, backend)
        else:
            _ops.write_params_(self._local_pieces, self.local, w0, basis, scales, coef,
                               self._piece_segments(segments), backend)  # fmt: skip
        self.write_local(params)

    def _piece_segments(self, segments: list[int]) -> list[int]:
        """The coefficient row of each of this rank's pieces (that of its parameter)."""
        return [segments[i] for i, _, _ in self._pieces]

    def project_block_grads(self, params: list[Tensor], basis: Tensor, scales: Tensor, blocks, backend: str):
        """This rank's unnormalised ``P_l^T g_l`` [L, K] (``twa::project_grads`` per row): of the
        averaged shard's pieces, or (under DDP) of the grads' pieces read in place."""
        if self.average_gradients:
            self.local_gradient(params)
            pieces = grads = self._local_pieces
        else:
            pieces, grads = self._cut([p.detach() for p in params]), self._cut([p.grad for p in params])
        rows = _ops.project_grads(pieces, grads, self.local, basis, scales,
                                  self._piece_segments(blocks.segments), backend)  # fmt: skip
        return _full_rows(rows, blocks.coef.shape[0])

    def log_comm(self, K: int, D: int) -> None:
        """On rank 0: the bytes of one step, beside the published scheme's extra all-reduce."""
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


class FSDPStep(_GroupStep):
    """The step on an FSDP2 model: each rank's basis covers its local parameter shards.

    FSDP2's backward leaves each rank the averaged gradient of its shards, and its next forward
    gathers the weights, so the step adds one collective of its own: the all-reduce of the K
    coordinate gradients. Each rank projects its local gradients (``twa::project_grads``, the
    fused step's gradient kernel on Triton), takes the same K-dimensional step as every other
    rank and writes its local shards in place.
    """

    average_gradients = False

    def __init__(self, subspace: Subspace) -> None:
        self.group = subspace.process_group
        self.world, self.me = _collectives.world_and_rank(self.group)
        self.pieces = subspace.pieces
        self.local = torch.zeros(subspace.local_numel, dtype=torch.float32, device=subspace.device)
        self.log_comm(subspace.rank, subspace.dim)

    def comm_bytes(self, K: int) -> CommBytes:
        return CommBytes(gradients=0, coordinates=4 * K, weights=0)

    def _shards(self, tensors: list[Tensor | None]) -> list[Tensor | None]:
        """The local shards of ``tensors`` (DTensors: parameters or their gradients), flat."""
        return [None if t is None else _params.local_tensor(t).reshape(-1) for t in tensors]

    def project_grads(self, params: list[Tensor], basis: Tensor, scales: Tensor, backend: str) -> Tensor:
        """``P^T g`` (fp32 [K], the same on every rank): the local shards' sums, all-reduced."""
        grads = self._shards([p.grad for p in params])
        local = _ops.project_grads(self._shards(params), grads, self.local, basis, scales, None, backend)
        return _collectives.all_reduce_(local, self.group)

    def write_weights(
        self, params: list[Tensor], w0: Tensor, basis: Tensor, scales: Tensor, coef: Tensor,
        segments: list[int] | None, backend: str,
    ) -> None:  # fmt: skip
        """The local shards of ``params <- w0 + P coef``, in place (no collective; FSDP2's next
        all-gather spreads them): ``twa::write_params_`` on the shards, one launch on Triton and
        CUDA."""
        shards = self._shards([p.detach() for p in params])
        _ops.write_params_(shards, self.local, w0, basis, scales, coef, segments, backend)

    def project_block_grads(self, params: list[Tensor], basis: Tensor, scales: Tensor, blocks, backend: str):
        """The local shards' unnormalised ``P_l^T g_l`` [L, K] (``twa::project_grads`` per row)."""
        grads = self._shards([p.grad for p in params])
        return _ops.project_grads(self._shards(params), grads, self.local, basis, scales, blocks.segments,
                                  backend)  # fmt: skip

    def log_comm(self, K: int, D: int) -> None:
        if self.me == 0:
            logger.info(
                "TWA on an FSDP2 model over %d ranks (D=%d, K=%d): per step one all-reduce of %s of "
                "coordinates beside FSDP2's own collectives",
                self.world, D, K, _fmt(4 * K),
            )  # fmt: skip


def _full_rows(rows: Tensor, L: int) -> Tensor:
    """``rows`` [r, K] (the rows up to this rank's last piece's) padded with zero rows to [L, K]."""
    if rows.shape[0] == L:
        return rows
    return torch.cat([rows, rows.new_zeros(L - rows.shape[0], rows.shape[1])])


def _fmt(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    exponent = min(int(math.log(n, 1024)), 3)
    return f"{n / 1024**exponent:.1f} {('B', 'KiB', 'MiB', 'GiB')[exponent]}"


def wrapped_by_ddp(params) -> bool:
    """True when ``params`` is a ``DistributedDataParallel`` module (its backward averages)."""
    return isinstance(params, torch.nn.parallel.DistributedDataParallel)
