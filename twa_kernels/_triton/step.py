"""The fused TWA step: gradients of a parameter list in, parameters out, in 3 kernel launches.

1. ``_step_project_kernel``: ``P^T g`` straight from the ``.grad`` tensors (stage 1 partials);
2. ``subspace_step._subspace_step_kernel`` with ``FROM_PARTIALS``: adds the partials in a fixed
   order, applies the scales and takes the K-dimensional SGD step (skipped on the device when
   the coordinate gradient is not finite);
3. ``_step_write_kernel``: ``w = w0 + P alpha`` written into every parameter in its dtype.

The parameters are cut into blocks of ``BLOCK`` columns that never straddle two parameters. A
block table ``[param index, first element]`` and a parameter table ``[flat offset, numel,
param dtype code, grad dtype code, param address, grad address, aligned]`` (int64) are built on
the host once per parameter list and kept on the device; kernels turn the addresses into typed pointers
(``int64.to(tl.pointer_type(...))``), which also works in the interpreter, where CPU tensors
keep their real addresses. Only the grad addresses can change between steps (``zero_grad``
frees grads by default); the parameter table is rebuilt and copied to the device (one small
asynchronous copy, no kernel, no host sync) only when they do.

CUDA graphs: the step can be captured (``torch.cuda.graph``) once an eager step has run with the
very ``.grad`` tensors the graph will read (that step also autotunes and compiles the kernels).
The graph holds the addresses of the parameter table, the block table and the workspaces, so a
plan that took part in a capture is never evicted and every table it captured stays alive. A
capture that would need a new table (grads reallocated since the eager step, or a grad that is
not contiguous, whose contiguous copy gets a new address each step) raises instead of recording
a copy from a temporary host buffer.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._layout import warn_if_narrow
from .._ops import check_rank
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

# Columns per block. Every parameter is padded to a whole number of blocks, so small tensors
# (biases, norms: 64-2048 values) waste at most one partly masked block each; 512 columns keep
# the [BLOCK_K, 512] fp16 basis tile at 1 KB per row.
BLOCK = 512
_FIELDS = 8  # int64 per row of the parameter table (7 used, padded to 64 bytes)
# A parameter whose flat offset (in values) and addresses are multiples of this takes the
# kernels' aligned path: 16-byte vector loads of the basis rows (given rows that start
# 16-byte aligned, see ``ops.empty_basis``) instead of 2-byte ones.
_ALIGN = 16
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
NO_GRAD = 3
_MAX_PLANS = 8

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
def _locate(ptab_ptr, btab_ptr, blk, FIELDS: tl.constexpr):
    """Block ``blk``'s parameter table row and first element within its parameter."""
    return ptab_ptr + tl.load(btab_ptr + 2 * blk) * FIELDS, tl.load(btab_ptr + 2 * blk + 1)


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
    FIELDS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
    NT: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    b_lo = pid * PER
    b_hi = tl.minimum(b_lo + PER, NBLK)
    # Blocks outside, K tiles inside: each block's table entries and grad are read once (with
    # K tiles outside they were read once per tile: 12 % more bytes at K = 301, BLOCK_K = 16).
    acc = tl.zeros([NT, BLOCK_K], dtype=tl.float32)
    for blk in range(b_lo, b_hi):
        row, first = _locate(ptab_ptr, btab_ptr, blk, FIELDS)
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
    FIELDS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    b_lo = pid * PER
    b_hi = tl.minimum(b_lo + PER, NBLK)
    for blk in range(b_lo, b_hi):
        row, first = _locate(ptab_ptr, btab_ptr, blk, FIELDS)
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


def _code(t: Tensor, what: str) -> int:
    code = DTYPE_CODES.get(t.dtype)
    if code is None:
        raise TypeError(f"fused TWA step: {what} dtype {t.dtype} is not fp32, bf16 or fp16")
    return code


class _Plan:
    """Block table and workspaces for one parameter list on one device."""

    def __init__(self, params: list[Tensor], device: torch.device):
        self.device = device
        self.offsets = []
        blocks = []
        off = 0
        for i, p in enumerate(params):
            if not p.is_contiguous():
                raise ValueError(f"fused TWA step: parameter {i} is not contiguous")
            _code(p, f"parameter {i}")
            self.offsets.append(off)
            blocks.extend((i, s) for s in range(0, p.numel(), BLOCK))
            off += p.numel()
        self.numel = off
        self.nblk = len(blocks)
        self.btab = torch.tensor(blocks or [(0, 0)], dtype=torch.int64).to(device)
        self.grid, self.per = split_items(max(self.nblk, 1), device)
        self.grad_key = None
        self.ptab = None
        self.work: dict[int, tuple[Tensor, Tensor]] = {}
        # Parameter tables read by captured CUDA graphs: kept for the plan's lifetime.
        self.captured: list[Tensor] = []

    def table(self, params: list[Tensor], grads: list[Tensor | None]) -> tuple[Tensor, list[Tensor]]:
        """The device parameter table for ``grads`` (one per parameter, None: zero gradient), and
        the grads copied to be contiguous."""
        keep = []
        given, grads = grads, []
        for g in given:
            if g is not None and not g.is_contiguous():
                g = g.contiguous()
                keep.append(g)
            grads.append(g)
        key = tuple(None if g is None else (g.data_ptr(), g.dtype) for g in grads)
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if capturing:
            if keep or key != self.grad_key:
                raise RuntimeError(
                    "fused TWA step: CUDA graph capture needs the parameter table of an eager "
                    "step run with the same contiguous .grad tensors (same addresses): run one "
                    "step before capturing and keep the grads (zero_grad(set_to_none=False))"
                )
            if not any(t is self.ptab for t in self.captured):
                self.captured.append(self.ptab)
        elif key != self.grad_key:
            rows = []
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                gcode = NO_GRAD if g is None else _code(g, f"grad of parameter {i}")
                gaddr = 0 if g is None else g.data_ptr()
                aligned = all(a % _ALIGN == 0 for a in (self.offsets[i], p.data_ptr(), gaddr))
                rows.append([self.offsets[i], p.numel(), _code(p, ""), gcode, p.data_ptr(), gaddr])
                rows[-1].append(int(aligned))
                rows[-1] += [0] * (_FIELDS - len(rows[-1]))
            host = torch.tensor(rows, dtype=torch.int64)
            if self.device.type == "cuda":
                host = host.pin_memory()
            # A fresh device tensor each time: a kernel still queued may read the previous one.
            self.ptab = host.to(self.device, non_blocking=True)
            self.grad_key = key
        return self.ptab, keep

    def workspace(self, K: int) -> tuple[Tensor, Tensor]:
        if K not in self.work:
            part = torch.empty(self.grid, K, dtype=torch.float32, device=self.device)
            coord = torch.empty(K, dtype=torch.float32, device=self.device)
            self.work[K] = (part, coord)
        return self.work[K]


_plans: OrderedDict[tuple, _Plan] = OrderedDict()


def plan_for(params: list[Tensor], device: torch.device) -> _Plan:
    key = (device, tuple((p.data_ptr(), p.numel(), p.dtype) for p in params))
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = _Plan(params, device)
        # Evict the least recently used plans, but never one a CUDA graph reads (nor this one).
        evictable = [k for k, p in _plans.items() if not p.captured and p is not plan]
        for old in evictable[: max(len(_plans) - _MAX_PLANS, 0)]:
            del _plans[old]
    else:
        _plans.move_to_end(key)
    return plan


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


def _project_partials(plan: _Plan, ptab: Tensor, basis: Tensor, part: Tensor) -> None:
    """Stage 1 of ``P^T g`` straight from the grads the table points at: ``part`` [grid, K]."""
    tuned(_step_project_kernel)[(plan.grid,)](
        ptab, plan.btab, basis, basis.stride(0), part, basis.shape[0], plan.nblk, plan.per,
        FIELDS=_FIELDS, BLOCK_D=BLOCK,
    )  # fmt: skip


def project_grads(
    params: list[Tensor], grads: list[Tensor | None], workspace: Tensor | None, basis: Tensor, scales: Tensor
) -> Tensor:
    """``twa::project_grads`` on the Triton backend (see ``reference.project_grads``): the fused
    step's first kernel reads ``grads`` in place, then the partials are added in a fixed order
    and scaled; ``workspace`` is not used. fp32 [K]."""
    warn_if_narrow(basis, "triton")
    plan = plan_for(params, basis.device)
    ptab, keep = plan.table(params, grads)
    part, _ = plan.workspace(basis.shape[0])
    _project_partials(plan, ptab, basis, part)
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
    part, coord = plan.workspace(K)
    _project_partials(plan, ptab, basis, part)
    subspace_step.launch(
        alpha, momentum_buffer, counters, coord, gram, pw0, lr, momentum, dampening, weight_decay,
        nesterov, part=part, scales=scales,
    )  # fmt: skip
    tuned(_step_write_kernel)[(plan.grid,)](
        ptab, plan.btab, w0, basis, basis.stride(0), scales, alpha, K, plan.nblk, plan.per,
        FIELDS=_FIELDS, BLOCK_D=BLOCK,
    )  # fmt: skip
    del keep  # contiguous copies of strided grads live until all launches are queued
