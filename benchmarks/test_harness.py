"""The benchmark harness: a GPU backend that cannot run fails the case on a CUDA device."""

import pytest
import torch

from benchmarks import harness


def test_a_backend_that_errors_on_cuda_fails_the_case(monkeypatch):
    monkeypatch.setattr(harness, "_backend_error", lambda op, backend: f"{backend} broke on {op}")
    with pytest.raises(pytest.fail.Exception, match="cuda broke on project"):
        harness.skip_unless_backend("project", "cuda", torch.device("cuda"))


def test_a_backend_that_runs_on_cuda_is_measured(monkeypatch):
    monkeypatch.setattr(harness, "_backend_error", lambda op, backend: None)
    harness.skip_unless_backend("project", "triton", torch.device("cuda"))  # neither skip nor fail


@pytest.mark.parametrize("provider", ["triton", "cuda"])
def test_gpu_backends_skip_without_cuda(provider):
    with pytest.raises(pytest.skip.Exception, match="needs a CUDA device"):
        harness.skip_unless_backend("project", provider, torch.device("cpu"))


def test_plain_pytorch_runs_everywhere():
    harness.skip_unless_backend("project", "torch", torch.device("cpu"))
