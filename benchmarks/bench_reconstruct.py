"""``reconstruct_``: w = w0 + P alpha into an fp32 w; floor 2KD + 8D bytes (fp16 basis),
1.0625KD + 8D (int8 basis: the backend providers' ``-int8`` cases)."""

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
from .shapes import Shape, make_inputs, reconstruct_bytes


def pytest_generate_tests(metafunc):
    parametrize_cases(metafunc, PROVIDERS)


def make_call(provider: str, inp: dict):
    basis, scales, w0, alpha, out = (inp[k] for k in ("basis", "scales", "w0", "alpha", "out"))
    if provider == "naive-fp32":
        # A user's reconstruction with a dense fp32 P [K, D], written into the weights' buffer.
        return lambda: torch.addmv(w0, basis.T, alpha, out=out)
    if provider == "naive-fp16-upcast":
        return lambda: torch.addmv(w0, basis.float().T, alpha * scales, out=out)
    return lambda: ops.reconstruct_(out, w0, basis, scales, alpha, backend=provider)


def test_reconstruct(benchmark, device, copy_bw, shape: Shape, provider: str, basis: str):
    need = 2 * shape.K * shape.D + 12 * shape.D
    dtype, inp = prepare_case(benchmark, "reconstruct_", provider, shape, device, need, basis)
    call = make_call(provider, inp)
    run(benchmark, call, device)
    record(
        benchmark,
        op="reconstruct",
        provider=provider,
        shape=shape,
        basis=dtype,
        copy_bw=copy_bw,
        nbytes=reconstruct_bytes(shape, dtype),
        floor_bytes=reconstruct_bytes(shape, floor_dtype(dtype)),
    )
    if provider != "torch":
        got = inp["out"].clone()
        # int8: against the reference over the same int8 basis (the fp16 one is another P).
        if dtype == torch.int8:
            ref = dict(inp, out=torch.empty_like(got))
        else:
            ref = make_inputs(shape, torch.float16, device)
        ops.reconstruct_(ref["out"], ref["w0"], ref["basis"], ref["scales"], ref["alpha"], backend="torch")
        err = ((got - ref["out"]).norm() / ref["out"].norm()).item()
        assert err < 1e-5, f"relative error {err:.2e}"
