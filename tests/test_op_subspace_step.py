"""``twa::subspace_step_`` (SGD on the K coordinates, on the device) on every backend.

Each test runs once per backend ("torch", "triton", "cuda") and device (see backends.py); a
backend that cannot run here is skipped with the reason. The oracle is torch.optim.SGD's
update in fp64 (``oracle.sgd_oracle``), with the skip of non-finite steps. The public wrapper
takes lr as a number; the op itself takes a 0-dim fp32 tensor (opcheck below).
"""

# ruff: noqa: F811  (pytest fixtures imported from backends.py are test arguments)

import pytest
import torch
from backends import KERNEL_TARGETS, backend, device, target  # noqa: F401  (fixtures: backend, device, target)
from oracle import sgd_oracle

from twa_kernels import _ops, ops

# The interpreter (triton 3.6 + numpy 2.3) converts 1-element arrays to loop bounds.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

HYPER = [
    pytest.param(dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False), id="plain"),
    pytest.param(
        dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=False), id="momentum-wd"
    ),
    pytest.param(
        dict(lr=0.2, momentum=0.8, dampening=0.3, weight_decay=1e-2, nesterov=False), id="dampening"
    ),
    pytest.param(dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-3, nesterov=True), id="nesterov"),
]


def step_inputs(K, device):
    A = torch.randn(K, K, device=device) / K**0.5
    gram = (torch.eye(K, device=device) + 0.1 * (A @ A.T)).contiguous()
    return gram, torch.randn(K, device=device)


@pytest.mark.parametrize("hyper", HYPER)
@pytest.mark.parametrize("K", [1, 3, 301, 512])
def test_subspace_step_matches_fp64_oracle(backend, device, K, hyper):
    alpha = torch.randn(K, device=device)
    buf = torch.randn(K, device=device)  # garbage before the first step: it must be ignored
    counters = torch.zeros(2, dtype=torch.int64, device=device)
    gram, pw0 = step_inputs(K, device)
    state = (alpha.double(), buf.double(), 0, 0)
    for step in range(5):
        c = torch.randn(K, device=device)
        if step == 2:
            c[K // 2] = float("nan")
        if step == 3:
            c[0] = float("-inf")
        ops.subspace_step_(alpha, buf, counters, c, gram, pw0, backend=backend, **hyper)
        state = sgd_oracle(state, c, gram, pw0, **hyper)
        assert counters.tolist() == [state[2], state[3]]
        # fp32 arithmetic on O(1) values over 5 steps; G alpha sums K terms of size ~1/sqrt(K).
        torch.testing.assert_close(alpha.double(), state[0], atol=1e-5, rtol=1e-5)
        if hyper["momentum"] != 0:
            torch.testing.assert_close(buf.double(), state[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("nesterov", [False, True])
def test_subspace_step_matches_torch_sgd_on_coordinates(backend, device, nesterov):
    """SGD's formula written out (not the shared oracle), from a zero state, fp64 inputs
    rounded once to fp32."""
    K = 7
    G = torch.randn(K, K, dtype=torch.float64)
    G = torch.eye(K, dtype=torch.float64) + 0.01 * (G + G.T)
    pw0 = torch.randn(K, dtype=torch.float64)
    alpha = torch.zeros(K, device=device)
    buf = torch.zeros(K, device=device)
    counters = torch.zeros(2, dtype=torch.int64, device=device)
    lr, mom, damp, wd = 0.1, 0.9, 0.0 if nesterov else 0.2, 0.05
    a, b = torch.zeros(K, dtype=torch.float64), None
    for _ in range(4):
        c = torch.randn(K, dtype=torch.float64)
        ops.subspace_step_(alpha, buf, counters, c.float().to(device), G.float().to(device),
                           pw0.float().to(device), lr, mom, damp, wd, nesterov,
                           backend=backend)  # fmt: skip
        d = c + wd * (pw0 + G @ a)
        b = d.clone() if b is None else mom * b + (1 - damp) * d
        a = a - lr * (d + mom * b if nesterov else b)
        torch.testing.assert_close(alpha.cpu().double(), a, atol=1e-6, rtol=1e-5)
    assert counters.tolist() == [4, 0]


def test_subspace_step_skips_nonfinite_bit_for_bit(backend, device):
    K = 5
    alpha, buf = torch.randn(K, device=device), torch.randn(K, device=device)
    counters = torch.tensor([3, 1], device=device)
    gram, pw0 = torch.eye(K, device=device), torch.randn(K, device=device)
    a0, b0 = alpha.clone(), buf.clone()
    for bad in [float("nan"), float("inf"), float("-inf")]:
        c = torch.randn(K, device=device)
        c[-1] = bad
        ops.subspace_step_(alpha, buf, counters, c, gram, pw0, 0.1, 0.9, 0.0, 1e-2, True, backend)
        assert torch.equal(alpha, a0) and torch.equal(buf, b0)
    assert counters.tolist() == [3, 4]


def test_subspace_step_skips_non_finite_gradients(backend, device):
    """A NaN among finite entries, no weight decay, plain momentum: nothing moves but the
    skipped count."""
    K = 3
    alpha, buf = torch.ones(K, device=device), torch.full((K,), 2.0, device=device)
    counters = torch.tensor([5, 1], device=device)
    c = torch.tensor([1.0, float("nan"), 0.0], device=device)
    eye, zeros = torch.eye(K, device=device), torch.zeros(K, device=device)
    ops.subspace_step_(alpha, buf, counters, c, eye, zeros, 0.1, 0.9, 0, 0, False, backend=backend)
    assert alpha.tolist() == [1.0] * K and buf.tolist() == [2.0] * K
    assert counters.tolist() == [5, 2]


@pytest.mark.parametrize("hyper", HYPER)
def test_subspace_step_deterministic(backend, device, hyper):
    K = 301
    gram, pw0 = step_inputs(K, device)
    c = torch.randn(K, device=device)
    init = torch.randn(K, device=device), torch.randn(K, device=device)
    results = []
    for _ in range(2):
        alpha, buf = init[0].clone(), init[1].clone()
        counters = torch.tensor([1, 0], device=device)
        ops.subspace_step_(alpha, buf, counters, c, gram, pw0, backend=backend, **hyper)
        assert counters.tolist() == [2, 0]
        results.append((alpha, buf))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("hyper", HYPER)
@pytest.mark.parametrize("target", KERNEL_TARGETS, indirect=True)
def test_subspace_step_agrees_with_other_backends(backend, device, hyper):
    from backends import others

    K = 301
    gram, pw0 = step_inputs(K, device)
    c = torch.randn(K, device=device)
    init = torch.randn(K, device=device), torch.randn(K, device=device)
    results = {}
    for b in [backend, *others(device, backend)]:
        alpha, buf = init[0].clone(), init[1].clone()
        counters = torch.tensor([1, 0], device=device)
        ops.subspace_step_(alpha, buf, counters, c, gram, pw0, backend=b, **hyper)
        results[b] = alpha, buf
    alpha0, buf0 = results.pop(backend)
    for other, (alpha, buf) in results.items():
        torch.testing.assert_close(alpha0, alpha, atol=1e-5, rtol=1e-5, msg=f"{backend} vs {other}")
        torch.testing.assert_close(buf0, buf, atol=1e-5, rtol=1e-5, msg=f"{backend} vs {other}")


def test_subspace_step_opcheck(backend, device):
    for K in [3, 5]:
        args = (
            torch.randn(K, device=device), torch.randn(K, device=device),
            torch.zeros(2, dtype=torch.int64, device=device), torch.randn(K, device=device),
            torch.eye(K, device=device), torch.randn(K, device=device), torch.tensor(0.1, device=device),
            0.9, 0.0, 1e-3 if K == 3 else 1e-4, False,
        )  # fmt: skip
        torch.library.opcheck(_ops.subspace_step_, args, {"backend": backend})
