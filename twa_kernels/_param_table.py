"""Device tables that let a fused step read ``.grad`` and write parameters in place.

Shared by the fused steps of the Triton and CUDA backends. The parameters are cut into blocks
of ``BLOCK`` columns that never straddle two parameters. Per parameter list (``plan_for``):

- the block table, int64 [blocks, 4]: ``[param index, first element, basis column, values]``
  (``values``: ``min(BLOCK, numel - first)``, the block's valid columns). A kernel reads one row
  and knows where the block's basis columns start before any other load;
- the parameter table, int64 [params, 8]: ``[flat offset, numel, param dtype code, grad dtype
  code, param address, grad address, aligned, 0]``, dtype codes from ``DTYPE_CODES`` (``NO_GRAD``
  for a missing grad: it reads as zeros). ``aligned`` marks a parameter whose flat offset (in
  values) and both addresses are multiples of 16: its whole blocks can be read in 16-byte
  vectors (given basis rows that start 16-byte aligned, see ``ops.empty_basis``).

Also per plan, made once: a parameter table without grads (``param_table``: the write pass
alone, ``twa::write_params_``) and, for per-block coordinates, each parameter's coefficient row
(``segment_table``) and each row's range of the block table (``segment_blocks``).

Kernels turn the addresses into typed pointers, which also works in Triton's interpreter, where
CPU tensors keep their real addresses. Only the grad addresses can change between steps
(``zero_grad`` frees grads by default); the parameter table is rebuilt and copied to the device
(one small asynchronous copy, no kernel, no host sync) only when they do.

CUDA graphs: a step can be captured (``torch.cuda.graph``) once an eager step has run with the
very ``.grad`` tensors the graph will read. The graph holds the addresses of the tables and the
workspaces, so a plan that took part in a capture is never evicted and every table it captured
stays alive. A capture that would need a new table (grads reallocated since the eager step, or
a grad that is not contiguous, whose contiguous copy gets a new address each step) raises
instead of recording a copy from a temporary host buffer.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

from ._params import segment_ranges

# Columns per block. Every parameter is padded to a whole number of blocks, so small tensors
# (biases, norms: 64-2048 values) waste at most one partly masked block each; 512 columns keep
# a [BLOCK_K, 512] fp16 basis tile at 1 KB per row.
BLOCK = 512
BLOCK_FIELDS = 4  # int64 per row of the block table
FIELDS = 8  # int64 per row of the parameter table (7 used, padded to 64 bytes)
# Parameter table columns.
OFFSET, NUMEL, PARAM_DTYPE, GRAD_DTYPE, PARAM_ADDR, GRAD_ADDR, ALIGNED = range(7)
ALIGN = 16
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
NO_GRAD = 3
MAX_PLANS = 8


def dtype_code(t: Tensor, what: str) -> int:
    code = DTYPE_CODES.get(t.dtype)
    if code is None:
        raise TypeError(f"fused TWA step: {what} dtype {t.dtype} is not fp32, bf16 or fp16")
    return code


class Plan:
    """Block table, parameter table and workspaces for one parameter list on one device."""

    def __init__(self, params: list[Tensor], device: torch.device):
        self.device = device
        self.offsets = []
        self.block_counts = []  # rows of the block table per parameter
        blocks = []
        off = 0
        for i, p in enumerate(params):
            if not p.is_contiguous():
                raise ValueError(f"fused TWA step: parameter {i} is not contiguous")
            dtype_code(p, f"parameter {i}")
            self.offsets.append(off)
            n = p.numel()
            self.block_counts.append(-(-n // BLOCK))
            blocks.extend((i, s, off + s, min(BLOCK, n - s)) for s in range(0, n, BLOCK))
            off += n
        self.numel = off
        self.nblk = len(blocks)
        self.btab = torch.tensor(blocks or [(0, 0, 0, 0)], dtype=torch.int64).to(device)
        self.grad_key = None
        self.ptab = None
        self.write_ptab = None
        self.segments: dict[tuple, Tensor] = {}
        self.work: dict[tuple, Tensor] = {}
        # Parameter tables read by captured CUDA graphs: kept for the plan's lifetime.
        self.captured: list[Tensor] = []

    def table(self, params: list[Tensor], grads: list[Tensor | None]) -> tuple[Tensor, list[Tensor]]:
        """The device parameter table for ``grads`` (one per parameter, None: zero gradient), and
        the grads copied to be contiguous (keep them alive until the kernels are queued)."""
        keep = []
        given, grads = grads, []
        for g in given:
            if g is not None and not g.is_contiguous():
                g = g.contiguous()
                keep.append(g)
            grads.append(g)
        key = tuple(None if g is None else (g.data_ptr(), g.dtype) for g in grads)
        if self._capturing():
            if keep or key != self.grad_key:
                raise RuntimeError(
                    "fused TWA step: CUDA graph capture needs the parameter table of an eager "
                    "step run with the same contiguous .grad tensors (same addresses): run one "
                    "step before capturing and keep the grads (zero_grad(set_to_none=False))"
                )
            self._keep_if_capturing(self.ptab)
        elif key != self.grad_key:
            # A fresh device tensor each time: a kernel still queued may read the previous one.
            self.ptab = self._device_table(params, grads)
            self.grad_key = key
        return self.ptab, keep

    def param_table(self, params: list[Tensor]) -> Tensor:
        """The parameter table without grads (each NO_GRAD), for passes that only write the
        parameters; made once (the parameters' addresses are part of the plan's key)."""
        if self.write_ptab is None:
            self._check_not_capturing("parameter table")
            self.write_ptab = self._device_table(params, [None] * len(params))
        self._keep_if_capturing(self.write_ptab)
        return self.write_ptab

    def segment_table(self, segments: list[int]) -> Tensor:
        """int64 [params] on the device: the coefficient row of each parameter (per-block
        coordinates), made once per list."""
        key = tuple(segments)
        table = self.segments.get(key)
        if table is None:
            self._check_not_capturing("segment table")
            table = self.segments[key] = torch.tensor(key, dtype=torch.int64).to(self.device)
        self._keep_if_capturing(table)
        return table

    def segment_blocks(self, segments: list[int]) -> Tensor:
        """int64 [rows, 2] on the device: each coefficient row's range ``[first, last)`` of the
        block table (its parameters' blocks are consecutive; empty for a row with none),
        made once per list."""
        key = ("blocks", *segments)
        table = self.segments.get(key)
        if table is None:
            self._check_not_capturing("segment table")
            ranges = segment_ranges(self.block_counts, segments, segments[-1] + 1)
            table = self.segments[key] = torch.tensor(ranges, dtype=torch.int64).to(self.device)
        self._keep_if_capturing(table)
        return table

    def _capturing(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()

    def _check_not_capturing(self, what: str) -> None:
        if self._capturing():
            raise RuntimeError(
                f"fused TWA step: CUDA graph capture needs the {what} of an eager step: run one "
                "step (or weight write) before capturing"
            )

    def _keep_if_capturing(self, table: Tensor) -> None:
        if self._capturing() and not any(t is table for t in self.captured):
            self.captured.append(table)

    def _device_table(self, params: list[Tensor], grads: list[Tensor | None]) -> Tensor:
        rows = []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            gcode = NO_GRAD if g is None else dtype_code(g, f"grad of parameter {i}")
            gaddr = 0 if g is None else g.data_ptr()
            aligned = all(a % ALIGN == 0 for a in (self.offsets[i], p.data_ptr(), gaddr))
            row = [self.offsets[i], p.numel(), dtype_code(p, ""), gcode, p.data_ptr(), gaddr]
            rows.append(row + [int(aligned)] + [0] * (FIELDS - len(row) - 1))
        host = torch.tensor(rows, dtype=torch.int64)
        if self.device.type == "cuda":
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    def workspace(self, name: str, shape: tuple[int, ...], zero: bool = False) -> Tensor:
        """An fp32 workspace kept with the plan (a captured graph reads it at a fixed address),
        zero-filled when it is made if ``zero`` (kernels that leave it as they found it, e.g.
        the CUDA step's tickets, need that once)."""
        key = (name, shape)
        if key not in self.work:
            make = torch.zeros if zero else torch.empty
            self.work[key] = make(shape, dtype=torch.float32, device=self.device)
        return self.work[key]


_plans: OrderedDict[tuple, Plan] = OrderedDict()


def plan_for(params: list[Tensor], device: torch.device) -> Plan:
    key = (device, tuple((p.data_ptr(), p.numel(), p.dtype) for p in params))
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = Plan(params, device)
        # Evict the least recently used plans, but never one a CUDA graph reads (nor this one).
        evictable = [k for k, p in _plans.items() if not p.captured and p is not plan]
        for old in evictable[: max(len(_plans) - MAX_PLANS, 0)]:
            del _plans[old]
    else:
        _plans.move_to_end(key)
    return plan
