"""``orthogonalize_``: CGS2 of a sample against rows [0, rank), fp64 accumulation, 3 basis passes.

The formulas are those of ``reference.orthogonalize_``:

1. ``_orthogonalize_kernel`` (pass 1): per-chunk partials of ``P^T v`` and ``||v||^2``;
   ``_orthogonalize_reduce1_kernel`` adds them (FOLD) and finishes ``c1``, ``s * c1`` (FINISH).
2. ``_orthogonalize_remainder_kernel`` (pass 2): for each [rank, BLOCK_D] column slab, one loop
   over K in BLOCK_K tiles forms ``v1 = v - P c1``, then ``||v1||^2`` and ``max|v1|``, and a
   second loop over the same tiles accumulates ``P^T v1``. No program holds more than two
   [BLOCK_K, BLOCK_D] tiles of P (one summed, the next in flight), so any rank runs without
   register spills; the second loop reads the slab back from L2, so DRAM traffic stays one
   pass. ``_orthogonalize_reduce2_kernel`` adds the partials (FOLD) and finishes ``h``,
   ``||u|| = sqrt(||v1||^2 - ||c2||^2)``, the row scale and the returned vector (FINISH).
3. ``_orthogonalize_store_kernel`` (pass 3): ``u = v - P h`` scaled by ``ROW_AMAX / max|v1|``,
   clamped to the storage range and written to row ``rank``.

Each pass streams the basis like ``project``: 16-byte evict-first loads (the basis is read once
per pass and should not push the sample and the partials out of L2), the next tile's loads
issued before the current tile is summed (4 per thread and tile), and sums kept in registers in
the layout of the loaded tile, so that no loop over tiles has a reduction across warps or a
barrier: pass 1 sums each 16-byte run in its thread and reduces once per K tile and chunk;
pass 3 lays the columns across all threads, so the sum over a tile's rows stays in each thread;
pass 2 does the latter for ``P c1`` (reduced across threads once per slab) and, for ``P^T v1``,
adds a row's 16-byte runs within a warp (shuffles) into per-thread slots reduced once per
program. Summation orders are fixed by the code, never by timing.

Accumulation is fp64 like the reference (the op is memory-bound; fp64 FMA throughput is not the
limit). bf16 values go to fp32 before fp64: the interpreter's bf16 -> fp64 cast reinterprets
the raw 16 bits; bf16 -> fp32 is exact everywhere, so the detour costs nothing. Results are
rounded fp64 -> fp32 -> storage dtype, which is what torch's ``Tensor.to`` does for fp16/bf16.

A basis sharded along D (``twa_kernels.distributed``) runs each reduce kernel twice, FOLD then
FINISH, with the caller's all-reduce of the K + 1 (or K + 2) raw sums between them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from .._layout import QMAX, blockwise, warn_if_narrow
from ..reference import ROW_AMAX
from ._common import (
    _INTERPRETED,
    QBLOCK,
    QRUN,
    column_mask,
    fold_partials,
    int8_row,
    int8_to_float,
    pow2,
    split_columns,
    to_storage,
)

_BLOCK_S = 16
# Passes 1 and 2 split the columns over one wave of this many programs per SM: their sm_90 code
# (164 and up to 246 registers at 4 warps for an fp16 basis) fits 3 and 2 to an SM, so the
# default 4 would run 1.3-2 waves (tests/test_triton_codegen.py checks the fit).
PROGRAMS_PER_SM = 2
# Pass 1: [16, 512 bytes] basis tiles (256 fp16 or 128 fp32 columns), 4 16-byte loads per thread
# at 4 warps, and the next tile's 4 in flight while one is summed.
_PASS1_BLOCK_K = 16
_PASS1_ROW_BYTES = 512
# Pass 3: [4, BLOCK_D] tiles whose columns lie across all threads of 4 warps, 16 bytes each
# (BLOCK_D = 1024 fp16 or 512 fp32 columns): 4 loads per thread and tile, plus the next tile's.
_STORE_BLOCK_K = 4
_STORE_WARPS = 4
# Pass 2 tiles hold at most 4K values, 64 bytes (4 16-byte loads) per thread whatever K (the
# warps follow the tile's bytes). The [K, BLOCK_D] slab it reads twice is kept near 64 KB so
# the second read hits L2 (see the kernel); BLOCK_D stays >= 32 columns (64 contiguous bytes of
# fp16, one full 128-byte line of fp32). BLOCK_K = 64 from K = 33 on keeps the K tiles of a
# 512-row basis (8) within the threads across a tile row (C >= 8): one slot each.
_TILE_ELEMENTS = 4096
_SLAB_BYTES = 64 * 1024
_MIN_BLOCK_D = 32
_MAX_BLOCK_D = 256
# A pass-2 tile row is read by at most 32 threads, 16 bytes each.
_MAX_ROW_BYTES = 512
# An int8 basis: passes 1 and 3 walk [BLOCK_K, 2048] tiles row by row, each row one 16-byte load
# per thread of 4 warps (a run of 16 values, inside one scale block); pass 2 reads [R, 128] slabs
# (two scale blocks per row: 8 threads across a row, as for fp16 at K > 32).
_INT8_SLAB_D = 128
_INT8_BLOCK_D = 16 * 32 * 4
_INT8_PASS1_BLOCK_K = 8
_INT8_STORE_BLOCK_K = 8
# The largest stored magnitude of an int8 basis.
_QMAX = tl.constexpr(float(QMAX))


def pass1_blocks(element_size: int) -> tuple[int, int, int]:
    """``(BLOCK_K, BLOCK_D, GROUP)`` of pass 1 for a basis of ``element_size``-byte values."""
    return _PASS1_BLOCK_K, _PASS1_ROW_BYTES // element_size, 16 // element_size


def store_blocks(element_size: int) -> tuple[int, int]:
    """``(BLOCK_K, BLOCK_D)`` of pass 3 for a basis of ``element_size``-byte values."""
    return _STORE_BLOCK_K, 16 // element_size * 32 * _STORE_WARPS


def _remainder_blocks(R: int, element_size: int) -> tuple[int, int, int]:
    """``(NT, BLOCK_K, BLOCK_D)`` of pass 2 for R rows of ``element_size`` bytes (1: int8)."""
    block_k = 16 if R <= 16 else 32 if R <= 32 else 64
    if element_size == 1:
        return max(pow2(R), block_k) // block_k, block_k, _INT8_SLAB_D
    fit = max(_SLAB_BYTES // (R * element_size), 1)
    block_d = 1 << (fit.bit_length() - 1)  # largest power of two <= fit
    cap = min(_MAX_BLOCK_D, _TILE_ELEMENTS // block_k, _MAX_ROW_BYTES // element_size)
    block_d = max(_MIN_BLOCK_D, min(block_d, cap))
    return max(pow2(R), block_k) // block_k, block_k, block_d


def remainder_warps(block_k: int, block_d: int, element_size: int) -> int:
    """Warps of pass 2: 64 bytes of each [BLOCK_K, BLOCK_D] tile per thread (4 16-byte loads)."""
    return max(1, block_k * block_d * element_size // (32 * 64))


def remainder_rows(block_k: int, block_d: int, element_size: int) -> int:
    """ROWS of pass 2: the rows one layer of its [C, ROWS, BLOCK_K // ROWS, GROUP] tile covers
    (C = BLOCK_D // GROUP threads of a warp across a row, 32 // C rows per warp)."""
    lanes = block_d * element_size // 16
    return 32 // lanes * remainder_warps(block_k, block_d, element_size)


@triton.jit
def _group_dot64(tile, p, v, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr):
    """``tile`` [BLOCK_K, BLOCK_D // GROUP] fp64 plus ``p * v`` summed over each run of GROUP
    columns (one 16-byte basis load, held by one thread): the sum stays in the thread."""
    prod = p.to(tl.float32).to(tl.float64) * v.to(tl.float64)
    return tile + tl.sum(tl.reshape(prod, (BLOCK_K, BLOCK_D // GROUP, GROUP)), axis=2)


@triton.jit
def _pass1_tile(rows, sample_ptr, mask_k, d0, end, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                MASKED: tl.constexpr):  # fmt: skip
    """Basis rows ``rows`` [BLOCK_K, 1] at columns ``[d0, d0 + BLOCK_D)``, and v there read as a
    [BLOCK_K, BLOCK_D] broadcast, so that it has the basis tile's layout (no shared memory)."""
    offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
    mask_d = column_mask(offs_d, end, MASKED)
    p = tl.load(rows + offs_d[None, :], mask=mask_k[:, None] & mask_d[None, :], other=0.0,
                eviction_policy="evict_first")  # fmt: skip
    same = tl.zeros([BLOCK_K, 1], dtype=tl.int64)
    v = tl.load(sample_ptr + same + offs_d[None, :], mask=mask_d[None, :], other=0.0)
    return p, v


@triton.jit
def _orthogonalize_kernel(
    basis_ptr, row_stride, sample_ptr, part_ptr, vv_ptr, R, D, CHUNK,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    """Pass 1: per K tile, one loop over the chunk's columns into a register tile (the next
    column tile prefetched while one is summed), reduced once per K tile; then ``||v||^2``."""
    pid = tl.program_id(0).to(tl.int64)
    start = pid * CHUNK
    end = tl.minimum(start + CHUNK, D)
    full_end = start + (end - start) // BLOCK_D * BLOCK_D
    for k0 in range(0, R, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < R
        rows = basis_ptr + offs_k[:, None] * row_stride
        tile = tl.zeros([BLOCK_K, BLOCK_D // GROUP], dtype=tl.float64)
        if start < full_end:
            p, v = _pass1_tile(rows, sample_ptr, mask_k, start, end, BLOCK_K, BLOCK_D, MASKED=False)
            for d0 in range(start + BLOCK_D, full_end, BLOCK_D):
                p_next, v_next = _pass1_tile(
                    rows, sample_ptr, mask_k, d0, end, BLOCK_K, BLOCK_D, MASKED=False
                )
                tile = _group_dot64(tile, p, v, BLOCK_K, BLOCK_D, GROUP)
                p, v = p_next, v_next
            tile = _group_dot64(tile, p, v, BLOCK_K, BLOCK_D, GROUP)
        for d0 in range(full_end, end, BLOCK_D):
            p, v = _pass1_tile(rows, sample_ptr, mask_k, d0, end, BLOCK_K, BLOCK_D, MASKED=True)
            tile = _group_dot64(tile, p, v, BLOCK_K, BLOCK_D, GROUP)
        tl.store(part_ptr + pid * R + offs_k, tl.sum(tile, axis=1), mask=mask_k)
    tl.store(vv_ptr + pid, _sum_squares(sample_ptr, start, end, BLOCK_D))


@triton.jit
def _sum_squares(sample_ptr, start, end, BLOCK_D: tl.constexpr):
    """``||v||^2`` over columns ``[start, end)`` (fp64)."""
    vv = tl.zeros([BLOCK_D], dtype=tl.float64)
    for d0 in range(start, end, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        v = tl.load(sample_ptr + offs_d, mask=offs_d < end, other=0.0).to(tl.float64)
        vv += v * v
    return tl.sum(vv, axis=0)


@triton.jit
def _int8_row(basis_ptr, row_stride, scales_ptr, scale_stride, k, R, d0, end, BLOCK_D: tl.constexpr,
              MASKED: tl.constexpr):  # fmt: skip
    """``int8_row`` (zeros from row R on) in fp64: values [BLOCK_D // 16, 16], scales [BLOCK_D // 16]."""
    q, scale = int8_row(basis_ptr, row_stride, scales_ptr, scale_stride, k, k < R, d0, end, BLOCK_D, MASKED)
    return q.to(tl.float64), scale.to(tl.float64)


@triton.jit
def _sample_runs(sample_ptr, d0, end, BLOCK_D: tl.constexpr, MASKED: tl.constexpr):
    """The sample at columns ``[d0, d0 + BLOCK_D)`` in fp64 as [BLOCK_D // 16, 16] (an int8 row's
    layout)."""
    offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
    v = tl.load(sample_ptr + offs_d, mask=column_mask(offs_d, end, MASKED), other=0.0)
    return tl.reshape(v, (BLOCK_D // QRUN, QRUN)).to(tl.float64)


@triton.jit
def _pass1_int8_tile(
    tile, basis_ptr, row_stride, scales_ptr, scale_stride, sample_ptr, R, k0, d0, end,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """``tile`` [BLOCK_K, BLOCK_D // 16] plus rows ``k0 + r`` times v at columns ``[d0, d0 +
    BLOCK_D)``, each 16-value run summed in its thread and scaled. The select of row r is
    resolved at compile time, so each row adds to its own registers."""
    v = _sample_runs(sample_ptr, d0, end, BLOCK_D, MASKED)
    for r in tl.static_range(BLOCK_K):
        q, scale = _int8_row(
            basis_ptr, row_stride, scales_ptr, scale_stride, k0 + r, R, d0, end, BLOCK_D, MASKED
        )
        sums = tl.sum(q * v, axis=1) * scale
        tile = tl.where(tl.arange(0, BLOCK_K)[:, None] == r, tile + sums[None, :], tile)
    return tile


@triton.jit
def _orthogonalize_int8_kernel(
    basis_ptr, row_stride, scales_ptr, scale_stride, sample_ptr, part_ptr, vv_ptr, R, D, CHUNK,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Pass 1, an int8 basis: ``_orthogonalize_kernel``'s partials, each K tile's rows walked
    one by one over the chunk (chunks start at multiples of 64)."""
    pid = tl.program_id(0).to(tl.int64)
    start = pid * CHUNK
    end = tl.minimum(start + CHUNK, D)
    full_end = start + (end - start) // BLOCK_D * BLOCK_D
    for k0 in range(0, R, BLOCK_K):
        tile = tl.zeros([BLOCK_K, BLOCK_D // QRUN], dtype=tl.float64)
        for d0 in range(start, full_end, BLOCK_D):
            tile = _pass1_int8_tile(
                tile, basis_ptr, row_stride, scales_ptr, scale_stride, sample_ptr, R, k0, d0, end,
                BLOCK_K, BLOCK_D, MASKED=False,
            )  # fmt: skip
        for d0 in range(full_end, end, BLOCK_D):
            tile = _pass1_int8_tile(
                tile, basis_ptr, row_stride, scales_ptr, scale_stride, sample_ptr, R, k0, d0, end,
                BLOCK_K, BLOCK_D, MASKED=True,
            )  # fmt: skip
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        tl.store(part_ptr + pid * R + offs_k, tl.sum(tile, axis=1), mask=offs_k < R)
    tl.store(vv_ptr + pid, _sum_squares(sample_ptr, start, end, BLOCK_D))


@triton.jit
def _fold_scalars(ptr, S, BLOCK_S: tl.constexpr, MAX: tl.constexpr):
    """The sum (or max) of the S per-program values at ``ptr``, in a fixed order."""
    lane = tl.zeros([1], dtype=tl.int64)
    folded = fold_partials(ptr, S, 1, lane, lane == 0, BLOCK_S, MAX)
    return tl.max(folded, axis=0) if MAX else tl.sum(folded, axis=0)


@triton.jit
def _orthogonalize_reduce1_kernel(
    part_ptr, vv_ptr, scales_ptr, sums_ptr, c1_ptr, sc1_ptr, S, R,
    FOLD: tl.constexpr, FINISH: tl.constexpr, KP: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """FOLD: the raw sums ``[P^T v, ||v||^2]`` of the S programs into ``sums`` [R + 1];
    FINISH: ``c1 = s * (P^T v)`` and ``s * c1`` from them. A sharded basis all-reduces ``sums``
    between a FOLD-only and a FINISH-only launch; one process runs both in one launch."""
    offs = tl.arange(0, KP).to(tl.int64)
    mask = offs < R
    if FOLD:
        acc = fold_partials(part_ptr, S, R, offs, mask, BLOCK_S, False)
        tl.store(sums_ptr + offs, acc, mask=mask)
        tl.store(sums_ptr + R, _fold_scalars(vv_ptr, S, BLOCK_S, False))
    else:
        acc = tl.load(sums_ptr + offs, mask=mask, other=0.0)
    if FINISH:
        s = tl.load(scales_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        c1 = acc * s
        tl.store(c1_ptr + offs, c1, mask=mask)
        tl.store(sc1_ptr + offs, s * c1, mask=mask)


@triton.jit
def _tile_rows(k0, ROWS: tl.constexpr, REP: tl.constexpr):
    """Rows ``k0 + rep * ROWS + r`` of a pass-2 tile as [ROWS, REP] (int64)."""
    return k0 + (tl.arange(0, ROWS)[:, None] + tl.arange(0, REP)[None, :] * ROWS).to(tl.int64)


@triton.jit
def _slab_rows(basis_ptr, row_stride, R, k0, cols, mask_c, ROWS: tl.constexpr, REP: tl.constexpr):
    """Rows ``k0 + [0, REP * ROWS)`` of ``basis[:, cols]`` as [C, ROWS, REP, GROUP] (storage
    dtype; ``cols`` [C, GROUP]): each thread reads one 16-byte run of REP rows. C leads because
    the compiler gives a warp's threads to the contiguous dim (GROUP, in-thread), then to the
    others in index order: C threads across a row, the rest and the warps across ROWS, and REP
    repeated in each thread (the sums over REP and GROUP stay in it)."""
    rows = _tile_rows(k0, ROWS, REP)[None, :, :, None]
    ptrs = basis_ptr + rows * row_stride + cols[:, None, None, :]
    mask = (rows < R) & mask_c[:, None, None, :]
    return tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first")


@triton.jit
def _to_f64(p):
    """Basis values as fp64: int8 through ``int8_to_float``, fp16/bf16/fp32 through fp32."""
    if p.dtype == tl.int8:
        return int8_to_float(p).to(tl.float64)
    else:
        return p.to(tl.float32).to(tl.float64)


@triton.jit
def _block_scales(scales_ptr, scale_stride, blocks, mask_b, R, k0, ROWS: tl.constexpr, REP: tl.constexpr):
    """fp64 ``scales[rows, blocks]`` of an int8 basis for the rows of a pass-2 tile and the scale
    block of each of a row's C threads (``blocks`` [C, 1, 1]): [C, ROWS, REP], in the layout of
    the tile's sums over GROUP."""
    rows = _tile_rows(k0, ROWS, REP)[None, :, :]
    ptrs = scales_ptr + rows * scale_stride + blocks
    return tl.load(ptrs, mask=(rows < R) & mask_b, other=0.0).to(tl.float64)


@triton.jit
def _sc1_rows(sc1_ptr, scales_ptr, scale_stride, blocks, mask_b, R, k0, ROWS: tl.constexpr, REP: tl.constexpr,
              QUANT: tl.constexpr):  # fmt: skip
    """The coefficients of a pass-2 tile's rows in ``P c1``: ``s * c1`` [ROWS, REP], or for an
    int8 basis (QUANT) ``c1`` times the block scales, [C, ROWS, REP]."""
    rows = _tile_rows(k0, ROWS, REP)
    sc1 = tl.load(sc1_ptr + rows, mask=rows < R, other=0.0)
    if QUANT:
        sc1 = sc1[None, :, :] * _block_scales(scales_ptr, scale_stride, blocks, mask_b, R, k0, ROWS, REP)
    return sc1


@triton.jit
def _weighted(sc1, p):
    """The tile ``p`` [C, ROWS, REP, GROUP] in fp64 times its coefficients (``_sc1_rows``)."""
    if len(sc1.shape) == 2:
        return sc1[None, :, :, None] * _to_f64(p)
    else:
        return sc1[:, :, :, None] * _to_f64(p)


@triton.jit
def _add_tile_sums(acc, p, v1, t, scales_ptr, scale_stride, blocks, mask_b, R, C: tl.constexpr,
                   NJ: tl.constexpr, QUANT: tl.constexpr):  # fmt: skip
    """``acc`` [C, ROWS, REP, NJ] plus tile t's row sums ``p . v1`` (times the rows' block
    scales with QUANT): the sum over a row's C threads (shuffles within a warp, no barrier)
    lands in thread ``t % C``'s slot ``t // C``."""
    if QUANT:
        s = tl.sum(_to_f64(p) * v1[:, None, None, :], axis=3)
        ROWS: tl.constexpr = s.shape[1]
        REP: tl.constexpr = s.shape[2]
        k0 = tl.cast(t, tl.int64) * (ROWS * REP)
        s = tl.sum(s * _block_scales(scales_ptr, scale_stride, blocks, mask_b, R, k0, ROWS, REP), axis=0)
    else:
        s = tl.sum(tl.sum(_to_f64(p) * v1[:, None, None, :], axis=3), axis=0)
    tiles = tl.arange(0, C)[:, None] + tl.arange(0, NJ)[None, :] * C
    return tl.where((tiles == t)[:, None, None, :], acc + s[None, :, :, None], acc)


@triton.jit
def _remainder_slab(
    acc, ss, amax, basis_ptr, row_stride, scales_ptr, scale_stride, sample_ptr, sc1_ptr, R, d0, end,
    BLOCK_K: tl.constexpr, GROUP: tl.constexpr, C: tl.constexpr, ROWS: tl.constexpr,
    REP: tl.constexpr, NJ: tl.constexpr, QUANT: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """One [R, C * GROUP] slab of pass 2: ``v1 = v - P c1``, then ``P^T v1`` into ``acc``. With
    an int8 basis (QUANT, ``d0`` a multiple of 64) each thread's run lies in one scale block:
    its scale multiplies the run's coefficient in ``P c1`` and its part of ``p . v1``."""
    cols = d0 + (tl.arange(0, C)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]).to(tl.int64)
    mask_c = column_mask(cols, end, MASKED)
    blocks = d0 // QBLOCK + (tl.arange(0, C) // (QBLOCK // GROUP))[:, None, None].to(tl.int64)
    mask_b = column_mask(blocks * QBLOCK, end, MASKED)
    # v1 = v - P c1 over the slab's columns, K in BLOCK_K tiles (the next one prefetched while
    # one is summed); each thread adds its REP rows, the threads of a column once per slab.
    corr = tl.zeros([C, ROWS, GROUP], dtype=tl.float64)
    p = _slab_rows(basis_ptr, row_stride, R, 0, cols, mask_c, ROWS, REP)
    sc1 = _sc1_rows(sc1_ptr, scales_ptr, scale_stride, blocks, mask_b, R, 0, ROWS, REP, QUANT)
    for k0 in range(BLOCK_K, R, BLOCK_K):
        p_next = _slab_rows(basis_ptr, row_stride, R, k0, cols, mask_c, ROWS, REP)
        sc1_next = _sc1_rows(sc1_ptr, scales_ptr, scale_stride, blocks, mask_b, R, k0, ROWS, REP, QUANT)
        corr += tl.sum(_weighted(sc1, p), axis=2)
        p, sc1 = p_next, sc1_next
    corr += tl.sum(_weighted(sc1, p), axis=2)
    v = tl.load(sample_ptr + cols, mask=mask_c, other=0.0).to(tl.float64)
    v1 = v - tl.sum(corr, axis=1)
    ss += v1 * v1
    amax = tl.maximum(amax, tl.abs(v1))
    # P^T v1 over the same slab. This second read of the [K, BLOCK_D] slab comes from L2:
    # at K = 512 and BLOCK_D = 64 an fp16 slab is 64 KB, and <= 4 programs per SM on 132 SMs
    # keep at most 34 MB live, inside the 50 MB L2 of an H100/H200. DRAM still sees one pass.
    p = _slab_rows(basis_ptr, row_stride, R, 0, cols, mask_c, ROWS, REP)
    for k0 in range(BLOCK_K, R, BLOCK_K):
        p_next = _slab_rows(basis_ptr, row_stride, R, k0, cols, mask_c, ROWS, REP)
        acc = _add_tile_sums(
            acc, p, v1, k0 // BLOCK_K - 1, scales_ptr, scale_stride, blocks, mask_b, R, C, NJ, QUANT
        )
        p = p_next
    acc = _add_tile_sums(
        acc, p, v1, tl.cdiv(R, BLOCK_K) - 1, scales_ptr, scale_stride, blocks, mask_b, R, C, NJ, QUANT
    )  # fmt: skip
    return acc, ss, amax


@triton.jit
def _remainder_program(
    basis_ptr, row_stride, scales_ptr, scale_stride, sample_ptr, sc1_ptr, part_ptr, ss_ptr, amax_ptr,
    R, D, CHUNK, NT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    ROWS: tl.constexpr, QUANT: tl.constexpr,
):  # fmt: skip
    """Pass 2 over the program's chunk, [R, BLOCK_D] slab by slab. Basis tiles are
    [C, ROWS, REP, GROUP]: C threads of a warp across a row, 16 bytes (GROUP values) each, the
    other threads and the warps across ROWS rows, REP such layers per thread."""
    pid = tl.program_id(0).to(tl.int64)
    start = pid * CHUNK
    end = tl.minimum(start + CHUNK, D)
    full_end = start + (end - start) // BLOCK_D * BLOCK_D
    C: tl.constexpr = BLOCK_D // GROUP
    REP: tl.constexpr = BLOCK_K // ROWS
    NJ: tl.constexpr = (NT + C - 1) // C
    # P^T v1 of this chunk: row rep * ROWS + r of K tile t = j * C + c, kept (reduced over its
    # columns) by thread c of that row's warp in slot [c, r, rep, j]: REP * NJ fp64 per thread
    # whatever R. A register tensor cannot be indexed by the loop counter: the tile's slot is
    # updated through a select on the tile index.
    acc = tl.zeros([C, ROWS, REP, NJ], dtype=tl.float64)
    ss = tl.zeros([C, GROUP], dtype=tl.float64)
    amax = tl.zeros([C, GROUP], dtype=tl.float64)
    for d0 in range(start, full_end, BLOCK_D):
        acc, ss, amax = _remainder_slab(
            acc, ss, amax, basis_ptr, row_stride, scales_ptr, scale_stride, sample_ptr, sc1_ptr, R, d0,
            end, BLOCK_K, GROUP, C, ROWS, REP, NJ, QUANT, MASKED=False,
        )  # fmt: skip
    for d0 in range(full_end, end, BLOCK_D):
        acc, ss, amax = _remainder_slab(
            acc, ss, amax, basis_ptr, row_stride, scales_ptr, scale_stride, sample_ptr, sc1_ptr, R, d0,
            end, BLOCK_K, GROUP, C, ROWS, REP, NJ, QUANT, MASKED=True,
        )  # fmt: skip
    tiles = (tl.arange(0, C)[:, None] + tl.arange(0, NJ)[None, :] * C).to(tl.int64)
    offs = tiles[:, None, None, :] * BLOCK_K + _tile_rows(0, ROWS, REP)[None, :, :, None]
    tl.store(part_ptr + pid * R + offs, acc, mask=offs < R)
    tl.store(ss_ptr + pid, tl.sum(tl.sum(ss, axis=1), axis=0))
    tl.store(amax_ptr + pid, tl.max(tl.max(amax, axis=1), axis=0))


@triton.jit
def _orthogonalize_remainder_kernel(
    basis_ptr, row_stride, sample_ptr, sc1_ptr, part_ptr, ss_ptr, amax_ptr, R, D, CHUNK,
    NT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    ROWS: tl.constexpr,
):  # fmt: skip
    """Pass 2, a float basis (its row scales are in ``sc1``)."""
    _remainder_program(
        basis_ptr, row_stride, sc1_ptr, 0, sample_ptr, sc1_ptr, part_ptr, ss_ptr, amax_ptr, R, D, CHUNK,
        NT, BLOCK_K, BLOCK_D, GROUP, ROWS, QUANT=False,
    )  # fmt: skip


@triton.jit
def _orthogonalize_remainder_int8_kernel(
    basis_ptr, row_stride, scales_ptr, scale_stride, sample_ptr, sc1_ptr, part_ptr, ss_ptr, amax_ptr,
    R, D, CHUNK, NT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    ROWS: tl.constexpr,
):  # fmt: skip
    """Pass 2, an int8 basis: [R, 128] slabs, two scale blocks to a row (chunks start at
    multiples of 64), ``sc1 = c1``."""
    _remainder_program(
        basis_ptr, row_stride, scales_ptr, scale_stride, sample_ptr, sc1_ptr, part_ptr, ss_ptr, amax_ptr,
        R, D, CHUNK, NT, BLOCK_K, BLOCK_D, GROUP, ROWS, QUANT=True,
    )  # fmt: skip


@triton.jit
def _orthogonalize_reduce2_kernel(
    part_ptr, ss_ptr, amax_ptr, scales_ptr, sums1_ptr, sums_ptr, c1_ptr, out_ptr, sh_ptr, inv_ptr,
    S, R, rank,
    ROW_AMAX: tl.constexpr, WRITE_ROW: tl.constexpr, FOLD: tl.constexpr, FINISH: tl.constexpr,
    KP: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """FOLD: the raw ``[P^T v1, ||v1||^2, max|v1|]`` of the S programs into ``sums`` [R + 2];
    FINISH: ``h``, ``||u||``, the returned vector, ``s * h``, the row scale and ``scales[rank]``."""
    offs = tl.arange(0, KP).to(tl.int64)
    mask = offs < R
    if FOLD:
        acc = fold_partials(part_ptr, S, R, offs, mask, BLOCK_S, False)
        ss = _fold_scalars(ss_ptr, S, BLOCK_S, False)
        amax_all = _fold_scalars(amax_ptr, S, BLOCK_S, True)
        tl.store(sums_ptr + offs, acc, mask=mask)
        tl.store(sums_ptr + R, ss)
        tl.store(sums_ptr + R + 1, amax_all)
    else:
        acc = tl.load(sums_ptr + offs, mask=mask, other=0.0)
        ss = tl.load(sums_ptr + R)
        amax_all = tl.load(sums_ptr + R + 1)
    if FINISH:
        s = tl.load(scales_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        c2 = acc * s
        h = tl.load(c1_ptr + offs, mask=mask, other=0.0) + c2
        norm2 = ss - tl.sum(c2 * c2, axis=0)
        # fp64 tl.sqrt is correctly rounded (PTX has sqrt.approx only for f32; sqrt_rn is f32-only).
        norm = tl.sqrt(tl.maximum(norm2, 0.0))
        tl.store(out_ptr + offs, h, mask=mask)
        tl.store(out_ptr + rank, norm)
        tl.store(out_ptr + rank + 1, tl.sqrt(tl.load(sums1_ptr + R)))
        tl.store(sh_ptr + offs, s * h, mask=mask)
        if WRITE_ROW:
            # A zero remainder stores a zero row with scale 0, as the reference does.
            inv = tl.where(amax_all > 0, ROW_AMAX / amax_all, 0.0)
            scale = tl.where(norm > 0, amax_all / (ROW_AMAX * norm), 0.0)
            tl.store(inv_ptr, inv)
            tl.store(scales_ptr + rank, scale.to(tl.float32))


@triton.jit
def _store_rows(basis_ptr, row_stride, sh_ptr, R, k0, offs_d, mask_d, BLOCK_K: tl.constexpr):
    """Rows ``[k0, k0 + BLOCK_K)`` of ``basis[:, offs_d]`` (storage dtype) and ``s * h`` there."""
    offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
    mask_k = offs_k < R
    sh = tl.load(sh_ptr + offs_k, mask=mask_k, other=0.0)
    ptrs = basis_ptr + offs_k[:, None] * row_stride + offs_d[None, :]
    p = tl.load(ptrs, mask=mask_k[:, None] & mask_d[None, :], other=0.0, eviction_policy="evict_first")
    return p, sh


@triton.jit
def _store_columns(
    basis_ptr, row_stride, sample_ptr, sh_ptr, inv_ptr, rank, R, D, offs_d, LIMIT: tl.constexpr,
    BLOCK_K: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    mask_d = column_mask(offs_d, D, MASKED)
    # P (s * h) over the block's columns, K in BLOCK_K-row tiles, the next tile prefetched while
    # one is summed. The columns lie across all threads (16 bytes each), so the sum over a
    # tile's rows stays in each thread: no barrier in the loop.
    acc = tl.zeros(offs_d.shape, dtype=tl.float64)
    p, sh = _store_rows(basis_ptr, row_stride, sh_ptr, R, 0, offs_d, mask_d, BLOCK_K)
    for k0 in range(BLOCK_K, R, BLOCK_K):
        p_next, sh_next = _store_rows(basis_ptr, row_stride, sh_ptr, R, k0, offs_d, mask_d, BLOCK_K)
        acc += tl.sum(sh[:, None] * p.to(tl.float32).to(tl.float64), axis=0)
        p, sh = p_next, sh_next
    acc += tl.sum(sh[:, None] * p.to(tl.float32).to(tl.float64), axis=0)
    u = tl.load(sample_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float64) - acc
    val = u * tl.load(inv_ptr)
    val = tl.minimum(tl.maximum(val, -LIMIT), LIMIT)
    # rank and row_stride are 32-bit arguments: their product is formed in 64 bits (a 32-bit
    # one wraps once rank * row_stride passes 2^31, rank 85 at D = 25.6M).
    out = basis_ptr + tl.cast(rank, tl.int64) * row_stride + offs_d
    tl.store(out, to_storage(val.to(tl.float32), basis_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _orthogonalize_store_kernel(
    basis_ptr, row_stride, sample_ptr, sh_ptr, inv_ptr, rank, R, D, LIMIT: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    offs_d = pid * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    if (pid + 1) * BLOCK_D <= D:
        _store_columns(
            basis_ptr, row_stride, sample_ptr, sh_ptr, inv_ptr, rank, R, D, offs_d, LIMIT, BLOCK_K,
            MASKED=False,
        )  # fmt: skip
    else:
        _store_columns(
            basis_ptr, row_stride, sample_ptr, sh_ptr, inv_ptr, rank, R, D, offs_d, LIMIT, BLOCK_K,
            MASKED=True,
        )  # fmt: skip


@triton.jit
def _rint(x):
    """fp64 ``x`` rounded to the nearest integer, ties to even (``torch.round``); the
    interpreter has no libdevice: there ``(|x| + 2^52) - 2^52``, exact for |x| < 2^52."""
    if _INTERPRETED:
        r = (tl.abs(x) + 4503599627370496.0) - 4503599627370496.0
        return tl.where(x < 0, -r, r)
    else:
        return libdevice.rint(x)


@triton.jit
def _store_int8_columns(
    basis_ptr, row_stride, scales_ptr, scale_stride, sample_ptr, sh_ptr, norm_ptr, rank, R, D, d0,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Columns ``[d0, d0 + BLOCK_D)`` of row ``rank`` of an int8 basis: ``u = v - P h`` (rows
    walked one by one in BLOCK_K-row tiles), each 64-block's ``max|u|`` (a thread's run of 16,
    then the 4 threads of a block), ``rint(u * (QMAX / max))`` and the block scales."""
    NRUNS: tl.constexpr = BLOCK_D // QRUN
    acc = tl.zeros([NRUNS, QRUN], dtype=tl.float64)
    for k0 in range(0, R, BLOCK_K):
        for r in tl.static_range(BLOCK_K):
            k = k0 + r
            q, scale = _int8_row(
                basis_ptr, row_stride, scales_ptr, scale_stride, k, R, d0, D, BLOCK_D, MASKED
            )
            coef = tl.load(sh_ptr + k, mask=k < R, other=0.0) * scale
            acc += coef[:, None] * q
    u = _sample_runs(sample_ptr, d0, D, BLOCK_D, MASKED) - acc
    block_amax = tl.max(tl.reshape(tl.max(tl.abs(u), axis=1), (NRUNS // 4, 4)), axis=1)
    amax = tl.reshape(tl.broadcast_to(block_amax[:, None], (NRUNS // 4, 4)), (NRUNS,))
    # (a zero block stores zeros; the division by 1 there only keeps 0 / 0 out of the code)
    inv = tl.where(amax > 0, _QMAX / tl.where(amax > 0, amax, 1.0), 0.0)
    q = _rint(u * inv[:, None]).to(tl.int8)
    # rank and row_stride are 32-bit arguments: their product is formed in 64 bits.
    row = tl.cast(rank, tl.int64)
    offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
    mask_d = column_mask(offs_d, D, MASKED)
    tl.store(basis_ptr + row * row_stride + offs_d, tl.reshape(q, (BLOCK_D,)), mask=mask_d)
    norm = tl.load(norm_ptr)
    scale = tl.where(norm > 0, block_amax / (_QMAX * tl.where(norm > 0, norm, 1.0)), 0.0)
    blocks = d0 // QBLOCK + tl.arange(0, NRUNS // 4).to(tl.int64)
    mask_b = column_mask(blocks * QBLOCK, D, MASKED)
    tl.store(scales_ptr + row * scale_stride + blocks, scale.to(tl.float32), mask=mask_b)


@triton.jit
def _orthogonalize_store_int8_kernel(
    basis_ptr, row_stride, scales_ptr, scale_stride, sample_ptr, sh_ptr, norm_ptr, rank, R, D,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Pass 3, an int8 basis: quantised as it is stored (no other pass over the row); ``norm``
    is ``||u||``, ``sh`` is ``h``."""
    d0 = tl.program_id(0).to(tl.int64) * BLOCK_D
    if d0 + BLOCK_D <= D:
        _store_int8_columns(
            basis_ptr, row_stride, scales_ptr, scale_stride, sample_ptr, sh_ptr, norm_ptr, rank, R, D, d0,
            BLOCK_K, BLOCK_D, MASKED=False,
        )  # fmt: skip
    else:
        _store_int8_columns(
            basis_ptr, row_stride, scales_ptr, scale_stride, sample_ptr, sh_ptr, norm_ptr, rank, R, D, d0,
            BLOCK_K, BLOCK_D, MASKED=True,
        )  # fmt: skip


def orthogonalize_(
    basis: Tensor,
    scales: Tensor,
    sample: Tensor,
    rank: int,
    *,
    all_reduce: Callable[[Tensor, str], None] | None = None,
) -> Tensor:
    """CGS2 of ``sample`` fp32 [D] against rows [0, rank) of ``basis`` [K, D]: fp64 [rank + 2].

    ``all_reduce(tensor, op)`` is the hook of ``reference.orthogonalize_`` (a basis sharded along
    D): it gets fp64 views of the device workspace, the raw ``[P^T v, ||v||^2]`` [rank + 1]
    ("sum") after pass 1, ``[P^T v1, ||v1||^2]`` [rank + 1] ("sum") and ``max|v1|`` [1] ("max")
    after pass 2, and combines them in place. The reduce kernels then run twice per pass (fold,
    then finish); without the hook, once.

    An int8 basis (``scales`` [K, ceil(D / 64)]): passes 1 and 2 apply the block scales as they
    read P (the reduce kernels get row scales of 1), and pass 3 quantises each 64-block of the new
    row as it stores it, with its block scale (the blocks start at this basis's column 0, one
    shard's under the hook).
    """
    warn_if_narrow(basis, "triton")
    K, D = basis.shape
    dev = sample.device
    R = max(rank, 1)  # row count of the workspaces; rank = 0 runs the loops zero times
    quant = blockwise(basis.dtype)
    # The row scales the reduce kernels apply: an int8 basis's are inside the values read.
    row_scales = torch.ones(R, dtype=torch.float32, device=dev) if quant else scales
    KP = pow2(rank)
    S, chunk = split_columns(D, dev, PROGRAMS_PER_SM)
    f64 = dict(dtype=torch.float64, device=dev)
    part = torch.empty(S, R, **f64)
    vv_part = torch.empty(S, **f64)
    ss_part = torch.empty(S, **f64)
    amax_part = torch.empty(S, **f64)
    # sums1 [rank + 1] | sums2 [rank + 2] | c1 | s * c1 (overwritten with s * h by reduce2,
    # which no longer needs s * c1) | inv
    small = torch.empty(4 * R + 4, **f64)
    sums1, sums2 = small[: rank + 1], small[R + 1 : R + rank + 3]
    c1, sc1, inv = small[2 * R + 3 : 3 * R + 3], small[3 * R + 3 : 4 * R + 3], small[4 * R + 3 :]
    out = torch.empty(rank + 2, **f64)
    stride = basis.stride(0)
    warps = 4 if KP <= 64 else 8
    # One launch that folds and finishes, or (with the hook) a fold, the hook, a finish.
    phases = [(True, True)] if all_reduce is None else [(True, False), (False, True)]

    if quant:
        _orthogonalize_int8_kernel[(S,)](
            basis, stride, scales, scales.stride(0), sample, part, vv_part, rank, D, chunk,
            BLOCK_K=_INT8_PASS1_BLOCK_K, BLOCK_D=_INT8_BLOCK_D, num_warps=4,
        )  # fmt: skip
    else:
        block_k, block_d, group = pass1_blocks(basis.element_size())
        _orthogonalize_kernel[(S,)](
            basis, stride, sample, part, vv_part, rank, D, chunk,
            BLOCK_K=block_k, BLOCK_D=block_d, GROUP=group, num_warps=4,
        )  # fmt: skip
    for fold, finish in phases:
        if finish and not fold:
            all_reduce(sums1, "sum")
        _orthogonalize_reduce1_kernel[(1,)](
            part, vv_part, row_scales, sums1, c1, sc1, S, rank,
            FOLD=fold, FINISH=finish, KP=KP, BLOCK_S=_BLOCK_S, num_warps=warps,
        )  # fmt: skip
    size = basis.element_size()
    nt, block_k, block_d = _remainder_blocks(R, size)
    tiles = dict(
        NT=nt, BLOCK_K=block_k, BLOCK_D=block_d, GROUP=16 // size,
        ROWS=remainder_rows(block_k, block_d, size), num_warps=remainder_warps(block_k, block_d, size),
    )  # fmt: skip
    if quant:
        _orthogonalize_remainder_int8_kernel[(S,)](
            basis, stride, scales, scales.stride(0), sample, sc1, part, ss_part, amax_part, rank, D, chunk,
            **tiles,
        )  # fmt: skip
    else:
        _orthogonalize_remainder_kernel[(S,)](
            basis, stride, sample, sc1, part, ss_part, amax_part, rank, D, chunk, **tiles
        )  # fmt: skip
    write_row = rank < K
    for fold, finish in phases:
        if finish and not fold:
            all_reduce(sums2[: rank + 1], "sum")
            all_reduce(sums2[rank + 1 :], "max")
        _orthogonalize_reduce2_kernel[(1,)](
            part, ss_part, amax_part, row_scales, sums1, sums2, c1, out, sc1, inv, S, rank, rank,
            ROW_AMAX=ROW_AMAX, WRITE_ROW=write_row and not quant, FOLD=fold, FINISH=finish, KP=KP,
            BLOCK_S=_BLOCK_S, num_warps=warps,
        )  # fmt: skip
    if write_row and quant:
        _orthogonalize_store_int8_kernel[(triton.cdiv(D, _INT8_BLOCK_D),)](
            basis, stride, scales, scales.stride(0), sample, sc1, out[rank:], rank, rank, D,
            BLOCK_K=_INT8_STORE_BLOCK_K, BLOCK_D=_INT8_BLOCK_D, num_warps=4,
        )  # fmt: skip
    elif write_row:
        limit = torch.finfo(basis.dtype).max
        block_k, block_d = store_blocks(basis.element_size())
        _orthogonalize_store_kernel[(triton.cdiv(D, block_d),)](
            basis, stride, sample, sc1, inv, rank, rank, D, LIMIT=limit,
            BLOCK_K=block_k, BLOCK_D=block_d, num_warps=_STORE_WARPS,
        )  # fmt: skip
    return out
