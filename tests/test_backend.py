"""Backend names and the choice made by backend="auto"."""

import pytest
import torch

from twa_kernels import _auto_table, _backend

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
