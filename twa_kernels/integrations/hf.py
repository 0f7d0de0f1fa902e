"""Hugging Face ``Trainer``: ``TWASampler`` samples the weights into a subspace and saves it beside
every checkpoint; TWA itself is the second phase's optimizer.

Imports ``transformers``; ``import twa_kernels`` does not. The two-phase recipe::

    space = twa_kernels.Subspace(model, max_rank=128)
    sampler = TWASampler(space)                      # the initial weights, then every epoch
    Trainer(model, sgd_args, train_dataset=data, callbacks=[sampler]).train()

    opt = twa_kernels.TWA(model.parameters(), space, lr=2.0, momentum=0.9, weight_decay=1e-5)
    twa_kernels.update_bn(loader, model)             # BatchNorm statistics of the start point
    Trainer(model, twa_args, train_dataset=data, optimizers=(opt, scheduler),
            callbacks=[TWASampler(space)]).train()   # saves the subspace, samples nothing

Build the subspace after moving the model to its training device (``model.to(args.device)``):
its basis is allocated where the parameters are. Resuming phase 1:
``trainer.train(resume_from_checkpoint=...)`` with a ``TWASampler`` on a fresh subspace of the
same model: the sampler reads ``twa_subspace.pt`` from the checkpoint folder. Resuming phase 2:
``load_subspace(space, checkpoint)`` first (TWA is built on it), then the same ``Trainer`` with
``resume_from_checkpoint=checkpoint``; the Trainer restores TWA's state from its
``optimizer.pt``. Give both phases the same precision: accelerate prepares a model once, so a
second ``Trainer`` on the same model keeps the first one's autocast.
"""

from __future__ import annotations

import math
import os

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..optim import TWA
from ..subspace import Subspace

__all__ = ["SUBSPACE_FILE", "TWASampler", "load_subspace", "save_subspace", "subspace_file"]

SUBSPACE_FILE = "twa_subspace.pt"


def _check_subspace(space) -> None:
    if not isinstance(space, Subspace):
        raise TypeError(f"subspace must be a twa_kernels.Subspace, got {type(space).__name__}")
    if space.process_group is not None:
        raise ValueError(
            "the subspace is sharded (process_group): the Hugging Face Trainer writes optimizer.pt "
            "from the main process only, which holds rank 0's part of TWA's state; use a replicated "
            "subspace (no process_group) with this Trainer"
        )


def subspace_file(checkpoint_dir: str | os.PathLike) -> str:
    """The subspace's file in a checkpoint folder: ``<checkpoint_dir>/twa_subspace.pt``."""
    return os.path.join(os.fspath(checkpoint_dir), SUBSPACE_FILE)


def save_subspace(space: Subspace, checkpoint_dir: str | os.PathLike) -> str:
    """Write ``space.state_dict()`` to ``<checkpoint_dir>/twa_subspace.pt``; returns the path."""
    _check_subspace(space)
    path = subspace_file(checkpoint_dir)
    os.makedirs(os.fspath(checkpoint_dir), exist_ok=True)
    torch.save(space.state_dict(), path)
    return path


def load_subspace(space: Subspace, checkpoint_dir: str | os.PathLike) -> None:
    """Load ``<checkpoint_dir>/twa_subspace.pt`` into ``space`` (a subspace of the same model,
    ``max_rank`` and ``dtype``). ``FileNotFoundError`` names the file when it is missing;
    ``Subspace.load_state_dict`` checks everything else, changing nothing when it refuses."""
    _check_subspace(space)
    path = subspace_file(checkpoint_dir)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no TWA subspace in the checkpoint folder {os.fspath(checkpoint_dir)!r}: {path} is missing "
            "(it is written by TWASampler's on_save; was the checkpoint saved with a TWASampler?)"
        )
    space.load_state_dict(torch.load(path, map_location=space.device, weights_only=True))


def _unwrapped(optimizer):
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` (and similar wrappers, which are
    ``torch.optim.Optimizer``s themselves)."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if isinstance(optimizer, TWA) or inner is None:
            break
        optimizer = inner
    return optimizer


class TWASampler(TrainerCallback):
    """Samples the weights into ``subspace`` during ``Trainer.train()`` and saves it with every checkpoint.

    Args:
        subspace: a ``twa_kernels.Subspace`` on the model the ``Trainer`` trains (not sharded:
            see ``load_subspace``).
        every_n_epochs: sample after every n-th epoch (default 1), counting from
            ``sample_from_epoch``; None: not at epoch ends.
        every_n_steps: sample after every n-th optimizer step (``state.global_step`` a multiple
            of n) in the epochs from ``sample_from_epoch`` on; None (default): not by steps. A
            step already sampled is not sampled again at the epoch end.
        sample_from_epoch: the first sample is the weights after this many epochs; 0 (default)
            makes the initial weights, before the first step, the first sample (when the
            subspace is still empty).

    ``on_save`` writes ``subspace.state_dict()`` to ``<output_dir>/checkpoint-<step>/twa_subspace.pt``
    (from the process that saves, ``args.should_save``). On ``train(resume_from_checkpoint=...)``
    the sampler loads that file from ``<output_dir>/checkpoint-<step>`` when training begins,
    unless ``load(checkpoint_dir)`` was called first (a checkpoint elsewhere); a missing file
    raises ``FileNotFoundError`` naming it.

    In phase 2, when the Trainer's optimizer is a ``TWA`` (or ``TWAAdamW``) on this subspace,
    the sampler samples nothing (a new sample would change the basis under TWA) and only saves
    the subspace with each checkpoint, so that a phase-2 checkpoint is complete.
    """

    def __init__(
        self,
        subspace: Subspace,
        *,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        sample_from_epoch: int = 0,
    ) -> None:
        _check_subspace(subspace)
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or a positive int, got {value!r}")
        if (
            isinstance(sample_from_epoch, bool)
            or not isinstance(sample_from_epoch, int)
            or sample_from_epoch < 0
        ):
            raise ValueError(f"sample_from_epoch must be an int >= 0, got {sample_from_epoch!r}")
        self.subspace = subspace
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.sample_from_epoch = sample_from_epoch
        self._twa_phase = False
        self._loaded_from: str | None = None
        self._last_sample_step = -1

    def load(self, checkpoint_dir: str | os.PathLike) -> None:
        """Load the subspace saved in ``checkpoint_dir`` now (``load_subspace``), for a resume from a
        checkpoint outside ``args.output_dir``."""
        load_subspace(self.subspace, checkpoint_dir)
        self._loaded_from = os.fspath(checkpoint_dir)

    def _sample(self, state: TrainerState, when: str) -> None:
        try:
            self.subspace.add()
        except ValueError as e:
            raise ValueError(f"TWASampler, sample {when}: {e}") from e
        self._last_sample_step = state.global_step

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        opt = _unwrapped(kwargs.get("optimizer"))
        self._twa_phase = isinstance(opt, TWA) and opt.subspace is self.subspace
        if self._twa_phase:
            return
        if state.global_step > 0:  # resuming: the subspace as it was at this checkpoint
            if self._loaded_from is None:
                self.load(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
            self._last_sample_step = state.global_step  # sampled before the checkpoint, if due
            return
        if self.sample_from_epoch == 0 and self.subspace.num_samples == 0 and self._sampling():
            self._sample(state, "of the initial weights")

    def _sampling(self) -> bool:
        return not self._twa_phase and (self.every_n_epochs is not None or self.every_n_steps is not None)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        n, step = self.every_n_steps, state.global_step
        if not self._sampling() or n is None or step == self._last_sample_step or step % n:
            return
        if math.ceil(state.epoch or 0) - 1 >= self.sample_from_epoch:  # the epoch of this step
            self._sample(state, f"at step {step}")

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        n, done = self.every_n_epochs, round(state.epoch or 0)
        if not self._sampling() or n is None or state.global_step == self._last_sample_step:
            return
        if done >= self.sample_from_epoch and (done - self.sample_from_epoch) % n == 0:
            self._sample(state, f"after epoch {done - 1}")

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if args.should_save:
            save_subspace(
                self.subspace, os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            )
