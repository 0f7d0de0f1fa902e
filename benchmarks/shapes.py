"""Benchmark shapes, the one input factory, and the bytes each op must move at least.

Shapes are (D, K, B): D parameters, a basis of K rows, B vectors projected at once. On a GPU the
D are real model sizes; on the CPU one small D keeps a run of the suite short on 2 cores.

``make_inputs(shape, dtype, device)`` builds every tensor an op or a step needs. The basis is
deterministic per (D, K) whatever its dtype: row i is ``randn(D)`` from seed ``i``, rounded to
fp16, with the fp32 scale ``1/sqrt(D)``. The fp32 basis a plain-PyTorch user would keep is the
same fp16 values times their scale (``dense_basis``), so every provider computes the same P and
results can be compared across providers.

The int8 basis (``basis="int8"`` of the backend providers) quantises those same fp16 rows as the
package stores a row (``twa_kernels.reference.quantise_blocks``): each block of 64 values to
``rint(v * 127 / max|v|)``, with the block's scale ``max|v| / 127 / sqrt(D)``. It is the same P
within the rounding of int8 (about 0.6 % of each block's rms).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from twa_kernels import ops
from twa_kernels._layout import QMAX, QUANT_BLOCK, scale_blocks
from twa_kernels.reference import quantise_blocks

RESNET18_D = 11_689_512
RESNET50_D = 25_557_032
GPT2_SMALL_D = 124_439_808

GPU_D = {"resnet18": RESNET18_D, "resnet50": RESNET50_D, "gpt2": GPT2_SMALL_D}
GPU_K = (8, 32, 101, 301)
# 2^22 parameters: the smallest basis (8 fp16 rows) is 64 MiB, twice the 32 MiB L3 of the
# 2-core machines measured, so CPU runs stream from memory as GPU runs do. At 2^20 the 16 MiB
# fp16 basis of K = 8 fits in that L3 and its fp32 twin (32 MiB) does not: the two would not
# be compared on equal terms.
CPU_D = {"2^22": 1 << 22}
CPU_K = (8, 32)
# --benchmark-disable runs every benchmark once as a test: tiny shapes keep that under a minute.
SMOKE_D = {"2^16": 1 << 16}
SMOKE_K = (8, 32)
BATCHES = (1, 8)
# The storages of the package's basis the backend providers are measured with (``basis`` of a
# case); the naive and published providers keep their own (fp32 P, or fp16 upcast).
BASES = {"fp16": torch.float16, "int8": torch.int8}


@dataclass(frozen=True)
class Shape:
    model: str
    D: int
    K: int
    B: int = 1

    @property
    def id(self) -> str:
        b = f"-B{self.B}" if self.B != 1 else ""
        return f"{self.model}-K{self.K}{b}"


def bench_device() -> torch.device:
    """``TWA_BENCH_DEVICE`` (cpu or cuda), else cuda when present."""
    name = os.environ.get("TWA_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def shapes(batched: bool = False, smoke: bool = False) -> list[Shape]:
    """The shapes of this run: GPU sizes on cuda, small ones on the CPU, tiny ones for a smoke
    run (``smoke``, or ``TWA_BENCH_SHAPES=smoke``); ``TWA_BENCH_SHAPES=cpu`` forces the CPU set.
    """
    choice = os.environ.get("TWA_BENCH_SHAPES")
    if smoke or choice == "smoke":
        ds, ks = SMOKE_D, SMOKE_K
    elif bench_device().type != "cuda" or choice == "cpu":
        ds, ks = CPU_D, CPU_K
    else:
        ds, ks = GPU_D, GPU_K
    bs = BATCHES if batched else (1,)
    return [Shape(m, d, k, b) for m, d in ds.items() for k in ks for b in bs]


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def basis_bytes(rows: int, D: int, dtype: torch.dtype) -> int:
    """Bytes of ``rows`` basis rows of D values: the values, plus for int8 the fp32 scale of each
    block of 64 (1 + 4/64 bytes per value); a float basis's one scale per row is not counted."""
    scales = 4 * rows * scale_blocks(D) if dtype == torch.int8 else 0
    return itemsize(dtype) * rows * D + scales


# The least each op must read and write, in bytes (DESIGN.md section 2); P is read once per pass.
def project_bytes(s: Shape, dtype: torch.dtype) -> int:
    return basis_bytes(s.K, s.D, dtype) + 4 * s.B * s.D


def reconstruct_bytes(s: Shape, dtype: torch.dtype) -> int:
    return basis_bytes(s.K, s.D, dtype) + 8 * s.D  # read w0, write out (fp32)


def orthogonalize_bytes(s: Shape, dtype: torch.dtype) -> int:
    # Three passes over the rank = K - 1 stored rows and the sample, one row written.
    rank = s.K - 1
    return 3 * (basis_bytes(rank, s.D, dtype) + 4 * s.D) + basis_bytes(1, s.D, dtype)


def step_bytes(s: Shape, dtype: torch.dtype) -> int:
    # Two passes over P; read the gradients and w0, write the weights (fp32).
    return 2 * basis_bytes(s.K, s.D, dtype) + 12 * s.D


# ---------------------------------------------------------------------------------------------
# inputs

_BASIS_CACHE: dict[tuple, torch.Tensor] = {}
# The block scales of the cached int8 bases, under the same keys.
_SCALES_CACHE: dict[tuple, torch.Tensor] = {}


def free_inputs() -> None:
    """Free the cached bases (before a benchmark that builds its own)."""
    _BASIS_CACHE.clear()
    _SCALES_CACHE.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def basis_rows(D: int, K: int, device: torch.device) -> torch.Tensor:
    """fp16 [K, D], row i drawn from seed i (same values on any run of the same device type).

    One basis is kept between tests: consecutive tests of a shape share it, and a new shape frees
    the last, so GPU memory holds one basis (75 GB for GPT-2 small at K = 301) at a time.
    """
    key = (D, K, torch.float16, str(device))
    if key not in _BASIS_CACHE:
        free_inputs()
        basis = ops.empty_basis(K, D, torch.float16, device)  # the layout Subspace uses
        fill_basis_(basis, torch.empty(K, device=device))
        _BASIS_CACHE[key] = basis
    return _BASIS_CACHE[key]


def _seeded_row(D: int, i: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(i)
    return torch.randn(D, generator=gen, device=device)


def fill_basis_(basis: torch.Tensor, scales: torch.Tensor) -> None:
    """Write the benchmark basis into ``basis`` [K, D] (any dtype) and its ``scales`` [K].

    Rows hold the fp16 values of ``randn(D)`` from seed i, whatever the storage dtype, and the
    scales are ``1/sqrt(D)``: an fp32 store then holds exactly the same P as an fp16 one.
    """
    K, D = basis.shape
    for i in range(K):
        basis[i] = _seeded_row(D, i, basis.device).half()
    scales.fill_(D**-0.5)


def make_params(shape: Shape, device: torch.device) -> list[torch.Tensor]:
    """D fp32 parameters shaped like a network's (16 weights, 16 biases), each with a gradient."""
    biases = 16 * 512 if shape.D >= 1 << 16 else 0
    n = 16
    sizes = [(shape.D - biases) // n] * n
    sizes[0] += shape.D - biases - sum(sizes)
    gen = torch.Generator(device=device)
    gen.manual_seed(1 << 21)
    params = []
    for size in sizes + ([512] * 16 if biases else []):
        p = torch.randn(size, generator=gen, device=device).requires_grad_()
        p.grad = torch.randn(size, generator=gen, device=device)
        params.append(p)
    return params


def resnet50_numels() -> list[int]:
    """The sizes of torchvision's ResNet-50 parameters in ``named_parameters`` order: 161
    tensors, 25,557,032 values (the stem, 16 bottlenecks of 9 tensors, 4 downsamples of 3, fc)."""
    sizes = [64 * 3 * 7 * 7, 64, 64]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            sizes += [inplanes * planes, planes, planes, planes * planes * 9, planes, planes]
            sizes += [planes * 4 * planes, planes * 4, planes * 4]
            if b == 0:
                sizes += [inplanes * planes * 4, planes * 4, planes * 4]
            inplanes = planes * 4
    return sizes + [1000 * 2048, 1000]


def make_params_of(numels: list[int], device: torch.device) -> list[torch.Tensor]:
    """fp32 parameters of the given sizes, each with a gradient (seeded)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(1 << 21)
    params = []
    for n in numels:
        p = torch.randn(n, generator=gen, device=device).requires_grad_()
        p.grad = torch.randn(n, generator=gen, device=device)
        params.append(p)
    return params


def quantised_row(D: int, i: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i of the int8 benchmark basis: int8 [D] and its fp32 block scales [ceil(D / 64)]."""
    q, amax = quantise_blocks(_seeded_row(D, i, device).half().double())
    return q, (amax / QMAX * D**-0.5).float()


def int8_basis_rows(D: int, K: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 [K, D] and fp32 block scales [K, ceil(D / 64)]: the fp16 basis's rows quantised.

    Built row by row (no fp16 basis alongside) and cached as ``basis_rows`` is: a new basis
    frees the last.
    """
    key = (D, K, torch.int8, str(device))
    if key not in _BASIS_CACHE:
        free_inputs()
        basis = ops.empty_basis(K, D, torch.int8, device)
        scales = ops.empty_scales(K, D, torch.int8, device)
        for i in range(K):
            basis[i], scales[i] = quantised_row(D, i, device)
        _BASIS_CACHE[key], _SCALES_CACHE[key] = basis, scales
    return _BASIS_CACHE[key], _SCALES_CACHE[key]


def fill_int8_basis_(basis: torch.Tensor, scales: torch.Tensor) -> None:
    """Write the int8 benchmark basis into ``basis`` [K, D] (int8) and ``scales`` [K, ceil(D / 64)]."""
    K, D = basis.shape
    assert scales.shape == (K, scale_blocks(D)), (scales.shape, K, D, QUANT_BLOCK)
    for i in range(K):
        basis[i], scales[i] = quantised_row(D, i, basis.device)


def restore_row(D: int, K: int, i: int, device: torch.device) -> None:
    """Rewrite row ``i`` of the cached bases of (D, K) after a benchmark that overwrote it."""
    for (d, k, dtype, dev), basis in _BASIS_CACHE.items():
        if (d, k, dev) == (D, K, str(device)):
            if dtype == torch.int8:
                basis[i], _SCALES_CACHE[(d, k, dtype, dev)][i] = quantised_row(D, i, device)
                continue
            row = _seeded_row(D, i, device).half()
            basis[i] = row if dtype == torch.float16 else row.float() * D**-0.5


def dense_basis(D: int, K: int, device: torch.device) -> torch.Tensor:
    """The same P as fp32 [K, D] with the scale folded in: what a plain-PyTorch user keeps."""
    key = (D, K, torch.float32, str(device))
    if key not in _BASIS_CACHE:
        half = basis_rows(D, K, device)
        dense = torch.empty(K, D, dtype=torch.float32, device=device)
        for i in range(K):
            dense[i].copy_(half[i]).mul_(D**-0.5)  # scaled in fp32, as the ops scale
        _BASIS_CACHE[key] = dense
    return _BASIS_CACHE[key]


def drop_dense_basis() -> None:
    """Free the fp32 copy (4KD bytes) before a provider that does not use it."""
    for key in [k for k in _BASIS_CACHE if k[2] == torch.float32]:
        del _BASIS_CACHE[key]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> dict:
    """Every tensor the ops and the step take, for ``shape``, with the basis stored in ``dtype``.

    ``dtype`` float16 gives the package's layout (fp16 rows, fp32 scales ``1/sqrt(D)``);
    float32 gives the same P as fp32 rows with unit scales (the scale folded in); int8 the fp16
    rows quantised, with fp32 block scales [K, ceil(D / 64)] (``int8_basis_rows``).
    """
    D, K, B = shape.D, shape.K, shape.B
    if dtype == torch.float16:
        basis = basis_rows(D, K, device)
        scales = torch.full((K,), D**-0.5, dtype=torch.float32, device=device)
    elif dtype == torch.float32:
        basis = dense_basis(D, K, device)
        scales = torch.ones(K, dtype=torch.float32, device=device)
    elif dtype == torch.int8:
        basis, scales = int8_basis_rows(D, K, device)
    else:
        raise ValueError(f"benchmarks store the basis in float16, float32 or int8, not {dtype}")
    gen = torch.Generator(device=device)
    gen.manual_seed(1 << 20)
    x = torch.randn(B, D, generator=gen, device=device)
    return {
        "basis": basis,
        "scales": scales,
        "x": x[0] if B == 1 else x,
        "w0": torch.randn(D, generator=gen, device=device),
        "alpha": torch.randn(K, generator=gen, device=device) * 1e-2,
        "out": torch.empty(D, device=device),
        "sample": torch.randn(D, generator=gen, device=device),
    }


def basis_bytes_needed(shape: Shape, dtypes: tuple[torch.dtype, ...]) -> int:
    """Device bytes the bases of ``dtypes`` take together, for the fit check."""
    return sum(basis_bytes(shape.K, shape.D, d) for d in dtypes)
