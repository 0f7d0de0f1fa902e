"""The Triton kernels of the twa:: ops against the fp64 oracles of oracle.py, at awkward sizes.

On a machine without a GPU the kernels run on CPU tensors through Triton's interpreter
(conftest sets TRITON_INTERPRET=1 before twa_kernels is imported); with a GPU the same tests
also run on CUDA tensors. Every oracle works on the *stored* basis values upcast to fp64, so
the only error allowed for is the kernels' fp32 accumulation (and the final rounding to the
output dtype), not the rounding of the basis itself.
"""

import importlib
import os
import warnings

import pytest
import torch
from conftest import DEVICES, STORAGE_DTYPES, TOL, only_config

pytest.importorskip("triton")

from oracle import (  # noqa: E402
    assert_within,
    basis_in_layout,
    cgs2_oracle,
    check_orthogonalize,
    columns,
    orthonormal_basis,
    random_basis,
    sgd_oracle,
)

from twa_kernels import _ops, ops  # noqa: E402

# The interpreter (triton 3.6 + numpy 2.3) converts 1-element arrays to loop bounds.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

INPUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (K, D): D = 1; a prime D that spans several stage-1 chunks (256 columns each); D = 1000, not
# a multiple of any block (16..512); a K not a power of two that needs 19 K tiles of 16 with D
# kept small (the interpreter's cost grows with K x D / tile).
SHAPES = [(1, 1), (3, 1009), (3, 1000), (301, 37)]


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 before import")
    return torch.device(request.param)


# ------------------------------------------------------------------------------------------
# project


@pytest.mark.parametrize("K,D", SHAPES)
@pytest.mark.parametrize("batch", [None, 1, 5])
@pytest.mark.parametrize("x_dtype", INPUT_DTYPES)
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_project_matches_fp64_oracle(device, dtype, x_dtype, batch, K, D):
    basis, scales = random_basis(K, D, dtype, device)
    shape = (D,) if batch is None else (batch, D)
    x = torch.randn(shape, device=device).to(x_dtype)
    c = _ops.project(basis, scales, x, "triton")
    assert c.dtype == torch.float32 and c.shape == (*shape[:-1], K)
    P = columns(basis, scales)
    ref = x.double() @ P.T
    # The inputs are exact in fp64; only fp32 accumulation and the scale product round, so the
    # fp32 tolerance applies whatever the storage dtype, relative to sum_d |P_id x_d|.
    assert_within(c, ref, x.double().abs() @ P.abs().T, TOL[torch.float32], "P^T x")


def _all_configs(module, name):
    """``(kernel, config)`` for every autotune candidate of ``module.name`` (GPU runs only: under
    the interpreter each kernel has its first config alone)."""
    kernel = getattr(importlib.import_module(f"twa_kernels._triton.{module}"), name)
    return [pytest.param(kernel, c, id=f"{name}-{i}") for i, c in enumerate(kernel.configs)]


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="autotune candidates run on a GPU only")


@needs_gpu
@pytest.mark.parametrize("layout", ["padded", "odd-slice"])
@pytest.mark.parametrize(
    "kernel,config",
    _all_configs("project", "_project_kernel") + _all_configs("project", "_project_batched_kernel"),
)
def test_every_project_config_matches_fp64_oracle(kernel, config, layout):
    """Each candidate (tile shape, software pipelining) on its own, over several K tiles and
    chunks, with whole tiles (16-byte loads) and masked ones."""
    K, D = 37, 100_003
    basis, scales = random_basis(K, D, torch.float16, "cuda", layout)
    x = torch.randn(1 if kernel.base_fn.__name__ == "_project_kernel" else 5, D, device="cuda")
    with only_config(kernel, config):
        c = _ops.project(basis, scales, x, "triton")
    P = columns(basis, scales)
    assert_within(c, x.double() @ P.T, x.double().abs() @ P.abs().T, TOL[torch.float32], "P^T x")


@needs_gpu
@pytest.mark.parametrize("layout", ["padded", "odd-slice"])
@pytest.mark.parametrize("kernel,config", _all_configs("reconstruct", "_reconstruct_kernel"))
def test_every_reconstruct_config_matches_fp64_oracle(kernel, config, layout):
    K, D = 37, 100_003
    basis, scales = random_basis(K, D, torch.float16, "cuda", layout)
    w0, alpha = torch.randn(D, device="cuda"), torch.randn(K, device="cuda")
    out = torch.full((D,), float("nan"), device="cuda")
    with only_config(kernel, config):
        _ops.reconstruct_(out, w0, basis, scales, alpha, "triton")
    P = columns(basis, scales)
    scale = w0.double().abs() + P.abs().T @ alpha.double().abs()
    assert_within(out, w0.double() + P.T @ alpha.double(), scale, TOL[torch.float32], "w0 + P alpha")


def test_narrow_cuda_basis_warns_once(monkeypatch):
    """A CUDA basis a backend must read in narrow loads gets one warning per process."""
    from types import SimpleNamespace

    from twa_kernels import _layout

    monkeypatch.setattr(_layout, "_warned", False)

    def fake(stride, address, device="cuda", K=2, itemsize=2):
        return SimpleNamespace(
            device=torch.device(device), shape=(K, 100), stride=lambda dim: stride,
            data_ptr=lambda: address, element_size=lambda: itemsize,
        )  # fmt: skip

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _layout.warn_if_narrow(fake(128, 4096), "triton")  # aligned: silent
        _layout.warn_if_narrow(fake(100, 4096, "cpu"), "triton")  # interpreter: alignment is moot
        _layout.warn_if_narrow(fake(104, 4098), "cuda")  # 208-byte rows: CUDA peels the head
        _layout.warn_if_narrow(fake(101, 4096, K=1), "cuda")  # one row: no stride to align
    with pytest.warns(UserWarning, match="empty_basis"):
        _layout.warn_if_narrow(fake(100, 4096), "triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _layout.warn_if_narrow(fake(128, 4098), "triton")  # once only
    monkeypatch.setattr(_layout, "_warned", False)
    with pytest.warns(UserWarning, match="2 bytes past"):
        _layout.warn_if_narrow(fake(128, 4098), "triton")
    monkeypatch.setattr(_layout, "_warned", False)
    with pytest.warns(UserWarning, match="backend='cuda'"):
        _layout.warn_if_narrow(fake(101, 4096), "cuda")


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_project_strided_rows_and_batch_above_16(device, dtype):
    K, D = 5, 300
    basis, scales = random_basis(K, D, dtype, device, layout=17)
    assert basis.stride(0) == D + 17
    x = torch.randn(17, D, device=device)
    c = _ops.project(basis, scales, x, "triton")
    P = columns(basis, scales)
    assert_within(c, x.double() @ P.T, x.double().abs() @ P.abs().T, TOL[torch.float32], "P^T x")


def test_project_deterministic(device):
    basis, scales = random_basis(7, 1109, torch.float16, device)
    for shape in [(1109,), (5, 1109)]:
        x = torch.randn(shape, device=device)
        a = _ops.project(basis, scales, x, "triton")
        b = _ops.project(basis, scales, x, "triton")
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------
# reconstruct_


@pytest.mark.parametrize("K,D", SHAPES)
@pytest.mark.parametrize("out_dtype", INPUT_DTYPES + [torch.float64])
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_reconstruct_matches_fp64_oracle(device, dtype, out_dtype, K, D):
    basis, scales = random_basis(K, D, dtype, device)
    w0 = torch.randn(D, device=device)
    alpha = torch.randn(K, device=device)
    out = torch.full((D,), float("nan"), dtype=out_dtype, device=device)
    _ops.reconstruct_(out, w0, basis, scales, alpha, "triton")
    P = columns(basis, scales)
    ref = w0.double() + P.T @ alpha.double()
    scale = w0.double().abs() + P.abs().T @ alpha.double().abs()
    # fp32 arithmetic, then one rounding to out's dtype: the fp32 tolerance for fp32/fp64 out,
    # the out dtype's (one rounding of a value <= scale) for fp16/bf16 out.
    tol = TOL[torch.float32] if out_dtype in (torch.float32, torch.float64) else TOL[out_dtype]
    assert_within(out, ref, scale, tol, "w0 + P alpha")


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_reconstruct_rounds_to_nearest_even(device, out_dtype):
    # The same fp32 sums stored once as fp32 and once as out_dtype: the narrow result must be
    # torch's round-to-nearest-even of the wide one, bit for bit (the interpreter's own
    # fp32 -> bf16 cast truncates; this catches it).
    K, D = 3, 1000
    basis, scales = random_basis(K, D, torch.float16, device)
    w0 = torch.randn(D, device=device)
    alpha = torch.randn(K, device=device)
    wide = torch.empty(D, device=device)
    narrow = torch.empty(D, dtype=out_dtype, device=device)
    _ops.reconstruct_(wide, w0, basis, scales, alpha, "triton")
    _ops.reconstruct_(narrow, w0, basis, scales, alpha, "triton")
    assert torch.equal(narrow, wide.to(out_dtype))


def test_reconstruct_strided_rows(device):
    K, D = 4, 777
    basis, scales = random_basis(K, D, torch.bfloat16, device, layout=9)
    w0 = torch.randn(D, device=device)
    alpha = torch.randn(K, device=device)
    out = torch.empty(D, device=device)
    _ops.reconstruct_(out, w0, basis, scales, alpha, "triton")
    P = columns(basis, scales)
    scale = w0.double().abs() + P.abs().T @ alpha.double().abs()
    assert_within(out, w0.double() + P.T @ alpha.double(), scale, TOL[torch.float32], "w")


def test_reconstruct_deterministic(device):
    basis, scales = random_basis(19, 1109, torch.float16, device)
    w0, alpha = torch.randn(1109, device=device), torch.randn(19, device=device)
    a, b = torch.empty(1109, device=device), torch.empty(1109, device=device)
    _ops.reconstruct_(a, w0, basis, scales, alpha, "triton")
    _ops.reconstruct_(b, w0, basis, scales, alpha, "triton")
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------
# subspace_step_


HYPER = [
    dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False),
    dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=False),
    dict(lr=0.2, momentum=0.8, dampening=0.3, weight_decay=1e-2, nesterov=False),
    dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-3, nesterov=True),
]


@pytest.mark.parametrize("hyper", HYPER, ids=["plain", "momentum-wd", "dampening", "nesterov"])
@pytest.mark.parametrize("K", [1, 3, 301])
def test_subspace_step_matches_fp64_oracle(device, K, hyper):
    alpha = torch.randn(K, device=device)
    buf = torch.randn(K, device=device)  # garbage before the first step: it must be ignored
    counters = torch.zeros(2, dtype=torch.int64, device=device)
    A = torch.randn(K, K, device=device) / K**0.5
    gram = (torch.eye(K, device=device) + 0.1 * (A @ A.T)).contiguous()
    pw0 = torch.randn(K, device=device)
    state = (alpha.double(), buf.double(), 0, 0)
    for step in range(5):
        c = torch.randn(K, device=device)
        if step == 2:
            c[K // 2] = float("nan")
        if step == 3:
            c[0] = float("-inf")
        ops.subspace_step_(alpha, buf, counters, c, gram, pw0, backend="triton", **hyper)
        state = sgd_oracle(state, c, gram, pw0, **hyper)
        assert counters.tolist() == [state[2], state[3]]
        # fp32 arithmetic on O(1) values over 5 steps; G alpha sums K terms of size ~1/sqrt(K).
        torch.testing.assert_close(alpha.double(), state[0], atol=1e-5, rtol=1e-5)
        if hyper["momentum"] != 0:
            torch.testing.assert_close(buf.double(), state[1], atol=1e-5, rtol=1e-5)


def test_subspace_step_skips_nonfinite_bit_for_bit(device):
    K = 5
    alpha, buf = torch.randn(K, device=device), torch.randn(K, device=device)
    counters = torch.tensor([3, 1], device=device)
    gram, pw0 = torch.eye(K, device=device), torch.randn(K, device=device)
    a0, b0 = alpha.clone(), buf.clone()
    for bad in [float("nan"), float("inf"), float("-inf")]:
        c = torch.randn(K, device=device)
        c[-1] = bad
        ops.subspace_step_(alpha, buf, counters, c, gram, pw0, 0.1, 0.9, 0.0, 1e-2, True, "triton")
        assert torch.equal(alpha, a0) and torch.equal(buf, b0)
    assert counters.tolist() == [3, 4]


def test_subspace_step_deterministic(device):
    K = 301
    gram, pw0 = torch.randn(K, K, device=device), torch.randn(K, device=device)
    c = torch.randn(K, device=device)
    init = torch.randn(K, device=device), torch.randn(K, device=device)
    results = []
    for _ in range(2):
        alpha, buf = init[0].clone(), init[1].clone()
        counters = torch.tensor([1, 0], device=device)
        ops.subspace_step_(alpha, buf, counters, c, gram, pw0, 0.1, 0.9, 0.1, 1e-2, False, "triton")
        results.append((alpha, buf))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


# ------------------------------------------------------------------------------------------
# orthogonalize_


# (K, D, rank): D = 1 with rank 0; k = 1; k = 3 over a prime D spanning four chunks; rank = K
# (nothing stored); k = 301 with D kept small (10 K tiles of 32 in pass 2).
ORTHO_SHAPES = [(1, 1, 0), (2, 37, 1), (4, 1009, 3), (3, 1000, 3), (302, 400, 301)]


@pytest.mark.parametrize("K,D,rank", ORTHO_SHAPES)
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_orthogonalize_matches_fp64_oracle(device, dtype, K, D, rank):
    basis, scales = orthonormal_basis(K, D, rank, dtype, device)
    check_orthogonalize("triton", basis, scales, torch.randn(D, device=device) + 0.5, rank)


@pytest.mark.parametrize("layout", ["padded", "aligned-slice", "odd-slice"])
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_orthogonalize_strided_rows(device, dtype, layout):
    """Rows strided past D (as ``Subspace`` stores them) read and written in place, nothing else."""
    K, D, rank = 4, 1009, 3
    basis, storage = basis_in_layout(K, D, dtype, device, layout, fill=7.0)
    dense, scales = orthonormal_basis(K, D, rank, dtype, device)
    basis.copy_(dense)
    sample = torch.randn(D, device=device) + 0.5
    check_orthogonalize("triton", basis, scales, sample, rank, storage=storage)


# max|P^T P - I| after filling the basis: entries rounded to the storage dtype (unit roundoff
# u: 4.9e-4 fp16, 3.9e-3 bf16) give errors ~u per inner product; fp32 storage ~1e-7.
ORTHO_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_orthogonalize_invariants(device, dtype):
    K, D = 6, 1009
    basis = torch.zeros(K, D, dtype=dtype, device=device)
    scales = torch.zeros(K, device=device)
    # Trajectory-like samples: a common point plus small moves (the differences matter).
    anchor = torch.randn(D, device=device)
    samples = [anchor + 0.1 * torch.randn(D, device=device) for _ in range(K)]
    for rank, s in enumerate(samples):
        out = _ops.orthogonalize_(basis, scales, s, rank, "triton")
        P = columns(basis[: rank + 1], scales[: rank + 1])
        # Span kept: the sample is P [h; ||u||] up to the storage rounding of P.
        recon = P.T @ out[: rank + 1]
        err = (recon - s.double()).norm() / s.double().norm()
        assert err < ORTHO_TOL[dtype], f"rank {rank}: sample reproduced to {err:.3g}"
    G = columns(basis, scales) @ columns(basis, scales).T
    dev = (G - torch.eye(K, dtype=torch.float64, device=device)).abs().max()
    assert dev < ORTHO_TOL[dtype], f"max|P^T P - I| = {dev:.3g}"


@pytest.mark.parametrize(
    "dtype,K,rank",
    [(torch.float16, 512, 511), (torch.float32, 512, 511), (torch.bfloat16, 512, 512)],
)
def test_orthogonalize_rank_up_to_512(device, dtype, K, rank):
    # K tiled in pass 2: 16 tiles of 32 rows per [K, 64] slab (fp16) or [K, 32] slab (fp32),
    # over a D = 520 that spans three chunks (256, 256, 8). rank = K stores nothing.
    D = 520
    basis, scales = orthonormal_basis(K, D, rank, dtype, device)
    sample = torch.randn(D, device=device) + 0.5
    before, scales_before = basis.clone(), scales.clone()
    out = _ops.orthogonalize_(basis, scales, sample, rank, "triton")
    ref, row, scale = cgs2_oracle(before, scales_before, sample, rank)
    vnorm = sample.double().norm().item()
    torch.testing.assert_close(out, ref, atol=TOL[torch.float64][0] * vnorm, rtol=1e-10)
    assert torch.equal(basis[:rank], before[:rank])
    if rank < K:
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(basis[rank].double(), row.double(), atol=0.0, rtol=eps)
        torch.testing.assert_close(scales[rank], scale, atol=0.0, rtol=1e-6)
    else:
        assert torch.equal(basis, before) and torch.equal(scales, scales_before)


def test_orthogonalize_remainder_tiles_bounded():
    # Pass 2 must hold one bounded tile of P whatever the rank: <= 4096 fp64 values in
    # registers, the K tiles covering [0, R) with less than one tile of padding, and the
    # [R, BLOCK_D] slab it reads twice within 64 KB unless BLOCK_D is at its 32-column floor.
    from twa_kernels._triton.orthogonalize import _remainder_blocks

    for size in (2, 4):
        for R in range(1, 513):
            nt, block_k, block_d = _remainder_blocks(R, size)
            assert block_k * block_d <= 4096, (R, size)
            assert R <= nt * block_k < max(R, 16) * 2, (R, size)
            assert block_d == 32 or R * block_d * size <= 64 * 1024, (R, size)
            assert block_d & (block_d - 1) == 0 and nt & (nt - 1) == 0, (R, size)


def test_orthogonalize_deterministic(device):
    K, D, rank = 9, 1009, 8
    basis, scales = orthonormal_basis(K, D, rank, torch.float16, device)
    sample = torch.randn(D, device=device)
    b1, s1 = basis.clone(), scales.clone()
    o1 = _ops.orthogonalize_(b1, s1, sample, rank, "triton")
    o2 = _ops.orthogonalize_(basis, scales, sample, rank, "triton")
    assert torch.equal(o1, o2) and torch.equal(b1, basis) and torch.equal(s1, scales)


# ------------------------------------------------------------------------------------------
# opcheck: schema, fake implementation and dispatch of every op with backend="triton"


def test_project_opcheck(device):
    basis, scales = random_basis(3, 300, torch.float16, device)
    for x in [torch.randn(300, device=device), torch.randn(5, 300, device=device).bfloat16()]:
        torch.library.opcheck(_ops.project, (basis, scales, x), {"backend": "triton"})


def test_reconstruct_opcheck(device):
    basis, scales = random_basis(3, 300, torch.bfloat16, device)
    args = (
        torch.empty(300, dtype=torch.float16, device=device), torch.randn(300, device=device),
        basis, scales, torch.randn(3, device=device),
    )  # fmt: skip
    torch.library.opcheck(_ops.reconstruct_, args, {"backend": "triton"})


def test_orthogonalize_opcheck(device):
    basis, scales = orthonormal_basis(4, 300, 2, torch.float16, device)
    args = (basis, scales, torch.randn(300, device=device), 2)
    torch.library.opcheck(_ops.orthogonalize_, args, {"backend": "triton"})


def test_subspace_step_opcheck(device):
    K = 3
    args = (
        torch.randn(K, device=device), torch.randn(K, device=device),
        torch.zeros(2, dtype=torch.int64, device=device), torch.randn(K, device=device),
        torch.eye(K, device=device), torch.randn(K, device=device), torch.tensor(0.1, device=device),
        0.9, 0.0, 1e-3, False,
    )  # fmt: skip
    torch.library.opcheck(_ops.subspace_step_, args, {"backend": "triton"})


# ------------------------------------------------------------------------------------------
# torch.compile: the public ops trace as single graph nodes (their fake implementations give
# the shapes), with no graph break, and compute what the eager calls compute.


def test_ops_under_torch_compile_fullgraph(device):
    from torch._dynamo.testing import CompileCounterWithBackend

    basis, scales = random_basis(3, 300, torch.float16, device)
    w0 = torch.randn(300, device=device)

    def f(x, out):
        c = ops.project(basis, scales, x * 2, backend="triton")
        ops.reconstruct_(out, w0, basis, scales, c, backend="triton")  # mutates a graph input
        return c + 1

    # aot_eager on CPU (functionalises the mutating op; no C++ compiler needed); inductor on a GPU.
    counter = CompileCounterWithBackend("aot_eager" if device.type == "cpu" else "inductor")
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=counter)
    x = torch.randn(300, device=device)
    out_c, out_e = torch.empty(300, device=device), torch.empty(300, device=device)
    got, want = compiled(x, out_c), f(x, out_e)
    assert counter.frame_count == 1
    # Same kernels on the same inputs (x * 2 and c + 1 are exact or identically rounded).
    assert torch.equal(got, want) and torch.equal(out_c, out_e)
