"""Largest supported K: every op and the fused step take K = MAX_RANK and raise ValueError
naming the limit above it, on every backend, and in their fake (meta) implementations.

Cheap on CPU: the bases have D = 1 column, the Gram matrices above the limit are never read.
"""

import os

import pytest
import torch
from conftest import DEVICES

from twa_kernels import ops
from twa_kernels._steps import Hyper
from twa_kernels.ops import CUDA_MAX_ORTH_RANK, MAX_RANK

OPS = ["project", "reconstruct_", "orthogonalize_", "subspace_step_"]
LIMIT = f"MAX_RANK = {MAX_RANK}"


def _triton_runs(device: str) -> bool:
    if device == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(params=[(d, b) for d in DEVICES for b in ("torch", "triton", "cuda")], ids=str)
def where(request):
    device, backend = request.param
    if backend == "triton" and not _triton_runs(device):
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 before import")
    if backend == "cuda" and device != "cuda":
        pytest.skip("the CUDA backend runs on CUDA tensors only")
    return device, backend


def _call(op: str, K: int, device: str, backend: str):
    """Run ``op`` on a [K, 1] basis (orthogonalize_ at rank K - 1, reading K - 1 rows)."""
    basis = torch.zeros(K, 1, dtype=torch.float16, device=device)
    basis[:, 0] = 1.0 / K
    scales = torch.ones(K, device=device)
    if op == "project":
        return ops.project(basis, scales, torch.ones(1, device=device), backend=backend)
    if op == "reconstruct_":
        out = torch.empty(1, device=device)
        ops.reconstruct_(
            out, torch.zeros(1, device=device), basis, scales, torch.ones(K, device=device), backend
        )
        return out
    if op == "orthogonalize_":
        return ops.orthogonalize_(basis, scales, torch.ones(1, device=device), K - 1, backend)
    vec = [torch.zeros(K, device=device) for _ in range(4)]
    counters = torch.zeros(2, dtype=torch.int64, device=device)
    # Never read without weight decay: left uninitialised (no pages touched on CPU).
    gram = torch.empty(K, K, device=device)
    ops.subspace_step_(vec[0], vec[1], counters, vec[2], gram, vec[3], 0.1, backend=backend)
    return counters


@pytest.mark.parametrize("op", OPS)
def test_above_max_rank_raises_value_error_naming_the_limit(op, where):
    device, backend = where
    with pytest.raises(ValueError, match=LIMIT):
        _call(op, MAX_RANK + 1, device, backend)


@pytest.mark.parametrize("op", OPS)
def test_max_rank_is_accepted(op, where):
    device, backend = where
    if backend == "cuda" and op == "orthogonalize_":
        pytest.skip("the CUDA orthogonalize_ reads at most CUDA_MAX_ORTH_RANK rows (tested below)")
    out = _call(op, MAX_RANK, device, backend)
    if op == "project":  # every row is 1/K: each coordinate is 1/K (fp16 1/8192 is exact)
        torch.testing.assert_close(out, torch.full((MAX_RANK,), 1.0 / MAX_RANK, device=device))
    elif op == "reconstruct_":  # sum over K rows of 1 * 1/K
        torch.testing.assert_close(out, torch.ones(1, device=device))
    elif op == "subspace_step_":
        assert out.tolist() == [1, 0]


@pytest.mark.parametrize("op", OPS)
def test_fake_implementation_checks_the_limit_too(op):
    """Under torch.compile the fake (meta) implementation runs the same check."""
    with pytest.raises(ValueError, match=LIMIT):
        _call(op, MAX_RANK + 1, "meta", "auto")


def test_cuda_orthogonalize_rank_limit():
    if "cuda" not in DEVICES:
        pytest.skip("needs a CUDA device")
    with pytest.raises(ValueError, match=f"CUDA_MAX_ORTH_RANK = {CUDA_MAX_ORTH_RANK}"):
        _call("orthogonalize_", CUDA_MAX_ORTH_RANK + 2, "cuda", "cuda")
    # "auto" takes another backend there instead of failing.
    out = _call("orthogonalize_", CUDA_MAX_ORTH_RANK + 2, "cuda", "auto")
    assert out.shape == (CUDA_MAX_ORTH_RANK + 3,)


def _fused_args(K: int, device: str):
    p = torch.zeros(1, device=device, requires_grad=False)
    p.grad = torch.ones(1, device=device)
    basis = torch.full((K, 1), 1.0 / K, dtype=torch.float16, device=device)
    vec = [torch.zeros(K, device=device) for _ in range(3)]
    counters = torch.zeros(2, dtype=torch.int64, device=device)
    gram = torch.empty(K, K, device=device)  # not read without weight decay
    return (
        [p],
        torch.zeros(1, device=device),
        basis,
        torch.ones(K, device=device),
        *vec[:2],
        counters,
        gram,
        vec[2],
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [MAX_RANK, MAX_RANK + 1])
def test_fused_step_limit(device, K):
    if not _triton_runs(device):
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 before import")
    pytest.importorskip("triton")
    from twa_kernels._triton.step import fused_twa_step

    args = _fused_args(K, device)
    hyper = Hyper(torch.tensor(1.0, device=device), 0.0, 0.0, 0.0, False)
    if K > MAX_RANK:
        with pytest.raises(ValueError, match=LIMIT):
            fused_twa_step(*args, hyper)
        return
    fused_twa_step(*args, hyper)
    params, alpha, counters = args[0], args[4], args[6]
    assert counters.tolist() == [1, 0]
    # alpha = -lr * P^T g = -1/K per coordinate; w = w0 + P alpha = K * (1/K) * (-1/K) = -1/K.
    torch.testing.assert_close(alpha, torch.full((K,), -1.0 / K, device=device))
    torch.testing.assert_close(params[0], torch.full((1,), -1.0 / K, device=device))
