"""``reconstruct_``: ``out = w0 + P alpha``, fp32 arithmetic rounded once to out's dtype.

Each program owns BLOCK_D columns and loops over K in BLOCK_K rows, so no reduction crosses
programs and the result does not depend on the grid.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .._layout import blockwise, warn_if_narrow
from ._common import add_combination, column_mask, configs, int8_row, to_storage, tuned

# [BLOCK_K, BLOCK_D] basis tiles of ROW_BYTES per row: BLOCK_D = ROW_BYTES / value size columns,
# 16 bytes per thread and row across all the program's threads (4 warps x 32 lanes x 16 bytes =
# 2048), so each thread issues BLOCK_K 16-byte loads per tile, whatever the storage dtype, and
# sums over K without leaving its registers. Registers, loads in flight and the programs per SM
# they allow are checked from the sm_90 code (tests/test_triton_codegen.py).
# (8-warp tiles of 4096 bytes ran 1 program per SM at 150-197 registers: dropped.)
_CONFIGS = [
    triton.Config({"BLOCK_K": 4, "ROW_BYTES": 2048}, num_warps=4),
    triton.Config({"BLOCK_K": 8, "ROW_BYTES": 2048}, num_warps=4),
]
# int8 basis: the same tiles (2048 columns, BLOCK_K 16-byte loads per thread), walked row by
# row so that each thread's 16 values take their block's scale (``_common.int8_row``).
_CONFIGS_Q = [
    triton.Config({"BLOCK_K": 4, "BLOCK_D": 2048}, num_warps=4),
    triton.Config({"BLOCK_K": 8, "BLOCK_D": 2048}, num_warps=4),
]


def block_d(args) -> int:
    """Columns of a ``ROW_BYTES`` tile row of ``args["basis_ptr"]``."""
    return args["ROW_BYTES"] // args["basis_ptr"].element_size()


@triton.jit
def _reconstruct_columns(
    out_ptr, w0_ptr, basis_ptr, row_stride, scales_ptr, alpha_ptr, K, D, offs_d,
    BLOCK_K: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Columns ``offs_d`` of ``w0 + P alpha``; only a MASKED call (the last tile) checks ``D``."""
    mask_d = column_mask(offs_d, D, MASKED)
    acc = tl.load(w0_ptr + offs_d, mask=mask_d, other=0.0)
    acc = add_combination(acc, basis_ptr, row_stride, scales_ptr, alpha_ptr, K, offs_d, mask_d, BLOCK_K)
    tl.store(out_ptr + offs_d, to_storage(acc, out_ptr.dtype.element_ty), mask=mask_d)


@triton.autotune(configs=configs(_CONFIGS), key=["K", "D"])
@triton.heuristics({"BLOCK_D": block_d})
@triton.jit
def _reconstruct_kernel(
    out_ptr, w0_ptr, basis_ptr, row_stride, scales_ptr, alpha_ptr, K, D,
    BLOCK_K: tl.constexpr, ROW_BYTES: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per BLOCK_D columns (no reduction crosses programs, so the grid is not
    capped: every SM holds as many programs as its registers allow)."""
    pid = tl.program_id(0).to(tl.int64)
    offs_d = pid * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    if (pid + 1) * BLOCK_D <= D:
        _reconstruct_columns(
            out_ptr, w0_ptr, basis_ptr, row_stride, scales_ptr, alpha_ptr, K, D, offs_d,
            BLOCK_K, MASKED=False,
        )  # fmt: skip
    else:
        _reconstruct_columns(
            out_ptr, w0_ptr, basis_ptr, row_stride, scales_ptr, alpha_ptr, K, D, offs_d,
            BLOCK_K, MASKED=True,
        )  # fmt: skip


@triton.jit
def _add_int8_row(
    acc, basis_ptr, row_stride, scales_ptr, scale_stride, alpha_ptr, k, K, d0, D,
    BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """``acc`` [BLOCK_D // 16, 16] plus ``alpha[k]`` times row k (int64) of an int8 basis at
    columns ``[d0, d0 + BLOCK_D)``, each value times its block's scale."""
    ok = k < K
    q, scale = int8_row(basis_ptr, row_stride, scales_ptr, scale_stride, k, ok, d0, D, BLOCK_D, MASKED)
    coef = tl.load(alpha_ptr + k, mask=ok, other=0.0)
    return acc + q * (scale * coef)[:, None]


@triton.jit
def _reconstruct_int8_columns(
    out_ptr, w0_ptr, basis_ptr, row_stride, scales_ptr, scale_stride, alpha_ptr, K, D, d0,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Columns ``[d0, d0 + BLOCK_D)`` of ``w0 + P alpha`` for an int8 basis, summed over K in
    registers, then w0 added. Whole tiles take BLOCK_K rows per step (as many 16-byte loads in
    flight); the last, masked tile one row at a time (a masked row is 16 one-byte loads per
    thread, a register each)."""
    acc = tl.zeros([BLOCK_D // 16, 16], dtype=tl.float32)
    if MASKED:
        for k in tl.range(0, K, loop_unroll_factor=1):
            acc = _add_int8_row(
                acc, basis_ptr, row_stride, scales_ptr, scale_stride, alpha_ptr, tl.cast(k, tl.int64),
                K, d0, D, BLOCK_D, MASKED,
            )  # fmt: skip
    else:
        for k0 in range(0, K, BLOCK_K):
            for r in tl.static_range(BLOCK_K):
                acc = _add_int8_row(
                    acc, basis_ptr, row_stride, scales_ptr, scale_stride, alpha_ptr,
                    tl.cast(k0, tl.int64) + r, K, d0, D, BLOCK_D, MASKED,
                )  # fmt: skip
    cols = tl.arange(0, BLOCK_D)
    mask_d = column_mask(cols, D - d0, MASKED)
    w = tl.load(w0_ptr + d0 + cols, mask=mask_d, other=0.0) + tl.reshape(acc, (BLOCK_D,))
    tl.store(out_ptr + d0 + cols, to_storage(w, out_ptr.dtype.element_ty), mask=mask_d)


@triton.autotune(configs=configs(_CONFIGS_Q), key=["K", "D"])
@triton.jit
def _reconstruct_int8_kernel(
    out_ptr, w0_ptr, basis_ptr, row_stride, scales_ptr, scale_stride, alpha_ptr, K, D,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``_reconstruct_kernel`` for an int8 basis: one program per BLOCK_D columns."""
    pid = tl.program_id(0).to(tl.int64)
    if (pid + 1) * BLOCK_D <= D:
        _reconstruct_int8_columns(
            out_ptr, w0_ptr, basis_ptr, row_stride, scales_ptr, scale_stride, alpha_ptr, K, D,
            pid * BLOCK_D, BLOCK_K, BLOCK_D, MASKED=False,
        )  # fmt: skip
    else:
        _reconstruct_int8_columns(
            out_ptr, w0_ptr, basis_ptr, row_stride, scales_ptr, scale_stride, alpha_ptr, K, D,
            pid * BLOCK_D, BLOCK_K, BLOCK_D, MASKED=True,
        )  # fmt: skip


def reconstruct_(out: Tensor, w0: Tensor, basis: Tensor, scales: Tensor, alpha: Tensor) -> None:
    warn_if_narrow(basis, "triton")
    K, D = basis.shape
    grid = lambda meta: (triton.cdiv(D, meta["BLOCK_D"]),)
    if blockwise(basis.dtype):
        kernel = tuned(_reconstruct_int8_kernel)
        kernel[grid](out, w0, basis, basis.stride(0), scales, scales.stride(0), alpha, K, D)
    else:
        tuned(_reconstruct_kernel)[grid](out, w0, basis, basis.stride(0), scales, alpha, K, D)
