"""``subspace_step_``: the K-dimensional SGD update, in one program, without host sync.

One program holds all K coordinates (``KP = next_power_of_2(K)`` lanes, K <= 8192 = ``MAX_RANK``)
and walks the Gram matrix in BLOCK_J column tiles, so every read of ``alpha`` happens before any
write of it. With ``FROM_PARTIALS`` the program first finishes a projection: it adds the S
partial sums of stage 1 in a fixed order and applies the row scales (the fused step's stage 2).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ._common import fold_partials, pow2

# [KP, BLOCK_J] Gram tiles and [BLOCK_S, KP] tiles of stage-1 partials: 8K fp32, 32 values per
# thread at 8 warps (sm_90 code: 72-226 registers, no local memory; at 4 warps KP = 64 spilled).
# At small K the S partials (528 on an H200) then take one step instead of 17 loads of 32 rows.
_TILE_ELEMENTS = 8192


@triton.jit
def _subspace_step_kernel(
    alpha_ptr, buf_ptr, counters_ptr, grad_ptr, part_ptr, scales_ptr, S, gram_ptr, pw0_ptr, K,
    lr_ptr, momentum, keep, weight_decay,
    FROM_PARTIALS: tl.constexpr, HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr, KP: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    offs = tl.arange(0, KP).to(tl.int64)
    mask = offs < K
    if FROM_PARTIALS:
        c = fold_partials(part_ptr, S, K, offs, mask, BLOCK_S, False)
        if scales_ptr is not None:  # None: an int8 basis, whose block scales are in the partials
            c = c * tl.load(scales_ptr + offs, mask=mask, other=0.0)
        tl.store(grad_ptr + offs, c, mask=mask)
    else:
        c = tl.load(grad_ptr + offs, mask=mask, other=0.0)
    # isfinite: |c| <= FLT_MAX is false for +-inf and for NaN (every comparison with NaN is false).
    bad = mask & ~(tl.abs(c) <= 3.4028234663852886e38)
    finite = tl.sum(bad.to(tl.int32), axis=0) == 0

    alpha = tl.load(alpha_ptr + offs, mask=mask, other=0.0)
    d = c
    if HAS_WD:
        g_alpha = tl.zeros([KP], dtype=tl.float32)
        for j0 in range(0, K, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
            mask_j = offs_j < K
            a_j = tl.load(alpha_ptr + offs_j, mask=mask_j, other=0.0)
            ptrs = gram_ptr + offs[:, None] * K + offs_j[None, :]
            g = tl.load(ptrs, mask=mask[:, None] & mask_j[None, :], other=0.0)
            g_alpha += tl.sum(g * a_j[None, :], axis=1)
        pw0 = tl.load(pw0_ptr + offs, mask=mask, other=0.0)
        d = c + weight_decay * (pw0 + g_alpha)
    taken = tl.load(counters_ptr)
    skipped = tl.load(counters_ptr + 1)
    if HAS_MOMENTUM:
        buf_old = tl.load(buf_ptr + offs, mask=mask, other=0.0)
        buf = tl.where(taken == 0, d, momentum * buf_old + keep * d)
        if NESTEROV:
            update = d + momentum * buf
        else:
            update = buf
    else:
        update = d
    new_alpha = tl.where(finite, alpha - tl.load(lr_ptr) * update, alpha)
    # The Gram loop read alpha in another layout (other threads): all reads end before any write.
    tl.debug_barrier()
    if HAS_MOMENTUM:
        tl.store(buf_ptr + offs, tl.where(finite, buf, buf_old), mask=mask)
    tl.store(alpha_ptr + offs, new_alpha, mask=mask)
    tl.store(counters_ptr, taken + finite.to(tl.int64))
    tl.store(counters_ptr + 1, skipped + (~finite).to(tl.int64))


NUM_WARPS = 8


def launch_constexprs(K: int) -> dict:
    """The tile sizes of the kernel for K coordinates (K <= 8192 = ``_ops.MAX_RANK``: above it
    a [BLOCK_S, KP] tile of partials would have no rows)."""
    KP = pow2(K)
    return {"KP": KP, "BLOCK_J": max(1, min(KP, _TILE_ELEMENTS // KP)), "BLOCK_S": _TILE_ELEMENTS // KP}


def launch(
    alpha: Tensor, momentum_buffer: Tensor, counters: Tensor, coord_grad: Tensor, gram: Tensor,
    pw0: Tensor, lr: Tensor, momentum: float, dampening: float, weight_decay: float,
    nesterov: bool, part: Tensor | None = None, scales: Tensor | None = None,
) -> None:  # fmt: skip
    """Run the step; with ``part`` [S, K], first set ``coord_grad`` to their sum times
    ``scales`` [K] (None: the partials are already scaled, as an int8 basis's are)."""
    K = alpha.shape[0]
    from_partials = part is not None
    _subspace_step_kernel[(1,)](
        alpha, momentum_buffer, counters, coord_grad,
        part if from_partials else coord_grad, scales if from_partials else None,
        part.shape[0] if from_partials else 0,
        gram, pw0, K, lr, float(momentum), float(1.0 - dampening), float(weight_decay),
        FROM_PARTIALS=from_partials, HAS_WD=weight_decay != 0, HAS_MOMENTUM=momentum != 0,
        NESTEROV=bool(nesterov), **launch_constexprs(K), num_warps=NUM_WARPS,
    )  # fmt: skip


def subspace_step_(
    alpha: Tensor, momentum_buffer: Tensor, counters: Tensor, coord_grad: Tensor, gram: Tensor,
    pw0: Tensor, lr: Tensor, momentum: float, dampening: float, weight_decay: float,
    nesterov: bool,
) -> None:  # fmt: skip
    launch(
        alpha, momentum_buffer, counters, coord_grad, gram, pw0,
        lr, momentum, dampening, weight_decay, nesterov,
    )  # fmt: skip
