"""Shared launch helpers of the Triton kernels: autotune config lists, split counts, workspaces.

Reductions over D are two-stage and deterministic: stage 1 splits the columns into ``S``
contiguous chunks and writes one partial per chunk to a workspace, stage 2 adds the partials in
a fixed order. ``S`` depends only on the shape, the device and the autotune config (its tile and
programs per SM), so the same inputs give the same bits for a given autotune choice (another
config changes the order of the fp32 sums; ``tuned`` pins the first config under
``torch.use_deterministic_algorithms(True)``).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .._layout import QUANT_BLOCK

# Chunk boundaries are multiples of this many columns, so every chunk starts 512-byte aligned
# for fp16 rows (given aligned row starts) and its whole BLOCK_D tiles can be read in 16-byte
# loads; only a chunk's last, partial tile (if any) is masked.
CHUNK_ALIGN = 256

# The interpreter runs programs one after another in numpy: each program costs ~1 ms of
# Python overhead plus its tiles, so a handful of splits keeps tests fast while still
# exercising the cross-chunk reduction whenever D > CHUNK_ALIGN.
INTERPRETER_MAX_SPLITS = 4

# The default of ``max_programs``: 4 programs per SM keep enough loads in flight to saturate HBM
# on a streaming pass whose code fits 4 (project's batched kernel).
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


def max_programs(device: torch.device, per_sm: int = PROGRAMS_PER_SM) -> int:
    """Programs of one full wave: ``per_sm`` resident on every SM (a handful when interpreted)."""
    if device.type == "cuda" and not interpreted():
        return per_sm * _sm_count(device.index or 0)
    return INTERPRETER_MAX_SPLITS


def wave_splits(K: int, config: dict, device: torch.device) -> int:
    """Column splits of a [K tiles, splits] grid under ``config`` (its ``BLOCK_K`` and
    ``PROGRAMS_PER_SM``) that fills one wave of its programs per SM (at least one split; when
    interpreted, ``INTERPRETER_MAX_SPLITS`` whatever K).

    One wave, so that no partial last wave idles SMs; the splits then depend on the device and
    the config, never on timing."""
    if device.type == "cuda" and not interpreted():
        per_sm = max_programs(device, config["PROGRAMS_PER_SM"])
        return max(1, per_sm // triton.cdiv(K, config["BLOCK_K"]))
    return INTERPRETER_MAX_SPLITS


def wave_grid(K: int, device: torch.device):
    """The launch grid ``[K tiles, wave_splits]`` of an autotuned kernel, from its config."""
    return lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), wave_splits(K, meta, device))


def most_wave_splits(kernel, K: int, device: torch.device) -> int:
    """The most splits any of ``kernel``'s configs takes: room for the partials of each (the
    autotuner launches every config)."""
    return max(wave_splits(K, c.kwargs, device) for c in kernel.configs)


def launched_config(kernel) -> triton.Config:
    """The config of ``kernel``'s (a ``tuned`` kernel's) latest launch."""
    return kernel.config if isinstance(kernel, _FirstConfig) else kernel.best_config


def split_columns(D: int, device: torch.device, per_sm: int = PROGRAMS_PER_SM) -> tuple[int, int]:
    """``(S, CHUNK)``: ``S`` chunks of ``CHUNK`` columns (the last one shorter) covering D, at
    most ``per_sm`` per SM (one wave of programs that fit ``per_sm`` to an SM)."""
    units = triton.cdiv(D, CHUNK_ALIGN)
    per = triton.cdiv(units, min(units, max_programs(device, per_sm)))
    chunk = per * CHUNK_ALIGN
    return triton.cdiv(D, chunk), chunk


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
def group_dot(tile, p, x, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr):
    """``tile`` [BLOCK_K, BLOCK_D // GROUP] plus the products ``p * x`` ([BLOCK_K, BLOCK_D]) summed
    over each run of GROUP columns: the GROUP values of one 16-byte load, which one thread holds,
    so the sum stays in that thread (no shuffle, no shared memory) and the accumulator takes
    1/GROUP of the registers of a [BLOCK_K, BLOCK_D] one."""
    prod = tl.reshape(p.to(tl.float32) * x, (BLOCK_K, BLOCK_D // GROUP, GROUP))
    return tile + tl.sum(prod, axis=2)


@triton.jit
def _weighted_rows(basis_ptr, row_stride, scales_ptr, alpha_ptr, K, k0, cols, mask_d, BLOCK_K: tl.constexpr):
    """Rows ``[k0, k0 + BLOCK_K)`` of ``basis[:, cols]`` (storage dtype) and their coefficients
    ``alpha * scales`` (fp32)."""
    offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
    mask_k = offs_k < K
    coef = tl.load(alpha_ptr + offs_k, mask=mask_k, other=0.0)
    coef = coef * tl.load(scales_ptr + offs_k, mask=mask_k, other=0.0)
    ptrs = basis_ptr + offs_k[:, None] * row_stride + cols[None, :]
    p = tl.load(ptrs, mask=mask_k[:, None] & mask_d[None, :], other=0.0, eviction_policy="evict_first")
    return p, coef


@triton.jit
def add_combination(
    acc, basis_ptr, row_stride, scales_ptr, alpha_ptr, K, cols, mask_d, BLOCK_K: tl.constexpr
):  # fmt: skip
    """``acc + sum_k alpha[k] scales[k] basis[k, cols]`` (fp32), K in BLOCK_K-row tiles.

    Register prefetch: the next tile's loads are issued before this tile is summed, so every
    thread keeps its BLOCK_K 16-byte loads in flight while it computes. With the columns laid
    across all threads (BLOCK_D = 8 values x 32 lanes x warps for fp16) the sum over the rows
    of a tile stays in each thread: no barrier, no shared memory in the loop (a reduction per
    tile put 3 ``BAR`` per K tile in ``reconstruct``'s sm_90 code; ``tests/test_triton_codegen.py``).
    The basis is read once, marked evict-first so that it does not push w0 and the outputs out
    of L2.
    """
    p, coef = _weighted_rows(basis_ptr, row_stride, scales_ptr, alpha_ptr, K, 0, cols, mask_d, BLOCK_K)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        p_next, coef_next = _weighted_rows(
            basis_ptr, row_stride, scales_ptr, alpha_ptr, K, k0, cols, mask_d, BLOCK_K
        )
        acc += tl.sum(coef[:, None] * p.to(tl.float32), axis=0)
        p, coef = p_next, coef_next
    return acc + tl.sum(coef[:, None] * p.to(tl.float32), axis=0)


# The dequantisation below runs PTX, which the interpreter cannot: there it takes the plain cast.
_INTERPRETED = tl.constexpr(interpreted())


@triton.jit
def int8_to_float(q):
    """int8 values (any shape) as exact fp32, two instructions per value on the GPU.

    The plain cast is one I2F per value, a quarter-rate instruction on sm_80/sm_90 (16 per clock
    and SM): at 4.8 TB/s over 132 SMs an int8 basis arrives at about 18 values per clock and SM,
    so the conversion alone would cap the read below the memory bandwidth. Instead, 4 values at
    a time (``pack=4``: one 32-bit register): flip the sign bits (q + 128, in [0, 255]), place
    each byte under the exponent of 2^23 with a byte permute (the float 2^23 + q + 128) and
    subtract 2^23 + 128, exactly: one PRMT and one FADD per value at full rate, one LOP3 per 4.
    """
    if _INTERPRETED:
        return q.to(tl.float32)
    else:
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t;
            xor.b32 t, $4, 0x80808080;
            prmt.b32 $0, t, 0x4B000000, 0x7440;
            prmt.b32 $1, t, 0x4B000000, 0x7441;
            prmt.b32 $2, t, 0x4B000000, 0x7442;
            prmt.b32 $3, t, 0x4B000000, 0x7443;
            sub.f32 $0, $0, 0f4B000080;
            sub.f32 $1, $1, 0f4B000080;
            sub.f32 $2, $2, 0f4B000080;
            sub.f32 $3, $3, 0f4B000080;
            }""",
            constraints="=r,=r,=r,=r,r",
            args=[q],
            dtype=tl.float32,
            is_pure=True,
            pack=4,
        )


# Values of an int8 basis per scale, and per 16-byte load (a run: one thread's values).
QBLOCK = tl.constexpr(QUANT_BLOCK)
QRUN = tl.constexpr(16)


@triton.jit
def int8_row(
    basis_ptr, row_stride, scales_ptr, scale_stride, k, ok, d0, end,
    BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Row ``k`` (zeros unless ``ok``) of an int8 basis at columns ``[d0, d0 + BLOCK_D)``, ``d0``
    a multiple of 64 (only a MASKED call checks ``end``): its values as fp32 [BLOCK_D // 16, 16]
    (a run of 16: one thread's 16-byte load) and each run's block scale, [BLOCK_D // 16].

    The scales are loaded as a vector of one per 16 values (4 threads read each): small enough
    for the compiler to load it in the values' layout, where a [BLOCK_D // 64] vector or a tile
    of them was moved there through shared memory. Walking a K tile row by row with this keeps
    the hot loops of project, reconstruct_ and orthogonalize_ free of barriers."""
    k = tl.cast(k, tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask_d = column_mask(cols, end - d0, MASKED)
    row = basis_ptr + k * row_stride + d0
    q = tl.load(row + cols, mask=ok & mask_d, other=0, eviction_policy="evict_first")
    groups = tl.arange(0, BLOCK_D // QRUN)
    mask_g = column_mask(groups * QRUN, end - d0, MASKED)
    blocks = scales_ptr + k * scale_stride + d0 // QBLOCK
    scale = tl.load(blocks + groups // (QBLOCK // QRUN), mask=ok & mask_g, other=0.0)
    return tl.reshape(int8_to_float(q), (BLOCK_D // QRUN, QRUN)), scale


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
