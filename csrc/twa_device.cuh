// Device building blocks shared by the kernels: dtype conversion, 16-byte group loads with the
// masked scalar fallback (and the evict-first streaming load), warp and block reductions in a
// fixed order, the per-tile dot products of basis rows with a tile of x held in shared memory,
// and the host's cached occupancy and SM count queries that size the streaming grids.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <utility>

#include "twa_common.h"
#include "twa_launch.h"

namespace twa {

template <typename T>
struct Storage;
template <>
struct Storage<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_double(double v) { return static_cast<float>(v); }
  static constexpr double kMax = 3.4028234663852886e38;
};
template <>
struct Storage<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  // Through fp32 first, as torch's double -> half conversion does.
  static __device__ __forceinline__ __half from_double(double v) {
    return __float2half_rn(static_cast<float>(v));
  }
  static constexpr double kMax = 65504.0;
};
template <>
struct Storage<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_double(double v) {
    return __float2bfloat16_rn(static_cast<float>(v));
  }
  static constexpr double kMax = 3.3895313892515355e38;
};

// The V = 16 / sizeof(T) values of one 16-byte word, widened to Acc.
template <typename T, typename Acc>
__device__ __forceinline__ void unpack16(const uint4& w, Acc* v) {
  const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
  for (int i = 0; i < kVecBytes / static_cast<int>(sizeof(T)); ++i) {
    v[i] = static_cast<Acc>(Storage<T>::to_float(e[i]));
  }
}

// Group starting at col0 of one row: a 16-byte read-only load when the group is full and
// aligned (group_full), else masked scalar loads (zero outside [0, D)).
template <typename T, typename Acc>
__device__ __forceinline__ void load_group(const T* __restrict__ row, int64_t col0,
                                           const ColumnLayout& L, Acc* v) {
  constexpr int V = kVecBytes / static_cast<int>(sizeof(T));
  if (group_full(L, col0)) {
    const uint4 w = __ldg(reinterpret_cast<const uint4*>(row + col0));
    unpack16<T, Acc>(w, v);
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const int64_t c = col0 + e;
      v[e] = col_valid(L, c) ? static_cast<Acc>(Storage<T>::to_float(row[c])) : Acc(0);
    }
  }
}

// One 16-byte load of streamed, read-only data (the basis): read once, so evict-first in L1 and
// L2 (ld.global.cs, through the non-coherent path: LDG.E.EF.128.CONSTANT on sm_80 and sm_90),
// keeping the caches for what is reused (x). p must be 16-byte aligned. Volatile: issued where
// the code has it, so a group of loads written before their consumers stays ahead of them (the
// compiler would otherwise sink a load into the branch that consumes it).
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
  uint4 w;
  asm volatile("ld.global.cs.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(w.x), "=r"(w.y), "=r"(w.z), "=r"(w.w)
      : "l"(p));
  return w;
}

// The masked scalar path of load_group alone (head and tail groups, rows without a shared
// 16-byte phase): zero outside [0, D).
template <typename T, typename Acc>
__device__ __forceinline__ void load_group_scalar(const T* __restrict__ row, int64_t col0,
                                                  const ColumnLayout& L, Acc* v) {
  constexpr int V = kVecBytes / static_cast<int>(sizeof(T));
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const int64_t c = col0 + e;
    v[e] = col_valid(L, c) ? static_cast<Acc>(Storage<T>::to_float(row[c])) : Acc(0);
  }
}

// ---- int8 basis (twa_common.h: make_int8_layout, int8x4_to_float) -----------------------------

// 32-bit word q (values 4q .. 4q + 3) of a 16-byte group.
__device__ __forceinline__ uint32_t word_of(const uint4& w, int q) {
  return q == 0 ? w.x : (q == 1 ? w.y : (q == 2 ? w.z : w.w));
}

// The 16 bytes of the group at col0 of an int8 row with byte loads, 0 (the value 0) outside
// [0, D): the masked path of the int8 kernels, whose result they consume like a 16-byte load.
__device__ __forceinline__ uint4 load_int8_group_masked(const int8_t* __restrict__ row,
                                                        int64_t col0, const ColumnLayout& L) {
  uint32_t word[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int e = 0; e < kInt8Group; ++e) {
    const int64_t c = col0 + e;
    if (col_valid(L, c)) {
      word[e / 4] |= static_cast<uint32_t>(static_cast<uint8_t>(row[c])) << (8 * (e % 4));
    }
  }
  return make_uint4(word[0], word[1], word[2], word[3]);
}

// The first n (<= 16) bytes at p with byte loads, 0 past them: a group of an int8 row whose
// columns are not 16-byte aligned or run past its end (the fused step's masked blocks).
__device__ __forceinline__ uint4 load_int8_bytes(const int8_t* __restrict__ p, int n) {
  uint32_t word[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int e = 0; e < kInt8Group; ++e) {
    if (e < n) word[e / 4] |= static_cast<uint32_t>(static_cast<uint8_t>(p[e])) << (8 * (e % 4));
  }
  return make_uint4(word[0], word[1], word[2], word[3]);
}

// acc[e] += c * value e of a 16-byte int8 group (dequantised by byte permutes).
__device__ __forceinline__ void int8_group_fma(const uint4& w, float c, float (&acc)[kInt8Group]) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    float v[4];
    int8x4_to_float(word_of(w, q), v);
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[4 * q + e] = fmaf(c, v[e], acc[4 * q + e]);
  }
}

// The dot product of a 16-byte int8 group with 16 fp32 values (one chain, in value order).
__device__ __forceinline__ float int8_group_dot(const uint4& w, const float (&x)[kInt8Group]) {
  float s = 0.f;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    float v[4];
    int8x4_to_float(word_of(w, q), v);
#pragma unroll
    for (int e = 0; e < 4; ++e) s = fmaf(v[e], x[4 * q + e], s);
  }
  return s;
}

__device__ __forceinline__ float load_as_float(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kFloat16:
      return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case DType::kFloat64:
      return static_cast<float>(static_cast<const double*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_from_float(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::kFloat16:
      static_cast<__half*>(p)[i] = __float2half_rn(v);
      break;
    case DType::kBFloat16:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
      break;
    case DType::kFloat64:
      static_cast<double*>(p)[i] = static_cast<double>(v);
      break;
    default:
      static_cast<float*>(p)[i] = v;
  }
}

// a * b + c with one rounding, in the accumulator's precision (never promoted to fp64).
__device__ __forceinline__ float madd(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double madd(double a, double b, double c) { return fma(a, b, c); }

// Xor butterfly (offsets 16, 8, 4, 2, 1): every lane ends with the same bits.
template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

__device__ __forceinline__ double warp_max(double v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// Block sum: warp butterflies, then warp 0 adds the kWarps warp sums in warp order. Every
// thread of the block must call it; the result is valid in thread 0.
template <typename Acc>
__device__ __forceinline__ Acc block_sum(Acc v, Acc* scratch /* [kWarps] */) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  Acc total = Acc(0);
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) total += scratch[w];
  }
  return total;
}

__device__ __forceinline__ double block_max(double v, double* scratch /* [kWarps] */) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) total = nan_max(total, scratch[w]);
  }
  return total;
}

// Dot products of `rows` basis rows (starting at row0) with the B rows of an x tile in shared
// memory (xs[b * TD + t] holds column c0 + t, zero outside [0, D)). Warp w takes rows w,
// w + kWarps, ...; lane sums run over its U groups in order, then the butterfly, then lane 0
// adds the tile's sum into acc_s[b * acc_ld + r]: one owner per row, so no atomics.
template <typename T, typename Acc, int BMAX, int U>
__device__ __forceinline__ void dot_rows(const T* __restrict__ basis, int64_t ld, int64_t row0,
                                         int rows, const ColumnLayout& L, int64_t c0,
                                         const Acc* xs, int B, Acc* acc_s, int acc_ld) {
  constexpr int V = kVecBytes / static_cast<int>(sizeof(T));
  constexpr int TD = kWarp * U * V;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  for (int r = warp; r < rows; r += kWarps) {
    const T* row = basis + (row0 + r) * ld;
    Acc acc[BMAX];
#pragma unroll
    for (int b = 0; b < BMAX; ++b) acc[b] = Acc(0);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int g = lane_group(u, lane);
      Acc v[V];
      load_group<T, Acc>(row, lane_group_col(c0, u, lane, V), L, v);
#pragma unroll
      for (int b = 0; b < BMAX; ++b) {
        if (b < B) {
          const Acc* xr = xs + b * TD + g * V;
#pragma unroll
          for (int e = 0; e < V; ++e) acc[b] = madd(v[e], xr[e], acc[b]);
        }
      }
    }
#pragma unroll
    for (int b = 0; b < BMAX; ++b) {
      if (b < B) {
        const Acc s = warp_sum(acc[b]);
        if (lane == 0) acc_s[b * acc_ld + r] += s;
      }
    }
  }
}

// Second stage: out[i] = op(sum over splits of partial[s * n + i]) for i < n, one warp per i;
// lane l adds splits l, l + 32, ... in order, then the butterfly (fixed order, no atomics).
template <typename Acc>
__device__ __forceinline__ Acc stage2_sum(const Acc* __restrict__ partial, int64_t splits,
                                          int64_t n, int64_t i) {
  const int lane = threadIdx.x % kWarp;
  Acc s = Acc(0);
  for (int64_t k = stage2_first(lane); k < splits; k += stage2_stride()) s += partial[k * n + i];
  return warp_sum(s);
}

__device__ __forceinline__ double stage2_max(const double* __restrict__ partial, int64_t splits,
                                             int64_t n, int64_t i) {
  const int lane = threadIdx.x % kWarp;
  double s = 0.0;
  for (int64_t k = stage2_first(lane); k < splits; k += stage2_stride()) {
    s = nan_max(s, partial[k * n + i]);
  }
  return warp_max(s);
}

// Host: resident blocks per SM of a compiled kernel on the current device
// (cudaOccupancyMaxActiveBlocksPerMultiprocessor), cached per (kernel, device); `fallback`
// when the query fails. Grids sized from it fill every SM once, without a partial last wave.
inline int resident_blocks_per_sm(const void* kernel, int threads, size_t dyn_smem, int fallback) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return fallback;
  }
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> cache;
  const std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(kernel, dev);
  const auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, dyn_smem) != cudaSuccess ||
      n < 1) {
    (void)cudaGetLastError();
    n = fallback;
  }
  cache.emplace(key, n);
  return n;
}

// Host: SMs of the current device (cached; 1 when the query fails).
inline int current_sm_count() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return 1;
  }
  static std::mutex mu;
  static std::map<int, int> cache;
  const std::lock_guard<std::mutex> lock(mu);
  const auto it = cache.find(dev);
  if (it != cache.end()) return it->second;
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n < 1) {
    (void)cudaGetLastError();
    n = 1;
  }
  cache.emplace(dev, n);
  return n;
}

// fp16, bf16 and fp32 storage (an int8 basis has kernels of its own: the default case).
#define TWA_DISPATCH_STORAGE(dtype, T, ...)           \
  switch (dtype) {                                    \
    case DType::kFloat16: {                           \
      using T = __half;                               \
      __VA_ARGS__;                                    \
      break;                                          \
    }                                                 \
    case DType::kBFloat16: {                          \
      using T = __nv_bfloat16;                        \
      __VA_ARGS__;                                    \
      break;                                          \
    }                                                 \
    case DType::kFloat32: {                           \
      using T = float;                                \
      __VA_ARGS__;                                    \
      break;                                          \
    }                                                 \
    default:                                          \
      return cudaErrorInvalidValue;                   \
  }

}  // namespace twa
