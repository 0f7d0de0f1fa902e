"""``orthogonalize_``: CGS2 of a sample against K - 1 stored rows, stored as row K - 1.

Floor: three passes over the K - 1 rows and the sample, one row written (``shapes``; an int8
case's own, with the block scales read and written). The naive providers are CGS2 as a user
writes it over a dense P: four passes (P v, P^T c, P v1, P^T c2).
"""

from __future__ import annotations

import torch

from twa_kernels import ops

from .harness import (
    PROVIDERS,
    floor_dtype,
    parametrize_cases,
    prepare_case,
    record,
    run,
)
from .shapes import (
    Shape,
    orthogonalize_bytes,
    restore_row,
)


def pytest_generate_tests(metafunc):
    parametrize_cases(metafunc, PROVIDERS)


def naive_cgs2_(P: torch.Tensor, v: torch.Tensor, rank: int) -> torch.Tensor:
    """Two rounds of classical Gram-Schmidt in fp32 with a dense P; row ``rank`` gets the rest."""
    Q = P[:rank]
    c1 = torch.mv(Q, v)
    v1 = v - torch.mv(Q.T, c1)
    c2 = torch.mv(Q, v1)
    u = v1 - torch.mv(Q.T, c2)
    norm = u.norm()
    P[rank] = u / norm
    return torch.cat([c1 + c2, norm.view(1)])


def make_call(provider: str, inp: dict, rank: int):
    basis, scales, sample = inp["basis"], inp["scales"], inp["sample"]
    if provider == "naive-fp32":
        return lambda: naive_cgs2_(basis, sample, rank)
    if provider == "naive-fp16-upcast":

        def upcast():
            P = basis.float().mul_(scales[:, None])
            coef = naive_cgs2_(P, sample, rank)
            basis[rank] = P[rank]
            return coef

        return upcast
    return lambda: ops.orthogonalize_(basis, scales, sample, rank, backend=provider)


def test_orthogonalize(benchmark, device, copy_bw, shape: Shape, provider: str, basis: str):
    rank = shape.K - 1
    need = 2 * shape.K * shape.D + 16 * shape.D
    dtype, inp = prepare_case(benchmark, "orthogonalize_", provider, shape, device, need, basis)
    call = make_call(provider, inp, rank)
    try:
        run(benchmark, call, device)
    finally:
        # The op overwrites row K - 1 of the basis the other benchmarks share: put it back.
        restore_row(shape.D, shape.K, rank, device)
    record(
        benchmark,
        op="orthogonalize",
        provider=provider,
        shape=shape,
        basis=dtype,
        copy_bw=copy_bw,
        nbytes=orthogonalize_bytes(shape, dtype),
        floor_bytes=orthogonalize_bytes(shape, floor_dtype(dtype)),
    )
