"""BatchNorm recalibration after weight averaging, for any kind of batch.

Averaged (SWA) or TWA weights come with running statistics of other weights: BatchNorm's
``running_mean`` and ``running_var`` live outside the span and must be recomputed by one pass
over training data. ``torch.optim.swa_utils.update_bn`` does that pass but feeds ``model(batch)``
or ``model(batch[0])`` only, and leaves the statistics reset when the pass fails. ``update_bn``
here computes the same statistics, feeds any batch, and changes nothing when it fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

__all__ = ["update_bn"]

_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _to(obj: Any, device: torch.device | str | int) -> Any:
    """``obj`` with every tensor in it moved to ``device`` (through tuples, lists and mappings)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_to(v, device) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _default_forward(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def _snapshot(module: _BatchNorm) -> dict[str, torch.Tensor | None]:
    return {
        name: None if (t := getattr(module, name, None)) is None else t.detach().clone() for name in _STATS
    }


def _restore(module: _BatchNorm, saved: dict[str, torch.Tensor | None]) -> None:
    for name, value in saved.items():
        current = getattr(module, name, None)
        if value is None:
            continue
        if (
            isinstance(current, torch.Tensor)
            and current.shape == value.shape
            and current.dtype == value.dtype
            and current.device == value.device
        ):
            current.copy_(value)  # in place: references to the buffer see the old values again
        else:
            setattr(module, name, value)


def update_bn(
    loader: Iterable[Any],
    model: nn.Module,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    device: torch.device | str | int | None = None,
) -> None:
    """Recompute the running statistics of every BatchNorm module of ``model`` from ``loader``.

    The statistics ``torch.optim.swa_utils.update_bn`` computes, bit for bit: the running
    statistics of each ``_BatchNorm`` module (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``,
    initialised ``LazyBatchNorm*``) are reset, and one pass over ``loader`` in train mode with
    ``momentum=None`` makes ``running_mean`` [C] and ``running_var`` [C] the plain average of the
    batch means and (unbiased) batch variances, and ``num_batches_tracked`` the number of
    batches. Then each module's ``momentum`` and each module's training flag are restored.

    Args:
        loader: any iterable of batches, e.g. a ``DataLoader``. A batch is fed as
            ``model(batch)`` for a tensor, ``model(**batch)`` for a mapping (Hugging Face
            style: ``input_ids``, ``attention_mask``, ...); of a tuple or list only the first
            element is fed, in the same way (as torch does: the rest are targets).
        model: the module whose statistics are recomputed.
        forward: ``forward(model, batch)`` feeds one batch instead (its return value is
            ignored), e.g. ``lambda m, b: m(b["pixel_values"])``.
        device: if given, every tensor of the batch (through tuples, lists and mappings; a
            mapping becomes a ``dict``) is moved there before it is fed.

    The pass runs under ``torch.no_grad()`` and changes no parameter. A model without BatchNorm
    returns at once, without iterating ``loader``. If anything raises during the call (a batch
    the model refuses, an exception in ``forward``, ``KeyboardInterrupt``), every BatchNorm
    module's ``running_mean``, ``running_var``, ``num_batches_tracked`` and ``momentum`` and
    every module's training flag are put back as they were before the call and the exception
    propagates. Raises ``ValueError``, changing nothing, for an empty ``loader`` (torch would
    leave the statistics reset) and for a lazy BatchNorm module not yet initialised (run one
    forward first).
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if not bns:
        return
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm) and isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():
            raise ValueError(
                f"update_bn: BatchNorm module {name!r} ({type(m).__name__}) is not initialised yet; "
                "run one forward pass through the model first"
            )
    feed = _default_forward if forward is None else forward
    training = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in bns}
    saved = {m: _snapshot(m) for m in bns}
    try:
        with torch.no_grad():
            for m in bns:
                m.reset_running_stats()
                m.momentum = None
            model.train()
            batches = 0
            for batch in loader:
                if forward is None and isinstance(batch, (tuple, list)):
                    batch = batch[0]  # the input; the rest (targets) is neither moved nor fed
                if device is not None:
                    batch = _to(batch, device)
                feed(model, batch)
                batches += 1
            if batches == 0:
                raise ValueError(
                    f"update_bn: the loader {type(loader).__name__} yielded no batch; "
                    "the BatchNorm statistics are left as they were"
                )
    except BaseException:
        with torch.no_grad():
            for m, s in saved.items():
                _restore(m, s)
        raise
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, flag in training.items():
            m.training = flag
