"""The whole TWA step, ``TWA.step()`` after ``backward()``, against the published code's step.

Floor: two passes over P plus the gradients in, w0 in and the weights out: 2 * 2KD + 12D bytes
for an fp16 basis (2 * 1.0625KD + 12D for an int8 one), moved at the copy bandwidth measured in
the same process; ``x_floor`` is the step's time over that (``harness``). Providers:
``published`` (fp32 P, torch.cat, two torch.mm, grads cloned, torch.optim.SGD), ``torch-fp32``
(TWA over an fp32 basis, reference backend), and ``torch``, ``triton``, ``cuda`` (TWA over an
fp16 basis with that backend; the ``-int8`` cases over an int8 basis, the same P quantised with
one scale per 64 values: ``shapes``).

``test_step_granularity`` times the step with per-tensor coefficients (``granularity="tensor"``:
one coefficient vector per tensor, the fused per-block step) beside the published one vector, on
ResNet-50's 161 tensors (K = 32, fp16 basis); the same bytes move, the target is within 1.1x.

``test_step_fp16_vs_fp32`` measures DESIGN's CPU target (a step over an fp16 basis within 1.5x
of the same step over an fp32 basis) with the two steps interleaved round by round, so that the
ratio survives a machine whose load changes during the run.
"""

from __future__ import annotations

import time

import pytest
import torch

from .harness import (
    BACKEND_PROVIDERS,
    basis_dtype,
    floor_dtype,
    parametrize_cases,
    record,
    run,
    skip_unless_backend,
    skip_unless_fits,
)
from .shapes import (
    Shape,
    basis_bytes,
    bench_device,
    fill_basis_,
    free_inputs,
    make_params,
    make_params_of,
    resnet50_numels,
    step_bytes,
)
from .steps import PublishedStep, make_twa

STEP_PROVIDERS = ("published", "torch-fp32", *BACKEND_PROVIDERS)


def pytest_generate_tests(metafunc):
    parametrize_cases(metafunc, STEP_PROVIDERS)


def step_dtype(provider: str, basis: str = "fp16") -> torch.dtype:
    return torch.float32 if provider in ("published", "torch-fp32") else basis_dtype(provider, basis)


def test_step(benchmark, device, copy_bw, shape: Shape, provider: str, basis: str):
    dtype = step_dtype(provider, basis)
    backend = "torch" if provider == "torch-fp32" else provider
    if provider != "published":
        skip_unless_backend("twa_step", backend, device, dtype)
    # Bases, plus D-sized fp32 state: params, grads and (published) cat, gp, clones, momentum;
    # (TWA) flat, mean, anchor, w0.
    per_d = 28 if provider == "published" else 24
    need = basis_bytes(shape.K, shape.D, dtype) + per_d * shape.D
    skip_unless_fits(need, device, f"{provider} at {shape.id}")
    free_inputs()
    benchmark.group = f"step {shape.id}"
    params = make_params(shape, device)
    if provider == "published":
        P = torch.empty(shape.K, shape.D, device=device)
        scales = torch.empty(shape.K, device=device)
        fill_basis_(P, scales)
        P.mul_(scales[:, None])
        call = PublishedStep(params, P)
    else:
        gen = torch.Generator(device=device)
        gen.manual_seed(1 << 22)
        w0 = torch.randn(shape.D, generator=gen, device=device)
        call = make_twa(params, shape.K, dtype, backend, w0).step
    run(benchmark, call, device)
    floor = step_bytes(shape, floor_dtype(dtype))
    record(benchmark, op="step", provider=provider, shape=shape, basis=dtype, copy_bw=copy_bw,
           nbytes=step_bytes(shape, dtype), floor_bytes=floor)  # fmt: skip
    assert all(bool(torch.isfinite(p).all()) for p in params)


def test_step_fp16_vs_fp32(benchmark, device, copy_bw, shape: Shape):
    """One round = one fp16-basis step then one fp32-basis step (reference backend, CPU)."""
    if device.type != "cpu":
        pytest.skip("the fp16-vs-fp32 target is stated for the CPU reference path")
    free_inputs()
    gen = torch.Generator(device=device)
    gen.manual_seed(1 << 22)
    w0 = torch.randn(shape.D, generator=gen, device=device)
    steps = {}
    for dtype in (torch.float16, torch.float32):
        steps[dtype] = make_twa(make_params(shape, device), shape.K, dtype, "torch", w0).step
    times: dict = {torch.float16: [], torch.float32: []}

    def pair():
        for dtype, step in steps.items():
            start = time.perf_counter()
            step()
            times[dtype].append(time.perf_counter() - start)

    benchmark.group = f"step {shape.id}"
    # 9 rounds: on the shared 2-core machine the ratio of 3-round minima moved from 1.24 to 1.51.
    run(benchmark, pair, device, min_rounds=9)
    # The first three pairs are run()'s untimed call, its estimate and the warmup round.
    kept = {d: t[3:] or t for d, t in times.items()}
    t16, t32 = sorted(kept[torch.float16]), sorted(kept[torch.float32])
    ratios = sorted(a / b for a, b in zip(kept[torch.float16], kept[torch.float32], strict=True))
    # The fp16-basis step's time over the fp32-basis step's: no byte floor of its own.
    record(benchmark, op="step-ratio", provider="fp16/fp32", shape=shape, basis=torch.float16,
           copy_bw=copy_bw, nbytes=None, compared_with="float32")  # fmt: skip
    info = benchmark.extra_info
    info["fp16_min_ms"] = round(t16[0] * 1e3, 3)
    info["fp32_min_ms"] = round(t32[0] * 1e3, 3)
    info["ratio_of_mins"] = round(t16[0] / t32[0], 3)
    if ratios:
        info["median_round_ratio"] = round(ratios[len(ratios) // 2], 3)


def _granularity_shape(smoke: bool) -> tuple[Shape, list[int]]:
    """ResNet-50's tensors at K = 32 on a GPU; each 64 (CPU) or 4096 (smoke) times smaller."""
    numels = resnet50_numels()
    if smoke or bench_device().type != "cuda":
        div = 4096 if smoke else 64
        numels = [max(1, n // div) for n in numels]
        name = "resnet50-tensors-small"
    else:
        name = "resnet50-tensors"
    return Shape(name, sum(numels), 4 if smoke else 32), numels


@pytest.mark.parametrize("granularity", ["model", "tensor"])
@pytest.mark.parametrize("backend", BACKEND_PROVIDERS)
def test_step_granularity(benchmark, device, copy_bw, backend: str, granularity: str):
    shape, numels = _granularity_shape(benchmark.disabled)
    skip_unless_backend("twa_step", backend, device, torch.float16)
    free_inputs()
    benchmark.group = f"step-granularity {shape.id}"
    params = make_params_of(numels, device)
    gen = torch.Generator(device=device)
    gen.manual_seed(1 << 22)
    w0 = torch.randn(shape.D, generator=gen, device=device)
    call = make_twa(params, shape.K, torch.float16, backend, w0, granularity).step
    run(benchmark, call, device)
    record(benchmark, op="step-granularity", provider=f"{backend}-{granularity}", shape=shape,
           basis=torch.float16, copy_bw=copy_bw, nbytes=step_bytes(shape, torch.float16),
           granularity=granularity, tensors=len(numels))  # fmt: skip
    assert all(bool(torch.isfinite(p).all()) for p in params)
