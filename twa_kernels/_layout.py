"""The basis layout the kernels read fastest, and the one warning for a basis they read slowly.

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

# Rows of a basis from ``empty_basis`` start at multiples of this many values (128 bytes of fp16).
ROW_ALIGN = 64


def empty_basis(rows: int, D: int, dtype: torch.dtype = torch.float16, device=None) -> Tensor:
    """An uninitialised [rows, D] basis whose rows start 128-byte aligned.

    The storage is [rows, D rounded up to a multiple of ``ROW_ALIGN``] and the result its first
    D columns, so ``stride(0)`` is a multiple of 64 whatever D is. The ops take any basis with
    contiguous rows; this layout is the one they read fastest (``Subspace`` allocates its basis
    this way).
    """
    padded = -(-int(D) // ROW_ALIGN) * ROW_ALIGN
    return torch.empty(rows, padded, dtype=dtype, device=device)[:, :D]


_warned = False


def narrow_rows(basis: Tensor, backend: str) -> bool:
    """True when ``backend`` ("triton" or "cuda") must read ``basis``'s rows in narrow loads."""
    if backend == "triton":
        return basis.stride(0) % 16 != 0 or basis.data_ptr() % 16 != 0
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
