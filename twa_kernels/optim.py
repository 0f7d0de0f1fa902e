"""``TWA`` (SGD) and ``TWAAdamW``: training restricted to the span of the samples, as drop-in
``torch.optim.Optimizer``s."""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from . import _backend, _blocks, _collectives, _ops, _params, _state, _steps
from . import subspace as subspace_module
from ._params import trainable
from .subspace import Subspace

STARTS = ("mean", "current")


class TWA(torch.optim.Optimizer):
    r"""Trainable Weight Averaging: SGD on the coordinates of the weights in a sample subspace.

    The weights are ``w = w0 + P alpha`` with P the subspace's basis (K columns) and alpha the
    K trainable coordinates, 0 at the start. Each ``step()`` does, on the device:

    .. math::
        c &= P^T g \\
        d &= c + \lambda (P^T w_0 + G \alpha), \qquad G = P^T P \\
        b &\leftarrow d \text{ (first step)}, \quad \mu b + (1 - \tau) d \text{ (after)} \\
        \alpha &\leftarrow \alpha - \eta\,(d + \mu b \text{ if nesterov else } b) \\
        w &= w_0 + P \alpha

    which is ``torch.optim.SGD`` (momentum mu, dampening tau, L2 weight decay lambda on the
    full weights, lr eta) applied to the projected gradient ``P P^T g``, as the published TWA
    code does, with K numbers of state instead of D. Weights are recomputed from ``w0`` and
    ``alpha`` every step, never accumulated.

    Args:
        params: the parameters the subspace was built for (same order, shapes, dtypes, device),
            as an iterable, ``named_parameters()`` or an ``nn.Module``; or torch-style parameter
            groups (dicts with ``"params"``) holding the subspace's very tensors, each once, in
            any order or split. The groups share lr, momentum, dampening and nesterov (the K
            coordinates are one vector); ``weight_decay`` may differ per group (granularity
            "model"): the decay term is then ``sum_g wd_g P_g^T w_g``, from each group's Gram
            block and projection of w0 computed once, so a step costs what it did.
        subspace: a ``Subspace`` with at least one sample. Adding samples to it later is an
            error for this optimizer (build a new one).
        lr, momentum, dampening, weight_decay, nesterov: as ``torch.optim.SGD``. ``lr`` may be a
            number or a 0-dim floating tensor, as torch optimizers accept; a tensor on the device
            is read there by the step's kernels, so a ``torch.compile``d step is not recompiled
            when a scheduler changes it, and a step captured in a CUDA graph replays with the
            value the scheduler last wrote into it (a number is frozen into the graph).
        start: ``"mean"`` (the published choice: w0 = the mean of the samples) or ``"current"``
            (w0 = the current weights). Constructing the optimizer writes w0 into the params.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.
        granularity: ``"model"`` (default, the published TWA: one coordinate vector for all the
            weights), ``"tensor"`` (one per parameter tensor) or an int N (consecutive tensors
            grouped into blocks of at least N values), each block's columns divided by their
            norm on the block (the published follow-up; ``twa_kernels._blocks``). ``alpha`` is
            then [blocks, K] and ``coefficients()`` [blocks, num_samples]. Per-block
            coordinates run the plain-PyTorch per-block passes (warned once on CUDA); on a
            sharded subspace each rank's partial sums are all-reduced (L K floats per step).
        average_gradients: only for a subspace with a process group (data-parallel training,
            see ``twa_kernels.distributed``): whether ``step()`` averages the gradients over the
            ranks (a reduce-scatter of D fp32 values, which leaves each rank the mean of its
            shard). None (default): True, unless ``params`` is a ``DistributedDataParallel``
            module, whose backward has averaged them already. Pass False with
            ``ddp_model.parameters()``; True costs the reduce-scatter again but gives the same
            result. False with gradients that differ between ranks is wrong: each rank would
            project its own.

    On a sharded subspace each rank projects its shard of the gradient, one all-reduce of K
    floats gives ``c = P^T g``, the K-dimensional update runs identically on every rank, and each
    rank writes its shard of the weights; an all-gather of the weights updates the replicated
    parameters. ``comm_bytes_per_step`` gives the bytes. Construction, ``step()`` and
    ``load_state_dict()`` are then collectives.

    Drop-in step semantics (as ``torch.optim.SGD``):

    - A ``step()`` in which every parameter's ``.grad`` is None does nothing: no momentum, no
      decay, no weight write (Lightning's ``StochasticWeightAveraging`` relies on it). Some
      grads None count as zero gradients for those parameters.
    - Weights changed outside the optimizer since its last write (``model.load_state_dict``,
      ``p.copy_`` under ``no_grad``, ``p.detach().copy_``, ``p.data = t``, a callback) are seen
      from the parameters' version counters and storage addresses, without device work. The
      next ``step()`` warns once, naming the first such parameter, and continues from the edited
      weights as ``start="current"`` would: ``w0`` becomes the current weights and ``alpha`` 0;
      the momentum buffer is kept, as SGD keeps it. Writes through ``p.data`` (``p.data.add_``)
      bypass the version counter and cannot be seen: they are overwritten by the next step. On a
      sharded subspace every rank must make the same edits (the parameters are replicated).

    ``state_dict()`` carries a fingerprint of the basis (the small factor of sample coordinates,
    no pass over D): loading it into an optimizer on another basis raises ``ValueError``. A
    ``load_state_dict()`` that raises has changed nothing. ``copy.deepcopy((model, opt))`` and
    ``pickle`` give an optimizer that continues bit for bit like the original (not on a sharded
    subspace: its process group cannot be copied).

    Example::

        opt = TWA(model.parameters(), space, lr=2.0, momentum=0.9, weight_decay=1e-5)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        opt.coefficients()     # lambda with w = sum_i lambda_i w_i
    """

    def __init__(
        self,
        params: Iterable[Tensor] | nn.Module,
        subspace: Subspace,
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        start: str = "mean",
        backend: str = "auto",
        average_gradients: bool | None = None,
        granularity: str | int = "model",
    ) -> None:
        _check_hyperparameters(lr, momentum, dampening, weight_decay, nesterov)
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov,
        )  # fmt: skip
        self._setup(params, subspace, defaults, start, backend, average_gradients, granularity)

    def _setup(self, params, subspace, defaults, start, backend, average_gradients, granularity) -> None:
        """Everything but the hyperparameters' own checks (shared with ``TWAAdamW``)."""
        if not isinstance(subspace, Subspace):
            raise TypeError(f"subspace must be a twa_kernels.Subspace, got {type(subspace).__name__}")
        if start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {start!r}")
        if average_gradients is not None and not isinstance(average_gradients, bool):
            raise TypeError(f"average_gradients must be None or a bool, got {average_gradients!r}")
        _backend.check_backend_name(backend)
        if subspace.rank == 0:
            raise ValueError("subspace is empty (rank 0): call Subspace.add() before building TWA")
        ddp = _steps.wrapped_by_ddp(params)
        groups = None
        if isinstance(params, Iterable) and not isinstance(params, (Tensor, nn.Module)):
            params = list(params)
            if params and isinstance(params[0], Mapping):
                groups = params
        if groups is not None:
            tensors, groups, self._group_index = _grouped(groups, subspace)
        else:
            tensors, _ = trainable(params)
            self._group_index = [0] * len(tensors)
        _collectives.check_together(
            lambda: subspace.layout.check_params(tensors, subspace.device, "params"),
            subspace.process_group, subspace.device, "TWA()",
        )  # fmt: skip
        blocks = _params.coefficient_blocks(subspace.layout, granularity)
        # Per-block coordinates (any granularity but the published "model" one, and AdamW).
        self.granularity = granularity
        per_block = granularity != "model" or self._RULE != "sgd"

        self._building = True  # add_param_group is refused once built
        super().__init__(tensors if groups is None else groups, defaults)
        self._building = False
        self._ordered = tensors
        self.subspace = subspace
        self.start = start
        self.backend = backend
        self._version = subspace.version
        self.rank = subspace.rank
        device, K = subspace.device, subspace.rank

        self._step = _steps.make_step(subspace, tensors, average_gradients, ddp)
        self.average_gradients = self._step.average_gradients
        # w0 is the subspace's mean itself for start="mean" (never written here), else our own.
        self._w0 = subspace.mean if start == "mean" else subspace.flatten([p.detach() for p in tensors])
        self._blocks = None
        shape = (K,)
        if per_block:
            basis, scales = subspace.columns
            local = _blocks.local_blocks(blocks, subspace.pieces, subspace.layout)
            self._blocks = _blocks.BlockCoordinates(
                basis, scales, local, _params.block_segments(subspace.layout, blocks),
                normalise=granularity != "model", group=subspace.process_group,
            )  # fmt: skip
            shape = (len(blocks), K)
            self._gram = self._blocks.gram
        else:
            self._gram = subspace.gram().float()
        self._pw0 = self._project(self._w0)
        # Per-group weight decay: each group's Gram block and projection of w0 (several groups).
        self._group_decay = None
        if len(self.param_groups) > 1:
            self._group_decay = _GroupDecay(subspace, self._group_index, len(self.param_groups), self._w0)
        self._alpha = torch.zeros(shape, dtype=torch.float32, device=device)
        self._momentum_buffer = torch.zeros(shape, dtype=torch.float32, device=device)
        # AdamW's second moments (its first are the momentum buffer); unused by SGD.
        self._second_moment = torch.zeros(shape if self._RULE == "adamw" else (0,), device=device)
        # [steps taken, steps skipped because the gradient was not finite]
        self._counters = torch.zeros(2, dtype=torch.int64, device=device)
        # lr as the kernels read it: the group's tensor lr itself, or this scalar set from a number
        self._lr = torch.zeros((), dtype=torch.float32, device=device)
        self._lr_value = None
        self._shared_group()  # groups that disagree on the shared hyperparameters fail here
        self._write_weights()

    # ------------------------------------------------------------------------------------------

    @property
    def params(self) -> list[Tensor]:
        """The parameters in the subspace's order (across the param groups)."""
        return self._ordered

    @property
    def alpha(self) -> Tensor:
        """The K coordinates (fp32, on the device; a live view, do not modify)."""
        return self._alpha

    @property
    def skipped_steps(self) -> int:
        """How many steps were skipped because the gradient was not finite (reads the device)."""
        return int(self._counters[1])

    @property
    def steps(self) -> int:
        """How many steps were taken (reads the device)."""
        return int(self._counters[0])

    @property
    def comm_bytes_per_step(self) -> dict[str, int]:
        """Payload bytes of the collectives in one ``step()`` (all 0 without a process group).

        - ``"gradients"``: reduce-scatter of the flat fp32 gradient, ``4 * world * ceil(D / world)``
          (D padded to equal shards) when this optimizer averages the gradients, else 0;
        - ``"coordinates"``: all-reduce of the K fp32 coordinate gradients, ``4 * K``;
        - ``"weights"``: all-gather of the flat fp32 weights, ``4 * world * ceil(D / world)``.

        The published DDP scheme instead adds an all-reduce of ``4 * D`` bytes to DDP's own
        gradient all-reduce each step. With ring collectives, a reduce-scatter plus an all-gather
        send as much per rank as one all-reduce of the same size, so TWA without DDP costs a DDP
        step plus ``4 * K`` bytes, where the published scheme costs two DDP steps.
        """
        return self._step.comm_bytes(self.rank).as_dict()

    def _project(self, x: Tensor) -> Tensor:
        if self._blocks is not None:
            return self._blocks.project(*self.subspace.columns, x)
        return self._step.project(*self.subspace.columns, x, self.backend)

    def _write_weights(self) -> None:
        basis, scales = self.subspace.columns
        coef, segments = self._alpha, None
        if self._blocks is not None:
            coef, segments = self._blocks.coef, self._blocks.segments
            coef.copy_(self._alpha * self._blocks.inv_norms)
        backend = _ops.choose("write_params_", self.backend, basis)
        self._step.write_weights(self.params, self._w0, basis, scales, coef, segments, backend)
        self._remember_weights()

    @torch._dynamo.disable  # host bookkeeping: run as Python every call, never traced
    def _remember_weights(self) -> None:
        """Stamp each parameter (storage address, version counter) as this optimizer left it.

        Host-side attributes only: reading them costs no device work. The fused Triton step
        writes through raw pointers (no version bump); the other paths bump the counters with
        their copies, so the stamps are taken after every write.
        """
        self._weight_stamps = [_weight_stamp(p) for p in self.params]

    @torch._dynamo.disable  # host bookkeeping: run as Python every call, never traced
    def _edited_parameters(self) -> list[int]:
        """Indices of the parameters changed outside this optimizer since its last write."""
        return [
            i
            for i, (p, stamp) in enumerate(zip(self.params, self._weight_stamps, strict=True))
            if stamp != _weight_stamp(p)
        ]

    def _continue_from_current_weights(self, edited: list[int]) -> None:
        """Make the current weights the origin (``start="current"``): w0 = w, alpha = 0."""
        warnings.warn(
            f"TWA: {self.subspace.layout.describe(edited[0])} (and {len(edited) - 1} more "
            "parameters) changed outside the optimizer since its last write; continuing from "
            "the edited weights (w0 = the current weights, alpha = 0, momentum kept), as "
            'start="current" would',
            stacklevel=3,
        )
        w = self.subspace.flatten([p.detach() for p in self.params])
        if self._w0 is self.subspace.mean:
            self._w0 = w
        else:
            self._w0.copy_(w)  # in place: a captured CUDA graph keeps reading the same buffer
        self.start = "current"
        self._alpha.zero_()
        self._refresh_pw0()

    def _refresh_pw0(self) -> None:
        """``P^T w0`` (and each group's part of it) after w0 changed."""
        self._pw0.copy_(self._project(self._w0))
        if self._group_decay is not None:
            self._group_decay.refresh(self._w0)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One TWA step (see the class docstring). No host synchronisation."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.subspace.version != self._version:
            raise RuntimeError(
                "the subspace changed (add() or load_state_dict()) after this TWA optimizer was "
                "built: build a new optimizer on it"
            )
        if all(p.grad is None for p in self.params):
            return loss  # as torch.optim.SGD: no gradient, nothing to do
        edited = self._edited_parameters()
        if edited:
            self._continue_from_current_weights(edited)
        if self._blocks is not None:
            self._block_step()
            return loss
        hyper = self._hyperparameters()
        gram, pw0 = self._gram, self._pw0
        decays = self._group_weight_decays()
        if decays is not None:  # one step with the groups' decay terms summed: d = c + G' alpha + p'
            gram, pw0 = self._group_decay.terms(decays)
            hyper = dataclasses.replace(hyper, weight_decay=1.0)
        basis, scales = self.subspace.columns
        state = (self._w0, basis, scales, self._alpha, self._momentum_buffer, self._counters,
                 gram, pw0)  # fmt: skip
        self._step.step(self.params, *state, hyper, self.backend)
        self._remember_weights()
        return loss

    _RULE = "sgd"

    def _block_step(self) -> None:
        """One step of per-block coordinates: ``c_l = P_l^T g_l``, the rule's update of every
        ``a_l`` (skipped on the device when any ``c_l`` is not finite), the weights written: the
        fused per-block step (``twa::step_blocks_``) on one process, its three parts around an
        all-reduce of the [L, K] coordinate gradients when sharded."""
        basis, scales = self.subspace.columns
        state = (self._w0, basis, scales, self._alpha, self._momentum_buffer, self._second_moment,
                 self._counters, self._blocks, self._pw0)  # fmt: skip
        self._step.step_blocks(self.params, *state, self._block_hyperparameters(), self.backend)
        self._remember_weights()

    def _block_hyperparameters(self) -> _steps.BlockHyper:
        """``_hyperparameters`` as the per-block step takes them (SGD's rule)."""
        h = self._hyperparameters()
        return _steps.BlockHyper(h.lr, "sgd", h.momentum, h.dampening, h.weight_decay, h.nesterov)

    _HYPER_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov")

    def _check_group(self, group: dict, read_tensors: bool) -> None:
        _check_hyperparameters(
            group["lr"], group["momentum"], group["dampening"], group["weight_decay"], group["nesterov"],
            read_tensors=read_tensors,
        )  # fmt: skip

    def _group_weight_decays(self) -> tuple[float, ...] | None:
        """Each group's weight decay when they differ (None when one value serves all)."""
        decays = tuple(float(g["weight_decay"]) for g in self.param_groups)
        return decays if len(set(decays)) > 1 else None

    def _shared_group(self) -> dict:
        """The first group, after checking that every group has its hyperparameters (all but
        ``weight_decay``, which may differ per group for TWA): the K coordinates share them."""
        first = self.param_groups[0]
        shared = [k for k in self._HYPER_KEYS if k != "weight_decay" or self._blocks is not None]
        for g, group in enumerate(self.param_groups[1:], 1):
            for key in shared:
                a, b = first[key], group[key]
                same = a is b if isinstance(a, Tensor) or isinstance(b, Tensor) else a == b
                if not same:
                    raise ValueError(
                        f"param groups 0 and {g} have {key}={a!r} and {b!r}: the K coordinates share one "
                        f"{key} (a tensor lr: one tensor object for all groups); only weight_decay may "
                        "differ per group (granularity='model')"
                    )
        return first

    def _step_group(self) -> dict:
        """The shared group for a step, after checking every group's hyperparameters (without
        reading the device) and their agreement."""
        for group in self.param_groups:
            self._check_group(group, read_tensors=False)
        return self._shared_group()

    def _hyperparameters(self) -> _steps.Hyper:
        """The group's hyperparameters for this step, checked without reading the device.

        A tensor lr on the device is passed as is (the kernels read it); a number is written
        into this optimizer's own device scalar when it changes (no host sync either way).
        """
        group = self._step_group()
        return _steps.Hyper(
            self._lr_tensor(group), float(group["momentum"]), float(group["dampening"]),
            float(group["weight_decay"]), bool(group["nesterov"]),
        )  # fmt: skip

    def _lr_tensor(self, group: dict) -> Tensor:
        """The group's lr as a 0-dim fp32 device tensor, without reading the device."""
        lr = group["lr"]
        if isinstance(lr, Tensor):
            return _ops.lr_tensor(lr, self.subspace.device)
        if lr != self._lr_value:
            self._lr.fill_(lr)
            self._lr_value = lr
        return self._lr

    # ------------------------------------------------------------------------------------------

    def coefficients(self) -> Tensor:
        """Averaging coefficients: fp64 [num_samples] lambda with ``w = sum_i lambda_i w_i``.

        Exact for the current weights when ``start="mean"`` (w0 is the mean of the samples);
        with ``start="current"`` it describes the projection of the weights onto the span.
        The minimum-norm solution when samples were linearly dependent. Reads the device.
        """
        S = self.subspace.sample_coordinates()  # w_i ~ P S[:, i]
        n = S.shape[1]
        if self._blocks is not None:
            return self._block_coefficients(S)
        alpha = self._alpha.double().cpu()
        if self.start == "mean":
            lam0 = torch.full((n,), 1.0 / n, dtype=torch.float64)
        else:
            beta0 = torch.linalg.solve(self.subspace.gram().cpu(), self._pw0.double().cpu())
            lam0 = _min_norm_solve(S, beta0)
        return lam0 + _min_norm_solve(S, alpha)

    def _block_coefficients(self, S: Tensor) -> Tensor:
        """fp64 [L, num_samples]: ``w[S_l] = sum_i lambda[l, i] w_i[S_l]`` for every block (the
        blocks of ``granularity``; one row for TWAAdamW's "model")."""
        n = S.shape[1]
        inv = self._blocks.inv_norms.double().cpu()
        beta = self._alpha.double().cpu() * inv  # coefficients on the stored columns
        lam = torch.empty(beta.shape[0], n, dtype=torch.float64)
        for l, b in enumerate(beta):
            if self.start == "mean":
                lam0 = torch.full((n,), 1.0 / n, dtype=torch.float64)
            else:  # w0_l's least-squares coordinates on the block's stored columns
                raw = self._blocks.raw_gram[l].cpu()
                pw0 = self._pw0[l].double().cpu() / torch.where(inv[l] > 0, inv[l], 1.0)
                lam0 = _min_norm_solve(S, torch.linalg.lstsq(raw, pw0.unsqueeze(1)).solution.squeeze(1))
            lam[l] = lam0 + _min_norm_solve(S, b)
        return lam

    def __repr__(self) -> str:
        group = self.param_groups[0]
        hyper = ", ".join(f"{k}={group[k]!r}" for k in self._HYPER_KEYS)
        space = self.subspace
        return (
            f"{type(self).__name__}(rank={self.rank}, samples={space.num_samples}, D={space.dim}, "
            f"dtype={space.dtype}, start={self.start!r}, granularity={self.granularity!r}, "
            f"backend={self.backend!r}, {hyper})"
        )

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["twa"] = {
            "layout": self.subspace.layout.signature(),
            "rank": self.rank,
            "num_samples": self.subspace.num_samples,
            # Which basis the coordinates belong to: the sample coordinates (k x n, on the host).
            "basis_fingerprint": self.subspace.sample_coordinates(),
            "start": self.start,
            "granularity": self.granularity,
            "alpha": self._alpha.clone(),
            "momentum_buffer": self._momentum_buffer.clone(),
            "second_moment": self._second_moment.clone(),
            "counters": self._counters.clone(),
            "w0": self._w0.clone() if self.start == "current" else None,
        }
        if self.subspace.sharding is not None:
            state["twa"]["shard"], state["twa"]["world_size"] = self.subspace.sharding
        return state

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restore ``state_dict()`` and rewrite the weights from it.

        Every entry is checked first: the model, the subspace's rank, sample count and basis
        (its fingerprint), the shapes, dtypes and finiteness of the coordinates, momentum and
        origin, the hyperparameters. Any mismatch raises ``ValueError`` and changes nothing
        (hyperparameters, coordinates, weights). The saved ``start`` is adopted with its origin
        (an optimizer that continued from edited weights saves ``"current"``). On a sharded
        subspace each rank loads the state dict its rank saved, in a group of the same size; if
        one rank refuses, all raise.
        """
        state_dict = dict(state_dict)
        twa = _collectives.check_together(
            lambda: self._check_state(state_dict), self.subspace.process_group, self.subspace.device,
            "load_state_dict",
        )  # fmt: skip
        super().load_state_dict(state_dict)
        self._alpha.copy_(twa["alpha"])
        self._momentum_buffer.copy_(twa["momentum_buffer"])
        if twa.get("second_moment") is not None:
            self._second_moment.copy_(twa["second_moment"])
        self._counters.copy_(twa["counters"])
        if twa["start"] == "current":
            if self._w0 is self.subspace.mean:
                self._w0 = torch.empty_like(self.subspace.mean)
            self._w0.copy_(twa["w0"])
        else:
            self._w0 = self.subspace.mean
        self.start = twa["start"]
        self._refresh_pw0()
        self._write_weights()

    def _check_state(self, state_dict: dict) -> dict:
        """Pop and check the ``"twa"`` entry, check the rest; ``ValueError`` on any mismatch."""
        if "twa" not in state_dict:
            raise ValueError("state dict has no 'twa' entry: it is not from a TWA optimizer")
        twa = state_dict.pop("twa")
        what = "TWA state dict"
        _state.require_keys(state_dict, {"state", "param_groups"}, what)
        _state.require_keys(
            twa, {"layout", "rank", "num_samples", "start", "alpha", "momentum_buffer", "counters",
                  "w0"}, f"{what} entry 'twa'",
        )  # fmt: skip
        self.subspace.layout.check_signature(twa["layout"], "state dict")
        mine_shard = self.subspace.sharding
        theirs = None
        if twa.get("shard") is not None:
            theirs = (subspace_module._plain(twa["shard"]), int(twa["world_size"]))
        if theirs != mine_shard:
            D = self.subspace.dim
            raise ValueError(
                f"state dict was saved by a TWA optimizer on "
                f"{_describe_shard(theirs, D)}; this one is on {_describe_shard(mine_shard, D)}: load "
                "it into a process group of the same size, each rank its own file"
            )
        for name, mine in (("rank", self.rank), ("num_samples", self.subspace.num_samples)):
            if twa[name] != mine:
                raise ValueError(f"state dict has {name}={twa[name]!r}, this optimizer {mine!r}")
        self._check_basis_fingerprint(twa.get("basis_fingerprint"))
        if twa["start"] not in STARTS:
            raise ValueError(f"{what} has start={twa['start']!r}, expected one of {STARTS}")
        n = self.subspace.local_numel
        if twa.get("granularity", "model") != self.granularity:
            raise ValueError(
                f"{what} has granularity={twa.get('granularity', 'model')!r}, this optimizer "
                f"{self.granularity!r}"
            )
        shape = tuple(self._alpha.shape)
        _state.tensor_entry(twa["alpha"], "alpha", shape, torch.float32, what)
        _state.tensor_entry(twa["momentum_buffer"], "momentum_buffer", shape, torch.float32, what)
        if twa.get("second_moment") is not None or self._second_moment.numel():
            moments = twa.get("second_moment")
            if moments is None:
                raise ValueError(f"{what} has no 'second_moment' entry: not from a {type(self).__name__}")
            moments_shape = tuple(self._second_moment.shape)
            _state.tensor_entry(moments, "second_moment", moments_shape, torch.float32, what)
        counters = _state.tensor_entry(twa["counters"], "counters", (2,), torch.int64, what)
        if bool((counters < 0).any()):
            raise ValueError(f"{what} entry 'counters' must be >= 0, got {counters.tolist()}")
        if twa["start"] == "current":
            _state.tensor_entry(twa["w0"], "w0", (n,), torch.float32, what)
        elif twa["w0"] is not None:
            raise ValueError(f"{what} has start='mean' and a 'w0' entry: it is inconsistent")
        if len(state_dict["state"]) != 0:
            raise ValueError(f"{what} has per-parameter state: it is not from a TWA optimizer")
        groups = state_dict["param_groups"]
        mine = [len(g["params"]) for g in self.param_groups]
        theirs = [len(g.get("params", ())) for g in groups]
        if theirs != mine:
            raise ValueError(
                f"{what} has parameter groups of {theirs} params; this optimizer has groups of {mine}"
            )
        for group in groups:
            _state.require_keys(group, set(self._HYPER_KEYS), what)
            try:
                self._check_group(group, read_tensors=True)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{what}: {e}") from e
        return twa

    def _check_basis_fingerprint(self, saved) -> None:
        """Raise ``ValueError`` unless ``saved`` (sample coordinates) describes this basis.

        Rebuilding a subspace from the same samples on another backend changes the coordinates
        by rounding only (fp64 sums in another order: ~1e-15 relative); another subspace of the
        same model differs by its samples' differences, about 1 % of the weights along a
        trajectory. 1e-6 of the largest coordinate separates the two; two subspaces closer than
        that describe weights within 1e-6 of each other, where loading is harmless.
        """
        if saved is None:
            warnings.warn(
                "TWA state dict has no basis fingerprint (saved by an older twa_kernels): it "
                "cannot be checked against this subspace's basis"
            )
            return
        mine = self.subspace.sample_coordinates()
        saved = _state.tensor_entry(saved, "basis_fingerprint", tuple(mine.shape), torch.float64,
                                    "TWA state dict")  # fmt: skip
        scale = float(mine.abs().max())
        if float((saved.cpu() - mine).abs().max()) > 1e-6 * scale:
            raise ValueError(
                "state dict was trained on another basis: same model, rank and sample count, but "
                "its subspace's sample coordinates differ; load it into an optimizer on the "
                "subspace it was saved with (Subspace.load_state_dict of the same checkpoint)"
            )

    def add_param_group(self, param_group: dict) -> None:
        """Refused after construction: the groups given to the constructor cover the subspace's
        parameters (their Gram blocks are computed then)."""
        if not getattr(self, "_building", False):
            raise ValueError(
                "TWA's parameter groups are fixed at construction (they must cover the subspace's "
                "parameters); build another optimizer for other parameters"
            )
        super().add_param_group(param_group)

    def __getstate__(self) -> dict:
        # (On a sharded subspace, copying the subspace raises: a process group cannot be copied.)
        state = self.__dict__.copy()
        # Edits made before the copy are still to be seen by the copy's first step.
        edited = set(self._edited_parameters())
        state["_weight_stamps"] = [None if i in edited else s for i, s in enumerate(self._weight_stamps)]
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        pending = [s is None for s in self._weight_stamps]
        self._remember_weights()  # the copy's parameters: new addresses and counters
        self._weight_stamps = [None if p else s for p, s in zip(pending, self._weight_stamps, strict=True)]


def _describe_shard(shard, D: int) -> str:
    if shard is None:
        return "a subspace without a process group"
    return subspace_module.describe_sharding(shard, D)


def _grouped(groups: list[Mapping], subspace: Subspace):
    """``(tensors in the subspace's order, the groups with lists of params, each tensor's group)``
    from torch-style param groups, which must cover the subspace's parameters (matched by
    identity), each once, in any order or split; ``ValueError``/``TypeError`` naming the group."""
    index = {id(p): i for i, p in enumerate(subspace._params)}
    group_of: dict[int, int] = {}
    out = []
    for g, group in enumerate(groups):
        if not isinstance(group, Mapping) or "params" not in group:
            raise TypeError(
                f"param group {g} must be a dict with a 'params' entry, got {type(group).__name__}"
            )
        ps = group["params"]
        ps = [ps] if isinstance(ps, Tensor) else list(ps)
        for p in ps:
            if not isinstance(p, Tensor):
                raise TypeError(f"param group {g} holds a {type(p).__name__}, expected tensors")
            i = index.get(id(p))
            if i is None:
                raise ValueError(
                    f"param group {g} holds a tensor of shape {tuple(p.shape)} that is not one of the "
                    "subspace's parameters (the groups must hold the very tensors it was built on)"
                )
            if i in group_of:
                raise ValueError(
                    f"{subspace.layout.describe(i)} is in param groups {group_of[i]} and {g}: each "
                    "parameter belongs to one group"
                )
            group_of[i] = g
        out.append({**group, "params": ps})
    missing = [i for i in range(len(subspace._params)) if i not in group_of]
    if missing:
        raise ValueError(
            f"{subspace.layout.describe(missing[0])} (and {len(missing) - 1} more) is in no param "
            "group: the groups must cover the subspace's parameters"
        )
    return list(subspace._params), out, [group_of[i] for i in range(len(subspace._params))]


class _GroupDecay:
    """Per-group weight decay with one coordinate vector: ``sum_g wd_g P_g^T w_g`` =
    ``(sum_g wd_g G_g) alpha + sum_g wd_g P_g^T w0_g``, with ``G_g`` the Gram block and
    ``P_g^T w0_g`` the projection of w0 on group g's parameters, computed once (no pass over D per
    step). The step then runs with weight decay 1 on these sums."""

    def __init__(self, subspace: Subspace, group_index: list[int], n_groups: int, w0: Tensor):
        layout, self.subspace = subspace.layout, subspace
        per_param = [(o, o + n) for o, n in zip(layout.offsets, layout.numels, strict=True)]
        self.blocks = _blocks.local_blocks(per_param, subspace.pieces, layout)
        self.onehot = torch.zeros(n_groups, len(group_index), dtype=torch.float64, device=subspace.device)
        self.onehot[group_index, range(len(group_index))] = 1.0
        grams = _blocks.block_grams(*subspace.columns, self.blocks, subspace.process_group)
        self.grams = torch.einsum("gp,pij->gij", self.onehot, grams)  # fp64 [groups, K, K]
        self.refresh(w0)

    def refresh(self, w0: Tensor) -> None:
        """Each group's ``P_g^T w0_g`` after w0 changed."""
        space = self.subspace
        parts = _blocks.block_projections(*space.columns, w0, self.blocks, space.process_group).double()
        self.pw0 = self.onehot @ parts  # fp64 [groups, K]
        self._cached = None

    def terms(self, decays: tuple[float, ...]) -> tuple[Tensor, Tensor]:
        """fp32 ``(sum_g wd_g G_g, sum_g wd_g P_g^T w0_g)`` for the groups' weight decays."""
        if self._cached is None or self._cached[0] != decays:
            wd = torch.tensor(decays, dtype=torch.float64, device=self.grams.device)
            gram = torch.einsum("g,gij->ij", wd, self.grams).float()
            self._cached = (decays, gram, (wd @ self.pw0).float())
        return self._cached[1], self._cached[2]


def _weight_stamp(p: Tensor) -> tuple[int, int]:
    """(storage address, version counter) of the values this process holds of ``p`` (an FSDP2
    parameter's local shard: the DTensor itself has no storage of its own)."""
    local = _params.local_tensor(p)
    return local.data_ptr(), local._version


def _min_norm_solve(S: Tensor, b: Tensor) -> Tensor:
    """x of minimum norm with S x = b (S [K, n] of full row rank K <= n)."""
    return torch.linalg.lstsq(S, b.unsqueeze(1), driver="gelsd").solution.squeeze(1)


def _check_hyperparameters(lr, momentum, dampening, weight_decay, nesterov, *, read_tensors=True) -> None:
    """Raise ``TypeError``/``ValueError`` naming the first bad hyperparameter.

    ``lr`` may be a number or a 0-dim floating tensor; the tensor's value is checked only when
    ``read_tensors`` (at construction and load, never in ``step()``: reading it would sync).
    """
    if isinstance(lr, Tensor):
        if lr.dim() != 0 or not lr.dtype.is_floating_point:
            raise TypeError(
                f"lr must be a number or a 0-dim floating tensor, got {lr.dtype} {tuple(lr.shape)}"
            )
        lr = float(lr) if read_tensors else 0.0  # its value, or nothing to check
    for name, value in (
        ("lr", lr),
        ("momentum", momentum),
        ("dampening", dampening),
        ("weight_decay", weight_decay),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not lr >= 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if not 0 <= dampening <= 1:
        raise ValueError(f"dampening must be in [0, 1], got {dampening}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov=True requires momentum > 0 and dampening = 0")


class TWAAdamW(TWA):
    r"""Trainable Weight Averaging with AdamW on the coordinates (the published follow-up).

    Per block l of ``granularity`` (see ``TWA``; ``"model"``: one block over all the weights, the
    columns not normalised) with ``c_l = P_l^T g_l`` and ``r_l = P_l^T w_l``:

    .. math::
        a_l &\leftarrow a_l - \eta \lambda r_l \quad \text{(decoupled decay)} \\
        m_l &\leftarrow \beta_1 m_l + (1 - \beta_1) c_l, \quad
        v_l \leftarrow \beta_2 v_l + (1 - \beta_2) c_l^2 \\
        a_l &\leftarrow a_l - \eta\, \frac{m_l / (1 - \beta_1^t)}{\sqrt{v_l / (1 - \beta_2^t)} + \epsilon}

    as ``torch.optim.AdamW`` does to a parameter (t counts the steps taken; a step whose
    gradient is not finite is skipped, as ``TWA`` skips it). Everything else (start, state dicts,
    ``coefficients()``, edits outside the optimizer, schedulers) is as ``TWA``.
    """

    _RULE = "adamw"
    _HYPER_KEYS = ("lr", "betas", "eps", "weight_decay")

    def __init__(
        self,
        params: Iterable[Tensor] | nn.Module,
        subspace: Subspace,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        start: str = "mean",
        granularity: str | int = "model",
        backend: str = "auto",
    ) -> None:
        _check_adamw(lr, betas, eps, weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self._setup(params, subspace, defaults, start, backend, None, granularity)

    def _check_group(self, group: dict, read_tensors: bool) -> None:
        _check_adamw(
            group["lr"], group["betas"], group["eps"], group["weight_decay"], read_tensors=read_tensors
        )

    def _block_hyperparameters(self) -> _steps.BlockHyper:
        group = self._step_group()
        beta1, beta2 = group["betas"]
        return _steps.BlockHyper(
            self._lr_tensor(group), "adamw", weight_decay=float(group["weight_decay"]),
            beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
        )  # fmt: skip


def _check_adamw(lr, betas, eps, weight_decay, *, read_tensors=True) -> None:
    """Raise ``TypeError``/``ValueError`` naming the first bad AdamW hyperparameter."""
    _check_hyperparameters(lr, 0.0, 0.0, weight_decay, False, read_tensors=read_tensors)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair of numbers, got {betas!r}")
    for i, b in enumerate(betas):
        if isinstance(b, bool) or not isinstance(b, numbers.Real) or not 0 <= b < 1:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {b!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
