"""``twa::orthogonalize_`` (CGS2 of a sample against the stored rows) on every backend.

Each test runs once per backend ("torch", "triton", "cuda") and device (see backends.py); a
backend that cannot run here is skipped with the reason. ``oracle.check_orthogonalize`` holds
the contract: coefficients and norms within TOL[float64] of the fp64 CGS2 on the stored rows,
the new row within one ulp, nothing else written.
"""

# ruff: noqa: F811  (pytest fixtures imported from backends.py are test arguments)

import oracle
import pytest
import torch
from backends import ANY, COMPILED, GPU, KERNEL_TARGETS, backend, device, dtypes, fits, others, target  # noqa: F401  (fixtures: backend, device, target)
from conftest import FLOAT_STORAGE_DTYPES, STORAGE_DTYPES, TOL
from oracle import basis_in_layout, cgs2_oracle, check_orthogonalize, columns, orthonormal_basis

from twa_kernels import _ops, ops, reference

# The interpreter (triton 3.6 + numpy 2.3) converts 1-element arrays to loop bounds.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

# (K, D, rank, tier): D = 1 with rank 0; K = 1 stored from rank 0; k = 1; k = 3 over a prime D
# spanning four Triton chunks (scalar loads for 2-byte rows in CUDA); rank = K (nothing
# stored); D = 4096 (vector loads); k = 301 with D kept small (5 Triton K tiles of 64 in pass
# 2) and with D = 4099 (two CUDA coefficient chunks of 256); D = 1_000_003 and 100_000
# (hundreds of column tiles, many partials).
ORTHO_SHAPES = [
    pytest.param(1, 1, 0, ANY, id="K1-D1-r0"),
    pytest.param(1, 37, 0, ANY, id="K1-D37-r0"),
    pytest.param(2, 37, 1, ANY, id="K2-D37-r1"),
    pytest.param(4, 1009, 3, ANY, id="K4-D1009-r3"),
    pytest.param(3, 1000, 3, ANY, id="K3-D1000-r3"),
    pytest.param(302, 400, 301, ANY, id="K302-D400-r301"),
    pytest.param(5, 4096, 4, COMPILED, id="K5-D4096-r4"),
    pytest.param(302, 4099, 301, COMPILED, id="K302-D4099-r301"),
    pytest.param(9, 100_000, 8, COMPILED, id="K9-D100000-r8"),
    pytest.param(3, 1_000_003, 2, COMPILED, id="K3-D1000003-r2"),
]


@pytest.mark.parametrize("K,D,rank,tier", ORTHO_SHAPES)
@pytest.mark.parametrize("dtype", dtypes(STORAGE_DTYPES))
def test_orthogonalize_matches_fp64_oracle(backend, device, dtype, K, D, rank, tier):
    fits(backend, device, tier)
    basis, scales = orthonormal_basis(K, D, rank, dtype, device)
    check_orthogonalize(backend, basis, scales, torch.randn(D, device=device) + 0.5, rank)


@pytest.mark.parametrize("layout", ["padded", "aligned-slice", "odd-slice"])
@pytest.mark.parametrize("dtype", dtypes(STORAGE_DTYPES))
def test_orthogonalize_strided_rows(backend, device, dtype, layout):
    """Rows strided past D (as ``Subspace`` stores them) read and written in place, nothing else."""
    K, D, rank = 4, 1009, 3
    basis, storage = basis_in_layout(K, D, dtype, device, layout, fill=7.0)
    dense, scales = orthonormal_basis(K, D, rank, dtype, device)
    basis.copy_(dense)
    sample = torch.randn(D, device=device) + 0.5
    check_orthogonalize(backend, basis, scales, sample, rank, storage=storage)


# max|P^T P - I| after filling the basis: entries rounded to the storage dtype (unit roundoff
# u: 4.9e-4 fp16, 3.9e-3 bf16) give errors ~u per inner product; fp32 storage ~1e-7.
# int8 (one scale per 64 values): a step of 1/127 of the block's largest entry; measured with the
# reference at D = 1009 (100003): samples reproduced to 6.4e-3 (5.9e-3), max|P^T P - I| 5.9e-4
# (4.1e-5); 1.5e-2 leaves twice the larger.
ORTHO_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5, torch.int8: 1.5e-2}


@pytest.mark.parametrize("D,tier", [(1009, ANY), (100_003, GPU)], ids=["D1009", "D100003"])
@pytest.mark.parametrize("dtype", dtypes(STORAGE_DTYPES))
def test_orthogonalize_invariants(backend, device, dtype, D, tier):
    fits(backend, device, tier)
    K = 6
    basis = torch.zeros(K, D, dtype=dtype, device=device)
    scales = ops.empty_scales(K, D, dtype, device)
    # Trajectory-like samples: a common point plus small moves (the differences matter).
    anchor = torch.randn(D, device=device)
    samples = [anchor + 0.1 * torch.randn(D, device=device) for _ in range(K)]
    for rank, s in enumerate(samples):
        out = _ops.orthogonalize_(basis, scales, s, rank, backend)
        P = columns(basis[: rank + 1], scales[: rank + 1])
        # Span kept: the sample is P [h; ||u||] up to the storage rounding of P.
        err = (P.T @ out[: rank + 1] - s.double()).norm() / s.double().norm()
        assert err < ORTHO_TOL[dtype], f"rank {rank}: sample reproduced to {err:.3g}"
    G = columns(basis, scales) @ columns(basis, scales).T
    dev = (G - torch.eye(K, dtype=torch.float64, device=device)).abs().max()
    assert dev < ORTHO_TOL[dtype], f"max|P^T P - I| = {dev:.3g}"


@pytest.mark.parametrize(
    "K,D,tier",
    [(1, 1, ANY), (12, 300, ANY), (3, 4099, COMPILED), (6, 10007, COMPILED)],
    ids=["K1-D1", "K12-D300", "K3-D4099", "K6-D10007"],
)
@pytest.mark.parametrize("dtype", dtypes(FLOAT_STORAGE_DTYPES))
def test_orthogonalize_builds_an_orthonormal_basis_of_the_samples(backend, device, dtype, K, D, tier):
    """Independent samples into a NaN-filled basis: orthonormal within 2 eps of the storage
    dtype, each sample rebuilt from its coordinates within 4 eps, ||v|| returned to 1e-12."""
    fits(backend, device, tier)
    samples = torch.randn(K, D, dtype=torch.float64)
    basis = torch.full((K, D), float("nan"), dtype=dtype, device=device)
    scales = torch.zeros(K, device=device)
    coords = []
    for rank, v in enumerate(samples):
        out = ops.orthogonalize_(basis, scales, v.float().to(device), rank, backend=backend)
        assert out.dtype == torch.float64 and out.shape == (rank + 2,)
        coords.append(out[:-1].cpu())
        torch.testing.assert_close(out[-1].item(), v.float().double().norm().item(), rtol=1e-12, atol=0)
    P = columns(basis.cpu(), scales.cpu())
    eps = torch.finfo(dtype).eps
    orth = (P @ P.T - torch.eye(K, dtype=torch.float64)).abs().max().item()
    assert orth <= 2 * eps, f"max|P^T P - I| = {orth:.3g}"
    for v, c in zip(samples, coords, strict=True):
        rebuilt = c @ P[: c.numel()]
        assert (rebuilt - v).norm() <= 4 * eps * v.norm()


def test_orthogonalize_returns_the_oracle_coefficients_and_residual(backend, device):
    D = 2001
    Q, _ = torch.linalg.qr(torch.randn(D, 3, dtype=torch.float64))
    basis = torch.empty(3, D, dtype=torch.float32, device=device)
    scales = torch.zeros(3, device=device)
    for rank in range(2):
        ops.orthogonalize_(basis, scales, Q[:, rank].float().to(device), rank, backend=backend)
    v = 2 * Q[:, 0] - 3 * Q[:, 1] + 0.5 * Q[:, 2]
    out = ops.orthogonalize_(basis, scales, v.float().to(device), 2, backend=backend).cpu()
    P = columns(basis[:2].cpu(), scales[:2].cpu())
    torch.testing.assert_close(out[:2], P @ v.float().double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[2].item(), 0.5, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[3].item(), v.norm().item(), atol=1e-5, rtol=0)


def test_orthogonalize_scales_rows_away_from_fp16_subnormals(backend, device):
    """A unit row over 2^22 entries has entries ~5e-4 (rms); stored scaled, max |entry| ~ 2^12."""
    fits(backend, device, COMPILED)
    D = 1 << 22
    basis = torch.empty(1, D, dtype=torch.float16, device=device)
    scales = torch.zeros(1, device=device)
    ops.orthogonalize_(basis, scales, torch.randn(D, device=device), 0, backend=backend)
    assert basis.float().abs().max().item() == pytest.approx(reference.ROW_AMAX, rel=1e-3)
    P = columns(basis, scales)
    assert abs(P.norm().item() - 1) <= 1e-4


def test_orthogonalize_leaves_valid_rows_alone_and_skips_a_full_basis(backend, device):
    basis, scales = oracle.make_basis(2, 300, torch.float16)
    basis, scales = basis.to(device), scales.to(device)
    before = basis.clone(), scales.clone()
    out = ops.orthogonalize_(basis, scales, torch.randn(300, device=device), 2, backend=backend)
    assert out.shape == (4,)
    assert torch.equal(basis, before[0]) and torch.equal(scales, before[1])


@pytest.mark.parametrize(
    "dtype,K,rank",
    [(torch.float16, 512, 511), (torch.float32, 512, 511), (torch.bfloat16, 512, 512)],
    ids=["fp16-512-511", "fp32-512-511", "bf16-512-512"],
)
def test_orthogonalize_rank_up_to_512(backend, device, dtype, K, rank):
    # Triton tiles K in pass 2: 16 tiles of 32 rows per [K, 64] slab (fp16) or [K, 32] slab
    # (fp32), over a D = 520 that spans three chunks (256, 256, 8); CUDA reads 512 rows in two
    # coefficient chunks of 256. rank = K stores nothing.
    D = 520
    basis, scales = orthonormal_basis(K, D, rank, dtype, device)
    sample = torch.randn(D, device=device) + 0.5
    before, scales_before = basis.clone(), scales.clone()
    out = _ops.orthogonalize_(basis, scales, sample, rank, backend)
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


def test_orthogonalize_zero_remainder(backend, device):
    # A zero sample: zero coefficients and norms, scale 0 and a zero row, no NaN.
    K, D = 3, 1000
    basis, scales = orthonormal_basis(K, D, 2, torch.float32, device)
    zero = torch.zeros(D, device=device)
    out = _ops.orthogonalize_(basis, scales, zero, 2, backend)
    assert torch.equal(out, torch.zeros(4, dtype=torch.float64, device=device))
    assert scales[2].item() == 0.0 and torch.equal(basis[2], torch.zeros_like(basis[2]))


DETERMINISM_SHAPES = [
    pytest.param(9, 1009, 8, ANY, id="K9-D1009-r8"),
    pytest.param(9, 1_000_003, 8, GPU, id="K9-D1000003-r8"),
]


@pytest.mark.parametrize("K,D,rank,tier", DETERMINISM_SHAPES)
def test_orthogonalize_deterministic(backend, device, K, D, rank, tier):
    fits(backend, device, tier)
    basis, scales = orthonormal_basis(K, D, rank, torch.float16, device)
    sample = torch.randn(D, device=device)
    b1, s1 = basis.clone(), scales.clone()
    o1 = _ops.orthogonalize_(b1, s1, sample, rank, backend)
    o2 = _ops.orthogonalize_(basis, scales, sample, rank, backend)
    assert torch.equal(o1, o2) and torch.equal(b1, basis) and torch.equal(s1, scales)


@pytest.mark.parametrize("K,D,rank,tier", DETERMINISM_SHAPES)
@pytest.mark.parametrize("target", KERNEL_TARGETS, indirect=True)
def test_orthogonalize_agrees_with_other_backends(backend, device, K, D, rank, tier):
    fits(backend, device, tier)
    basis, scales = orthonormal_basis(K, D, rank, torch.float16, device)
    sample = torch.randn(D, device=device)
    b1, s1 = basis.clone(), scales.clone()
    o1 = _ops.orthogonalize_(b1, s1, sample, rank, backend)
    vnorm = sample.double().norm().item()
    eps = torch.finfo(torch.float16).eps
    for other in others(device, backend):
        b, s = basis.clone(), scales.clone()
        o = _ops.orthogonalize_(b, s, sample, rank, other)
        msg = f"{backend} vs {other}"
        torch.testing.assert_close(o1, o, atol=TOL[torch.float64][0] * vnorm, rtol=1e-10, msg=msg)
        torch.testing.assert_close(b1[rank].double(), b[rank].double(), atol=0.0, rtol=eps, msg=msg)
        torch.testing.assert_close(s1, s, atol=0.0, rtol=1e-6, msg=msg)


def test_orthogonalize_opcheck(backend, device):
    for layout in ["contiguous", "aligned-slice"]:
        basis, _ = basis_in_layout(4, 300, torch.float16, device, layout)
        dense, scales = orthonormal_basis(4, 300, 2, torch.float16, device)
        basis.copy_(dense)
        args = (basis, scales, torch.randn(300, device=device), 2)
        torch.library.opcheck(_ops.orthogonalize_, args, {"backend": backend})


def test_orthogonalize_bad_arguments_name_the_argument(backend, device):
    basis, scales = orthonormal_basis(3, 20, 2, torch.float16, device)
    with pytest.raises((RuntimeError, ValueError), match=r"rank must be in \[0, 3\]"):
        ops.orthogonalize_(basis, scales, torch.randn(20, device=device), 4, backend=backend)


# ------------------------------------------------------------------------------------------
# A basis sharded along D: the all_reduce hook between the passes (twa_kernels.distributed)


def shard_cuts(D, world):
    """The column ranges ``[a, b)`` of ``world`` shards of D columns (``sharded_orthogonalize``)."""
    S = -(-D // world)
    return [(r * S, min(D, (r + 1) * S)) for r in range(world)]


def sharded_orthogonalize(backend, basis, scales, sample, rank, world, shard_scales=None):
    """``orthogonalize_`` over ``world`` column shards, one thread per shard, their ``all_reduce``
    hooks meeting at a barrier (sum or max over the shards in shard order). Returns the
    per-shard results, the shards' rows side by side, and each shard's scales (``scales`` for
    each, or ``shard_scales``: an int8 basis's block scales, which are per shard)."""
    import threading

    cuts = shard_cuts(basis.shape[1], world)
    bases = [basis[:, a:b].contiguous() for a, b in cuts]
    shard_scales = [scales.clone() for _ in cuts] if shard_scales is None else shard_scales
    barrier = threading.Barrier(world, timeout=60)
    slots, outs, calls, errors = [None] * world, [None] * world, [[] for _ in cuts], []

    def hook(r):
        def all_reduce(t, op):
            calls[r].append((op, t.numel()))
            slots[r] = t.clone()
            barrier.wait()
            stacked = torch.stack(slots)
            combined = stacked.sum(0) if op == "sum" else stacked.amax(0)
            barrier.wait()  # every shard has read every slot before the next call refills them
            t.copy_(combined)

        return all_reduce

    def run(r):
        try:
            impl = _ops.route("orthogonalize_", backend, bases[r], rank)
            a, b = cuts[r]
            outs[r] = impl(bases[r], shard_scales[r], sample[a:b].contiguous(), rank, all_reduce=hook(r))
        except BaseException as e:  # noqa: BLE001 (re-raised in the test thread)
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return outs, torch.cat(bases, 1), shard_scales, calls


@pytest.mark.parametrize("K,D,rank", [(4, 1009, 3), (3, 300, 0), (6, 2000, 6)], ids=["r3", "r0", "full"])
@pytest.mark.parametrize("dtype", dtypes(FLOAT_STORAGE_DTYPES))
def test_orthogonalize_sharded_matches_one_process(backend, device, dtype, K, D, rank):
    """Three shards of a basis, combined only through the hook, give the unsharded results:
    the same coefficients and norms on every shard (fp64 sums in another order), the same
    stored row and one scale shared by all shards. The hook sees [P^T v, ||v||^2] and
    [P^T v1, ||v1||^2] (sums of rank + 1 values) and max|v1| (1 value)."""
    if backend == "triton" and device.type == "cpu":
        pytest.skip(
            "Triton's interpreter is not thread-safe; test_distributed runs it sharded over processes"
        )
    basis, scales = orthonormal_basis(K, D, rank, dtype, device)
    sample = torch.randn(D, device=device) + 0.5
    whole, whole_scales = basis.clone(), scales.clone()
    expected = _ops.orthogonalize_(whole, whole_scales, sample, rank, backend)
    outs, sharded, shard_scales, calls = sharded_orthogonalize(backend, basis, scales, sample, rank, world=3)
    vnorm = sample.double().norm().item()
    eps = torch.finfo(dtype).eps
    for out, s, seen in zip(outs, shard_scales, calls, strict=True):
        assert seen == [("sum", rank + 1), ("sum", rank + 1), ("max", 1)]
        torch.testing.assert_close(out, expected, atol=TOL[torch.float64][0] * vnorm, rtol=1e-10)
        torch.testing.assert_close(s, whole_scales, atol=0.0, rtol=1e-6)
        assert torch.equal(s, shard_scales[0])
    assert torch.equal(sharded[:rank], whole[:rank])
    torch.testing.assert_close(sharded.double(), whole.double(), atol=0.0, rtol=eps)


@pytest.mark.parametrize("K,D,rank", [(4, 1009, 3), (3, 300, 0), (6, 2000, 6)], ids=["r3", "r0", "full"])
@pytest.mark.parametrize("dtype", dtypes([torch.int8]))
def test_orthogonalize_sharded_int8_matches_the_oracle_per_shard(backend, device, dtype, K, D, rank):
    """Three shards of an int8 basis, each row stored in the shard's own 64-blocks (they start at
    the shard's first column, 337 and 674 of D = 1009 are not multiples of 64), combined only
    through the hook: every shard returns the CGS2 oracle's coefficients and norms on the
    concatenated P, and stores its columns of u quantised in its blocks with scales
    ``max|u| / (127 ||u||)`` (||u|| of the whole). So not bit-equal to one unsharded call, whose
    blocks fall elsewhere."""
    if backend == "triton" and device.type == "cpu":
        pytest.skip(
            "Triton's interpreter is not thread-safe; test_distributed runs it sharded over processes"
        )
    cuts = shard_cuts(D, 3)
    Q = torch.linalg.qr(torch.randn(D, max(rank, 1), dtype=torch.float64)).Q.T[:rank]
    parts, shard_scales = [], []
    for a, b in cuts:
        part, part_scales = orthonormal_basis(K, b - a, 0, dtype, device)
        for i in range(rank):
            q, amax = oracle.quantise_row(Q[i, a:b].to(device))
            part[i], part_scales[i] = q, (amax / oracle.QMAX).float()
        parts.append(part)
        shard_scales.append(part_scales)
    basis = torch.cat(parts, 1)
    before = [s.clone() for s in shard_scales]
    # The oracle on the shards' dequantised columns side by side (fp64 rows, scales 1).
    P = torch.cat([columns(p, s) for p, s in zip(parts, shard_scales, strict=True)], 1)
    sample = torch.randn(D, device=device) + 0.5
    ref, _, _ = cgs2_oracle(P, torch.ones(K, device=device), sample, rank)
    u = sample.double() - P[:rank].T @ ref[:rank]
    outs, sharded, shard_scales, calls = sharded_orthogonalize(
        backend, basis, None, sample, rank, world=3, shard_scales=shard_scales
    )
    vnorm = sample.double().norm().item()
    assert torch.equal(sharded[:rank], basis[:rank]) and torch.equal(sharded[rank + 1 :], basis[rank + 1 :])
    for out, s, s0, seen, (a, b) in zip(outs, shard_scales, before, calls, cuts, strict=True):
        assert seen == [("sum", rank + 1), ("sum", rank + 1), ("max", 1)]
        torch.testing.assert_close(out, ref, atol=TOL[torch.float64][0] * vnorm, rtol=1e-10)
        if rank == K:
            assert torch.equal(s, s0)
            continue
        assert torch.equal(s[:rank], s0[:rank]) and torch.equal(s[rank + 1 :], s0[rank + 1 :])
        row, amax = oracle.quantise_row(u[a:b])
        assert (sharded[rank, a:b].int() - row.int()).abs().max().item() <= 1
        torch.testing.assert_close(s[rank], (amax / (oracle.QMAX * ref[rank])).float(), atol=0.0, rtol=1e-6)


@pytest.mark.parametrize("dtype", dtypes(FLOAT_STORAGE_DTYPES))
def test_orthogonalize_identity_hook_changes_no_bit(backend, device, dtype):
    """With one shard the hook is the identity: results bit-identical to the op without it
    (the kernels fold and finish in separate launches then, on the same numbers)."""
    basis, scales = orthonormal_basis(5, 1009, 4, dtype, device)
    sample = torch.randn(1009, device=device)
    b1, s1 = basis.clone(), scales.clone()
    o1 = _ops.orthogonalize_(b1, s1, sample, 4, backend)
    seen = []
    impl = _ops.route("orthogonalize_", backend, basis, 4)
    o2 = impl(basis, scales, sample, 4, all_reduce=lambda t, op: seen.append((op, t.dtype, t.device)))
    assert seen == [
        ("sum", torch.float64, device),
        ("sum", torch.float64, device),
        ("max", torch.float64, device),
    ]
    assert torch.equal(o1, o2) and torch.equal(b1, basis) and torch.equal(s1, scales)


# ------------------------------------------------------------------------------------------
# Backend-specific


def test_orthogonalize_remainder_tiles_bounded():
    """Triton only (a property of its tiling helper, no kernel run): pass 2 must hold one
    bounded tile of P whatever the rank: <= 4096 fp64 values in registers, the K tiles covering
    [0, R) with less than one tile of padding, and the [R, BLOCK_D] slab it reads twice within
    64 KB unless BLOCK_D is at its 32-column floor."""
    pytest.importorskip("triton")
    from twa_kernels._triton.orthogonalize import _remainder_blocks

    for size in (1, 2, 4):
        for R in range(1, 513):
            nt, block_k, block_d = _remainder_blocks(R, size)
            # int8: 64 bytes of a tile per thread too ([64, 128] at 4 warps), two whole scale
            # blocks per slab row.
            assert block_k * block_d * size <= 8192 if size == 1 else block_k * block_d <= 4096, (R, size)
            assert size != 1 or block_d == 128, R
            assert R <= nt * block_k < max(R, 16) * 2, (R, size)
            assert block_d == 32 or R * block_d * size <= 64 * 1024, (R, size)
            assert block_d & (block_d - 1) == 0 and nt & (nt - 1) == 0, (R, size)


needs_cuda_kernels = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernels: GPU only")
CUDA_INT8_SHAPES = [
    (1, 1, 0),
    (2, 37, 1),
    (2, 65, 1),
    (4, 1009, 3),
    (38, 4099, 37),
    (302, 4099, 301),
    (3, 1_000_003, 2),
]


@needs_cuda_kernels
@pytest.mark.parametrize("layout", ["padded", "odd-slice"])
@pytest.mark.parametrize(
    "K,D,rank", CUDA_INT8_SHAPES, ids=[f"K{k}-D{d}-r{r}" for k, d, r in CUDA_INT8_SHAPES]
)
def test_cuda_orthogonalize_int8_called_directly(K, D, rank, layout):
    """CUDA only, its int8 kernels called directly (``_cuda``) against the reference on the same
    stored rows: rows 16-byte aligned ("padded": 16-byte loads over 4096-column tiles, masked
    tails) or not sharing a phase ("odd-slice": masked byte loads throughout), block scales a
    column slice of a wider tensor (NaN past them, never read). Coefficients and norms within
    1e-9 of the reference's fp64; the new row's bytes equal up to a rounding tie (|dq| <= 1 at
    a few places); its block scales within 1e-6; nothing else written; the phased path with an
    identity hook gives the same bits."""
    from twa_kernels import _cuda

    dense, dense_scales = orthonormal_basis(K, D, rank, torch.int8, "cuda")
    blocks = dense_scales.shape[1]

    def fresh():
        basis, storage = basis_in_layout(K, D, torch.int8, "cuda", layout, fill=7)
        basis.copy_(dense)
        wide = torch.full((K, blocks + 3), float("nan"), device="cuda")
        wide[:, :blocks] = dense_scales
        return basis, storage, wide

    sample = torch.randn(D, device="cuda") + 0.5
    ref_basis, ref_scales = dense.clone(), dense_scales.clone()
    ref = reference.orthogonalize_(ref_basis, ref_scales, sample, rank)

    basis, storage, wide = fresh()
    before, wide_before = storage.clone(), wide.clone()
    out = _cuda.orthogonalize_(basis, wide[:, :blocks], sample, rank)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9 * ref[-1].item())
    outside = torch.ones_like(storage, dtype=torch.bool)
    if rank < K:
        dq = basis[rank].int() - ref_basis[rank].int()
        assert dq.abs().max().item() <= 1 and dq.count_nonzero().item() <= max(1, D // 1000)
        torch.testing.assert_close(wide[rank, :blocks], ref_scales[rank], rtol=1e-6, atol=0.0)
        outside[rank, basis.storage_offset() : basis.storage_offset() + D] = False
    assert torch.equal(storage[outside], before[outside]), "wrote outside row rank"
    rows = [i for i in range(K) if i != rank]
    assert torch.equal(wide[rows, :blocks], wide_before[rows, :blocks]), "wrote other rows' scales"
    assert bool(wide[:, blocks:].isnan().all()), "wrote past the scales"

    b1, _, w1 = fresh()
    b2, _, w2 = fresh()
    o1 = _cuda.orthogonalize_(b1, w1[:, :blocks], sample, rank)
    o2 = _cuda.orthogonalize_(b2, w2[:, :blocks], sample, rank, all_reduce=lambda t, op: None)
    assert torch.equal(o1, o2) and torch.equal(b1, b2) and torch.equal(w1[:, :blocks], w2[:, :blocks])
