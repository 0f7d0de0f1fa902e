"""Subspace: accuracy of the stored span on trajectory-like samples, bookkeeping, errors."""

import math

import pytest
import torch
from torch import nn

from twa_kernels import Subspace, ops


def trajectory(D, n, *, drift=0.01, generator=None):
    """w_1 ~ N(0, 1) plus accumulated small correlated random steps, ||w_n - w_1|| ~ drift ||w_1||.

    Returns fp32 [n, D]. Steps follow an AR(1) process (0.7 memory), like SGD with momentum.
    """
    g = generator or torch.Generator().manual_seed(1)
    W = torch.empty(n, D)
    W[0] = torch.randn(D, generator=g)
    step_size = drift * math.sqrt(D) / math.sqrt(max(n - 1, 1)) / 2
    step = torch.zeros(D)
    for i in range(1, n):
        step = 0.7 * step + torch.randn(D, generator=g) * step_size
        W[i] = W[i - 1] + step
    return W


def fill(space, W):
    residuals = [space.add([w]) for w in W]
    return residuals


def oracle_reproduction_errors(space, W):
    """max_i ||w_i - proj(w_i)|| / ||w_i - mean||, proj onto w_1 + span(P), in fp64.

    The affine origin is the first sample (the subspace's exact anchor); the mean lies in the
    same affine set up to its fp32 rounding (measured from the fp32 mean instead, the fp32-storage
    error at D = 10^6 was 2.0e-7 rather than 7.0e-8).
    """
    basis, scales = space.columns
    errors = []
    P = basis.double() * scales.double()[:, None]  # [K, D]
    G = P @ P.T
    mean = W.double().mean(0)
    for w in W.double():
        r = w - W[0].double()
        coef = torch.linalg.solve(G, P @ r)
        errors.append(((r - P.T @ coef).norm() / (w - mean).norm()).item())
        del r
    return max(errors), G


@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype, bound",
    [(torch.float16, 2e-3), (torch.bfloat16, 2e-2), (torch.float32, 1e-6)],
    ids=["fp16", "bf16", "fp32"],
)
def test_subspace_reproduces_trajectory_samples(dtype, bound):
    D, n = 10**6, 50
    W = trajectory(D, n)
    space = Subspace([torch.zeros(D, requires_grad=True)], max_rank=n, dtype=dtype)
    fill(space, W)
    assert space.rank == n and space.num_samples == n
    error, G = oracle_reproduction_errors(space, W)
    assert error <= bound, f"reproduction error {error:.3g} > {bound:g}"
    if dtype == torch.float16:
        orth = (G - torch.eye(n, dtype=torch.float64)).abs().max().item()
        assert orth <= 1e-3, f"max|P^T P - I| = {orth:.3g}"


@pytest.mark.slow
def test_subspace_fp16_holds_at_ten_million():
    """At D = 10^7 unit columns have entries ~3e-4, near fp16's subnormals (6e-5) unscaled."""
    D, n = 10**7, 50
    W = trajectory(D, n)
    space = Subspace([torch.zeros(D, requires_grad=True)], max_rank=n, dtype=torch.float16)
    fill(space, W)
    error, G = oracle_reproduction_errors(space, W)
    orth = (G - torch.eye(n, dtype=torch.float64)).abs().max().item()
    assert error <= 2e-3, f"reproduction error {error:.3g}"
    assert orth <= 1e-3, f"max|P^T P - I| = {orth:.3g}"


@pytest.mark.parametrize("D", [1, 63, 64, 1009])
def test_empty_basis_rows_start_128_byte_aligned(D):
    basis = ops.empty_basis(3, D, torch.float16)
    assert basis.shape == (3, D) and basis.dtype == torch.float16 and basis.stride(1) == 1
    assert basis.stride(0) % ops.ROW_ALIGN == 0 and D <= basis.stride(0) < D + ops.ROW_ALIGN
    space = Subspace([nn.Parameter(torch.zeros(D))], max_rank=3)
    assert space.basis.stride(0) % ops.ROW_ALIGN == 0 and space.basis.shape == (3, D)


def test_subspace_sample_inside_span_adds_no_column_but_counts_in_mean():
    W = trajectory(4099, 4)
    space = Subspace([torch.zeros(4099, requires_grad=True)], max_rank=8)
    fill(space, W)
    assert space.rank == 4
    inside = 0.25 * W[0] + 0.5 * W[1] + 0.25 * W[3]
    residual = space.add([inside])
    assert residual <= space.tol
    assert space.rank == 4 and space.num_samples == 5
    expected_mean = torch.cat([W, inside[None]]).double().mean(0)
    torch.testing.assert_close(space.mean.double(), expected_mean, atol=1e-6, rtol=1e-6)


def test_subspace_add_returns_relative_residual():
    D = 1000
    Q, _ = torch.linalg.qr(torch.randn(D, 2, dtype=torch.float64))
    base = 10 * Q[:, 0]
    space = Subspace([torch.zeros(D, requires_grad=True)], max_rank=4, dtype=torch.float32)
    assert space.add([base.float()]) == 1.0
    # w_2 - w_1 = 3 q0 + 4 q1, q0 in the span: residual |4 q1| / |3 q0 + 4 q1| = 4/5
    residual = space.add([(base + 3 * Q[:, 0] + 4 * Q[:, 1]).float()])
    assert residual == pytest.approx(4 / 5, rel=1e-5)


def test_subspace_snapshots_params_in_order():
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    model[0].bias.requires_grad_(False)  # not trainable: not in the layout
    space = Subspace(model, max_rank=3, dtype=torch.float32)
    assert space.layout.names == ("0.weight", "2.weight", "2.bias")
    assert space.dim == 15 + 10 + 2
    space.add()
    flat = torch.cat([model[0].weight.flatten(), model[2].weight.flatten(), model[2].bias])
    torch.testing.assert_close(space.anchor, flat.detach())
    torch.testing.assert_close(space.mean, flat.detach())


def test_subspace_from_checkpoints_matches_add(tmp_path):
    model = nn.Sequential(nn.Linear(7, 11), nn.BatchNorm1d(11), nn.Linear(11, 3))
    live = Subspace(model, max_rank=5)
    paths = []
    for i in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        live.add()
        path = tmp_path / f"{i}.pt"
        state = {f"module.{k}": v for k, v in model.state_dict().items()}  # a DDP checkpoint
        torch.save({"state_dict": state, "epoch": i}, path)
        paths.append(path)
    fresh = nn.Sequential(nn.Linear(7, 11), nn.BatchNorm1d(11), nn.Linear(11, 3))
    loaded = Subspace.from_checkpoints(fresh, paths, max_rank=5, key="state_dict")
    assert (loaded.rank, loaded.num_samples) == (live.rank, live.num_samples)
    assert torch.equal(loaded.basis[: loaded.rank], live.basis[: live.rank])
    assert torch.equal(loaded.mean, live.mean)
    with pytest.raises(KeyError, match="no key 'model'"):
        Subspace.from_checkpoints(fresh, paths, max_rank=5, key="model")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8], ids=["bf16", "int8"])
def test_subspace_state_dict_round_trip(tmp_path, dtype):
    W = trajectory(3001, 5)
    space = Subspace([torch.zeros(3001, requires_grad=True)], max_rank=6, dtype=dtype)
    fill(space, W)
    torch.save(space.state_dict(), tmp_path / "s.pt")
    other = Subspace([torch.zeros(3001, requires_grad=True)], max_rank=6, dtype=dtype)
    other.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert (other.rank, other.num_samples) == (5, 5)
    assert torch.equal(other.basis[:5], space.basis[:5])
    assert torch.equal(other.sample_coordinates(), space.sample_coordinates())
    # and it keeps growing exactly as the original does
    extra = W[-1] + 0.01 * torch.randn(3001)
    assert other.add([extra]) == space.add([extra])
    assert torch.equal(other.basis[:6], space.basis[:6])


def test_subspace_max_rank_exceeded_changes_nothing():
    W = trajectory(500, 3)
    space = Subspace([torch.zeros(500, requires_grad=True)], max_rank=2)
    fill(space, W[:2])
    before = space.state_dict()
    with pytest.raises(ValueError, match="max_rank=2 exceeded"):
        space.add([W[2]])
    after = space.state_dict()
    assert (space.rank, space.num_samples) == (2, 2)
    for key in ("basis", "scales", "anchor", "mean"):
        assert torch.equal(before[key], after[key]), key


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda p: Subspace([], max_rank=2), ValueError, "no tensor with requires_grad"),
        (lambda p: Subspace(p, max_rank=0), ValueError, "max_rank must be a positive int"),
        (lambda p: Subspace(p, max_rank=ops.MAX_RANK + 1), ValueError, "MAX_RANK = 8192"),
        (lambda p: Subspace(p, max_rank=2, dtype=torch.float64), ValueError, "dtype must be"),
        (lambda p: Subspace(p, max_rank=2, backend="gpu"), ValueError, "backend='gpu'"),
        (lambda p: Subspace(p[0], max_rank=2), TypeError, "one Tensor"),
        (lambda p: Subspace(p, max_rank=2).add([torch.zeros(3)]), ValueError, "values has 1"),
        (
            lambda p: Subspace(p, max_rank=2).add([torch.zeros(3), torch.zeros(5)]),
            ValueError,
            r"values\[1\] has shape \(5,\), expected \(4,\)",
        ),
    ],
    ids=["empty", "rank0", "max_rank", "dtype", "backend", "tensor", "count", "shape"],
)
def test_subspace_bad_arguments_name_the_argument(make, error, match):
    params = [torch.zeros(3, requires_grad=True), torch.zeros(4, requires_grad=True)]
    with pytest.raises(error, match=match):
        make(params)


def test_subspace_load_state_dict_from_other_model_is_refused():
    a = Subspace([torch.zeros(3, requires_grad=True), torch.zeros(4, requires_grad=True)], 2)
    a.add()
    b = Subspace([torch.zeros(3, requires_grad=True), torch.zeros(5, requires_grad=True)], 2)
    with pytest.raises(ValueError, match=r"parameter 1 is float32 \[4\], here float32 \[5\]"):
        b.load_state_dict(a.state_dict())
    assert b.num_samples == 0
