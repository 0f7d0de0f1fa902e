"""Every op and the fused step on a basis of more than 2^31 elements, on a GPU.

k x D passes 2^31 at real sizes: ResNet-50 has D = 25,557,032 weights, and k = 96 rows make
2.45e9 elements (4.9 GB in fp16). A kernel that forms an address from a 32-bit product (a row
index times the row stride) reads or writes the wrong place from row 84 on (row 84 holds
element 2^31); tests at small sizes cannot see it.

Cheap in memory and time: the basis is zero except on four slices of 4096 columns of every row
(the first columns, the 4096 around element 2^31 of row 84, the middle, the last columns), and x,
w0, the sample and the gradients are zero outside the same columns. Every result is then known
from the [96, 16384] matrix of those columns alone, checked against the fp64 oracles of
oracle.py, while the kernels still stream the whole basis. The basis is a view of a larger
buffer filled with a sentinel: the padding at the end of every row and a guard region after the
last row must keep it, and no entry outside the slices may change.

Needs a CUDA device with about 8 GiB free; skips otherwise. ``benchmarks/gpu_check.sh`` runs
it as its own stage.
"""

import pytest
import torch
from conftest import DEVICES, TOL
from oracle import assert_within, cgs2_oracle, columns, sgd_oracle

from twa_kernels import _backend, ops
from twa_kernels._steps import Hyper
from twa_kernels.reference import ROW_AMAX

K, D = 96, 25_557_032
LD = ops.ROW_ALIGN * -(-D // ops.ROW_ALIGN)  # as ops.empty_basis pads the rows
SLICE = 4096
GUARD = 1 << 20  # elements after the last row
SENTINEL = 1234.0  # exact in fp16
RANK = K - 1  # orthogonalize_ stores row 95, whose elements all lie past 2^31
NEED_BYTES = 8 << 30
CROSS_ROW = 2**31 // LD  # the row holding element 2^31 (84)

assert K * D > 2**31 and CROSS_ROW < RANK


def _free_bytes() -> int:
    return torch.cuda.mem_get_info()[0]


def _skip_reason() -> str | None:
    if "cuda" not in DEVICES or not torch.cuda.is_available():
        return "needs a CUDA device (none visible or TWA_TEST_DEVICE=cpu)"
    free = _free_bytes()
    if free < NEED_BYTES:
        return f"needs {NEED_BYTES / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.1f} GiB free"
    return None


def _slice_starts() -> list[int]:
    cross = 2**31 - CROSS_ROW * LD  # column of element 2^31 in row 84
    return [0, cross - SLICE // 2, D // 2 - SLICE // 2 + 3, D - SLICE]


class Big:
    """The buffer, the basis view in it, the slice columns and what the checks need."""

    def __init__(self, device):
        self.device = device
        self.buf = torch.full((K * LD + GUARD,), SENTINEL, dtype=torch.float16, device=device)
        self.basis = self.buf[: K * LD].view(K, LD)[:, :D]
        self.basis.zero_()
        starts = _slice_starts()
        assert all(b - a >= SLICE for a, b in zip(starts, starts[1:], strict=False))
        self.cols = torch.cat([torch.arange(s, s + SLICE, device=device) for s in starts])
        self.scales = torch.zeros(K, device=device)
        # Rows [0, RANK): orthonormal on the slice columns (fp64 QR), stored as orthogonalize_
        # stores rows (largest entry ROW_AMAX) with their scales.
        Q = torch.linalg.qr(torch.randn(self.cols.numel(), RANK, dtype=torch.float64, device=device)).Q.T
        amax = Q.abs().amax(dim=1)
        self.basis[:RANK, self.cols] = (Q * (ROW_AMAX / amax)[:, None]).float().half()
        self.scales[:RANK] = (amax / ROW_AMAX).float()

    def sparse(self, dtype=torch.float32, rows=()):
        """A [D] (or [rows, D]) vector, random on the slice columns and zero elsewhere."""
        shape = (*rows, D)
        v = torch.zeros(shape, dtype=dtype, device=self.device)
        v[..., self.cols] = (torch.randn(*rows, self.cols.numel(), device=self.device) + 0.5).to(dtype)
        return v

    def compact(self):
        """The basis's slice columns, [K, 16384], as stored."""
        return self.basis[:, self.cols]

    def reset_last_row(self):
        self.basis[RANK].zero_()
        self.scales[RANK] = 0.0

    def assert_untouched_outside(self, what):
        """Padding and guard hold the sentinel; every row is zero outside the slice columns."""
        sentinel = torch.tensor(SENTINEL, dtype=torch.float16).view(torch.int16).item()
        pad = self.buf[: K * LD].view(K, LD)[:, D:]
        assert (pad.view(torch.int16) == sentinel).all(), f"{what}: wrote into the row padding"
        assert (self.buf[K * LD :].view(torch.int16) == sentinel).all(), f"{what}: wrote past the basis"
        for r in range(K):
            outside = torch.count_nonzero(self.basis[r]) - torch.count_nonzero(self.basis[r, self.cols])
            assert outside.item() == 0, f"{what}: row {r} changed outside the slice columns"


@pytest.fixture(scope="module")
def big():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    state = Big(torch.device("cuda"))
    yield state
    del state
    torch.cuda.empty_cache()


def _backend_or_skip(backend):
    if backend == "triton" and not _backend.triton_available():
        pytest.skip("triton does not import")
    if backend == "cuda":
        from twa_kernels import _cuda

        _cuda.load()  # a build failure is an error, not a skip


def _zero_outside(v, cols, what):
    rest = v.clone()
    rest[..., cols] = 0
    assert torch.count_nonzero(rest).item() == 0, f"{what}: nonzero outside the slice columns"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_ops_past_2_31_elements(big, backend):
    _backend_or_skip(backend)
    cols = big.cols
    big.reset_last_row()

    # orthogonalize_ reads rows [0, 95) and stores row 95 (elements 2.43e9 .. 2.45e9).
    before, scales_before = big.compact().clone(), big.scales.clone()
    sample = big.sparse()
    out = ops.orthogonalize_(big.basis, big.scales, sample, RANK, backend)
    ref, row, scale = cgs2_oracle(before, scales_before, sample[cols], RANK)
    atol, rtol = TOL[torch.float64]
    torch.testing.assert_close(out, ref, atol=atol * sample.double().norm().item(), rtol=rtol)
    stored = big.basis[RANK, cols]
    assert stored.abs().max().item() > 0, "orthogonalize_ stored nothing in the last row"
    eps = torch.finfo(torch.float16).eps
    torch.testing.assert_close(stored.double(), row.double(), atol=0.0, rtol=eps)
    torch.testing.assert_close(big.scales[RANK], scale, atol=0.0, rtol=1e-6)
    assert torch.equal(big.compact()[:RANK], before[:RANK])
    assert torch.equal(big.scales[:RANK], scales_before[:RANK])
    big.assert_untouched_outside(f"orthogonalize_ ({backend})")

    # project: one vector and a batch of two, all 96 rows (row 95 as just stored).
    P = columns(big.compact(), big.scales)
    for shape in ((), (2,)):
        x = big.sparse(rows=shape)
        c = ops.project(big.basis, big.scales, x, backend)
        assert c.shape == (*shape, K)
        xs = x[..., cols].double()
        assert_within(c, xs @ P.T, xs.abs() @ P.abs().T, TOL[torch.float32], f"project {shape} ({backend})")

    # reconstruct_: the slice columns against the oracle, zero elsewhere.
    w0, alpha = big.sparse(), torch.randn(K, device=big.device)
    out = torch.full((D,), float("nan"), device=big.device)
    ops.reconstruct_(out, w0, big.basis, big.scales, alpha, backend)
    expected = w0[cols].double() + alpha.double() @ P
    scale = w0[cols].double().abs() + alpha.double().abs() @ P.abs()
    assert_within(out[cols], expected, scale, TOL[torch.float32], f"reconstruct_ ({backend})")
    _zero_outside(out, cols, f"reconstruct_ ({backend})")

    # subspace_step_ (K-dimensional: no basis addresses, here for completeness of the four ops).
    gram = (P @ P.T).float()
    state = [torch.zeros(K, device=big.device) for _ in range(2)]
    counters = torch.zeros(2, dtype=torch.int64, device=big.device)
    pw0 = (P @ w0[cols].double()).float()
    hyper = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True)
    ops.subspace_step_(state[0], state[1], counters, c[0], gram, pw0, **hyper, backend=backend)
    want, *_ = sgd_oracle((torch.zeros(K, dtype=torch.float64, device=big.device), None, 0, 0),
                          c[0], gram, pw0, **hyper)  # fmt: skip
    torch.testing.assert_close(state[0].double(), want, atol=1e-6, rtol=1e-5)
    assert counters.tolist() == [1, 0]

    big.assert_untouched_outside(f"all ops ({backend})")


def test_fused_step_past_2_31_elements(big):
    _backend_or_skip("triton")
    from twa_kernels._triton.step import fused_twa_step

    cols = big.cols
    big.basis[RANK, cols] = (torch.randn(cols.numel(), device=big.device) * ROW_AMAX / 4).half()
    big.scales[RANK] = 1.0 / ROW_AMAX
    # Three parameters (fp32, bf16, fp32) of awkward sizes; the bf16 one holds no slice column.
    first = D // 3 + 1
    sizes = [first, 1031, D - first - 1031]
    assert not ((cols >= first) & (cols < first + 1031)).any()
    dtypes = [torch.float32, torch.bfloat16, torch.float32]
    params = [torch.full((n,), 7.0, dtype=t, device=big.device) for n, t in zip(sizes, dtypes, strict=True)]
    g = big.sparse()
    for p, chunk in zip(params, g.split(sizes), strict=True):
        p.grad = chunk.to(p.dtype)
    w0 = big.sparse()
    alpha, buf = torch.zeros(K, device=big.device), torch.zeros(K, device=big.device)
    counters = torch.zeros(2, dtype=torch.int64, device=big.device)
    gram, pw0 = torch.zeros(K, K, device=big.device), torch.zeros(K, device=big.device)
    lr = 0.5
    fused_twa_step(
        params, w0, big.basis, big.scales, alpha, buf, counters, gram, pw0,
        Hyper(torch.tensor(lr, device=big.device), 0.0, 0.0, 0.0, False),
    )  # fmt: skip
    assert counters.tolist() == [1, 0]
    P = columns(big.compact(), big.scales)
    gs = g[cols].double()
    assert_within(alpha, -lr * (P @ gs), lr * (P.abs() @ gs.abs()), TOL[torch.float32], "fused step alpha")
    w = torch.cat([p.double() for p in params])
    expected = w0[cols].double() + alpha.double() @ P
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(w[cols], expected, atol=atol, rtol=rtol)
    _zero_outside(w, cols, "fused step")
    big.assert_untouched_outside("fused step")
