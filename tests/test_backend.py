"""Backend names, the choice made by backend="auto", and loading the CUDA extension.

The ops' numerics per backend are in tests/test_op_*.py.
"""

import warnings

import pytest
import torch
from oracle import random_basis

from twa_kernels import _auto_table, _backend, _cuda, _ops

CUDA0 = torch.device("cuda", 0)


def test_auto_is_the_reference_off_gpu():
    assert _backend.resolve("auto", torch.device("cpu"), "project", 10**9) == "torch"


def test_auto_uses_the_measured_table_per_op_and_size(monkeypatch):
    monkeypatch.setattr(_backend, "cuda_card_name", lambda index: "NVIDIA H200")
    monkeypatch.setattr(_backend, "triton_available", lambda: True)
    table = {"NVIDIA H200": {"project": [(0, "triton"), (10**8, "cuda")], "reconstruct_": []}}
    monkeypatch.setattr(_auto_table, "TABLE", table)
    assert _backend.resolve("auto", CUDA0, "project", 10**7) == "triton"
    assert _backend.resolve("auto", CUDA0, "project", 10**8) == "cuda"
    assert _backend.resolve("auto", CUDA0, "reconstruct_", 10**9) == "triton"  # no entry
    monkeypatch.setattr(_backend, "cuda_card_name", lambda index: "NVIDIA A100")
    assert _backend.resolve("auto", CUDA0, "project", 10**9) == "triton"  # another card
    monkeypatch.setattr(_backend, "triton_available", lambda: False)
    assert _backend.resolve("auto", CUDA0, "reconstruct_", 10) == "torch"


def test_explicit_backends_that_cannot_run_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        _backend.resolve("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        _backend.resolve("cuda", torch.device("cpu"))
    with pytest.raises(ValueError, match="is not one of 'auto', 'torch', 'triton', 'cuda'"):
        _backend.resolve("numpy", torch.device("cpu"))


# ------------------------------------------------------------------------------------------
# The CUDA extension: without a GPU the loader's errors say what is missing.


def test_load_without_cuda_torch_says_so(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    # The uncached function: a loaded extension stays loaded for the other tests.
    with pytest.raises(RuntimeError, match="needs a CUDA build of PyTorch"):
        _cuda.load.__wrapped__()


def test_load_without_nvcc_says_so(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(_cuda, "FALLBACK_CUDA_HOME", str(tmp_path / "no-cuda"))
    monkeypatch.setenv("TWA_KERNELS_FORCE_JIT", "1")
    with pytest.raises(RuntimeError, match=r"needs the CUDA toolkit \(nvcc\).*CUDA_HOME"):
        _cuda.load.__wrapped__()


def test_sources_ship_with_the_package():
    src = _cuda.csrc_dir()
    for name in _cuda.SOURCES + _cuda.HEADERS:
        assert (src / name).is_file(), name


def test_cuda_backend_rejects_cpu_tensors():
    basis, scales = random_basis(2, 5, torch.float16, "cpu")
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        _ops.project(basis, scales, torch.randn(5), "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA extension needs a CUDA device")
def test_extension_rejects_cpu_tensors_itself():
    """The extension's own check, past the op's routing (a direct call of its op)."""
    _cuda.load()
    basis, scales = random_basis(2, 5, torch.float16, "cpu")
    with pytest.raises(RuntimeError, match="runs on CUDA tensors only"):
        torch.ops.twa_cuda.project(basis, scales, torch.randn(5))


def test_narrow_cuda_basis_warns_once(monkeypatch):
    """A CUDA basis a backend must read in narrow loads gets one warning per process."""
    from types import SimpleNamespace

    from twa_kernels import _layout

    monkeypatch.setattr(_layout, "_warned", False)

    def fake(stride, address, device="cuda", K=2, itemsize=2, dtype=torch.float16):
        return SimpleNamespace(
            device=torch.device(device), shape=(K, 100), stride=lambda dim: stride,
            data_ptr=lambda: address, element_size=lambda: itemsize, dtype=dtype,
        )  # fmt: skip

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _layout.warn_if_narrow(fake(128, 4096), "triton")  # aligned: silent
        _layout.warn_if_narrow(fake(100, 4096, "cpu"), "triton")  # interpreter: alignment is moot
        _layout.warn_if_narrow(fake(104, 4098), "cuda")  # 208-byte rows: CUDA peels the head
        _layout.warn_if_narrow(fake(101, 4096, K=1), "cuda")  # one row: no stride to align
    with pytest.warns(UserWarning, match="empty_basis"):
        _layout.warn_if_narrow(fake(100, 4096), "triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _layout.warn_if_narrow(fake(128, 4098), "triton")  # once only
    monkeypatch.setattr(_layout, "_warned", False)
    with pytest.warns(UserWarning, match="2 bytes past"):
        _layout.warn_if_narrow(fake(128, 4098), "triton")
    monkeypatch.setattr(_layout, "_warned", False)
    with pytest.warns(UserWarning, match="backend='cuda'"):
        _layout.warn_if_narrow(fake(101, 4096), "cuda")
    # int8 on CUDA: rows of 208 bytes read in 16-byte groups only from an aligned row 0.
    monkeypatch.setattr(_layout, "_warned", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _layout.warn_if_narrow(fake(208, 4096, itemsize=1, dtype=torch.int8), "cuda")
    with pytest.warns(UserWarning, match="3 bytes past"):
        _layout.warn_if_narrow(fake(208, 4099, itemsize=1, dtype=torch.int8), "cuda")
