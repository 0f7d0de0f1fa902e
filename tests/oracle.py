"""fp64 oracles of the twa:: ops, written from the math, independent of the package's code.

The only values taken from the package are ROW_AMAX, the storage contract of float basis rows
(orthogonalize_ stores each new row scaled so its largest entry is about ROW_AMAX), and the int8
format: one fp32 scale per QUANT_BLOCK = 64 values of a row, stored values in [-127, 127]. Every oracle
works on the *stored* basis values upcast to fp64, so a kernel compared with one is allowed only
its own accumulation error and final rounding, not the rounding of the basis itself.
"""

import torch

from twa_kernels import ops
from twa_kernels.reference import ROW_AMAX

QUANT_BLOCK = 64
QMAX = 127


def is_int8(basis):
    return basis.dtype == torch.int8


def columns(basis, scales):
    """P as fp64 [K, D] rows: P[i] = scales[i] * basis[i] (float storage), or
    P[i, j] = scales[i, j // 64] * basis[i, j] (int8 storage, scales [K, ceil(D / 64)])."""
    if is_int8(basis):
        per_value = scales.double().repeat_interleave(QUANT_BLOCK, dim=1)[:, : basis.shape[1]]
        return basis.double() * per_value
    return basis.double() * scales.double()[:, None]


def block_count(D):
    return -(-D // QUANT_BLOCK)


def quantise_row(u):
    """fp64 ``u`` [D] as int8 values and the block maxima: each block of 64 values divided by
    its max |u| / 127 and rounded to nearest (ties to even)."""
    D = u.numel()
    q = torch.zeros(D, dtype=torch.int8)
    amax = torch.zeros(block_count(D), dtype=torch.float64)
    for b in range(block_count(D)):
        block = u[b * QUANT_BLOCK : (b + 1) * QUANT_BLOCK].cpu()
        amax[b] = block.abs().max()
        if amax[b] > 0:
            q[b * QUANT_BLOCK : (b + 1) * QUANT_BLOCK] = torch.round(block * (QMAX / amax[b])).to(torch.int8)
    return q.to(u.device), amax.to(u.device)


def project(basis, scales, x):
    return x.double() @ columns(basis, scales).T


def reconstruct(w0, basis, scales, alpha):
    return w0.double() + alpha.double() @ columns(basis, scales)


def make_basis(K, D, dtype, generator=None):
    """Random rows of unit norm stored in ``dtype`` with scales (entries ~1 stored)."""
    raw = torch.randn(K, D, generator=generator, dtype=torch.float64)
    norms = raw.norm(dim=1, keepdim=True)
    if dtype == torch.int8:
        rows = [quantise_row(r) for r in raw / norms]
        return torch.stack([q for q, _ in rows]), torch.stack([a / QMAX for _, a in rows]).float()
    amax = (raw / norms).abs().amax(dim=1)
    basis = (raw / norms / amax[:, None]).to(dtype)
    return basis, amax.float()


def basis_in_layout(K, D, dtype, device, layout="contiguous", fill=0.0):
    """``(basis [K, D], storage)``: a view of a larger storage (filled with ``fill``) in a layout.

    - "contiguous": [K, D];
    - "aligned-slice": columns [3, 3 + D) of a [K, ld] tensor with ld a multiple of 16 elements,
      so every row starts 3 elements past a 16-byte boundary (vector loads after a head);
    - "odd-slice": columns [1, 1 + D) of a [K, ld] tensor with ld = 1 (mod 8): the rows do not
      share an alignment phase (scalar loads only);
    - "padded": what ``ops.empty_basis`` returns (rows 128-byte aligned, ld a multiple of 64);
    - an int ``wide`` > 0: columns [wide // 2, wide // 2 + D) of a [K, D + wide] tensor, i.e.
      rows strided by D + wide.
    """
    if layout == "contiguous":
        offset, ld = 0, D
    elif layout == "aligned-slice":
        offset, ld = 3, 16 * ((D + 3 + 15) // 16)
    elif layout == "odd-slice":
        offset, ld = 1, 8 * ((D + 1 + 7) // 8) + 1
    elif layout == "padded":
        offset, ld = 0, ops.ROW_ALIGN * -(-D // ops.ROW_ALIGN)
    elif isinstance(layout, int) and not isinstance(layout, bool) and layout > 0:
        offset, ld = layout // 2, D + layout
    else:
        raise ValueError(f"unknown basis layout {layout!r}")
    storage = torch.full((K, ld), fill, dtype=dtype, device=device)
    return storage[:, offset : offset + D], storage


def random_scales(K, D, dtype, device):
    """fp32 scales of a random stored basis: [K] near 1 / ROW_AMAX (float), or [K, ceil(D / 64)]
    near 1 / QMAX (int8), each block its own."""
    if dtype == torch.int8:
        return torch.rand(K, block_count(D), device=device) / QMAX + 1e-5
    return torch.rand(K, device=device) / ROW_AMAX + 1e-5


def random_basis(K, D, dtype, device, layout="contiguous"):
    """Rows with entries ~ROW_AMAX (as stored rows are) and fp32 scales, in a chosen layout
    (see ``basis_in_layout``)."""
    basis, _ = basis_in_layout(K, D, dtype, device, layout)
    if dtype == torch.int8:
        basis.copy_(torch.randint(-QMAX, QMAX + 1, (K, D), device=device).to(dtype))
    else:
        basis.copy_((torch.randn(K, D, device=device) * ROW_AMAX / 4).to(dtype))
    return basis, random_scales(K, D, dtype, device)


def orthonormal_basis(K, D, rank, dtype, device):
    """Rows [0, rank) orthonormal (fp64 QR), stored like orthogonalize_ stores rows."""
    basis = torch.zeros(K, D, dtype=dtype, device=device)
    scales = torch.zeros(K, device=device)
    if rank and dtype == torch.int8:
        scales = torch.zeros(K, block_count(D), device=device)
        Q = torch.linalg.qr(torch.randn(D, rank, dtype=torch.float64, device=device)).Q.T
        for i in range(rank):
            q, amax = quantise_row(Q[i])
            basis[i], scales[i] = q, (amax / QMAX).float()
        return basis, scales
    if dtype == torch.int8:
        return basis, torch.zeros(K, block_count(D), device=device)
    if rank:
        Q = torch.linalg.qr(torch.randn(D, rank, dtype=torch.float64, device=device)).Q.T
        amax = Q.abs().amax(dim=1)
        basis[:rank] = (Q * (ROW_AMAX / amax)[:, None]).float().to(dtype)
        scales[:rank] = (amax / ROW_AMAX).float()
    return basis, scales


def assert_within(actual, expected, scale, tol, what):
    """|actual - expected| <= atol + rtol * scale elementwise (scale: sum of |terms|)."""
    atol, rtol = tol
    err = (actual.double() - expected).abs()
    bound = atol + rtol * scale
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"{what}: error {err.max().item():.3g} is {worst:.3g} x the bound"


def sgd_oracle(state, c, gram, pw0, lr, momentum, dampening, weight_decay, nesterov):
    """torch.optim.SGD's update on the coordinates, fp64, with the skip of non-finite steps.

    ``state`` is (alpha, buf, taken, skipped); the same tuple after the step is returned.
    """
    alpha, buf, taken, skipped = state
    if not torch.isfinite(c).all():
        return alpha, buf, taken, skipped + 1
    d = c.double()
    if weight_decay != 0:
        d = d + weight_decay * (pw0.double() + gram.double() @ alpha)
    if momentum != 0:
        buf = d.clone() if taken == 0 else momentum * buf + (1 - dampening) * d
        d = d + momentum * buf if nesterov else buf
    return alpha - lr * d, buf, taken + 1, skipped


def cgs2_oracle(basis, scales, v, rank):
    """CGS2 in fp64 on the stored rows, with the formulas of the op's contract.

    Returns ([h; ||u||; ||v||], the row orthogonalize_ stores at ``rank``, its scale).
    """
    P = columns(basis[:rank], scales[:rank])
    v = v.double()
    c1 = P @ v
    v1 = v - P.T @ c1
    c2 = P @ v1
    h = c1 + c2
    norm = (v1 @ v1 - c2 @ c2).clamp_min(0).sqrt()
    amax = v1.abs().max()
    u = v - P.T @ h
    out = torch.cat([h, norm.view(1), v.norm().view(1)])
    if is_int8(basis):
        row, block_amax = quantise_row(u)
        return out, row, (block_amax / (QMAX * norm)).float()
    limit = torch.finfo(basis.dtype).max
    row = (u * (ROW_AMAX / amax)).clamp(-limit, limit).float().to(basis.dtype)
    scale = (amax / (ROW_AMAX * norm)).float()
    return out, row, scale


def check_orthogonalize(backend, basis, scales, sample, rank, storage=None):
    """Run ``orthogonalize_`` on ``backend`` and check it against ``cgs2_oracle``.

    The coefficients and norms within TOL[float64] of ||v|| (fp64 accumulation over D values of size
    ~1 covers D * 2^-53 with room); the stored row within 1 ulp of the oracle's (the two fp64
    sums can straddle a rounding boundary); rows and scales other than ``rank`` untouched, and
    with ``storage`` (the tensor ``basis`` is a view of) nothing outside the view written.
    """
    from conftest import TOL

    from twa_kernels import _ops

    K = basis.shape[0]
    before, scales_before = basis.clone(), scales.clone()
    storage_before = None if storage is None else storage.clone()
    out = _ops.orthogonalize_(basis, scales, sample, rank, backend)
    ref, row, scale = cgs2_oracle(before, scales_before, sample, rank)
    assert out.dtype == torch.float64 and out.shape == (rank + 2,)
    vnorm = sample.double().norm().item()
    atol, rtol = TOL[torch.float64]
    torch.testing.assert_close(out, ref, atol=atol * vnorm, rtol=rtol)
    assert torch.equal(basis[:rank], before[:rank]) and torch.equal(scales[:rank], scales_before[:rank])
    if rank < K and is_int8(basis):
        # The fp64 remainders of two backends differ in their last bits: a value within that
        # of a rounding tie may round to the neighbouring integer (a step of 1 in 127).
        assert (basis[rank].int() - row.int()).abs().max().item() <= 1
        torch.testing.assert_close(scales[rank], scale, atol=0.0, rtol=1e-6)
        assert torch.equal(basis[rank + 1 :], before[rank + 1 :])
    elif rank < K:
        eps = torch.finfo(basis.dtype).eps
        torch.testing.assert_close(basis[rank].double(), row.double(), atol=0.0, rtol=eps)
        torch.testing.assert_close(scales[rank], scale, atol=0.0, rtol=1e-6)
        assert torch.equal(basis[rank + 1 :], before[rank + 1 :])
    else:
        assert torch.equal(basis, before) and torch.equal(scales, scales_before)
    if storage is not None:
        # Every storage entry outside the view is as it was.
        changed = storage != storage_before
        start = (basis.data_ptr() - storage.data_ptr()) // basis.element_size()
        changed[:, start : start + basis.shape[1]] = False
        assert not changed.any(), "orthogonalize_ wrote outside the basis view"
