"""Plain-PyTorch implementations of the ``twa::`` ops (backend ``"torch"``); any device.

This is the CPU path, the baseline of the benchmarks and the contract the Triton and CUDA
kernels follow. The basis is processed in column chunks: each chunk is upcast to fp32 (fp64 in
``orthogonalize_``) before any arithmetic, so there is never a full fp32 copy of the basis and
never half-precision matrix arithmetic on the CPU (which is slow there: no half GEMM kernels).

Shapes follow ``_ops``: ``basis`` [K, D] (rows contiguous, may be a column slice of a wider
basis); a float basis has ``scales`` fp32 [K], column i of P being ``scales[i] * basis[i]``; an
int8 basis has one fp32 scale per block of ``QUANT_BLOCK`` values, ``scales`` [K, ceil(D / 64)],
applied to each chunk as it is upcast.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._layout import QMAX, QUANT_BLOCK, blockwise
from ._params import copy_or_zero_, segment_ranges

# Elements of one upcast basis chunk. On the CPU 2^20 fp32 values (4 MiB) stay in the L2/L3 of
# the machines measured (2 cores, 24 GiB) while BLAS runs over them; larger chunks were no
# faster there. On accelerators the chunk only bounds the temporary: 2^28 values (1 GiB).
CPU_CHUNK_ELEMENTS = 1 << 20
DEVICE_CHUNK_ELEMENTS = 1 << 28

# orthogonalize_ stores each new row scaled so its largest entry is about ROW_AMAX. fp16 keeps
# 11 significant bits from 6.1e-5 to 65504, so 2^12 leaves 16x headroom for the final correction
# (which is tiny) and keeps entries down to 1e-9 of the largest normal: a unit row over 10^8
# entries (typical entry 1e-4) would otherwise sit in fp16's subnormals.
ROW_AMAX = 4096.0


def chunk_columns(rows: int, device: torch.device) -> int:
    """Columns per chunk so that a ``rows x chunk`` upcast stays within the chunk budget; a
    multiple of ``QUANT_BLOCK``, so that every chunk but the last holds whole scale blocks."""
    budget = CPU_CHUNK_ELEMENTS if device.type == "cpu" else DEVICE_CHUNK_ELEMENTS
    return max(256, budget // max(rows, 1) // QUANT_BLOCK * QUANT_BLOCK)


def _column_chunks(D: int, rows: int, device: torch.device):
    step = chunk_columns(rows, device)
    for start in range(0, D, step):
        yield slice(start, min(start + step, D))


def _upcast_chunks(basis: Tensor, dtype: torch.dtype, block_scales: Tensor | None = None):
    """``(cols, basis[:, cols] in dtype)`` chunk by chunk, upcast into one reused buffer; with
    ``block_scales`` (an int8 basis's [K, ceil(D / 64)]) each chunk is multiplied by its scales.

    Reusing the buffer matters on the CPU: a fresh 4 MiB tensor per chunk made the fp16 step
    1.48x slower than the fp32 one at D = 2^22, K = 8 (1.18x with the reused buffer). A basis
    already in ``dtype`` (and without block scales) is used as is.
    """
    K, D = basis.shape
    step = chunk_columns(K, basis.device)
    buf = None
    if basis.dtype != dtype or block_scales is not None:
        buf = torch.empty(K, min(step, D), dtype=dtype, device=basis.device)
    for cols in _column_chunks(D, K, basis.device):
        if buf is None:
            yield cols, basis[:, cols]
            continue
        chunk = buf[:, : cols.stop - cols.start]
        chunk.copy_(basis[:, cols])
        if block_scales is not None:
            apply_block_scales_(chunk, block_scales[:, cols.start // QUANT_BLOCK :])
        yield cols, chunk


def apply_block_scales_(chunk: Tensor, scales: Tensor) -> Tensor:
    """``chunk[:, j] *= scales[:, j // QUANT_BLOCK]`` in place: ``chunk`` [K, n] (rows contiguous),
    ``scales`` [K, >= ceil(n / QUANT_BLOCK)]."""
    n = chunk.shape[1]
    whole = n // QUANT_BLOCK
    body = chunk[:, : whole * QUANT_BLOCK].unflatten(1, (whole, QUANT_BLOCK))
    body.mul_(scales[:, :whole, None].to(chunk.dtype))
    if whole * QUANT_BLOCK < n:
        chunk[:, whole * QUANT_BLOCK :].mul_(scales[:, whole : whole + 1].to(chunk.dtype))
    return chunk


def _dequantised_chunks(basis: Tensor, scales: Tensor, dtype: torch.dtype):
    """``(cols, chunk, row_scales)``: chunks of P, up to the row scales ``row_scales`` still to
    apply (a float basis: ``scales``; an int8 basis: None, its block scales are in the chunks)."""
    if blockwise(basis.dtype):
        return _upcast_chunks(basis, dtype, scales), None
    return _upcast_chunks(basis, dtype), scales


def project(basis: Tensor, scales: Tensor, x: Tensor) -> Tensor:
    """``P^T x``: x [D] or [B, D] (fp32/bf16/fp16) -> fp32 [K] or [B, K]; fp32 accumulation."""
    K, D = basis.shape
    xb = x if x.dim() == 2 else x.unsqueeze(0)
    out = torch.zeros(xb.shape[0], K, dtype=torch.float32, device=x.device)
    chunks, row_scales = _dequantised_chunks(basis, scales, torch.float32)
    for cols, P in chunks:
        out.addmm_(xb[:, cols].float(), P.T)
    if row_scales is not None:
        out.mul_(row_scales)
    return out if x.dim() == 2 else out.squeeze(0)


def reconstruct_(out: Tensor, w0: Tensor, basis: Tensor, scales: Tensor, alpha: Tensor) -> None:
    """``out = w0 + P alpha`` (fp32 arithmetic, then rounded once to out's dtype)."""
    chunks, row_scales = _dequantised_chunks(basis, scales, torch.float32)
    coef = (alpha if row_scales is None else alpha * row_scales).unsqueeze(0)
    for cols, P in chunks:
        if out.dtype == torch.float32:
            torch.addmm(w0[cols].unsqueeze(0), coef, P, out=out[cols].unsqueeze(0))
        else:
            out[cols].copy_(torch.addmm(w0[cols].unsqueeze(0), coef, P).squeeze(0))


def orthogonalize_(
    basis: Tensor,
    scales: Tensor,
    sample: Tensor,
    rank: int,
    *,
    all_reduce: Callable[[Tensor, str], None] | None = None,
) -> Tensor:
    """Classical Gram-Schmidt with one reorthogonalisation (CGS2) in three passes over the basis.

    With P the columns [0, rank) and v the fp32 ``sample`` [D]:

    1. ``c1 = P^T v`` and ``||v||^2``;
    2. ``v1 = v - P c1`` on the fly, ``c2 = P^T v1``, ``||v1||^2`` and ``max|v1|``;
    3. ``u = v - P (c1 + c2)``, stored as column ``rank`` (when ``rank < K``). A float basis
       stores ``u`` scaled by ``ROW_AMAX / max|v1|``, with ``scales[rank] = max|v1| / (ROW_AMAX
       ||u||)``. An int8 basis stores each block of ``QUANT_BLOCK`` values of ``u`` as
       ``rint(u * QMAX / a)`` with ``a`` the block's ``max|u|`` (fp64), and ``scales[rank, b] =
       a / (QMAX ||u||)``: quantised as it is written, no other pass.

    ``||u||^2 = ||v1||^2 - ||c2||^2`` (exact for orthonormal P) saves a fourth pass. Dot products
    accumulate in fp64: the op is memory-bound, so the wider accumulator costs nothing on GPUs,
    and it keeps ``max|P^T P - I|`` near 1e-6 at D = 10^7 instead of 7e-4 (fp32).

    ``all_reduce(tensor, op)`` (``op`` "sum" or "max"), when given, combines the partial sums and
    the maximum in place between the passes: the basis and sample are then one shard of the
    columns of a basis sharded along D (``twa_kernels.distributed``), and every shard stores its
    part of the new column with the same row scale (a float basis) or its own block scales
    (int8, whose blocks start at each shard's first column).

    Returns fp64 ``[c1 + c2 (rank values), ||u||, ||v||]``; the caller decides from ``||u||/||v||``
    whether column ``rank`` joins the basis. Nothing below row ``rank`` is written.
    """
    K, D = basis.shape
    dev = sample.device
    P, Ps = basis[:rank], scales[:rank]
    quantised = blockwise(basis.dtype)
    s = torch.ones(rank, dtype=torch.float64, device=dev) if quantised else Ps.double()

    def chunks():
        return _dequantised_chunks(P, Ps, torch.float64)[0]

    sums = torch.zeros(rank + 1, dtype=torch.float64, device=dev)  # [P^T v, ||v||^2]
    for cols, Pc in chunks():
        v = sample[cols].double()
        sums[:rank] += Pc @ v
        sums[rank] += v @ v
    if all_reduce is not None:
        all_reduce(sums, "sum")
    c1, vv = sums[:rank] * s, sums[rank]

    sums = torch.zeros(rank + 1, dtype=torch.float64, device=dev)  # [P^T v1, ||v1||^2]
    amax = torch.zeros(1, dtype=torch.float64, device=dev)
    sc1 = s * c1
    for cols, Pc in chunks():
        v1 = sample[cols].double() - sc1 @ Pc
        sums[:rank] += Pc @ v1
        sums[rank] += v1 @ v1
        torch.maximum(amax, v1.abs().max(), out=amax)
    if all_reduce is not None:
        all_reduce(sums, "sum")
        all_reduce(amax, "max")
    c2, ss, amax = sums[:rank] * s, sums[rank], amax[0]

    h = c1 + c2
    norm = (ss - c2 @ c2).clamp_min(0).sqrt()
    if rank < K:
        sh = s * h
        if quantised:
            for cols, Pc in chunks():
                u = sample[cols].double() - sh @ Pc
                q, block_amax = quantise_blocks(u)
                basis[rank, cols] = q
                b0 = cols.start // QUANT_BLOCK
                scale = torch.where(norm > 0, block_amax / (QMAX * norm), torch.zeros_like(block_amax))
                scales[rank, b0 : b0 + block_amax.numel()] = scale.float()
        else:
            # A zero remainder stores a zero column with scale 0 (the caller rejects it anyway).
            inv = torch.where(amax > 0, ROW_AMAX / amax, torch.zeros_like(amax))
            scale = torch.where(norm > 0, amax / (ROW_AMAX * norm), torch.zeros_like(norm))
            limit = torch.finfo(basis.dtype).max
            for cols, Pc in chunks():
                u = sample[cols].double() - sh @ Pc
                basis[rank, cols] = (u * inv).clamp_(-limit, limit).to(basis.dtype)
            scales[rank] = scale.float()
    return torch.cat([h, norm.view(1), vv.sqrt().view(1)])


def quantise_blocks(u: Tensor) -> tuple[Tensor, Tensor]:
    """``(q, amax)``: fp64 ``u`` [n] as int8 ``q = rint(u * (QMAX / amax_b))`` per block b of
    ``QUANT_BLOCK`` values (the last one may be shorter), with the blocks' ``max|u|`` (fp64
    [ceil(n / QUANT_BLOCK)]). A block of zeros (or of nan) stores zeros.

    ``QMAX / amax_b`` is formed first and then multiplied, as the kernels do, so that the same
    fp64 ``u`` gives the same bytes on every backend; ``rint`` rounds half to even there too.
    """
    n = u.numel()
    nb = -(-n // QUANT_BLOCK)
    padded = torch.nn.functional.pad(u, (0, nb * QUANT_BLOCK - n)).view(nb, QUANT_BLOCK)
    amax = padded.abs().amax(dim=1)
    inv = torch.where(amax > 0, QMAX / amax, torch.zeros_like(amax))
    q = torch.round(padded * inv[:, None]).nan_to_num_(0.0).clamp_(-QMAX, QMAX)
    return q.view(-1)[:n].to(torch.int8), amax


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
) -> None:
    """One SGD step on the coordinates (torch.optim.SGD's update, restated in K dimensions).

    ``d = c + weight_decay * (P^T w0 + G alpha)`` is the coordinate form of ``P^T (g + wd w)``
    with ``w = w0 + P alpha`` and ``G = P^T P``. ``counters = [steps taken, steps skipped]``:
    a step whose ``coord_grad`` is not finite changes nothing but ``counters[1]``; the first
    step taken sets the momentum buffer to ``d`` as torch does. ``lr`` is a 0-dim fp32 tensor on
    the device, read there and never on the host. No host synchronisation.
    """
    finite = torch.isfinite(coord_grad).all()
    d = coord_grad
    if weight_decay != 0:
        d = d + weight_decay * (pw0 + gram @ alpha)
    if momentum != 0:
        first = counters[0] == 0
        buf = torch.where(first, d, momentum * momentum_buffer + (1 - dampening) * d)
        update = d + momentum * buf if nesterov else buf
        momentum_buffer.copy_(torch.where(finite, buf, momentum_buffer))
    else:
        update = d
    alpha.copy_(torch.where(finite, alpha - lr * update, alpha))
    counters.add_(torch.stack([finite, ~finite]).long())


def gram(basis: Tensor, scales: Tensor) -> Tensor:
    """``G = P^T P`` of the stored columns in fp64: [K, K]. Not an op: built once per optimizer."""
    K, D = basis.shape
    G = torch.zeros(K, K, dtype=torch.float64, device=basis.device)
    chunks, row_scales = _dequantised_chunks(basis, scales, torch.float64)
    for _, Pc in chunks:
        G += Pc @ Pc.T
    if row_scales is None:
        return G
    s = row_scales.double()
    return G * s[:, None] * s[None, :]


# ---- per-block coefficients: D cut into contiguous blocks, one coefficient vector each --------


def _block_pieces(cols: slice, blocks: list[tuple[int, int]]):
    """``(block index, columns of the chunk, the same columns of D)`` for every block that
    overlaps the chunk ``cols`` of D (``blocks``: ``[start, stop)`` ranges, in order)."""
    for i, (start, stop) in enumerate(blocks):
        a, b = max(start, cols.start), min(stop, cols.stop)
        if a < b:
            yield i, slice(a - cols.start, b - cols.start), slice(a, b)


def project_blocks(basis: Tensor, scales: Tensor, x: Tensor, blocks: list[tuple[int, int]]) -> Tensor:
    """``P[S_l]^T x[S_l]`` for each block l of D: fp32 [L, K] (fp32 accumulation)."""
    K = basis.shape[0]
    out = torch.zeros(len(blocks), K, dtype=torch.float32, device=x.device)
    chunks, row_scales = _dequantised_chunks(basis, scales, torch.float32)
    for cols, P in chunks:
        for i, local, flat in _block_pieces(cols, blocks):
            out[i] += P[:, local] @ x[flat].float()
    if row_scales is not None:
        out.mul_(row_scales)
    return out


def reconstruct_blocks_(
    out: Tensor, w0: Tensor, basis: Tensor, scales: Tensor, coef: Tensor, blocks: list[tuple[int, int]]
) -> None:
    """``out[S_l] = w0[S_l] + P[S_l] coef[l]`` for each block l (coef fp32 [L, K]); fp32
    arithmetic, rounded once to out's dtype."""
    chunks, row_scales = _dequantised_chunks(basis, scales, torch.float32)
    coef = coef if row_scales is None else coef * row_scales
    for cols, P in chunks:
        for i, local, flat in _block_pieces(cols, blocks):
            out[flat] = w0[flat] + coef[i] @ P[:, local]


def gram_blocks(basis: Tensor, scales: Tensor, blocks: list[tuple[int, int]]) -> Tensor:
    """``G_l = P[S_l]^T P[S_l]`` of the stored columns for each block, fp64 [L, K, K]."""
    K = basis.shape[0]
    G = torch.zeros(len(blocks), K, K, dtype=torch.float64, device=basis.device)
    chunks, row_scales = _dequantised_chunks(basis, scales, torch.float64)
    for cols, P in chunks:
        for i, local, _ in _block_pieces(cols, blocks):
            G[i] += P[:, local] @ P[:, local].T
    if row_scales is None:
        return G
    s = row_scales.double()
    return G * s[:, None] * s[None, :]


def _flat_views(workspace: Tensor, params: list[Tensor]) -> list[Tensor]:
    pieces = workspace.split([p.numel() for p in params])
    return [v.view(p.shape) for v, p in zip(pieces, params, strict=True)]


def gathered_projection(project_fn):
    """``project_grads`` made of a backend's ``project``: copy the grads into ``workspace``, project."""

    def project_grads(
        params: list[Tensor], grads: list[Tensor | None], workspace: Tensor, basis: Tensor, scales: Tensor,
        segments: list[int] | None = None,
    ) -> Tensor:  # fmt: skip
        copy_or_zero_(_flat_views(workspace, params), grads)
        if segments is None:
            return project_fn(basis, scales, workspace)
        ranges = segment_ranges([p.numel() for p in params], segments, segments[-1] + 1)
        return project_blocks(basis, scales, workspace, ranges)

    return project_grads


project_grads = gathered_projection(project)
project_grads.__doc__ = """``P^T g`` of a parameter list's gradients: fp32 [K]; with ``segments`` (one
row per parameter, non-decreasing) fp32 [segments[-1] + 1, K], row l the sum over the
parameters of row l (the plain-PyTorch per-block projection on any backend).

``grads`` holds one gradient per parameter (None: a zero gradient; fp32, bf16 or fp16, shaped
like the parameter); ``params`` gives the layout (their values are not read). ``workspace`` is
fp32 [D]: it receives the flat gradient, which ``project`` then reads.
"""


def block_step_(
    alpha: Tensor, buf1: Tensor, buf2: Tensor, counters: Tensor, coord_grad: Tensor, gram: Tensor,
    pw0: Tensor, inv_norms: Tensor, coef: Tensor, lr: Tensor, rule: str, momentum: float,
    dampening: float, weight_decay: float, nesterov: bool, beta1: float, beta2: float, eps: float,
) -> None:  # fmt: skip
    """One step of per-block coordinates (``twa_kernels._blocks``), fp32 [L, K] each.

    ``c = coord_grad * inv_norms`` (``P_l^T g_l`` of the normalised columns) and
    ``r = pw0 + G a`` (``r_l = P_l^T w_l``; gram fp32 [L, K, K]); ``rule`` "sgd" takes
    ``torch.optim.SGD``'s step on every ``a_l`` with gradient ``c + weight_decay * r`` (buf1: its
    momentum buffer), "adamw" the decoupled decay ``a -= lr * weight_decay * r`` then
    ``torch.optim.AdamW``'s update with gradient c (buf1, buf2: the moments; the step number
    is ``counters[0] + 1``). Nothing changes but ``counters[1] += 1`` when any c is not finite
    (else ``counters[0] += 1``). Then ``coef = alpha * inv_norms``, the coefficients of the stored
    columns that ``write_params_`` takes. No host synchronisation.
    """
    c = coord_grad * inv_norms
    finite = torch.isfinite(c).all()
    r = pw0 + torch.bmm(gram, alpha.unsqueeze(2)).squeeze(2)
    if rule == "sgd":
        d = c + weight_decay * r
        update = d
        if momentum != 0:
            buf = torch.where(counters[0] == 0, d, momentum * buf1 + (1 - dampening) * d)
            buf1.copy_(torch.where(finite, buf, buf1))
            update = d + momentum * buf if nesterov else buf
        new = alpha - lr * update
    else:
        decayed = alpha - lr * weight_decay * r
        m = buf1 + (1 - beta1) * (c - buf1)
        v = beta2 * buf2 + (1 - beta2) * c * c
        t = (counters[0] + 1).to(torch.float32)
        new = decayed - lr * (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
        buf1.copy_(torch.where(finite, m, buf1))
        buf2.copy_(torch.where(finite, v, buf2))
    alpha.copy_(torch.where(finite, new, alpha))
    counters.add_(torch.stack([finite, ~finite]).long())
    coef.copy_(alpha * inv_norms)


def write_params_(
    params: list[Tensor], workspace: Tensor, w0: Tensor, basis: Tensor, scales: Tensor, coef: Tensor,
    segments: list[int] | None,
) -> None:  # fmt: skip
    """``params <- w0 + P coef``, each parameter rounded to its dtype, through ``workspace``
    (fp32 [D]); with ``segments``, parameter i takes row ``segments[i]`` of coef [rows, K]."""
    if segments is None:
        reconstruct_(workspace, w0, basis, scales, coef)
    else:
        ranges = segment_ranges([p.numel() for p in params], segments, coef.shape[0])
        reconstruct_blocks_(workspace, w0, basis, scales, coef, ranges)
    torch._foreach_copy_(params, _flat_views(workspace, params))


def composed_step(project_grads_fn, subspace_step_fn, reconstruct_fn):
    """``step_`` made of a backend's three ops: project the grads (through ``workspace``), update
    the coordinates, reconstruct the weights into ``workspace``, copy them out."""

    def step_(
        params: list[Tensor], grads: list[Tensor | None], workspace: Tensor, w0: Tensor,
        basis: Tensor, scales: Tensor, alpha: Tensor, momentum_buffer: Tensor, counters: Tensor,
        gram: Tensor, pw0: Tensor, lr: Tensor, momentum: float, dampening: float,
        weight_decay: float, nesterov: bool,
    ) -> None:  # fmt: skip
        coord_grad = project_grads_fn(params, grads, workspace, basis, scales)
        subspace_step_fn(
            alpha, momentum_buffer, counters, coord_grad, gram, pw0,
            lr, momentum, dampening, weight_decay, nesterov,
        )  # fmt: skip
        reconstruct_fn(workspace, w0, basis, scales, alpha)
        torch._foreach_copy_(params, _flat_views(workspace, params))

    return step_


step_ = composed_step(project_grads, subspace_step_, reconstruct_)


step_.__doc__ = """One TWA step over a parameter list: ``alpha <- SGD(alpha, P^T g)``, then
``params <- w0 + P alpha``.

``grads`` holds one gradient per parameter (None: a zero gradient); ``workspace`` is fp32 [D]
(the gradients in, the weights out); each parameter is written rounded to its dtype. The other
arguments are those of ``subspace_step_``. Nothing is allocated in proportion to D beyond the
chunks of ``project`` and ``reconstruct_``; no host synchronisation.
"""


def step_blocks_(
    params: list[Tensor], grads: list[Tensor | None], workspace: Tensor, w0: Tensor, basis: Tensor,
    scales: Tensor, alpha: Tensor, buf1: Tensor, buf2: Tensor, counters: Tensor, gram: Tensor,
    pw0: Tensor, inv_norms: Tensor, coef: Tensor, segments: list[int], lr: Tensor, rule: str,
    momentum: float, dampening: float, weight_decay: float, nesterov: bool, beta1: float,
    beta2: float, eps: float,
) -> None:  # fmt: skip
    """One step of per-block coordinates over a parameter list: ``project_grads`` per row of
    ``segments``, ``block_step_``, then ``write_params_`` with the new ``coef``."""
    coord = project_grads(params, grads, workspace, basis, scales, segments)
    block_step_(
        alpha, buf1, buf2, counters, coord, gram, pw0, inv_norms, coef, lr, rule, momentum, dampening,
        weight_decay, nesterov, beta1, beta2, eps,
    )  # fmt: skip
    write_params_(params, workspace, w0, basis, scales, coef, segments)
