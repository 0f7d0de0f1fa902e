// reconstruct: out[j] = w0[j] + sum_k (alpha[k] scales[k]) basis[k, j], fp32 accumulation,
// rounded once to out's dtype.
//
// One thread per group of V columns (one 16-byte load per basis row), the K coefficients staged
// through shared memory kThreads at a time (any K). No reduction over D, so no workspace: each
// output element is written by exactly one thread, summing k = 0, 1, ... in order.
#include "twa_device.cuh"

namespace twa {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads)
    reconstruct_kernel(const T* __restrict__ basis, int64_t ld, int64_t K, ColumnLayout L,
                       const float* __restrict__ scales, const float* __restrict__ w0,
                       const float* __restrict__ alpha, void* __restrict__ out,
                       DType out_dtype) {
  constexpr int V = kVecBytes / static_cast<int>(sizeof(T));
  __shared__ float coef_s[kThreads];

  const int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool active = g < num_groups(L);  // inactive threads still join the barriers
  const int64_t col0 = group_col(L, g);

  float acc[V];
#pragma unroll
  for (int e = 0; e < V; ++e) {
    acc[e] = (active && col_valid(L, col0 + e)) ? w0[col0 + e] : 0.f;
  }
  for (int64_t k0 = 0; k0 < K; k0 += kThreads) {
    const int n = static_cast<int>(min64(kThreads, K - k0));
    __syncthreads();  // the previous chunk is no longer read
    if (threadIdx.x < n) coef_s[threadIdx.x] = alpha[k0 + threadIdx.x] * scales[k0 + threadIdx.x];
    __syncthreads();
    if (active) {
#pragma unroll 4
      for (int k = 0; k < n; ++k) {
        float v[V];
        load_group<T, float>(basis + (k0 + k) * ld, col0, L, v);
        const float c = coef_s[k];
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] = fmaf(c, v[e], acc[e]);
      }
    }
  }
  if (!active) return;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    if (col_valid(L, col0 + e)) store_from_float(out, out_dtype, col0 + e, acc[e]);
  }
}

}  // namespace

cudaError_t reconstruct(const ReconstructArgs& a, cudaStream_t stream) {
  const BasisView& b = a.basis;
  if (b.K < 1 || b.D < 1) return cudaErrorInvalidValue;
  const ColumnLayout L =
      make_layout(reinterpret_cast<uint64_t>(b.data), b.ld, b.K, b.D, dtype_size(b.dtype));
  const int64_t blocks = ceil_div(num_groups(L), kThreads);
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  TWA_DISPATCH_STORAGE(b.dtype, T, {
    reconstruct_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        static_cast<const T*>(b.data), b.ld, b.K, L, a.scales, a.w0, a.alpha, a.out,
        a.out_dtype);
    return cudaGetLastError();
  });
  return cudaSuccess;
}

}  // namespace twa
