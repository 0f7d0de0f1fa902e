// orthogonalize: CGS2 of an fp32 sample v against basis rows [0, rank), fp64 accumulation,
// three passes over the basis (reference.orthogonalize_ is the contract):
//
//   pass 1  (split over D)  raw P^T v, ||v||^2                  -> partials, stage 2, finalize1
//   pass 2  (split over D)  v1 = v - P c1 per tile (to shared memory), raw P^T v1, ||v1||^2,
//                           max|v1|                             -> partials, stage 2, finalize2
//   pass 3  (over columns)  row `rank` = clamp((v - P h) * ROW_AMAX / max|v1|) in the storage dtype
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

// c1 = s * (P^T v)_raw and the pass-2 coefficients -(s * c1).
__global__ void __launch_bounds__(kThreads)
    orth_finalize1(double* __restrict__ work, const float* __restrict__ scales, int rank) {
  const OrthWorkspace W{rank};
  for (int i = threadIdx.x; i < rank; i += kThreads) {
    const double s = scales[i];
    const double c1 = s * work[W.sums1() + i];
    work[W.c1() + i] = c1;
    work[W.coef1() + i] = -(s * c1);
  }
}

// h = c1 + c2, ||u|| = sqrt(max(||v1||^2 - ||c2||^2, 0)), the result vector, the pass-3
// coefficients -(s * h), 1 / the storage scale, and scales[rank].
__global__ void __launch_bounds__(kThreads)
    orth_finalize2(double* __restrict__ work, float* __restrict__ scales, int rank, int64_t K,
                   double* __restrict__ result) {
  __shared__ double scratch[kWarps];
  const OrthWorkspace W{rank};
  double q = 0.0;
  for (int i = threadIdx.x; i < rank; i += kThreads) {
    const double s = scales[i];
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
    work[W.inv()] = amax > 0.0 ? kRowAmax / amax : 0.0;
    if (rank < K) scales[rank] = static_cast<float>(norm > 0.0 ? amax / (kRowAmax * norm) : 0.0);
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

int orth_blocks_per_sm(DType dtype) {
  switch (dtype) {
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
  OrthPlan p;
  p.layout = make_layout(reinterpret_cast<uint64_t>(a.basis), a.ld, a.rank, a.D, es);
  p.split = make_split_plan(num_tiles(p.layout, orth_tile_cols(vec_elems(es))),
                            max_splits_resident(a.sm_count, orth_blocks_per_sm(a.dtype), 1));
  return p;
}

bool valid_args(const OrthogonalizeArgs& a) {
  return a.K >= 1 && a.D >= 1 && a.rank >= 0 && a.rank <= a.K && a.rank <= kMaxOrthRank &&
         a.ld >= a.D;
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
      orth_finalize1<<<1, kThreads, 0, stream>>>(work, a.scales, rank);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
      orth_pass<T, 2><<<splits, kThreads, smem, stream>>>(basis, a.ld, rank, p.layout, p.split,
                                                           a.sample, work, partial);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
      orth_reduce<<<static_cast<unsigned>(ceil_div(rank + 2, kWarps)), kThreads, 0, stream>>>(
          partial, p.split.splits, rank + 2, rank + 1, work + W.sums2());
      return cudaGetLastError();
    case 3:
      orth_finalize2<<<1, kThreads, 0, stream>>>(work, a.scales, rank, a.K, a.result);
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
  TWA_DISPATCH_STORAGE(a.dtype, T, return launch_orth_phase<T>(a, p, phase, stream));
  return cudaSuccess;
}

}  // namespace twa
