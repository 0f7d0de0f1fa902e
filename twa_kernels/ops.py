"""Public functional API of the TWA operations (the ``twa::`` custom ops).

P has K columns of length D, stored basis-major: ``basis`` is [K, D] in fp16 (default), bf16 or
fp32 with one fp32 scale per column (``scales`` [K]), so ``P[:, i] = scales[i] * basis[i]``; or
in int8 with one fp32 scale per block of ``QUANT_BLOCK`` (64) values of a column (``scales``
[K, ceil(D / 64)]), so ``P[j, i] = scales[i, j // 64] * basis[i, j]``. ``empty_basis`` and
``empty_scales`` allocate both.
Accumulation is fp32 (fp64 in ``orthogonalize_``). ``backend`` is ``"auto"`` (Triton on CUDA,
the plain-PyTorch reference elsewhere), ``"torch"``, ``"triton"`` or ``"cuda"``.

K is at most ``MAX_RANK`` (8192) in every op and on every backend; a larger basis (or K
coordinates) raises ``ValueError``. ``orthogonalize_`` on ``backend="cuda"`` reads at most
``CUDA_MAX_ORTH_RANK`` (2048) rows (``"auto"`` then takes Triton).

Example::

    basis = torch.randn(8, 4097).half(); scales = torch.ones(8)
    c = project(basis, scales, torch.randn(4097))          # fp32 [8]
    w = torch.empty(4097, dtype=torch.bfloat16)
    reconstruct_(w, torch.zeros(4097), basis, scales, c)    # w = 0 + P c
"""

from __future__ import annotations

from torch import Tensor

from . import _ops
from ._layout import QUANT_BLOCK, ROW_ALIGN, empty_basis, empty_scales
from ._ops import CUDA_MAX_ORTH_RANK, MAX_RANK

__all__ = [
    "CUDA_MAX_ORTH_RANK",
    "MAX_RANK",
    "QUANT_BLOCK",
    "ROW_ALIGN",
    "empty_basis",
    "empty_scales",
    "orthogonalize_",
    "project",
    "reconstruct_",
    "step_",
    "subspace_step_",
    "write_params_",
]


def project(basis: Tensor, scales: Tensor, x: Tensor, backend: str = "auto") -> Tensor:
    """``P^T x``.

    Args:
        basis: [K, D] fp16/bf16/fp32/int8, rows contiguous (a column slice of a wider basis is
            fine; rows that start 16-byte aligned, as ``empty_basis`` makes them, are read
            fastest).
        scales: fp32 [K] (float basis) or [K, ceil(D / 64)] (int8 basis; its blocks start at
            the basis's column 0).
        x: [D] or [B, D], fp32/bf16/fp16, contiguous.

    Returns:
        fp32 [K] (or [B, K]).

    Raises:
        ValueError: K above ``MAX_RANK`` (8192).
    """
    return _ops.project(basis, scales, x, backend)


def reconstruct_(
    out: Tensor, w0: Tensor, basis: Tensor, scales: Tensor, alpha: Tensor, backend: str = "auto"
) -> None:
    """``out = w0 + P alpha``, computed in fp32 and rounded once into out's dtype.

    Args:
        out: [D] contiguous, any floating dtype; overwritten.
        w0: [D] fp32. basis: [K, D]. scales: as in ``project``. alpha: [K] fp32.

    Raises:
        ValueError: K above ``MAX_RANK`` (8192).
    """
    _ops.reconstruct_(out, w0, basis, scales, alpha, backend)


def orthogonalize_(basis: Tensor, scales: Tensor, sample: Tensor, rank: int, backend: str = "auto") -> Tensor:
    """Orthogonalise ``sample`` against columns [0, rank) by CGS2; store the remainder.

    Column ``rank`` (when ``rank < K``) receives the normalised remainder ``u / ||u||`` with its
    scale; columns below ``rank`` are read only. Three passes over the basis.

    Args:
        basis: [K, D] contiguous, modified in row ``rank``. scales: as in ``project``, likewise
            (an int8 row is quantised as it is stored: each block of 64 values to
            ``rint(u * 127 / max|u|)``, with its scale).
        sample: [D] fp32. rank: number of valid columns, 0 <= rank <= K.

    Returns:
        fp64 [rank + 2]: the coefficients ``h`` (``sample ~ P h + ||u|| * new column``), then
        ``||u||`` and ``||sample||``. ``||u|| / ||sample||`` is the relative residual.

    Raises:
        ValueError: K above ``MAX_RANK`` (8192); with ``backend="cuda"``, rank above
            ``CUDA_MAX_ORTH_RANK`` (2048).
    """
    return _ops.orthogonalize_(basis, scales, sample, rank, backend)


def subspace_step_(
    alpha: Tensor,
    momentum_buffer: Tensor,
    counters: Tensor,
    coord_grad: Tensor,
    gram: Tensor,
    pw0: Tensor,
    lr: float | Tensor,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    backend: str = "auto",
) -> None:
    """SGD with momentum and L2 weight decay on the K coordinates, on the device.

    ``d = coord_grad + weight_decay * (pw0 + gram @ alpha)``; ``buf = d`` on the first step taken,
    else ``momentum * buf + (1 - dampening) * d``; ``alpha -= lr * (d + momentum * buf if nesterov
    else buf)``. A non-finite ``coord_grad`` skips the step. ``counters`` (int64 [2]) counts steps
    taken and skipped.

    Args:
        alpha, momentum_buffer, coord_grad, pw0: fp32 [K] (``pw0 = P^T w0``).
        counters: int64 [2]. gram: fp32 [K, K] (``P^T P``).
        lr: a number, or a 0-dim fp32 tensor on the device, which the kernels read when they run
            (under CUDA-graph replay too); the ``twa::subspace_step_`` op itself takes the tensor.

    Raises:
        ValueError: K above ``MAX_RANK`` (8192).
    """
    _ops.subspace_step_(
        alpha, momentum_buffer, counters, coord_grad, gram, pw0,
        _ops.lr_tensor(lr, alpha.device), momentum, dampening, weight_decay, nesterov, backend,
    )  # fmt: skip


def step_(
    params: list[Tensor],
    grads: list[Tensor | None],
    workspace: Tensor,
    w0: Tensor,
    basis: Tensor,
    scales: Tensor,
    alpha: Tensor,
    momentum_buffer: Tensor,
    counters: Tensor,
    gram: Tensor,
    pw0: Tensor,
    lr: float | Tensor,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    backend: str = "auto",
) -> None:
    """One whole TWA step over a parameter list: ``subspace_step_`` on ``c = P^T g``, then
    ``params <- w0 + P alpha`` (each parameter rounded once to its dtype).

    Args:
        params: the D values as a list of contiguous fp32/bf16/fp16 tensors, written in place.
        grads: one per parameter, shaped like it (None: a zero gradient), e.g. ``p.grad``.
        workspace: fp32 [D]; the reference and CUDA backends gather the gradients and build the
            weights in it, the Triton backend (fused kernels: the grads read and the params
            written in place, 3 launches) does not touch it.
        w0: fp32 [D]. basis, scales: as in ``project``. The rest: as in ``subspace_step_``.

    No host synchronisation; capturable in a CUDA graph on the Triton backend (see
    ``_triton.step``).

    Raises:
        ValueError: K above ``MAX_RANK`` (8192).
    """
    _ops.step_(
        params, grads, workspace, w0, basis, scales, alpha, momentum_buffer, counters, gram, pw0,
        _ops.lr_tensor(lr, alpha.device), momentum, dampening, weight_decay, nesterov, backend,
    )  # fmt: skip


def write_params_(
    params: list[Tensor],
    workspace: Tensor,
    w0: Tensor,
    basis: Tensor,
    scales: Tensor,
    coef: Tensor,
    segments: list[int] | None = None,
    backend: str = "auto",
) -> None:
    """``params <- w0 + P coef`` in place, each parameter rounded once to its dtype: the last
    pass of ``step_`` alone (a sharded step writes its local shards with it).

    Args:
        params: the D values as a list of contiguous fp32/bf16/fp16 tensors, written in place.
        workspace: fp32 [D]; the reference backend builds the weights in it, the Triton and
            CUDA backends (one launch writing the parameters directly) do not touch it.
        w0: fp32 [D]. basis, scales: as in ``project``.
        coef: fp32 [K]; or, with ``segments``, fp32 [rows, K].
        segments: None, or one coefficient row per parameter (non-decreasing: each row is a
            run of consecutive parameters, per-block coordinates): parameter i is
            ``w0_i + P_i coef[segments[i]]``.

    Raises:
        ValueError: K above ``MAX_RANK`` (8192).
    """
    _ops.write_params_(params, workspace, w0, basis, scales, coef, segments, backend)
