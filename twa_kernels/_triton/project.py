"""``project``: ``c = P^T x`` for x [D] or [B, D], fp32 accumulation, two deterministic stages.

Stage 1 splits the columns into S contiguous chunks and writes one partial per chunk to
``part[s, b, k]``. ``_project_kernel`` (one vector) runs a [K tiles, S] grid, the K tile
fastest: program (t, s) sums rows ``[t * BLOCK_K, (t + 1) * BLOCK_K)`` over chunk s in a
register tile and reduces it once at the end; the programs of one chunk run side by side, so x
comes from DRAM about once and from L2 for the other K tiles. ``_project_batched_kernel`` (up
to 16 vectors, through ``tl.dot``) walks K tiles outside and column tiles inside. Stage 2
(``_project_reduce_kernel``) adds the S partials in a fixed order and applies the row scales.
No atomics.

An int8 basis has kernels of its own for stage 1 (``_project_int8_kernel``: the same grid, each
K tile walked row by row; ``_project_batched_int8_kernel``): they apply the block scales as they
sum, so their partials are sums of P's values and stage 2 applies no row scales.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._layout import blockwise, warn_if_narrow
from ._common import (
    QBLOCK,
    QRUN,
    column_mask,
    configs,
    fold_partials,
    group_dot,
    int8_row,
    int8_to_float,
    launched_config,
    most_wave_splits,
    pow2,
    split_columns,
    tuned,
    wave_grid,
    wave_splits,
)

# Single vector: [BLOCK_K, BLOCK_D] tiles of ROW_BYTES per row (BLOCK_D = ROW_BYTES / value
# size), 4 16-byte basis loads per thread and tile whatever the storage dtype, plus the next
# tile's 4 prefetched while one is summed. PROGRAMS_PER_SM is the one wave the grid fills: the
# compiled code's registers must allow it on an H100/H200 (tests/test_triton_codegen.py).
_CONFIGS_1 = [
    triton.Config({"BLOCK_K": 16, "ROW_BYTES": 512, "PROGRAMS_PER_SM": 5}, num_warps=4),
    triton.Config({"BLOCK_K": 8, "ROW_BYTES": 1024, "PROGRAMS_PER_SM": 4}, num_warps=4),
    triton.Config({"BLOCK_K": 32, "ROW_BYTES": 512, "PROGRAMS_PER_SM": 2}, num_warps=8),
    triton.Config({"BLOCK_K": 16, "ROW_BYTES": 1024, "PROGRAMS_PER_SM": 2}, num_warps=8),
]
# Split boundaries are multiples of this many columns (every BLOCK_D divides it), so only a
# split's last tile can be partial.
SPLIT_ALIGN = tl.constexpr(1024)
# Single vector, int8 basis: the tile is walked row by row, each row [BLOCK_D] one 16-byte load
# per thread (BLOCK_D = 16 x 32 lanes x warps), so that a thread's 16 values lie in one scale
# block and its block scale is a [BLOCK_D // 16] vector in the row's layout (a [BLOCK_K, blocks]
# scale tile broadcast to the basis tile went through shared memory: 2 BAR per tile). BLOCK_K
# loads per thread and tile; PROGRAMS_PER_SM as above. Splits start at multiples of BLOCK_D.
_CONFIGS_Q = [
    triton.Config({"BLOCK_K": 8, "BLOCK_D": 2048, "PROGRAMS_PER_SM": 4}, num_warps=4),
    triton.Config({"BLOCK_K": 16, "BLOCK_D": 2048, "PROGRAMS_PER_SM": 2}, num_warps=4),
    triton.Config({"BLOCK_K": 8, "BLOCK_D": 4096, "PROGRAMS_PER_SM": 2}, num_warps=8),
]
# Batch (B <= 16 padded to 16): tl.dot needs every tile dim >= 16; ieee fp32 keeps full fp32.
# The compiler pipelines these loads (16-byte asynchronous copies). A [16, 128] tile at 4 warps
# was replaced: with an fp16 basis its sm_90 code spilled 528 bytes (255 registers).
_CONFIGS_B = [
    triton.Config({"BLOCK_K": 32, "BLOCK_D": 64}, num_warps=4),
    triton.Config({"BLOCK_K": 32, "BLOCK_D": 64}, num_warps=8),
    triton.Config({"BLOCK_K": 64, "BLOCK_D": 64}, num_warps=8),
]
# Stage 2 adds BLOCK_S partials per step with one tree sum, then steps in order over S, in
# [BLOCK_S, BLOCK_N] tiles of 8K values: few outputs (small K) take tall tiles, so the S
# partials (528 on an H200) are added in one or two steps instead of 17 dependent loads of 32.
_REDUCE_TILE = 8192
_REDUCE_BLOCK_N = 128


# Columns of a ROW_BYTES tile row, and values per 16 bytes, of the basis being read.
_TILE_COLUMNS = {
    "BLOCK_D": lambda args: args["ROW_BYTES"] // args["basis_ptr"].element_size(),
    "GROUP": lambda args: 16 // args["basis_ptr"].element_size(),
}


@triton.jit
def _column_tile(
    rows, x_ptr, mask_k, d0, end, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr
):  # fmt: skip
    """Basis rows ``rows`` [BLOCK_K, 1] at columns ``[d0, d0 + BLOCK_D)``, and x there (fp32)."""
    offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
    mask_d = column_mask(offs_d, end, MASKED)
    p = tl.load(rows + offs_d[None, :], mask=mask_k[:, None] & mask_d[None, :], other=0.0,
                eviction_policy="evict_first")  # fmt: skip
    # x read as a [BLOCK_K, BLOCK_D] broadcast (all rows at the same addresses; one load per
    # thread and column group): it then has the basis tile's layout. Read as a [BLOCK_D] vector
    # it was moved into that layout through shared memory, with 2-4 BAR in the loop.
    same = tl.zeros([BLOCK_K, 1], dtype=tl.int64)
    x = tl.load(x_ptr + same + offs_d[None, :], mask=mask_d[None, :], other=0.0).to(tl.float32)
    return p, x


@triton.jit
def _split_range(D, ALIGN: tl.constexpr, BLOCK_D: tl.constexpr):
    """``(s, start, end, full_end)`` of program (t, s) of a [K tiles, S] grid: split s covers
    columns ``[start, end)`` (S chunks of a multiple of ALIGN columns), whole BLOCK_D tiles up to
    ``full_end``, then at most one masked tile."""
    s = tl.program_id(1).to(tl.int64)
    chunk = tl.cdiv(tl.cdiv(D, tl.num_programs(1)), ALIGN).to(tl.int64) * ALIGN
    start = s * chunk
    end = tl.minimum(start + chunk, D)
    full_end = start + tl.maximum(end - start, 0) // BLOCK_D * BLOCK_D
    return s, start, end, full_end


@triton.autotune(configs=configs(_CONFIGS_1), key=["K", "D"])
@triton.heuristics(_TILE_COLUMNS)
@triton.jit
def _project_kernel(
    basis_ptr, row_stride, x_ptr, part_ptr, K, D,
    BLOCK_K: tl.constexpr, ROW_BYTES: tl.constexpr, PROGRAMS_PER_SM: tl.constexpr,
    BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    """Stage 1 for one vector: program (t, s) writes ``part[s, t * BLOCK_K + i]``."""
    t = tl.program_id(0).to(tl.int64)
    # Whole tiles without a column mask, then at most one masked tile.
    s, start, end, full_end = _split_range(D, SPLIT_ALIGN, BLOCK_D)
    offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    mask_k = offs_k < K
    rows = basis_ptr + offs_k[:, None] * row_stride
    tile = tl.zeros([BLOCK_K, BLOCK_D // GROUP], dtype=tl.float32)
    if start < full_end:
        # Register prefetch: tile i + 1's loads are issued before tile i is summed.
        p, x = _column_tile(rows, x_ptr, mask_k, start, end, BLOCK_K, BLOCK_D, MASKED=False)
        for d0 in range(start + BLOCK_D, full_end, BLOCK_D):
            p_next, x_next = _column_tile(rows, x_ptr, mask_k, d0, end, BLOCK_K, BLOCK_D, MASKED=False)
            tile = group_dot(tile, p, x, BLOCK_K, BLOCK_D, GROUP)
            p, x = p_next, x_next
        tile = group_dot(tile, p, x, BLOCK_K, BLOCK_D, GROUP)
    for d0 in range(full_end, end, BLOCK_D):
        p, x = _column_tile(rows, x_ptr, mask_k, d0, end, BLOCK_K, BLOCK_D, MASKED=True)
        tile = group_dot(tile, p, x, BLOCK_K, BLOCK_D, GROUP)
    tl.store(part_ptr + s * K + offs_k, tl.sum(tile, axis=1), mask=mask_k)


@triton.jit
def _int8_tile_row(
    tile, x, basis_ptr, row_stride, scales_ptr, scale_stride, t, r, K, d0, end,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """``tile`` with row r of the K tile plus that basis row times ``x`` ([BLOCK_D // 16, 16]),
    each run of 16 columns summed in its thread and scaled. For a compile-time r the select is
    resolved there: each row adds to its own registers."""
    k = t * BLOCK_K + r
    q, scale = int8_row(basis_ptr, row_stride, scales_ptr, scale_stride, k, k < K, d0, end, BLOCK_D, MASKED)
    sums = tl.sum(q * x, axis=1) * scale
    return tl.where(tl.arange(0, BLOCK_K)[:, None] == r, tile + sums[None, :], tile)


@triton.jit
def _int8_tile(
    tile, basis_ptr, row_stride, scales_ptr, scale_stride, x_ptr, t, K, d0, end,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """``tile`` [BLOCK_K, BLOCK_D // 16] plus the K tile's rows times x at columns
    ``[d0, d0 + BLOCK_D)``: whole tiles row after row in one unrolled block (BLOCK_K 16-byte
    loads in flight), a masked tile one row at a time (a masked row is 16 one-byte loads per
    thread, a register each: all its rows in flight took every register and spilled)."""
    cols = tl.arange(0, BLOCK_D)
    x = tl.load(x_ptr + d0 + cols, mask=column_mask(cols, end - d0, MASKED), other=0.0).to(tl.float32)
    x = tl.reshape(x, (BLOCK_D // QRUN, QRUN))
    if MASKED:
        for r in tl.range(0, BLOCK_K, loop_unroll_factor=1):
            tile = _int8_tile_row(
                tile, x, basis_ptr, row_stride, scales_ptr, scale_stride, t, r, K, d0, end,
                BLOCK_K, BLOCK_D, MASKED,
            )  # fmt: skip
    else:
        for r in tl.static_range(BLOCK_K):
            tile = _int8_tile_row(
                tile, x, basis_ptr, row_stride, scales_ptr, scale_stride, t, r, K, d0, end,
                BLOCK_K, BLOCK_D, MASKED,
            )  # fmt: skip
    return tile


@triton.autotune(configs=configs(_CONFIGS_Q), key=["K", "D"])
@triton.jit
def _project_int8_kernel(
    basis_ptr, row_stride, scales_ptr, scale_stride, x_ptr, part_ptr, K, D,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PROGRAMS_PER_SM: tl.constexpr,
):  # fmt: skip
    """Stage 1 for one vector and an int8 basis (``_project_kernel``'s grid and partials, the
    block scales applied): program (t, s) writes ``part[s, t * BLOCK_K + i]``."""
    t = tl.program_id(0).to(tl.int64)
    s, start, end, full_end = _split_range(D, BLOCK_D, BLOCK_D)
    tile = tl.zeros([BLOCK_K, BLOCK_D // QRUN], dtype=tl.float32)
    for d0 in range(start, full_end, BLOCK_D):
        tile = _int8_tile(
            tile, basis_ptr, row_stride, scales_ptr, scale_stride, x_ptr, t, K, d0, end,
            BLOCK_K, BLOCK_D, MASKED=False,
        )  # fmt: skip
    for d0 in range(full_end, end, BLOCK_D):
        tile = _int8_tile(
            tile, basis_ptr, row_stride, scales_ptr, scale_stride, x_ptr, t, K, d0, end,
            BLOCK_K, BLOCK_D, MASKED=True,
        )  # fmt: skip
    offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    tl.store(part_ptr + s * K + offs_k, tl.sum(tile, axis=1), mask=offs_k < K)


@triton.jit
def _batch_tile(
    acc, row, scales_ptr, scale_stride, offs_k, x_ptr, x_stride, offs_b, mask_b, mask_k, d0, end,
    BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """``acc`` [16, BLOCK_K] plus one [BLOCK_K, BLOCK_D] tile's products with 16 rows of x; an
    int8 tile (``scales_ptr`` not None) times its block scales, one loaded per value."""
    offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
    mask_d = column_mask(offs_d, end, MASKED)
    mask = mask_k[:, None] & mask_d[None, :]
    p = tl.load(row + offs_d[None, :], mask=mask, other=0.0)
    if scales_ptr is not None:
        blocks = offs_k[:, None] * scale_stride + offs_d[None, :] // QBLOCK
        p = int8_to_float(p) * tl.load(scales_ptr + blocks, mask=mask, other=0.0)
    xp = x_ptr + offs_b[:, None] * x_stride + offs_d[None, :]
    x = tl.load(xp, mask=mask_b[:, None] & mask_d[None, :], other=0.0)
    return tl.dot(x.to(tl.float32), tl.trans(p.to(tl.float32)), acc, input_precision="ieee")


@triton.jit
def _batched_partials(
    basis_ptr, row_stride, scales_ptr, scale_stride, x_ptr, x_stride, part_ptr, K, D, B, CHUNK,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Stage 1 for up to 16 vectors: K tiles outside (the [16, BLOCK_K] accumulator of tl.dot
    cannot take the select trick cheaply), column tiles inside; the compiler pipelines this
    loop's loads itself (it feeds a dot). ``scales_ptr``: None (a float basis) or an int8
    basis's block scales."""
    pid = tl.program_id(0).to(tl.int64)
    start = pid * CHUNK
    end = tl.minimum(start + CHUNK, D)
    full_end = start + (end - start) // BLOCK_D * BLOCK_D
    offs_b = tl.arange(0, 16).to(tl.int64)
    mask_b = offs_b < B
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < K
        row = basis_ptr + offs_k[:, None] * row_stride
        acc = tl.zeros([16, BLOCK_K], dtype=tl.float32)
        for d0 in range(start, full_end, BLOCK_D):
            acc = _batch_tile(
                acc, row, scales_ptr, scale_stride, offs_k, x_ptr, x_stride, offs_b, mask_b, mask_k,
                d0, end, BLOCK_D, MASKED=False,
            )  # fmt: skip
        for d0 in range(full_end, end, BLOCK_D):
            acc = _batch_tile(
                acc, row, scales_ptr, scale_stride, offs_k, x_ptr, x_stride, offs_b, mask_b, mask_k,
                d0, end, BLOCK_D, MASKED=True,
            )  # fmt: skip
        out = part_ptr + pid * B * K + offs_b[:, None] * K + offs_k[None, :]
        tl.store(out, acc, mask=mask_b[:, None] & mask_k[None, :])


@triton.autotune(configs=configs(_CONFIGS_B), key=["K", "D", "B"])
@triton.jit
def _project_batched_kernel(
    basis_ptr, row_stride, x_ptr, x_stride, part_ptr, K, D, B, CHUNK,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Stage 1 for up to 16 vectors and a float basis (``_batched_partials``)."""
    _batched_partials(
        basis_ptr, row_stride, None, None, x_ptr, x_stride, part_ptr, K, D, B, CHUNK, BLOCK_K, BLOCK_D
    )


@triton.autotune(configs=configs(_CONFIGS_B), key=["K", "D", "B"])
@triton.jit
def _project_batched_int8_kernel(
    basis_ptr, row_stride, scales_ptr, scale_stride, x_ptr, x_stride, part_ptr, K, D, B, CHUNK,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Stage 1 for up to 16 vectors and an int8 basis (``_batched_partials``)."""
    _batched_partials(
        basis_ptr, row_stride, scales_ptr, scale_stride, x_ptr, x_stride, part_ptr, K, D, B, CHUNK,
        BLOCK_K, BLOCK_D,
    )  # fmt: skip


@triton.jit
def _project_reduce_kernel(
    part_ptr, scales_ptr, out_ptr, S, K, N, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr
):
    pid = tl.program_id(0).to(tl.int64)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask_n = offs_n < N
    acc = fold_partials(part_ptr, S, N, offs_n, mask_n, BLOCK_S, False)
    if scales_ptr is not None:
        acc = acc * tl.load(scales_ptr + offs_n % K, mask=mask_n, other=0.0)
    tl.store(out_ptr + offs_n, acc, mask=mask_n)


def project_partials(basis: Tensor, scales: Tensor, x2: Tensor) -> Tensor:
    """Stage 1 only: fp32 partial sums [S, B, K] of ``basis @ x2.T`` without the row scales of a
    float basis (``scales`` is read for an int8 basis only: its block scales are in the sums)."""
    K, D = basis.shape
    B = x2.shape[0]
    dev = x2.device
    quantised = blockwise(basis.dtype)
    blocks = (scales, scales.stride(0)) if quantised else ()
    if B == 1:
        # The partials of the config that ran are returned.
        kernel = _project_int8_kernel if quantised else _project_kernel
        part = torch.empty(most_wave_splits(kernel, K, dev), 1, K, dtype=torch.float32, device=dev)
        kernel = tuned(kernel)
        kernel[wave_grid(K, dev)](basis, basis.stride(0), *blocks, x2, part, K, D)
        return part[: wave_splits(K, launched_config(kernel).kwargs, dev)]
    S, chunk = split_columns(D, dev)
    part = torch.empty(S, B, K, dtype=torch.float32, device=dev)
    kernel = tuned(_project_batched_int8_kernel if quantised else _project_batched_kernel)
    kernel[(S,)](basis, basis.stride(0), *blocks, x2, x2.stride(0), part, K, D, B, chunk)
    return part


def reduce_partials(part: Tensor, scales: Tensor | None) -> Tensor:
    """Stage 2: ``scales * sum_s part[s]`` (``sum_s part[s]`` for None) as fp32 [B, K], summed in
    a fixed order."""
    S, B, K = part.shape
    out = torch.empty(B, K, dtype=torch.float32, device=part.device)
    block_n = min(_REDUCE_BLOCK_N, pow2(B * K))
    grid = (triton.cdiv(B * K, block_n),)
    _project_reduce_kernel[grid](
        part, scales, out, S, K, B * K, BLOCK_S=_REDUCE_TILE // block_n, BLOCK_N=block_n, num_warps=8
    )
    return out


def project(basis: Tensor, scales: Tensor, x: Tensor) -> Tensor:
    """``P^T x``: fp32 [K] for x [D], fp32 [B, K] for x [B, D] (B <= 16 per tile, any B)."""
    warn_if_narrow(basis, "triton")
    x2 = x if x.dim() == 2 else x.unsqueeze(0)
    if x2.shape[0] == 0:
        return torch.zeros(0, basis.shape[0], dtype=torch.float32, device=x.device)
    outs = []
    # The batched tile holds 16 rows of x; larger batches run in groups of 16.
    for b0 in range(0, x2.shape[0], 16):
        xb = x2[b0 : b0 + 16]
        row_scales = None if blockwise(basis.dtype) else scales
        outs.append(reduce_partials(project_partials(basis, scales, xb), row_scales))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out if x.dim() == 2 else out.squeeze(0)
