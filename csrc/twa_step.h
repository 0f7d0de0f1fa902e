// The fused step's tables (twa_kernels/_param_table.py), its split of the table's blocks over
// warps and blocks of threads, and a warp's look-ahead window into the tables. Plain C++ outside
// nvcc, shared by step.cu, the torch glue and the host test (csrc/tests/step_host_test.cu).
#pragma once

#include <cstdint>

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

}  // namespace step
}  // namespace twa
