"""``reconstruct_``: ``out = w0 + P alpha``, fp32 arithmetic rounded once to out's dtype.

Each program owns BLOCK_D columns and loops over K in BLOCK_K rows, so no reduction crosses
programs and the result does not depend on the grid.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ._common import configs, to_storage

_CONFIGS = [
    triton.Config({"BLOCK_K": 16, "BLOCK_D": 256}, num_warps=4),
    triton.Config({"BLOCK_K": 32, "BLOCK_D": 256}, num_warps=8),
    triton.Config({"BLOCK_K": 8, "BLOCK_D": 512}, num_warps=4),
    triton.Config({"BLOCK_K": 64, "BLOCK_D": 128}, num_warps=8),
]


@triton.autotune(configs=configs(_CONFIGS), key=["K", "D"])
@triton.jit
def _reconstruct_kernel(
    out_ptr, w0_ptr, basis_ptr, row_stride, scales_ptr, alpha_ptr, K, D,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    offs_d = pid * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    mask_d = offs_d < D
    acc = tl.load(w0_ptr + offs_d, mask=mask_d, other=0.0)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < K
        coef = tl.load(alpha_ptr + offs_k, mask=mask_k, other=0.0)
        coef = coef * tl.load(scales_ptr + offs_k, mask=mask_k, other=0.0)
        ptrs = basis_ptr + offs_k[:, None] * row_stride + offs_d[None, :]
        p = tl.load(ptrs, mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(coef[:, None] * p, axis=0)
    tl.store(out_ptr + offs_d, to_storage(acc, out_ptr.dtype.element_ty), mask=mask_d)


def reconstruct_(out: Tensor, w0: Tensor, basis: Tensor, scales: Tensor, alpha: Tensor) -> None:
    K, D = basis.shape
    grid = lambda meta: (triton.cdiv(D, meta["BLOCK_D"]),)
    _reconstruct_kernel[grid](out, w0, basis, basis.stride(0), scales, alpha, K, D)
