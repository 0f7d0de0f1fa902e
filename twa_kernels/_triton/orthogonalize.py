"""``orthogonalize_``: CGS2 of a sample against rows [0, rank), fp64 accumulation, 3 basis passes.

The formulas are those of ``reference.orthogonalize_``:

1. ``_orthogonalize_kernel`` (pass 1): per-chunk partials of ``P^T v`` and ``||v||^2``;
   ``_orthogonalize_reduce1_kernel`` adds them (FOLD) and finishes ``c1``, ``s * c1`` (FINISH).
2. ``_orthogonalize_remainder_kernel`` (pass 2): for each [rank, BLOCK_D] column slab, one loop
   over K in BLOCK_K tiles forms ``v1 = v - P c1``, then ``||v1||^2`` and ``max|v1|``, and a
   second loop over the same tiles accumulates ``P^T v1``. No program holds more than one
   [BLOCK_K, BLOCK_D] tile of P, so any rank runs without register spills; the second loop
   reads the slab back from L2, so DRAM traffic stays one pass. ``_orthogonalize_reduce2_kernel``
   adds the partials (FOLD) and finishes ``h``, ``||u|| = sqrt(||v1||^2 - ||c2||^2)``, the row
   scale and the returned vector (FINISH).
3. ``_orthogonalize_store_kernel`` (pass 3): ``u = v - P h`` scaled by ``ROW_AMAX / max|v1|``,
   clamped to the storage range and written to row ``rank``.

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

from .._layout import warn_if_narrow
from ..reference import ROW_AMAX
from ._common import column_mask, fold_partials, pow2, split_columns, to_storage

_BLOCK_K = 16
_BLOCK_D = 256
_BLOCK_S = 16
# Pass 2 holds one [BLOCK_K, BLOCK_D] fp64 tile at a time: at most 4K values (32 KB), 16 per
# thread at 8 warps, whatever K. The [K, BLOCK_D] slab it reads twice is kept near 64 KB so the
# second read hits L2 (see the kernel); BLOCK_D stays >= 32 columns (64 contiguous bytes of
# fp16, one full 128-byte line of fp32).
_TILE_ELEMENTS = 4096
_SLAB_BYTES = 64 * 1024
_MIN_BLOCK_D = 32


def _remainder_blocks(R: int, element_size: int) -> tuple[int, int, int]:
    """``(NT, BLOCK_K, BLOCK_D)`` of pass 2 for R rows of ``element_size`` bytes."""
    block_k = 16 if R <= 16 else 32
    fit = max(_SLAB_BYTES // (R * element_size), 1)
    block_d = 1 << (fit.bit_length() - 1)  # largest power of two <= fit
    block_d = max(_MIN_BLOCK_D, min(block_d, _BLOCK_D, _TILE_ELEMENTS // block_k))
    return max(pow2(R), block_k) // block_k, block_k, block_d


def remainder_warps(block_k: int, block_d: int) -> int:
    """Warps of pass 2: 8 for [BLOCK_K, BLOCK_D] tiles of 4K values, else 4."""
    return 8 if block_k * block_d >= 4096 else 4


@triton.jit
def _load_f64(ptrs, mask):
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32).to(tl.float64)


@triton.jit
def _dot_tile(
    acc,
    basis_ptr,
    row_stride,
    sample_ptr,
    offs_k,
    mask_k,
    d0,
    end,
    BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr,
):
    offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
    mask_d = column_mask(offs_d, end, MASKED)
    v = tl.load(sample_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float64)
    ptrs = basis_ptr + offs_k[:, None] * row_stride + offs_d[None, :]
    p = _load_f64(ptrs, mask_k[:, None] & mask_d[None, :])
    return acc + tl.sum(p * v[None, :], axis=1)


@triton.jit
def _orthogonalize_kernel(
    basis_ptr, row_stride, sample_ptr, part_ptr, vv_ptr, R, D, CHUNK,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    start = pid * CHUNK
    end = tl.minimum(start + CHUNK, D)
    full_end = start + (end - start) // BLOCK_D * BLOCK_D
    for k0 in range(0, R, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < R
        acc = tl.zeros([BLOCK_K], dtype=tl.float64)
        for d0 in range(start, full_end, BLOCK_D):
            acc = _dot_tile(acc, basis_ptr, row_stride, sample_ptr, offs_k, mask_k, d0, end, BLOCK_D, False)
        for d0 in range(full_end, end, BLOCK_D):
            acc = _dot_tile(acc, basis_ptr, row_stride, sample_ptr, offs_k, mask_k, d0, end, BLOCK_D, True)
        tl.store(part_ptr + pid * R + offs_k, acc, mask=mask_k)
    vv = tl.zeros([BLOCK_D], dtype=tl.float64)
    for d0 in range(start, end, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        v = tl.load(sample_ptr + offs_d, mask=offs_d < end, other=0.0).to(tl.float64)
        vv += v * v
    tl.store(vv_ptr + pid, tl.sum(vv, axis=0))


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
def _remainder_slab(
    acc, ss, amax, basis_ptr, row_stride, sample_ptr, sc1_ptr, R, d0, end,
    NT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """One [R, BLOCK_D] slab of pass 2: ``v1 = v - P c1``, then ``P^T v1`` into ``acc``."""
    offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
    mask_d = column_mask(offs_d, end, MASKED)
    tiles = tl.arange(0, NT)
    lanes = tl.arange(0, BLOCK_K).to(tl.int64)
    # v1 = v - P c1 over the slab's BLOCK_D columns, K in BLOCK_K tiles.
    corr = tl.zeros([BLOCK_D], dtype=tl.float64)
    for k0 in range(0, R, BLOCK_K):
        offs_k = k0 + lanes
        mask_k = offs_k < R
        sc1 = tl.load(sc1_ptr + offs_k, mask=mask_k, other=0.0)
        ptrs = basis_ptr + offs_k[:, None] * row_stride + offs_d[None, :]
        p = _load_f64(ptrs, mask_k[:, None] & mask_d[None, :])
        corr += tl.sum(sc1[:, None] * p, axis=0)
    v = tl.load(sample_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float64)
    v1 = v - corr
    ss += v1 * v1
    amax = tl.maximum(amax, tl.abs(v1))
    # P^T v1 over the same slab. This second read of the [K, BLOCK_D] slab comes from L2:
    # at K = 512 and BLOCK_D = 64 an fp16 slab is 64 KB, and 4 programs per SM on 132 SMs
    # keep 34 MB live, inside the 50 MB L2 of an H100/H200. DRAM still sees one pass.
    for k0 in range(0, R, BLOCK_K):
        offs_k = k0 + lanes
        mask_k = offs_k < R
        ptrs = basis_ptr + offs_k[:, None] * row_stride + offs_d[None, :]
        p = _load_f64(ptrs, mask_k[:, None] & mask_d[None, :])
        t = tl.sum(p * v1[None, :], axis=1)
        acc = tl.where((tiles == k0 // BLOCK_K)[:, None], acc + t[None, :], acc)
    return acc, ss, amax


@triton.jit
def _orthogonalize_remainder_kernel(
    basis_ptr, row_stride, sample_ptr, sc1_ptr, part_ptr, ss_ptr, amax_ptr, R, D, CHUNK,
    NT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    start = pid * CHUNK
    end = tl.minimum(start + CHUNK, D)
    full_end = start + (end - start) // BLOCK_D * BLOCK_D
    # P^T v1 of this chunk, one row per K tile: [NT, BLOCK_K] fp64 (512 values = 4 KB at K = 512,
    # 4 per thread at the 4 warps a [32, 64] tile gets). Tile t is updated through a select on
    # the tile index, because a register tensor cannot be indexed by the loop counter.
    acc = tl.zeros([NT, BLOCK_K], dtype=tl.float64)
    ss = tl.zeros([BLOCK_D], dtype=tl.float64)
    amax = tl.zeros([BLOCK_D], dtype=tl.float64)
    for d0 in range(start, full_end, BLOCK_D):
        acc, ss, amax = _remainder_slab(
            acc, ss, amax, basis_ptr, row_stride, sample_ptr, sc1_ptr, R, d0, end,
            NT, BLOCK_K, BLOCK_D, MASKED=False,
        )  # fmt: skip
    for d0 in range(full_end, end, BLOCK_D):
        acc, ss, amax = _remainder_slab(
            acc, ss, amax, basis_ptr, row_stride, sample_ptr, sc1_ptr, R, d0, end,
            NT, BLOCK_K, BLOCK_D, MASKED=True,
        )  # fmt: skip
    offs = tl.arange(0, NT).to(tl.int64)[:, None] * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)[None, :]
    tl.store(part_ptr + pid * R + offs, acc, mask=offs < R)
    tl.store(ss_ptr + pid, tl.sum(ss, axis=0))
    tl.store(amax_ptr + pid, tl.max(amax, axis=0))


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
def _store_columns(
    basis_ptr, row_stride, sample_ptr, sh_ptr, inv_ptr, rank, R, D, offs_d, LIMIT: tl.constexpr,
    BLOCK_K: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    mask_d = column_mask(offs_d, D, MASKED)
    u = tl.load(sample_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float64)
    for k0 in range(0, R, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < R
        sh = tl.load(sh_ptr + offs_k, mask=mask_k, other=0.0)
        ptrs = basis_ptr + offs_k[:, None] * row_stride + offs_d[None, :]
        p = _load_f64(ptrs, mask_k[:, None] & mask_d[None, :])
        u -= tl.sum(sh[:, None] * p, axis=0)
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
    """
    warn_if_narrow(basis, "triton")
    K, D = basis.shape
    dev = sample.device
    R = max(rank, 1)  # row count of the workspaces; rank = 0 runs the loops zero times
    KP = pow2(rank)
    S, chunk = split_columns(D, dev)
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

    _orthogonalize_kernel[(S,)](
        basis, stride, sample, part, vv_part, rank, D, chunk, BLOCK_K=_BLOCK_K, BLOCK_D=_BLOCK_D
    )
    for fold, finish in phases:
        if finish and not fold:
            all_reduce(sums1, "sum")
        _orthogonalize_reduce1_kernel[(1,)](
            part, vv_part, scales, sums1, c1, sc1, S, rank,
            FOLD=fold, FINISH=finish, KP=KP, BLOCK_S=_BLOCK_S, num_warps=warps,
        )  # fmt: skip
    nt, block_k, block_d = _remainder_blocks(R, basis.element_size())
    _orthogonalize_remainder_kernel[(S,)](
        basis, stride, sample, sc1, part, ss_part, amax_part, rank, D, chunk,
        NT=nt, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=remainder_warps(block_k, block_d),
    )  # fmt: skip
    write_row = rank < K
    for fold, finish in phases:
        if finish and not fold:
            all_reduce(sums2[: rank + 1], "sum")
            all_reduce(sums2[rank + 1 :], "max")
        _orthogonalize_reduce2_kernel[(1,)](
            part, ss_part, amax_part, scales, sums1, sums2, c1, out, sc1, inv, S, rank, rank,
            ROW_AMAX=ROW_AMAX, WRITE_ROW=write_row, FOLD=fold, FINISH=finish, KP=KP,
            BLOCK_S=_BLOCK_S, num_warps=warps,
        )  # fmt: skip
    if write_row:
        limit = torch.finfo(basis.dtype).max
        _orthogonalize_store_kernel[(triton.cdiv(D, _BLOCK_D),)](
            basis, stride, sample, sc1, inv, rank, rank, D, LIMIT=limit,
            BLOCK_K=_BLOCK_K, BLOCK_D=_BLOCK_D,
        )  # fmt: skip
    return out
