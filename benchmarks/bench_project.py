"""``project``: c = P^T x for x [D] and a batch [B, D]; floor 2KD + 4BD bytes (fp16 basis),
1.0625KD + 4BD (int8 basis: the backend providers' ``-int8`` cases)."""

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
from .shapes import Shape, make_inputs, project_bytes


def pytest_generate_tests(metafunc):
    parametrize_cases(metafunc, PROVIDERS, batched=True)


def naive_project(P: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A user's projection with a dense fp32 P [K, D]."""
    return torch.mv(P, x) if x.dim() == 1 else x @ P.T


def fp16_upcast_project(basis, scales, x):
    """A user's projection with an fp16 basis: upcast it whole on every call (4KD more bytes)."""
    P = basis.float()
    return (torch.mv(P, x) if x.dim() == 1 else x @ P.T) * scales


def make_call(provider: str, inp: dict):
    basis, scales, x = inp["basis"], inp["scales"], inp["x"]
    if provider == "naive-fp32":
        return lambda: naive_project(basis, x)
    if provider == "naive-fp16-upcast":
        return lambda: fp16_upcast_project(basis, scales, x)
    return lambda: ops.project(basis, scales, x, backend=provider)


def check_close(result: torch.Tensor, expected: torch.Tensor) -> None:
    # Same P, fp32 accumulation in another order: within the tests' fp16 rtol (1e-3).
    err = (result - expected).norm() / expected.norm()
    assert err < 1e-3, f"relative error {err:.2e}"


def test_project(benchmark, device, copy_bw, shape: Shape, provider: str, basis: str):
    # The fp16 basis, plus the fp32 one derived from it or the upcast, plus x and the result.
    need = 2 * shape.K * shape.D + 8 * shape.B * shape.D
    dtype, inp = prepare_case(benchmark, "project", provider, shape, device, need, basis)
    call = make_call(provider, inp)
    run(benchmark, call, device)
    record(
        benchmark,
        op="project",
        provider=provider,
        shape=shape,
        basis=dtype,
        copy_bw=copy_bw,
        nbytes=project_bytes(shape, dtype),
        floor_bytes=project_bytes(shape, floor_dtype(dtype)),
    )
    if provider != "torch":
        # int8: against the reference over the same int8 basis (the fp16 one is another P).
        ref = inp if dtype == torch.int8 else make_inputs(shape, torch.float16, device)
        check_close(call(), ops.project(ref["basis"], ref["scales"], ref["x"], backend="torch"))
