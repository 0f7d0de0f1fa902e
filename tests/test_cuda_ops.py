"""The CUDA C++ kernels (backend="cuda") against the fp64 oracles of oracle.py, at awkward sizes.

These need a CUDA device and skip without one (the kernels' index arithmetic is tested on the
CPU by csrc/tests/host_test.cu, run by .ci/check_cuda.sh). The oracles work on the *stored*
basis values upcast to fp64, so the only error allowed for is the kernels' accumulation (fp32;
fp64 in orthogonalize_) and the final rounding to the output dtype.

Sizes are chosen against the kernels' tiles: D = 1; D prime; D = 1_000_003 (about 490 column
tiles, split over several hundred blocks, so the two-stage reduction has many partials);
K = 1, 3 and 301 (three tiles of 128 rows); batches of 1, 5 and 17 (two launches of <= 16);
basis rows that are column slices of a wider tensor, both with a shared 16-byte phase (vector
loads after a masked head) and without one (the scalar path).
"""

import pytest
import torch
from conftest import DEVICES, STORAGE_DTYPES, TOL
from oracle import (
    assert_within,
    basis_in_layout,
    check_orthogonalize,
    columns,
    orthonormal_basis,
    random_basis,
    sgd_oracle,
)

from twa_kernels import _backend, _cuda, _ops, ops

HAS_GPU = torch.cuda.is_available() and "cuda" in DEVICES
needs_gpu = pytest.mark.skipif(
    not HAS_GPU, reason="the CUDA kernels need a CUDA device (none visible or TWA_TEST_DEVICE=cpu)"
)

INPUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (3, 1), (1, 7), (3, 2053), (301, 4099), (5, 1_000_003)]
LAYOUTS = ["contiguous", "aligned-slice", "odd-slice"]


@pytest.fixture(scope="module")
def cuda():
    """The CUDA device, with the extension built (a build failure is an error, not a skip)."""
    if not HAS_GPU:
        pytest.skip("the CUDA kernels need a CUDA device")
    _cuda.load()
    return torch.device("cuda")


def triton_ok():
    return _backend.triton_available()


# ------------------------------------------------------------------------------------------
# Without a GPU: the loader's errors say what is missing.


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


# ------------------------------------------------------------------------------------------
# project


@needs_gpu
@pytest.mark.parametrize("K,D", SHAPES)
@pytest.mark.parametrize("batch", [None, 1, 5])
@pytest.mark.parametrize("x_dtype", INPUT_DTYPES)
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_project_matches_fp64_oracle(cuda, dtype, x_dtype, batch, K, D):
    basis, scales = random_basis(K, D, dtype, cuda)
    shape = (D,) if batch is None else (batch, D)
    x = torch.randn(shape, device=cuda).to(x_dtype)
    c = _ops.project(basis, scales, x, "cuda")
    assert c.dtype == torch.float32 and c.shape == (*shape[:-1], K)
    P = columns(basis, scales)
    # Exact inputs in fp64: only fp32 accumulation and the scale product round, so the fp32
    # tolerance applies whatever the storage dtype, relative to sum_d |P_id x_d|.
    assert_within(c, x.double() @ P.T, x.double().abs() @ P.abs().T, TOL[torch.float32], "P^T x")


@needs_gpu
@pytest.mark.parametrize("layout", LAYOUTS[1:])
@pytest.mark.parametrize("K,D", SHAPES)
@pytest.mark.parametrize("batch", [None, 5])
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_project_column_slices(cuda, dtype, batch, K, D, layout):
    basis, scales = random_basis(K, D, dtype, cuda, layout)
    assert basis.stride(1) == 1 and (K == 1 or basis.stride(0) > D)
    x = torch.randn((D,) if batch is None else (batch, D), device=cuda)
    c = _ops.project(basis, scales, x, "cuda")
    P = columns(basis, scales)
    assert_within(c, x.double() @ P.T, x.double().abs() @ P.abs().T, TOL[torch.float32], layout)


@needs_gpu
@pytest.mark.parametrize("B", [0, 16, 17, 40])
def test_project_batch_sizes(cuda, B):
    K, D = 7, 3001
    basis, scales = random_basis(K, D, torch.float16, cuda, "aligned-slice")
    x = torch.randn(B, D, device=cuda)
    c = _ops.project(basis, scales, x, "cuda")
    assert c.shape == (B, K)
    P = columns(basis, scales)
    assert_within(c, x.double() @ P.T, x.double().abs() @ P.abs().T, TOL[torch.float32], "batch")


@needs_gpu
def test_project_deterministic(cuda):
    basis, scales = random_basis(301, 1_000_003, torch.float16, cuda, "aligned-slice")
    for shape in [(1_000_003,), (5, 1_000_003)]:
        x = torch.randn(shape, device=cuda)
        a = _ops.project(basis, scales, x, "cuda")
        b = _ops.project(basis, scales, x, "cuda")
        assert torch.equal(a, b)


@needs_gpu
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_project_agrees_with_other_backends(cuda, dtype):
    basis, scales = random_basis(19, 100_003, dtype, cuda, "aligned-slice")
    x = torch.randn(3, 100_003, device=cuda)
    c = _ops.project(basis, scales, x, "cuda")
    scale = x.double().abs() @ columns(basis, scales).abs().T
    backends = ["torch"] + (["triton"] if triton_ok() else [])
    for other in backends:
        ref = _ops.project(basis, scales, x, other).double()
        # Both sides carry fp32 accumulation error: twice the tolerance.
        atol, rtol = TOL[torch.float32]
        assert_within(c, ref, scale, (2 * atol, 2 * rtol), f"cuda vs {other}")


# ------------------------------------------------------------------------------------------
# reconstruct_


@needs_gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("K,D", SHAPES)
@pytest.mark.parametrize("out_dtype", INPUT_DTYPES + [torch.float64])
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_reconstruct_matches_fp64_oracle(cuda, dtype, out_dtype, K, D, layout):
    basis, scales = random_basis(K, D, dtype, cuda, layout)
    w0 = torch.randn(D, device=cuda)
    alpha = torch.randn(K, device=cuda)
    out = torch.full((D,), float("nan"), dtype=out_dtype, device=cuda)
    _ops.reconstruct_(out, w0, basis, scales, alpha, "cuda")
    P = columns(basis, scales)
    ref = w0.double() + P.T @ alpha.double()
    scale = w0.double().abs() + P.abs().T @ alpha.double().abs()
    # fp32 arithmetic, then one rounding to out's dtype.
    tol = TOL[torch.float32] if out_dtype in (torch.float32, torch.float64) else TOL[out_dtype]
    assert_within(out, ref, scale, tol, "w0 + P alpha")


@needs_gpu
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_reconstruct_rounds_to_nearest_even(cuda, out_dtype):
    K, D = 3, 4099
    basis, scales = random_basis(K, D, torch.float16, cuda)
    w0, alpha = torch.randn(D, device=cuda), torch.randn(K, device=cuda)
    wide = torch.empty(D, device=cuda)
    narrow = torch.empty(D, dtype=out_dtype, device=cuda)
    _ops.reconstruct_(wide, w0, basis, scales, alpha, "cuda")
    _ops.reconstruct_(narrow, w0, basis, scales, alpha, "cuda")
    assert torch.equal(narrow, wide.to(out_dtype))


@needs_gpu
def test_reconstruct_writes_only_out(cuda):
    # out is a slice of a larger buffer: the values around it must survive.
    K, D = 5, 2053
    basis, scales = random_basis(K, D, torch.bfloat16, cuda, "aligned-slice")
    buf = torch.full((D + 64,), 7.0, device=cuda)
    out = buf[32 : 32 + D]
    _ops.reconstruct_(out, torch.randn(D, device=cuda), basis, scales, torch.randn(K, device=cuda), "cuda")
    assert torch.all(buf[:32] == 7.0) and torch.all(buf[32 + D :] == 7.0)


@needs_gpu
def test_reconstruct_deterministic_and_agrees(cuda):
    K, D = 301, 1_000_003
    basis, scales = random_basis(K, D, torch.float16, cuda, "aligned-slice")
    w0, alpha = torch.randn(D, device=cuda), torch.randn(K, device=cuda)
    a, b = torch.empty(D, device=cuda), torch.empty(D, device=cuda)
    _ops.reconstruct_(a, w0, basis, scales, alpha, "cuda")
    _ops.reconstruct_(b, w0, basis, scales, alpha, "cuda")
    assert torch.equal(a, b)
    scale = w0.double().abs() + columns(basis, scales).abs().T @ alpha.double().abs()
    atol, rtol = TOL[torch.float32]
    for other in ["torch"] + (["triton"] if triton_ok() else []):
        ref = torch.empty(D, device=cuda)
        _ops.reconstruct_(ref, w0, basis, scales, alpha, other)
        assert_within(a, ref.double(), scale, (2 * atol, 2 * rtol), f"cuda vs {other}")


# ------------------------------------------------------------------------------------------
# subspace_step_


HYPER = [
    dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False),
    dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=False),
    dict(lr=0.2, momentum=0.8, dampening=0.3, weight_decay=1e-2, nesterov=False),
    dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-3, nesterov=True),
]


def step_inputs(K, device):
    A = torch.randn(K, K, device=device) / K**0.5
    gram = (torch.eye(K, device=device) + 0.1 * (A @ A.T)).contiguous()
    return gram, torch.randn(K, device=device)


@needs_gpu
@pytest.mark.parametrize("hyper", HYPER, ids=["plain", "momentum-wd", "dampening", "nesterov"])
@pytest.mark.parametrize("K", [1, 3, 301, 512])
def test_subspace_step_matches_fp64_oracle(cuda, K, hyper):
    alpha = torch.randn(K, device=cuda)
    buf = torch.randn(K, device=cuda)  # garbage before the first step: it must be ignored
    counters = torch.zeros(2, dtype=torch.int64, device=cuda)
    gram, pw0 = step_inputs(K, cuda)
    state = (alpha.double(), buf.double(), 0, 0)
    for step in range(5):
        c = torch.randn(K, device=cuda)
        if step == 2:
            c[K // 2] = float("nan")
        if step == 3:
            c[0] = float("-inf")
        ops.subspace_step_(alpha, buf, counters, c, gram, pw0, backend="cuda", **hyper)
        state = sgd_oracle(state, c, gram, pw0, **hyper)
        assert counters.tolist() == [state[2], state[3]]
        torch.testing.assert_close(alpha.double(), state[0], atol=1e-5, rtol=1e-5)
        if hyper["momentum"] != 0:
            torch.testing.assert_close(buf.double(), state[1], atol=1e-5, rtol=1e-5)


@needs_gpu
def test_subspace_step_skips_nonfinite_bit_for_bit(cuda):
    K = 5
    alpha, buf = torch.randn(K, device=cuda), torch.randn(K, device=cuda)
    counters = torch.tensor([3, 1], device=cuda)
    gram, pw0 = torch.eye(K, device=cuda), torch.randn(K, device=cuda)
    a0, b0 = alpha.clone(), buf.clone()
    for bad in [float("nan"), float("inf"), float("-inf")]:
        c = torch.randn(K, device=cuda)
        c[-1] = bad
        ops.subspace_step_(alpha, buf, counters, c, gram, pw0, 0.1, 0.9, 0.0, 1e-2, True, "cuda")
        assert torch.equal(alpha, a0) and torch.equal(buf, b0)
    assert counters.tolist() == [3, 4]


@needs_gpu
@pytest.mark.parametrize("hyper", HYPER, ids=["plain", "momentum-wd", "dampening", "nesterov"])
def test_subspace_step_deterministic_and_agrees(cuda, hyper):
    K = 301
    gram, pw0 = step_inputs(K, cuda)
    c = torch.randn(K, device=cuda)
    init = torch.randn(K, device=cuda), torch.randn(K, device=cuda)
    backends = ["cuda", "cuda", "torch"] + (["triton"] if triton_ok() else [])
    results = []
    for backend in backends:
        alpha, buf = init[0].clone(), init[1].clone()
        counters = torch.tensor([1, 0], device=cuda)
        ops.subspace_step_(alpha, buf, counters, c, gram, pw0, backend=backend, **hyper)
        assert counters.tolist() == [2, 0]
        results.append((alpha, buf))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    for (alpha, buf), backend in zip(results[2:], backends[2:], strict=True):
        torch.testing.assert_close(results[0][0], alpha, atol=1e-5, rtol=1e-5, msg=backend)
        torch.testing.assert_close(results[0][1], buf, atol=1e-5, rtol=1e-5, msg=backend)


# ------------------------------------------------------------------------------------------
# orthogonalize_


# (K, D, rank): D = 1 with rank 0; K = 1 stored from rank 0; prime D (scalar loads for 2-byte
# rows); rank = K (nothing stored); D = 4096 (vector loads); rank 301 (two coefficient chunks
# of 256); D = 1_000_003 and 100_000 (hundreds of column tiles, many partials).
ORTHO_SHAPES = [
    (1, 1, 0),
    (1, 37, 0),
    (2, 37, 1),
    (4, 1009, 3),
    (3, 1000, 3),
    (5, 4096, 4),
    (302, 4099, 301),
    (3, 1_000_003, 2),
    (9, 100_000, 8),
]


@needs_gpu
@pytest.mark.parametrize("K,D,rank", ORTHO_SHAPES)
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_orthogonalize_matches_fp64_oracle(cuda, dtype, K, D, rank):
    basis, scales = orthonormal_basis(K, D, rank, dtype, cuda)
    check_orthogonalize("cuda", basis, scales, torch.randn(D, device=cuda) + 0.5, rank)


@needs_gpu
@pytest.mark.parametrize("layout", ["padded", "aligned-slice", "odd-slice"])
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_orthogonalize_strided_rows(cuda, dtype, layout):
    """Rows strided past D (as ``Subspace`` stores them) read and written in place, nothing else."""
    K, D, rank = 4, 1009, 3
    basis, storage = basis_in_layout(K, D, dtype, cuda, layout, fill=7.0)
    dense, scales = orthonormal_basis(K, D, rank, dtype, cuda)
    basis.copy_(dense)
    sample = torch.randn(D, device=cuda) + 0.5
    check_orthogonalize("cuda", basis, scales, sample, rank, storage=storage)


# max|P^T P - I| after filling the basis: entries rounded to the storage dtype (unit roundoff
# u: 4.9e-4 fp16, 3.9e-3 bf16) give errors ~u per inner product; fp32 storage ~1e-7.
ORTHO_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}


@needs_gpu
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_orthogonalize_invariants(cuda, dtype):
    K, D = 6, 100_003
    basis = torch.zeros(K, D, dtype=dtype, device=cuda)
    scales = torch.zeros(K, device=cuda)
    anchor = torch.randn(D, device=cuda)
    samples = [anchor + 0.1 * torch.randn(D, device=cuda) for _ in range(K)]
    for rank, s in enumerate(samples):
        out = _ops.orthogonalize_(basis, scales, s, rank, "cuda")
        P = columns(basis[: rank + 1], scales[: rank + 1])
        err = (P.T @ out[: rank + 1] - s.double()).norm() / s.double().norm()
        assert err < ORTHO_TOL[dtype], f"rank {rank}: sample reproduced to {err:.3g}"
    G = columns(basis, scales) @ columns(basis, scales).T
    dev = (G - torch.eye(K, dtype=torch.float64, device=cuda)).abs().max()
    assert dev < ORTHO_TOL[dtype], f"max|P^T P - I| = {dev:.3g}"


@needs_gpu
def test_orthogonalize_zero_remainder(cuda):
    # A zero sample: zero coefficients and norms, scale 0 and a zero row, no NaN.
    K, D = 3, 1000
    basis, scales = orthonormal_basis(K, D, 2, torch.float32, cuda)
    zero = torch.zeros(D, device=cuda)
    out = _ops.orthogonalize_(basis, scales, zero, 2, "cuda")
    assert torch.equal(out, torch.zeros(4, dtype=torch.float64, device=cuda))
    assert scales[2].item() == 0.0 and torch.equal(basis[2], torch.zeros_like(basis[2]))


@needs_gpu
def test_orthogonalize_deterministic_and_agrees(cuda):
    K, D, rank = 9, 1_000_003, 8
    basis, scales = orthonormal_basis(K, D, rank, torch.float16, cuda)
    sample = torch.randn(D, device=cuda)
    runs = {}
    for backend in ["cuda", "cuda2", "torch"] + (["triton"] if triton_ok() else []):
        b, s = basis.clone(), scales.clone()
        out = _ops.orthogonalize_(b, s, sample, rank, backend.rstrip("2"))
        runs[backend] = (out, b, s)
    o1, b1, s1 = runs.pop("cuda")
    o2, b2, s2 = runs.pop("cuda2")
    assert torch.equal(o1, o2) and torch.equal(b1, b2) and torch.equal(s1, s2)
    vnorm = sample.double().norm().item()
    for backend, (o, b, s) in runs.items():
        torch.testing.assert_close(o1, o, atol=TOL[torch.float64][0] * vnorm, rtol=1e-10, msg=backend)
        eps = torch.finfo(torch.float16).eps
        torch.testing.assert_close(b1[rank].double(), b[rank].double(), atol=0.0, rtol=eps, msg=backend)
        torch.testing.assert_close(s1, s, atol=0.0, rtol=1e-6, msg=backend)


# ------------------------------------------------------------------------------------------
# opcheck: schema, fake implementation and dispatch of every op with backend="cuda"


@needs_gpu
def test_project_opcheck(cuda):
    basis, scales = random_basis(3, 300, torch.float16, cuda, "aligned-slice")
    for x in [torch.randn(300, device=cuda), torch.randn(5, 300, device=cuda).bfloat16()]:
        torch.library.opcheck(_ops.project, (basis, scales, x), {"backend": "cuda"})


@needs_gpu
def test_reconstruct_opcheck(cuda):
    basis, scales = random_basis(3, 300, torch.bfloat16, cuda)
    args = (
        torch.empty(300, dtype=torch.float16, device=cuda), torch.randn(300, device=cuda),
        basis, scales, torch.randn(3, device=cuda),
    )  # fmt: skip
    torch.library.opcheck(_ops.reconstruct_, args, {"backend": "cuda"})


@needs_gpu
def test_orthogonalize_opcheck(cuda):
    basis, scales = orthonormal_basis(4, 300, 2, torch.float16, cuda)
    args = (basis, scales, torch.randn(300, device=cuda), 2)
    torch.library.opcheck(_ops.orthogonalize_, args, {"backend": "cuda"})


@needs_gpu
def test_subspace_step_opcheck(cuda):
    K = 3
    args = (
        torch.randn(K, device=cuda), torch.randn(K, device=cuda),
        torch.zeros(2, dtype=torch.int64, device=cuda), torch.randn(K, device=cuda),
        torch.eye(K, device=cuda), torch.randn(K, device=cuda), torch.tensor(0.1, device=cuda),
        0.9, 0.0, 1e-3, False,
    )  # fmt: skip
    torch.library.opcheck(_ops.subspace_step_, args, {"backend": "cuda"})


@needs_gpu
def test_extension_rejects_cpu_tensors_itself(cuda):
    basis, scales = random_basis(2, 5, torch.float16, "cpu")
    with pytest.raises(RuntimeError, match="runs on CUDA tensors only"):
        torch.ops.twa_cuda.project(basis, scales, torch.randn(5))
