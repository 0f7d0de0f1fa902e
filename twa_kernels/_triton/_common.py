"""Shared launch helpers of the Triton kernels: autotune config lists, split counts, workspaces.

Reductions over D are two-stage and deterministic: stage 1 splits the columns into ``S``
contiguous chunks and writes one partial per chunk to a workspace, stage 2 adds the partials in
a fixed order. ``S`` depends only on the shape and the device, so the same inputs give the same
bits for a given autotune choice (a different tile shape changes the order of the fp32 sums;
``tuned`` pins the first config under ``torch.use_deterministic_algorithms(True)``).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Chunk boundaries are multiples of this many columns, so every chunk starts 512-byte aligned
# for fp16 rows (given aligned row starts) and its whole BLOCK_D tiles can be read in 16-byte
# loads; only a chunk's last, partial tile (if any) is masked.
CHUNK_ALIGN = 256

# The interpreter runs programs one after another in numpy: each program costs ~1 ms of
# Python overhead plus its tiles, so a handful of splits keeps tests fast while still
# exercising the cross-chunk reduction whenever D > CHUNK_ALIGN.
INTERPRETER_MAX_SPLITS = 4

# On a GPU, 4 programs per SM keep enough loads in flight to saturate HBM on a streaming pass
# (the partials then cost 4 * SMs * K * 4 bytes, e.g. 1.1 MB for 132 SMs and K = 512).
PROGRAMS_PER_SM = 4


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def tuned(kernel):
    """``kernel`` (an autotuned kernel), ready for ``[grid](...)``.

    With ``torch.use_deterministic_algorithms(True)`` the autotuner is bypassed and the kernel
    runs its first candidate config: the autotuner's choice depends on timings, and another
    tile shape sums in another order, so two processes could otherwise disagree in the last
    bits. Within one process the choice is cached per shape and results repeat either way.
    """
    return _FirstConfig(kernel) if torch.are_deterministic_algorithms_enabled() else kernel


class _FirstConfig:
    """An autotuned kernel launched with its first config, as ``_FirstConfig(k)[grid](...)``."""

    def __init__(self, kernel):
        self.fn, self.config = kernel.fn, kernel.configs[0]

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.fn[grid](*args, **kwargs, **self.config.all_kwargs())


def configs(candidates: list[triton.Config]) -> list[triton.Config]:
    """Autotune candidates, or only the first one under the interpreter.

    The interpreter cannot benchmark (more than one config fails there), and its timings would
    mean nothing anyway: the first config is the one chosen for CPU runs.
    """
    return candidates[:1] if interpreted() else candidates


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def max_programs(device: torch.device) -> int:
    if device.type == "cuda" and not interpreted():
        return PROGRAMS_PER_SM * _sm_count(device.index or 0)
    return INTERPRETER_MAX_SPLITS


def split_columns(D: int, device: torch.device) -> tuple[int, int]:
    """``(S, CHUNK)``: ``S`` chunks of ``CHUNK`` columns (the last one shorter) covering D."""
    units = triton.cdiv(D, CHUNK_ALIGN)
    per = triton.cdiv(units, min(units, max_programs(device)))
    chunk = per * CHUNK_ALIGN
    return triton.cdiv(D, chunk), chunk


def split_items(n: int, device: torch.device) -> tuple[int, int]:
    """``(S, PER)``: ``S`` programs taking ``PER`` consecutive items each (the last fewer)."""
    per = triton.cdiv(n, min(n, max_programs(device)))
    return triton.cdiv(n, per), per


def pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@triton.jit
def fold_partials(part_ptr, S, R, offs, mask, BLOCK_S: tl.constexpr, MAX: tl.constexpr):
    """``sum_s part[s, offs]`` (or the max, with MAX) over the S rows of a [S, R] workspace of
    stage-1 partials, BLOCK_S rows at a time in a fixed order, in the workspace's dtype."""
    acc = tl.zeros(offs.shape, dtype=part_ptr.dtype.element_ty)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
        ptrs = part_ptr + offs_s[:, None] * R + offs[None, :]
        t = tl.load(ptrs, mask=(offs_s < S)[:, None] & mask[None, :], other=0.0)
        if MAX:
            acc = tl.maximum(acc, tl.max(t, axis=0))
        else:
            acc += tl.sum(t, axis=0)
    return acc


@triton.jit
def column_mask(offs_d, end, MASKED: tl.constexpr):
    """``offs_d < end``, or (not MASKED) an all-true mask the compiler knows is constant.

    Whole tiles take the second: with a mask that is not constant over 8 values (and offsets it
    cannot prove aligned) the compiler turns every basis load into a 2-byte one; tiles that start
    at a multiple of 16 columns of 16-byte aligned rows are read in 16-byte loads.
    """
    if MASKED:
        return offs_d < end
    else:
        return tl.full(offs_d.shape, 1, tl.int1)


@triton.jit
def dot_tiles(
    acc, basis_ptr, row_stride, cols, mask_d, x, K,
    BLOCK_K: tl.constexpr, NT: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """``acc`` [NT, BLOCK_K] plus ``basis[:, cols] @ x`` (fp32), row t of acc holding K tile t.

    Columns outside, K inside: ``x`` is read once for all K tiles. A register tensor cannot be
    indexed by the loop counter, so tile t's sums are added through a select on the tile index
    (NT * BLOCK_K selects against BLOCK_K * len(cols) multiply-adds per tile). STAGES > 1 has
    the compiler prefetch the next STAGES - 1 tiles into shared memory (16-byte asynchronous
    copies) while one is summed.
    """
    tiles = tl.arange(0, NT)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < K
        ptrs = basis_ptr + offs_k[:, None] * row_stride + cols[None, :]
        p = tl.load(ptrs, mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        t = tl.sum(p * x[None, :], axis=1)
        acc = tl.where((tiles == k0 // BLOCK_K)[:, None], acc + t[None, :], acc)
    return acc


@triton.jit
def add_combination(
    acc, basis_ptr, row_stride, scales_ptr, alpha_ptr, K, cols, mask_d,
    BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """``acc + sum_k alpha[k] scales[k] basis[k, cols]`` (fp32), K in BLOCK_K-row tiles
    (STAGES - 1 of them prefetched, as in ``dot_tiles``).

    The products accumulate in a [BLOCK_K, BLOCK_D] register tile, reduced over its rows once
    after the loop: a reduction per tile puts barriers and shared-memory traffic in the loop
    (3 ``BAR`` per K tile in ``reconstruct``'s sm_90 code; ``tests/test_triton_codegen.py``).
    """
    tile = tl.zeros([BLOCK_K, cols.shape[0]], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < K
        coef = tl.load(alpha_ptr + offs_k, mask=mask_k, other=0.0)
        coef = coef * tl.load(scales_ptr + offs_k, mask=mask_k, other=0.0)
        ptrs = basis_ptr + offs_k[:, None] * row_stride + cols[None, :]
        p = tl.load(ptrs, mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        tile += coef[:, None] * p
    return acc + tl.sum(tile, axis=0)


@triton.jit
def to_storage(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to nearest-even in ``dtype``.

    fp32 -> bf16 goes through bits: the interpreter's cast truncates (1 ulp low on about half
    of all values, e.g. 4072 instead of 4080 at the stored row scale), the GPU rounds to
    nearest-even; the integer form gives the GPU's (and torch's) result on both.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        # A NaN's payload could carry into the sign bit: store the canonical quiet NaN instead.
        top = tl.where(x != x, 0x7FC0, bits >> 16)
        return top.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
