"""Per-block coefficients (the published follow-up of TWA): D cut into blocks of consecutive
tensors (``_params.coefficient_blocks``), each block l with its own coefficients ``a_l`` [K].

With ``P_l`` the stored columns restricted to block l and divided by their norms there (a column
with zero norm on the block stays zero, and its coordinate never moves):

    w_l = w0_l + P_l a_l,   c_l = P_l^T g_l,   r_l = P_l^T w_l = P_l^T w0_l + G_l a_l,

``G_l = P_l^T P_l`` (the k norms and the [L, k, k] Gram matrices computed once). Without
normalisation and with one block this is the published TWA's ``w = w0 + P alpha``.

The step on one process is the fused ``twa::step_blocks_`` (a segmented projection, the
[L, K] step, a write taking each parameter's row); on a sharded subspace (FSDP2, or a process
group) its parts run on each rank's pieces of the parameters around an all-reduce of the [L, K]
coordinate gradients. ``project`` below (w0's projection, once) runs the plain-PyTorch
per-block pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _collectives, reference


class BlockCoordinates:
    """The per-block normalisation, Gram matrices and passes over D of one subspace's columns."""

    def __init__(
        self, basis: Tensor, scales: Tensor, blocks: list[tuple[int, int]], segments: list[int],
        normalise: bool, group=None,
    ):  # fmt: skip
        """``blocks``: each block's range of the values held here (``local_blocks``);
        ``segments``: each parameter's block (``_params.block_segments``); ``group``: the
        subspace's process group, whose ranks' partial sums are all-reduced (None: none)."""
        self.blocks = blocks
        self.segments = segments
        self.group = group
        raw = block_grams(basis, scales, blocks, group)  # fp64 [L, K, K]
        if normalise:
            norms = raw.diagonal(dim1=1, dim2=2).sqrt()
            inv = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
        else:
            inv = torch.ones(raw.shape[:2], dtype=torch.float64, device=raw.device)
        self.raw_gram = raw
        # fp32 [L, K]: a_l's coefficient on the stored (unnormalised) columns is inv_l * a_l.
        self.inv_norms = inv.float()
        self.gram = (raw * inv[:, :, None] * inv[:, None, :]).float()  # G_l, fp32 [L, K, K]
        # fp32 [L, K]: the coefficients of the stored columns, inv_norms * a (written by the step)
        self.coef = torch.zeros_like(self.inv_norms)

    def project(self, basis: Tensor, scales: Tensor, x: Tensor) -> Tensor:
        """``P_l^T x_l`` for every block (x: the values held here): fp32 [L, K], the same on
        every rank (one all-reduce of L K floats with a process group)."""
        return block_projections(basis, scales, x, self.blocks, self.group) * self.inv_norms


def block_grams(basis: Tensor, scales: Tensor, blocks: list[tuple[int, int]], group) -> Tensor:
    """The stored columns' Gram matrix on each block (local ranges ``blocks``), fp64 [L, K, K],
    summed over the ranks of ``group`` (None: this process holds all of D)."""
    return _summed(reference.gram_blocks(basis, scales, blocks), group)


def block_projections(
    basis: Tensor, scales: Tensor, x: Tensor, blocks: list[tuple[int, int]], group
) -> Tensor:
    """The stored columns times ``x`` (the values held here) on each block, fp32 [L, K], summed
    over the ranks of ``group``."""
    return _summed(reference.project_blocks(basis, scales, x, blocks), group)


def _summed(t: Tensor, group) -> Tensor:
    return t if group is None else _collectives.all_reduce_(t, group)


def local_blocks(
    blocks: list[tuple[int, int]], pieces: list[tuple[int, int, int]], layout
) -> list[tuple[int, int]]:
    """Each block's range ``[start, stop)`` of D as a range of the values held here (the
    concatenated ``pieces`` of the parameters, in order); empty where this process holds none
    of it. A block of consecutive tensors is one run of the local values: the pieces are in
    parameter order and each is a contiguous part of its parameter."""
    out = []
    for start, stop in blocks:
        at, first, last = 0, None, None
        for i, a, b in pieces:
            lo, hi = layout.offsets[i] + a, layout.offsets[i] + b
            s, e = max(lo, start), min(hi, stop)
            if s < e:
                first = at + (s - lo) if first is None else first
                last = at + (e - lo)
            at += b - a
        out.append((first, last) if first is not None else (0, 0))
    return out
