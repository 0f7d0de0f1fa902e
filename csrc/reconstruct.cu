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
//
// An int8 basis (one fp32 scale per 64 values of a row) has a kernel of its own on the same
// grid and loop, reconstruct_int8_kernel: one thread per group of 16 columns (one 16-byte load
// per row) starting at a multiple of 16 (make_int8_layout), so each row's group lies in one scale
// block. Only alpha is staged; the hot loop issues the 16-byte loads of rows k .. k + 7, then
// their block scales (4 threads of a warp read each), then per row c = alpha[k] * scale and the
// 16 values dequantised with byte permutes (int8x4_to_float, no I2F) into acc[e] = fma(c, v[e],
// acc[e]), k in order. Full groups read w0 and write out in 16-byte accesses when both are
// 16-byte aligned.
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

// ---- int8 basis -------------------------------------------------------------------------------

// out[col0 .. col0 + 15] = acc in out's dtype with 16-byte stores (out + col0 16-byte aligned).
__device__ __forceinline__ void store_group16(void* out, DType t, int64_t col0, const float* acc) {
  switch (t) {
    case DType::kFloat16:
    case DType::kBFloat16: {
      uint32_t p[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float a = acc[2 * i], b = acc[2 * i + 1];
        const uint32_t lo = t == DType::kFloat16 ? __half_as_ushort(__float2half_rn(a))
                                                 : __bfloat16_as_ushort(__float2bfloat16_rn(a));
        const uint32_t hi = t == DType::kFloat16 ? __half_as_ushort(__float2half_rn(b))
                                                 : __bfloat16_as_ushort(__float2bfloat16_rn(b));
        p[i] = lo | (hi << 16);
      }
      uint4* o = reinterpret_cast<uint4*>(static_cast<uint16_t*>(out) + col0);
      o[0] = make_uint4(p[0], p[1], p[2], p[3]);
      o[1] = make_uint4(p[4], p[5], p[6], p[7]);
      break;
    }
    case DType::kFloat64: {
      double2* o = reinterpret_cast<double2*>(static_cast<double*>(out) + col0);
#pragma unroll
      for (int i = 0; i < 8; ++i) o[i] = make_double2(acc[2 * i], acc[2 * i + 1]);
      break;
    }
    default: {
      float4* o = reinterpret_cast<float4*>(static_cast<float*>(out) + col0);
#pragma unroll
      for (int i = 0; i < 4; ++i) o[i] = make_float4(acc[4 * i], acc[4 * i + 1], acc[4 * i + 2], acc[4 * i + 3]);
    }
  }
}

// acc[e] += c * (the 16 int8 values of w), dequantised with byte permutes.
__device__ __forceinline__ void add_int8_group(const uint4& w, float c, float* acc) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    float v[4];
    int8x4_to_float(word_of(w, q), v);
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[4 * q + e] = fmaf(c, v[e], acc[4 * q + e]);
  }
}

// io_vec: w0 and out start 16-byte aligned (16-byte accesses for full groups).
__global__ void __launch_bounds__(kThreads, kInt8StreamMinBlocks)
    reconstruct_int8_kernel(const int8_t* __restrict__ basis, int64_t ld, int64_t K, ColumnLayout L,
                            const float* __restrict__ scales, int64_t sld,
                            const float* __restrict__ w0, const float* __restrict__ alpha,
                            void* __restrict__ out, DType out_dtype, bool io_vec) {
  constexpr int V = kInt8Group;
  constexpr int U = kLoadsInFlight;
  __shared__ float coef_s[kCoefChunk];

  auto stage = [&](int64_t k0, int n) {
    for (int i = threadIdx.x; i < n; i += kThreads) coef_s[i] = alpha[k0 + i];
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
    const bool whole = active && col0 + V <= L.D;  // every column inside [0, D)

    float acc[V];
    if (whole && io_vec) {
#pragma unroll
      for (int i = 0; i < V / 4; ++i) {
        const float4 f = __ldg(reinterpret_cast<const float4*>(w0 + col0) + i);
        acc[4 * i] = f.x;
        acc[4 * i + 1] = f.y;
        acc[4 * i + 2] = f.z;
        acc[4 * i + 3] = f.w;
      }
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] = (active && col_valid(L, col0 + e)) ? w0[col0 + e] : 0.f;
    }
    // The group's scale block in every row (a group past D reads none).
    const int64_t blk = active ? scale_block(col0) : 0;
    for (int64_t k0 = 0; k0 < K; k0 += kCoefChunk) {
      const int n = static_cast<int>(min64(kCoefChunk, K - k0));
      if (!one_chunk) {
        __syncthreads();  // the previous chunk is no longer read
        stage(k0, n);
        __syncthreads();
      }
      const int8_t* rows = basis + k0 * ld + col0;
      const float* srows = scales + k0 * sld + blk;
      if (full) {
        // Hot loop: U basis loads in flight, then their scales, then U rows in order.
        for (int k = 0; k < n; k += U) {
          uint4 w[U];
#pragma unroll
          for (int r = 0; r < U; ++r) {
            const int kr = k + r < n ? k + r : n - 1;
            w[r] = ld_stream16(rows + static_cast<int64_t>(kr) * ld);
          }
          float s[U];
#pragma unroll
          for (int r = 0; r < U; ++r) {
            const int kr = k + r < n ? k + r : n - 1;
            s[r] = __ldg(srows + static_cast<int64_t>(kr) * sld);
          }
#pragma unroll
          for (int r = 0; r < U; ++r) {
            if (k + r < n) add_int8_group(w[r], coef_s[k + r] * s[r], acc);
          }
        }
      } else if (active) {
        for (int k = 0; k < n; ++k) {
          const uint4 w = load_int8_group_masked(basis + (k0 + k) * ld, col0, L);
          add_int8_group(w, coef_s[k] * __ldg(srows + static_cast<int64_t>(k) * sld), acc);
        }
      }
    }
    if (whole && io_vec) {
      store_group16(out, out_dtype, col0, acc);
    } else if (active) {
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if (col_valid(L, col0 + e)) store_from_float(out, out_dtype, col0 + e, acc[e]);
      }
    }
  }
}

cudaError_t launch_reconstruct_int8(const ReconstructArgs& a, cudaStream_t stream) {
  const BasisView& b = a.basis;
  if (a.scales == nullptr || a.scales_ld < 0) return cudaErrorInvalidValue;
  const ColumnLayout L = make_int8_layout(reinterpret_cast<uint64_t>(b.data), b.ld, b.K, b.D);
  const int per_sm = resident_blocks_per_sm(reinterpret_cast<const void*>(&reconstruct_int8_kernel),
                                            kThreads, 0, kInt8StreamMinBlocks);
  const int64_t tiles = ceil_div(num_groups(L), kThreads);
  const int64_t blocks = max64(1, min64(tiles, static_cast<int64_t>(per_sm) * current_sm_count()));
  const bool io_vec = reinterpret_cast<uint64_t>(a.w0) % kVecBytes == 0 &&
                      reinterpret_cast<uint64_t>(a.out) % kVecBytes == 0;
  reconstruct_int8_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const int8_t*>(b.data), b.ld, b.K, L, a.scales, a.scales_ld, a.w0, a.alpha,
      a.out, a.out_dtype, io_vec);
  return cudaGetLastError();
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
  if (b.dtype == DType::kInt8) return launch_reconstruct_int8(a, stream);
  const ColumnLayout L =
      make_layout(reinterpret_cast<uint64_t>(b.data), b.ld, b.K, b.D, dtype_size(b.dtype));
  TWA_DISPATCH_STORAGE(b.dtype, T, return launch_reconstruct<T>(a, L, stream));
  return cudaSuccess;
}

}  // namespace twa
