"""Which implementation runs an op: names, availability, and the choice made by ``"auto"``.

Backends:

- ``"torch"``: the plain-PyTorch reference (``twa_kernels.reference``); any device.
- ``"triton"``: the Triton kernels (``twa_kernels._triton``); CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` was set before ``twa_kernels`` was imported.
- ``"cuda"``: the CUDA C++ extension built from ``csrc/`` (``twa_kernels._cuda``); CUDA tensors.
- ``"auto"``: on CUDA the backend measured faster for the op and size on this card
  (``_auto_table``), else ``"triton"`` when Triton imports; ``"torch"`` elsewhere.

The choice is explicit and per call; nothing is patched at import.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")
OPS = (
    "project", "reconstruct_", "orthogonalize_", "subspace_step_", "project_grads", "step_", "write_params_",
    "block_step_", "step_blocks_",
)  # fmt: skip


def triton_interpreted() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package imports (it is optional outside Linux)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(map(repr, BACKENDS))}")


@functools.cache
def cuda_card_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def resolve(backend: str, device: torch.device, op: str | None = None, size: int = 0) -> str:
    """The concrete backend (``"torch"``, ``"triton"`` or ``"cuda"``) for tensors on ``device``.

    ``op`` and ``size`` (the basis's K * D) let ``"auto"`` use the measured table on CUDA.
    Raises ``ValueError`` naming the backend when it cannot run there.
    """
    check_backend_name(backend)
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        if op is not None:
            from . import _auto_table

            index = device.index if device.index is not None else torch.cuda.current_device()
            measured = _auto_table.choose(op, size, cuda_card_name(index))
            if measured is not None:
                return measured
        return "triton" if triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package, which does not import")
        if device.type != "cuda" and not triton_interpreted():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {device.type}); on CPU it runs only "
                "with TRITON_INTERPRET=1 set before twa_kernels is imported"
            )
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors (got {device.type})")
    return backend


def implementation(op: str, backend: str):
    """The function implementing ``op`` for a concrete ``backend``.

    Every backend module exposes the same functions with the same arguments (those of the
    ``twa::`` op without ``backend``), so the ops in ``_ops`` route to them by name.
    """
    module = {
        "torch": "twa_kernels.reference",
        "triton": "twa_kernels._triton",
        "cuda": "twa_kernels._cuda",
    }[backend]
    return getattr(importlib.import_module(module), op)
