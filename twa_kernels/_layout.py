"""The basis layout the kernels read fastest, the scales of each storage dtype, and the one
warning for a basis they read slowly.

Storage and scales: a float basis (fp16, bf16, fp32) carries one fp32 scale per row, ``scales``
[K]; an int8 basis one fp32 scale per block of ``QUANT_BLOCK`` values of a row, ``scales``
[K, ceil(D / QUANT_BLOCK)] (rows contiguous), block b of row i covering columns
``[b * QUANT_BLOCK, (b + 1) * QUANT_BLOCK)`` of the basis as the op receives it. Column i of P
is ``scales[i] * basis[i]`` (float) or ``scales[i, j // QUANT_BLOCK] * basis[i, j]`` (int8).

Both kernel backends load a basis row in 16-byte vectors only when the rows start 16-byte
aligned. Triton must prove it from its launch arguments: it specialises an integer on
"divisible by 16", so it needs a row stride that is a multiple of 16 values and a 16-byte
aligned base (else every load is a 2-byte one for fp16: in the sm_90 code 32 ``LDG.E.U16`` per
thread for a [16, 256] tile against 4 ``LDG.E.128``). The CUDA kernels check at run time and
need ``stride * element size`` to be a multiple of 16 bytes (they peel an unaligned head).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

# Rows of a basis from ``empty_basis`` start at multiples of this many values (128 bytes of fp16,
# 64 of int8).
ROW_ALIGN = 64

# Values per scale of an int8 basis. Measured (anchored trajectory differences, fp64 reference):
# sample reproduction error 4.6e-3 / 9.2e-3 (an MLP / a heavy-tailed trajectory at D = 10^6)
# with 64, 5.3e-3 / 1.2e-2 with 128, 3.8e-2 / 0.23 with one scale per row. An fp32 scale per 64
# values costs 1/16 byte per value (1.0625 bytes per value in all); fp16 scales would not do:
# a unit row over 10^8 values has block scales near 1e-6, in fp16's subnormals.
QUANT_BLOCK = 64
# Storage dtypes with blockwise scales, and the largest magnitude of their stored values.
BLOCKWISE_DTYPES = (torch.int8,)
QMAX = 127


def blockwise(dtype: torch.dtype) -> bool:
    """True for a storage dtype with one scale per ``QUANT_BLOCK`` values (int8)."""
    return dtype in BLOCKWISE_DTYPES


def scale_blocks(D: int) -> int:
    """Scales per row of an int8 basis of D columns: ``ceil(D / QUANT_BLOCK)``."""
    return -(-int(D) // QUANT_BLOCK)


def scales_shape(rows: int, D: int, dtype: torch.dtype) -> tuple[int, ...]:
    """The shape of the scales of a [rows, D] basis stored in ``dtype``."""
    return (rows, scale_blocks(D)) if blockwise(dtype) else (rows,)


def empty_scales(rows: int, D: int, dtype: torch.dtype = torch.float16, device=None) -> Tensor:
    """Zeroed fp32 scales for a [rows, D] basis stored in ``dtype``: [rows] for fp16, bf16 and
    fp32, [rows, ceil(D / QUANT_BLOCK)] for int8."""
    return torch.zeros(scales_shape(rows, D, dtype), dtype=torch.float32, device=device)


def empty_basis(rows: int, D: int, dtype: torch.dtype = torch.float16, device=None) -> Tensor:
    """An uninitialised [rows, D] basis whose rows start 64-byte aligned (128 for fp16).

    The storage is [rows, D rounded up to a multiple of ``ROW_ALIGN``] and the result its first
    D columns, so ``stride(0)`` is a multiple of 64 whatever D is. The ops take any basis with
    contiguous rows; this layout is the one they read fastest (``Subspace`` allocates its basis
    this way). ``dtype``: fp16, bf16, fp32, or int8 (its scales: ``empty_scales``).
    """
    padded = -(-int(D) // ROW_ALIGN) * ROW_ALIGN
    return torch.empty(rows, padded, dtype=dtype, device=device)[:, :D]


_warned = False


def narrow_rows(basis: Tensor, backend: str) -> bool:
    """True when ``backend`` ("triton" or "cuda") must read ``basis``'s rows in narrow loads."""
    if backend == "triton":
        return basis.stride(0) % 16 != 0 or basis.data_ptr() % 16 != 0
    if blockwise(basis.dtype) and basis.data_ptr() % 16 != 0:
        return True  # CUDA's int8 groups of 16 values start at multiples of 16 columns: no head peel
    return basis.shape[0] > 1 and (basis.stride(0) * basis.element_size()) % 16 != 0


def warn_if_narrow(basis: Tensor, backend: str) -> None:
    """Warn once per process when a CUDA basis's rows cannot be read in 16-byte loads."""
    global _warned
    if _warned or basis.device.type != "cuda" or not narrow_rows(basis, backend):
        return
    _warned = True
    warnings.warn(
        f"twa_kernels: backend={backend!r} reads this basis with narrow loads, several times "
        f"slower than 16-byte ones: its rows do not start 16-byte aligned (row stride "
        f"{basis.stride(0)} values, address {basis.data_ptr() % 16} bytes past a multiple of 16); "
        "allocate it with twa_kernels.ops.empty_basis (Subspace does)",
        stacklevel=4,
    )
