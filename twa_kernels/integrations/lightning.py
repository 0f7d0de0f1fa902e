"""PyTorch Lightning: ``TWACallback`` samples the weights, switches the trainer to TWA, recalibrates
BatchNorm and keeps the subspace in every checkpoint.

Imports ``lightning`` (or, without it, ``pytorch_lightning``); ``import twa_kernels`` does not.

    twa = TWACallback(max_rank=128, switch_epoch=100,
                      optimizer_kwargs=dict(lr=2.0, momentum=0.9, weight_decay=1e-5))
    trainer = lightning.Trainer(max_epochs=110, callbacks=[twa])
    trainer.fit(model, datamodule)                  # or fit(..., ckpt_path="last") to resume
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import _ops
from ..optim import TWA
from ..subspace import Subspace
from .bn import update_bn

try:
    import lightning.pytorch as pl
    from lightning.fabric.utilities.cloud_io import get_filesystem
    from lightning.pytorch.utilities.types import LRSchedulerConfig
except ImportError:  # the standalone package
    import pytorch_lightning as pl
    from lightning_fabric.utilities.cloud_io import get_filesystem
    from pytorch_lightning.utilities.types import LRSchedulerConfig

__all__ = ["RANK_FILE_SUFFIX", "TWACallback"]

# A sharded subspace's rank r writes ``<checkpoint path><RANK_FILE_SUFFIX.format(rank=r)>``.
RANK_FILE_SUFFIX = ".twa-rank{rank}.pt"
_STATE_VERSION = 1
_INTERVALS = ("epoch", "step")


def _positive_int_or_none(value, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be None or a positive int, got {value!r}")


def _check_optimizer(optimizer, kwargs: Mapping) -> None:
    """``optimizer(module, subspace, **kwargs)`` must bind: unknown or missing arguments raise now,
    not epochs later at the switch."""
    if not callable(optimizer):
        raise TypeError(f"optimizer must be a class or a callable, got {optimizer!r}")
    try:
        signature = inspect.signature(optimizer)
    except (TypeError, ValueError):  # a callable without a signature: checked when it is called
        return
    try:
        signature.bind(None, None, **kwargs)
    except TypeError as e:
        name = getattr(optimizer, "__name__", repr(optimizer))
        raise TypeError(
            f"optimizer_kwargs {sorted(kwargs)} do not fit {name}(params, subspace, **optimizer_kwargs): {e}"
        ) from None


class TWACallback(pl.Callback):
    """Trainable Weight Averaging in a Lightning ``Trainer``: samples, switch, BatchNorm, checkpoints.

    Phase 1 is the LightningModule's own training; the callback snapshots the weights into a
    ``twa_kernels.Subspace`` (the initial weights and one sample per epoch by default, as the
    published recipe does). At the start of epoch ``switch_epoch`` it replaces the trainer's
    optimizer by ``optimizer(module, subspace, **optimizer_kwargs)`` (``TWA`` by default), which
    writes its start point (the mean of the samples) into the weights, recalibrates BatchNorm
    and trains on from there: the head-stage recipe (e.g. 100 SGD epochs, then 10 TWA epochs:
    ``switch_epoch=100, max_epochs=110``). A tail stage starts TWA at the last SGD weights:
    ``optimizer_kwargs=dict(..., start="current")`` with ``sample_from_epoch`` where the samples
    begin, in the same ``fit``; or, after a ``fit`` that only sampled (``switch_epoch=None``), a
    second ``fit`` with ``TWACallback(subspace=first.subspace, switch_epoch=0, ...)``.

    Args:
        max_rank: the most basis columns (``Subspace(max_rank=...)``); one per sample at most.
            Not with ``subspace``.
        dtype: the basis storage: ``torch.float16`` (default), ``bfloat16``, ``float32``, ``int8``.
        every_n_epochs: sample the weights after every n-th epoch (default 1), counting from
            ``sample_from_epoch``; None: not at epoch ends.
        every_n_steps: sample after every n-th optimizer step (``trainer.global_step`` a multiple
            of n) during the epochs from ``sample_from_epoch`` on; None (default): not by steps.
            Both may be set (the published ImageNet recipe samples every 1000 steps and at each
            epoch end); weights already sampled at the same step are not sampled again.
        sample_from_epoch: the first sample is the weights after this many epochs: 0 (default)
            makes the initial weights, before any step, the first sample; then after epochs
            ``sample_from_epoch + every_n_epochs``, ... Samples stop at the switch.
        switch_epoch: the 0-based epoch at whose start the trainer switches to TWA (after
            ``switch_epoch`` epochs of the module's own training; its samples included); 0 with
            a filled ``subspace`` trains TWA from the first epoch. None (default): never; the
            callback only samples (``subspace`` holds them after the fit).
        optimizer: ``optimizer(module, subspace, **optimizer_kwargs)`` builds the TWA optimizer:
            ``twa_kernels.TWA`` (default), ``TWAAdamW``, or a function returning either (e.g.
            one that builds parameter groups). A class or a module-level function pickles
            (``strategy="ddp_spawn"`` pickles the callback); a lambda does not.
        optimizer_kwargs: its keyword arguments, e.g. ``dict(lr=2.0, momentum=0.9,
            weight_decay=1e-5)`` (``TWA`` needs ``lr``). Checked against the signature here.
            On a sharded subspace under DDP, ``TWA`` gets ``average_gradients=False`` unless
            given (DDP's backward has averaged the gradients).
        scheduler: ``scheduler(optimizer)`` builds TWA's learning-rate scheduler, e.g.
            ``functools.partial(MultiStepLR, milestones=[5, 8], gamma=0.1)`` (the published
            head stage, counted in epochs from the switch); None: a constant lr. The
            LightningModule's own schedulers drive the optimizer that the switch replaces: they
            are dropped at the switch and not stepped again.
        scheduler_interval: ``"epoch"`` (default) or ``"step"``: when Lightning steps it.
        recalibrate_bn: recompute BatchNorm's running statistics (``twa_kernels.update_bn``,
            one pass over ``trainer.train_dataloader`` under the trainer's precision) at the
            switch, and once more when training ends (``on_train_end``), as the published
            recipe does; the end-of-training statistics are in the module in memory, not in
            the checkpoints already written. Default True; a model without BatchNorm skips it.
        bn_forward: ``bn_forward(module, batch)`` feeds one training batch for the
            recalibration; default: ``module(batch[0])`` for a tuple or list batch,
            ``module(**batch)`` for a mapping, ``module(batch)`` otherwise.
        sharded: shard the basis over the trainer's processes (``Subspace(...,
            process_group=torch.distributed.group.WORLD)``; needs a DDP strategy): each rank
            holds ``1 / world`` of it. Every rank then writes its part of the subspace, and of
            TWA's state, to ``<checkpoint path>.twa-rank{r}.pt`` beside each checkpoint
            (Lightning writes the checkpoint on rank 0 only), removes it with the checkpoint,
            and reads it back on ``fit(ckpt_path=...)``.
        subspace: a filled ``Subspace`` built on this LightningModule's parameters (e.g.
            ``first_callback.subspace``), instead of ``max_rank``/``dtype``/``sharded``.

    Checkpoints: the callback's state (``state_dict``) holds the subspace (its basis, the
    initial weights as its anchor, the mean), the phase and the last sampled step; Lightning
    saves TWA's state with its optimizer states. ``trainer.fit(model, ckpt_path=...)`` from a
    checkpoint written at the end of an epoch, before or after the switch, continues bit for
    bit as the uninterrupted run (given deterministic training: Lightning does not save the
    global random state, so shuffling must come from a seeded sampler and no dropout).

    One ``TWACallback`` per trainer (Lightning refuses two stateful callbacks of one key).
    After the switch the trainer has one optimizer (a LightningModule with several is refused
    there). ``subspace`` and ``optimizer_twa`` give the subspace and the TWA optimizer (None
    before they exist; with ``ddp_spawn`` they live in the worker processes).
    """

    def __init__(
        self,
        max_rank: int | None = None,
        *,
        dtype: torch.dtype = torch.float16,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        sample_from_epoch: int = 0,
        switch_epoch: int | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] = TWA,
        optimizer_kwargs: Mapping[str, Any] | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        scheduler_interval: str = "epoch",
        recalibrate_bn: bool = True,
        bn_forward: Callable[[nn.Module, Any], Any] | None = None,
        sharded: bool = False,
        subspace: Subspace | None = None,
    ) -> None:
        super().__init__()
        if subspace is not None:
            if not isinstance(subspace, Subspace):
                raise TypeError(f"subspace must be a twa_kernels.Subspace, got {type(subspace).__name__}")
            if max_rank is not None or sharded:
                raise ValueError(
                    "give either subspace (its max_rank, dtype and process group are its own) or "
                    "max_rank (and dtype, sharded), not both"
                )
        elif isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
            raise ValueError(f"max_rank must be a positive int (or give subspace=), got {max_rank!r}")
        elif max_rank > _ops.MAX_RANK:
            raise ValueError(f"max_rank={max_rank} is above the largest supported rank, {_ops.MAX_RANK}")
        if dtype not in _ops.STORAGE_DTYPES:
            raise ValueError(f"dtype must be float16, bfloat16, float32 or int8, got {dtype}")
        _positive_int_or_none(every_n_epochs, "every_n_epochs")
        _positive_int_or_none(every_n_steps, "every_n_steps")
        for name, value in (("sample_from_epoch", sample_from_epoch), ("switch_epoch", switch_epoch)):
            if value is None and name == "switch_epoch":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if subspace is None:
            if every_n_epochs is None and every_n_steps is None:
                raise ValueError(
                    "every_n_epochs and every_n_steps are both None: nothing would be sampled (to "
                    "train TWA on samples taken elsewhere, pass subspace=)"
                )
            if switch_epoch is not None and sample_from_epoch > switch_epoch:
                raise ValueError(
                    f"sample_from_epoch={sample_from_epoch} is after switch_epoch={switch_epoch}: the "
                    "switch would find no sample"
                )
        if scheduler_interval not in _INTERVALS:
            raise ValueError(f"scheduler_interval must be one of {_INTERVALS}, got {scheduler_interval!r}")
        if scheduler is not None and not callable(scheduler):
            raise TypeError(f"scheduler must be None or a callable scheduler(optimizer), got {scheduler!r}")
        if bn_forward is not None and not callable(bn_forward):
            raise TypeError(
                f"bn_forward must be None or a callable forward(module, batch), got {bn_forward!r}"
            )
        optimizer_kwargs = dict(optimizer_kwargs or {})
        if switch_epoch is not None:
            _check_optimizer(optimizer, optimizer_kwargs)
        self.max_rank = max_rank
        self.dtype = dtype
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.sample_from_epoch = sample_from_epoch
        self.switch_epoch = switch_epoch
        self.optimizer = optimizer
        self.optimizer_kwargs = optimizer_kwargs
        self.scheduler = scheduler
        self.scheduler_interval = scheduler_interval
        self.recalibrate_bn = bool(recalibrate_bn)
        self.bn_forward = bn_forward
        self.sharded = bool(sharded)
        self._space = subspace
        self._given_subspace = subspace is not None
        self._twa: torch.optim.Optimizer | None = None
        self._switched = False
        self._last_sample_step = -1
        self._pending: dict | None = None  # a checkpoint's state, applied once the subspace exists
        self._rank_part: dict | None = None  # this rank's file of a sharded checkpoint
        self._fit_started = False
        self._saving_to: str | None = None
        self._unwrap: list[Callable[[], None]] = []
        self._trainer: pl.Trainer | None = None

    # --- public state -------------------------------------------------------------------------

    @property
    def subspace(self) -> Subspace | None:
        """The subspace of the samples (None before the first ``fit`` starts)."""
        return self._space

    @property
    def optimizer_twa(self) -> torch.optim.Optimizer | None:
        """The TWA optimizer the switch installed (None before it)."""
        return self._twa

    @property
    def switched(self) -> bool:
        """Whether the trainer trains TWA (the switch happened, in this run or before a checkpoint)."""
        return self._switched

    # --- setup --------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        self._fit_started = False
        if self.sharded or (self._space is not None and self._space.process_group is not None):
            self._wrap_checkpoint_calls(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        while self._unwrap:
            self._unwrap.pop()()
        self._fit_started = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._space is None:
            group = None
            if self.sharded:
                if not (dist.is_available() and dist.is_initialized()):
                    raise ValueError(
                        "sharded=True shards the basis over the trainer's processes, but torch.distributed "
                        f"is not initialised (strategy {type(trainer.strategy).__name__}): use a DDP strategy"
                    )
                group = dist.group.WORLD
            self._space = Subspace(pl_module, self.max_rank, self.dtype, process_group=group)
        else:
            self._check_same_parameters(pl_module)
            if self._switched and self._pending is None:
                raise RuntimeError(
                    "this TWACallback trained TWA in an earlier fit; to train TWA again, give a new "
                    "TWACallback(subspace=callback.subspace, switch_epoch=0, ...)"
                )
        self._fit_started = True
        if self._pending is not None:
            self._apply_pending(trainer, pl_module)

    def _check_same_parameters(self, pl_module: nn.Module) -> None:
        mine = [p for p in pl_module.parameters() if p.requires_grad]
        theirs = self._space._params
        if len(mine) != len(theirs) or any(a is not b for a, b in zip(mine, theirs, strict=False)):
            raise ValueError(
                "subspace was built on other parameter tensors than this LightningModule's trainable "
                "parameters: build it on the module (Subspace(module, ...)) that the trainer fits"
            )

    # --- sampling -----------------------------------------------------------------------------

    def _sampling(self) -> bool:
        return not self._switched and (self.every_n_epochs is not None or self.every_n_steps is not None)

    def _sample(self, trainer: pl.Trainer, when: str) -> None:
        try:
            self._space.add()
        except ValueError as e:
            raise ValueError(f"TWACallback, sample {when}: {e}") from e
        self._last_sample_step = trainer.global_step

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fresh = trainer.current_epoch == 0 and trainer.global_step == 0 and self._space.num_samples == 0
        if self._sampling() and self.sample_from_epoch == 0 and fresh:
            self._sample(trainer, "of the initial weights")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self._sampling():
            return
        step, epoch = trainer.global_step, trainer.current_epoch
        if step == self._last_sample_step:  # no optimizer step since the last sample
            return
        n = self.every_n_steps
        if n is not None and epoch >= self.sample_from_epoch and step > 0 and step % n == 0:
            self._sample(trainer, f"at step {step}")
            return
        # The epoch's last weights, sampled at its last batch: before validation and any
        # checkpoint of this epoch, wherever ModelCheckpoint saves.
        n, done = self.every_n_epochs, epoch + 1
        if n is None or not trainer.is_last_batch or done < self.sample_from_epoch:
            return
        if (done - self.sample_from_epoch) % n == 0 and (
            self.switch_epoch is None or done <= self.switch_epoch
        ):
            self._sample(trainer, f"after epoch {epoch}")

    # --- the switch ---------------------------------------------------------------------------

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._switched or self.switch_epoch is None or trainer.current_epoch < self.switch_epoch:
            return
        space = self._space
        if space.num_samples == 0:
            raise ValueError(
                f"TWACallback: switch_epoch={self.switch_epoch} reached with an empty subspace: no sample "
                f"was taken (sample_from_epoch={self.sample_from_epoch}, every_n_epochs="
                f"{self.every_n_epochs}, every_n_steps={self.every_n_steps})"
            )
        self._install_twa(trainer, pl_module)
        self._switched = True
        if self.recalibrate_bn:
            self._update_bn(trainer, pl_module)

    def _install_twa(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the TWA optimizer (and scheduler) and make them the trainer's."""
        if len(trainer.optimizers) > 1:
            raise ValueError(
                f"TWACallback replaces the trainer's optimizer by one TWA optimizer over every trainable "
                f"parameter; this LightningModule configures {len(trainer.optimizers)} optimizers"
            )
        _check_optimizer(self.optimizer, self.optimizer_kwargs)
        kwargs = dict(self.optimizer_kwargs)
        ddp = isinstance(trainer.strategy.model, nn.parallel.DistributedDataParallel)
        if self._space.process_group is not None and ddp and _accepts(self.optimizer, "average_gradients"):
            kwargs.setdefault("average_gradients", False)  # DDP's backward has averaged them
        opt = self.optimizer(pl_module, self._space, **kwargs)
        configs = []
        if self.scheduler is not None:
            configs.append(LRSchedulerConfig(self.scheduler(opt), interval=self.scheduler_interval))
        trainer.strategy.optimizers = [opt]
        trainer.strategy.lr_scheduler_configs = configs
        self._twa = opt

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._switched and self.recalibrate_bn:
            self._update_bn(trainer, pl_module)

    def _update_bn(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.train_dataloader
        if isinstance(loader, (Mapping, list, tuple)):
            raise ValueError(
                "TWACallback recalibrates BatchNorm over one training dataloader; this trainer has "
                f"{len(loader)}: pass recalibrate_bn=False and call twa_kernels.update_bn yourself"
            )
        precision = trainer.precision_plugin
        user = self.bn_forward

        def forward(module, batch):
            batch = precision.convert_input(batch)
            if user is not None:
                return user(module, batch)
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            return module(**x) if isinstance(x, Mapping) else module(x)

        with precision.forward_context():
            update_bn(loader, pl_module, forward=forward, device=pl_module.device)

    # --- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        space = self._space
        state = {
            "version": _STATE_VERSION,
            "switched": self._switched,
            "last_sample_step": self._last_sample_step,
            "subspace": None,
            "rank_files": None,
        }
        if space is not None and space.process_group is None:
            state["subspace"] = space.state_dict()
        elif space is not None:  # each rank writes its part in on_save_checkpoint
            state["rank_files"] = {"suffix": RANK_FILE_SUFFIX, "world_size": dist.get_world_size()}
        return state

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        space = self._space
        if space is None or space.process_group is None:
            return
        if self._saving_to is None:
            raise RuntimeError(
                "TWACallback(sharded=True) writes each rank's part of the subspace beside the "
                "checkpoint file and needs its path: save checkpoints with trainer.save_checkpoint(path) "
                "(as ModelCheckpoint does)"
            )
        path = _rank_file(self._saving_to, trainer.global_rank)
        part = {
            "subspace": space.state_dict(),
            "optimizer": self._twa.state_dict() if self._switched else None,
        }
        fs = get_filesystem(path)
        fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with fs.open(path, "wb") as f:
            torch.save(part, f)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is None:
            warnings.warn(
                f"the checkpoint {trainer.ckpt_path} has no TWACallback state: sampling starts afresh "
                "(no earlier sample is known)"
            )
            return
        files = state.get("rank_files")
        if files is None:
            return
        sharded = self.sharded or (self._space is not None and self._space.process_group is not None)
        if not sharded:
            raise ValueError(
                f"the checkpoint {trainer.ckpt_path} holds a subspace sharded over {files['world_size']} "
                "processes (one file per rank); this TWACallback's subspace is not sharded: pass sharded=True"
            )
        world = trainer.world_size
        if files["world_size"] != world:
            raise ValueError(
                f"the checkpoint {trainer.ckpt_path} holds a subspace sharded over {files['world_size']} "
                f"processes; this trainer runs {world}: resume with the same number of processes"
            )
        ckpt = os.fspath(trainer.ckpt_path)
        paths = [_existing_rank_file(ckpt, r, files["suffix"]) for r in range(world)]
        mine = paths[trainer.global_rank]
        missing = _missing_everywhere(mine, trainer)
        if missing:
            names = ", ".join(f"rank {r}: {paths[r]}" for r in missing)
            raise FileNotFoundError(
                f"the checkpoint {ckpt} holds a sharded subspace whose per-rank files are missing ({names}); "
                "each rank's file is written beside the checkpoint and must be moved or copied with it"
            )
        fs = get_filesystem(mine)
        with fs.open(mine, "rb") as f:
            part = torch.load(f, map_location="cpu", weights_only=True)
        self._rank_part = part
        if state.get("switched") and part.get("optimizer") is not None:
            # Lightning restores the optimizer from rank 0's state; each rank's TWA state is its own.
            checkpoint["optimizer_states"][0] = part["optimizer"]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = {"version", "switched", "last_sample_step", "subspace"} - set(state_dict)
        if missing:
            raise ValueError(f"TWACallback state dict lacks {sorted(missing)}: it is not from a TWACallback")
        if state_dict["version"] != _STATE_VERSION:
            raise ValueError(
                f"TWACallback state dict has version {state_dict['version']!r}, expected {_STATE_VERSION}"
            )
        self._pending = dict(state_dict)
        if self._fit_started:  # strategies that restore after setup: the subspace exists already
            self._apply_pending(self._trainer, self._trainer.lightning_module)

    def _apply_pending(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state, self._pending = self._pending, None
        if state.get("rank_files") is not None:
            space_state = self._rank_part["subspace"]
            self._rank_part = None
        else:
            space_state = state["subspace"]
        if space_state is not None:
            self._space.load_state_dict(space_state)
        self._last_sample_step = int(state["last_sample_step"])
        self._switched = False
        if state["switched"]:
            # Before Lightning restores the optimizer states: the checkpoint's is TWA's.
            self._install_twa(trainer, pl_module)
            self._switched = True

    def _wrap_checkpoint_calls(self, trainer: pl.Trainer) -> None:
        """Learn each checkpoint's path on every rank (Lightning hands it to rank 0's writer only),
        and remove each rank's file with its checkpoint."""
        while self._unwrap:  # left by a fit that raised (teardown did not run)
            self._unwrap.pop()()
        save, remove = trainer.save_checkpoint, trainer.strategy.remove_checkpoint

        def save_checkpoint(filepath, *args, **kwargs):
            self._saving_to = os.fspath(filepath)
            try:
                return save(filepath, *args, **kwargs)
            finally:
                self._saving_to = None

        def remove_checkpoint(filepath):
            remove(filepath)
            path = _rank_file(os.fspath(filepath), trainer.global_rank)
            fs = get_filesystem(path)
            if fs.exists(path):
                fs.rm(path)

        trainer.save_checkpoint = save_checkpoint
        trainer.strategy.remove_checkpoint = remove_checkpoint
        self._unwrap += [
            lambda: vars(trainer).pop("save_checkpoint", None),
            lambda: vars(trainer.strategy).pop("remove_checkpoint", None),
        ]


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _rank_file(checkpoint: str, rank: int, suffix: str = RANK_FILE_SUFFIX) -> str:
    return checkpoint + suffix.format(rank=rank)


def _existing_rank_file(checkpoint: str, rank: int, suffix: str) -> str:
    """The rank's file beside ``checkpoint``, or beside the file it links to (``save_last="link"``)."""
    path = _rank_file(checkpoint, rank, suffix)
    if not get_filesystem(path).exists(path) and os.path.islink(checkpoint):
        linked = _rank_file(os.path.realpath(checkpoint), rank, suffix)
        if os.path.exists(linked):
            return linked
    return path


def _missing_everywhere(path: str, trainer: pl.Trainer) -> list[int]:
    """The ranks whose file is missing, the same list on every rank (a collective)."""
    here = torch.tensor([0 if get_filesystem(path).exists(path) else 1], dtype=torch.int64)
    flags = trainer.strategy.all_gather(here.to(trainer.strategy.root_device))
    return [r for r, f in enumerate(torch.as_tensor(flags).reshape(-1).tolist()) if f]
