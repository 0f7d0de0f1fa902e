// orthogonalize: CGS2 of an fp32 sample v against basis rows [0, rank), fp64 accumulation,
// three passes over the basis (reference.orthogonalize_ is the contract):
//
//   pass 1  (split over D)  raw P^T v, ||v||^2                  -> partials, stage 2, finalize1
//   pass 2  (split over D)  v1 = v - P c1 per tile (to shared memory), raw P^T v1, ||v1||^2,
//                           max|v1|                             -> partials, stage 2, finalize2
//   pass 3  (over columns)  row `rank` = clamp((v - P h) * ROW_AMAX / max|v1|) in the storage dtype
//                           (an int8 basis: quantised per block of 64 values, with its scales)
//
// Loops that read the basis (none holds a barrier; the full/partial choice is made once per
// tile or per thread, partial groups take masked scalar loads in the same order):
//   - the dot products of a tile (passes 1, 2): x tile in shared memory (fp64), warp w takes
//     rows w, w + 8, ..., two rows per iteration, their 2 x 8 16-byte evict-first loads issued
//     before any is consumed; per row and tile, lane sums in order, a butterfly, and lane 0
//     adds into the row's fp64 sum in shared memory (one owner per row);
//   - the residual v - P c (pass 2 per tile, pass 3): one thread per group of V columns, rows k
//     ascending, 8 rows' 16-byte loads in flight (cached in pass 2, which re-reads the tile;
//     evict-first in pass 3), coefficients staged in shared memory kThreads at a time.
//
// Every reduction over D is per-block partials in a workspace plus a fixed-order second stage;
// the scalars (c1, h, norms, scale) stay on the device, so there is no host synchronisation.
// The launches are cut into three phases after the two second stages (twa_launch.h): the
// one-shot op runs them back to back, and a sharded basis combines the raw sums between them.
#include <mutex>
#include <set>

#include "twa_device.cuh"

namespace twa {
namespace {

// One 16-byte load of basis data that is read again soon (pass 2 reads each tile twice: the
// residual, then the dot products): the default caching policy, unlike ld_stream16's evict-first.
// Volatile for the same reason: a group of loads written before their consumers stays ahead.
__device__ __forceinline__ uint4 ld_keep16(const void* p) {
  uint4 w;
  asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(w.x), "=r"(w.y), "=r"(w.z), "=r"(w.w)
      : "l"(p));
  return w;
}

// acc[e] += sum_k coef[k0 + k] basis[k0 + k, col0 + e] over the rows of one staged coefficient
// chunk (coef_s[0, n)), k ascending, for this thread's group. A full group (one 16-byte load per
// row) issues the kLoadsInFlight loads of rows k .. k + 7 before any is consumed (rows past the
// chunk re-read its last row and are not added); other groups take masked scalar loads.
template <typename T, bool STREAM>
__device__ __forceinline__ void residual_rows(const T* __restrict__ basis, int64_t ld, int64_t k0,
                                              int n, const ColumnLayout& L, int64_t col0,
                                              bool full, const double* coef_s, double* acc) {
  constexpr int V = kVecBytes / static_cast<int>(sizeof(T));
  constexpr int R = kLoadsInFlight;
  if (full) {
    const T* rows = basis + k0 * ld + col0;
    for (int k = 0; k < n; k += R) {
      uint4 w[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int kr = k + r < n ? k + r : n - 1;
        const T* p = rows + static_cast<int64_t>(kr) * ld;
        w[r] = STREAM ? ld_stream16(p) : ld_keep16(p);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (k + r < n) {
          double v[V];
          unpack16<T, double>(w[r], v);
          const double c = coef_s[k + r];
#pragma unroll
          for (int e = 0; e < V; ++e) acc[e] = fma(c, v[e], acc[e]);
        }
      }
    }
  } else {
    for (int k = 0; k < n; ++k) {
      double v[V];
      load_group_scalar<T, double>(basis + (k0 + k) * ld, col0, L, v);
      const double c = coef_s[k];
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] = fma(c, v[e], acc[e]);
    }
  }
}

// acc_s[r] += sum over the tile's columns of basis[r, c] xs[c - c0], r in [0, rank). Warp w
// takes rows w, w + kWarps, ...; lane l sums its U groups u (columns c0 + (u * 32 + l) * V + e)
// in order u, e, then the butterfly, then lane 0 adds the tile's sum into acc_s[r] (one owner
// per row: no atomics, no barrier). A full tile (decided once, uniform over the block) issues
// the row's U 16-byte evict-first loads before any is consumed; other tiles take masked scalar
// loads (zero outside [0, D)) in the same order.
template <typename T>
__device__ __forceinline__ void dot_tile(const T* __restrict__ basis, int64_t ld, int rank,
                                         const ColumnLayout& L, int64_t c0, bool full,
                                         const double* xs, double* acc_s) {
  constexpr int V = kVecBytes / static_cast<int>(sizeof(T));
  constexpr int U = orth_groups_per_lane(V);
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  if (full) {
    // RW rows per iteration (r and r + kWarps, ...; a row past rank re-reads row r and is not
    // added), their RW x U loads issued first. Group u of the lane is at a constant offset
    // u * kWarp * V from its first group; each x value read from shared memory serves RW rows.
    constexpr int RW = 2;
    const T* lane_row = basis + static_cast<int64_t>(warp) * ld + lane_group_col(c0, 0, lane, V);
    const int64_t row_step = static_cast<int64_t>(kWarps) * ld;
    const double* xl = xs + lane_group(0, lane) * V;
    for (int r = warp; r < rank; r += RW * kWarps, lane_row += RW * row_step) {
      uint4 w[RW][U];
#pragma unroll
      for (int i = 0; i < RW; ++i) {
        const T* p = r + i * kWarps < rank ? lane_row + i * row_step : lane_row;
#pragma unroll
        for (int u = 0; u < U; ++u) w[i][u] = ld_stream16(p + u * kWarp * V);
      }
      double acc[RW];
#pragma unroll
      for (int i = 0; i < RW; ++i) acc[i] = 0.0;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const double* xr = xl + u * kWarp * V;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const double x = xr[e];
#pragma unroll
          for (int i = 0; i < RW; ++i) {
            const T* h = reinterpret_cast<const T*>(&w[i][u]);
            acc[i] = fma(static_cast<double>(Storage<T>::to_float(h[e])), x, acc[i]);
          }
        }
      }
#pragma unroll
      for (int i = 0; i < RW; ++i) {
        const double s = warp_sum(acc[i]);
        if (lane == 0 && r + i * kWarps < rank) acc_s[r + i * kWarps] += s;
      }
    }
  } else {
    for (int r = warp; r < rank; r += kWarps) {
      const T* row = basis + static_cast<int64_t>(r) * ld;
      double acc = 0.0;
#pragma unroll 1
      for (int u = 0; u < U; ++u) {
        double v[V];
        // lane_group_col in 64-bit arithmetic: u is not a constant in this rolled loop.
        load_group_scalar<T, double>(row, c0 + (static_cast<int64_t>(u) * kWarp + lane) * V, L, v);
        const double* xr = xs + lane_group(u, lane) * V;
#pragma unroll
        for (int e = 0; e < V; ++e) acc = fma(v[e], xr[e], acc);
      }
      const double s = warp_sum(acc);
      if (lane == 0) acc_s[r] += s;
    }
  }
}

// One block per split: its tiles of TD = kThreads V columns in order. Per tile, the x tile (pass
// 1: v; pass 2: v1 = v - P c1, one group per thread) goes to shared memory in fp64, then
// dot_tile. Barriers only between those phases and around each staged coefficient chunk, never
// inside a loop that loads the basis.
template <typename T, int PASS>
__global__ void __launch_bounds__(kThreads, 2)
    orth_pass(const T* __restrict__ basis, int64_t ld, int rank, ColumnLayout L, SplitPlan plan,
              const float* __restrict__ sample, const double* __restrict__ work,
              double* __restrict__ partial) {
  constexpr int V = kVecBytes / static_cast<int>(sizeof(T));
  constexpr int TD = orth_tile_cols(V);
  __shared__ __align__(16) double xs[TD];
  __shared__ double coef_s[kThreads];
  __shared__ double scratch[kWarps];
  extern __shared__ double acc_s[];  // [rank]

  const OrthWorkspace W{rank};
  const int64_t split = blockIdx.x;
  const int ncols = rank + PASS;  // pass 1: + ||v||^2; pass 2: + ||v1||^2, max|v1|
  double sq = 0.0;
  double amax = 0.0;

  for (int i = threadIdx.x; i < rank; i += kThreads) acc_s[i] = 0.0;

  const int64_t t_end = split_tile_end(plan, split);
  for (int64_t tile = split_tile_begin(plan, split); tile < t_end; ++tile) {
    const int64_t c0 = tile_col0(L, tile, TD);
    const bool full = tile_full(L, tile, TD);  // uniform over the block
    __syncthreads();  // the previous tile's xs is no longer read; acc_s is initialised
    if constexpr (PASS == 1) {
      for (int i = threadIdx.x; i < TD; i += kThreads) {
        const int64_t col = c0 + i;
        const double v = col_valid(L, col) ? static_cast<double>(sample[col]) : 0.0;
        xs[i] = v;
        sq = fma(v, v, sq);
      }
    } else {
      // v1 = v - P c1 for this thread's group (exactly one group per thread: TD = kThreads V).
      const int64_t col0 = c0 + static_cast<int64_t>(threadIdx.x) * V;
      const bool gfull = group_full(L, col0);
      double acc[V];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        acc[e] = col_valid(L, col0 + e) ? static_cast<double>(sample[col0 + e]) : 0.0;
      }
      for (int k0 = 0; k0 < rank; k0 += kThreads) {
        const int n = min(kThreads, rank - k0);
        __syncthreads();
        if (static_cast<int>(threadIdx.x) < n) coef_s[threadIdx.x] = work[W.coef1() + k0 + threadIdx.x];
        __syncthreads();
        // Cached loads: dot_tile reads the same tile right after.
        residual_rows<T, false>(basis, ld, k0, n, L, col0, gfull, coef_s, acc);
      }
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const double v1 = col_valid(L, col0 + e) ? acc[e] : 0.0;
        xs[threadIdx.x * V + e] = v1;
        sq = fma(v1, v1, sq);
        amax = nan_max(amax, fabs(v1));
      }
    }
    __syncthreads();
    dot_tile<T>(basis, ld, rank, L, c0, full, xs, acc_s);
  }
  __syncthreads();
  double* out = partial + split * ncols;
  for (int i = threadIdx.x; i < rank; i += kThreads) out[i] = acc_s[i];
  const double total = block_sum(sq, scratch);
  if (threadIdx.x == 0) out[rank] = total;
  if constexpr (PASS == 2) {
    const double m = block_max(amax, scratch);
    if (threadIdx.x == 0) out[rank + 1] = m;
  }
}

// Second stage: dst[i] = sum (i < n_sum) or max (i >= n_sum) over splits of partial[s, i].
__global__ void __launch_bounds__(kThreads)
    orth_reduce(const double* __restrict__ partial, int64_t splits, int64_t ncols, int64_t n_sum,
                double* __restrict__ dst) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  if (i >= ncols) return;  // uniform across a warp
  const double r = i < n_sum ? stage2_sum<double>(partial, splits, ncols, i)
                             : stage2_max(partial, splits, ncols, i);
  if (threadIdx.x % kWarp == 0) dst[i] = r;
}

// c1 = s * (P^T v)_raw and the pass-2 coefficients -(s * c1); s = 1 for an int8 basis (kInt8:
// its block scales are in the raw sums).
template <bool kInt8>
__global__ void __launch_bounds__(kThreads)
    orth_finalize1(double* __restrict__ work, const float* __restrict__ scales, int rank) {
  const OrthWorkspace W{rank};
  for (int i = threadIdx.x; i < rank; i += kThreads) {
    const double s = kInt8 ? 1.0 : scales[i];
    const double c1 = s * work[W.sums1() + i];
    work[W.c1() + i] = c1;
    work[W.coef1() + i] = -(s * c1);
  }
}

// h = c1 + c2, ||u|| = sqrt(max(||v1||^2 - ||c2||^2, 0)), the result vector, the pass-3
// coefficients -(s * h), 1 / the storage scale, and scales[rank]. kInt8: s = 1, and the store
// (which writes the block scales) gets ||u|| in the inverse scale's slot.
template <bool kInt8>
__global__ void __launch_bounds__(kThreads)
    orth_finalize2(double* __restrict__ work, float* __restrict__ scales, int rank, int64_t K,
                   double* __restrict__ result) {
  __shared__ double scratch[kWarps];
  const OrthWorkspace W{rank};
  double q = 0.0;
  for (int i = threadIdx.x; i < rank; i += kThreads) {
    const double s = kInt8 ? 1.0 : scales[i];
    const double c2 = s * work[W.sums2() + i];
    const double h = work[W.c1() + i] + c2;
    result[i] = h;
    work[W.coef2() + i] = -(s * h);
    q = fma(c2, c2, q);
  }
  const double c2c2 = block_sum(q, scratch);
  if (threadIdx.x == 0) {
    const double ss = work[W.sums2() + rank];
    const double amax = work[W.sums2() + rank + 1];
    const double d = ss - c2c2;
    const double norm = sqrt(d < 0.0 ? 0.0 : d);  // keeps NaN, as clamp_min does
    result[rank] = norm;
    result[rank + 1] = sqrt(work[W.sums1() + rank]);
    if (kInt8) {
      work[W.inv()] = norm;
    } else {
      work[W.inv()] = amax > 0.0 ? kRowAmax / amax : 0.0;
      if (rank < K) scales[rank] = static_cast<float>(norm > 0.0 ? amax / (kRowAmax * norm) : 0.0);
    }
  }
}

// Row `rank` = clamp((v - P h) * inv) in the storage dtype; one thread per group of V columns.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    orth_store(T* __restrict__ basis, int64_t ld, int rank, ColumnLayout L,
               const float* __restrict__ sample, const double* __restrict__ work) {
  constexpr int V = kVecBytes / static_cast<int>(sizeof(T));
  __shared__ double coef_s[kThreads];
  const OrthWorkspace W{rank};
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool active = g < num_groups(L);
  const int64_t col0 = group_col(L, g);

  double acc[V];
#pragma unroll
  for (int e = 0; e < V; ++e) {
    acc[e] = (active && col_valid(L, col0 + e)) ? static_cast<double>(sample[col0 + e]) : 0.0;
  }
  const bool full = active && group_full(L, col0);
  for (int k0 = 0; k0 < rank; k0 += kThreads) {
    const int n = min(kThreads, rank - k0);
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < n) coef_s[threadIdx.x] = work[W.coef2() + k0 + threadIdx.x];
    __syncthreads();
    // The last read of these rows: evict-first.
    if (active) residual_rows<T, true>(basis, ld, k0, n, L, col0, full, coef_s, acc);
  }
  if (!active) return;
  const double inv = work[W.inv()];
  T* row = basis + static_cast<int64_t>(rank) * ld;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    if (col_valid(L, col0 + e)) {
      row[col0 + e] = Storage<T>::from_double(clamp_keep_nan(acc[e] * inv, Storage<T>::kMax));
    }
  }
}

// ---- an int8 basis ------------------------------------------------------------------------------
//
// value(k, j) = q[k, j] * scales[k * sld + j / 64] (the row scale of the passes above is 1:
// the finalize kernels' kInt8). The same three passes over groups of V = 16 values that start
// at multiples of 16 columns (make_int8_layout: origin 0), so each group lies in one scale block:
// a group's fp64 dot product with the x tile is scaled once, a row's residual coefficient
// c_k * scale once per group. Values are dequantised to fp64 with byte permutes
// (int8x4_to_double: PRMT, DADD; no conversion instruction). Tiles of 4096 columns, so the
// fp64 x tile is 32 KiB of shared memory (beside up to 16 KiB of row sums: past the default
// 48 KiB, allowed once per device, allow_int8_pass_smem). The store quantises per block of
// 64 values: 4 consecutive groups, held by 4 adjacent lanes (their max|u| by two xor shuffles).

constexpr int kInt8OrthTile = orth_tile_cols(kInt8Group);  // 4096 columns

// acc[e] += sum_k coef[k0 + k] * scale[k0 + k, blk] * q[k0 + k, col0 + e] over one staged
// coefficient chunk (coef_s[0, n)), k ascending, for this thread's group (col0 < D: its scale
// block exists). A full group issues the kLoadsInFlight 16-byte loads of rows k .. k + 7 and
// their scales before any is used (rows past the chunk re-read its last row, not added);
// other groups take masked byte loads (zero outside [0, D)).
template <bool STREAM>
__device__ __forceinline__ void residual_rows_int8(const int8_t* __restrict__ basis, int64_t ld,
                                                   int64_t k0, int n, const ColumnLayout& L,
                                                   int64_t col0, bool full,
                                                   const float* __restrict__ scales, int64_t sld,
                                                   const double* coef_s, double (&acc)[kInt8Group]) {
  constexpr int R = kLoadsInFlight;
  const int64_t blk = scale_block(col0);
  const float* srows = scales + k0 * sld + blk;
  if (full) {
    const int8_t* rows = basis + k0 * ld + col0;
    for (int k = 0; k < n; k += R) {
      uint4 w[R];
      float s[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int kr = k + r < n ? k + r : n - 1;
        const int8_t* p = rows + static_cast<int64_t>(kr) * ld;
        w[r] = STREAM ? ld_stream16(p) : ld_keep16(p);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int kr = k + r < n ? k + r : n - 1;
        s[r] = __ldg(srows + static_cast<int64_t>(kr) * sld);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (k + r < n) {
          const double c = coef_s[k + r] * static_cast<double>(s[r]);
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            double v[4];
            int8x4_to_double(word_of(w[r], q), v);
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[4 * q + e] = fma(c, v[e], acc[4 * q + e]);
          }
        }
      }
    }
  } else {
    for (int k = 0; k < n; ++k) {
      const uint4 w = load_int8_group_masked(basis + (k0 + k) * ld, col0, L);
      const double c = coef_s[k] * static_cast<double>(__ldg(srows + static_cast<int64_t>(k) * sld));
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        double v[4];
        int8x4_to_double(word_of(w, q), v);
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[4 * q + e] = fma(c, v[e], acc[4 * q + e]);
      }
    }
  }
}

// The 16 values of an int8 group times the x values at xr (fp64, in order) into g.
__device__ __forceinline__ double int8_group_dot64(const uint4& w, const double* xr, double g) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    double v[4];
    int8x4_to_double(word_of(w, q), v);
#pragma unroll
    for (int e = 0; e < 4; ++e) g = fma(v[e], xr[4 * q + e], g);
  }
  return g;
}

// dot_tile over an int8 basis: acc_s[r] += sum over the tile's columns of P[r, c] xs[c - c0].
// Warp w takes rows w, w + kWarps, ..., two per iteration; lane l's U = 8 groups u (columns
// c0 + (u * 32 + l) * 16 + e, scale block c0 / 64 + 8 u + l / 4) in two halves of 4, each half's
// 2 x 4 16-byte evict-first loads and their scales issued before any is used; per group the
// dot product in order e, times its scale, added in order u; the butterfly, then lane 0 adds
// into acc_s[r]. Other tiles: one row at a time, masked byte loads of the lane's groups inside
// [0, D).
__device__ __forceinline__ void dot_tile_int8(const int8_t* __restrict__ basis, int64_t ld, int rank,
                                              const ColumnLayout& L, int64_t c0, bool full,
                                              const float* __restrict__ scales, int64_t sld,
                                              const double* xs, double* acc_s) {
  constexpr int V = kInt8Group;
  constexpr int U = orth_groups_per_lane(V);
  constexpr int H = U / 2;
  constexpr int RW = 2;
  constexpr int kBlocksPerGroupStep = kWarp * V / kQuantBlock;  // scale blocks between u and u + 1
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  if (full) {
    const int64_t col = lane_group_col(c0, 0, lane, V);
    const int8_t* lane_row = basis + static_cast<int64_t>(warp) * ld + col;
    const float* lane_srow = scales + static_cast<int64_t>(warp) * sld + scale_block(col);
    const int64_t row_step = static_cast<int64_t>(kWarps) * ld;
    const int64_t srow_step = static_cast<int64_t>(kWarps) * sld;
    const double* xl = xs + lane_group(0, lane) * V;
    for (int r = warp; r < rank;
         r += RW * kWarps, lane_row += RW * row_step, lane_srow += RW * srow_step) {
      double acc[RW];
#pragma unroll
      for (int i = 0; i < RW; ++i) acc[i] = 0.0;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint4 w[RW][H];
        float s[RW][H];
#pragma unroll
        for (int i = 0; i < RW; ++i) {
          const int8_t* p = r + i * kWarps < rank ? lane_row + i * row_step : lane_row;
#pragma unroll
          for (int u = 0; u < H; ++u) w[i][u] = ld_stream16(p + (h * H + u) * kWarp * V);
        }
#pragma unroll
        for (int i = 0; i < RW; ++i) {
          const float* sp = r + i * kWarps < rank ? lane_srow + i * srow_step : lane_srow;
#pragma unroll
          for (int u = 0; u < H; ++u) s[i][u] = __ldg(sp + (h * H + u) * kBlocksPerGroupStep);
        }
#pragma unroll
        for (int u = 0; u < H; ++u) {
          const double* xr = xl + (h * H + u) * kWarp * V;
#pragma unroll
          for (int i = 0; i < RW; ++i) {
            acc[i] = fma(int8_group_dot64(w[i][u], xr, 0.0), static_cast<double>(s[i][u]), acc[i]);
          }
        }
      }
#pragma unroll
      for (int i = 0; i < RW; ++i) {
        const double t = warp_sum(acc[i]);
        if (lane == 0 && r + i * kWarps < rank) acc_s[r + i * kWarps] += t;
      }
    }
  } else {
    for (int r = warp; r < rank; r += kWarps) {
      const int8_t* row = basis + static_cast<int64_t>(r) * ld;
      const float* srow = scales + static_cast<int64_t>(r) * sld;
      double acc = 0.0;
#pragma unroll 1
      for (int u = 0; u < U; ++u) {
        // lane_group_col in 64-bit arithmetic: u is not a constant in this rolled loop.
        const int64_t col0 = c0 + (static_cast<int64_t>(u) * kWarp + lane) * V;
        if (col0 < L.D) {
          const uint4 w = load_int8_group_masked(row, col0, L);
          const double g = int8_group_dot64(w, xs + lane_group(u, lane) * V, 0.0);
          acc = fma(g, static_cast<double>(__ldg(srow + scale_block(col0))), acc);
        }
      }
      const double t = warp_sum(acc);
      if (lane == 0) acc_s[r] += t;
    }
  }
}

// orth_pass over an int8 basis (the same tiles, split, partials and barriers).
template <int PASS>
__global__ void __launch_bounds__(kThreads, 2)
    orth_pass_int8(const int8_t* __restrict__ basis, int64_t ld, int rank, ColumnLayout L,
                   SplitPlan plan, const float* __restrict__ scales, int64_t sld,
                   const float* __restrict__ sample, const double* __restrict__ work,
                   double* __restrict__ partial) {
  constexpr int V = kInt8Group;
  constexpr int TD = kInt8OrthTile;
  __shared__ __align__(16) double xs[TD];
  __shared__ double coef_s[kThreads];
  __shared__ double scratch[kWarps];
  extern __shared__ double acc_s[];  // [rank]

  const OrthWorkspace W{rank};
  const int64_t split = blockIdx.x;
  const int ncols = rank + PASS;
  double sq = 0.0;
  double amax = 0.0;

  for (int i = threadIdx.x; i < rank; i += kThreads) acc_s[i] = 0.0;

  const int64_t t_end = split_tile_end(plan, split);
  for (int64_t tile = split_tile_begin(plan, split); tile < t_end; ++tile) {
    const int64_t c0 = tile_col0(L, tile, TD);
    const bool full = tile_full(L, tile, TD);  // uniform over the block
    __syncthreads();  // the previous tile's xs is no longer read; acc_s is initialised
    if constexpr (PASS == 1) {
      for (int i = threadIdx.x; i < TD; i += kThreads) {
        const int64_t col = c0 + i;
        const double v = col_valid(L, col) ? static_cast<double>(sample[col]) : 0.0;
        xs[i] = v;
        sq = fma(v, v, sq);
      }
    } else {
      // v1 = v - P c1 for this thread's group (one group per thread: TD = kThreads V).
      const int64_t col0 = c0 + static_cast<int64_t>(threadIdx.x) * V;
      const bool inside = col0 < L.D;  // a group past D (the last tile) reads no row
      const bool gfull = group_full(L, col0);
      double acc[V];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        acc[e] = col_valid(L, col0 + e) ? static_cast<double>(sample[col0 + e]) : 0.0;
      }
      for (int k0 = 0; k0 < rank; k0 += kThreads) {
        const int n = min(kThreads, rank - k0);
        __syncthreads();
        if (static_cast<int>(threadIdx.x) < n) coef_s[threadIdx.x] = work[W.coef1() + k0 + threadIdx.x];
        __syncthreads();
        // Cached loads: dot_tile_int8 reads the same tile right after.
        if (inside) residual_rows_int8<false>(basis, ld, k0, n, L, col0, gfull, scales, sld, coef_s, acc);
      }
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const double v1 = col_valid(L, col0 + e) ? acc[e] : 0.0;
        xs[threadIdx.x * V + e] = v1;
        sq = fma(v1, v1, sq);
        amax = nan_max(amax, fabs(v1));
      }
    }
    __syncthreads();
    dot_tile_int8(basis, ld, rank, L, c0, full, scales, sld, xs, acc_s);
  }
  __syncthreads();
  double* out = partial + split * ncols;
  for (int i = threadIdx.x; i < rank; i += kThreads) out[i] = acc_s[i];
  const double total = block_sum(sq, scratch);
  if (threadIdx.x == 0) out[rank] = total;
  if constexpr (PASS == 2) {
    const double m = block_max(amax, scratch);
    if (threadIdx.x == 0) out[rank + 1] = m;
  }
}

// Row `rank` of an int8 basis: u = v - P h per group of 16 columns (one thread each, rows read
// evict-first), quantised per block of 64 values (quantise_int8 with the block's max|u|, shared
// by the block's 4 lanes), 16-byte stores where the row allows; the block's lane 0 writes its
// scale amax / (127 ||u||) (||u|| from orth_finalize2<true>).
__global__ void __launch_bounds__(kThreads)
    orth_store_int8(int8_t* __restrict__ basis, int64_t ld, int rank, ColumnLayout L,
                    float* __restrict__ scales, int64_t sld, const float* __restrict__ sample,
                    const double* __restrict__ work) {
  constexpr int V = kInt8Group;
  constexpr int kGroupsPerBlock = kQuantBlock / V;
  __shared__ double coef_s[kThreads];
  const OrthWorkspace W{rank};
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool active = g < num_groups(L);
  const int64_t col0 = group_col(L, g);

  double acc[V];
#pragma unroll
  for (int e = 0; e < V; ++e) {
    acc[e] = (active && col_valid(L, col0 + e)) ? static_cast<double>(sample[col0 + e]) : 0.0;
  }
  const bool full = active && group_full(L, col0);
  for (int k0 = 0; k0 < rank; k0 += kThreads) {
    const int n = min(kThreads, rank - k0);
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < n) coef_s[threadIdx.x] = work[W.coef2() + k0 + threadIdx.x];
    __syncthreads();
    // The last read of these rows: evict-first.
    if (active) residual_rows_int8<true>(basis, ld, k0, n, L, col0, full, scales, sld, coef_s, acc);
  }
  // max|u| of the scale block: its 4 groups are lanes 4j .. 4j + 3 (group g = 4 b + j, and
  // blocks of threads start at multiples of 4 groups); columns past D count as 0.
  double a = 0.0;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    if (active && col_valid(L, col0 + e)) a = nan_max(a, fabs(acc[e]));
  }
#pragma unroll
  for (int m = 1; m < kGroupsPerBlock; m *= 2) a = nan_max(a, __shfl_xor_sync(0xffffffffu, a, m));
  if (!active) return;
  const double inv = quant_inv(a);
  int8_t* row = basis + static_cast<int64_t>(rank) * ld;
  if (full && reinterpret_cast<uint64_t>(row + col0) % kVecBytes == 0) {
    uint32_t word[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int e = 0; e < V; ++e) {
      word[e / 4] |= static_cast<uint32_t>(static_cast<uint8_t>(quantise_int8(acc[e], inv))) << (8 * (e % 4));
    }
    *reinterpret_cast<uint4*>(row + col0) = make_uint4(word[0], word[1], word[2], word[3]);
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      if (col_valid(L, col0 + e)) row[col0 + e] = quantise_int8(acc[e], inv);
    }
  }
  if (g % kGroupsPerBlock == 0) {
    scales[static_cast<int64_t>(rank) * sld + scale_block(col0)] = quant_scale(a, work[W.inv()]);
  }
}

struct OrthPlan {
  ColumnLayout layout;
  SplitPlan split;
};

// Resident blocks per SM of passes 1 and 2 (they share the split, so the fewer of the two),
// queried with the dynamic shared memory of the largest rank so that one cached value holds for
// every call. Their sm_90 code fits 2 (124-128 registers): a split of 4 per SM ran two waves.
template <typename T>
int orth_blocks_per_sm() {
  constexpr size_t smem = sizeof(double) * kMaxOrthRank;
  const int fallback = 2;  // the __launch_bounds__ minimum of orth_pass
  return min(resident_blocks_per_sm(reinterpret_cast<const void*>(&orth_pass<T, 1>), kThreads, smem,
                                    fallback),
             resident_blocks_per_sm(reinterpret_cast<const void*>(&orth_pass<T, 2>), kThreads, smem,
                                    fallback));
}

// The int8 passes' dynamic shared memory (up to kMaxOrthRank fp64 row sums) beside their 34
// KiB of static shared memory (the 4096-column x tile) passes the default 48 KiB: allowed once
// per device, before the occupancy query and any launch.
cudaError_t allow_int8_pass_smem() {
  static std::mutex mu;
  static std::set<int> done;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const std::lock_guard<std::mutex> lock(mu);
  if (done.count(dev) != 0) return cudaSuccess;
  constexpr int bytes = static_cast<int>(sizeof(double)) * kMaxOrthRank;
  for (const void* k : {reinterpret_cast<const void*>(&orth_pass_int8<1>),
                        reinterpret_cast<const void*>(&orth_pass_int8<2>)}) {
    err = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (err != cudaSuccess) return err;
  }
  done.insert(dev);
  return cudaSuccess;
}

int orth_int8_blocks_per_sm() {
  constexpr size_t smem = sizeof(double) * kMaxOrthRank;
  const int fallback = 2;  // the __launch_bounds__ minimum of orth_pass_int8
  if (allow_int8_pass_smem() != cudaSuccess) {
    (void)cudaGetLastError();
    return fallback;
  }
  return min(resident_blocks_per_sm(reinterpret_cast<const void*>(&orth_pass_int8<1>), kThreads,
                                    smem, fallback),
             resident_blocks_per_sm(reinterpret_cast<const void*>(&orth_pass_int8<2>), kThreads,
                                    smem, fallback));
}

int orth_blocks_per_sm(DType dtype) {
  switch (dtype) {
    case DType::kInt8:
      return orth_int8_blocks_per_sm();
    case DType::kFloat16:
      return orth_blocks_per_sm<__half>();
    case DType::kBFloat16:
      return orth_blocks_per_sm<__nv_bfloat16>();
    default:
      return orth_blocks_per_sm<float>();
  }
}

// The only source of the plan: the workspace size and every phase of one call derive it from
// the same args (basis address, ld, D, rank, dtype, sm_count) on the same device.
OrthPlan plan_orth(const OrthogonalizeArgs& a) {
  const int es = dtype_size(a.dtype);
  const uint64_t base = reinterpret_cast<uint64_t>(a.basis);
  const bool int8 = a.dtype == DType::kInt8;
  OrthPlan p;
  p.layout = int8 ? make_int8_layout(base, a.ld, a.rank, a.D)
                  : make_layout(base, a.ld, a.rank, a.D, es);
  const int64_t TD = int8 ? kInt8OrthTile : orth_tile_cols(vec_elems(es));
  p.split = make_split_plan(num_tiles(p.layout, TD),
                            max_splits_resident(a.sm_count, orth_blocks_per_sm(a.dtype), 1));
  return p;
}

bool valid_args(const OrthogonalizeArgs& a) {
  return a.K >= 1 && a.D >= 1 && a.rank >= 0 && a.rank <= a.K && a.rank <= kMaxOrthRank &&
         a.ld >= a.D && (a.dtype != DType::kInt8 || a.scales_ld >= 0);
}

// The kernels of one phase over an int8 basis (launch_orth_phase's, with the int8 passes and
// store, and the finalize kernels' kInt8).
cudaError_t launch_orth_phase_int8(const OrthogonalizeArgs& a, const OrthPlan& p, int phase,
                                   cudaStream_t stream) {
  const int rank = static_cast<int>(a.rank);
  const OrthWorkspace W{rank};
  double* work = a.workspace;
  double* partial = a.workspace + W.size();
  const unsigned splits = static_cast<unsigned>(p.split.splits);
  const size_t smem = sizeof(double) * static_cast<size_t>(rank > 0 ? rank : 1);
  int8_t* basis = static_cast<int8_t*>(a.basis);
  cudaError_t err = allow_int8_pass_smem();
  if (err != cudaSuccess) return err;

  switch (phase) {
    case 1:
      orth_pass_int8<1><<<splits, kThreads, smem, stream>>>(basis, a.ld, rank, p.layout, p.split,
                                                             a.scales, a.scales_ld, a.sample, work,
                                                             partial);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
      orth_reduce<<<static_cast<unsigned>(ceil_div(rank + 1, kWarps)), kThreads, 0, stream>>>(
          partial, p.split.splits, rank + 1, rank + 1, work + W.sums1());
      return cudaGetLastError();
    case 2:
      orth_finalize1<true><<<1, kThreads, 0, stream>>>(work, a.scales, rank);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
      orth_pass_int8<2><<<splits, kThreads, smem, stream>>>(basis, a.ld, rank, p.layout, p.split,
                                                             a.scales, a.scales_ld, a.sample, work,
                                                             partial);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
      orth_reduce<<<static_cast<unsigned>(ceil_div(rank + 2, kWarps)), kThreads, 0, stream>>>(
          partial, p.split.splits, rank + 2, rank + 1, work + W.sums2());
      return cudaGetLastError();
    case 3:
      orth_finalize2<true><<<1, kThreads, 0, stream>>>(work, a.scales, rank, a.K, a.result);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
      if (a.rank < a.K) {
        const int64_t blocks = ceil_div(num_groups(p.layout), kThreads);
        orth_store_int8<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
            basis, a.ld, rank, p.layout, a.scales, a.scales_ld, a.sample, work);
        if ((err = cudaGetLastError()) != cudaSuccess) return err;
      }
      return cudaSuccess;
    default:
      return cudaErrorInvalidValue;
  }
}

// The kernels of one phase (twa_launch.h); p is plan_orth of the same args.
template <typename T>
cudaError_t launch_orth_phase(const OrthogonalizeArgs& a, const OrthPlan& p, int phase,
                              cudaStream_t stream) {
  const int rank = static_cast<int>(a.rank);
  const OrthWorkspace W{rank};
  double* work = a.workspace;
  double* partial = a.workspace + W.size();
  const unsigned splits = static_cast<unsigned>(p.split.splits);
  const size_t smem = sizeof(double) * static_cast<size_t>(rank > 0 ? rank : 1);
  T* basis = static_cast<T*>(a.basis);
  cudaError_t err;

  switch (phase) {
    case 1:
      orth_pass<T, 1><<<splits, kThreads, smem, stream>>>(basis, a.ld, rank, p.layout, p.split,
                                                           a.sample, work, partial);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
      orth_reduce<<<static_cast<unsigned>(ceil_div(rank + 1, kWarps)), kThreads, 0, stream>>>(
          partial, p.split.splits, rank + 1, rank + 1, work + W.sums1());
      return cudaGetLastError();
    case 2:
      orth_finalize1<false><<<1, kThreads, 0, stream>>>(work, a.scales, rank);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
      orth_pass<T, 2><<<splits, kThreads, smem, stream>>>(basis, a.ld, rank, p.layout, p.split,
                                                           a.sample, work, partial);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
      orth_reduce<<<static_cast<unsigned>(ceil_div(rank + 2, kWarps)), kThreads, 0, stream>>>(
          partial, p.split.splits, rank + 2, rank + 1, work + W.sums2());
      return cudaGetLastError();
    case 3:
      orth_finalize2<false><<<1, kThreads, 0, stream>>>(work, a.scales, rank, a.K, a.result);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
      if (a.rank < a.K) {
        const int64_t blocks = ceil_div(num_groups(p.layout), kThreads);
        orth_store<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
            basis, a.ld, rank, p.layout, a.sample, work);
        if ((err = cudaGetLastError()) != cudaSuccess) return err;
      }
      return cudaSuccess;
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

int64_t orthogonalize_workspace_elems(const OrthogonalizeArgs& a) {
  const OrthPlan p = plan_orth(a);
  return OrthWorkspace{a.rank}.size() + p.split.splits * (a.rank + 2);
}

cudaError_t orthogonalize(const OrthogonalizeArgs& a, cudaStream_t stream) {
  if (!valid_args(a)) return cudaErrorInvalidValue;
  const OrthPlan p = plan_orth(a);
  if (a.dtype == DType::kInt8) {
    for (int phase = 1; phase <= kOrthPhases; ++phase) {
      const cudaError_t err = launch_orth_phase_int8(a, p, phase, stream);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
  TWA_DISPATCH_STORAGE(a.dtype, T, {
    for (int phase = 1; phase <= kOrthPhases; ++phase) {
      const cudaError_t err = launch_orth_phase<T>(a, p, phase, stream);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  });
  return cudaSuccess;
}

cudaError_t orthogonalize_phase(const OrthogonalizeArgs& a, int phase, cudaStream_t stream) {
  if (!valid_args(a) || phase < 1 || phase > kOrthPhases) return cudaErrorInvalidValue;
  const OrthPlan p = plan_orth(a);
  if (a.dtype == DType::kInt8) return launch_orth_phase_int8(a, p, phase, stream);
  TWA_DISPATCH_STORAGE(a.dtype, T, return launch_orth_phase<T>(a, p, phase, stream));
  return cudaSuccess;
}

}  // namespace twa
