"""The plain-PyTorch backend ("torch") of every op against fp64 oracles, and the op contract."""

import oracle
import pytest
import torch
from conftest import DEVICES, STORAGE_DTYPES, TOL
from memory import largest_cpu_allocation
from torch.library import opcheck

from twa_kernels import ops, reference

SHAPES = [
    pytest.param(1, 1, id="K1-D1"),
    pytest.param(3, 4099, id="K3-D4099"),  # prime D
    pytest.param(1, 10007, id="K1-D10007"),
    pytest.param(37, 1000, id="K37-D1000"),
    pytest.param(301, 257, id="K301-D257"),
]
DTYPE_IDS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def dtype_params(dtypes):
    return [pytest.param(d, id=DTYPE_IDS[d]) for d in dtypes]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 2^12 values, so that every shape above crosses several chunk boundaries."""
    monkeypatch.setattr(reference, "CPU_CHUNK_ELEMENTS", 1 << 12)
    monkeypatch.setattr(reference, "DEVICE_CHUNK_ELEMENTS", 1 << 12)


def error_bound(dtype_x, scale):
    """(atol, rtol) for results of size ``scale``: the input's rounding enters once."""
    atol, rtol = TOL[dtype_x]
    return atol * scale, rtol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("storage", dtype_params(STORAGE_DTYPES))
@pytest.mark.parametrize("K, D", SHAPES)
@pytest.mark.parametrize("B", [None, 1, 5])
def test_project_matches_fp64_oracle(device, storage, K, D, B):
    basis, scales = oracle.make_basis(K, D, storage)
    x = torch.randn(D) if B is None else torch.randn(B, D)
    basis, scales, x = basis.to(device), scales.to(device), x.to(device)
    out = ops.project(basis, scales, x, backend="torch")
    assert out.dtype == torch.float32 and out.shape == (*x.shape[:-1], K)
    expected = oracle.project(basis, scales, x)
    # Stored values are exact inputs; only fp32 accumulation over D terms of size |x|/sqrt(D)
    # rounds: ~sqrt(D) * 6e-8 relative to ||x|| (fp32 atol/rtol of the table).
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(out.double(), expected, atol=atol * x.norm().item(), rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype", dtype_params([torch.bfloat16, torch.float16]))
def test_project_accepts_half_precision_inputs(device, x_dtype):
    basis, scales = oracle.make_basis(5, 3001, torch.float16)
    x = torch.randn(2, 3001).to(x_dtype)
    out = ops.project(basis.to(device), scales.to(device), x.to(device), backend="torch")
    expected = oracle.project(basis, scales, x)  # the rounded x is the input: no tolerance for it
    torch.testing.assert_close(out.cpu().double(), expected, atol=1e-5, rtol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("storage", dtype_params(STORAGE_DTYPES))
@pytest.mark.parametrize("out_dtype", dtype_params(STORAGE_DTYPES))
@pytest.mark.parametrize("K, D", SHAPES)
def test_reconstruct_matches_fp64_oracle(device, storage, out_dtype, K, D):
    basis, scales = oracle.make_basis(K, D, storage)
    w0, alpha = torch.randn(D), torch.randn(K) / K**0.5
    out = torch.full((D,), float("nan"), dtype=out_dtype)
    args = [t.to(device) for t in (out, w0, basis, scales, alpha)]
    ops.reconstruct_(*args, backend="torch")
    expected = oracle.reconstruct(w0, basis, scales, alpha)
    # fp32 arithmetic, then one rounding to out's dtype
    atol, rtol = TOL[out_dtype] if out_dtype != torch.float32 else TOL[torch.float32]
    torch.testing.assert_close(args[0].cpu().double(), expected, atol=atol, rtol=rtol)


def test_reconstruct_into_a_column_slice_of_a_wider_basis():
    """Per-parameter slices: rows strided by the full D, as the optimizer passes them."""
    basis, scales = oracle.make_basis(4, 1000, torch.float16)
    sl = basis[:, 101:358]
    assert not sl.is_contiguous() and sl.stride(1) == 1
    out = torch.empty(257)
    w0, alpha = torch.randn(257), torch.randn(4)
    ops.reconstruct_(out, w0, sl, scales, alpha, backend="torch")
    torch.testing.assert_close(out.double(), oracle.reconstruct(w0, sl, scales, alpha), atol=1e-5,
                               rtol=1e-5)  # fmt: skip
    torch.testing.assert_close(
        ops.project(sl, scales, w0, backend="torch").double(),
        oracle.project(sl, scales, w0), atol=1e-5, rtol=1e-5,
    )  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("storage", dtype_params(STORAGE_DTYPES))
@pytest.mark.parametrize("K, D", [(1, 1), (3, 4099), (6, 10007), (12, 300)])
def test_orthogonalize_builds_an_orthonormal_basis_of_the_samples(device, storage, K, D):
    samples = torch.randn(K, D, dtype=torch.float64)
    basis = torch.full((K, D), float("nan"), dtype=storage, device=device)
    scales = torch.zeros(K, device=device)
    coords = []
    for rank, v in enumerate(samples):
        out = ops.orthogonalize_(basis, scales, v.float().to(device), rank, backend="torch")
        assert out.dtype == torch.float64 and out.shape == (rank + 2,)
        coords.append(out[:-1].cpu())
        torch.testing.assert_close(out[-1].item(), v.float().double().norm().item(), rtol=1e-12,
                                   atol=0)  # fmt: skip
    P = oracle.columns(basis.cpu(), scales.cpu())
    eps = torch.finfo(storage).eps
    orth = (P @ P.T - torch.eye(K, dtype=torch.float64)).abs().max().item()
    assert orth <= 2 * eps, f"max|P^T P - I| = {orth:.3g}"
    # each sample equals P times its returned coordinates, up to the rows' rounding
    for v, c in zip(samples, coords, strict=True):
        rebuilt = c @ P[: c.numel()]
        assert (rebuilt - v).norm() <= 4 * eps * v.norm()


def test_orthogonalize_returns_the_oracle_coefficients_and_residual():
    D = 2001
    Q, _ = torch.linalg.qr(torch.randn(D, 3, dtype=torch.float64))
    basis = torch.empty(3, D, dtype=torch.float32)
    scales = torch.zeros(3)
    for rank in range(2):
        ops.orthogonalize_(basis, scales, Q[:, rank].float(), rank, backend="torch")
    v = 2 * Q[:, 0] - 3 * Q[:, 1] + 0.5 * Q[:, 2]
    out = ops.orthogonalize_(basis, scales, v.float(), 2, backend="torch")
    P = oracle.columns(basis[:2], scales[:2])
    torch.testing.assert_close(out[:2], P @ v.float().double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[2].item(), 0.5, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[3].item(), v.norm().item(), atol=1e-5, rtol=0)


def test_orthogonalize_scales_rows_away_from_fp16_subnormals():
    """A unit row over 2^22 entries has entries ~5e-4 (rms); stored scaled, max |entry| ~ 2^12."""
    D = 1 << 22
    basis = torch.empty(1, D, dtype=torch.float16)
    scales = torch.zeros(1)
    ops.orthogonalize_(basis, scales, torch.randn(D), 0, backend="torch")
    assert basis.float().abs().max().item() == pytest.approx(reference.ROW_AMAX, rel=1e-3)
    P = oracle.columns(basis, scales)
    assert abs(P.norm().item() - 1) <= 1e-4


def test_orthogonalize_leaves_valid_rows_alone_and_skips_a_full_basis():
    basis, scales = oracle.make_basis(2, 300, torch.float16)
    before = basis.clone(), scales.clone()
    out = ops.orthogonalize_(basis, scales, torch.randn(300), 2, backend="torch")
    assert out.shape == (4,)
    assert torch.equal(basis, before[0]) and torch.equal(scales, before[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nesterov", [False, True])
def test_subspace_step_matches_torch_sgd_on_coordinates(device, nesterov):
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
                           backend="torch")  # fmt: skip
        d = c + wd * (pw0 + G @ a)
        b = d.clone() if b is None else mom * b + (1 - damp) * d
        a = a - lr * (d + mom * b if nesterov else b)
        torch.testing.assert_close(alpha.cpu().double(), a, atol=1e-6, rtol=1e-5)
    assert counters.tolist() == [4, 0]


def test_subspace_step_skips_non_finite_gradients():
    K = 3
    alpha, buf = torch.ones(K), torch.full((K,), 2.0)
    counters = torch.tensor([5, 1])
    c = torch.tensor([1.0, float("nan"), 0.0])
    ops.subspace_step_(alpha, buf, counters, c, torch.eye(K), torch.zeros(K), 0.1, 0.9, 0, 0, False,
                       backend="torch")  # fmt: skip
    assert alpha.tolist() == [1.0] * K and buf.tolist() == [2.0] * K
    assert counters.tolist() == [5, 2]


def test_ops_pass_opcheck():
    basis, scales = oracle.make_basis(5, 1031, torch.float16)
    x = torch.randn(3, 1031)
    opcheck(torch.ops.twa.project.default, (basis, scales, x, "torch"))
    opcheck(torch.ops.twa.project.default, (basis, scales, x[0], "torch"))
    out = torch.empty(1031, dtype=torch.bfloat16)
    opcheck(torch.ops.twa.reconstruct_.default,
            (out, torch.randn(1031), basis, scales, torch.randn(5), "torch"))  # fmt: skip
    opcheck(torch.ops.twa.orthogonalize_.default,
            (basis.clone(), scales.clone(), torch.randn(1031), 3, "torch"))  # fmt: skip
    opcheck(torch.ops.twa.subspace_step_.default,
            (torch.zeros(5), torch.zeros(5), torch.zeros(2, dtype=torch.int64), torch.randn(5),
             torch.eye(5), torch.randn(5), torch.tensor(0.1), 0.9, 0.0, 1e-4, False, "torch"))  # fmt: skip


def test_project_compiles_fullgraph():
    basis, scales = oracle.make_basis(4, 515, torch.float16)
    x = torch.randn(515)

    @torch.compile(fullgraph=True, backend="eager")
    def f(basis, scales, x):
        return ops.project(basis, scales, x * 2, backend="torch") + 1

    torch.testing.assert_close(f(basis, scales, x), ops.project(basis, scales, 2 * x) + 1)


def test_project_and_reconstruct_never_upcast_the_whole_basis(monkeypatch):
    """On the CPU only chunk-sized temporaries: no fp32 copy of a [K, D] half basis."""
    monkeypatch.setattr(reference, "CPU_CHUNK_ELEMENTS", 1 << 14)
    basis, scales = oracle.make_basis(8, 50_000, torch.float16)
    x, out, w0, alpha = (
        torch.randn(50_000),
        torch.empty(50_000),
        torch.randn(50_000),
        torch.randn(8),
    )

    def run():
        ops.project(basis, scales, x, backend="torch")
        ops.reconstruct_(out, w0, basis, scales, alpha, backend="torch")

    assert largest_cpu_allocation(run) <= 4 * (1 << 14)  # one fp32 chunk
    monkeypatch.setattr(reference, "CPU_CHUNK_ELEMENTS", 1 << 30)
    assert largest_cpu_allocation(run) >= 4 * 8 * 50_000, "the measure must see a whole upcast"


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda b, s, x: ops.project(b[:, :10], s, x), "x has 20 columns, the basis has D=10"),
        (lambda b, s, x: ops.project(b, s[:2], x), r"scales must have shape \[3\]"),
        (lambda b, s, x: ops.project(b.int(), s, x), "basis dtype must be"),
        (lambda b, s, x: ops.project(b, s, x.double()), "x dtype must be"),
        (lambda b, s, x: ops.project(b, s, x, backend="cuda"), "backend='cuda' needs CUDA"),
        (lambda b, s, x: ops.project(b, s, x, backend="fast"), "backend='fast' is not one of"),
        (lambda b, s, x: ops.reconstruct_(x[:5], x, b, s, s), r"out must have shape \[20\]"),
        (lambda b, s, x: ops.orthogonalize_(b, s, x, 4), r"rank must be in \[0, 3\]"),
    ],
    ids=["D", "scales", "basis-dtype", "x-dtype", "cuda", "unknown", "out", "rank"],
)
def test_ops_bad_arguments_name_the_argument(call, match):
    basis, scales = oracle.make_basis(3, 20, torch.float16)
    with pytest.raises((RuntimeError, ValueError), match=match):
        call(basis, scales, torch.randn(20))
