"""``twa::project`` (P^T x) on every backend against the fp64 oracles of oracle.py.

Each test runs once per backend ("torch", "triton", "cuda") and device (see backends.py); a
backend that cannot run here is skipped with the reason. The oracles work on the *stored*
basis values upcast to fp64, so the only error allowed for is the backend's fp32 accumulation.

Sizes are chosen against the kernels' tiles: D = 1; D prime (1009, 2053, 4099, 10007) over
several Triton chunks (256 columns) and reference chunks (2^12 values in these tests); D = 1000,
not a multiple of any block; K = 1, 3, 37 and 301 (many K tiles); D = 1_000_003 (hundreds of
CUDA column tiles, many partials); batches of 1, 5 and 17 (two launches of <= 16); rows that are
column slices of a wider tensor with a shared 16-byte phase and without one.
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
from memory import largest_cpu_allocation
from oracle import assert_within, columns, random_basis

from twa_kernels import _ops, ops, reference

# The interpreter (triton 3.6 + numpy 2.3) converts 1-element arrays to loop bounds.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

INPUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (K, D, size tier): the shapes every backend was checked at before, each where it is affordable.
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
SLICE_SHAPES = [
    pytest.param(1, 1, ANY, id="K1-D1"),
    pytest.param(3, 1, ANY, id="K3-D1"),
    pytest.param(1, 7, ANY, id="K1-D7"),
    pytest.param(3, 1009, ANY, id="K3-D1009"),
    pytest.param(3, 2053, COMPILED, id="K3-D2053"),
    pytest.param(301, 4099, COMPILED, id="K301-D4099"),
    pytest.param(5, 1_000_003, GPU, id="K5-D1000003"),
]


def check_project(c, basis, scales, x, what="P^T x"):
    """``c`` against the fp64 oracle, two bounds with the fp32 row of TOL (exact inputs: only
    fp32 accumulation and the scale product round, whatever the storage dtype):

    - per entry, relative to sum_d |P_id x_d|: atol + rtol * that sum;
    - per entry, relative to the norms: atol * ||P_i|| ||x|| + rtol * |c_i| (tighter when D is
      large: the sum of |terms| is ~0.64 ||P_i|| ||x|| for random vectors).
    """
    P = columns(basis, scales)
    ref = x.double() @ P.T
    assert_within(c, ref, x.double().abs() @ P.abs().T, TOL[torch.float32], what)
    atol, rtol = TOL[torch.float32]
    norms = x.double().norm(dim=-1, keepdim=True) * P.norm(dim=1)
    err = (c.double() - ref).abs()
    bound = atol * norms + rtol * ref.abs()
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"{what}: error {err.max().item():.3g} is {worst:.3g} x the norm bound"


@pytest.mark.parametrize("K,D,tier", SHAPES)
@pytest.mark.parametrize("batch", [None, 1, 5])
@pytest.mark.parametrize("x_dtype", dtypes(INPUT_DTYPES))
@pytest.mark.parametrize("dtype", dtypes(STORAGE_DTYPES))
def test_project_matches_fp64_oracle(backend, device, dtype, x_dtype, batch, K, D, tier):
    fits(backend, device, tier)
    basis, scales = random_basis(K, D, dtype, device)
    shape = (D,) if batch is None else (batch, D)
    x = torch.randn(shape, device=device).to(x_dtype)
    c = _ops.project(basis, scales, x, backend)
    assert c.dtype == torch.float32 and c.shape == (*shape[:-1], K)
    check_project(c, basis, scales, x)


@pytest.mark.parametrize("x_dtype", dtypes([torch.bfloat16, torch.float16]))
def test_project_accepts_half_precision_inputs(backend, device, x_dtype):
    # Unit rows (make_basis): the rounded x is the input, so no tolerance for it; the absolute
    # 1e-5 is ~17x the fp32 accumulation error over D = 3001 terms of size 1/sqrt(D).
    basis, scales = oracle.make_basis(5, 3001, torch.float16)
    x = torch.randn(2, 3001).to(x_dtype)
    out = ops.project(basis.to(device), scales.to(device), x.to(device), backend=backend)
    expected = oracle.project(basis, scales, x)
    torch.testing.assert_close(out.cpu().double(), expected, atol=1e-5, rtol=2e-5)


@pytest.mark.parametrize("layout", ["aligned-slice", "odd-slice"])
@pytest.mark.parametrize("K,D,tier", SLICE_SHAPES)
@pytest.mark.parametrize("batch", [None, 5])
@pytest.mark.parametrize("dtype", dtypes(STORAGE_DTYPES))
def test_project_column_slices(backend, device, dtype, batch, K, D, tier, layout):
    """Rows that are column slices of a wider tensor: vector loads after a head, or scalar."""
    fits(backend, device, tier)
    basis, scales = random_basis(K, D, dtype, device, layout)
    assert basis.stride(1) == 1 and (K == 1 or basis.stride(0) > D)
    x = torch.randn((D,) if batch is None else (batch, D), device=device)
    check_project(_ops.project(basis, scales, x, backend), basis, scales, x, layout)


@pytest.mark.parametrize("dtype", dtypes(STORAGE_DTYPES))
def test_project_strided_rows_and_batch_above_16(backend, device, dtype):
    K, D = 5, 300
    basis, scales = random_basis(K, D, dtype, device, layout=17)
    assert basis.stride(0) == D + 17
    x = torch.randn(17, D, device=device)
    check_project(_ops.project(basis, scales, x, backend), basis, scales, x)


@pytest.mark.parametrize("layout", ["padded", "aligned-slice", "odd-slice"])
@pytest.mark.parametrize("batch", [None, 5])
@pytest.mark.parametrize("dtype", dtypes([torch.int8]))
def test_project_int8_whole_tiles(backend, device, dtype, batch, layout):
    """int8 rows over whole column tiles and a masked one: Triton's single-vector kernel reads
    2048 columns per tile, more than any shape above has under the interpreter. D = 4099: two
    whole tiles and 3 columns (a partial scale block); K = 19: a partial K tile."""
    K, D = 19, 4099
    basis, scales = random_basis(K, D, dtype, device, layout)
    x = torch.randn((D,) if batch is None else (batch, D), device=device)
    check_project(_ops.project(basis, scales, x, backend), basis, scales, x, layout)


@pytest.mark.parametrize("B", [0, 16, 17, 40])
def test_project_batch_sizes(backend, device, B):
    K, D = 7, 3001
    basis, scales = random_basis(K, D, torch.float16, device, "aligned-slice")
    x = torch.randn(B, D, device=device)
    c = _ops.project(basis, scales, x, backend)
    assert c.shape == (B, K)
    check_project(c, basis, scales, x, "batch")


DETERMINISM_SHAPES = [
    pytest.param(7, 1109, "contiguous", ANY, id="K7-D1109"),
    pytest.param(301, 1_000_003, "aligned-slice", GPU, id="K301-D1000003"),
]


@pytest.mark.parametrize("K,D,layout,tier", DETERMINISM_SHAPES)
def test_project_deterministic(backend, device, K, D, layout, tier):
    fits(backend, device, tier)
    basis, scales = random_basis(K, D, torch.float16, device, layout)
    for shape in [(D,), (5, D)]:
        x = torch.randn(shape, device=device)
        a = _ops.project(basis, scales, x, backend)
        b = _ops.project(basis, scales, x, backend)
        assert torch.equal(a, b)


@pytest.mark.parametrize("K,D,tier", [(19, 1009, ANY), (19, 100_003, GPU)], ids=["K19-D1009", "K19-D100003"])
@pytest.mark.parametrize("dtype", dtypes(STORAGE_DTYPES))
@pytest.mark.parametrize("target", KERNEL_TARGETS, indirect=True)
def test_project_agrees_with_other_backends(backend, device, dtype, K, D, tier):
    fits(backend, device, tier)
    basis, scales = random_basis(K, D, dtype, device, "aligned-slice")
    x = torch.randn(3, D, device=device)
    c = _ops.project(basis, scales, x, backend)
    scale = x.double().abs() @ columns(basis, scales).abs().T
    for other in others(device, backend):
        ref = _ops.project(basis, scales, x, other).double()
        # Both sides carry fp32 accumulation error: twice the tolerance.
        atol, rtol = TOL[torch.float32]
        assert_within(c, ref, scale, (2 * atol, 2 * rtol), f"{backend} vs {other}")


def test_project_opcheck(backend, device):
    """Schema, fake implementation and dispatch, on a contiguous and a sliced basis."""
    for layout in ["contiguous", "aligned-slice"]:
        basis, scales = random_basis(3, 300, torch.float16, device, layout)
        for x in [torch.randn(300, device=device), torch.randn(5, 300, device=device).bfloat16()]:
            torch.library.opcheck(_ops.project, (basis, scales, x), {"backend": backend})


def test_project_under_torch_compile_fullgraph(backend, device):
    """One graph, no break (the fake implementation gives the shape), the eager result."""
    from torch._dynamo.testing import CompileCounterWithBackend

    basis, scales = random_basis(4, 515, torch.float16, device)
    x = torch.randn(515, device=device)

    def f(basis, scales, x):
        return ops.project(basis, scales, x * 2, backend=backend) + 1

    counter = CompileCounterWithBackend("aot_eager" if device.type == "cpu" else "inductor")
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend=counter)(basis, scales, x)
    assert counter.frame_count == 1
    assert torch.equal(got, f(basis, scales, x))


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda b, s, x, be: ops.project(b[:, :10], s, x, backend=be),
            "x has 20 columns, the basis has D=10",
        ),
        (lambda b, s, x, be: ops.project(b, s[:2], x, backend=be), r"scales must have shape \[3\]"),
        (lambda b, s, x, be: ops.project(b.int(), s, x, backend=be), "basis dtype must be"),
        (lambda b, s, x, be: ops.project(b, s, x.double(), backend=be), "x dtype must be"),
    ],
    ids=["D", "scales", "basis-dtype", "x-dtype"],
)
def test_project_bad_arguments_name_the_argument(backend, device, call, match):
    basis, scales = random_basis(3, 20, torch.float16, device)
    with pytest.raises((RuntimeError, ValueError), match=match):
        call(basis, scales, torch.randn(20, device=device), backend)


@pytest.mark.parametrize(
    "name, match",
    [("cuda", "backend='cuda' needs CUDA"), ("fast", "backend='fast' is not one of")],
    ids=["cuda", "unknown"],
)
def test_project_names_a_backend_that_cannot_run(name, match):
    basis, scales = random_basis(3, 20, torch.float16, "cpu")
    with pytest.raises((RuntimeError, ValueError), match=match):
        ops.project(basis, scales, torch.randn(20), backend=name)


# ------------------------------------------------------------------------------------------
# Backend-specific


def test_project_and_reconstruct_never_upcast_the_whole_basis(monkeypatch):
    """Reference only: its CPU path upcasts the basis chunk by chunk (CPU_CHUNK_ELEMENTS), so
    only chunk-sized temporaries; the kernels have no such temporaries (and Triton's
    interpreter copies whole tensors by itself, so the measure would not mean anything)."""
    monkeypatch.setattr(reference, "CPU_CHUNK_ELEMENTS", 1 << 14)
    basis, scales = oracle.make_basis(8, 50_000, torch.float16)
    x, out, w0, alpha = torch.randn(50_000), torch.empty(50_000), torch.randn(50_000), torch.randn(8)

    def run():
        ops.project(basis, scales, x, backend="torch")
        ops.reconstruct_(out, w0, basis, scales, alpha, backend="torch")

    assert largest_cpu_allocation(run) <= 4 * (1 << 14)  # one fp32 chunk
    monkeypatch.setattr(reference, "CPU_CHUNK_ELEMENTS", 1 << 30)
    assert largest_cpu_allocation(run) >= 4 * 8 * 50_000, "the measure must see a whole upcast"


@needs_gpu
@pytest.mark.parametrize("layout", ["padded", "odd-slice"])
@pytest.mark.parametrize(
    "kernel,config",
    all_configs("project", "_project_kernel")
    + all_configs("project", "_project_batched_kernel")
    + all_configs("project", "_project_int8_kernel")
    + all_configs("project", "_project_batched_int8_kernel"),
)
def test_every_project_config_matches_fp64_oracle(kernel, config, layout):
    """Triton only: each autotune candidate (tile shape, warps, programs per SM) on its own, over
    several K tiles and chunks, with whole tiles (16-byte loads) and masked ones; an fp16 basis,
    or int8 for the int8 kernels."""
    K, D = 37, 100_003
    name = kernel.base_fn.__name__
    basis, scales = random_basis(K, D, torch.int8 if "int8" in name else torch.float16, "cuda", layout)
    x = torch.randn(1 if name in ("_project_kernel", "_project_int8_kernel") else 5, D, device="cuda")
    with only_config(kernel, config):
        c = _ops.project(basis, scales, x, "triton")
    P = columns(basis, scales)
    assert_within(c, x.double() @ P.T, x.double().abs() @ P.abs().T, TOL[torch.float32], "P^T x")


needs_cuda_kernels = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA kernels run on a GPU only"
)


@needs_cuda_kernels
@pytest.mark.parametrize("x_layout", ["aligned", "offset"])
@pytest.mark.parametrize("batch", [None, 2, 5])
@pytest.mark.parametrize("x_dtype", dtypes(INPUT_DTYPES))
@pytest.mark.parametrize("K,D", [(1, 1_000_003), (37, 1_000_003), (301, 100_003)], ids=["K1", "K37", "K301"])
def test_cuda_project_int8_streams_many_steps(K, D, x_dtype, batch, x_layout):
    """CUDA only, its int8 kernels called directly: rows from ``empty_basis`` (16-byte loads)
    over many 1024-column steps per split and a masked tail (D = 1_000_003 is 3 past a multiple
    of 16), K tiles of 32 rows (B = 1) or 16 (B = 2, and B = 5 in passes of 2, 2, 1); x rows
    16-byte aligned (16-byte x loads) or one element off (scalar x loads); block scales that
    are a column slice of a wider tensor (a row stride past ceil(D / 64))."""
    from twa_kernels import _cuda

    basis, scales = random_basis(K, D, torch.int8, "cuda", "padded")
    wide = torch.full((K, scales.shape[1] + 5), float("nan"), device="cuda")
    wide[:, : scales.shape[1]] = scales
    scales = wide[:, : scales.shape[1]]
    shape = (D,) if batch is None else (batch, D)
    n = torch.Size(shape).numel()
    x = torch.randn(n + 1, device="cuda").to(x_dtype)
    x = (x[:n] if x_layout == "aligned" else x[1:]).view(shape)
    c = _cuda.project(basis, scales, x)
    assert c.shape == (*shape[:-1], K)
    check_project(c, basis, scales, x, f"{x_layout} x")
    assert torch.equal(c, _cuda.project(basis, scales, x)), "not deterministic"


@needs_cuda_kernels
def test_cuda_int8_arguments_are_checked_by_the_extension():
    """CUDA only: the extension's own checks of an int8 basis name the argument (the ops check
    the same before it; direct torch.ops.twa_cuda calls reach only these)."""
    from twa_kernels import _cuda

    basis, scales = random_basis(3, 130, torch.int8, "cuda")
    x = torch.randn(130, device="cuda")
    with pytest.raises(RuntimeError, match=r"twa_cuda::project: scales must have shape \[3, 3\] for an int8"):
        _cuda.project(basis, scales[:, :2], x)
    with pytest.raises(RuntimeError, match=r"twa_cuda::project: scales must have shape \[3, 3\]"):
        _cuda.project(basis, scales[:, 0], x)
    with pytest.raises(RuntimeError, match="twa_cuda::project: scales must be Float"):
        _cuda.project(basis, scales.double(), x)
    with pytest.raises(RuntimeError, match=r"scales must be contiguous along their last dim"):
        _cuda.project(basis, scales.t().contiguous().t(), x)
    with pytest.raises(RuntimeError, match="twa_cuda::reconstruct_: scales must have shape"):
        _cuda.reconstruct_(x.clone(), x, basis, scales[:1], torch.randn(3, device="cuda"))
    with pytest.raises(RuntimeError, match=r"twa_cuda::orthogonalize_: scales must have shape \[3, 3\]"):
        _cuda.orthogonalize_(basis, scales[:, :2], x, 0)
