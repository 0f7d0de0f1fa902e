"""``twa::reconstruct_`` (out = w0 + P alpha) on every backend against the fp64 oracles.

Each test runs once per backend ("torch", "triton", "cuda") and device (see backends.py); a
backend that cannot run here is skipped with the reason. The oracles work on the *stored*
basis values upcast to fp64: the error allowed for is the backend's fp32 arithmetic and the
one rounding to out's dtype. Sizes as in test_op_project.py.
"""

# ruff: noqa: F811  (pytest fixtures imported from backends.py are test arguments)

import oracle
import pytest
import torch
from backends import (  # noqa: F401  (fixtures: backend, device, target)
    ANY,
    COMPILED,
    GPU,
    KERNEL_TARGETS,
    all_configs,
    backend,
    device,
    dtypes,
    fits,
    needs_gpu,
    others,
    target,
)
from conftest import STORAGE_DTYPES, TOL, only_config
from oracle import assert_within, columns, random_basis

from twa_kernels import _ops, ops

# The interpreter (triton 3.6 + numpy 2.3) converts 1-element arrays to loop bounds.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LAYOUTS = ["contiguous", "aligned-slice", "odd-slice"]
SHAPES = [
    pytest.param(1, 1, ANY, id="K1-D1"),
    pytest.param(3, 1, ANY, id="K3-D1"),
    pytest.param(1, 7, ANY, id="K1-D7"),
    pytest.param(3, 1000, ANY, id="K3-D1000"),
    pytest.param(3, 1009, ANY, id="K3-D1009"),
    pytest.param(301, 37, ANY, id="K301-D37"),
    pytest.param(3, 2053, COMPILED, id="K3-D2053"),
    pytest.param(3, 4099, COMPILED, id="K3-D4099"),
    pytest.param(1, 10007, COMPILED, id="K1-D10007"),
    pytest.param(37, 1000, COMPILED, id="K37-D1000"),
    pytest.param(301, 257, COMPILED, id="K301-D257"),
    pytest.param(301, 4099, COMPILED, id="K301-D4099"),
    pytest.param(5, 1_000_003, GPU, id="K5-D1000003"),
]


def check_reconstruct(out, w0, basis, scales, alpha, what="w0 + P alpha"):
    """fp32 arithmetic, then one rounding to out's dtype: the fp32 row of TOL for fp32/fp64
    out, the out dtype's (one rounding of a value <= the scale) for fp16/bf16 out; relative to
    |w0| + |P| |alpha| per entry."""
    P = columns(basis, scales)
    ref = w0.double() + P.T @ alpha.double()
    scale = w0.double().abs() + P.abs().T @ alpha.double().abs()
    tol = TOL[torch.float32] if out.dtype in (torch.float32, torch.float64) else TOL[out.dtype]
    assert_within(out, ref, scale, tol, what)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("K,D,tier", SHAPES)
@pytest.mark.parametrize("out_dtype", dtypes(OUT_DTYPES))
@pytest.mark.parametrize("dtype", dtypes(STORAGE_DTYPES))
def test_reconstruct_matches_fp64_oracle(backend, device, dtype, out_dtype, K, D, tier, layout):
    fits(backend, device, tier)
    basis, scales = random_basis(K, D, dtype, device, layout)
    w0 = torch.randn(D, device=device)
    alpha = torch.randn(K, device=device)
    out = torch.full((D,), float("nan"), dtype=out_dtype, device=device)
    _ops.reconstruct_(out, w0, basis, scales, alpha, backend)
    check_reconstruct(out, w0, basis, scales, alpha)


@pytest.mark.parametrize("K,D,tier", [(3, 1000, ANY), (3, 4099, COMPILED)], ids=["K3-D1000", "K3-D4099"])
@pytest.mark.parametrize("out_dtype", dtypes([torch.bfloat16, torch.float16]))
def test_reconstruct_rounds_to_nearest_even(backend, device, out_dtype, K, D, tier):
    # The same fp32 sums stored once as fp32 and once as out_dtype: the narrow result must be
    # torch's round-to-nearest-even of the wide one, bit for bit (the interpreter's own
    # fp32 -> bf16 cast truncates; this catches it).
    fits(backend, device, tier)
    basis, scales = random_basis(K, D, torch.float16, device)
    w0, alpha = torch.randn(D, device=device), torch.randn(K, device=device)
    wide = torch.empty(D, device=device)
    narrow = torch.empty(D, dtype=out_dtype, device=device)
    _ops.reconstruct_(wide, w0, basis, scales, alpha, backend)
    _ops.reconstruct_(narrow, w0, basis, scales, alpha, backend)
    assert torch.equal(narrow, wide.to(out_dtype))


@pytest.mark.parametrize("layout", ["padded", *LAYOUTS])
@pytest.mark.parametrize("dtype", dtypes([torch.int8]))
def test_reconstruct_int8_whole_tiles(backend, device, dtype, layout):
    """int8 rows over whole column tiles and a masked one: Triton's int8 kernel writes 2048
    columns per program, more than any shape above has under the interpreter. D = 4099: two
    whole tiles and 3 columns (a partial scale block); K = 19: a partial K tile."""
    K, D = 19, 4099
    basis, scales = random_basis(K, D, dtype, device, layout)
    w0, alpha = torch.randn(D, device=device), torch.randn(K, device=device)
    out = torch.full((D,), float("nan"), device=device)
    _ops.reconstruct_(out, w0, basis, scales, alpha, backend)
    check_reconstruct(out, w0, basis, scales, alpha, layout)


def test_reconstruct_writes_only_out(backend, device):
    # out is a slice of a larger buffer: the values around it must survive.
    K, D = 5, 2053
    basis, scales = random_basis(K, D, torch.bfloat16, device, "aligned-slice")
    buf = torch.full((D + 64,), 7.0, device=device)
    out = buf[32 : 32 + D]
    w0, alpha = torch.randn(D, device=device), torch.randn(K, device=device)
    _ops.reconstruct_(out, w0, basis, scales, alpha, backend)
    assert torch.all(buf[:32] == 7.0) and torch.all(buf[32 + D :] == 7.0)
    check_reconstruct(out, w0, basis, scales, alpha)


def test_reconstruct_strided_rows(backend, device):
    K, D = 4, 777
    basis, scales = random_basis(K, D, torch.bfloat16, device, layout=9)
    w0, alpha = torch.randn(D, device=device), torch.randn(K, device=device)
    out = torch.empty(D, device=device)
    _ops.reconstruct_(out, w0, basis, scales, alpha, backend)
    check_reconstruct(out, w0, basis, scales, alpha, "w")


def test_reconstruct_into_a_column_slice_of_a_wider_basis(backend, device):
    """Per-parameter slices: rows strided by the full D, as the optimizer passes them (unit
    rows; absolute tolerance, ~17x the fp32 error of these sums), for project as well."""
    basis, scales = oracle.make_basis(4, 1000, torch.float16)
    basis, scales = basis.to(device), scales.to(device)
    sl = basis[:, 101:358]
    assert not sl.is_contiguous() and sl.stride(1) == 1
    out = torch.empty(257, device=device)
    w0, alpha = torch.randn(257, device=device), torch.randn(4, device=device)
    ops.reconstruct_(out, w0, sl, scales, alpha, backend=backend)
    torch.testing.assert_close(out.double(), oracle.reconstruct(w0, sl, scales, alpha), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        ops.project(sl, scales, w0, backend=backend).double(),
        oracle.project(sl, scales, w0),
        atol=1e-5,
        rtol=1e-5,
    )


DETERMINISM_SHAPES = [
    pytest.param(19, 1109, "contiguous", ANY, id="K19-D1109"),
    pytest.param(301, 1_000_003, "aligned-slice", GPU, id="K301-D1000003"),
]


@pytest.mark.parametrize("K,D,layout,tier", DETERMINISM_SHAPES)
def test_reconstruct_deterministic(backend, device, K, D, layout, tier):
    fits(backend, device, tier)
    basis, scales = random_basis(K, D, torch.float16, device, layout)
    w0, alpha = torch.randn(D, device=device), torch.randn(K, device=device)
    a, b = torch.empty(D, device=device), torch.empty(D, device=device)
    _ops.reconstruct_(a, w0, basis, scales, alpha, backend)
    _ops.reconstruct_(b, w0, basis, scales, alpha, backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("K,D,layout,tier", DETERMINISM_SHAPES)
@pytest.mark.parametrize("target", KERNEL_TARGETS, indirect=True)
def test_reconstruct_agrees_with_other_backends(backend, device, K, D, layout, tier):
    fits(backend, device, tier)
    basis, scales = random_basis(K, D, torch.float16, device, layout)
    w0, alpha = torch.randn(D, device=device), torch.randn(K, device=device)
    a = torch.empty(D, device=device)
    _ops.reconstruct_(a, w0, basis, scales, alpha, backend)
    scale = w0.double().abs() + columns(basis, scales).abs().T @ alpha.double().abs()
    atol, rtol = TOL[torch.float32]
    for other in others(device, backend):
        ref = torch.empty(D, device=device)
        _ops.reconstruct_(ref, w0, basis, scales, alpha, other)
        # Both sides carry fp32 rounding error: twice the tolerance.
        assert_within(a, ref.double(), scale, (2 * atol, 2 * rtol), f"{backend} vs {other}")


def test_reconstruct_opcheck(backend, device):
    basis, scales = random_basis(3, 300, torch.bfloat16, device)
    for out_dtype in [torch.float16, torch.bfloat16]:
        args = (
            torch.empty(300, dtype=out_dtype, device=device), torch.randn(300, device=device),
            basis, scales, torch.randn(3, device=device),
        )  # fmt: skip
        torch.library.opcheck(_ops.reconstruct_, args, {"backend": backend})


def test_project_and_reconstruct_under_torch_compile_fullgraph(backend, device):
    """The public ops trace as single graph nodes (their fake implementations give the shapes),
    with no graph break, and compute what the eager calls compute."""
    from torch._dynamo.testing import CompileCounterWithBackend

    basis, scales = random_basis(3, 300, torch.float16, device)
    w0 = torch.randn(300, device=device)

    def f(x, out):
        c = ops.project(basis, scales, x * 2, backend=backend)
        ops.reconstruct_(out, w0, basis, scales, c, backend=backend)  # mutates a graph input
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


def test_reconstruct_bad_arguments_name_the_argument(backend, device):
    basis, scales = random_basis(3, 20, torch.float16, device)
    x = torch.randn(20, device=device)
    with pytest.raises((RuntimeError, ValueError), match=r"out must have shape \[20\]"):
        ops.reconstruct_(x[:5], x, basis, scales, scales, backend=backend)


# ------------------------------------------------------------------------------------------
# Backend-specific


@needs_gpu
@pytest.mark.parametrize("layout", ["padded", "odd-slice"])
@pytest.mark.parametrize(
    "kernel,config",
    all_configs("reconstruct", "_reconstruct_kernel")
    + all_configs("reconstruct", "_reconstruct_int8_kernel"),
)
def test_every_reconstruct_config_matches_fp64_oracle(kernel, config, layout):
    """Triton only: each autotune candidate on its own (see test_every_project_config_...)."""
    K, D = 37, 100_003
    dtype = torch.int8 if "int8" in kernel.base_fn.__name__ else torch.float16
    basis, scales = random_basis(K, D, dtype, "cuda", layout)
    w0, alpha = torch.randn(D, device="cuda"), torch.randn(K, device="cuda")
    out = torch.full((D,), float("nan"), device="cuda")
    with only_config(kernel, config):
        _ops.reconstruct_(out, w0, basis, scales, alpha, "triton")
    check_reconstruct(out, w0, basis, scales, alpha)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernels run on a GPU only")
@pytest.mark.parametrize("io", ["aligned", "offset"])
@pytest.mark.parametrize("out_dtype", dtypes(OUT_DTYPES))
@pytest.mark.parametrize("K,D", [(1, 1_000_003), (37, 100_003), (1030, 4099)], ids=["K1", "K37", "K1030"])
def test_cuda_reconstruct_int8_streams_many_rows(K, D, out_dtype, io):
    """CUDA only, its int8 kernel called directly: rows from ``empty_basis`` (16-byte loads,
    8 rows in flight, a masked tail group), K = 1030 staging alpha in two chunks of 1024; w0 and
    out 16-byte aligned (16-byte accesses for whole groups) or one element off (scalar ones),
    out a slice whose neighbours must survive; block scales with a row stride past
    ceil(D / 64)."""
    from twa_kernels import _cuda

    basis, scales = random_basis(K, D, torch.int8, "cuda", "padded")
    wide = torch.full((K, scales.shape[1] + 3), float("nan"), device="cuda")
    wide[:, : scales.shape[1]] = scales
    scales = wide[:, : scales.shape[1]]
    off = 0 if io == "aligned" else 1
    w0 = torch.randn(D + 1, device="cuda")[off : off + D]
    buf = torch.full((D + 64,), 7.0, dtype=out_dtype, device="cuda")
    out = buf[32 + off : 32 + off + D]
    alpha = torch.randn(K, device="cuda")
    _cuda.reconstruct_(out, w0, basis, scales, alpha)
    assert torch.all(buf[: 32 + off] == 7.0) and torch.all(buf[32 + off + D :] == 7.0)
    check_reconstruct(out, w0, basis, scales, alpha, f"{io} w0/out")
