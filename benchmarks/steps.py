"""The optimizer steps the step benchmarks compare.

- ``PublishedStep``: the published TWA code's step (twa-algorithm.md section 3.1): a dense fp32
  basis P [K, D], ``g = cat(grads)``, ``c = P g``, ``gp = P^T c`` (``torch.mm``), each
  ``p.grad`` replaced by a clone of its slice of gp, then ``torch.optim.SGD`` on all D weights.
- ``make_twa``: ``twa_kernels.TWA`` over a ``Subspace`` holding the benchmark basis.
"""

from __future__ import annotations

import torch
from torch import Tensor

import twa_kernels

from .shapes import fill_basis_, fill_int8_basis_

LR = 0.01
MOMENTUM = 0.9
# The published tail stage's weight decay (twa-algorithm.md section 3.2).
WEIGHT_DECAY = 5e-5


class PublishedStep:
    """The published step as a callable: ``step()`` after ``backward()``."""

    def __init__(self, params: list[Tensor], P: Tensor) -> None:
        self.params = params
        self.P = P
        self.opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    @torch.no_grad()
    def __call__(self) -> None:
        g = torch.cat([p.grad.reshape(-1) for p in self.params])
        c = torch.mm(self.P, g.view(-1, 1))
        gp = torch.mm(self.P.T, c).view(-1)
        start = 0
        for p in self.params:
            n = p.numel()
            p.grad.data = gp[start : start + n].view_as(p).clone()
            start += n
        self.opt.step()


def make_subspace(params, K: int, dtype: torch.dtype, w0: Tensor) -> twa_kernels.Subspace:
    """A ``Subspace`` of rank K holding the benchmark basis, with mean (start point) ``w0``.

    The basis is written in place and the rest restored through ``load_state_dict``: building
    it with K calls of ``add()`` would cost K orthogonalisations (seconds at GPU sizes) and
    allocate a second basis.
    """
    space = twa_kernels.Subspace(params, max_rank=K, dtype=dtype, backend="torch")
    scales = torch.empty_like(space.scales)  # [K], or [K, ceil(D / 64)] for int8
    if dtype == torch.int8:
        fill_int8_basis_(space.basis, scales)
    else:
        fill_basis_(space.basis, scales)
    state = {
        "layout": space.layout.signature(),
        "dtype": str(dtype).removeprefix("torch."),
        "max_rank": K,
        "tol": space.tol,
        "rank": K,
        "num_samples": K,
        "basis": space.basis,
        "scales": scales,
        "anchor": w0,
        "mean": w0,
        # sample i: one new column each (a consistent triangular factor, which loading checks)
        "coords": [torch.eye(K, dtype=torch.float64)[i, : i + 1] for i in range(K)],
    }
    space.load_state_dict(state)
    return space


def make_twa(
    params, K: int, dtype: torch.dtype, backend: str, w0: Tensor, granularity: str = "model"
) -> twa_kernels.TWA:
    space = make_subspace(params, K, dtype, w0)
    return twa_kernels.TWA(
        params, space, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, backend=backend,
        granularity=granularity,
    )  # fmt: skip
