// reconstruct: out[j] = w0[j] + sum_k (alpha[k] scales[k]) basis[k, j], fp32 accumulation,
// rounded once to out's dtype.
//
// One thread per group of V columns (one 16-byte load per basis row), fp32 sums in registers.
// The grid is persistent: resident blocks per SM x SMs blocks (one wave) walk the column tiles
// of kThreads groups, tile = blockIdx.x, blockIdx.x + gridDim.x, ... The K coefficients are
// staged through shared memory kCoefChunk at a time (once per block when K <= kCoefChunk). A
// thread whose group is full and aligned (decided once per tile) runs the hot loop: the
// kLoadsInFlight 16-byte evict-first loads of rows k .. k + 7 are issued before any is consumed
// (rows past the chunk re-read its last row and are not added); other groups take masked scalar
// loads. No reduction over D, so no workspace: each output element is written by exactly one
// thread, summing k = 0, 1, ... in order.
#include "twa_device.cuh"

namespace twa {
namespace {

// Coefficients staged per chunk: 4 KiB of shared memory.
constexpr int kCoefChunk = 1024;

template <typename T>
__global__ void __launch_bounds__(kThreads, kStreamMinBlocks)
    reconstruct_kernel(const T* __restrict__ basis, int64_t ld, int64_t K, ColumnLayout L,
                       const float* __restrict__ scales, const float* __restrict__ w0,
                       const float* __restrict__ alpha, void* __restrict__ out,
                       DType out_dtype) {
  constexpr int V = kVecBytes / static_cast<int>(sizeof(T));
  constexpr int U = kLoadsInFlight;
  __shared__ float coef_s[kCoefChunk];

  auto stage = [&](int64_t k0, int n) {
    for (int i = threadIdx.x; i < n; i += kThreads) coef_s[i] = alpha[k0 + i] * scales[k0 + i];
  };
  const bool one_chunk = K <= kCoefChunk;
  if (one_chunk) {
    stage(0, static_cast<int>(K));
    __syncthreads();
  }

  const int64_t groups = num_groups(L);
  const int64_t tiles = ceil_div(groups, kThreads);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {  // uniform per block
    const int64_t g = tile * kThreads + threadIdx.x;
    const bool active = g < groups;  // inactive threads still join the barriers
    const int64_t col0 = group_col(L, g);
    const bool full = active && group_full(L, col0);

    float acc[V];
#pragma unroll
    for (int e = 0; e < V; ++e) {
      acc[e] = (active && col_valid(L, col0 + e)) ? w0[col0 + e] : 0.f;
    }
    for (int64_t k0 = 0; k0 < K; k0 += kCoefChunk) {
      const int n = static_cast<int>(min64(kCoefChunk, K - k0));
      if (!one_chunk) {
        __syncthreads();  // the previous chunk is no longer read
        stage(k0, n);
        __syncthreads();
      }
      const T* rows = basis + k0 * ld + col0;
      if (full) {
        // Hot loop: U loads in flight, then U rows accumulated in order.
        for (int k = 0; k < n; k += U) {
          uint4 w[U];
#pragma unroll
          for (int r = 0; r < U; ++r) {
            const int kr = k + r < n ? k + r : n - 1;
            w[r] = ld_stream16(rows + static_cast<int64_t>(kr) * ld);
          }
#pragma unroll
          for (int r = 0; r < U; ++r) {
            if (k + r < n) {
              float v[V];
              unpack16<T, float>(w[r], v);
              const float c = coef_s[k + r];
#pragma unroll
              for (int e = 0; e < V; ++e) acc[e] = fmaf(c, v[e], acc[e]);
            }
          }
        }
      } else if (active) {
        for (int k = 0; k < n; ++k) {
          float v[V];
          load_group_scalar<T, float>(basis + (k0 + k) * ld, col0, L, v);
          const float c = coef_s[k];
#pragma unroll
          for (int e = 0; e < V; ++e) acc[e] = fmaf(c, v[e], acc[e]);
        }
      }
    }
    if (active) {
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if (col_valid(L, col0 + e)) store_from_float(out, out_dtype, col0 + e, acc[e]);
      }
    }
  }
}

template <typename T>
cudaError_t launch_reconstruct(const ReconstructArgs& a, const ColumnLayout& L, cudaStream_t stream) {
  const int per_sm = resident_blocks_per_sm(reinterpret_cast<const void*>(&reconstruct_kernel<T>),
                                            kThreads, 0, kStreamMinBlocks);
  const int64_t tiles = ceil_div(num_groups(L), kThreads);
  const int64_t blocks = max64(1, min64(tiles, static_cast<int64_t>(per_sm) * current_sm_count()));
  reconstruct_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(a.basis.data), a.basis.ld, a.basis.K, L, a.scales, a.w0, a.alpha,
      a.out, a.out_dtype);
  return cudaGetLastError();
}

}  // namespace

cudaError_t reconstruct(const ReconstructArgs& a, cudaStream_t stream) {
  const BasisView& b = a.basis;
  if (b.K < 1 || b.D < 1) return cudaErrorInvalidValue;
  const ColumnLayout L =
      make_layout(reinterpret_cast<uint64_t>(b.data), b.ld, b.K, b.D, dtype_size(b.dtype));
  TWA_DISPATCH_STORAGE(b.dtype, T, return launch_reconstruct<T>(a, L, stream));
  return cudaSuccess;
}

}  // namespace twa
