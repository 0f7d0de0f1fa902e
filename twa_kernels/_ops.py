"""The ``twa::`` custom ops: schemas, argument checks, fake (meta) implementations, routing.

Each op is defined once here with ``torch.library.custom_op``. Its real implementation checks
the arguments and routes to the backend named by its ``backend`` argument (see ``_backend``);
the fake implementation runs the same checks and only allocates, so ``torch.compile`` and
``torch.library.opcheck`` see the same contract on every backend.

Notation (column convention of the user docs): the basis P has K columns of length D and is
stored basis-major, ``basis[i, :]`` holding column i, with ``P[:, i] = scales[i] * basis[i, :]``
(fp16/bf16/fp32 storage, ``scales`` [K]) or ``P[j, i] = scales[i, j // 64] * basis[i, j]`` (int8
storage, ``scales`` [K, ceil(D / 64)]: one scale per block of ``QUANT_BLOCK`` = 64 values, see
``_layout``).

- ``project(basis, scales, x)``: ``P^T x`` for x of shape [D] or [B, D]; fp32 [K] or [B, K].
- ``reconstruct_(out, w0, basis, scales, alpha)``: ``out = w0 + P alpha`` in out's dtype.
- ``orthogonalize_(basis, scales, sample, rank)``: CGS2 of a sample against rows [0, rank),
  storing the normalised remainder in row ``rank`` (when it exists) with its scale.
- ``subspace_step_(...)``: the K-dimensional SGD update of the coordinates, on the device.
- ``project_grads(params, grads, workspace, basis, scales, segments=None)``: ``P^T g`` of a
  parameter list's gradients (the projection of ``step_``; a sharded step all-reduces it before
  the update); with ``segments`` one row per coefficient block.
- ``step_(params, grads, workspace, ...)``: the whole step over a parameter list.
- ``write_params_(params, workspace, w0, basis, scales, coef, segments=None)``: its last pass,
  ``params <- w0 + P coef`` (one coefficient row per parameter with ``segments``).
- ``block_step_(...)`` and ``step_blocks_(...)``: the [L, K] step of per-block coordinates
  (SGD or AdamW) and the whole per-block step over a parameter list.

Largest K (basis rows, coordinates) supported: ``MAX_RANK`` = 8192 for every op on every
backend, checked with the other arguments (``ValueError`` above it). What sets it, per backend:

- Triton: ``subspace_step_`` (and the fused step, which runs the same kernel) holds all K
  coordinates in one program, padded to ``KP = next_power_of_2(K)``, and reads the partial sums
  in [8192 // KP, KP] tiles: above 8192 the tile has no rows and the kernel does not compile.
  The other Triton kernels compile at K = 8192 for sm_90 without spilling (the orthogonalize
  reduces, run once per sample, use local memory there; project's [NT, BLOCK_K] accumulator
  is 64 values per thread).
- CUDA: no kernel has a K-dependent tile except ``orthogonalize_``, whose per-row fp64 sums
  live in shared memory: ``rank <= CUDA_MAX_ORTH_RANK`` (2048, ``kMaxOrthRank`` in
  ``csrc/twa_common.h``); above it ``backend="cuda"`` raises ``ValueError`` and ``"auto"``
  takes Triton.
- reference (``"torch"``): none of its own (memory only); it takes the same limit so that every
  backend accepts the same arguments.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from . import _backend
from ._layout import blockwise, scales_shape

STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.int8)
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Largest K (basis rows, coordinates) of every op and the fused step (see the module docstring).
MAX_RANK = 8192
# Per op, the backends with kernels for an int8 basis; "auto" takes the last of them on CUDA.
BLOCKWISE_BACKENDS = {
    "project": ("torch", "triton", "cuda"),
    "reconstruct_": ("torch", "triton", "cuda"),
    "orthogonalize_": ("torch", "triton", "cuda"),
    "project_grads": ("torch", "triton", "cuda"),
    "step_": ("torch", "triton", "cuda"),
    "write_params_": ("torch", "triton", "cuda"),
    "step_blocks_": ("torch", "triton", "cuda"),
}
# orthogonalize_ on the CUDA backend: rows read (rank) at most this (csrc kMaxOrthRank).
CUDA_MAX_ORTH_RANK = 2048


def check_rank(what: str, K) -> None:
    """``ValueError`` when ``K`` is above ``MAX_RANK``; ``what`` names the op."""
    torch._check_value(
        K <= MAX_RANK,
        lambda: (
            f"{what}: K = {K} is above the largest supported rank, MAX_RANK = {MAX_RANK} "
            "(basis rows / coordinates)"
        ),
    )


def _same_device(**tensors: Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    for name, dev in devices.items():
        torch._check(dev == first, lambda n=name, d=dev: f"{n} is on {d}, expected {first}")


def _check_basis(basis: Tensor, scales: Tensor, op: str) -> None:
    torch._check(basis.dim() == 2, lambda: f"basis must be 2-D [K, D], got {tuple(basis.shape)}")
    check_rank(f"twa::{op}", basis.shape[0])
    torch._check(
        basis.dtype in STORAGE_DTYPES,
        lambda: f"basis dtype must be float16, bfloat16, float32 or int8, got {basis.dtype}",
    )
    torch._check(
        basis.shape[0] >= 1 and basis.shape[1] >= 1,
        lambda: f"basis must have K >= 1 rows and D >= 1 columns, got {tuple(basis.shape)}",
    )
    torch._check(basis.stride(1) == 1, lambda: "basis rows must be contiguous (stride(1) == 1)")
    expected = scales_shape(basis.shape[0], basis.shape[1], basis.dtype)
    torch._check(
        tuple(scales.shape) == expected,
        lambda: (
            f"scales must have shape {list(expected)} for a {basis.dtype} basis of shape "
            f"{list(basis.shape)}, got {list(scales.shape)}"
            + (" (one scale per 64 values of a row)" if blockwise(basis.dtype) else "")
        ),
    )
    torch._check(scales.dtype == torch.float32, lambda: f"scales must be float32, got {scales.dtype}")
    torch._check(scales.stride(-1) == 1, lambda: "scales must be contiguous along their last dim")


def _check_vector(name: str, t: Tensor, size: int, dtypes=(torch.float32,)) -> None:
    torch._check(
        t.dim() == 1 and t.shape[0] == size,
        lambda: f"{name} must have shape [{size}], got {tuple(t.shape)}",
    )
    torch._check(t.dtype in dtypes, lambda: f"{name} dtype must be one of {dtypes}, got {t.dtype}")
    torch._check(t.is_contiguous(), lambda: f"{name} must be contiguous")


def check_project(basis: Tensor, scales: Tensor, x: Tensor) -> None:
    _check_basis(basis, scales, "project")
    D = basis.shape[1]
    torch._check(x.dim() in (1, 2), lambda: f"x must be [D] or [B, D], got {tuple(x.shape)}")
    torch._check(x.shape[-1] == D, lambda: f"x has {x.shape[-1]} columns, the basis has D={D}")
    torch._check(x.dtype in INPUT_DTYPES, lambda: f"x dtype must be fp32, bf16 or fp16, got {x.dtype}")
    torch._check(x.is_contiguous(), lambda: "x must be contiguous")
    _same_device(basis=basis, scales=scales, x=x)


def check_reconstruct(out: Tensor, w0: Tensor, basis: Tensor, scales: Tensor, alpha: Tensor) -> None:
    _check_basis(basis, scales, "reconstruct_")
    K, D = basis.shape
    torch._check(
        out.dim() == 1 and out.shape[0] == D,
        lambda: f"out must have shape [{D}], got {tuple(out.shape)}",
    )
    torch._check(out.dtype.is_floating_point, lambda: f"out must be floating point, got {out.dtype}")
    torch._check(out.is_contiguous(), lambda: "out must be contiguous")
    _check_vector("w0", w0, D)
    _check_vector("alpha", alpha, K)
    _same_device(out=out, w0=w0, basis=basis, scales=scales, alpha=alpha)


def check_orthogonalize(basis: Tensor, scales: Tensor, sample: Tensor, rank: int) -> None:
    _check_basis(basis, scales, "orthogonalize_")
    K, D = basis.shape
    torch._check(0 <= rank <= K, lambda: f"rank must be in [0, {K}], got {rank}")
    _check_vector("sample", sample, D)
    _same_device(basis=basis, scales=scales, sample=sample)


def check_subspace_step(
    alpha, momentum_buffer, counters, coord_grad, gram, pw0, lr, what="twa::subspace_step_"
) -> None:
    K = alpha.shape[0] if alpha.dim() == 1 else -1
    _check_vector("alpha", alpha, K)
    check_rank(what, K)
    _check_vector("momentum_buffer", momentum_buffer, K)
    _check_vector("coord_grad", coord_grad, K)
    _check_vector("pw0", pw0, K)
    _check_vector("counters", counters, 2, dtypes=(torch.int64,))
    torch._check(
        gram.shape == (K, K) and gram.dtype == torch.float32 and gram.is_contiguous(),
        lambda: f"gram must be a contiguous float32 [{K}, {K}], got {gram.dtype} {tuple(gram.shape)}",
    )
    _same_device(
        alpha=alpha,
        momentum_buffer=momentum_buffer,
        counters=counters,
        coord_grad=coord_grad,
        gram=gram,
        pw0=pw0,
        lr=lr,
    )
    torch._check(
        lr.dim() == 0 and lr.dtype == torch.float32,
        lambda: f"lr must be a 0-dim float32 tensor, got {lr.dtype} {tuple(lr.shape)}",
    )


def lr_tensor(lr: float | Tensor, device: torch.device) -> Tensor:
    """``lr`` as ``subspace_step_`` takes it: a 0-dim fp32 tensor on ``device``.

    A tensor that already is one is returned as is: the kernels read its memory when they run,
    so a captured CUDA graph replays with the value it holds then (what an LR scheduler wrote).
    """
    if isinstance(lr, Tensor):
        if lr.dim() == 0 and lr.dtype == torch.float32 and lr.device == device:
            return lr
        return lr.detach().to(device=device, dtype=torch.float32).reshape(())
    return torch.tensor(float(lr), dtype=torch.float32, device=device)


def choose(op: str, backend: str, sized: Tensor, rank: int | None = None) -> str:
    """The concrete backend that runs ``op``; ``sized`` (the basis, or the Gram matrix) keys
    "auto" and tells an int8 basis (for which "auto" takes a backend with int8 kernels).

    ``rank`` (orthogonalize_): rows read, above the CUDA kernel's limit on ``"cuda"``.
    """
    concrete = _backend.resolve(backend, sized.device, op, sized.numel())
    int8_backends = BLOCKWISE_BACKENDS.get(op, ())
    if blockwise(sized.dtype) and concrete not in int8_backends:
        if backend != "auto":
            raise ValueError(
                f"twa::{op}: backend={backend!r} has no kernels for an int8 basis yet "
                f"(backends that have: {', '.join(map(repr, int8_backends))})"
            )
        concrete = int8_backends[-1] if sized.device.type == "cuda" else "torch"
        if concrete == "torch" and sized.device.type == "cuda":
            _warn_int8_reference(op)
    if concrete == "cuda" and rank is not None and rank > CUDA_MAX_ORTH_RANK:
        if backend != "auto":
            raise ValueError(
                f"twa::{op}: rank = {rank} is above the CUDA backend's limit for this op, "
                f"CUDA_MAX_ORTH_RANK = {CUDA_MAX_ORTH_RANK} (backend='triton' or 'torch' takes up "
                f"to MAX_RANK = {MAX_RANK})"
            )
        concrete = _backend.resolve("triton" if _backend.triton_available() else "torch", sized.device)
    return concrete


_warned_int8: set[str] = set()


def _warn_int8_reference(op: str) -> None:
    """Warn once per op: an int8 basis on CUDA runs the plain-PyTorch reference of ``op``."""
    if op not in _warned_int8:
        _warned_int8.add(op)
        warnings.warn(
            f"twa_kernels: twa::{op} has no GPU kernel for an int8 basis yet; it runs the "
            "plain-PyTorch reference (chunked dequantisation, several times slower)",
            stacklevel=4,
        )


def route(op: str, backend: str, sized: Tensor, rank: int | None = None):
    """The implementation of ``op`` on the backend ``choose`` picks."""
    concrete = choose(op, backend, sized, rank)
    return _backend.implementation(op, concrete)


# ---------------------------------------------------------------------------------------------
# project


@torch.library.custom_op("twa::project", mutates_args=())
def project(basis: Tensor, scales: Tensor, x: Tensor, backend: str = "auto") -> Tensor:
    check_project(basis, scales, x)
    return route("project", backend, basis)(basis, scales, x)


@project.register_fake
def _project_fake(basis, scales, x, backend="auto"):
    check_project(basis, scales, x)
    _backend.check_backend_name(backend)
    return x.new_empty((*x.shape[:-1], basis.shape[0]), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# reconstruct_


@torch.library.custom_op("twa::reconstruct_", mutates_args=("out",))
def reconstruct_(
    out: Tensor, w0: Tensor, basis: Tensor, scales: Tensor, alpha: Tensor, backend: str = "auto"
) -> None:
    check_reconstruct(out, w0, basis, scales, alpha)
    route("reconstruct_", backend, basis)(out, w0, basis, scales, alpha)


@reconstruct_.register_fake
def _reconstruct_fake(out, w0, basis, scales, alpha, backend="auto"):
    check_reconstruct(out, w0, basis, scales, alpha)
    _backend.check_backend_name(backend)


# ---------------------------------------------------------------------------------------------
# orthogonalize_


@torch.library.custom_op("twa::orthogonalize_", mutates_args=("basis", "scales"))
def orthogonalize_(basis: Tensor, scales: Tensor, sample: Tensor, rank: int, backend: str = "auto") -> Tensor:
    check_orthogonalize(basis, scales, sample, rank)
    return route("orthogonalize_", backend, basis, rank)(basis, scales, sample, rank)


@orthogonalize_.register_fake
def _orthogonalize_fake(basis, scales, sample, rank, backend="auto"):
    check_orthogonalize(basis, scales, sample, rank)
    _backend.check_backend_name(backend)
    return sample.new_empty((rank + 2,), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# subspace_step_


@torch.library.custom_op("twa::subspace_step_", mutates_args=("alpha", "momentum_buffer", "counters"))
def subspace_step_(
    alpha: Tensor,
    momentum_buffer: Tensor,
    counters: Tensor,
    coord_grad: Tensor,
    gram: Tensor,
    pw0: Tensor,
    lr: Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    backend: str = "auto",
) -> None:
    check_subspace_step(alpha, momentum_buffer, counters, coord_grad, gram, pw0, lr)
    route("subspace_step_", backend, gram)(
        alpha, momentum_buffer, counters, coord_grad, gram, pw0,
        lr, momentum, dampening, weight_decay, nesterov,
    )  # fmt: skip


@subspace_step_.register_fake
def _subspace_step_fake(
    alpha, momentum_buffer, counters, coord_grad, gram, pw0,
    lr, momentum, dampening, weight_decay, nesterov, backend="auto",
):  # fmt: skip
    check_subspace_step(alpha, momentum_buffer, counters, coord_grad, gram, pw0, lr)
    _backend.check_backend_name(backend)


# ---------------------------------------------------------------------------------------------
# project_grads (the first half of a sharded step) and step_: the whole step over a parameter list


def _check_params_and_grads(params, grads, basis: Tensor) -> None:
    D = basis.shape[1]
    torch._check(
        len(params) >= 1 and len(grads) == len(params),
        lambda: f"params ({len(params)}) and grads ({len(grads)}) must be non-empty lists of one length",
    )
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        torch._check(
            p.dtype in INPUT_DTYPES,
            lambda i=i, p=p: f"params[{i}] dtype must be fp32, bf16 or fp16, got {p.dtype}",
        )
        torch._check(p.is_contiguous(), lambda i=i: f"params[{i}] must be contiguous")
        torch._check(
            p.device == basis.device,
            lambda i=i, p=p: f"params[{i}] is on {p.device}, the basis on {basis.device}",
        )
        if g is not None:
            torch._check(
                g.shape == p.shape,
                lambda i=i, g=g, p=p: f"grads[{i}] has shape {tuple(g.shape)}, params[{i}] {tuple(p.shape)}",
            )
            torch._check(
                g.dtype in INPUT_DTYPES,
                lambda i=i, g=g: f"grads[{i}] dtype must be fp32, bf16 or fp16, got {g.dtype}",
            )
            torch._check(
                g.device == p.device,
                lambda i=i, g=g, p=p: f"grads[{i}] is on {g.device}, expected {p.device}",
            )
    total = sum(p.numel() for p in params)
    torch._check(total == D, lambda: f"params hold {total} values, the basis has D={D}")


def check_project_grads(params, grads, workspace, basis, scales, segments=None) -> None:
    _check_basis(basis, scales, "project_grads")
    _check_params_and_grads(params, grads, basis)
    _check_vector("workspace", workspace, basis.shape[1])
    _same_device(basis=basis, scales=scales, workspace=workspace)
    if segments is not None:
        _check_segments(segments, len(params), segments[-1] + 1 if segments else 0)


def _check_segments(segments: list[int], n_params: int, rows: int) -> None:
    """One coefficient row per parameter, non-decreasing, each in [0, rows)."""
    torch._check(
        len(segments) == n_params,
        lambda: f"segments has {len(segments)} entries, params {n_params}",
    )
    for i, seg in enumerate(segments):
        torch._check(
            0 <= seg < rows and (i == 0 or seg >= segments[i - 1]),
            lambda i=i, seg=seg: (
                f"segments[{i}] = {seg}: segments must be non-decreasing rows of coef, in [0, {rows})"
            ),
        )


@torch.library.custom_op("twa::project_grads", mutates_args=("workspace",))
def project_grads(
    params: list[Tensor],
    grads: list[Optional[Tensor]],  # noqa: UP045 (the schema parser reads typing.Optional)
    workspace: Tensor,
    basis: Tensor,
    scales: Tensor,
    segments: Optional[list[int]] = None,  # noqa: UP045 (the schema parser reads typing.Optional)
    backend: str = "auto",
) -> Tensor:
    """``P^T g`` of a parameter list's gradients (None: zero), fp32 [K]; with ``segments`` (one
    row per parameter, non-decreasing) fp32 [segments[-1] + 1, K], each row the sum over its
    parameters. ``workspace`` fp32 [D] may receive the flat gradient (the fused Triton kernel
    reads the grads in place instead)."""
    check_project_grads(params, grads, workspace, basis, scales, segments)
    return route("project_grads", backend, basis)(params, grads, workspace, basis, scales, segments)


@project_grads.register_fake
def _project_grads_fake(params, grads, workspace, basis, scales, segments=None, backend="auto"):
    check_project_grads(params, grads, workspace, basis, scales, segments)
    _backend.check_backend_name(backend)
    shape = (basis.shape[0],) if segments is None else (segments[-1] + 1, basis.shape[0])
    return basis.new_empty(shape, dtype=torch.float32)


def check_write_params(params, workspace, w0, basis, scales, coef, segments) -> None:
    _check_basis(basis, scales, "write_params_")
    K, D = basis.shape
    _check_params_and_grads(params, [None] * len(params), basis)
    _check_vector("workspace", workspace, D)
    _check_vector("w0", w0, D)
    _same_device(basis=basis, workspace=workspace, w0=w0, coef=coef)
    if segments is None:
        _check_vector("coef", coef, K)
        return
    torch._check(
        coef.dim() == 2 and coef.shape[1] == K and coef.dtype == torch.float32 and coef.is_contiguous(),
        lambda: (
            f"coef must be a contiguous fp32 [rows, K={K}] with segments, got {coef.dtype} "
            f"{tuple(coef.shape)}"
        ),
    )
    _check_segments(segments, len(params), coef.shape[0])


@torch.library.custom_op("twa::write_params_", mutates_args=("params", "workspace"))
def write_params_(
    params: list[Tensor],
    workspace: Tensor,
    w0: Tensor,
    basis: Tensor,
    scales: Tensor,
    coef: Tensor,
    segments: Optional[list[int]] = None,  # noqa: UP045 (the schema parser reads typing.Optional)
    backend: str = "auto",
) -> None:
    """``params <- w0 + P coef`` in place, each parameter rounded to its dtype: coef fp32 [K],
    or with ``segments`` (one per parameter, non-decreasing) fp32 [rows, K], parameter i taking
    row ``segments[i]``. ``workspace`` fp32 [D] may receive the flat weights (the fused Triton
    and CUDA kernels write the parameters directly)."""
    check_write_params(params, workspace, w0, basis, scales, coef, segments)
    route("write_params_", backend, basis)(params, workspace, w0, basis, scales, coef, segments)


@write_params_.register_fake
def _write_params_fake(params, workspace, w0, basis, scales, coef, segments=None, backend="auto"):
    check_write_params(params, workspace, w0, basis, scales, coef, segments)
    _backend.check_backend_name(backend)


def check_step(
    params, grads, workspace, w0, basis, scales, alpha, momentum_buffer, counters, gram, pw0, lr
) -> None:
    _check_basis(basis, scales, "step_")
    K, D = basis.shape
    _check_params_and_grads(params, grads, basis)
    _check_vector("workspace", workspace, D)
    _check_vector("w0", w0, D)
    _check_vector("alpha", alpha, K)
    check_subspace_step(alpha, momentum_buffer, counters, alpha, gram, pw0, lr, what="twa::step_")
    _same_device(basis=basis, workspace=workspace, w0=w0, alpha=alpha)


@torch.library.custom_op(
    "twa::step_", mutates_args=("params", "workspace", "alpha", "momentum_buffer", "counters")
)
def step_(
    params: list[Tensor],
    grads: list[Optional[Tensor]],  # noqa: UP045 (the schema parser reads typing.Optional)
    workspace: Tensor,
    w0: Tensor,
    basis: Tensor,
    scales: Tensor,
    alpha: Tensor,
    momentum_buffer: Tensor,
    counters: Tensor,
    gram: Tensor,
    pw0: Tensor,
    lr: Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    backend: str = "auto",
) -> None:
    check_step(params, grads, workspace, w0, basis, scales, alpha, momentum_buffer, counters, gram, pw0, lr)
    route("step_", backend, basis)(
        params, grads, workspace, w0, basis, scales, alpha, momentum_buffer, counters, gram, pw0,
        lr, momentum, dampening, weight_decay, nesterov,
    )  # fmt: skip


@step_.register_fake
def _step_fake(
    params, grads, workspace, w0, basis, scales, alpha, momentum_buffer, counters, gram, pw0,
    lr, momentum, dampening, weight_decay, nesterov, backend="auto",
):  # fmt: skip
    check_step(params, grads, workspace, w0, basis, scales, alpha, momentum_buffer, counters, gram, pw0, lr)
    _backend.check_backend_name(backend)


# ---------------------------------------------------------------------------------------------
# block_step_ and step_blocks_: per-block coordinates (the published follow-up, ``_blocks``)

RULES = ("sgd", "adamw")


def check_block_step(alpha, buf1, buf2, counters, coord_grad, gram, pw0, inv_norms, coef, lr, rule) -> None:
    torch._check(alpha.dim() == 2, lambda: f"alpha must be fp32 [L, K], got {tuple(alpha.shape)}")
    L, K = alpha.shape
    check_rank("twa::block_step_", K)
    vectors = dict(alpha=alpha, buf1=buf1, coord_grad=coord_grad, pw0=pw0, inv_norms=inv_norms, coef=coef)
    if rule == "adamw":  # SGD's rule does not read or write buf2 (it may be empty)
        vectors["buf2"] = buf2
    for name, t in vectors.items():
        torch._check(
            t.shape == (L, K) and t.dtype == torch.float32 and t.is_contiguous(),
            lambda name=name, t=t: (
                f"{name} must be a contiguous fp32 [{L}, {K}], got {t.dtype} {tuple(t.shape)}"
            ),
        )
    torch._check(
        gram.shape == (L, K, K) and gram.dtype == torch.float32 and gram.is_contiguous(),
        lambda: f"gram must be a contiguous fp32 [{L}, {K}, {K}], got {gram.dtype} {tuple(gram.shape)}",
    )
    _check_vector("counters", counters, 2, dtypes=(torch.int64,))
    torch._check(
        lr.dim() == 0 and lr.dtype == torch.float32,
        lambda: f"lr must be a 0-dim float32 tensor, got {lr.dtype} {tuple(lr.shape)}",
    )
    torch._check_value(rule in RULES, lambda: f"rule must be one of {RULES}, got {rule!r}")
    _same_device(alpha=alpha, buf1=buf1, buf2=buf2, counters=counters, coord_grad=coord_grad,
                 gram=gram, pw0=pw0, inv_norms=inv_norms, coef=coef, lr=lr)  # fmt: skip


@torch.library.custom_op("twa::block_step_", mutates_args=("alpha", "buf1", "buf2", "counters", "coef"))
def block_step_(
    alpha: Tensor,
    buf1: Tensor,
    buf2: Tensor,
    counters: Tensor,
    coord_grad: Tensor,
    gram: Tensor,
    pw0: Tensor,
    inv_norms: Tensor,
    coef: Tensor,
    lr: Tensor,
    rule: str,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    beta1: float,
    beta2: float,
    eps: float,
    backend: str = "auto",
) -> None:
    """The per-block coordinates' step (see ``reference.block_step_``), on the device."""
    check_block_step(alpha, buf1, buf2, counters, coord_grad, gram, pw0, inv_norms, coef, lr, rule)
    route("block_step_", backend, gram)(
        alpha, buf1, buf2, counters, coord_grad, gram, pw0, inv_norms, coef, lr, rule, momentum,
        dampening, weight_decay, nesterov, beta1, beta2, eps,
    )  # fmt: skip


@block_step_.register_fake
def _block_step_fake(
    alpha, buf1, buf2, counters, coord_grad, gram, pw0, inv_norms, coef, lr, rule, momentum,
    dampening, weight_decay, nesterov, beta1, beta2, eps, backend="auto",
):  # fmt: skip
    check_block_step(alpha, buf1, buf2, counters, coord_grad, gram, pw0, inv_norms, coef, lr, rule)
    _backend.check_backend_name(backend)


@torch.library.custom_op(
    "twa::step_blocks_",
    mutates_args=("params", "workspace", "alpha", "buf1", "buf2", "counters", "coef"),
)
def step_blocks_(
    params: list[Tensor],
    grads: list[Optional[Tensor]],  # noqa: UP045 (the schema parser reads typing.Optional)
    workspace: Tensor,
    w0: Tensor,
    basis: Tensor,
    scales: Tensor,
    alpha: Tensor,
    buf1: Tensor,
    buf2: Tensor,
    counters: Tensor,
    gram: Tensor,
    pw0: Tensor,
    inv_norms: Tensor,
    coef: Tensor,
    segments: list[int],
    lr: Tensor,
    rule: str,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    beta1: float,
    beta2: float,
    eps: float,
    backend: str = "auto",
) -> None:
    """One step of per-block coordinates over a parameter list (see ``reference.step_blocks_``):
    the fused kernels read the grads and write the parameters in place."""
    _check_step_blocks(params, grads, workspace, w0, basis, scales, alpha, buf1, buf2, counters, gram,
                       pw0, inv_norms, coef, segments, lr, rule)  # fmt: skip
    route("step_blocks_", backend, basis)(
        params, grads, workspace, w0, basis, scales, alpha, buf1, buf2, counters, gram, pw0, inv_norms,
        coef, segments, lr, rule, momentum, dampening, weight_decay, nesterov, beta1, beta2, eps,
    )  # fmt: skip


def _check_step_blocks(
    params, grads, workspace, w0, basis, scales, alpha, buf1, buf2, counters, gram, pw0, inv_norms,
    coef, segments, lr, rule,
) -> None:  # fmt: skip
    check_project_grads(params, grads, workspace, basis, scales, segments)
    check_block_step(alpha, buf1, buf2, counters, alpha, gram, pw0, inv_norms, coef, lr, rule)
    _check_vector("w0", w0, basis.shape[1])
    torch._check(
        alpha.shape == (segments[-1] + 1, basis.shape[0]),
        lambda: (
            f"alpha must be [{segments[-1] + 1}, {basis.shape[0]}] (rows of segments, basis K), "
            f"got {tuple(alpha.shape)}"
        ),
    )
    _same_device(basis=basis, w0=w0, alpha=alpha)


@step_blocks_.register_fake
def _step_blocks_fake(
    params, grads, workspace, w0, basis, scales, alpha, buf1, buf2, counters, gram, pw0, inv_norms,
    coef, segments, lr, rule, momentum, dampening, weight_decay, nesterov, beta1, beta2, eps,
    backend="auto",
):  # fmt: skip
    _check_step_blocks(params, grads, workspace, w0, basis, scales, alpha, buf1, buf2, counters, gram,
                       pw0, inv_norms, coef, segments, lr, rule)  # fmt: skip
    _backend.check_backend_name(backend)
