"""Per-block coefficients: D cut into blocks of consecutive tensors, each with its own
coefficient vector. The blocks a granularity gives, and the plain-PyTorch projection,
reconstruction and Gram matrices per block against fp64 oracles."""

import pytest
import torch
from conftest import STORAGE_DTYPES, TOL
from oracle import assert_within, columns, random_basis

from twa_kernels import reference
from twa_kernels._params import ParamLayout, coefficient_blocks

# 12, 5, 8, 7 and 1 values at flat offsets 0, 12, 17, 25, 32 (D = 33).
LAYOUT = ParamLayout.of([torch.empty(s) for s in [(3, 4), (5,), (2, 2, 2), (7,), (1,)]])


@pytest.mark.parametrize(
    ("granularity", "blocks"),
    [
        ("model", [(0, 33)]),
        ("tensor", [(0, 12), (12, 17), (17, 25), (25, 32), (32, 33)]),
        (1, [(0, 12), (12, 17), (17, 25), (25, 32), (32, 33)]),
        # 12 >= 8 closes a block; 5 does not, 5 + 8 does; 7 does not, 7 + 1 does.
        (8, [(0, 12), (12, 25), (25, 33)]),
        # 12 + 5 + 8 = 25 >= 20; the last 8 values stay a smaller block of their own.
        (20, [(0, 25), (25, 33)]),
        (10**9, [(0, 33)]),
    ],
)
def test_granularity_gives_blocks_of_consecutive_tensors(granularity, blocks):
    assert coefficient_blocks(LAYOUT, granularity) == blocks


@pytest.mark.parametrize(
    ("granularity", "error", "match"),
    [
        ("layer", ValueError, "'model', 'tensor' or an int >= 1, got 'layer'"),
        (0, ValueError, "must be >= 1, got 0"),
        (-3, ValueError, "must be >= 1, got -3"),
        (True, TypeError, "got True"),
        (2.5, TypeError, "got 2.5"),
        (None, TypeError, "got None"),
    ],
)
def test_bad_granularity_is_named(granularity, error, match):
    with pytest.raises(error, match=match):
        coefficient_blocks(LAYOUT, granularity)


def awkward_blocks(D):
    """Blocks of 1 value, of a prime count, and ones crossing the 256-column chunks."""
    cuts = sorted({0, 1, 2, min(D, 259), min(D, 600), D})
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if a < b]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 256 columns: blocks start and end inside chunks and span several."""
    monkeypatch.setattr(reference, "CPU_CHUNK_ELEMENTS", 1)


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize(("K", "D"), [(1, 1), (3, 1009), (37, 600)])
def test_block_ops_match_the_fp64_oracle(small_chunks, dtype, K, D):
    basis, scales = random_basis(K, D, dtype, "cpu", "padded")
    P = columns(basis, scales)  # fp64 [K, D]
    blocks = awkward_blocks(D)
    x = torch.randn(D)
    got = reference.project_blocks(basis, scales, x, blocks)
    for i, (a, b) in enumerate(blocks):
        Pl, xl = P[:, a:b], x[a:b].double()
        assert_within(got[i], Pl @ xl, Pl.abs() @ xl.abs(), TOL[torch.float32], f"block {i}")
        G = reference.gram_blocks(basis, scales, blocks)[i]
        torch.testing.assert_close(G, Pl @ Pl.T, rtol=1e-12, atol=1e-12 * float((Pl @ Pl.T).abs().max()))
    coef = torch.randn(len(blocks), K)
    w0 = torch.randn(D)
    out = torch.full((D,), float("nan"))
    reference.reconstruct_blocks_(out, w0, basis, scales, coef, blocks)
    for i, (a, b) in enumerate(blocks):
        Pl, c = P[:, a:b], coef[i].double()
        expected = w0[a:b].double() + c @ Pl
        bound = w0[a:b].double().abs() + c.abs() @ Pl.abs()
        assert_within(out[a:b], expected, bound, TOL[torch.float32], f"block {i}")


def test_one_block_is_the_whole_model_op():
    """One block over all of D: the same numbers as project, reconstruct_ and gram."""
    basis, scales = random_basis(5, 1000, torch.float16, "cpu")
    x, w0, alpha = torch.randn(1000), torch.randn(1000), torch.randn(5)
    blocks = [(0, 1000)]
    assert torch.equal(
        reference.project_blocks(basis, scales, x, blocks)[0], reference.project(basis, scales, x)
    )
    assert torch.equal(reference.gram_blocks(basis, scales, blocks)[0], reference.gram(basis, scales))
    a, b = torch.empty(1000), torch.empty(1000)
    reference.reconstruct_blocks_(a, w0, basis, scales, alpha[None], blocks)
    reference.reconstruct_(b, w0, basis, scales, alpha)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
