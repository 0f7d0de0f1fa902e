"""The backend x device parametrisation of the per-op tests (tests/test_op_*.py).

Every op test takes the ``backend`` and ``device`` fixtures below: it is collected once per
backend ("torch", "triton", "cuda") and device (``conftest.DEVICES``), ids ``torch-cpu``,
``cuda-cuda``, ..., and a pair that cannot run here is skipped with the reason. Shapes too slow
for some pairs carry a size tier (``ANY``, ``COMPILED``, ``GPU``) that the test passes to
``fits``, which skips with the reason.
"""

import importlib

import pytest
import torch
from conftest import DEVICES

from twa_kernels import _backend, reference

BACKENDS = ["torch", "triton", "cuda"]
TARGETS = [pytest.param((b, d), id=f"{b}-{d}") for b in BACKENDS for d in DEVICES]
# Backends compared with the reference in the cross-backend agreement tests.
KERNEL_TARGETS = [p for p in TARGETS if p.values[0][0] != "torch"]

# Size tiers of a test shape:
ANY = "any"  # every backend on every device
COMPILED = "compiled"  # not under Triton's interpreter (seconds per call there); torch on CPU runs it
GPU = "gpu"  # CUDA tensors only: large (10^5..10^6 columns), for many tiles and partials


def skip_reason(backend: str, device: str) -> str | None:
    """Why ``backend`` cannot run on ``device`` tensors in this process, or None."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if backend == "cuda" and device != "cuda":
        if not torch.cuda.is_available():
            return "backend='cuda' needs a CUDA device (none visible)"
        return "backend='cuda' runs on CUDA tensors only"
    if backend == "triton":
        if not _backend.triton_available():
            return "backend='triton' needs the triton package, which does not import"
        if device == "cpu" and not _backend.triton_interpreted():
            return "Triton on CPU tensors runs only under TRITON_INTERPRET=1 (set before import)"
    return None


@pytest.fixture(params=TARGETS)
def target(request, monkeypatch):
    """``(backend, device)``, skipped with the reason when the pair cannot run here."""
    backend, device = request.param
    reason = skip_reason(backend, device)
    if reason:
        pytest.skip(reason)
    if backend == "cuda":
        from twa_kernels import _cuda

        _cuda.load()  # a build failure is an error, not a skip
    if backend == "torch":
        # Chunks of 2^12 values, so that the reference crosses several chunk boundaries at the
        # test shapes (its defaults, 2^20 / 2^28, would take every shape in one chunk).
        monkeypatch.setattr(reference, "CPU_CHUNK_ELEMENTS", 1 << 12)
        monkeypatch.setattr(reference, "DEVICE_CHUNK_ELEMENTS", 1 << 12)
    return backend, torch.device(device)


@pytest.fixture
def backend(target):
    return target[0]


@pytest.fixture
def device(target):
    return target[1]


def fits(backend: str, device: torch.device, tier: str) -> None:
    """Skip a shape of size ``tier`` where it would be too slow (or needs a GPU)."""
    if tier == GPU and device.type != "cuda":
        pytest.skip("large shape: CUDA tensors only (minutes on the CPU)")
    if tier == COMPILED and backend == "triton" and device.type == "cpu":
        pytest.skip("shape too slow under Triton's interpreter: runs on a GPU")


def others(device: torch.device, backend: str) -> list[str]:
    """The backends other than ``backend`` that run on ``device`` here."""
    return [b for b in BACKENDS if b != backend and skip_reason(b, device.type) is None]


DTYPE_IDS = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int8: "int8",
}  # fmt: skip


def dtypes(ds):
    """``pytest.param`` per dtype, with short ids (fp16, bf16, fp32, fp64, int8)."""
    return [pytest.param(d, id=DTYPE_IDS[d]) for d in ds]


def all_configs(module, name):
    """``(kernel, config)`` for every autotune candidate of ``module.name`` (GPU runs only: under
    the interpreter each kernel has its first config alone)."""
    if not _backend.triton_available():
        return []
    kernel = getattr(importlib.import_module(f"twa_kernels._triton.{module}"), name)
    return [pytest.param(kernel, c, id=f"{name}-{i}") for i, c in enumerate(kernel.configs)]


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="autotune candidates run on a GPU only")
