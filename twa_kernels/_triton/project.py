"""``project``: ``c = P^T x`` for x [D] or [B, D], fp32 accumulation, two deterministic stages.

Stage 1: program s takes columns ``[s * CHUNK, (s + 1) * CHUNK)`` in BLOCK_D tiles and K in
BLOCK_K rows, and writes its partial sums to ``part[s, b, k]``; ``_project_kernel`` (one vector)
walks the column tiles outside and K inside, so x is read once, ``_project_batched_kernel`` (up
to 16 vectors, through ``tl.dot``) the other way round. Stage 2 (``_project_reduce_kernel``)
adds the S partials in a fixed order and applies the row scales. No atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._layout import warn_if_narrow
from ._common import column_mask, configs, dot_tiles, fold_partials, pow2, split_columns, tuned

# Single vector: [BLOCK_K, BLOCK_D] tiles of 4-16K elements, 2-8 16-byte loads of an fp16
# basis per thread and tile (registers and local memory of each config's sm_90 code are checked
# by tests/test_triton_codegen.py). Bytes in flight per program come from larger tiles, or from
# STAGES > 1, which has the compiler prefetch the next K tiles into shared memory.
_CONFIGS_1 = [
    triton.Config({"BLOCK_K": 16, "BLOCK_D": 256, "STAGES": 1}, num_warps=4),
    triton.Config({"BLOCK_K": 32, "BLOCK_D": 256, "STAGES": 1}, num_warps=8),
    triton.Config({"BLOCK_K": 8, "BLOCK_D": 256, "STAGES": 1}, num_warps=4),
    triton.Config({"BLOCK_K": 64, "BLOCK_D": 128, "STAGES": 1}, num_warps=8),
    triton.Config({"BLOCK_K": 32, "BLOCK_D": 512, "STAGES": 1}, num_warps=8),
    triton.Config({"BLOCK_K": 16, "BLOCK_D": 256, "STAGES": 3}, num_warps=4),
    triton.Config({"BLOCK_K": 32, "BLOCK_D": 256, "STAGES": 3}, num_warps=8),
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


@triton.jit
def _vector_tile(
    acc, basis_ptr, row_stride, x_ptr, K, d0, end,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, NT: tl.constexpr, STAGES: tl.constexpr,
    MASKED: tl.constexpr,
):  # fmt: skip
    """``acc`` [NT, BLOCK_K] plus the ``P^T x`` of columns [d0, d0 + BLOCK_D), all K tiles."""
    offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
    mask_d = column_mask(offs_d, end, MASKED)
    x = tl.load(x_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    return dot_tiles(acc, basis_ptr, row_stride, offs_d, mask_d, x, K, BLOCK_K, NT, STAGES)


@triton.autotune(configs=configs(_CONFIGS_1), key=["K", "D"])
@triton.heuristics({"NT": lambda args: pow2(triton.cdiv(args["K"], args["BLOCK_K"]))})
@triton.jit
def _project_kernel(
    basis_ptr, row_stride, x_ptr, part_ptr, K, D, CHUNK,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr, NT: tl.constexpr,
):  # fmt: skip
    """Stage 1 for one vector: column tiles outside, K tiles inside, so x is read once."""
    pid = tl.program_id(0).to(tl.int64)
    start = pid * CHUNK
    end = tl.minimum(start + CHUNK, D)
    # Whole tiles without a column mask, then at most one masked tile.
    full_end = start + (end - start) // BLOCK_D * BLOCK_D
    acc = tl.zeros([NT, BLOCK_K], dtype=tl.float32)
    for d0 in range(start, full_end, BLOCK_D):
        acc = _vector_tile(
            acc, basis_ptr, row_stride, x_ptr, K, d0, end, BLOCK_K, BLOCK_D, NT, STAGES, MASKED=False
        )
    for d0 in range(full_end, end, BLOCK_D):
        acc = _vector_tile(
            acc, basis_ptr, row_stride, x_ptr, K, d0, end, BLOCK_K, BLOCK_D, NT, STAGES, MASKED=True
        )
    offs = tl.arange(0, NT).to(tl.int64)[:, None] * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)[None, :]
    tl.store(part_ptr + pid * K + offs, acc, mask=offs < K)


@triton.jit
def _batch_tile(
    acc, row, x_ptr, x_stride, offs_b, mask_b, mask_k, d0, end,
    BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """``acc`` [16, BLOCK_K] plus one [BLOCK_K, BLOCK_D] tile's products with 16 rows of x."""
    offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
    mask_d = column_mask(offs_d, end, MASKED)
    p = tl.load(row + offs_d[None, :], mask=mask_k[:, None] & mask_d[None, :], other=0.0)
    xp = x_ptr + offs_b[:, None] * x_stride + offs_d[None, :]
    x = tl.load(xp, mask=mask_b[:, None] & mask_d[None, :], other=0.0)
    return tl.dot(x.to(tl.float32), tl.trans(p.to(tl.float32)), acc, input_precision="ieee")


@triton.autotune(configs=configs(_CONFIGS_B), key=["K", "D", "B"])
@triton.jit
def _project_batched_kernel(
    basis_ptr, row_stride, x_ptr, x_stride, part_ptr, K, D, B, CHUNK,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Stage 1 for up to 16 vectors: K tiles outside (the [16, BLOCK_K] accumulator of tl.dot
    cannot take the select trick cheaply), column tiles inside; the compiler pipelines this
    loop's loads itself (it feeds a dot)."""
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
                acc, row, x_ptr, x_stride, offs_b, mask_b, mask_k, d0, end, BLOCK_D, MASKED=False
            )
        for d0 in range(full_end, end, BLOCK_D):
            acc = _batch_tile(
                acc, row, x_ptr, x_stride, offs_b, mask_b, mask_k, d0, end, BLOCK_D, MASKED=True
            )
        out = part_ptr + pid * B * K + offs_b[:, None] * K + offs_k[None, :]
        tl.store(out, acc, mask=mask_b[:, None] & mask_k[None, :])


@triton.jit
def _project_reduce_kernel(
    part_ptr, scales_ptr, out_ptr, S, K, N, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr
):
    pid = tl.program_id(0).to(tl.int64)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask_n = offs_n < N
    acc = fold_partials(part_ptr, S, N, offs_n, mask_n, BLOCK_S, False)
    scale = tl.load(scales_ptr + offs_n % K, mask=mask_n, other=0.0)
    tl.store(out_ptr + offs_n, acc * scale, mask=mask_n)


def project_partials(basis: Tensor, x2: Tensor) -> Tensor:
    """Stage 1 only: fp32 partial sums [S, B, K] of ``basis @ x2.T`` (no scales)."""
    K, D = basis.shape
    B = x2.shape[0]
    S, chunk = split_columns(D, x2.device)
    part = torch.empty(S, B, K, dtype=torch.float32, device=x2.device)
    if B == 1:
        tuned(_project_kernel)[(S,)](basis, basis.stride(0), x2, part, K, D, chunk)
    else:
        tuned(_project_batched_kernel)[(S,)](basis, basis.stride(0), x2, x2.stride(0), part, K, D, B, chunk)
    return part


def reduce_partials(part: Tensor, scales: Tensor) -> Tensor:
    """Stage 2: ``scales * sum_s part[s]`` as fp32 [B, K], summed in a fixed order."""
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
        outs.append(reduce_partials(project_partials(basis, xb), scales))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out if x.dim() == 2 else out.squeeze(0)
