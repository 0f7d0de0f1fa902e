"""The benchmark harness: a GPU backend that cannot run fails the case on a CUDA device; an int8
case of a backend the package lists no int8 kernel for skips, named."""

import pytest
import torch

from benchmarks import harness


def test_a_backend_that_errors_on_cuda_fails_the_case(monkeypatch):
    monkeypatch.setattr(harness, "_backend_error", lambda op, backend, dtype: f"{backend} broke on {op}")
    with pytest.raises(pytest.fail.Exception, match="cuda broke on project"):
        harness.skip_unless_backend("project", "cuda", torch.device("cuda"))


def test_a_backend_that_runs_on_cuda_is_measured(monkeypatch):
    monkeypatch.setattr(harness, "_backend_error", lambda op, backend, dtype: None)
    harness.skip_unless_backend("project", "triton", torch.device("cuda"))  # neither skip nor fail


@pytest.mark.parametrize("provider", ["triton", "cuda"])
def test_gpu_backends_skip_without_cuda(provider):
    with pytest.raises(pytest.skip.Exception, match="needs a CUDA device"):
        harness.skip_unless_backend("project", provider, torch.device("cpu"))


def test_plain_pytorch_runs_everywhere():
    harness.skip_unless_backend("project", "torch", torch.device("cpu"))
    harness.skip_unless_backend("twa_step", "torch", torch.device("cpu"), torch.int8)


LISTED = {"project": ("torch", "triton"), "reconstruct_": ("torch",), "step_": ("torch", "triton")}


@pytest.mark.parametrize(
    "op, backend, missing",
    [
        ("reconstruct_", "triton", "reconstruct_"),
        ("project", "cuda", "project"),
        ("twa_step", "triton", "reconstruct_"),  # TWA writes its start weights with reconstruct_
        ("twa_step", "cuda", "step_, project, reconstruct_"),
    ],
)
def test_int8_cases_skip_where_the_package_lists_no_int8_kernel(monkeypatch, op, backend, missing):
    monkeypatch.setattr(harness._ops, "BLOCKWISE_BACKENDS", LISTED)
    monkeypatch.setattr(harness, "_backend_error", lambda *args: pytest.fail("not reached"))
    with pytest.raises(pytest.skip.Exception, match=f"has no int8 kernel of {missing} yet"):
        harness.skip_unless_backend(op, backend, torch.device("cuda"), torch.int8)
    # the fp16 case of the same backend is measured
    monkeypatch.setattr(harness, "_backend_error", lambda *args: None)
    harness.skip_unless_backend(op, backend, torch.device("cuda"))


def test_a_listed_int8_kernel_that_errors_fails_the_case(monkeypatch):
    monkeypatch.setattr(harness._ops, "BLOCKWISE_BACKENDS", LISTED)
    calls = []

    def error(op, backend, dtype):
        calls.append((op, backend, dtype))
        return f"{backend} broke on {op} ({dtype})"

    monkeypatch.setattr(harness, "_backend_error", error)
    with pytest.raises(pytest.fail.Exception, match=r"triton broke on project \(torch.int8\)"):
        harness.skip_unless_backend("project", "triton", torch.device("cuda"), torch.int8)
    assert calls == [("project", "triton", torch.int8)]  # tried on an int8 basis


def test_cases_of_each_basis(pytestconfig):
    """fp16 cases for every provider, then int8 for the kernel backends, ids ending -int8."""

    class Meta:
        fixturenames = ("shape", "provider", "basis")
        config = pytestconfig

        def parametrize(self, names, cases, ids):
            self.got = (names, cases, ids)

    meta = Meta()
    harness.parametrize_cases(meta, harness.PROVIDERS)
    names, cases, ids = meta.got
    assert names == "shape, provider, basis"
    first = cases[0][0]
    mine = [(p, b) for s, p, b in cases if s == first]
    assert mine == [(p, "fp16") for p in harness.PROVIDERS] + [
        (p, "int8") for p in ("torch", "triton", "cuda")
    ]
    assert [i for i, (s, _, _) in zip(ids, cases, strict=True) if s == first][-1] == f"{first.id}-cuda-int8"
