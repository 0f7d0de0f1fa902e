// orthogonalize: CGS2 of an fp32 sample v against basis rows [0, rank), fp64 accumulation,
// three passes over the basis (reference.orthogonalize_ is the contract):
//
//   pass 1  (split over D)  raw P^T v, ||v||^2                  -> partials, stage 2, finalize1
//   pass 2  (split over D)  v1 = v - P c1 per tile (to shared memory), raw P^T v1, ||v1||^2,
//                           max|v1|                             -> partials, stage 2, finalize2
//   pass 3  (over columns)  row `rank` = clamp((v - P h) * ROW_AMAX / max|v1|) in the storage dtype
//
// Every reduction over D is per-block partials in a workspace plus a fixed-order second stage;
// the scalars (c1, h, norms, scale) stay on the device, so there is no host synchronisation.
// The launches are cut into three phases after the two second stages (twa_launch.h): the
// one-shot op runs them back to back, and a sharded basis combines the raw sums between them.
#include "twa_device.cuh"

namespace twa {
namespace {

template <typename T, int PASS>
__global__ void __launch_bounds__(kThreads, 2)
    orth_pass(const T* __restrict__ basis, int64_t ld, int rank, ColumnLayout L, SplitPlan plan,
              const float* __restrict__ sample, const double* __restrict__ work,
              double* __restrict__ partial) {
  constexpr int V = kVecBytes / static_cast<int>(sizeof(T));
  constexpr int TD = orth_tile_cols(V);
  constexpr int U = orth_groups_per_lane(V);
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
#pragma unroll 2
        for (int k = 0; k < n; ++k) {
          double v[V];
          load_group<T, double>(basis + (k0 + k) * ld, col0, L, v);
          const double c = coef_s[k];
#pragma unroll
          for (int e = 0; e < V; ++e) acc[e] = fma(c, v[e], acc[e]);
        }
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
    dot_rows<T, double, 1, U>(basis, ld, 0, rank, L, c0, xs, 1, acc_s, rank);
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
  for (int k0 = 0; k0 < rank; k0 += kThreads) {
    const int n = min(kThreads, rank - k0);
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < n) coef_s[threadIdx.x] = work[W.coef2() + k0 + threadIdx.x];
    __syncthreads();
    if (active) {
#pragma unroll 2
      for (int k = 0; k < n; ++k) {
        double v[V];
        load_group<T, double>(basis + (k0 + k) * ld, col0, L, v);
        const double c = coef_s[k];
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] = fma(c, v[e], acc[e]);
      }
    }
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

// The only source of the plan: the workspace size and every phase of one call derive it from
// the same args (basis address, ld, D, rank, dtype, sm_count).
OrthPlan plan_orth(const OrthogonalizeArgs& a) {
  const int es = dtype_size(a.dtype);
  OrthPlan p;
  p.layout = make_layout(reinterpret_cast<uint64_t>(a.basis), a.ld, a.rank, a.D, es);
  p.split = make_split_plan(num_tiles(p.layout, orth_tile_cols(vec_elems(es))),
                            max_splits_for(a.sm_count, 1));
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
