"""``Subspace``: the span of weight samples, built one sample at a time during training.

The basis P (K columns of length D, stored basis-major as ``basis`` [max_rank, D] in fp16 by
default, one fp32 scale per column) spans the raw samples w_1, ..., w_n, as the published TWA
code's does, but is built from differences to an fp32 anchor (the first sample, kept exactly):

    column 0 = w_1 / ||w_1||,  then each  w_i - w_1  orthogonalised (CGS2) against the columns.

span{w_1, w_i - w_1} is the span of the raw samples, but rounding the stored columns then costs
an error proportional to the differences (about 1% of the weights along a trajectory) instead of
the weights: measured on trajectory-like samples (D = 10^6, 50 samples), every sample is
reproduced within 1e-4 (fp16) of its distance from the mean instead of 3.5e-2 for raw columns.

The coefficients of each sample's difference on the columns (a triangular factor R) are kept, so
weights inside the span can be written as combinations of the samples (``TWA.coefficients``).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _backend, _collectives, _layout, _ops, _params, _state, distributed, ops, reference
from ._params import ParamLayout, trainable

STORAGE_DTYPES = _ops.STORAGE_DTYPES


# int8 with one scale per 64 values: a step of 1/127 of each block's largest entry.
INT8_TOL = 2.0**-6


def default_tol(dtype: torch.dtype) -> float:
    """Relative residual below which a sample adds no column: the storage dtype's epsilon
    (int8: ``INT8_TOL``, 1/64).

    A sample inside the span still shows a residual of the order of the columns' rounding
    (fp16: 2.8e-4 rms relative; int8: about 6e-3), so a smaller threshold would add columns of
    rounding noise.
    """
    return INT8_TOL if dtype == torch.int8 else torch.finfo(dtype).eps


class Subspace:
    """The span of parameter samples, kept as a scaled low-precision orthonormal basis.

    Args:
        params: an ``nn.Module`` (its ``requires_grad`` parameters, with their names, which
            ``from_checkpoints`` needs), ``named_parameters()`` or an iterable of tensors; all
            on one device. An FSDP2 model (``fully_shard``: DTensor parameters sharded along
            dim 0 on a 1-D mesh) gives each rank a basis over its local shards; construction,
            ``add()`` and ``gram()`` are then collectives of the mesh's group (see
            ``twa_kernels.distributed``).
        max_rank: the most columns the basis can hold (storage is allocated up front:
            ``max_rank * D`` values of ``dtype``).
        dtype: storage of the basis: ``torch.float16`` (default), ``torch.bfloat16``,
            ``torch.float32`` (one fp32 scale per column), or ``torch.int8`` (one fp32 scale per
            64 values of a column: 1.06 bytes per value, half of fp16; samples reproduced to
            about 1e-2 of their distance from the mean instead of 2e-4). Arithmetic is always
            fp32 or wider.
        tol: relative residual (``||remainder|| / ||w_i - w_1||``) at or below which a sample
            adds no column (it still counts in the mean). Default: ``finfo(dtype).eps``.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"`` for ``orthogonalize_``.
        process_group: a ``torch.distributed`` group (e.g. ``torch.distributed.group.WORLD``)
            to shard the basis, anchor and mean along D across its ranks (see
            ``twa_kernels.distributed``); None (default) keeps everything on this process. With a
            group, construction, ``add()``, ``gram()`` and ``load_state_dict()`` are collectives
            (every rank calls them, in the same order, with the same model); ranks that disagree
            on the layout, ``max_rank``, ``dtype`` or ``tol`` raise ``ValueError`` together.

    Attributes:
        basis: [max_rank, n] (rows 128-byte aligned, see ``ops.empty_basis``); columns [0, rank)
            are valid. scales: fp32 [max_rank], or [max_rank, ceil(n / 64)] for int8 (its
            blocks start at the shard's first value, so each rank keeps its own).
        anchor: fp32 [n], the first sample. mean: fp32 [n], the running mean of the samples.
        rank: number of basis columns. num_samples: number of samples added.
        shard: ``(start, stop)``, the range of the D flat values held here (n = stop - start):
            ``(0, D)`` without a process group, about D / world values per rank with one; None
            on an FSDP2 model, whose local shards are not one range.
        pieces: ``[(parameter index, begin, end), ...]``: the flattened parameters' values held
            here, in the order of the basis columns (n values in all).

    Example::

        space = Subspace(model, max_rank=64)
        for epoch in range(E):
            train_one_epoch(model)
            space.add()                # snapshot the current parameters
    """

    def __init__(
        self,
        params: Iterable[Tensor] | nn.Module,
        max_rank: int,
        dtype: torch.dtype = torch.float16,
        process_group: dist.ProcessGroup | None = None,
        *,
        tol: float | None = None,
        backend: str = "auto",
    ) -> None:
        tensors, names = trainable(params)
        if not tensors:
            raise ValueError("params has no tensor with requires_grad=True")
        for i, p in enumerate(tensors):
            if not p.dtype.is_floating_point:
                raise ValueError(f"params[{i}] has dtype {p.dtype}; only floating params train")
        devices = {p.device for p in tensors}
        if len(devices) != 1:
            raise ValueError(f"params must all be on one device, got {sorted(map(str, devices))}")
        if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
            raise ValueError(f"max_rank must be a positive int, got {max_rank!r}")
        if max_rank > _ops.MAX_RANK:
            raise ValueError(
                f"max_rank={max_rank} is above the largest supported rank, MAX_RANK = {_ops.MAX_RANK}"
            )
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be float16, bfloat16, float32 or int8, got {dtype}")
        if tol is not None and not (0 <= tol < 1):
            raise ValueError(f"tol must be in [0, 1), got {tol!r}")
        _backend.check_backend_name(backend)

        self.layout = ParamLayout.of(tensors, names)
        self.device = devices.pop()
        self.dtype = dtype
        self.max_rank = max_rank
        self.tol = default_tol(dtype) if tol is None else float(tol)
        self.backend = backend
        self._params = tensors
        D = self.layout.numel
        # FSDP2: DTensor parameters, each rank holding dim-0 shards; the basis covers those.
        self.fsdp = _fsdp_parameters(tensors, self.layout, process_group)
        self.shard = (0, D)
        self.world_size = 1
        self.pieces = [(i, 0, n) for i, n in enumerate(self.layout.numels)]
        if self.fsdp:
            self.pieces, process_group = _params.dtensor_pieces(tensors, self.layout)
            self.shard = None
        self.process_group = process_group
        if process_group is not None:
            _collectives.check_same_layout(self.layout, max_rank, dtype, self.tol, process_group, self.device)
            self.world_size, group_rank = _collectives.world_and_rank(process_group)
        if process_group is not None and not self.fsdp:
            self.shard = _collectives.shard_range(D, self.world_size, group_rank)
            self.pieces = _params.shard_pieces(self.layout, *self.shard)
        if self.fsdp:
            _collectives.check_together(
                lambda: _check_holds_values(self.pieces, group_rank), process_group, self.device, "Subspace()"
            )
        n = sum(b - a for _, a, b in self.pieces)
        # Where each piece of the local values starts, here and in the flat [D] vector.
        local_starts, at = [], 0
        for _, a, b in self.pieces:
            local_starts.append(at)
            at += b - a
        self._local_starts = torch.tensor(local_starts, dtype=torch.int64, device=self.device)
        self._flat_starts = torch.tensor(
            [self.layout.offsets[i] + a for i, a, _ in self.pieces], dtype=torch.int64, device=self.device
        )
        self.basis = ops.empty_basis(max_rank, n, dtype, self.device)
        self.scales = ops.empty_scales(max_rank, n, dtype, self.device)
        self.anchor = torch.zeros(n, dtype=torch.float32, device=self.device)
        self.mean = torch.zeros(n, dtype=torch.float32, device=self.device)
        self.rank = 0
        self.num_samples = 0
        # Coordinates of each sample on the columns: w_1 = P r_1, w_i - w_1 = P r_i (i > 1),
        # up to the rounding of the stored columns. Column i has the rank at its addition.
        self._coords: list[Tensor] = []
        # Bumped by every change; an optimizer built on an older version refuses to step.
        self.version = 0
        self._gram: Tensor | None = None

    # ------------------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """D, the number of trainable values."""
        return self.layout.numel

    @property
    def local_numel(self) -> int:
        """n, the number of values held here (D without a process group)."""
        return self.anchor.numel()

    @property
    def sharding(self) -> tuple[list, int] | None:
        """``(what this process holds, world size)``: ``[start, stop]`` of the flat values with a
        process group, ``[[parameter, begin, end], ...]`` (its local shards) on an FSDP2 model;
        None without either."""
        if self.process_group is None:
            return None
        held = [list(p) for p in self.pieces] if self.fsdp else list(self.shard)
        return held, self.world_size

    @property
    def columns(self) -> tuple[Tensor, Tensor]:
        """``(basis[:rank], scales[:rank])``: the valid part of the basis."""
        return self.basis[: self.rank], self.scales[: self.rank]

    def _sample(self, values: Sequence[Tensor] | None) -> list[Tensor]:
        """The parameters, or ``values`` checked against the layout, as detached tensors."""
        if values is None:
            return [p.detach() for p in self._params]
        if isinstance(values, Tensor) or not isinstance(values, Sequence):
            raise TypeError("values must be a list of tensors in parameter order")
        for i, v in enumerate(values):
            if not isinstance(v, Tensor):
                raise TypeError(f"values[{i}] is a {type(v).__name__}, expected a Tensor")
        if len(values) != len(self.layout.shapes):
            raise ValueError(f"values has {len(values)} tensors, the subspace has {len(self.layout.shapes)}")
        for i, (v, shape) in enumerate(zip(values, self.layout.shapes, strict=True)):
            if tuple(v.shape) != shape:
                raise ValueError(f"values[{i}] has shape {tuple(v.shape)}, expected {shape}")
            if not v.dtype.is_floating_point:
                raise ValueError(f"values[{i}] has dtype {v.dtype}, expected floating point")
        return [v.detach() for v in values]

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """``tensors`` (in parameter order, shaped like the parameters; on an FSDP2 model
        DTensors or whole tensors) as one new fp32 tensor of the values held here, [n] (all D
        without a process group)."""
        if self.process_group is not None:
            return _params.flatten_pieces(tensors, self.pieces, self.device)
        flat = torch.empty(self.dim, dtype=torch.float32, device=self.device)
        torch._foreach_copy_(self.layout.views(flat), list(tensors))
        return flat

    def _first_non_finite(self, flat: Tensor, v: Tensor) -> Tensor:
        """fp64 scalar on the device: ``2 j + isnan`` for the first non-finite value j of the
        whole sample (over all ranks), ``2 D`` when it is finite; zeroes those values of ``v``.

        Read on the host together with the result of the orthogonalisation (the one sync of
        ``add()``); the zeroed ``v`` keeps nan/inf out of the passes, whose result is then dropped.
        """
        bad = torch.isfinite(flat).logical_not_()
        j = bad.to(torch.uint8).argmax()  # the first maximum: the first non-finite value
        nan = flat.index_select(0, j.view(1)).isnan()
        piece = torch.searchsorted(self._local_starts, j.view(1), right=True) - 1
        flat_j = self._flat_starts[piece] + (j - self._local_starts[piece])
        code = torch.where(bad.any(), 2 * flat_j[0] + nan, 2 * self.dim)
        # Zeroes nothing in a finite sample; a non-finite one is refused and v dropped.
        v.masked_fill_(bad, 0.0)
        if self.process_group is not None:
            _collectives.all_reduce_(code, self.process_group, dist.ReduceOp.MIN)
        return code.to(torch.float64)

    @torch.no_grad()
    def add(self, values: Sequence[Tensor] | None = None) -> float:
        """Add a sample: the current parameters, or ``values`` (tensors in parameter order).

        Returns the relative residual ``||remainder|| / ||w - w_1||`` (1.0 for the first
        sample): how much of the sample was new. At or below ``tol`` the sample adds no column
        but still counts in the mean. Raises ``ValueError``, changing nothing, when a new column
        is needed and the basis already has ``max_rank``, and when the sample holds nan or inf
        (the message names the first such parameter). The finiteness check runs on the device
        and is read back with the orthogonalisation's result: one host synchronisation in all.

        With a process group each rank passes the same sample (the replicated parameters) and
        keeps its shard; the residual and the decision are the same on every rank.
        """
        flat = self.flatten(self._sample(values))
        first = self.num_samples == 0
        v = flat if first else flat - self.anchor
        non_finite = self._first_non_finite(flat, v)
        if self.process_group is None:
            out = _ops.orthogonalize_(self.basis, self.scales, v, self.rank, self.backend)
        else:
            out = distributed.orthogonalize_(
                self.basis, self.scales, v, self.rank, self.process_group, self.backend
            )
        out = torch.cat([out, non_finite.to(out.device)]).cpu()
        code = int(out[-1])
        if code < 2 * self.dim:
            where = self.layout.describe(self.layout.parameter_at(code // 2))
            raise ValueError(
                f"the sample is not finite: {where} holds {'nan' if code % 2 else 'inf'} "
                f"(flat index {code // 2} of D={self.dim}); nothing was added"
            )
        coords, norm, vnorm = out[: self.rank], float(out[-3]), float(out[-2])
        residual = norm / vnorm if vnorm > 0 else 0.0
        grows = vnorm > 0 and (first or residual > self.tol)
        if grows and self.rank == self.max_rank:
            raise ValueError(
                f"max_rank={self.max_rank} exceeded: the sample adds a new direction "
                f"(relative residual {residual:.3g} > tol {self.tol:.3g})"
            )
        if first:
            self.anchor.copy_(flat)
        if grows:
            coords = torch.cat([coords, torch.tensor([norm], dtype=torch.float64)])
            self.rank += 1
        self._coords.append(coords)
        self.num_samples += 1
        self.mean.add_(flat - self.mean, alpha=1.0 / self.num_samples)
        self.version += 1
        self._gram = None
        return residual if not first else 1.0

    @classmethod
    def from_checkpoints(
        cls,
        model: nn.Module,
        paths: str | os.PathLike | Iterable[str | os.PathLike],
        max_rank: int,
        dtype: torch.dtype = torch.float16,
        *,
        key: str | None = None,
        **kwargs,
    ) -> Subspace:
        """Build a subspace from saved checkpoints, read one at a time.

        ``paths`` is one path (``str`` or ``os.PathLike``) or a list of them, in sample order.
        Each file holds a state dict of ``model`` (as ``torch.save(model.state_dict(), path)``
        writes; under ``key`` when given, e.g. ``"state_dict"``). Names are matched without the
        ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (``torch.compile``) prefixes, on the
        checkpoint's side and on ``model``'s. Files are memory-mapped and dropped after use, so
        host memory beyond the basis stays O(D). A checkpoint whose parameters hold nan or inf
        raises ``ValueError`` naming the file and the parameter.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module (names match the files), got {type(model).__name__}")
        paths = _checkpoint_paths(paths)
        space = cls(model, max_rank, dtype, **kwargs)
        names = [_params.unwrapped_name(n) for n in space.layout.names]
        for path in paths:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if key is not None:
                if key not in state:
                    raise KeyError(f"{os.fspath(path)}: no key {key!r} (keys: {list(state)[:8]})")
                state = state[key]
            by_name = _params.by_unwrapped_name(state, path)
            missing = [n for n in names if n not in by_name]
            if missing:
                raise KeyError(f"{os.fspath(path)}: no parameter {missing[0]!r} in the checkpoint")
            try:
                space.add([by_name[n] for n in names])
            except ValueError as e:
                raise ValueError(f"{os.fspath(path)}: {e}") from e
            del state, by_name
        return space

    # ------------------------------------------------------------------------------------------

    def gram(self) -> Tensor:
        """``P^T P`` of the stored columns, fp64 [rank, rank] on the device (cached)."""
        if self.rank == 0:
            raise ValueError("the subspace is empty: call add() first")
        if self._gram is None:
            gram = reference.gram(*self.columns)
            if self.process_group is not None:
                _collectives.all_reduce_(gram, self.process_group)
            self._gram = gram
        return self._gram

    @torch.no_grad()
    def write_average_(
        self, params: Iterable[Tensor] | nn.Module, coefficients: Tensor | Sequence[float] | None = None
    ) -> None:
        """Write the mean of the samples (SWA), or ``sum_i coefficients[i] * w_i``, into ``params``.

        Args:
            params: the parameters the subspace describes (a module, ``named_parameters()`` or
                tensors in parameter order); each is written in its own dtype.
            coefficients: None for the plain mean (the exact fp32 running mean), or
                ``[num_samples]`` numbers, e.g. ``TWA.coefficients()`` (fp64).

        A combination is ``(sum_i c_i) w_1 + P beta`` with ``beta = sum_{i>1} c_i r_i`` (r_i the
        coordinates of ``w_i - w_1``): the first sample enters exactly, the others to the
        storage's rounding of their differences to it. Everything is checked before anything
        is written. With a process group: a collective (an all-gather of D fp32 values).
        """
        if self.num_samples == 0:
            raise ValueError("the subspace has no sample: call add() first")
        tensors, _ = trainable(params)
        self.layout.check_params(tensors, self.device, "params")
        if self.fsdp and not all(map(_params.is_dtensor, tensors)):
            raise ValueError("params must be the FSDP2 (DTensor) parameters the subspace was built on")
        if coefficients is None:
            local = self.mean
        else:
            c = _coefficient_vector(coefficients, self.num_samples)
            beta = torch.zeros(self.rank, dtype=torch.float64)
            for ci, r in zip(c[1:].tolist(), self._coords[1:], strict=True):
                beta[: r.numel()] += ci * r
            local = torch.empty_like(self.anchor)
            w0 = self.anchor * float(c.sum())
            alpha = beta.to(torch.float32).to(self.device)
            _ops.reconstruct_(local, w0, *self.columns, alpha, self.backend)
        if self.fsdp:  # each rank writes its own shards; FSDP2's all-gather spreads them
            dest = [_params.local_tensor(tensors[i].detach()).reshape(-1) for i, _, _ in self.pieces]
            torch._foreach_copy_(dest, _params.piece_views(local, self.pieces))
            return
        flat = (
            local
            if self.process_group is None
            else _collectives.all_gather_flat(local, self.dim, self.process_group)
        )
        torch._foreach_copy_([p.detach() for p in tensors], self.layout.views(flat))

    def sample_coordinates(self) -> Tensor:
        """fp64 [rank, num_samples] on the CPU: column i holds c_i with ``w_i ~ P c_i``."""
        R = torch.zeros(self.rank, self.num_samples, dtype=torch.float64)
        for i, c in enumerate(self._coords):
            R[: c.numel(), i] = c
        if self.num_samples > 1:
            R[:, 1:] += R[:, :1]  # w_i = w_1 + (w_i - w_1)
        return R

    def state_dict(self) -> dict:
        """Everything needed to rebuild the subspace; loads with ``weights_only=True``.

        With a process group it holds this rank's shard (``"shard"``: [start, stop], with
        ``"world_size"``): save one file per rank and load each into the same rank of a group of
        the same size.
        """
        basis, scales = self.columns
        sharded = {}
        if self.sharding is not None:
            sharded["shard"], sharded["world_size"] = self.sharding
        return {
            **sharded,
            "layout": self.layout.signature(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "max_rank": self.max_rank,
            "tol": self.tol,
            "rank": self.rank,
            "num_samples": self.num_samples,
            "basis": basis.clone(),
            "scales": scales.clone(),
            "anchor": self.anchor.clone(),
            "mean": self.mean.clone(),
            "coords": [c.clone() for c in self._coords],
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a ``state_dict()``.

        Every entry is checked first (keys, layout, storage dtype, shapes, dtypes, rank against
        ``max_rank``, scales and sample coordinates against the rank, finite values); any
        mismatch raises ``ValueError`` and changes nothing. A sharded subspace loads only the
        shard saved by the same rank of a group of the same size; if any rank refuses its state
        dict, every rank raises. An optimizer built on this subspace must be rebuilt afterwards.
        """
        group = self.process_group
        _collectives.check_together(lambda: self._check_state(state), group, self.device, "load_state_dict")
        if group is not None:
            _collectives.check_same_state(state, group, self.device)
        rank = int(state["rank"])
        self.basis[:rank].copy_(state["basis"])
        self.scales.zero_()
        self.scales[:rank].copy_(state["scales"])
        self.anchor.copy_(state["anchor"])
        self.mean.copy_(state["mean"])
        self._coords = [c.to(torch.float64).cpu().clone() for c in state["coords"]]
        self.rank = rank
        self.num_samples = int(state["num_samples"])
        self.tol = float(state["tol"])
        self.version += 1
        self._gram = None

    def _check_state(self, state: Mapping) -> None:
        """Raise ``ValueError`` unless ``state`` is a complete, consistent state of this subspace."""
        what = "subspace state dict"
        _state.require_keys(
            state, {"layout", "dtype", "rank", "num_samples", "basis", "scales", "anchor", "mean",
                    "coords", "tol"}, what,
        )  # fmt: skip
        self.layout.check_signature(state["layout"], "state dict")
        if state["dtype"] != str(self.dtype).removeprefix("torch."):
            raise ValueError(f"state dict stores a {state['dtype']} basis, this subspace {self.dtype}")
        rank = _state.int_entry(state, "rank", 0, None, what)
        if rank > self.max_rank:
            raise ValueError(f"state dict has rank {rank} > this subspace's max_rank {self.max_rank}")
        num_samples = _state.int_entry(state, "num_samples", rank, None, what)
        tol = state["tol"]
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 <= tol < 1:
            raise ValueError(f"{what} entry 'tol' must be a number in [0, 1), got {tol!r}")
        self._check_shard(state)
        n = self.local_numel
        _state.tensor_entry(state["basis"], "basis", (rank, n), self.dtype, what)
        scales_shape = _layout.scales_shape(rank, n, self.dtype)
        _state.tensor_entry(state["scales"], "scales", scales_shape, torch.float32, what)
        _state.tensor_entry(state["anchor"], "anchor", (n,), torch.float32, what)
        _state.tensor_entry(state["mean"], "mean", (n,), torch.float32, what)
        coords = state["coords"]
        if not isinstance(coords, (list, tuple)) or len(coords) != num_samples:
            got = len(coords) if isinstance(coords, (list, tuple)) else type(coords).__name__
            raise ValueError(
                f"{what} entry 'coords' must be a list of num_samples={num_samples} tensors, got {got}"
            )
        # Sample i has the coordinates on the columns that existed after it was added: as many
        # as before it, or one more when it added a column; the last has all `rank` of them.
        columns = 0
        for i, c in enumerate(coords):
            if not isinstance(c, Tensor) or c.dim() != 1 or c.numel() not in (columns, columns + 1):
                shape = tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__
                raise ValueError(
                    f"{what} entry 'coords'[{i}] has shape {shape}, expected ({columns},) or "
                    f"({columns + 1},): the coordinates do not match the sample order"
                )
            _state.tensor_entry(c, f"coords[{i}]", (c.numel(),), None, what)
            columns = c.numel()
        if columns != rank:
            raise ValueError(f"{what} has rank {rank} but its sample coordinates span {columns} columns")

    def _check_shard(self, state: Mapping) -> None:
        theirs = None
        if state.get("shard") is not None:
            theirs = (_plain(state["shard"]), int(state["world_size"]))
        if theirs == self.sharding:
            return
        raise ValueError(
            f"state dict holds {describe_sharding(theirs, self.dim)}; this subspace holds "
            f"{describe_sharding(self.sharding, self.dim)}: load sharded state dicts into a process "
            f"group of the same size, each rank its own file"
        )

    def __getstate__(self) -> dict:
        if self.process_group is not None:
            raise TypeError(
                "a Subspace with a process group cannot be copied or pickled (its process group "
                "cannot): save state_dict() on every rank instead"
            )
        return self.__dict__.copy()

    def __repr__(self) -> str:
        shard = ""
        if self.fsdp:
            shard = f", FSDP2 shards ({self.local_numel} values here) of {self.world_size}"
        elif self.process_group is not None:
            shard = f", shard=[{self.shard[0]}, {self.shard[1]}) of {self.world_size}"
        return (
            f"Subspace(D={self.dim}, rank={self.rank}/{self.max_rank}, "
            f"samples={self.num_samples}, dtype={self.dtype}, backend={self.backend!r}, "
            f"device={self.device}{shard})"
        )


def _fsdp_parameters(tensors: list[Tensor], layout: ParamLayout, process_group) -> bool:
    """True when ``tensors`` are FSDP2's DTensor parameters (all of them); ``ValueError`` for a
    mix of DTensor and plain trainable tensors, or a ``process_group`` given with DTensors."""
    dtensors = [_params.is_dtensor(p) for p in tensors]
    if not any(dtensors):
        return False
    if not all(dtensors):
        i = dtensors.index(False)
        raise ValueError(
            f"{layout.describe(i)} is a plain tensor among FSDP2 (DTensor) parameters: the basis "
            "follows each rank's shards, so shard every trainable parameter with fully_shard "
            "(or set requires_grad=False on the others)"
        )
    if process_group is not None:
        raise ValueError(
            "process_group shards the basis of a replicated (DDP) model; an FSDP2 model's subspace "
            "follows its parameters' own sharding: pass no process_group"
        )
    return True


def _check_holds_values(pieces, rank: int) -> None:
    if sum(b - a for _, a, b in pieces) == 0:
        raise ValueError(
            f"rank {rank} holds none of the trainable values: no parameter has enough dim-0 rows "
            "to give it a shard, and TWA needs at least one value on each rank"
        )


def _plain(held):
    """A saved ``sharding`` entry as plain ints (``[start, stop]`` or ``[[i, a, b], ...]``)."""
    return [_plain(x) if isinstance(x, (list, tuple)) else int(x) for x in held]


def describe_sharding(sharding, D: int) -> str:
    """How errors name what a subspace (or a state dict of one) holds; see ``Subspace.sharding``."""
    if sharding is None:
        return "the whole subspace (no process group)"
    held, world = sharding
    if held and isinstance(held[0], list):
        n = sum(b - a for _, a, b in held)
        return f"the local shards ({n} values) of one rank of an FSDP2 model over {world} processes"
    return f"columns [{held[0]}, {held[1]}) of D={D}, one shard of a subspace sharded over {world} processes"


def _coefficient_vector(coefficients, n: int) -> Tensor:
    """``coefficients`` as a finite fp64 [n] tensor on the CPU; ``TypeError``/``ValueError`` else."""
    if isinstance(coefficients, (str, bytes)) or not isinstance(coefficients, (Tensor, Sequence)):
        raise TypeError(f"coefficients must be None, a tensor or a list of numbers, got {coefficients!r}")
    c = torch.as_tensor(coefficients).detach()
    if not (c.dtype.is_floating_point or c.dtype == torch.int64):
        raise TypeError(f"coefficients must be real numbers, got dtype {c.dtype}")
    if tuple(c.shape) != (n,):
        raise ValueError(f"coefficients must have shape ({n},), one per sample, got {tuple(c.shape)}")
    c = c.to(torch.float64).cpu()
    if not bool(torch.isfinite(c).all()):
        raise ValueError("coefficients hold nan or inf")
    return c


def _checkpoint_paths(paths) -> list:
    """One path or a list of paths, as a list; ``TypeError`` for anything else."""
    if isinstance(paths, (str, os.PathLike)):
        return [paths]
    if isinstance(paths, (bytes, Mapping)) or not isinstance(paths, Iterable):
        raise TypeError(f"paths must be a path (str or os.PathLike) or a list of them, got {paths!r}")
    paths = list(paths)
    for i, p in enumerate(paths):
        if not isinstance(p, (str, os.PathLike)):
            raise TypeError(f"paths[{i}] must be a str or os.PathLike, got {type(p).__name__}")
    return paths
