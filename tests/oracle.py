"""fp64 oracles of the twa:: ops, written from the math, independent of the package's code."""

import torch


def columns(basis, scales):
    """P as fp64 [K, D] rows: P[i] = scales[i] * basis[i]."""
    return basis.double() * scales.double()[:, None]


def project(basis, scales, x):
    return x.double() @ columns(basis, scales).T


def reconstruct(w0, basis, scales, alpha):
    return w0.double() + alpha.double() @ columns(basis, scales)


def make_basis(K, D, dtype, generator=None):
    """Random rows of unit norm stored in ``dtype`` with scales (entries ~1 stored)."""
    raw = torch.randn(K, D, generator=generator, dtype=torch.float64)
    norms = raw.norm(dim=1, keepdim=True)
    amax = (raw / norms).abs().amax(dim=1)
    basis = (raw / norms / amax[:, None]).to(dtype)
    return basis, amax.float()
