// Canary for .ci/ptx_addr32.py: kernels that form global addresses from 32-bit products the
// way a kernel could get it wrong, and one that does it right. .ci/check_cuda.sh compiles this
// file to PTX and requires the check to report exactly the products marked BAD (one each), so
// a check that stopped seeing them would fail CI too.
#include <cstdint>

#include <cuda_fp16.h>

// BAD: orthogonalize_'s store pass written with 32-bit factors (row `rank` of the basis).
__global__ void store_row_times_stride(__half* basis, int ld, int rank, int D, float v) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j < D) basis[rank * ld + j] = __float2half(v);
}

// BAD: the product is widened only after it has wrapped.
__global__ void widened_after_product(float* out, int row, int ld) {
  out[static_cast<int64_t>(row * ld) + threadIdx.x] = 1.f;
}

// BAD: a block index times the block size in 32 bits (wraps past 2^31 threads).
__global__ void block_times_size(float* out, int64_t n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = 2.f;
}

// BAD: a loop over rows, row index times a 32-bit stride.
__global__ void loop_row_times_stride(const __half* basis, int K, int ld, float* out) {
  float s = 0.f;
  for (int k = 0; k < K; ++k) s += __half2float(basis[k * ld + threadIdx.x]);
  out[threadIdx.x] = s;
}

// BAD: the same loop kept rolled: nvcc turns k * ld into a running 32-bit sum stepped by ld.
__global__ void rolled_loop_running_sum(const __half* basis, int K, int ld, float* out) {
  float s = 0.f;
#pragma unroll 1
  for (int k = 0; k < K; ++k) s += __half2float(basis[k * ld + threadIdx.x]);
  out[threadIdx.x] = s;
}

// OK: every product that forms an address is 64-bit, or bounded by compile-time values
// (threadIdx.x * 8, a lane masked to 0..31).
__global__ void clean(__half* basis, int64_t ld, int rank, int K, float* out) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  basis[static_cast<int64_t>(rank) * ld + j] = __float2half(0.f);
  float s = 0.f;
  for (int k = 0; k < K; ++k) s += __half2float(basis[k * ld + j]);
  out[threadIdx.x * 8 + (threadIdx.x & 31)] = s;
}
