// The fused step's tables (twa_kernels/_param_table.py), its split of the table's blocks over
// warps and blocks of threads, and a warp's look-ahead window into the tables. Plain C++ outside
// nvcc, shared by step.cu, the torch glue and the host test (csrc/tests/step_host_test.cu).
#pragma once

#include <cstdint>

#include "twa_common.h"

#if defined(__CUDACC__)
#define TWA_STEP_HD __host__ __device__ __forceinline__
#else
#define TWA_STEP_HD inline
#endif

namespace twa {
namespace step {

// Columns per table block: _param_table.BLOCK (checked against it when the extension loads).
constexpr int64_t kBlockCols = 512;
// Block table row: [param index, first element, basis column, values].
constexpr int64_t kBlockFields = 4;
constexpr int kBlkParam = 0, kBlkFirst = 1, kBlkCol = 2, kBlkValues = 3;
// Parameter table row: [flat offset, numel, param dtype, grad dtype, param address, grad
// address, aligned, 0].
constexpr int64_t kParamFields = 8;
constexpr int kParDType = 2, kParGradDType = 3, kParAddr = 4, kParGradAddr = 5, kParAligned = 6;
// Dtype codes of the parameter table (_param_table.DTYPE_CODES, NO_GRAD).
constexpr int64_t kTabF32 = 0, kTabBF16 = 1, kTabF16 = 2, kTabNoGrad = 3;

// A warp's look-ahead into the tables (step.cu), so that no block waits on its chain of dependent
// table loads (block row, then its parameter's row). The window of block i is 16 table values,
// the low 32 bits of value v in lane v and its high 32 bits in lane v + 16 (one register per
// thread): values [0, 8) are the parameter row of block i, values [8, 16) the block rows of
// blocks i and i + 1 (0 past the warp's range).
constexpr int kWinValues = 16;
constexpr int kWinParam = 0;                                             // + parameter field
constexpr int kWinBlock = kWinParam + static_cast<int>(kParamFields);    // + field of block i
constexpr int kWinNextBlock = kWinBlock + static_cast<int>(kBlockFields);  // + field of block i + 1
static_assert(kWinNextBlock + kBlockFields == kWinValues && 2 * kWinValues == 32,
              "the window's 16 values, two halves each, fill a warp");

// What lane `lane` loads for the window of block blk of a warp's range [., end), param being the
// block's parameter index: 32 bits (half 0: low, 1: high) of element `index` of the parameter
// table (ptab) or of the block table; nothing (load false) past the range.
struct WindowLoad {
  bool load;
  bool ptab;
  int64_t index;
  int half;
};

TWA_STEP_HD WindowLoad window_load_of(int64_t blk, int64_t end, int64_t param, int lane) {
  WindowLoad w;
  const int v = lane % kWinValues;
  w.half = lane / kWinValues;
  w.ptab = v < kWinBlock;
  if (w.ptab) {
    w.index = param * kParamFields + (v - kWinParam);
    w.load = blk < end;
  } else {
    w.index = blk * kBlockFields + (v - kWinBlock);
    w.load = w.index < end * kBlockFields;
  }
  return w;
}

// Projection: basis rows per block of threads, one fp32 accumulator per row in every thread.
constexpr int64_t kTileRows = 32;
// The grid's y dimension (splits of the projection) is at most this.
constexpr int64_t kMaxSplits = 65535;

TWA_STEP_HD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
TWA_STEP_HD int64_t lo(int64_t a, int64_t b) { return a < b ? a : b; }
TWA_STEP_HD int64_t hi(int64_t a, int64_t b) { return a > b ? a : b; }

// The table's blocks cut into contiguous ranges of per_warp blocks, one per warp: warp w (of
// the whole grid, w = cta * warps_per_cta + warp) takes [w per_warp, min(nblk, (w + 1) per_warp));
// warps past `warps` (the last block of threads' tail) take none.
struct BlockSplit {
  int64_t per_warp;
  int64_t warps;
  int64_t ctas;
};

TWA_STEP_HD BlockSplit split_blocks(int64_t nblk, int64_t max_ctas, int64_t warps_per_cta) {
  BlockSplit s;
  nblk = hi(nblk, 1);
  const int64_t max_warps = hi(max_ctas, 1) * warps_per_cta;
  s.per_warp = cdiv(nblk, lo(nblk, max_warps));
  s.warps = cdiv(nblk, s.per_warp);
  s.ctas = cdiv(s.warps, warps_per_cta);
  return s;
}
TWA_STEP_HD int64_t warp_begin(const BlockSplit& s, int64_t nblk, int64_t warp) {
  return lo(nblk, warp * s.per_warp);
}
TWA_STEP_HD int64_t warp_end(const BlockSplit& s, int64_t nblk, int64_t warp) {
  return lo(nblk, (warp + 1) * s.per_warp);
}

// Projection grid: (K tiles, splits). ctas_per_sm x sm_count blocks of threads are resident at
// once; the splits fill them for the K tiles given (at least one split).
struct ProjectSplit {
  int64_t k_tiles;
  BlockSplit split;  // split.ctas: the splits, grid.y
};

TWA_STEP_HD ProjectSplit plan_project(int64_t K, int64_t nblk, int64_t sm_count, int64_t ctas_per_sm,
                                      int64_t warps_per_cta) {
  ProjectSplit p;
  p.k_tiles = cdiv(hi(K, 1), kTileRows);
  const int64_t resident = hi(sm_count, 1) * hi(ctas_per_sm, 1);
  const int64_t max_splits = lo(kMaxSplits, hi(1, resident / p.k_tiles));
  p.split = split_blocks(nblk, max_splits, warps_per_cta);
  return p;
}

// Write pass grid: one dimension, as many blocks of threads as are resident (at most).
TWA_STEP_HD BlockSplit plan_write(int64_t nblk, int64_t sm_count, int64_t ctas_per_sm,
                                  int64_t warps_per_cta) {
  return split_blocks(nblk, hi(sm_count, 1) * hi(ctas_per_sm, 1), warps_per_cta);
}

// ---- an int8 basis (one fp32 scale per kQuantBlock = 64 values of a row) -----------------
//
// A warp reads a block's 512 int8 columns of a row as one 16-byte group per lane: lane l takes
// the block's values [16 l, 16 l + 16), i.e. basis columns col0 + 16 l + e (col0: the block's
// first basis column). When col0 is a multiple of 16 (its parameter is ALIGNED: a flat offset
// multiple of 16, blocks start every 512 values) a lane's 16 values lie in one scale block and
// take one scale (int8_fast_block). Otherwise (any col0, a partial block) they lie in at most
// two: value e takes scale block blk_lo when e < split, blk_hi otherwise (one scale per value,
// from two loads per row).
struct Int8Lane {
  int64_t col;     // basis column of the lane's value 0
  int n;           // the lane's valid values, [0, 16]: the block's values [16 l, 16 l + n)
  int64_t blk_lo;  // scale block of the lane's first value
  int64_t blk_hi;  // scale block of its last valid value (blk_lo when n <= 1)
  int split;       // values e < split are in blk_lo, [1, 16]
};

TWA_STEP_HD Int8Lane int8_lane(int64_t col0, int64_t values, int lane) {
  Int8Lane r;
  const int64_t first = static_cast<int64_t>(lane) * kInt8Group;
  r.col = col0 + first;
  r.n = static_cast<int>(lo(hi(values - first, 0), kInt8Group));
  r.blk_lo = scale_block(r.col);
  r.blk_hi = scale_block(r.col + hi(r.n, 1) - 1);
  r.split = static_cast<int>(lo(kQuantBlock - r.col % kQuantBlock, kInt8Group));
  return r;
}

// A block the int8 kernels read in 16-byte loads with one scale per lane: the basis rows start
// 16-byte aligned (vec), the parameter is ALIGNED (so col0 % 16 == 0) and the block is whole.
TWA_STEP_HD bool int8_fast_block(bool vec, bool aligned, int64_t values) {
  return vec && aligned && values == kBlockCols;
}
static_assert(kBlockCols == kWarp * kInt8Group, "an int8 block row is one 16-byte load per lane");

}  // namespace step
}  // namespace twa
