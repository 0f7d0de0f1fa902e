"""An int8 basis (one fp32 scale per 64 values of a row): accuracy of the span, memory, TWA.

The format is measured against the two things it must keep: the span (each sample reproduced
from the stored columns) on a heavy-tailed, multi-scale trajectory, where one scale per row is
shown to fail; and TWA's training loss against an fp32 basis.
"""

# ruff: noqa: F811  (the sampled fixture imported from test_optim is a test argument)

import copy

import numpy as np
import pytest
import torch
from oracle import columns
from test_optim import HYPER, make_data, run_twa, sampled  # noqa: F401  (fixture)

from twa_kernels import Subspace, _layout, _ops, ops, reference


def heavy_tailed_trajectory(D, n, seed=2):
    """fp32 [n, D]: 'layers' of 1000-50000 values whose weights and moves differ by up to three
    decades, moved by Student-t (3 degrees of freedom) steps with AR(1) memory 0.7."""
    g = torch.Generator().manual_seed(seed)
    sizes = []
    while sum(sizes) < D:
        sizes.append(int(torch.randint(1000, 50000, (1,), generator=g)))
    sizes[-1] -= sum(sizes) - D
    scale = torch.cat([torch.full((s,), 10 ** float(-3 * torch.rand(1, generator=g))) for s in sizes])
    rng = np.random.default_rng(seed)
    W = torch.empty(n, D)
    W[0] = scale * torch.randn(D, generator=g)
    step = torch.zeros(D)
    for i in range(1, n):
        step = 0.7 * step + 0.002 * scale * torch.from_numpy(rng.standard_t(3, D)).float()
        W[i] = W[i - 1] + step
    return W


def reproduction_error(P, W):
    """max_i ||r_i - proj(r_i)|| / ||w_i - mean|| with r_i = w_i - w_1, proj onto the rows of P
    (fp64 [rank, D]), in fp64."""
    G = P @ P.T
    mean = W.double().mean(0)
    worst = 0.0
    for w in W.double():
        r = w - W[0].double()
        coef = torch.linalg.solve(G, P @ r)
        worst = max(worst, ((r - P.T @ coef).norm() / (w - mean).norm()).item())
    return worst


# The bound of the accuracy requirement: within 2e-2 of each sample's distance from the mean.
SPAN_BOUND = 2e-2


def streamed(W, dtype):
    space = Subspace([torch.zeros(W.shape[1], requires_grad=True)], max_rank=W.shape[0], dtype=dtype)
    for w in W:
        space.add([w])
    assert space.rank == W.shape[0]
    return space


@pytest.fixture(scope="module")
def trajectory():
    return heavy_tailed_trajectory(10**6, 12)


@pytest.mark.slow
def test_int8_blocks_of_64_reproduce_a_heavy_tailed_trajectory(trajectory):
    error = reproduction_error(columns(*streamed(trajectory, torch.int8).columns), trajectory)
    assert error <= SPAN_BOUND, f"reproduction error {error:.3g} > {SPAN_BOUND:g}"


@pytest.mark.slow
def test_int8_with_one_scale_per_row_fails_the_same_test(trajectory, monkeypatch):
    """The same streaming orthogonalisation with a block as long as the row (one scale per row):
    the small layers' values round to zero next to the large ones'."""
    D = trajectory.shape[1]
    monkeypatch.setattr(_layout, "QUANT_BLOCK", D)
    monkeypatch.setattr(reference, "QUANT_BLOCK", D)
    # One chunk per row: the reference quantises each chunk's blocks as it stores them.
    monkeypatch.setattr(reference, "CPU_CHUNK_ELEMENTS", trajectory.numel())
    basis, scales = streamed(trajectory, torch.int8).columns
    assert scales.shape == (trajectory.shape[0], 1)
    error = reproduction_error(basis.double() * scales.double(), trajectory)
    assert error > SPAN_BOUND, f"one scale per row reproduced the samples to {error:.3g}"


def test_int8_basis_and_scales_take_at_most_1_1_bytes_per_value(tmp_path):
    """1 byte per value plus an fp32 scale per 64: 1.0625, in memory and in a state dict."""
    D, K = 100_003, 4
    space = Subspace([torch.zeros(D, requires_grad=True)], max_rank=K, dtype=torch.int8)
    W = heavy_tailed_trajectory(D, K)
    for w in W:
        space.add([w])
    held = space.basis.untyped_storage().nbytes() + space.scales.untyped_storage().nbytes()
    assert held <= 1.1 * K * D, f"{held / (K * D):.4f} bytes per value"
    state = space.state_dict()
    saved = state["basis"].untyped_storage().nbytes() + state["scales"].untyped_storage().nbytes()
    assert saved <= 1.1 * K * D, f"{saved / (K * D):.4f} bytes per value in the state dict"
    fp16 = ops.empty_basis(K, D, torch.float16)
    assert saved <= 0.54 * fp16.untyped_storage().nbytes()


def test_twa_loss_with_int8_basis_tracks_the_fp32_basis(sampled):
    """40 TWA steps on a small CNN with BatchNorm: the int8 basis's losses within 5e-3 (relative)
    of the fp32 basis's (measured 3.9e-3; fp16 8.3e-4). lr 0.2 as in the fp16 comparison of
    test_optim: at 0.5 this net amplifies 1e-4 perturbations into 7.5e-3 within 50 steps."""
    model, samples = sampled
    batches = make_data(40, generator=torch.Generator().manual_seed(21))
    hyper = dict(HYPER, lr=0.2)
    loss_int8, opt = run_twa(copy.deepcopy(model), samples, batches, dtype=torch.int8, **hyper)
    loss_fp32, _ = run_twa(copy.deepcopy(model), samples, batches, dtype=torch.float32, **hyper)
    assert opt.subspace.basis.dtype == torch.int8
    rel = (torch.tensor(loss_int8) - torch.tensor(loss_fp32)).abs() / torch.tensor(loss_fp32)
    assert rel.max() <= 5e-3, f"relative loss difference {rel.max():.3g}"
    assert rel.max() > 0, "the int8 run must differ from the fp32 one (else this compares nothing)"


@pytest.mark.parametrize("op", sorted(_ops.BLOCKWISE_BACKENDS))
def test_every_op_and_the_fused_step_have_triton_int8_kernels(op):
    """An int8 basis is routed to Triton for all four ops and the fused step (their results are
    checked in each op's tests, which skip the int8 cases of a backend without kernels)."""
    pytest.importorskip("triton")
    basis = ops.empty_basis(3, 100, torch.int8)
    assert _ops.choose(op, "triton", basis) == "triton"
