"""Per-block coordinates on the Triton backend: the fused step of ``granularity="tensor"`` (or N)
and ``TWAAdamW`` in 4 launches, no host synchronisation.

1. ``step._step_project_kernel`` with SEGMENTED: each split's partial sums of ``P^T g``, one per
   coefficient row its blocks belong to, [S, L, K];
2. ``_segment_reduce_kernel``: row l's partials added over the splits that touched it, in split
   order (fixed, no atomics), times the row scales and the block's inverse column norms: ``c``
   [L, K]; each program also counts its non-finite values;
3. ``_block_step_kernel``: one program per block, the rule's update of ``a_l`` (skipped on every
   program when any count is non-zero), then ``coef_l = a_l * inv_norms_l``;
4. ``step._step_write_kernel`` with SEGMENTED: every parameter ``<- w0 + P coef[row]``.

``block_step_`` alone (a sharded step, whose coordinates come all-reduced) is launches 2 and 3:
the reduce reads its [L, K] input as a single split.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._layout import warn_if_narrow
from .._param_table import Plan, plan_for
from ._common import pow2
from .step import _project_partials, _row_scales, _write

# isfinite(x) is |x| <= FLT_MAX: false for +-inf and NaN.
_FLT_MAX = 3.4028234663852886e38
_REDUCE_BLOCK_K = 256
# Rows of a block's K coordinates per tile of the step, and Gram columns per inner tile.
_STEP_ROWS = 32
_STEP_COLS = 64


@triton.jit
def _segment_reduce_kernel(
    part_ptr, L, K, per, segblk_ptr, scales_ptr, inv_ptr, c_ptr, bad_ptr, counters_ptr, taken_ptr,
    HAS_SCALES: tl.constexpr, FOR_STEP: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program (l, t): ``c[l, t-th tile] = sum_s part[s, l, tile] * scales`` over the splits
    ``s`` that hold blocks of row l (blocks ``segblk[l]``, ``per`` blocks a split).

    FOR_STEP: times ``inv_norms[l]``, and ``bad[l, t]`` counts the non-finite values; program
    (0, 0) also copies the steps taken so far (``counters[0]``) into ``taken``, which the step
    reads while program 0 of it updates the counters."""
    l = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    offs = t * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    mask = offs < K
    b0 = tl.load(segblk_ptr + 2 * l)
    b1 = tl.load(segblk_ptr + 2 * l + 1)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    if b0 < b1:
        for s in range(b0 // per, (b1 - 1) // per + 1):
            acc += tl.load(part_ptr + (s * L + l) * K + offs, mask=mask, other=0.0)
    if HAS_SCALES:
        acc = acc * tl.load(scales_ptr + offs, mask=mask, other=0.0)
    if FOR_STEP:
        acc = acc * tl.load(inv_ptr + l * K + offs, mask=mask, other=0.0)
        bad = mask & ~(tl.abs(acc) <= _FLT_MAX)
        tl.store(bad_ptr + l * tl.num_programs(1) + t, tl.sum(bad.to(tl.int32), axis=0))
        if (l == 0) & (t == 0):
            tl.store(taken_ptr, tl.load(counters_ptr))
    tl.store(c_ptr + l * K + offs, acc, mask=mask)


@triton.jit
def _block_step_kernel(
    alpha_ptr, buf1_ptr, buf2_ptr, counters_ptr, c_ptr, gram_ptr, pw0_ptr, inv_ptr, coef_ptr,
    bad_ptr, NBAD, taken_ptr, lr_ptr, K, momentum, keep, weight_decay, beta1, beta2, log2_beta1,
    log2_beta2, eps,
    ADAMW: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, HAS_WD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_BAD: tl.constexpr,
):  # fmt: skip
    """Program l: block l's step (``reference.block_step_``). ``r = pw0 + G a`` is computed for
    every row into ``coef`` first (it reads all of ``a_l``), then each row tile updates ``a``,
    the moments and ``coef``; program 0 updates the counters."""
    l = tl.program_id(0).to(tl.int64)
    nbad = 0
    for f0 in range(0, NBAD, BLOCK_BAD):
        offs_f = f0 + tl.arange(0, BLOCK_BAD)
        nbad += tl.sum(tl.load(bad_ptr + offs_f, mask=offs_f < NBAD, other=0), axis=0)
    finite = nbad == 0
    taken = tl.load(taken_ptr)
    lr = tl.load(lr_ptr)
    base = l * K
    if HAS_WD:
        for r0 in range(0, K, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
            mask_r = rows < K
            g_alpha = tl.zeros([BLOCK_R], dtype=tl.float32)
            for c0 in range(0, K, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
                mask_c = cols < K
                a_c = tl.load(alpha_ptr + base + cols, mask=mask_c, other=0.0)
                g = tl.load(gram_ptr + (base + rows[:, None]) * K + cols[None, :],
                            mask=mask_r[:, None] & mask_c[None, :], other=0.0)  # fmt: skip
                g_alpha += tl.sum(g * a_c[None, :], axis=1)
            r = tl.load(pw0_ptr + base + rows, mask=mask_r, other=0.0) + g_alpha
            tl.store(coef_ptr + base + rows, r, mask=mask_r)
        # Every read of alpha (any row) ends before the first write, and r is visible to all.
        tl.debug_barrier()
    t = (taken + 1).to(tl.float32)
    for r0 in range(0, K, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        mask_r = rows < K
        at = base + rows
        a = tl.load(alpha_ptr + at, mask=mask_r, other=0.0)
        c = tl.load(c_ptr + at, mask=mask_r, other=0.0)
        r = tl.zeros([BLOCK_R], dtype=tl.float32)
        if HAS_WD:
            r = tl.load(coef_ptr + at, mask=mask_r, other=0.0)
        if ADAMW:
            decayed = a - lr * weight_decay * r
            m_old = tl.load(buf1_ptr + at, mask=mask_r, other=0.0)
            v_old = tl.load(buf2_ptr + at, mask=mask_r, other=0.0)
            m = m_old + (1 - beta1) * (c - m_old)
            v = beta2 * v_old + (1 - beta2) * c * c
            m_hat = m / (1 - tl.exp2(t * log2_beta1))
            v_hat = v / (1 - tl.exp2(t * log2_beta2))
            new = decayed - lr * m_hat / (tl.sqrt(v_hat) + eps)
            tl.store(buf1_ptr + at, tl.where(finite, m, m_old), mask=mask_r)
            tl.store(buf2_ptr + at, tl.where(finite, v, v_old), mask=mask_r)
        else:
            d = c + weight_decay * r
            update = d
            if HAS_MOMENTUM:
                buf_old = tl.load(buf1_ptr + at, mask=mask_r, other=0.0)
                buf = tl.where(taken == 0, d, momentum * buf_old + keep * d)
                tl.store(buf1_ptr + at, tl.where(finite, buf, buf_old), mask=mask_r)
                if NESTEROV:
                    update = d + momentum * buf
                else:
                    update = buf
            new = a - lr * update
        a = tl.where(finite, new, a)
        tl.store(alpha_ptr + at, a, mask=mask_r)
        tl.store(coef_ptr + at, a * tl.load(inv_ptr + at, mask=mask_r, other=0.0), mask=mask_r)
    if l == 0:
        tl.store(counters_ptr, taken + finite.to(tl.int64))
        tl.store(counters_ptr + 1, tl.load(counters_ptr + 1) + (~finite).to(tl.int64))


def _log2(beta: float) -> float:
    return math.log2(beta) if beta > 0 else -math.inf


def _reduce_and_step(
    part: Tensor, per: int, segblk: Tensor, row_scales: Tensor | None, work: dict, alpha: Tensor,
    buf1: Tensor, buf2: Tensor, counters: Tensor, gram: Tensor, pw0: Tensor, inv_norms: Tensor,
    coef: Tensor, lr: Tensor, rule: str, momentum: float, dampening: float, weight_decay: float,
    nesterov: bool, beta1: float, beta2: float, eps: float,
) -> None:  # fmt: skip
    """Launches 2 and 3 (see the module docstring); ``work``: the workspaces ``c`` fp32 [L, K],
    ``bad`` int32 [L * K tiles] and ``taken`` int64 [1]."""
    L, K = alpha.shape
    block_k = _reduce_block_k(K)
    tiles = triton.cdiv(K, block_k)
    _segment_reduce_kernel[(L, tiles)](
        part, L, K, per, segblk, row_scales, inv_norms, work["c"], work["bad"], counters, work["taken"],
        HAS_SCALES=row_scales is not None, FOR_STEP=True, BLOCK_K=block_k, num_warps=4,
    )  # fmt: skip
    sgd = rule == "sgd"
    _block_step_kernel[(L,)](
        alpha, buf1, buf2, counters, work["c"], gram, pw0, inv_norms, coef, work["bad"], L * tiles,
        work["taken"], lr, K, float(momentum), 1.0 - float(dampening), float(weight_decay), float(beta1),
        float(beta2), _log2(beta1), _log2(beta2), float(eps),
        ADAMW=not sgd, HAS_MOMENTUM=sgd and momentum != 0, NESTEROV=bool(nesterov),
        HAS_WD=weight_decay != 0, BLOCK_R=min(_STEP_ROWS, pow2(K)), BLOCK_C=min(_STEP_COLS, pow2(K)),
        BLOCK_BAD=min(1024, pow2(L * tiles)), num_warps=4,
    )  # fmt: skip


def _reduce_block_k(K: int) -> int:
    """Coordinates per program of the reduce: its grid is [L, cdiv(K, this)]."""
    return min(_REDUCE_BLOCK_K, pow2(K))


def _workspaces(make, L: int, K: int) -> dict:
    """The step's workspaces from ``make(name, numel)`` (fp32 storage; ints viewed on it)."""
    tiles = triton.cdiv(K, _reduce_block_k(K))
    return {
        "c": make("blocks_c", L * K).view(L, K),
        "bad": make("blocks_bad", L * tiles).view(torch.int32),
        "taken": make("blocks_taken", 2).view(torch.int64),
    }


def block_step_(
    alpha: Tensor, buf1: Tensor, buf2: Tensor, counters: Tensor, coord_grad: Tensor, gram: Tensor,
    pw0: Tensor, inv_norms: Tensor, coef: Tensor, lr: Tensor, rule: str, momentum: float,
    dampening: float, weight_decay: float, nesterov: bool, beta1: float, beta2: float, eps: float,
) -> None:  # fmt: skip
    """``twa::block_step_`` on the Triton backend (see ``reference.block_step_``): 2 launches,
    ``coord_grad`` read as the single split of the reduce."""
    L, K = alpha.shape
    dev = alpha.device
    work = _workspaces(lambda name, n: torch.empty(n, dtype=torch.float32, device=dev), L, K)
    segblk = _single_split(L, dev)
    _reduce_and_step(
        coord_grad, 1, segblk, None, work, alpha, buf1, buf2, counters, gram, pw0, inv_norms, coef, lr,
        rule, momentum, dampening, weight_decay, nesterov, beta1, beta2, eps,
    )  # fmt: skip


_single_splits: dict[tuple, Tensor] = {}


def _single_split(L: int, device: torch.device) -> Tensor:
    """int64 [L, 2] of ``(0, 1)``: every row in split 0 of a one-split reduce (made once)."""
    key = (L, device)
    if key not in _single_splits:
        _single_splits[key] = torch.tensor([[0, 1]] * L, dtype=torch.int64).to(device)
    return _single_splits[key]


def _segmented_partials(
    plan: Plan, ptab: Tensor, basis: Tensor, scales: Tensor, grads: list[Tensor | None], segments: list[int],
    L: int,
) -> tuple[Tensor, int]:  # fmt: skip
    """Launch 1: the partials [S, L, K] of each split's rows, and the blocks per split (how the
    reduce finds the splits that hold a row's blocks)."""
    part = _project_partials(plan, ptab, basis, scales, grads, plan.segment_table(segments), L)
    return part, triton.cdiv(max(plan.nblk, 1), part.shape[0])


def project_segments(
    plan: Plan, ptab: Tensor, basis: Tensor, scales: Tensor, grads: list[Tensor | None], segments: list[int]
) -> Tensor:
    """``twa::project_grads`` with segments: the segmented projection and the reduce (no inverse
    norms, no counts), fp32 [rows, K]."""
    K, L = basis.shape[0], segments[-1] + 1
    part, per = _segmented_partials(plan, ptab, basis, scales, grads, segments, L)
    out = torch.empty(L, K, dtype=torch.float32, device=basis.device)
    block_k = _reduce_block_k(K)
    row_scales = _row_scales(basis, scales)
    _segment_reduce_kernel[(L, triton.cdiv(K, block_k))](
        part, L, K, per, plan.segment_blocks(segments), row_scales, None, out, None, None, None,
        HAS_SCALES=row_scales is not None, FOR_STEP=False, BLOCK_K=block_k, num_warps=4,
    )  # fmt: skip
    return out


def step_blocks_(
    params: list[Tensor], grads: list[Tensor | None], workspace: Tensor | None, w0: Tensor,
    basis: Tensor, scales: Tensor, alpha: Tensor, buf1: Tensor, buf2: Tensor, counters: Tensor,
    gram: Tensor, pw0: Tensor, inv_norms: Tensor, coef: Tensor, segments: list[int], lr: Tensor,
    rule: str, momentum: float, dampening: float, weight_decay: float, nesterov: bool, beta1: float,
    beta2: float, eps: float,
) -> None:  # fmt: skip
    """``twa::step_blocks_`` on the Triton backend (see ``reference.step_blocks_``): the grads read
    and the parameters written in place, 4 launches; ``workspace`` is not used. Capturable in a
    CUDA graph after one eager step, as ``step_``."""
    warn_if_narrow(basis, "triton")
    L, K = alpha.shape
    plan = plan_for(params, basis.device)
    ptab, keep = plan.table(params, grads)
    part, per = _segmented_partials(plan, ptab, basis, scales, grads, segments, L)
    work = _workspaces(lambda name, n: plan.workspace(name, (n,)), L, K)
    _reduce_and_step(
        part, per, plan.segment_blocks(segments), _row_scales(basis, scales), work, alpha, buf1, buf2,
        counters, gram, pw0, inv_norms, coef, lr, rule, momentum, dampening, weight_decay, nesterov,
        beta1, beta2, eps,
    )  # fmt: skip
    _write(plan, ptab, w0, basis, scales, coef, plan.segment_table(segments))
    del keep  # contiguous copies of strided grads live until all launches are queued
