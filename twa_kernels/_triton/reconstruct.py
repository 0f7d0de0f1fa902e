"""``reconstruct_``: ``out = w0 + P alpha``, fp32 arithmetic rounded once to out's dtype.

Each program owns BLOCK_D columns and loops over K in BLOCK_K rows, so no reduction crosses
programs and the result does not depend on the grid.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .._layout import warn_if_narrow
from ._common import add_combination, column_mask, configs, to_storage, tuned

# [BLOCK_K, BLOCK_D] basis tiles, read in 16-byte loads (tests/test_triton_codegen.py);
# STAGES > 1 prefetches the next K tiles into shared memory.
_CONFIGS = [
    triton.Config({"BLOCK_K": 16, "BLOCK_D": 256, "STAGES": 1}, num_warps=4),
    triton.Config({"BLOCK_K": 32, "BLOCK_D": 256, "STAGES": 1}, num_warps=8),
    triton.Config({"BLOCK_K": 8, "BLOCK_D": 512, "STAGES": 1}, num_warps=4),
    triton.Config({"BLOCK_K": 64, "BLOCK_D": 128, "STAGES": 1}, num_warps=8),
    triton.Config({"BLOCK_K": 16, "BLOCK_D": 256, "STAGES": 3}, num_warps=4),
    triton.Config({"BLOCK_K": 32, "BLOCK_D": 256, "STAGES": 3}, num_warps=8),
]


@triton.jit
def _reconstruct_columns(
    out_ptr, w0_ptr, basis_ptr, row_stride, scales_ptr, alpha_ptr, K, D, offs_d,
    BLOCK_K: tl.constexpr, STAGES: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Columns ``offs_d`` of ``w0 + P alpha``; only a MASKED call (the last tile) checks ``D``."""
    mask_d = column_mask(offs_d, D, MASKED)
    acc = tl.load(w0_ptr + offs_d, mask=mask_d, other=0.0)
    acc = add_combination(
        acc, basis_ptr, row_stride, scales_ptr, alpha_ptr, K, offs_d, mask_d, BLOCK_K, STAGES
    )
    tl.store(out_ptr + offs_d, to_storage(acc, out_ptr.dtype.element_ty), mask=mask_d)


@triton.autotune(configs=configs(_CONFIGS), key=["K", "D"])
@triton.jit
def _reconstruct_kernel(
    out_ptr, w0_ptr, basis_ptr, row_stride, scales_ptr, alpha_ptr, K, D,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    offs_d = pid * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    if (pid + 1) * BLOCK_D <= D:
        _reconstruct_columns(
            out_ptr, w0_ptr, basis_ptr, row_stride, scales_ptr, alpha_ptr, K, D, offs_d,
            BLOCK_K, STAGES, MASKED=False,
        )  # fmt: skip
    else:
        _reconstruct_columns(
            out_ptr, w0_ptr, basis_ptr, row_stride, scales_ptr, alpha_ptr, K, D, offs_d,
            BLOCK_K, STAGES, MASKED=True,
        )  # fmt: skip


def reconstruct_(out: Tensor, w0: Tensor, basis: Tensor, scales: Tensor, alpha: Tensor) -> None:
    warn_if_narrow(basis, "triton")
    K, D = basis.shape
    grid = lambda meta: (triton.cdiv(D, meta["BLOCK_D"]),)
    tuned(_reconstruct_kernel)[grid](out, w0, basis, basis.stride(0), scales, alpha, K, D)
