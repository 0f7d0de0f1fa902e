"""The TWA step over a list of parameter tensors: gradients in, weights out.

``twa_step`` is what ``TWA.step()`` runs. The generic path works for every backend through the
``twa::`` ops: gather the gradients into the one flat fp32 buffer, project, update the
coordinates, reconstruct the weights into the same buffer and copy them into the parameters.
A backend may provide a fused step instead (``twa_kernels._triton.step.fused_twa_step``) that
reads the gradients and writes the parameters in place, in a constant number of launches.

Nothing here synchronises with the host, and nothing allocates memory proportional to D: the
copies go through ``torch._foreach_copy_`` into views of ``flat`` made once by the optimizer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _ops


def gather_grads_(params: list[Tensor], flat_views: list[Tensor]) -> None:
    """Copy each ``p.grad`` (zeros where it is None) into its view of the flat fp32 buffer."""
    with_grad = [(v, p.grad) for p, v in zip(params, flat_views, strict=True) if p.grad is not None]
    without = [v for p, v in zip(params, flat_views, strict=True) if p.grad is None]
    if with_grad:
        views, grads = zip(*with_grad, strict=True)
        torch._foreach_copy_(list(views), list(grads))
    if without:
        torch._foreach_zero_(without)


def twa_step(
    params: list[Tensor],
    flat: Tensor,
    flat_views: list[Tensor],
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
    """One TWA step: ``alpha <- SGD(alpha, P^T g)``, then ``params <- w0 + P alpha``.

    Args:
        params: the parameters, in the subspace's order (``p.grad`` may be None: zero gradient).
        flat: fp32 [D] work buffer; ``flat_views[i]`` is its slice shaped like ``params[i]``.
        w0: fp32 [D] origin. basis: [K, D] (the K used columns). scales: fp32 [K].
        alpha, momentum_buffer: fp32 [K]. counters: int64 [2]. gram: fp32 [K, K]. pw0: fp32 [K].
    """
    concrete = _backend.resolve(backend, flat.device)
    if concrete == "triton":
        from ._triton.step import fused_twa_step

        fused_twa_step(
            params, w0, basis, scales, alpha, momentum_buffer, counters, gram, pw0,
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov,
        )  # fmt: skip
        return
    gather_grads_(params, flat_views)
    coord_grad = _ops.project(basis, scales, flat, concrete)
    _ops.subspace_step_(
        alpha, momentum_buffer, counters, coord_grad, gram, pw0,
        lr, momentum, dampening, weight_decay, nesterov, concrete,
    )  # fmt: skip
    write_weights_(params, flat, flat_views, w0, basis, scales, alpha, concrete)


def write_weights_(
    params: list[Tensor],
    flat: Tensor,
    flat_views: list[Tensor],
    w0: Tensor,
    basis: Tensor,
    scales: Tensor,
    alpha: Tensor,
    backend: str,
) -> None:
    """``params <- w0 + P alpha``, through the flat buffer (each param rounded to its dtype)."""
    _ops.reconstruct_(flat, w0, basis, scales, alpha, backend)
    with torch.no_grad():
        torch._foreach_copy_([p.detach() for p in params], flat_views)
