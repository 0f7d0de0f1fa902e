"""The fused TWA step: gradients of a parameter list in, parameters out, in 3 kernel launches.

1. ``_step_project_kernel``: ``P^T g`` straight from the ``.grad`` tensors (stage 1 partials);
2. ``subspace_step._subspace_step_kernel`` with ``FROM_PARTIALS``: adds the partials in a fixed
   order, applies the scales and takes the K-dimensional SGD step (skipped on the device when
   the coordinate gradient is not finite);
3. ``_step_write_kernel``: ``w = w0 + P alpha`` written into every parameter in its dtype.

The parameters are cut into blocks of ``BLOCK`` columns that never straddle two parameters;
the block and parameter tables (``twa_kernels._param_table``, shared with the CUDA step) tell
each block where its basis columns, its grad and its parameter are. CUDA graphs: the step can
be captured once an eager step has run with the very ``.grad`` tensors the graph will read
(that step also autotunes and compiles the kernels); see ``_param_table``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._layout import warn_if_narrow
from .._ops import check_rank
from .._param_table import BLOCK, BLOCK_FIELDS, FIELDS, Plan, plan_for
from . import subspace_step
from ._common import (
    add_combination,
    configs,
    dot_tiles,
    pow2,
    split_items,
    to_storage,
    tuned,
)
from .project import reduce_partials

# [BLOCK_K, 512] basis tiles read in 16-byte loads; STAGES > 1 prefetches the next tiles of the
# K loop into shared memory (3 stages of a [16, 512] fp16 tile: 48 KB per program).
_CONFIGS = [
    triton.Config({"BLOCK_K": 16, "STAGES": 1}, num_warps=8),
    triton.Config({"BLOCK_K": 8, "STAGES": 1}, num_warps=4),
    triton.Config({"BLOCK_K": 32, "STAGES": 1}, num_warps=8),
    triton.Config({"BLOCK_K": 16, "STAGES": 3}, num_warps=8),
    triton.Config({"BLOCK_K": 8, "STAGES": 3}, num_warps=4),
]


@triton.jit
def _load_as_f32(addr, code, offs, mask):
    # Exactly one of the three masked loads is live (none for NO_GRAD): no memory is touched
    # through a pointer of the wrong type, and a missing grad reads as zeros.
    v = tl.load(addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask & (code == 0), other=0.0)
    b = tl.load(addr.to(tl.pointer_type(tl.bfloat16)) + offs, mask=mask & (code == 1), other=0.0)
    h = tl.load(addr.to(tl.pointer_type(tl.float16)) + offs, mask=mask & (code == 2), other=0.0)
    return v + b.to(tl.float32) + h.to(tl.float32)


@triton.jit
def _store_from_f32(addr, code, offs, val, mask):
    tl.store(addr.to(tl.pointer_type(tl.float32)) + offs, val, mask=mask & (code == 0))
    tl.store(
        addr.to(tl.pointer_type(tl.bfloat16)) + offs,
        to_storage(val, tl.bfloat16),
        mask=mask & (code == 1),
    )
    tl.store(addr.to(tl.pointer_type(tl.float16)) + offs, val.to(tl.float16), mask=mask & (code == 2))


@triton.jit
def _locate(ptab_ptr, btab_ptr, blk, FIELDS: tl.constexpr, BLOCK_FIELDS: tl.constexpr):
    """Block ``blk``'s parameter table row and first element within its parameter."""
    entry = btab_ptr + BLOCK_FIELDS * blk
    return ptab_ptr + tl.load(entry) * FIELDS, tl.load(entry + 1)


@triton.jit
def _is_fast(row, first, BLOCK_D: tl.constexpr):
    """Whole block (no mask) of a parameter flagged ALIGNED in the table."""
    return (first + BLOCK_D <= tl.load(row + 1)) & (tl.load(row + 6) != 0)


@triton.jit
def _block(row, first, BLOCK_D: tl.constexpr, FAST: tl.constexpr):
    """The block's ``(local offsets, mask, basis columns)``.

    A FAST block is whole (no mask) and its parameter, grad and basis columns start 16-byte
    aligned (the table's ALIGNED field); the hints let the compiler prove it and load the
    basis rows in 16-byte vectors, where a column mask or an unknown offset gives 2-byte loads.
    """
    col0 = tl.load(row) + first
    if FAST:
        first = tl.multiple_of(first, 16)
        col0 = tl.multiple_of(col0, 16)
        mask = tl.full([BLOCK_D], 1, tl.int1)
    local = first + tl.arange(0, BLOCK_D).to(tl.int64)
    if not FAST:
        mask = local < tl.load(row + 1)
    return local, mask, col0 + tl.arange(0, BLOCK_D).to(tl.int64)


@triton.jit
def _address(row, field, FAST: tl.constexpr):
    addr = tl.load(row + field)
    if FAST:
        addr = tl.multiple_of(addr, 16)
    return addr


@triton.jit
def _block_dot(
    acc, row, first, basis_ptr, row_stride, K,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, NT: tl.constexpr, STAGES: tl.constexpr,
    FAST: tl.constexpr,
):  # fmt: skip
    """``acc`` [NT, BLOCK_K] plus the block's part of ``P^T g`` (its grad read once)."""
    local, mask_d, cols = _block(row, first, BLOCK_D, FAST)
    g = _load_as_f32(_address(row, 5, FAST), tl.load(row + 3), local, mask_d)
    return dot_tiles(acc, basis_ptr, row_stride, cols, mask_d, g, K, BLOCK_K, NT, STAGES)


@triton.autotune(configs=configs(_CONFIGS), key=["K", "NBLK"])
@triton.heuristics({"NT": lambda args: pow2(triton.cdiv(args["K"], args["BLOCK_K"]))})
@triton.jit
def _step_project_kernel(
    ptab_ptr, btab_ptr, basis_ptr, row_stride, part_ptr, K, NBLK, PER,
    FIELDS: tl.constexpr, BLOCK_FIELDS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    STAGES: tl.constexpr,
    NT: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    b_lo = pid * PER
    b_hi = tl.minimum(b_lo + PER, NBLK)
    # Blocks outside, K tiles inside: each block's table entries and grad are read once (with
    # K tiles outside they were read once per tile: 12 % more bytes at K = 301, BLOCK_K = 16).
    acc = tl.zeros([NT, BLOCK_K], dtype=tl.float32)
    for blk in range(b_lo, b_hi):
        row, first = _locate(ptab_ptr, btab_ptr, blk, FIELDS, BLOCK_FIELDS)
        if _is_fast(row, first, BLOCK_D):
            acc = _block_dot(
                acc, row, first, basis_ptr, row_stride, K, BLOCK_K, BLOCK_D, NT, STAGES, FAST=True
            )  # fmt: skip
        else:
            acc = _block_dot(
                acc, row, first, basis_ptr, row_stride, K, BLOCK_K, BLOCK_D, NT, STAGES, FAST=False
            )  # fmt: skip
    offs = tl.arange(0, NT).to(tl.int64)[:, None] * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)[None, :]
    tl.store(part_ptr + pid * K + offs, acc, mask=offs < K)


@triton.jit
def _block_write(
    row, first, w0_ptr, basis_ptr, row_stride, scales_ptr, alpha_ptr, K,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    """The block's parameter values ``w0 + P alpha``, written in the parameter's dtype."""
    local, mask_d, cols = _block(row, first, BLOCK_D, FAST)
    acc = tl.load(w0_ptr + cols, mask=mask_d, other=0.0)
    acc = add_combination(acc, basis_ptr, row_stride, scales_ptr, alpha_ptr, K, cols, mask_d, BLOCK_K, STAGES)
    _store_from_f32(_address(row, 4, FAST), tl.load(row + 2), local, acc, mask_d)


@triton.autotune(configs=configs(_CONFIGS), key=["K", "NBLK"])
@triton.jit
def _step_write_kernel(
    ptab_ptr, btab_ptr, w0_ptr, basis_ptr, row_stride, scales_ptr, alpha_ptr, K, NBLK, PER,
    FIELDS: tl.constexpr, BLOCK_FIELDS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    b_lo = pid * PER
    b_hi = tl.minimum(b_lo + PER, NBLK)
    for blk in range(b_lo, b_hi):
        row, first = _locate(ptab_ptr, btab_ptr, blk, FIELDS, BLOCK_FIELDS)
        if _is_fast(row, first, BLOCK_D):
            _block_write(
                row, first, w0_ptr, basis_ptr, row_stride, scales_ptr, alpha_ptr, K,
                BLOCK_K, BLOCK_D, STAGES, FAST=True,
            )  # fmt: skip
        else:
            _block_write(
                row, first, w0_ptr, basis_ptr, row_stride, scales_ptr, alpha_ptr, K,
                BLOCK_K, BLOCK_D, STAGES, FAST=False,
            )  # fmt: skip


def fused_twa_step(
    params: list[Tensor], w0: Tensor, basis: Tensor, scales: Tensor,
    alpha: Tensor, momentum_buffer: Tensor, counters: Tensor, gram: Tensor, pw0: Tensor,
    hyper,
) -> None:  # fmt: skip
    """One TWA step in 3 launches, with no flat work buffer: ``step_`` on the parameters' own
    ``.grad`` tensors, with ``hyper`` a ``_steps.Hyper``.

    Reads ``p.grad`` of every parameter in place and writes the parameters in place. No host
    synchronisation, so the step can be captured in a CUDA graph after one eager step with the
    same ``.grad`` tensors (see the module docstring). The graph then reads the grads at the
    addresses they had at capture: keep them (``zero_grad(set_to_none=False)``, gradients
    written or accumulated in place). ``hyper.lr`` (a 0-dim fp32 tensor) is read from device
    memory, so replays use the value it holds then (an LR scheduler filling the tensor in place
    works under capture); ``momentum``, ``dampening`` and ``weight_decay`` are kernel
    arguments, fixed in the graph at their capture values.

    K (basis rows) is at most ``twa_kernels.ops.MAX_RANK`` (8192); above it ``ValueError``.
    """
    step_(
        params, [p.grad for p in params], None, w0, basis, scales, alpha, momentum_buffer,
        counters, gram, pw0, hyper.lr, hyper.momentum, hyper.dampening, hyper.weight_decay,
        hyper.nesterov,
    )  # fmt: skip


def _grid(plan: Plan) -> tuple[int, int]:
    return split_items(max(plan.nblk, 1), plan.device)


def _project_partials(plan: Plan, ptab: Tensor, basis: Tensor) -> Tensor:
    """Stage 1 of ``P^T g`` straight from the grads the table points at: partials [grid, K]."""
    grid, per = _grid(plan)
    part = plan.workspace("part", (grid, basis.shape[0]))
    tuned(_step_project_kernel)[(grid,)](
        ptab, plan.btab, basis, basis.stride(0), part, basis.shape[0], plan.nblk, per,
        FIELDS=FIELDS, BLOCK_FIELDS=BLOCK_FIELDS, BLOCK_D=BLOCK,
    )  # fmt: skip
    return part


def project_grads(
    params: list[Tensor], grads: list[Tensor | None], workspace: Tensor | None, basis: Tensor, scales: Tensor
) -> Tensor:
    """``twa::project_grads`` on the Triton backend (see ``reference.project_grads``): the fused
    step's first kernel reads ``grads`` in place, then the partials are added in a fixed order
    and scaled; ``workspace`` is not used. fp32 [K]."""
    warn_if_narrow(basis, "triton")
    plan = plan_for(params, basis.device)
    ptab, keep = plan.table(params, grads)
    part = _project_partials(plan, ptab, basis)
    del keep  # contiguous copies of strided grads live until the launch is queued
    return reduce_partials(part.unsqueeze(1), scales).squeeze(0)


def step_(
    params: list[Tensor], grads: list[Tensor | None], workspace: Tensor | None, w0: Tensor,
    basis: Tensor, scales: Tensor, alpha: Tensor, momentum_buffer: Tensor, counters: Tensor,
    gram: Tensor, pw0: Tensor, lr: Tensor, momentum: float, dampening: float,
    weight_decay: float, nesterov: bool,
) -> None:  # fmt: skip
    """``twa::step_`` on the Triton backend (see ``reference.step_``): the fused kernels read
    ``grads`` and write ``params`` in place; ``workspace`` is not used."""
    K, D = basis.shape
    check_rank("fused TWA step", K)  # the K-dimensional step kernel's limit (subspace_step)
    warn_if_narrow(basis, "triton")
    plan = plan_for(params, basis.device)
    torch._check(plan.numel == D, lambda: f"parameters hold {plan.numel} values, the basis has D={D}")
    ptab, keep = plan.table(params, grads)
    part = _project_partials(plan, ptab, basis)
    coord = plan.workspace("coord", (K,))
    subspace_step.launch(
        alpha, momentum_buffer, counters, coord, gram, pw0, lr, momentum, dampening, weight_decay,
        nesterov, part=part, scales=scales,
    )  # fmt: skip
    grid, per = _grid(plan)
    tuned(_step_write_kernel)[(grid,)](
        ptab, plan.btab, w0, basis, basis.stride(0), scales, alpha, K, plan.nblk, per,
        FIELDS=FIELDS, BLOCK_FIELDS=BLOCK_FIELDS, BLOCK_D=BLOCK,
    )  # fmt: skip
    del keep  # contiguous copies of strided grads live until all launches are queued
