// The fused TWA step over a parameter list: each gradient read in place, each parameter written
// in place, through the block and parameter tables of twa_kernels/_param_table.py (layout in
// twa_step.h). With subspace_step.cu's two kernels in between, a step is four launches:
//
//   step_project_kernel  P^T g. Grid (K tiles of kTileRows rows, splits); each warp walks its
//                        own contiguous range of table blocks, reading the block's gradient once
//                        into registers and then the block's basis columns of the tile's rows,
//                        several 16-byte loads in flight before any is used, into one fp32
//                        accumulator per row per thread. One reduction per block of threads at
//                        the end (warp butterflies, then warps in order) gives partials
//                        [split, K]; the last block of threads to finish a K tile (an integer
//                        ticket per tile, never a floating-point atomic) adds that tile's
//                        partials over the splits in a fixed order and applies the scales.
//   step_write_kernel    w = w0 + P alpha block by block, the K coefficients alpha * scales in
//                        shared memory, one fp32 accumulator per column per thread, rounded once
//                        to the parameter's dtype and stored at its address.
//
// Both kernels walk a warp's blocks one table read ahead: a block's fields come out of the
// warp's window of the tables (twa_step.h: one 32-bit table word per lane, read with warp
// shuffles), and the loads of the next block's window (its block row and its parameter's row)
// are issued right then, before the block's basis loads and FMAs, so no block waits on its
// chain of dependent table loads. Only loads move: every sum still runs over the warp's blocks
// in order.
//
// A block takes 16-byte loads (and stores) when the table marks its parameter aligned, the
// block is whole and the basis rows (and w0) start 16-byte aligned; otherwise masked scalar
// ones. Every address is formed in 64 bits. Grids come from the occupancy of the kernels
// (cached per device); the split of the blocks depends only on sizes and the card, so the
// same inputs give the same bits.
//
// Per-block coordinates (segments: parameter i takes coefficient row segments[i], the rows
// non-decreasing) use the same kernels with kSeg, and one more launch each way:
//
//   step_project_kernel<kSeg>    each warp adds its blocks in runs of one segment and, after a
//                                run, reduces it across its lanes into its own partial row
//                                (warp + segment); K tile 0 records where each segment's blocks
//                                start. No ticket:
//   step_segments_finish_kernel  one block of threads per row and K tile adds the partial rows
//                                of the warps that hold the row's blocks, in a fixed order.
//   step_write_kernel<kSeg>      each block's row of alpha read (through the read-only cache)
//                                with the basis rows instead of staged in shared memory.
//   block_step_kernel            the coordinate step of every block (SGD or AdamW), taken only
//                                when every coordinate gradient is finite.
//
// So the fused per-block step is four launches too (fused_block_step_).
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "twa_device.cuh"
#include "twa_step.h"

namespace twa {
namespace {

using step::kBlockCols;
using step::kTileRows;

// Basis 16-byte loads in flight per thread and row group (8 x 16 bytes).
constexpr int kLoadsInFlight = 8;
// Masked path: columns per thread (lane + 32 j) and rows per group.
constexpr int kSlowCols = static_cast<int>(kBlockCols) / kWarp;
constexpr int kSlowRows = 2;
// Largest K whose coefficients fit the default 48 KiB of shared memory of the write kernel.
constexpr int64_t kMaxWriteK = 12288;

template <typename T>
struct Tile {
  static constexpr int V = kVecBytes / static_cast<int>(sizeof(T));     // values per 16 bytes
  static constexpr int U = static_cast<int>(kBlockCols) / (kWarp * V);  // groups per thread
  static constexpr int R = kLoadsInFlight / U;                          // rows per group
  static_assert(U * kWarp * V == kBlockCols, "a block is a whole number of warp-wide loads");
  static_assert(R >= 1 && kTileRows % R == 0, "row groups tile the K tile");
};

// One row of the block table with the fields of its parameter.
struct Block {
  int64_t first;   // first element within the parameter
  int64_t col0;    // basis column of that element
  int64_t values;  // valid values, <= kBlockCols
  int64_t param_dtype;
  int64_t grad_dtype;
  uint64_t param_addr;
  uint64_t grad_addr;
  bool aligned;
  int64_t next_param;  // parameter of the next block of the warp's range (0 past it)
};

// The tables' look-ahead (step::window_load_of): both kernels read block i's fields out of its
// window and at once issue the loads of block i + 1's window (its parameter row, whose index
// block i's window already holds, and block rows i + 1 and i + 2), one 4-byte load per lane,
// before block i's basis loads and FMAs: they are in flight while block i is reduced.
__device__ __forceinline__ uint32_t window_load(const int64_t* __restrict__ ptab,
                                                const int64_t* __restrict__ btab, int64_t blk,
                                                int64_t end, int64_t param, int lane) {
  const step::WindowLoad w = step::window_load_of(blk, end, param, lane);
  if (!w.load) return 0u;
  return __ldg(reinterpret_cast<const uint32_t*>((w.ptab ? ptab : btab) + w.index) + w.half);
}

// The window of the warp's first block (0 for an empty range).
__device__ __forceinline__ uint32_t window_first(const int64_t* __restrict__ ptab,
                                                 const int64_t* __restrict__ btab, int64_t blk,
                                                 int64_t end, int lane) {
  if (blk >= end) return 0u;
  const int64_t param = __ldg(btab + blk * step::kBlockFields + step::kBlkParam);
  return window_load(ptab, btab, blk, end, param, lane);
}

// Table value v of the window (the same in every lane).
__device__ __forceinline__ int64_t window_value(uint32_t win, int v) {
  const uint32_t lo = __shfl_sync(0xffffffffu, win, v);
  const uint32_t hi = __shfl_sync(0xffffffffu, win, v + step::kWinValues);
  return static_cast<int64_t>((static_cast<uint64_t>(hi) << 32) | lo);
}

// Block blk's fields out of its window, and the window of block blk + 1 (its loads issued).
__device__ __forceinline__ Block window_advance(const int64_t* __restrict__ ptab,
                                                const int64_t* __restrict__ btab, int64_t blk,
                                                int64_t end, int lane, uint32_t& win) {
  constexpr int P = step::kWinParam, B = step::kWinBlock, N = step::kWinNextBlock;
  Block r;
  r.first = window_value(win, B + step::kBlkFirst);
  r.col0 = window_value(win, B + step::kBlkCol);
  r.values = window_value(win, B + step::kBlkValues);
  r.param_dtype = window_value(win, P + step::kParDType);
  r.grad_dtype = window_value(win, P + step::kParGradDType);
  r.param_addr = static_cast<uint64_t>(window_value(win, P + step::kParAddr));
  r.grad_addr = static_cast<uint64_t>(window_value(win, P + step::kParGradAddr));
  r.aligned = window_value(win, P + step::kParAligned) != 0;
  r.next_param = window_value(win, N + step::kBlkParam);
  win = window_load(ptab, btab, blk + 1, end, r.next_param, lane);
  return r;
}

// ---- per-block coordinates (segments) ---------------------------------------------------------
//
// segments[i] is parameter i's coefficient row (non-decreasing), so a warp's contiguous range of
// blocks meets a contiguous run of rows. Each kernel keeps the segment of the next block one
// block ahead (its load issued with the next block's window), like the tables' fields.

// Segment of block blk (a valid load for any blk < nblk; 0 when the warp has no blocks).
__device__ __forceinline__ int64_t block_segment(const int64_t* __restrict__ btab,
                                                 const int64_t* __restrict__ segments, int64_t blk,
                                                 int64_t end) {
  if (blk >= end) return 0;
  return __ldg(segments + __ldg(btab + blk * step::kBlockFields + step::kBlkParam));
}

// The projection's per-segment partials: a warp walks its blocks in runs of one segment,
// adding a run's blocks into its accumulators as the plain projection does; after the run they
// are reduced across the lanes (butterflies, lane r keeps row r) into the warp's partial row
// warp + segment (distinct for every warp and segment it meets: a later warp starts at or after
// an earlier one's last segment) and zeroed. K tile 0 also records where each segment's blocks
// start: rows (previous segment, segment] start at the run's first block, every boundary
// written by the warp holding the block after it, and rows past the table's last segment (up to
// starts[rows]) at nblk.
struct SegmentWalk {
  const int64_t* segments;
  int32_t* starts;  // [rows + 1]
  int64_t rows;
};

// Segments (rows < 2^31, checked by the launch) in 32-bit registers: the projection's walk
// runs at the 128 registers of 2 blocks of threads per SM.
struct SegmentRun {
  int32_t next;  // segment of the next block
  int32_t prev;  // segment before the next run (K tile 0: rows after it start at the run)
};

__device__ __forceinline__ void mark_starts(int32_t* starts, int64_t from, int64_t to, int64_t blk,
                                            int lane) {
  for (int64_t r = from + 1 + lane; r <= to; r += kWarp) starts[r] = static_cast<int32_t>(blk);
}

__device__ __forceinline__ SegmentRun segment_begin(const int64_t* __restrict__ btab,
                                                    const SegmentWalk& sw, int64_t b_begin,
                                                    int64_t b_end, bool mark) {
  SegmentRun s;
  s.next = static_cast<int32_t>(block_segment(btab, sw.segments, b_begin, b_end));
  s.prev = mark && b_begin > 0 ? static_cast<int32_t>(block_segment(btab, sw.segments, b_begin - 1, b_end))
                               : -1;
  return s;
}

template <int N>
__device__ __forceinline__ void flush_segment(float (&acc)[N], float* __restrict__ partial,
                                              int64_t slot, int64_t row0, int64_t K, int lane) {
  static_assert(N == kWarp, "lane r keeps row r of the tile");
  float mine = 0.f;
#pragma unroll
  for (int r = 0; r < N; ++r) {
    const float v = warp_sum(acc[r]);
    mine = lane == r ? v : mine;
    acc[r] = 0.f;
  }
  if (row0 + lane < K) partial[slot * K + row0 + lane] = mine;
}

// The warp's blocks [b_begin, b_end) in runs of one segment: add_block(b) adds a block (the
// plain projection's body), each run is flushed into the warp's partial row for its segment.
template <int N, typename AddBlock>
__device__ __forceinline__ void project_segments(const int64_t* __restrict__ ptab,
                                                 const int64_t* __restrict__ btab, int64_t nblk,
                                                 int64_t b_begin, int64_t b_end, uint32_t win,
                                                 const SegmentWalk& sw, int64_t gw, int64_t row0,
                                                 int64_t K, int lane, float (&acc)[N],
                                                 float* __restrict__ partial, AddBlock add_block) {
  const bool mark = blockIdx.x == 0;
  SegmentRun run = segment_begin(btab, sw, b_begin, b_end, mark);
  int64_t blk = b_begin;
  while (blk < b_end) {
    const int32_t seg = run.next;
    if (mark) mark_starts(sw.starts, run.prev, seg, blk, lane);
    run.prev = seg;
    do {
      const Block b = window_advance(ptab, btab, blk, b_end, lane, win);
      // param 0 past the range: a valid load
      run.next = static_cast<int32_t>(__ldg(sw.segments + b.next_param));
      ++blk;
      add_block(b);
    } while (blk < b_end && run.next == seg);  // uniform across the warp
    flush_segment(acc, partial, gw + seg, row0, K, lane);
  }
  if (mark && b_end == nblk && b_begin < b_end) mark_starts(sw.starts, run.prev, sw.rows, nblk, lane);
}

// Runs the statement with G the C++ type of a table dtype code (nothing for kTabNoGrad).
#define TWA_TABLE_DISPATCH(code, G, ...)  \
  switch (code) {                         \
    case step::kTabF32: {                 \
      using G = float;                    \
      __VA_ARGS__;                        \
      break;                              \
    }                                     \
    case step::kTabBF16: {                \
      using G = __nv_bfloat16;            \
      __VA_ARGS__;                        \
      break;                              \
    }                                     \
    case step::kTabF16: {                 \
      using G = __half;                   \
      __VA_ARGS__;                        \
      break;                              \
    }                                     \
    default:                              \
      break;                              \
  }

template <typename P>
__device__ __forceinline__ P from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N consecutive values of type G at p (aligned to N * sizeof(G) bytes, 8 or a multiple of 16),
// widened to fp32, in 16-byte (or one 8-byte) loads.
template <typename G, int N>
__device__ __forceinline__ void load_vec(const G* __restrict__ p, float* out) {
  constexpr int kBytes = N * static_cast<int>(sizeof(G));
  if constexpr (kBytes % kVecBytes == 0) {
    constexpr int E = kVecBytes / static_cast<int>(sizeof(G));
#pragma unroll
    for (int c = 0; c < kBytes / kVecBytes; ++c) {
      const uint4 w = __ldg(reinterpret_cast<const uint4*>(p) + c);
      unpack16<G, float>(w, out + c * E);
    }
  } else {
    static_assert(kBytes == 8, "8 or a multiple of 16 bytes");
    const uint2 w = __ldg(reinterpret_cast<const uint2*>(p));
    const G* e = reinterpret_cast<const G*>(&w);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = Storage<G>::to_float(e[i]);
  }
}

// N fp32 values rounded to P and stored at p (aligned as for load_vec).
template <typename P, int N>
__device__ __forceinline__ void store_vec(P* p, const float* v) {
  constexpr int kBytes = N * static_cast<int>(sizeof(P));
  if constexpr (kBytes % kVecBytes == 0) {
    constexpr int E = kVecBytes / static_cast<int>(sizeof(P));
#pragma unroll
    for (int c = 0; c < kBytes / kVecBytes; ++c) {
      uint4 w;
      P* e = reinterpret_cast<P*>(&w);
#pragma unroll
      for (int i = 0; i < E; ++i) e[i] = from_float<P>(v[c * E + i]);
      reinterpret_cast<uint4*>(p)[c] = w;
    }
  } else {
    static_assert(kBytes == 8, "8 or a multiple of 16 bytes");
    uint2 w;
    P* e = reinterpret_cast<P*>(&w);
#pragma unroll
    for (int i = 0; i < N; ++i) e[i] = from_float<P>(v[i]);
    *reinterpret_cast<uint2*>(p) = w;
  }
}

template <typename G>
__device__ __forceinline__ const G* as_ptr(uint64_t addr) {
  return reinterpret_cast<const G*>(addr);
}

// Masked path: the thread's columns lane + 32 j of N basis rows from `row` (rows past `last`
// repeat row `last`), widened to fp32, zero past the block's values; all loads issued before any
// value is used.
template <typename T, int N>
__device__ __forceinline__ void load_rows_masked(const T* __restrict__ cols, int64_t ld, int64_t row,
                                                 int64_t last, int64_t values, int lane,
                                                 float (&w)[N][kSlowCols]) {
#pragma unroll
  for (int r = 0; r < N; ++r) {
    const T* p = cols + min64(row + r, last) * ld;
#pragma unroll
    for (int j = 0; j < kSlowCols; ++j) {
      const int64_t c = lane + j * kWarp;
      w[r][j] = c < values ? Storage<T>::to_float(p[c]) : 0.f;
    }
  }
}

// ---- projection ----------------------------------------------------------------------------

// Whole aligned block: thread `lane` owns groups u * 32 + lane (V columns each) of the block,
// so one warp-wide load reads 512 contiguous bytes of a row. For each group of R rows of the
// tile, all R * U 16-byte loads are issued, then used. Rows past K repeat row K - 1 (their
// accumulators are never written out).
template <typename T, typename G>
__device__ __forceinline__ void project_fast(const T* __restrict__ cols, int64_t ld, int64_t row0,
                                             int64_t K, const Block& b, int lane,
                                             float (&acc)[kTileRows]) {
  constexpr int V = Tile<T>::V, U = Tile<T>::U, R = Tile<T>::R;
  const int64_t lane_col = static_cast<int64_t>(lane) * V;
  float g[U][V];
  const G* grad = as_ptr<G>(b.grad_addr) + b.first + lane_col;
#pragma unroll
  for (int rg = 0; rg < kTileRows / R; ++rg) {
    if (row0 + rg * R < K) {  // uniform across the block of threads
      uint4 w[R][U];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t row = min64(row0 + rg * R + r, K - 1);
        const T* p = cols + row * ld + lane_col;
#pragma unroll
        for (int u = 0; u < U; ++u) w[r][u] = __ldg(reinterpret_cast<const uint4*>(p + u * kWarp * V));
      }
      if (rg == 0) {  // the gradient's loads join the first row group's
#pragma unroll
        for (int u = 0; u < U; ++u) load_vec<G, V>(grad + u * kWarp * V, g[u]);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float s = acc[rg * R + r];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          float v[V];
          unpack16<T, float>(w[r][u], v);
#pragma unroll
          for (int e = 0; e < V; ++e) s = fmaf(v[e], g[u][e], s);
        }
        acc[rg * R + r] = s;
      }
    }
  }
}

// Any block: thread `lane` owns columns lane + 32 j, masked to the block's values; scalar loads
// of kSlowRows rows are issued, then used (load_rows_masked).
template <typename T, typename G>
__device__ __forceinline__ void project_slow(const T* __restrict__ cols, int64_t ld, int64_t row0,
                                             int64_t K, const Block& b, int lane,
                                             float (&acc)[kTileRows]) {
  float g[kSlowCols];
  const G* grad = as_ptr<G>(b.grad_addr) + b.first;
#pragma unroll
  for (int j = 0; j < kSlowCols; ++j) {
    const int64_t c = lane + j * kWarp;
    g[j] = c < b.values ? Storage<G>::to_float(grad[c]) : 0.f;
  }
#pragma unroll
  for (int rg = 0; rg < kTileRows / kSlowRows; ++rg) {
    if (row0 + rg * kSlowRows < K) {
      float w[kSlowRows][kSlowCols];
      load_rows_masked<T, kSlowRows>(cols, ld, row0 + rg * kSlowRows, K - 1, b.values, lane, w);
#pragma unroll
      for (int r = 0; r < kSlowRows; ++r) {
        float s = acc[rg * kSlowRows + r];
#pragma unroll
        for (int j = 0; j < kSlowCols; ++j) s = fmaf(w[r][j], g[j], s);
        acc[rg * kSlowRows + r] = s;
      }
    }
  }
}

// The end of a projection block of threads: its partial sums (warp butterflies, then the warps
// in order) into partial[cta, tile rows]; then the last block of threads of the K tile (an
// integer ticket) adds the tile's partials over the splits in a fixed order, times the row
// scales when kRowScales (a float basis; an int8 basis's block scales are in the partials).
template <bool kRowScales>
__device__ __forceinline__ void project_finish(const float (&acc)[kTileRows],
                                               float (&red_s)[kWarps][kTileRows], bool& last_s,
                                               int lane, int warp, int64_t row0, int64_t cta,
                                               int64_t K, const step::BlockSplit& split,
                                               const float* __restrict__ scales,
                                               float* __restrict__ partial,
                                               unsigned* __restrict__ tickets,
                                               float* __restrict__ out) {
#pragma unroll
  for (int r = 0; r < kTileRows; ++r) {
    const float s = warp_sum(acc[r]);
    if (lane == 0) red_s[warp][r] = s;
  }
  __syncthreads();
  if (threadIdx.x < kTileRows && row0 + threadIdx.x < K) {
    float s = 0.f;
    for (int w = 0; w < kWarps; ++w) s += red_s[w][threadIdx.x];
    partial[cta * K + row0 + threadIdx.x] = s;
  }

  // The last block of threads of this K tile adds the tile's partials over the splits.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    last_s = atomicAdd(tickets + blockIdx.x, 1u) == static_cast<unsigned>(split.ctas - 1);
  }
  __syncthreads();
  if (!last_s) return;
  __threadfence();
  for (int r = warp; r < kTileRows; r += kWarps) {
    const int64_t row = row0 + r;
    if (row >= K) break;  // uniform across the warp
    float s = 0.f;
    for (int64_t c = stage2_first(lane); c < split.ctas; c += stage2_stride()) {
      s += __ldcg(partial + c * K + row);  // L2: written by other blocks of threads
    }
    s = warp_sum(s);
    if (lane == 0) out[row] = kRowScales ? s * scales[row] : s;
  }
  if (threadIdx.x == 0) tickets[blockIdx.x] = 0u;  // ready for the next launch
}

// Both kernels state 2 resident blocks of threads per SM (128 registers): with that minimum
// stated ptxas keeps each row group's 16-byte loads ahead of their first use (without it the
// 16-bit kernels used each pair of loads before issuing the next).
// kSeg (per-block coordinates): partials per warp and segment (SegmentWalk), added by
// step_segments_finish_kernel; no ticket.
template <typename T, bool kSeg>
__global__ void __launch_bounds__(kThreads, 2)
    step_project_kernel(const int64_t* __restrict__ ptab, const int64_t* __restrict__ btab,
                        int64_t nblk, step::BlockSplit split, const T* __restrict__ basis,
                        int64_t ld, int64_t K, bool vec, const float* __restrict__ scales,
                        float* __restrict__ partial, unsigned* __restrict__ tickets,
                        float* __restrict__ out, SegmentWalk sw) {
  __shared__ float red_s[kWarps][kTileRows];
  __shared__ bool last_s;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int64_t cta = blockIdx.y;
  const int64_t gw = cta * kWarps + warp;

  float acc[kTileRows];
#pragma unroll
  for (int r = 0; r < kTileRows; ++r) acc[r] = 0.f;
  const int64_t b_begin = step::warp_begin(split, nblk, gw);
  const int64_t b_end = step::warp_end(split, nblk, gw);
  uint32_t win = window_first(ptab, btab, b_begin, b_end, lane);
  const auto add_block = [&](const Block& b) {
    if (b.values <= 0) return;
    const T* cols = basis + b.col0;
    if (vec && b.aligned && b.values == kBlockCols) {
      TWA_TABLE_DISPATCH(b.grad_dtype, G, project_fast<T, G>(cols, ld, row0, K, b, lane, acc));
    } else {
      TWA_TABLE_DISPATCH(b.grad_dtype, G, project_slow<T, G>(cols, ld, row0, K, b, lane, acc));
    }
  };
  if constexpr (kSeg) {
    project_segments(ptab, btab, nblk, b_begin, b_end, win, sw, gw, row0, K, lane, acc, partial,
                     add_block);
  } else {
    for (int64_t blk = b_begin; blk < b_end; ++blk) {
      add_block(window_advance(ptab, btab, blk, b_end, lane, win));
    }
    project_finish<true>(acc, red_s, last_s, lane, warp, row0, cta, K, split, scales, partial,
                         tickets, out);
  }
}

// ---- projection over an int8 basis ------------------------------------------------------------
//
// A block row of 512 int8 values is one 16-byte group per lane (step::int8_lane: lane l takes
// the block's values [16 l, 16 l + 16)). Whole aligned blocks (step::int8_fast_block): rows in
// groups of kLoadsInFlight, their 16-byte evict-first loads and their scales (one per lane and
// row: the lane's 16 columns start at a multiple of 16, inside one scale block) issued before
// any is used; each row's group dot product with the lane's 16 grad values is scaled once into
// the row's accumulator. Other blocks: byte loads masked to the block's values, kInt8SlowRows
// rows at a time, each value with its own scale (a lane's 16 columns straddle at most two scale
// blocks: two scale loads per row, the dot product split at int8_lane's split).
// (Its 16 byte loads per row are 16 registers until they are assembled: 2 rows keep both
// kernels within their registers.)
constexpr int kInt8SlowRows = 2;

// g[e] = p[e] for e < n (fp32), g[e] untouched past n.
template <typename G>
__device__ __forceinline__ void load_first(const G* __restrict__ p, int n, float (&g)[kInt8Group]) {
#pragma unroll
  for (int e = 0; e < kInt8Group; ++e) {
    if (e < n) g[e] = Storage<G>::to_float(p[e]);
  }
}

// p[e] = v[e] rounded to P for e < n.
template <typename P>
__device__ __forceinline__ void store_first(P* p, int n, const float (&v)[kInt8Group]) {
#pragma unroll
  for (int e = 0; e < kInt8Group; ++e) {
    if (e < n) p[e] = from_float<P>(v[e]);
  }
}

// The lane's 16 grad values (from element `first` of the grad at addr) as fp32: in 16-byte
// loads (kFast: a whole aligned block), else scalar loads of the first n, zeros past them.
template <bool kFast>
__device__ __forceinline__ void load_grad16(int64_t code, uint64_t addr, int64_t first, int n,
                                            float (&g)[kInt8Group]) {
  if constexpr (kFast) {
    TWA_TABLE_DISPATCH(code, G, load_vec<G, kInt8Group>(as_ptr<G>(addr) + first, g));
  } else {
#pragma unroll
    for (int e = 0; e < kInt8Group; ++e) g[e] = 0.f;
    TWA_TABLE_DISPATCH(code, G, load_first<G>(as_ptr<G>(addr) + first, n, g));
  }
}

__device__ __forceinline__ void project_int8_fast(const int8_t* __restrict__ cols, int64_t ld,
                                                  int64_t row0, int64_t K,
                                                  const float* __restrict__ scales, int64_t sld,
                                                  const Block& b, int lane,
                                                  float (&acc)[kTileRows]) {
  constexpr int R = kLoadsInFlight;
  static_assert(kTileRows % R == 0, "row groups tile the K tile");
  const step::Int8Lane q = step::int8_lane(b.col0, b.values, lane);
  const int8_t* base = cols + (q.col - b.col0);
  const float* srow = scales + q.blk_lo;
  float g[kInt8Group];
#pragma unroll
  for (int rg = 0; rg < kTileRows / R; ++rg) {
    if (row0 + rg * R < K) {  // uniform across the block of threads
      uint4 w[R];
      float s[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t row = min64(row0 + rg * R + r, K - 1);
        w[r] = ld_stream16(base + row * ld);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t row = min64(row0 + rg * R + r, K - 1);
        s[r] = __ldg(srow + row * sld);
      }
      if (rg == 0) {  // the grad's loads join the first row group's
        load_grad16<true>(b.grad_dtype, b.grad_addr, b.first + (q.col - b.col0), kInt8Group, g);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) acc[rg * R + r] = fmaf(int8_group_dot(w[r], g), s[r], acc[rg * R + r]);
    }
  }
}

__device__ __forceinline__ void project_int8_slow(const int8_t* __restrict__ cols, int64_t ld,
                                                  int64_t row0, int64_t K,
                                                  const float* __restrict__ scales, int64_t sld,
                                                  const Block& b, int lane,
                                                  float (&acc)[kTileRows]) {
  constexpr int R = kInt8SlowRows;
  static_assert(kTileRows % R == 0, "row groups tile the K tile");
  const step::Int8Lane q = step::int8_lane(b.col0, b.values, lane);
  if (q.n <= 0) return;  // the lane's values are past the block's: it reads nothing
  const int8_t* base = cols + (q.col - b.col0);
  float g[kInt8Group];
  load_grad16<false>(b.grad_dtype, b.grad_addr, b.first + (q.col - b.col0), q.n, g);
#pragma unroll
  for (int rg = 0; rg < kTileRows / R; ++rg) {
    if (row0 + rg * R < K) {
      uint4 w[R];
      float s_lo[R], s_hi[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t row = min64(row0 + rg * R + r, K - 1);
        w[r] = load_int8_bytes(base + row * ld, q.n);
        s_lo[r] = __ldg(scales + row * sld + q.blk_lo);
        s_hi[r] = __ldg(scales + row * sld + q.blk_hi);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        // Values e < split in blk_lo, the others in blk_hi: two dot products, two scales.
        float lo = 0.f, hi = 0.f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          float v[4];
          int8x4_to_float(word_of(w[r], i), v);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int j = 4 * i + e;
            lo = fmaf(v[e], j < q.split ? g[j] : 0.f, lo);
            hi = fmaf(v[e], j < q.split ? 0.f : g[j], hi);
          }
        }
        acc[rg * R + r] = fmaf(hi, s_hi[r], fmaf(lo, s_lo[r], acc[rg * R + r]));
      }
    }
  }
}

// The int8 projection: step_project_kernel's grid, split and reduction (kSeg: its partials
// per warp and segment); the partials hold the block scales (no row scales). A block without
// a grad (NO_GRAD) adds nothing and is skipped.
template <bool kSeg>
__global__ void __launch_bounds__(kThreads, 2)
    step_project_int8_kernel(const int64_t* __restrict__ ptab, const int64_t* __restrict__ btab,
                             int64_t nblk, step::BlockSplit split, const int8_t* __restrict__ basis,
                             int64_t ld, int64_t K, bool vec, const float* __restrict__ scales,
                             int64_t sld, float* __restrict__ partial,
                             unsigned* __restrict__ tickets, float* __restrict__ out,
                             SegmentWalk sw) {
  __shared__ float red_s[kWarps][kTileRows];
  __shared__ bool last_s;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int64_t cta = blockIdx.y;
  const int64_t gw = cta * kWarps + warp;

  float acc[kTileRows];
#pragma unroll
  for (int r = 0; r < kTileRows; ++r) acc[r] = 0.f;
  const int64_t b_begin = step::warp_begin(split, nblk, gw);
  const int64_t b_end = step::warp_end(split, nblk, gw);
  uint32_t win = window_first(ptab, btab, b_begin, b_end, lane);
  const auto add_block = [&](const Block& b) {
    if (b.values <= 0 || b.grad_dtype == step::kTabNoGrad) return;
    const int8_t* cols = basis + b.col0;
    if (step::int8_fast_block(vec, b.aligned, b.values)) {
      project_int8_fast(cols, ld, row0, K, scales, sld, b, lane, acc);
    } else {
      project_int8_slow(cols, ld, row0, K, scales, sld, b, lane, acc);
    }
  };
  if constexpr (kSeg) {
    project_segments(ptab, btab, nblk, b_begin, b_end, win, sw, gw, row0, K, lane, acc, partial,
                     add_block);
  } else {
    for (int64_t blk = b_begin; blk < b_end; ++blk) {
      add_block(window_advance(ptab, btab, blk, b_end, lane, win));
    }
    project_finish<false>(acc, red_s, last_s, lane, warp, row0, cta, K, split, nullptr, partial,
                          tickets, out);
  }
}

// Per-block coordinates, stage 2: out[l, row] = the partial rows w + l of the warps w whose
// ranges hold segment l's blocks (consecutive warps: [starts[l], starts[l + 1]) over the
// split's blocks per warp), added in a fixed order (lanes over the warps, then butterflies),
// times the row scale when kRowScales (a float basis); 0 for a segment without blocks. Grid
// (rows, K tiles), a warp per row of the tile.
template <bool kRowScales>
__global__ void __launch_bounds__(kThreads)
    step_segments_finish_kernel(const float* __restrict__ partial, const int32_t* __restrict__ starts,
                                int64_t per_warp, int64_t K, const float* __restrict__ scales,
                                float* __restrict__ out) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t seg = blockIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kTileRows;
  const int64_t b_lo = __ldg(starts + seg);
  const int64_t b_hi = __ldg(starts + seg + 1);
  const int64_t w_lo = b_lo / per_warp;
  const int64_t w_hi = b_hi > b_lo ? (b_hi - 1) / per_warp + 1 : w_lo;
  for (int r = warp; r < kTileRows; r += kWarps) {
    const int64_t row = row0 + r;
    if (row >= K) break;  // uniform across the warp
    float s = 0.f;
    for (int64_t w = w_lo + lane; w < w_hi; w += kWarp) s += __ldg(partial + (w + seg) * K + row);
    s = warp_sum(s);
    if (lane == 0) out[seg * K + row] = kRowScales ? s * __ldg(scales + row) : s;
  }
}

// ---- write pass ----------------------------------------------------------------------------

// The thread's U groups of V values (write_fast's layout), rounded to P, in vector stores.
template <typename P, int V, int U>
__device__ __forceinline__ void store_groups(const Block& b, int64_t lane_col,
                                             const float (&acc)[U][V]) {
  P* out = reinterpret_cast<P*>(b.param_addr) + b.first + lane_col;
#pragma unroll
  for (int u = 0; u < U; ++u) store_vec<P, V>(out + u * kWarp * V, acc[u]);
}

// The thread's columns lane + 32 j (write_slow's layout) below the block's values, rounded to P.
template <typename P>
__device__ __forceinline__ void store_masked(const Block& b, int lane, const float (&acc)[kSlowCols]) {
  P* out = reinterpret_cast<P*>(b.param_addr) + b.first;
#pragma unroll
  for (int j = 0; j < kSlowCols; ++j) {
    const int64_t c = lane + j * kWarp;
    if (c < b.values) out[c] = from_float<P>(acc[j]);
  }
}

// The write pass's coefficient of basis row k: coef[k] from shared memory (alpha, times the
// row scales of a float basis, staged once per block of threads), or with segments (kSeg)
// element k of the block's row of alpha through the read-only cache, times the row scale
// (kRowScales).
template <bool kSeg, bool kRowScales>
__device__ __forceinline__ float write_coef(const float* coef, const float* __restrict__ scales,
                                            int64_t k) {
  if constexpr (kSeg) {
    const float a = __ldg(coef + k);
    if constexpr (kRowScales) return a * __ldg(scales + k);
    return a;
  } else {
    return coef[k];
  }
}

// coef: coef_s, or with kSeg the block's row of alpha (scales: the row scales).
template <typename T, bool kSeg>
__device__ __forceinline__ void write_fast(const T* __restrict__ cols, int64_t ld, int64_t K,
                                           const float* coef, const float* __restrict__ scales,
                                           const float* __restrict__ w0c, const Block& b, int lane) {
  constexpr int V = Tile<T>::V, U = Tile<T>::U, R = Tile<T>::R;
  const int64_t lane_col = static_cast<int64_t>(lane) * V;
  float acc[U][V];
#pragma unroll
  for (int u = 0; u < U; ++u) load_vec<float, V>(w0c + lane_col + u * kWarp * V, acc[u]);
  int64_t k = 0;
  for (; k + R <= K; k += R) {
    uint4 w[R][U];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const T* p = cols + (k + r) * ld + lane_col;
#pragma unroll
      for (int u = 0; u < U; ++u) w[r][u] = __ldg(reinterpret_cast<const uint4*>(p + u * kWarp * V));
    }
    [[maybe_unused]] float cg[R];  // kSeg: the group's coefficients, loaded with its rows
    if constexpr (kSeg) {
#pragma unroll
      for (int r = 0; r < R; ++r) cg[r] = write_coef<true, true>(coef, scales, k + r);
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float c;
      if constexpr (kSeg) {
        c = cg[r];
      } else {
        c = coef[k + r];
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float v[V];
        unpack16<T, float>(w[r][u], v);
#pragma unroll
        for (int e = 0; e < V; ++e) acc[u][e] = fmaf(c, v[e], acc[u][e]);
      }
    }
  }
  for (; k < K; ++k) {
    uint4 w[U];
    const T* p = cols + k * ld + lane_col;
#pragma unroll
    for (int u = 0; u < U; ++u) w[u] = __ldg(reinterpret_cast<const uint4*>(p + u * kWarp * V));
    const float c = write_coef<kSeg, true>(coef, scales, k);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float v[V];
      unpack16<T, float>(w[u], v);
#pragma unroll
      for (int e = 0; e < V; ++e) acc[u][e] = fmaf(c, v[e], acc[u][e]);
    }
  }
  TWA_TABLE_DISPATCH(b.param_dtype, P, store_groups<P, V, U>(b, lane_col, acc));
}

template <typename T, bool kSeg>
__device__ __forceinline__ void write_slow(const T* __restrict__ cols, int64_t ld, int64_t K,
                                           const float* coef, const float* __restrict__ scales,
                                           const float* __restrict__ w0c, const Block& b, int lane) {
  float acc[kSlowCols];
#pragma unroll
  for (int j = 0; j < kSlowCols; ++j) {
    const int64_t c = lane + j * kWarp;
    acc[j] = c < b.values ? w0c[c] : 0.f;
  }
  int64_t k = 0;
  for (; k + kSlowRows <= K; k += kSlowRows) {
    float w[kSlowRows][kSlowCols];
    load_rows_masked<T, kSlowRows>(cols, ld, k, K - 1, b.values, lane, w);
#pragma unroll
    for (int r = 0; r < kSlowRows; ++r) {
      const float c = write_coef<kSeg, true>(coef, scales, k + r);
#pragma unroll
      for (int j = 0; j < kSlowCols; ++j) acc[j] = fmaf(c, w[r][j], acc[j]);
    }
  }
  for (; k < K; ++k) {
    float w[1][kSlowCols];
    load_rows_masked<T, 1>(cols, ld, k, K - 1, b.values, lane, w);
    const float c = write_coef<kSeg, true>(coef, scales, k);
#pragma unroll
    for (int j = 0; j < kSlowCols; ++j) acc[j] = fmaf(c, w[0][j], acc[j]);
  }
  TWA_TABLE_DISPATCH(b.param_dtype, P, store_masked<P>(b, lane, acc));
}

// kSeg (per-block coordinates): alpha is [rows, K] and a block takes the row segments[param];
// the coefficients are read with the basis rows instead of staged in shared memory.
template <typename T, bool kSeg>
__global__ void __launch_bounds__(kThreads, 2)
    step_write_kernel(const int64_t* __restrict__ ptab, const int64_t* __restrict__ btab,
                      int64_t nblk, step::BlockSplit split, const T* __restrict__ basis,
                      int64_t ld, int64_t K, bool vec, const float* __restrict__ scales,
                      const float* __restrict__ w0, const float* __restrict__ alpha,
                      const int64_t* __restrict__ segments) {
  extern __shared__ float coef_s[];  // [K]: alpha * scales (not kSeg)
  if constexpr (!kSeg) {
    for (int64_t i = threadIdx.x; i < K; i += kThreads) coef_s[i] = alpha[i] * scales[i];
    __syncthreads();
  }
  const int lane = threadIdx.x % kWarp;
  const int64_t gw = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  const int64_t b_begin = step::warp_begin(split, nblk, gw);
  const int64_t b_end = step::warp_end(split, nblk, gw);
  uint32_t win = window_first(ptab, btab, b_begin, b_end, lane);
  [[maybe_unused]] int64_t seg_next = 0;  // kSeg: segment of the next block, one block ahead
  if constexpr (kSeg) seg_next = block_segment(btab, segments, b_begin, b_end);
  for (int64_t blk = b_begin; blk < b_end; ++blk) {
    const Block b = window_advance(ptab, btab, blk, b_end, lane, win);
    const float* coef = coef_s;
    if constexpr (kSeg) {
      coef = alpha + seg_next * K;
      seg_next = __ldg(segments + b.next_param);
    }
    if (b.values <= 0) continue;
    if (vec && b.aligned && b.values == kBlockCols) {
      write_fast<T, kSeg>(basis + b.col0, ld, K, coef, scales, w0 + b.col0, b, lane);
    } else {
      write_slow<T, kSeg>(basis + b.col0, ld, K, coef, scales, w0 + b.col0, b, lane);
    }
  }
}

// ---- write pass over an int8 basis -----------------------------------------------------------
//
// Lane l holds the block's values [16 l, 16 l + 16) in 16 fp32 accumulators (w0 first). Whole
// aligned blocks: rows in groups of kLoadsInFlight, their evict-first 16-byte loads and one
// scale per lane and row issued before any is used (rows past K repeat row K - 1 and add
// nothing), each group added with the coefficient alpha[k] * scale; stored in 16-byte vectors.
// Other blocks: byte loads masked to the block's values, kInt8SlowRows rows at a time, one
// scale per value (the two of int8_lane's split), stored value by value. coef: as for the
// float write (no row scales).

template <bool kSeg>
__device__ __forceinline__ void write_int8_fast(const int8_t* __restrict__ cols, int64_t ld,
                                                int64_t K, const float* coef,
                                                const float* __restrict__ scales, int64_t sld,
                                                const float* __restrict__ w0c, const Block& b,
                                                int lane) {
  constexpr int R = kLoadsInFlight;
  const step::Int8Lane q = step::int8_lane(b.col0, b.values, lane);
  const int64_t lane_col = q.col - b.col0;
  const int8_t* base = cols + lane_col;
  const float* srow = scales + q.blk_lo;
  float acc[kInt8Group];
  load_vec<float, kInt8Group>(w0c + lane_col, acc);
  for (int64_t k = 0; k < K; k += R) {
    uint4 w[R];
    float s[R];
#pragma unroll
    for (int r = 0; r < R; ++r) w[r] = ld_stream16(base + min64(k + r, K - 1) * ld);
#pragma unroll
    for (int r = 0; r < R; ++r) s[r] = __ldg(srow + min64(k + r, K - 1) * sld);
    [[maybe_unused]] float cg[R];  // kSeg: the group's coefficients, loaded with its rows
    if constexpr (kSeg) {
#pragma unroll
      for (int r = 0; r < R; ++r) cg[r] = write_coef<true, false>(coef, nullptr, min64(k + r, K - 1));
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (k + r < K) {
        if constexpr (kSeg) {
          int8_group_fma(w[r], cg[r] * s[r], acc);
        } else {
          int8_group_fma(w[r], coef[k + r] * s[r], acc);
        }
      }
    }
  }
  TWA_TABLE_DISPATCH(b.param_dtype, P,
                     store_vec<P, kInt8Group>(reinterpret_cast<P*>(b.param_addr) + b.first + lane_col, acc));
}

template <bool kSeg>
__device__ __forceinline__ void write_int8_slow(const int8_t* __restrict__ cols, int64_t ld,
                                                int64_t K, const float* coef,
                                                const float* __restrict__ scales, int64_t sld,
                                                const float* __restrict__ w0c, const Block& b,
                                                int lane) {
  constexpr int R = kInt8SlowRows;
  const step::Int8Lane q = step::int8_lane(b.col0, b.values, lane);
  if (q.n <= 0) return;  // the lane's values are past the block's
  const int64_t lane_col = q.col - b.col0;
  const int8_t* base = cols + lane_col;
  float acc[kInt8Group];
#pragma unroll
  for (int e = 0; e < kInt8Group; ++e) acc[e] = e < q.n ? w0c[lane_col + e] : 0.f;
  for (int64_t k = 0; k < K; k += R) {
    uint4 w[R];
    float s_lo[R], s_hi[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t row = min64(k + r, K - 1);
      w[r] = load_int8_bytes(base + row * ld, q.n);
      s_lo[r] = __ldg(scales + row * sld + q.blk_lo);
      s_hi[r] = __ldg(scales + row * sld + q.blk_hi);
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (k + r < K) {
        const float c = write_coef<kSeg, false>(coef, nullptr, k + r);
        const float c_lo = c * s_lo[r], c_hi = c * s_hi[r];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          float v[4];
          int8x4_to_float(word_of(w[r], i), v);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int j = 4 * i + e;
            acc[j] = fmaf(j < q.split ? c_lo : c_hi, v[e], acc[j]);
          }
        }
      }
    }
  }
  TWA_TABLE_DISPATCH(b.param_dtype, P,
                     store_first<P>(reinterpret_cast<P*>(b.param_addr) + b.first + lane_col, q.n, acc));
}

// The int8 write pass: step_write_kernel's grid and walk, the coefficients alpha (no row
// scales) in shared memory (kSeg: each block's row of alpha, read with the basis rows), the
// block scales read with the basis rows. 2 resident blocks of threads per SM like the float
// kernels (at 3, 80 registers, sm_80's code spilled).
template <bool kSeg>
__global__ void __launch_bounds__(kThreads, 2)
    step_write_int8_kernel(const int64_t* __restrict__ ptab, const int64_t* __restrict__ btab,
                           int64_t nblk, step::BlockSplit split, const int8_t* __restrict__ basis,
                           int64_t ld, int64_t K, bool vec, const float* __restrict__ scales,
                           int64_t sld, const float* __restrict__ w0,
                           const float* __restrict__ alpha, const int64_t* __restrict__ segments) {
  extern __shared__ float coef_s[];  // [K]: alpha (not kSeg)
  if constexpr (!kSeg) {
    for (int64_t i = threadIdx.x; i < K; i += kThreads) coef_s[i] = alpha[i];
    __syncthreads();
  }
  const int lane = threadIdx.x % kWarp;
  const int64_t gw = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  const int64_t b_begin = step::warp_begin(split, nblk, gw);
  const int64_t b_end = step::warp_end(split, nblk, gw);
  uint32_t win = window_first(ptab, btab, b_begin, b_end, lane);
  [[maybe_unused]] int64_t seg_next = 0;  // kSeg: segment of the next block, one block ahead
  if constexpr (kSeg) seg_next = block_segment(btab, segments, b_begin, b_end);
  for (int64_t blk = b_begin; blk < b_end; ++blk) {
    const Block b = window_advance(ptab, btab, blk, b_end, lane, win);
    const float* coef = coef_s;
    if constexpr (kSeg) {
      coef = alpha + seg_next * K;
      seg_next = __ldg(segments + b.next_param);
    }
    if (b.values <= 0) continue;
    if (step::int8_fast_block(vec, b.aligned, b.values)) {
      write_int8_fast<kSeg>(basis + b.col0, ld, K, coef, scales, sld, w0 + b.col0, b, lane);
    } else {
      write_int8_slow<kSeg>(basis + b.col0, ld, K, coef, scales, sld, w0 + b.col0, b, lane);
    }
  }
}

// ---- per-block coordinate step (reference.block_step_) ----------------------------------------
//
// L blocks of K coordinates. Every block of threads first checks all L x K entries of
// c = coord_grad * inv_norms (so no block of threads waits on another for the finiteness; a
// few hundred KiB from L2 each at L x K = 3e4) and reads counters[0]; it then takes the blocks
// l = blockIdx.x, + gridDim.x, ...: r = pw0 + gram_l a_l (one warp per row, into shared
// memory; skipped without weight decay) before any coordinate of a_l is written, then the rule
// per coordinate, then coef = alpha * inv_norms. The last block of threads to finish (an
// integer ticket, left zero) updates the counters, after every block of threads has read them.
// fp32 with separately rounded products and sums (no contraction), as the reference's tensor
// ops compute them; G a_l is a warp's butterfly sum.
// a / b rounded to nearest, subnormal operands and results flushed to zero (div.rn.ftz.f32):
// the division without the subroutine call of its subnormal path, whose calling convention made
// ptxas spill this kernel's loop invariants.
__device__ __forceinline__ float div_rn_ftz(float a, float b) {
  float q;
  asm("div.rn.ftz.f32 %0, %1, %2;" : "=f"(q) : "f"(a), "f"(b));
  return q;
}

__global__ void __launch_bounds__(kThreads) block_step_kernel(const BlockStepArgs a) {
  extern __shared__ float r_s[];  // [K]: r of the block
  __shared__ int64_t steps_s;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t K = a.K;
  const int64_t n = a.L * K;
  bool ok = true;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    ok &= static_cast<bool>(isfinite(__fmul_rn(__ldg(a.coord_grad + i), __ldg(a.inv_norms + i))));
  }
  if (threadIdx.x == 0) steps_s = a.counters[0];
  const bool finite = __syncthreads_and(ok) != 0;
  const int64_t steps = steps_s;
  const float lr = __ldg(a.lr);
  float bc1 = 1.f, bc2 = 1.f;  // AdamW's bias corrections 1 - beta^t, t = steps + 1 in fp32
  if (a.adamw) {
    const float t = static_cast<float>(steps + 1);
    bc1 = __fsub_rn(1.f, powf(a.beta1, t));
    bc2 = __fsub_rn(1.f, powf(a.beta2, t));
  }
  const float lr_wd = __fmul_rn(lr, a.weight_decay);
  for (int64_t l = blockIdx.x; l < a.L; l += gridDim.x) {
    const int64_t base = l * K;
    if (!finite) {
      for (int64_t k = threadIdx.x; k < K; k += kThreads) {
        a.coef[base + k] = __fmul_rn(a.alpha[base + k], __ldg(a.inv_norms + base + k));
      }
      continue;
    }
    if (a.use_weight_decay) {
      const float* g = a.gram + l * K * K;
      for (int64_t k = warp; k < K; k += kWarps) {
        const float* row = g + k * K;
        float s = 0.f;
        for (int64_t j = lane; j < K; j += kWarp) s = fmaf(__ldg(row + j), a.alpha[base + j], s);
        s = warp_sum(s);
        if (lane == 0) r_s[k] = __fadd_rn(__ldg(a.pw0 + base + k), s);
      }
      __syncthreads();
    }
    for (int64_t k = threadIdx.x; k < K; k += kThreads) {
      const int64_t i = base + k;
      const float c = __fmul_rn(__ldg(a.coord_grad + i), __ldg(a.inv_norms + i));
      const float alpha = a.alpha[i];
      float next;
      if (a.adamw) {
        const float decayed = a.use_weight_decay ? __fsub_rn(alpha, __fmul_rn(lr_wd, r_s[k])) : alpha;
        const float b1 = a.buf1[i];
        const float m = __fadd_rn(b1, __fmul_rn(a.one_minus_beta1, __fsub_rn(c, b1)));
        const float v =
            __fadd_rn(__fmul_rn(a.beta2, a.buf2[i]), __fmul_rn(__fmul_rn(a.one_minus_beta2, c), c));
        const float denom = __fadd_rn(__fsqrt_rn(div_rn_ftz(v, bc2)), a.eps);
        next = __fsub_rn(decayed, div_rn_ftz(__fmul_rn(lr, div_rn_ftz(m, bc1)), denom));
        a.buf1[i] = m;
        a.buf2[i] = v;
      } else {
        const float d = a.use_weight_decay ? __fadd_rn(c, __fmul_rn(a.weight_decay, r_s[k])) : c;
        float update = d;
        if (a.use_momentum) {
          const float buf = steps == 0 ? d
                                       : __fadd_rn(__fmul_rn(a.momentum, a.buf1[i]),
                                                   __fmul_rn(a.one_minus_dampening, d));
          a.buf1[i] = buf;
          update = a.nesterov ? __fadd_rn(d, __fmul_rn(a.momentum, buf)) : buf;
        }
        next = __fsub_rn(alpha, __fmul_rn(lr, update));
      }
      a.alpha[i] = next;
      a.coef[i] = __fmul_rn(next, __ldg(a.inv_norms + i));
    }
    __syncthreads();  // r_s is the next block's
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();  // this block of threads read counters[0] before its ticket
    if (atomicAdd(a.ticket, 1u) == gridDim.x - 1) {
      __threadfence();
      a.counters[0] += finite ? 1 : 0;
      a.counters[1] += finite ? 0 : 1;
      *a.ticket = 0u;  // ready for the next launch
    }
  }
}

// ---- host side -----------------------------------------------------------------------------

// Resident blocks of threads per SM of `kernel` (current device), queried once per device,
// kernel and shared memory size.
cudaError_t resident_per_sm(const void* kernel, size_t smem, int* out) {
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, size_t>, int> cache;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const auto key = std::make_tuple(device, kernel, smem);
  const std::lock_guard<std::mutex> lock(mutex);
  const auto it = cache.find(key);
  if (it != cache.end()) {
    *out = it->second;
    return cudaSuccess;
  }
  int n = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, smem);
  if (err != cudaSuccess) return err;
  *out = n > 0 ? n : 1;
  cache.emplace(key, *out);
  return cudaSuccess;
}

// The fused step's kernels for a basis storage type and segments (per-block coordinates).
template <typename T, bool kSeg>
struct StepKernels {
  static const void* project() { return reinterpret_cast<const void*>(&step_project_kernel<T, kSeg>); }
  static const void* write() { return reinterpret_cast<const void*>(&step_write_kernel<T, kSeg>); }
};
template <bool kSeg>
struct StepKernels<int8_t, kSeg> {
  static const void* project() { return reinterpret_cast<const void*>(&step_project_int8_kernel<kSeg>); }
  static const void* write() { return reinterpret_cast<const void*>(&step_write_int8_kernel<kSeg>); }
};

// 16-byte loads of the basis: every row starts 16-byte aligned.
bool basis_vec(const BasisView& b) {
  const int es = dtype_size(b.dtype);
  return reinterpret_cast<uint64_t>(b.data) % kVecBytes == 0 &&
         (b.K == 1 || (b.ld * es) % kVecBytes == 0);
}

bool valid(const StepTables& t, const BasisView& b) {
  return t.ptab != nullptr && t.btab != nullptr && t.nblk >= 1 && b.K >= 1 && b.D >= 1;
}

// An int8 basis needs its block scales and their row stride.
bool valid_int8_scales(const BasisView& b, const float* scales, int64_t scales_ld) {
  return b.dtype != DType::kInt8 || (scales != nullptr && scales_ld >= 0);
}

template <typename T, bool kSeg>
cudaError_t project_plan(const BasisView& basis, int64_t nblk, int sm_count,
                         step::ProjectSplit* out) {
  int per_sm = 1;
  const cudaError_t err = resident_per_sm(StepKernels<T, kSeg>::project(), 0, &per_sm);
  if (err != cudaSuccess) return err;
  *out = step::plan_project(basis.K, nblk, sm_count, per_sm, kWarps);
  return cudaSuccess;
}

template <bool kSeg>
cudaError_t dispatch_project_plan(const BasisView& basis, int64_t nblk, int sm_count,
                                  step::ProjectSplit* out) {
  if (basis.dtype == DType::kInt8) return project_plan<int8_t, kSeg>(basis, nblk, sm_count, out);
  TWA_DISPATCH_STORAGE(basis.dtype, T, return project_plan<T, kSeg>(basis, nblk, sm_count, out));
  return cudaSuccess;
}

template <typename T, bool kSeg>
cudaError_t launch_write(const StepWriteArgs& a, bool vec, cudaStream_t stream) {
  const BasisView& b = a.basis;
  const size_t smem = kSeg ? 0 : static_cast<size_t>(b.K) * sizeof(float);
  int per_sm = 1;
  const cudaError_t err = resident_per_sm(StepKernels<T, kSeg>::write(), smem, &per_sm);
  if (err != cudaSuccess) return err;
  const step::BlockSplit split = step::plan_write(a.tables.nblk, a.sm_count, per_sm, kWarps);
  const unsigned grid = static_cast<unsigned>(split.ctas);
  if constexpr (std::is_same_v<T, int8_t>) {
    step_write_int8_kernel<kSeg><<<grid, kThreads, smem, stream>>>(
        a.tables.ptab, a.tables.btab, a.tables.nblk, split, static_cast<const int8_t*>(b.data),
        b.ld, b.K, vec, a.scales, a.scales_ld, a.w0, a.alpha, a.segments);
  } else {
    step_write_kernel<T, kSeg><<<grid, kThreads, smem, stream>>>(
        a.tables.ptab, a.tables.btab, a.tables.nblk, split, static_cast<const T*>(b.data), b.ld,
        b.K, vec, a.scales, a.w0, a.alpha, a.segments);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_write(const StepWriteArgs& a, bool vec, cudaStream_t stream) {
  return a.segments != nullptr ? launch_write<T, true>(a, vec, stream)
                               : launch_write<T, false>(a, vec, stream);
}

}  // namespace

cudaError_t step_project_sizes(const BasisView& basis, int64_t nblk, int sm_count,
                               StepProjectSizes* out) {
  if (nblk < 1 || basis.K < 1) return cudaErrorInvalidValue;
  step::ProjectSplit p;
  const cudaError_t err = dispatch_project_plan<false>(basis, nblk, sm_count, &p);
  if (err != cudaSuccess) return err;
  out->splits = p.split.ctas;
  out->k_tiles = p.k_tiles;
  return cudaSuccess;
}

cudaError_t step_project(const StepProjectArgs& a, cudaStream_t stream) {
  const BasisView& b = a.basis;
  if (!valid(a.tables, b) || !valid_int8_scales(b, a.scales, a.scales_ld)) return cudaErrorInvalidValue;
  step::ProjectSplit p;
  cudaError_t err = dispatch_project_plan<false>(b, a.tables.nblk, a.sm_count, &p);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(p.k_tiles), static_cast<unsigned>(p.split.ctas));
  const bool vec = basis_vec(b);
  const SegmentWalk none{nullptr, nullptr, 0};
  if (b.dtype == DType::kInt8) {
    step_project_int8_kernel<false><<<grid, kThreads, 0, stream>>>(
        a.tables.ptab, a.tables.btab, a.tables.nblk, p.split, static_cast<const int8_t*>(b.data),
        b.ld, b.K, vec, a.scales, a.scales_ld, a.partials, a.tickets, a.out, none);
    return cudaGetLastError();
  }
  TWA_DISPATCH_STORAGE(b.dtype, T, {
    step_project_kernel<T, false><<<grid, kThreads, 0, stream>>>(
        a.tables.ptab, a.tables.btab, a.tables.nblk, p.split, static_cast<const T*>(b.data), b.ld,
        b.K, vec, a.scales, a.partials, a.tickets, a.out, none);
    return cudaGetLastError();
  });
  return cudaSuccess;
}

cudaError_t step_project_blocks_partials(const BasisView& basis, int64_t nblk, int64_t rows,
                                         int sm_count, int64_t* out) {
  if (nblk < 1 || basis.K < 1 || rows < 1) return cudaErrorInvalidValue;
  step::ProjectSplit p;
  const cudaError_t err = dispatch_project_plan<true>(basis, nblk, sm_count, &p);
  if (err != cudaSuccess) return err;
  *out = p.split.ctas * kWarps + rows;
  return cudaSuccess;
}

cudaError_t step_project_blocks(const StepProjectBlocksArgs& a, cudaStream_t stream) {
  const BasisView& b = a.basis;
  // starts hold block indices as int32; rows are grid.x of the second launch.
  if (!valid(a.tables, b) || !valid_int8_scales(b, a.scales, a.scales_ld) || a.segments == nullptr ||
      a.starts == nullptr || a.rows < 1 || a.rows > 0x7fffffff || a.tables.nblk > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  step::ProjectSplit p;
  cudaError_t err = dispatch_project_plan<true>(b, a.tables.nblk, a.sm_count, &p);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(p.k_tiles), static_cast<unsigned>(p.split.ctas));
  const dim3 finish_grid(static_cast<unsigned>(a.rows), static_cast<unsigned>(p.k_tiles));
  const bool vec = basis_vec(b);
  const SegmentWalk sw{a.segments, a.starts, a.rows};
  if (b.dtype == DType::kInt8) {
    step_project_int8_kernel<true><<<grid, kThreads, 0, stream>>>(
        a.tables.ptab, a.tables.btab, a.tables.nblk, p.split, static_cast<const int8_t*>(b.data),
        b.ld, b.K, vec, a.scales, a.scales_ld, a.partials, nullptr, nullptr, sw);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    step_segments_finish_kernel<false><<<finish_grid, kThreads, 0, stream>>>(
        a.partials, a.starts, p.split.per_warp, b.K, nullptr, a.out);
    return cudaGetLastError();
  }
  TWA_DISPATCH_STORAGE(b.dtype, T, {
    step_project_kernel<T, true><<<grid, kThreads, 0, stream>>>(
        a.tables.ptab, a.tables.btab, a.tables.nblk, p.split, static_cast<const T*>(b.data), b.ld,
        b.K, vec, a.scales, a.partials, nullptr, nullptr, sw);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    step_segments_finish_kernel<true><<<finish_grid, kThreads, 0, stream>>>(
        a.partials, a.starts, p.split.per_warp, b.K, a.scales, a.out);
    return cudaGetLastError();
  });
  return cudaSuccess;
}

cudaError_t step_write(const StepWriteArgs& a, cudaStream_t stream) {
  const BasisView& b = a.basis;
  // Without segments the coefficients are staged in shared memory: K <= kMaxWriteK.
  if (!valid(a.tables, b) || (a.segments == nullptr && b.K > kMaxWriteK) ||
      !valid_int8_scales(b, a.scales, a.scales_ld)) {
    return cudaErrorInvalidValue;
  }
  const bool vec = basis_vec(b) && reinterpret_cast<uint64_t>(a.w0) % kVecBytes == 0;
  if (b.dtype == DType::kInt8) return dispatch_write<int8_t>(a, vec, stream);
  TWA_DISPATCH_STORAGE(b.dtype, T, return dispatch_write<T>(a, vec, stream));
  return cudaSuccess;
}

cudaError_t block_step(const BlockStepArgs& a, cudaStream_t stream) {
  if (a.L < 1 || a.K < 1 || a.K > kMaxWriteK || a.ticket == nullptr || a.lr == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int64_t grid = min64(a.L, max64(a.sm_count, 1));
  const size_t smem = a.use_weight_decay ? static_cast<size_t>(a.K) * sizeof(float) : 0;
  block_step_kernel<<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace twa
