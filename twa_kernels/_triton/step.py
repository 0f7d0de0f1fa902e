"""The fused TWA step: gradients of a parameter list in, parameters out, in 3 kernel launches.

1. ``_step_project_kernel``: ``P^T g`` straight from the ``.grad`` tensors (stage 1 partials);
2. ``subspace_step._subspace_step_kernel`` with ``FROM_PARTIALS``: adds the partials in a fixed
   order, applies the scales and takes the K-dimensional SGD step (skipped on the device when
   the coordinate gradient is not finite);
3. ``_step_write_kernel``: ``w = w0 + P alpha`` written into every parameter in its dtype.

An int8 basis has kernels of its own for stages 1 and 3 (``_step_project_int8_kernel``,
``_step_write_int8_kernel``): single-warp programs walk each K tile row by row, every lane's
16 values taking their block scale, so the partials come out scaled and stage 2 applies none.

Stage 3 alone is ``twa::write_params_``; with SEGMENTED, stages 1 and 3 take one coefficient row
per parameter (per-block coordinates: ``blocks``, whose fused step is 4 launches).

The parameters are cut into blocks of ``BLOCK`` columns that never straddle two parameters;
the block and parameter tables (``twa_kernels._param_table``, shared with the CUDA step) tell
each block where its basis columns, its grad and its parameter are. CUDA graphs: the step can
be captured once an eager step has run with the very ``.grad`` tensors the graph will read
(that step also autotunes and compiles the kernels); see ``_param_table``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _param_table as table
from .._layout import blockwise, warn_if_narrow
from .._ops import check_rank
from .._param_table import BLOCK, BLOCK_FIELDS, FIELDS, Plan, plan_for
from . import subspace_step
from ._common import (
    QBLOCK,
    QRUN,
    add_combination,
    configs,
    group_dot,
    int8_to_float,
    launched_config,
    most_wave_splits,
    to_storage,
    tuned,
    wave_grid,
    wave_splits,
)
from .project import reduce_partials

# Parameter table columns, as the kernels read them.
NUMEL = tl.constexpr(table.NUMEL)
PARAM_DTYPE = tl.constexpr(table.PARAM_DTYPE)
GRAD_DTYPE = tl.constexpr(table.GRAD_DTYPE)
PARAM_ADDR = tl.constexpr(table.PARAM_ADDR)
GRAD_ADDR = tl.constexpr(table.GRAD_ADDR)
ALIGNED = tl.constexpr(table.ALIGNED)

# Projection: [BLOCK_K, 512] basis tiles, the next block's tile and grad prefetched while one is
# summed. PROGRAMS_PER_SM is the one wave the grid fills: what the compiled code's registers
# allow for every basis dtype and grad kind (tests/test_triton_codegen.py), e.g. [4, 512] at 2
# warps: 168-227 registers, 4-6 programs per SM.
_PROJECT_CONFIGS = [
    triton.Config({"BLOCK_K": 4, "PROGRAMS_PER_SM": 4}, num_warps=2),
    triton.Config({"BLOCK_K": 8, "PROGRAMS_PER_SM": 2}, num_warps=4),
    triton.Config({"BLOCK_K": 16, "PROGRAMS_PER_SM": 1}, num_warps=8),
]
# Write pass: one program per block; the block's 512 columns lie across the threads of at most
# 512 / (8 x 32) = 2 warps (fp16: 8 values per 16 bytes), so the sum over a K tile stays in each
# thread (more warps would share columns and reduce through shared memory on every tile).
# [16, 512] spilled (255 registers).
_WRITE_CONFIGS = [
    triton.Config({"BLOCK_K": 8}, num_warps=2),
    triton.Config({"BLOCK_K": 4}, num_warps=2),
]

# int8 basis: a block row of 512 values is one 16-byte load for each lane of one warp, so the
# programs are single warps that walk their K tile row by row (each lane's 16 values share one
# block scale, ``_int8_row``), BLOCK_K loads in flight per lane; many programs share an SM. The
# projection's sm_90 code takes 156-168 registers: 12 programs per SM fit (4-6 KB of basis
# loads in flight each).
_PROJECT_CONFIGS_Q = [
    triton.Config({"BLOCK_K": 8, "PROGRAMS_PER_SM": 12}, num_warps=1),
    triton.Config({"BLOCK_K": 16, "PROGRAMS_PER_SM": 8}, num_warps=1),
]
# Write pass: 210 (BLOCK_K 8) and 239 (16) registers, 8-9 single-warp programs per SM.
_WRITE_CONFIGS_Q = [
    triton.Config({"BLOCK_K": 8}, num_warps=1),
    triton.Config({"BLOCK_K": 16}, num_warps=1),
]


@triton.jit
def _load_as_f32(addr, code, offs, mask, GRAD_CODE: tl.constexpr):
    """The grad at ``addr`` (dtype ``code``) as fp32; zeros for NO_GRAD.

    GRAD_CODE >= 0: every grad of the list has that dtype (or none), one typed load. Otherwise
    exactly one of three masked loads is live: no memory is touched through a pointer of the
    wrong type, at the cost of 46 more registers in the projection (214 against 168 for a
    [8, 512] fp16 tile at 4 warps, sm_90)."""
    if GRAD_CODE == 0:
        return tl.load(addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask & (code == 0), other=0.0)
    elif GRAD_CODE == 1:
        b = tl.load(addr.to(tl.pointer_type(tl.bfloat16)) + offs, mask=mask & (code == 1), other=0.0)
        return b.to(tl.float32)
    elif GRAD_CODE == 2:
        h = tl.load(addr.to(tl.pointer_type(tl.float16)) + offs, mask=mask & (code == 2), other=0.0)
        return h.to(tl.float32)
    else:
        v = tl.load(addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask & (code == 0), other=0.0)
        b = tl.load(addr.to(tl.pointer_type(tl.bfloat16)) + offs, mask=mask & (code == 1), other=0.0)
        h = tl.load(addr.to(tl.pointer_type(tl.float16)) + offs, mask=mask & (code == 2), other=0.0)
        return v + b.to(tl.float32) + h.to(tl.float32)


@triton.jit
def _store_from_f32(addr, code, offs, val, mask):
    tl.store(addr.to(tl.pointer_type(tl.float32)) + offs, val, mask=mask & (code == 0))
    tl.store(
        addr.to(tl.pointer_type(tl.bfloat16)) + offs,
        to_storage(val, tl.bfloat16),
        mask=mask & (code == 1),
    )
    tl.store(addr.to(tl.pointer_type(tl.float16)) + offs, val.to(tl.float16), mask=mask & (code == 2))


@triton.jit
def _entry(ptab_ptr, btab_ptr, blk, FIELDS: tl.constexpr, BLOCK_FIELDS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Block ``blk``: its block table row, its parameter's table row, and whether it is FAST
    (whole, and its parameter flagged aligned in the table)."""
    entry = btab_ptr + BLOCK_FIELDS * blk
    row = ptab_ptr + tl.load(entry) * FIELDS
    fast = (tl.load(entry + 3) == BLOCK_D) & (tl.load(row + ALIGNED) != 0)
    return entry, row, fast


@triton.jit
def _block(entry, row, BLOCK_D: tl.constexpr, FAST: tl.constexpr):
    """The block's ``(local offsets, mask, basis columns)``.

    A FAST block is whole (no mask) and its parameter, grad and basis columns start 16-byte
    aligned (the table's ALIGNED field); the hints let the compiler prove it and load the
    basis rows in 16-byte vectors, where a column mask or an unknown offset gives 2-byte loads.
    The hints attach to the loads made here: on a value passed in from another function the
    compiler drops them (and every basis load became a 2-byte one).
    """
    first = tl.load(entry + 1)
    col0 = tl.load(entry + 2)
    if FAST:
        first = tl.multiple_of(first, 16)
        col0 = tl.multiple_of(col0, 16)
        mask = tl.full([BLOCK_D], 1, tl.int1)
    local = first + tl.arange(0, BLOCK_D).to(tl.int64)
    if not FAST:
        mask = local < tl.load(row + NUMEL)
    return local, mask, col0 + tl.arange(0, BLOCK_D).to(tl.int64)


@triton.jit
def _address(row, field, FAST: tl.constexpr):
    addr = tl.load(row + field)
    if FAST:
        addr = tl.multiple_of(addr, 16)
    return addr


@triton.jit
def _grad_tile(
    entry, row, rows, mask_k,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, GRAD_CODE: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    """The block's basis tile (rows ``rows`` [BLOCK_K, 1]) and its grad (fp32, broadcast over
    the rows so that it has the tile's layout; see ``project._column_tile``)."""
    local, mask_d, cols = _block(entry, row, BLOCK_D, FAST)
    p = tl.load(rows + cols[None, :], mask=mask_k[:, None] & mask_d[None, :], other=0.0,
                eviction_policy="evict_first")  # fmt: skip
    same = tl.zeros([BLOCK_K, 1], dtype=tl.int64)
    addr, code = _address(row, GRAD_ADDR, FAST), tl.load(row + GRAD_DTYPE)
    g = _load_as_f32(addr, code, same + local[None, :], mask_d[None, :], GRAD_CODE)
    return p, g


@triton.jit
def _fetch(
    ptab_ptr, btab_ptr, blk, rows, mask_k,
    FIELDS: tl.constexpr, BLOCK_FIELDS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    GRAD_CODE: tl.constexpr,
):  # fmt: skip
    """Block ``blk``'s basis tile and grad (see ``_grad_tile``), FAST or masked."""
    entry, row, fast = _entry(ptab_ptr, btab_ptr, blk, FIELDS, BLOCK_FIELDS, BLOCK_D)
    if fast:
        p, g = _grad_tile(entry, row, rows, mask_k, BLOCK_K, BLOCK_D, GRAD_CODE, FAST=True)
    else:
        p, g = _grad_tile(entry, row, rows, mask_k, BLOCK_K, BLOCK_D, GRAD_CODE, FAST=False)
    return p, g


@triton.jit
def _split_blocks(NBLK):
    """Program (t, s) of a projection: its K tile t, its split s and the split's run of
    consecutive blocks ``[b_lo, b_hi)`` (one run per split, as even as the grid allows)."""
    t = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    per = tl.cdiv(NBLK, tl.num_programs(1)).to(tl.int64)
    b_lo = s * per
    return t, s, b_lo, tl.minimum(b_lo + per, NBLK)


@triton.autotune(configs=configs(_PROJECT_CONFIGS), key=["K", "NBLK"])
@triton.heuristics({"GROUP": lambda args: 16 // args["basis_ptr"].element_size()})
@triton.jit
def _step_project_kernel(
    ptab_ptr, btab_ptr, basis_ptr, row_stride, part_ptr, seg_ptr, L, K, NBLK,
    FIELDS: tl.constexpr, BLOCK_FIELDS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr, GRAD_CODE: tl.constexpr, GROUP: tl.constexpr,
    SEGMENTED: tl.constexpr,
):  # fmt: skip
    """Program (t, s): rows ``[t * BLOCK_K, (t + 1) * BLOCK_K)`` of ``P^T g`` over split s (a run
    of consecutive blocks), summed in a register tile with the next block's basis tile and grad
    prefetched, reduced once into ``part[s, rows]``. The programs of a split run side by side (t fastest),
    so its grads come from DRAM about once.

    SEGMENTED (per-block coordinates): the tile is stored into ``part[s, row, rows]`` [S, L, K]
    and restarted wherever the coefficient row (``seg`` of the block's parameter) changes; a
    split's run of blocks covers a run of consecutive rows, and only those entries are written
    (``_segment_reduce_kernel`` reads no others)."""
    t, s, b_lo, b_hi = _split_blocks(NBLK)
    offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    mask_k = offs_k < K
    rows = basis_ptr + offs_k[:, None] * row_stride
    tile = tl.zeros([BLOCK_K, BLOCK_D // GROUP], dtype=tl.float32)
    if b_lo < b_hi:
        if SEGMENTED:
            cur = _segment(btab_ptr, seg_ptr, b_lo, BLOCK_FIELDS)
        # Register prefetch: block i + 1's tile and grad are loaded before block i is summed.
        p, g = _fetch(
            ptab_ptr, btab_ptr, b_lo, rows, mask_k, FIELDS, BLOCK_FIELDS, BLOCK_K, BLOCK_D, GRAD_CODE
        )
        for blk in range(b_lo + 1, b_hi):
            p_next, g_next = _fetch(
                ptab_ptr, btab_ptr, blk, rows, mask_k, FIELDS, BLOCK_FIELDS, BLOCK_K, BLOCK_D, GRAD_CODE
            )
            tile = group_dot(tile, p, g, BLOCK_K, BLOCK_D, GROUP)
            if SEGMENTED:
                nxt = _segment(btab_ptr, seg_ptr, blk, BLOCK_FIELDS)
                if nxt != cur:
                    tl.store(part_ptr + (s * L + cur) * K + offs_k, tl.sum(tile, axis=1), mask=mask_k)
                    tile = tl.zeros([BLOCK_K, BLOCK_D // GROUP], dtype=tl.float32)
                    cur = nxt
            p, g = p_next, g_next
        tile = group_dot(tile, p, g, BLOCK_K, BLOCK_D, GROUP)
        if SEGMENTED:
            tl.store(part_ptr + (s * L + cur) * K + offs_k, tl.sum(tile, axis=1), mask=mask_k)
    if not SEGMENTED:
        tl.store(part_ptr + s * K + offs_k, tl.sum(tile, axis=1), mask=mask_k)


@triton.jit
def _segment(btab_ptr, seg_ptr, blk, BLOCK_FIELDS: tl.constexpr):
    """The coefficient row of block ``blk``'s parameter."""
    return tl.load(seg_ptr + tl.load(btab_ptr + BLOCK_FIELDS * blk))


@triton.jit
def _block_write(
    entry, row, w0_ptr, basis_ptr, row_stride, scales_ptr, alpha_ptr, K,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    """The block's parameter values ``w0 + P alpha``, written in the parameter's dtype."""
    local, mask_d, cols = _block(entry, row, BLOCK_D, FAST)
    acc = tl.load(w0_ptr + cols, mask=mask_d, other=0.0)
    acc = add_combination(acc, basis_ptr, row_stride, scales_ptr, alpha_ptr, K, cols, mask_d, BLOCK_K)
    _store_from_f32(_address(row, PARAM_ADDR, FAST), tl.load(row + PARAM_DTYPE), local, acc, mask_d)


@triton.jit
def _coefficients(alpha_ptr, seg_ptr, entry, K, SEGMENTED: tl.constexpr):
    """The coefficient vector of the block's parameter: ``alpha`` [K], or its row
    ``seg[param]`` of alpha [rows, K] when SEGMENTED (per-block coordinates)."""
    if SEGMENTED:
        alpha_ptr += tl.load(seg_ptr + tl.load(entry)) * K
    return alpha_ptr


@triton.autotune(configs=configs(_WRITE_CONFIGS), key=["K", "NBLK"])
@triton.jit
def _step_write_kernel(
    ptab_ptr, btab_ptr, w0_ptr, basis_ptr, row_stride, scales_ptr, alpha_ptr, seg_ptr, K, NBLK,
    FIELDS: tl.constexpr, BLOCK_FIELDS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    SEGMENTED: tl.constexpr,
):  # fmt: skip
    """One program per block (no reduction crosses programs, so the grid is not capped)."""
    blk = tl.program_id(0).to(tl.int64)
    entry, row, fast = _entry(ptab_ptr, btab_ptr, blk, FIELDS, BLOCK_FIELDS, BLOCK_D)
    alpha_ptr = _coefficients(alpha_ptr, seg_ptr, entry, K, SEGMENTED)
    if fast:
        _block_write(
            entry, row, w0_ptr, basis_ptr, row_stride, scales_ptr, alpha_ptr, K,
            BLOCK_K, BLOCK_D, FAST=True,
        )  # fmt: skip
    else:
        _block_write(
            entry, row, w0_ptr, basis_ptr, row_stride, scales_ptr, alpha_ptr, K,
            BLOCK_K, BLOCK_D, FAST=False,
        )  # fmt: skip


# ---- int8 basis: block scales per 64 columns, K tiles walked row by row ---------------------


@triton.jit
def _int8_start(entry, FAST: tl.constexpr):
    """The block's first basis column; a FAST block's is a multiple of 16 (its parameter's flat
    offset is, and blocks start every 512 values), so each lane's 16 values share one scale."""
    col0 = tl.load(entry + 2)
    if FAST:
        col0 = tl.multiple_of(col0, 16)
    return col0


@triton.jit
def _int8_row(
    basis_ptr, row_stride, scales_ptr, scale_stride, k, ok, col0, mask_d,
    BLOCK_D: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    """Row ``k`` (zeros unless ``ok``) of the int8 basis at the block's columns ``col0 + [0,
    BLOCK_D)``: the values as fp32 [BLOCK_D // 16, 16] and their block scales, one per run of 16
    [BLOCK_D // 16] (FAST) or one per value [BLOCK_D // 16, 16] (a masked block, whose columns
    may start anywhere in a scale block)."""
    k = tl.cast(k, tl.int64)
    if FAST:
        col0 = tl.multiple_of(col0, 16)
    cols = col0 + tl.arange(0, BLOCK_D)
    q = tl.load(basis_ptr + k * row_stride + cols, mask=ok & mask_d, other=0, eviction_policy="evict_first")
    q = tl.reshape(int8_to_float(q), (BLOCK_D // QRUN, QRUN))
    scales_row = scales_ptr + k * scale_stride
    if FAST:
        runs = col0 // QRUN + tl.arange(0, BLOCK_D // QRUN)
        scale = tl.load(scales_row + runs // (QBLOCK // QRUN), mask=ok, other=0.0)
    else:
        scale = tl.load(scales_row + cols // QBLOCK, mask=ok & mask_d, other=0.0)
        scale = tl.reshape(scale, (BLOCK_D // QRUN, QRUN))
    return q, scale


@triton.jit
def _int8_block_dot(
    tile, entry, row, basis_ptr, row_stride, scales_ptr, scale_stride, t, K,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, GRAD_CODE: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    """``tile`` [BLOCK_K, BLOCK_D // 16] plus rows ``t * BLOCK_K + r`` of the basis times the
    block's grad, each run of 16 columns summed in its lane. A FAST block's rows are unrolled
    (BLOCK_K 16-byte loads in flight); a masked block's are walked one at a time (16 one-byte
    loads per lane and row)."""
    local, mask_d, _ = _block(entry, row, BLOCK_D, FAST)
    col0 = _int8_start(entry, FAST)
    addr, code = _address(row, GRAD_ADDR, FAST), tl.load(row + GRAD_DTYPE)
    g = _load_as_f32(addr, code, local, mask_d, GRAD_CODE)
    g = tl.reshape(g, (BLOCK_D // QRUN, QRUN))
    if FAST:
        for r in tl.static_range(BLOCK_K):
            k = t * BLOCK_K + r
            q, scale = _int8_row(
                basis_ptr, row_stride, scales_ptr, scale_stride, k, k < K, col0, mask_d, BLOCK_D, FAST
            )
            sums = tl.sum(q * g, axis=1) * scale
            # r is known when compiled: the select picks row r's registers there.
            tile = tl.where(tl.arange(0, BLOCK_K)[:, None] == r, tile + sums[None, :], tile)
    else:
        for r in tl.range(0, BLOCK_K, loop_unroll_factor=1):
            k = t * BLOCK_K + r
            q, scale = _int8_row(
                basis_ptr, row_stride, scales_ptr, scale_stride, k, k < K, col0, mask_d, BLOCK_D, FAST
            )
            sums = tl.sum(q * scale * g, axis=1)
            tile = tl.where(tl.arange(0, BLOCK_K)[:, None] == r, tile + sums[None, :], tile)
    return tile


@triton.autotune(configs=configs(_PROJECT_CONFIGS_Q), key=["K", "NBLK"])
@triton.jit
def _step_project_int8_kernel(
    ptab_ptr, btab_ptr, basis_ptr, row_stride, scales_ptr, scale_stride, part_ptr, seg_ptr, L, K, NBLK,
    FIELDS: tl.constexpr, BLOCK_FIELDS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr, GRAD_CODE: tl.constexpr, SEGMENTED: tl.constexpr,
):  # fmt: skip
    """``_step_project_kernel``'s grid and partials for an int8 basis, block scales applied:
    program (t, s) writes ``part[s, t * BLOCK_K + i]`` (SEGMENTED: ``part[s, row, ...]``, the
    blocks walked in order in one loop, whole or masked)."""
    t, s, b_lo, b_hi = _split_blocks(NBLK)
    tile = tl.zeros([BLOCK_K, BLOCK_D // QRUN], dtype=tl.float32)
    if SEGMENTED:
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
        if b_lo < b_hi:
            cur = _segment(btab_ptr, seg_ptr, b_lo, BLOCK_FIELDS)
            for blk in range(b_lo, b_hi):
                nxt = _segment(btab_ptr, seg_ptr, blk, BLOCK_FIELDS)
                if nxt != cur:
                    tl.store(part_ptr + (s * L + cur) * K + offs_k, tl.sum(tile, axis=1), mask=offs_k < K)
                    tile = tl.zeros([BLOCK_K, BLOCK_D // QRUN], dtype=tl.float32)
                    cur = nxt
                entry, row, fast = _entry(ptab_ptr, btab_ptr, blk, FIELDS, BLOCK_FIELDS, BLOCK_D)
                if fast:
                    tile = _int8_block_dot(
                        tile, entry, row, basis_ptr, row_stride, scales_ptr, scale_stride, t, K,
                        BLOCK_K, BLOCK_D, GRAD_CODE, FAST=True,
                    )  # fmt: skip
                else:
                    tile = _int8_block_dot(
                        tile, entry, row, basis_ptr, row_stride, scales_ptr, scale_stride, t, K,
                        BLOCK_K, BLOCK_D, GRAD_CODE, FAST=False,
                    )  # fmt: skip
            tl.store(part_ptr + (s * L + cur) * K + offs_k, tl.sum(tile, axis=1), mask=offs_k < K)
        return
    # Whole aligned blocks first, in a loop of their own: a masked block's row loop nested in
    # it would make this loop an outer one, whose unrolled rows the compiler schedules apart.
    for blk in range(b_lo, b_hi):
        entry, row, fast = _entry(ptab_ptr, btab_ptr, blk, FIELDS, BLOCK_FIELDS, BLOCK_D)
        if fast:
            tile = _int8_block_dot(
                tile, entry, row, basis_ptr, row_stride, scales_ptr, scale_stride, t, K,
                BLOCK_K, BLOCK_D, GRAD_CODE, FAST=True,
            )  # fmt: skip
    for blk in range(b_lo, b_hi):
        entry, row, fast = _entry(ptab_ptr, btab_ptr, blk, FIELDS, BLOCK_FIELDS, BLOCK_D)
        if not fast:
            tile = _int8_block_dot(
                tile, entry, row, basis_ptr, row_stride, scales_ptr, scale_stride, t, K,
                BLOCK_K, BLOCK_D, GRAD_CODE, FAST=False,
            )  # fmt: skip
    offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    tl.store(part_ptr + s * K + offs_k, tl.sum(tile, axis=1), mask=offs_k < K)


@triton.jit
def _int8_block_write(
    entry, row, w0_ptr, basis_ptr, row_stride, scales_ptr, scale_stride, alpha_ptr, K,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    """The block's parameter values ``w0 + P alpha`` for an int8 basis, summed over K in the
    lanes' registers (FAST: BLOCK_K rows unrolled; masked: one row at a time)."""
    local, mask_d, cols = _block(entry, row, BLOCK_D, FAST)
    col0 = _int8_start(entry, FAST)
    acc = tl.zeros([BLOCK_D // QRUN, QRUN], dtype=tl.float32)
    if FAST:
        for k0 in range(0, K, BLOCK_K):
            for r in tl.static_range(BLOCK_K):
                k = k0 + r
                q, scale = _int8_row(
                    basis_ptr, row_stride, scales_ptr, scale_stride, k, k < K, col0, mask_d, BLOCK_D, FAST
                )
                coef = tl.load(alpha_ptr + k, mask=k < K, other=0.0)
                acc += q * (scale * coef)[:, None]
    else:
        for k in tl.range(0, K, loop_unroll_factor=1):
            q, scale = _int8_row(
                basis_ptr, row_stride, scales_ptr, scale_stride, k, k < K, col0, mask_d, BLOCK_D, FAST
            )
            acc += q * scale * tl.load(alpha_ptr + k)
    w = tl.load(w0_ptr + cols, mask=mask_d, other=0.0) + tl.reshape(acc, (BLOCK_D,))
    _store_from_f32(_address(row, PARAM_ADDR, FAST), tl.load(row + PARAM_DTYPE), local, w, mask_d)


@triton.autotune(configs=configs(_WRITE_CONFIGS_Q), key=["K", "NBLK"])
@triton.jit
def _step_write_int8_kernel(
    ptab_ptr, btab_ptr, w0_ptr, basis_ptr, row_stride, scales_ptr, scale_stride, alpha_ptr, seg_ptr,
    K, NBLK,
    FIELDS: tl.constexpr, BLOCK_FIELDS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    SEGMENTED: tl.constexpr,
):  # fmt: skip
    """``_step_write_kernel`` for an int8 basis: one single-warp program per block."""
    blk = tl.program_id(0).to(tl.int64)
    entry, row, fast = _entry(ptab_ptr, btab_ptr, blk, FIELDS, BLOCK_FIELDS, BLOCK_D)
    alpha_ptr = _coefficients(alpha_ptr, seg_ptr, entry, K, SEGMENTED)
    if fast:
        _int8_block_write(
            entry, row, w0_ptr, basis_ptr, row_stride, scales_ptr, scale_stride, alpha_ptr, K,
            BLOCK_K, BLOCK_D, FAST=True,
        )  # fmt: skip
    else:
        _int8_block_write(
            entry, row, w0_ptr, basis_ptr, row_stride, scales_ptr, scale_stride, alpha_ptr, K,
            BLOCK_K, BLOCK_D, FAST=False,
        )  # fmt: skip


def fused_twa_step(
    params: list[Tensor], w0: Tensor, basis: Tensor, scales: Tensor,
    alpha: Tensor, momentum_buffer: Tensor, counters: Tensor, gram: Tensor, pw0: Tensor,
    hyper,
) -> None:  # fmt: skip
    """One TWA step in 3 launches, with no flat work buffer: ``step_`` on the parameters' own
    ``.grad`` tensors, with ``hyper`` a ``_steps.Hyper``.

    Reads ``p.grad`` of every parameter in place and writes the parameters in place. No host
    synchronisation, so the step can be captured in a CUDA graph after one eager step with the
    same ``.grad`` tensors (see the module docstring). The graph then reads the grads at the
    addresses they had at capture: keep them (``zero_grad(set_to_none=False)``, gradients
    written or accumulated in place). ``hyper.lr`` (a 0-dim fp32 tensor) is read from device
    memory, so replays use the value it holds then (an LR scheduler filling the tensor in place
    works under capture); ``momentum``, ``dampening`` and ``weight_decay`` are kernel
    arguments, fixed in the graph at their capture values.

    K (basis rows) is at most ``twa_kernels.ops.MAX_RANK`` (8192); above it ``ValueError``.
    """
    step_(
        params, [p.grad for p in params], None, w0, basis, scales, alpha, momentum_buffer,
        counters, gram, pw0, hyper.lr, hyper.momentum, hyper.dampening, hyper.weight_decay,
        hyper.nesterov,
    )  # fmt: skip


def _grad_code(grads: list[Tensor | None]) -> int:
    """The dtype code all grads share (missing ones aside), or -1 when they mix dtypes."""
    codes = {table.DTYPE_CODES.get(g.dtype, -1) for g in grads if g is not None}
    return codes.pop() if len(codes) == 1 else -1


def _project_partials(
    plan: Plan, ptab: Tensor, basis: Tensor, scales: Tensor, grads: list[Tensor | None],
    segments: Tensor | None = None, rows: int = 1,
) -> Tensor:  # fmt: skip
    """Stage 1 of ``P^T g`` straight from the grads the table points at: partials [S, K]
    (an int8 basis's block scales applied, a float basis's row scales not); with ``segments``
    (int64 [params], ``rows`` coefficient rows) [S, rows, K], split s's entries written only for
    the rows its blocks belong to."""
    K, dev = basis.shape[0], plan.device
    if blockwise(basis.dtype):
        kernel, blocks = _step_project_int8_kernel, (scales, scales.stride(0))
    else:
        kernel, blocks = _step_project_kernel, ()
    # The partials of the config that ran are returned.
    shape = (K,) if segments is None else (rows, K)
    part = plan.workspace("part", (most_wave_splits(kernel, K, dev), *shape))
    kernel = tuned(kernel)
    kernel[wave_grid(K, dev)](
        ptab, plan.btab, basis, basis.stride(0), *blocks, part, ptab if segments is None else segments,
        rows, K, plan.nblk, FIELDS=FIELDS, BLOCK_FIELDS=BLOCK_FIELDS, BLOCK_D=BLOCK,
        GRAD_CODE=_grad_code(grads), SEGMENTED=segments is not None,
    )  # fmt: skip
    return part[: wave_splits(K, launched_config(kernel).kwargs, dev)]


def _row_scales(basis: Tensor, scales: Tensor) -> Tensor | None:
    """The scales stage 2 applies: a float basis's row scales; None for an int8 basis (its
    block scales are in the partials)."""
    return None if blockwise(basis.dtype) else scales


def project_grads(
    params: list[Tensor], grads: list[Tensor | None], workspace: Tensor | None, basis: Tensor, scales: Tensor,
    segments: list[int] | None = None,
) -> Tensor:  # fmt: skip
    """``twa::project_grads`` on the Triton backend (see ``reference.project_grads``): the fused
    step's first kernel reads ``grads`` in place, then the partials are added in a fixed order
    and scaled; ``workspace`` is not used. fp32 [K] (with ``segments``: [rows, K], see
    ``blocks.project_segments``)."""
    warn_if_narrow(basis, "triton")
    plan = plan_for(params, basis.device)
    ptab, keep = plan.table(params, grads)
    if segments is not None:
        from . import blocks

        out = blocks.project_segments(plan, ptab, basis, scales, grads, segments)
        del keep
        return out
    part = _project_partials(plan, ptab, basis, scales, grads)
    del keep  # contiguous copies of strided grads live until the launch is queued
    return reduce_partials(part.unsqueeze(1), _row_scales(basis, scales)).squeeze(0)


def step_(
    params: list[Tensor], grads: list[Tensor | None], workspace: Tensor | None, w0: Tensor,
    basis: Tensor, scales: Tensor, alpha: Tensor, momentum_buffer: Tensor, counters: Tensor,
    gram: Tensor, pw0: Tensor, lr: Tensor, momentum: float, dampening: float,
    weight_decay: float, nesterov: bool,
) -> None:  # fmt: skip
    """``twa::step_`` on the Triton backend (see ``reference.step_``): the fused kernels read
    ``grads`` and write ``params`` in place; ``workspace`` is not used."""
    K, D = basis.shape
    check_rank("fused TWA step", K)  # the K-dimensional step kernel's limit (subspace_step)
    warn_if_narrow(basis, "triton")
    plan = plan_for(params, basis.device)
    torch._check(plan.numel == D, lambda: f"parameters hold {plan.numel} values, the basis has D={D}")
    ptab, keep = plan.table(params, grads)
    part = _project_partials(plan, ptab, basis, scales, grads)
    coord = plan.workspace("coord", (K,))
    subspace_step.launch(
        alpha, momentum_buffer, counters, coord, gram, pw0, lr, momentum, dampening, weight_decay,
        nesterov, part=part, scales=_row_scales(basis, scales),
    )  # fmt: skip
    _write(plan, ptab, w0, basis, scales, alpha, None)
    del keep  # contiguous copies of strided grads live until all launches are queued


def _write(
    plan: Plan, ptab: Tensor, w0: Tensor, basis: Tensor, scales: Tensor, coef: Tensor, segments: Tensor | None
) -> None:  # fmt: skip
    """Stage 3: every parameter the table points at ``<- w0 + P coef`` in its dtype (coef [K];
    with ``segments`` int64 [params], [rows, K] and parameter i's row ``segments[i]``)."""
    if blockwise(basis.dtype):
        kernel, blocks = _step_write_int8_kernel, (scales, scales.stride(0))
    else:
        kernel, blocks = _step_write_kernel, (scales,)
    seg = ptab if segments is None else segments  # not read unless SEGMENTED
    tuned(kernel)[(max(plan.nblk, 1),)](
        ptab, plan.btab, w0, basis, basis.stride(0), *blocks, coef, seg, basis.shape[0], plan.nblk,
        FIELDS=FIELDS, BLOCK_FIELDS=BLOCK_FIELDS, BLOCK_D=BLOCK, SEGMENTED=segments is not None,
    )  # fmt: skip


def write_params_(
    params: list[Tensor], workspace: Tensor | None, w0: Tensor, basis: Tensor, scales: Tensor, coef: Tensor,
    segments: list[int] | None,
) -> None:  # fmt: skip
    """``twa::write_params_`` on the Triton backend (see ``reference.write_params_``): the fused
    step's write kernel alone, writing the parameters in place; ``workspace`` is not used."""
    warn_if_narrow(basis, "triton")
    plan = plan_for(params, basis.device)
    seg = None if segments is None else plan.segment_table(segments)
    _write(plan, plan.param_table(params), w0, basis, scales, coef, seg)
