// project: out[b, k] = scales[k] * sum_j basis[k, j] x[b, j], fp32 accumulation.
//
// Stage 1, a split-K GEMV: grid (K tiles, splits over D). blockIdx.x (the K tile) varies
// fastest, so the blocks that read the same columns of x run together and share them through
// L2; the basis, the bulk of the bytes (2 K D), streams through once with evict-first loads. K
// is cut into balanced tiles of at most project_rows_per_block rows (301 rows at B = 1: ten
// tiles of 30 or 31), D into contiguous ranges of column steps, one per split, and the grid
// holds K tiles x splits <= resident blocks per SM x SMs blocks: one wave.
//
// Inside a block, warp w owns rows w, w + kWarps, ... (RW of them) and each lane keeps RW x BMAX
// fp32 sums in registers over the whole column range: per step it issues the RW x G 16-byte
// loads of its groups first, then reads x (L1-cached: the block's warps read the same columns)
// and accumulates. Steps made of full groups take this path; the partial first and last steps
// of the range take masked scalar loads. No barrier and no shared memory: after the range, one
// butterfly per (row, batch row) and lane 0 writes the block's partial. Stage 2 adds the
// partials over splits in a fixed order and applies the row scale.
//
// Summation order (fixed, independent of timing; it changed with this layout): lane l adds the
// steps of its split in the order masked head, masked tail, full steps ascending; within a step
// groups u = 0..G-1 and elements e = 0..V-1, the products of columns c0 + (u * 32 + l) * V + e;
// then the xor butterfly over lanes; then stage 2 over splits. Batches of more than
// kProjectBatch rows run in passes of kProjectBatch rows (the basis is read once per pass).
//
// An int8 basis (one fp32 scale per 64 values of a row) has a stage 1 of its own on the same
// grid, split and loop structure, project_int8_stage1: groups of V = 16 values (one 16-byte
// load) start at multiples of 16 columns (make_int8_layout), so each lies in one scale block.
// Per step a lane issues its RW x G basis loads, then the RW x G scales of its groups (4 lanes
// read each), then per group and 32-bit word of 4 values: the 4 x values of each batch row (one
// 16-byte load for fp32 x, 8 bytes for fp16/bf16, when the x rows are 16-byte aligned: XVEC),
// the word dequantised with byte permutes (int8x4_to_float, no I2F), and the products summed
// into the group's dot product; the row's sum then adds dot times the group's scale. Order:
// lane l's steps as above; within a group the 16 products of columns col0 + e, e = 0..15, in
// order from 0, then sum = fma(scale, dot, sum). Stage 2 adds the partials without row scales.
#include <type_traits>

#include "twa_device.cuh"

namespace twa {
namespace {

// x[b, col0 + e] for e < V as fp32; masked (zero outside [0, D)) when MASK.
template <typename XT, int V, bool MASK>
__device__ __forceinline__ void load_x(const XT* __restrict__ xb, int64_t col0, const ColumnLayout& L,
                                       float* xv) {
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const int64_t c = col0 + e;
    if (MASK) {
      xv[e] = col_valid(L, c) ? Storage<XT>::to_float(__ldg(xb + c)) : 0.f;
    } else {
      xv[e] = Storage<XT>::to_float(__ldg(xb + c));
    }
  }
}

template <typename T, typename XT, int BMAX>
__device__ __forceinline__ void project_block(const T* __restrict__ basis, int64_t ld, int64_t K,
                                              const ColumnLayout& L, const SplitPlan& plan,
                                              const XT* __restrict__ x, int B,
                                              float* __restrict__ partial) {
  constexpr int V = kVecBytes / static_cast<int>(sizeof(T));
  constexpr int RW = project_rows_per_warp(BMAX);
  constexpr int G = project_groups_per_step(BMAX);
  constexpr int TD = project_step_cols(V, BMAX);
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;

  const int64_t k_tiles = gridDim.x;
  const int64_t row0 = balanced_begin(K, k_tiles, blockIdx.x);
  const int rows = static_cast<int>(balanced_begin(K, k_tiles, blockIdx.x + 1) - row0);
  const int64_t split = blockIdx.y;

  // Row i of this warp; a row past the tile reads row0 (valid memory) and is never written.
  const T* row_ptr[RW];
#pragma unroll
  for (int i = 0; i < RW; ++i) {
    const int r = warp + i * kWarps;
    row_ptr[i] = basis + (row0 + (r < rows ? r : 0)) * ld;
  }
  // Batch row b reads x row min(b, B - 1); rows b >= B are never written.
  auto x_row = [&](int b) { return x + static_cast<int64_t>(b < B ? b : B - 1) * L.D; };

  float acc[RW][BMAX];
#pragma unroll
  for (int i = 0; i < RW; ++i) {
#pragma unroll
    for (int b = 0; b < BMAX; ++b) acc[i][b] = 0.f;
  }

  // One step of TD columns from c0 with masked scalar loads.
  auto masked_step = [&](int64_t c0) {
#pragma unroll 1
    for (int u = 0; u < G; ++u) {
      const int64_t col0 = lane_group_col(c0, u, lane, V);
      float v[RW][V];
#pragma unroll
      for (int i = 0; i < RW; ++i) load_group_scalar<T, float>(row_ptr[i], col0, L, v[i]);
#pragma unroll
      for (int b = 0; b < BMAX; ++b) {
        float xv[V];
        load_x<XT, V, true>(x_row(b), col0, L, xv);
#pragma unroll
        for (int i = 0; i < RW; ++i) {
#pragma unroll
          for (int e = 0; e < V; ++e) acc[i][b] = madd(v[i][e], xv[e], acc[i][b]);
        }
      }
    }
  };

  const int64_t t_begin = split_tile_begin(plan, split);
  const int64_t t_end = split_tile_end(plan, split);
  const int64_t f_end = min64(t_end, full_tile_end(L, TD));
  const int64_t f_begin = min64(t_end, max64(t_begin, full_tile_begin(L)));
  // Masked steps: the head [t_begin, f_begin) (tile 0 at most) and the tail [f_end, t_end) (the
  // last tile, or every step without 16-byte loads).
  for (int part = 0; part < 2; ++part) {
    const int64_t lo = part == 0 ? t_begin : max64(f_begin, f_end);
    const int64_t hi = part == 0 ? f_begin : t_end;
    for (int64_t t = lo; t < hi; ++t) masked_step(tile_col0(L, t, TD));
  }
  // Hot loop: full steps, all RW x G loads issued before any is consumed.
  for (int64_t t = f_begin; t < f_end; ++t) {
    const int64_t c0 = tile_col0(L, t, TD);
    uint4 w[RW][G];
#pragma unroll
    for (int i = 0; i < RW; ++i) {
#pragma unroll
      for (int u = 0; u < G; ++u) w[i][u] = ld_stream16(row_ptr[i] + lane_group_col(c0, u, lane, V));
    }
#pragma unroll
    for (int u = 0; u < G; ++u) {
      const int64_t col0 = lane_group_col(c0, u, lane, V);
#pragma unroll
      for (int b = 0; b < BMAX; ++b) {
        float xv[V];
        load_x<XT, V, false>(x_row(b), col0, L, xv);
#pragma unroll
        for (int i = 0; i < RW; ++i) {
          float v[V];
          unpack16<T, float>(w[i][u], v);
#pragma unroll
          for (int e = 0; e < V; ++e) acc[i][b] = madd(v[e], xv[e], acc[i][b]);
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < RW; ++i) {
    const int r = warp + i * kWarps;
#pragma unroll
    for (int b = 0; b < BMAX; ++b) {
      const float s = warp_sum(acc[i][b]);
      if (lane == 0 && r < rows && b < B) partial[partial_index(split, b, row0 + r, B, K)] = s;
    }
  }
}

template <typename T, int BMAX>
__global__ void __launch_bounds__(kThreads, kProjectMinBlocks)
    project_stage1(const T* __restrict__ basis, int64_t ld, int64_t K, ColumnLayout L,
                   SplitPlan plan, const void* __restrict__ x, DType x_dtype, int B,
                   float* __restrict__ partial) {
  switch (x_dtype) {
    case DType::kFloat16:
      project_block<T, __half, BMAX>(basis, ld, K, L, plan, static_cast<const __half*>(x), B,
                                     partial);
      break;
    case DType::kBFloat16:
      project_block<T, __nv_bfloat16, BMAX>(basis, ld, K, L, plan,
                                            static_cast<const __nv_bfloat16*>(x), B, partial);
      break;
    default:
      project_block<T, float, BMAX>(basis, ld, K, L, plan, static_cast<const float*>(x), B,
                                    partial);
  }
}

__global__ void __launch_bounds__(kThreads)
    project_stage2(const float* __restrict__ partial, int64_t splits, int64_t B, int64_t K,
                   const float* __restrict__ scales, float* __restrict__ out) {
  const int64_t n = B * K;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  if (i >= n) return;  // whole warps leave together: i is uniform across a warp
  const float s = stage2_sum<float>(partial, splits, n, i);
  // No row scales for an int8 basis (its block scales are in the partials).
  if (threadIdx.x % kWarp == 0) out[i] = scales != nullptr ? s * scales[i % K] : s;
}

// ---- int8 basis -------------------------------------------------------------------------------

// x[col .. col + 3] as fp32 (full groups): with VEC one 16-byte (fp32) or 8-byte (fp16, bf16)
// load, x + col being aligned to it; else four scalar loads.
template <typename XT, bool VEC>
__device__ __forceinline__ void load_x4(const XT* __restrict__ xb, int64_t col, float* xv) {
  if constexpr (VEC && std::is_same<XT, float>::value) {
    const float4 f = __ldg(reinterpret_cast<const float4*>(xb + col));
    xv[0] = f.x;
    xv[1] = f.y;
    xv[2] = f.z;
    xv[3] = f.w;
  } else if constexpr (VEC) {
    const uint2 h = __ldg(reinterpret_cast<const uint2*>(xb + col));
    const XT* e = reinterpret_cast<const XT*>(&h);
#pragma unroll
    for (int i = 0; i < 4; ++i) xv[i] = Storage<XT>::to_float(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) xv[i] = Storage<XT>::to_float(__ldg(xb + col + i));
  }
}

// The int8 group at col0 of each of RW rows (w: its 16 bytes, s: its block scale) into the
// sums acc[i][b] of x rows b < BMAX (row b reads x row min(b, B - 1)): per 32-bit word of 4
// values, the x values of each batch row (masked: zero outside [0, D)), the word dequantised
// with byte permutes, the products added to the group's dot product; then acc += s * dot.
template <typename XT, int BMAX, int RW, bool XVEC, bool MASK>
__device__ __forceinline__ void int8_add_group(const uint4* w, const float* s, int64_t col0,
                                               const ColumnLayout& L, const XT* __restrict__ x,
                                               int B, float (&acc)[RW][BMAX]) {
  float dot[RW][BMAX];
#pragma unroll
  for (int i = 0; i < RW; ++i) {
#pragma unroll
    for (int b = 0; b < BMAX; ++b) dot[i][b] = 0.f;
  }
#pragma unroll
  for (int q = 0; q < kInt8Group / 4; ++q) {
    float xv[BMAX][4];
#pragma unroll
    for (int b = 0; b < BMAX; ++b) {
      const XT* xb = x + static_cast<int64_t>(b < B ? b : B - 1) * L.D;
      if constexpr (MASK) {
        load_x<XT, 4, true>(xb, col0 + 4 * q, L, xv[b]);
      } else {
        load_x4<XT, XVEC>(xb, col0 + 4 * q, xv[b]);
      }
    }
#pragma unroll
    for (int i = 0; i < RW; ++i) {
      float v[4];
      int8x4_to_float(word_of(w[i], q), v);
#pragma unroll
      for (int b = 0; b < BMAX; ++b) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dot[i][b] = fmaf(v[e], xv[b][e], dot[i][b]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < RW; ++i) {
#pragma unroll
    for (int b = 0; b < BMAX; ++b) acc[i][b] = fmaf(s[i], dot[i][b], acc[i][b]);
  }
}

template <typename XT, int BMAX, bool XVEC>
__device__ __forceinline__ void project_int8_block(const int8_t* __restrict__ basis, int64_t ld,
                                                   int64_t K, const float* __restrict__ scales,
                                                   int64_t sld, const ColumnLayout& L,
                                                   const SplitPlan& plan, const XT* __restrict__ x,
                                                   int B, float* __restrict__ partial) {
  constexpr int V = kInt8Group;
  constexpr int RW = project_int8_rows_per_warp(BMAX);
  constexpr int G = project_int8_groups_per_step(BMAX);
  constexpr int TD = project_int8_step_cols(BMAX);
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;

  const int64_t k_tiles = gridDim.x;
  const int64_t row0 = balanced_begin(K, k_tiles, blockIdx.x);
  const int rows = static_cast<int>(balanced_begin(K, k_tiles, blockIdx.x + 1) - row0);
  const int64_t split = blockIdx.y;

  // Row i of this warp and its scales; a row past the tile reads row0 and is never written.
  const int8_t* row_ptr[RW];
  const float* srow[RW];
#pragma unroll
  for (int i = 0; i < RW; ++i) {
    const int r = warp + i * kWarps;
    const int64_t k = row0 + (r < rows ? r : 0);
    row_ptr[i] = basis + k * ld;
    srow[i] = scales + k * sld;
  }

  float acc[RW][BMAX];
#pragma unroll
  for (int i = 0; i < RW; ++i) {
#pragma unroll
    for (int b = 0; b < BMAX; ++b) acc[i][b] = 0.f;
  }

  // One step of TD columns from c0 with masked byte loads (zero outside [0, D)).
  auto masked_step = [&](int64_t c0) {
#pragma unroll 1
    for (int u = 0; u < G; ++u) {
      const int64_t col0 = lane_group_col(c0, u, lane, V);
      uint4 w[RW];
      float s[RW];
#pragma unroll
      for (int i = 0; i < RW; ++i) {
        w[i] = load_int8_group_masked(row_ptr[i], col0, L);
        s[i] = col0 < L.D ? __ldg(srow[i] + scale_block(col0)) : 0.f;
      }
      int8_add_group<XT, BMAX, RW, XVEC, true>(w, s, col0, L, x, B, acc);
    }
  };

  const int64_t t_begin = split_tile_begin(plan, split);
  const int64_t t_end = split_tile_end(plan, split);
  const int64_t f_end = min64(t_end, full_tile_end(L, TD));
  const int64_t f_begin = min64(t_end, max64(t_begin, full_tile_begin(L)));
  for (int part = 0; part < 2; ++part) {
    const int64_t lo = part == 0 ? t_begin : max64(f_begin, f_end);
    const int64_t hi = part == 0 ? f_begin : t_end;
    for (int64_t t = lo; t < hi; ++t) masked_step(tile_col0(L, t, TD));
  }
  // Hot loop: full steps, all RW x G basis loads issued before any is consumed, then the scales.
  for (int64_t t = f_begin; t < f_end; ++t) {
    const int64_t c0 = tile_col0(L, t, TD);
    uint4 w[G][RW];
#pragma unroll
    for (int i = 0; i < RW; ++i) {
#pragma unroll
      for (int u = 0; u < G; ++u) w[u][i] = ld_stream16(row_ptr[i] + lane_group_col(c0, u, lane, V));
    }
    float s[G][RW];
#pragma unroll
    for (int i = 0; i < RW; ++i) {
#pragma unroll
      for (int u = 0; u < G; ++u) s[u][i] = __ldg(srow[i] + scale_block(lane_group_col(c0, u, lane, V)));
    }
#pragma unroll
    for (int u = 0; u < G; ++u) {
      int8_add_group<XT, BMAX, RW, XVEC, false>(w[u], s[u], lane_group_col(c0, u, lane, V), L, x, B,
                                                acc);
    }
  }

#pragma unroll
  for (int i = 0; i < RW; ++i) {
    const int r = warp + i * kWarps;
#pragma unroll
    for (int b = 0; b < BMAX; ++b) {
      const float sum = warp_sum(acc[i][b]);
      if (lane == 0 && r < rows && b < B) partial[partial_index(split, b, row0 + r, B, K)] = sum;
    }
  }
}

// XVEC: every x row starts 16-byte aligned (16-byte x loads for fp32, 8-byte for fp16/bf16).
template <int BMAX, bool XVEC>
__global__ void __launch_bounds__(kThreads, kProjectMinBlocks)
    project_int8_stage1(const int8_t* __restrict__ basis, int64_t ld, int64_t K,
                        const float* __restrict__ scales, int64_t sld, ColumnLayout L,
                        SplitPlan plan, const void* __restrict__ x, DType x_dtype, int B,
                        float* __restrict__ partial) {
  switch (x_dtype) {
    case DType::kFloat16:
      project_int8_block<__half, BMAX, XVEC>(basis, ld, K, scales, sld, L, plan,
                                             static_cast<const __half*>(x), B, partial);
      break;
    case DType::kBFloat16:
      project_int8_block<__nv_bfloat16, BMAX, XVEC>(basis, ld, K, scales, sld, L, plan,
                                                    static_cast<const __nv_bfloat16*>(x), B,
                                                    partial);
      break;
    default:
      project_int8_block<float, BMAX, XVEC>(basis, ld, K, scales, sld, L, plan,
                                            static_cast<const float*>(x), B, partial);
  }
}

// Batch rows per pass: kProjectBatch, kProjectInt8Batch for an int8 basis.
int64_t project_pass_rows(DType dtype) {
  return dtype == DType::kInt8 ? kProjectInt8Batch : kProjectBatch;
}

struct ProjectPlan {
  ColumnLayout layout;
  SplitPlan split;
  int64_t k_tiles;
};

template <typename T, int BMAX>
int stage1_blocks_per_sm() {
  return resident_blocks_per_sm(reinterpret_cast<const void*>(&project_stage1<T, BMAX>), kThreads, 0,
                                kProjectMinBlocks);
}

template <typename T>
int blocks_per_sm_for(int bmax) {
  switch (bmax) {
    case 1:
      return stage1_blocks_per_sm<T, 1>();
    case 2:
      return stage1_blocks_per_sm<T, 2>();
    default:
      return stage1_blocks_per_sm<T, 4>();
  }
}

template <int BMAX>
int int8_stage1_blocks_per_sm() {
  // The fewer of the two x variants: the plan (and the workspace) must not depend on x.
  const int a = resident_blocks_per_sm(
      reinterpret_cast<const void*>(&project_int8_stage1<BMAX, true>), kThreads, 0, kProjectMinBlocks);
  const int b = resident_blocks_per_sm(
      reinterpret_cast<const void*>(&project_int8_stage1<BMAX, false>), kThreads, 0, kProjectMinBlocks);
  return a < b ? a : b;
}

int stage1_blocks_per_sm(DType dtype, int bmax) {
  switch (dtype) {
    case DType::kInt8:
      return bmax == 1 ? int8_stage1_blocks_per_sm<1>() : int8_stage1_blocks_per_sm<2>();
    case DType::kFloat16:
      return blocks_per_sm_for<__half>(bmax);
    case DType::kBFloat16:
      return blocks_per_sm_for<__nv_bfloat16>(bmax);
    default:
      return blocks_per_sm_for<float>(bmax);
  }
}

// The only source of the plan: the workspace size and the launch derive it from the same
// (basis, B, sm_count) on the same device.
ProjectPlan plan_project(const BasisView& basis, int64_t B, int sm_count) {
  const int es = dtype_size(basis.dtype);
  const int bmax = batch_tile(B);
  ProjectPlan p;
  const uint64_t base = reinterpret_cast<uint64_t>(basis.data);
  p.layout = basis.dtype == DType::kInt8 ? make_int8_layout(base, basis.ld, basis.K, basis.D)
                                         : make_layout(base, basis.ld, basis.K, basis.D, es);
  const bool int8 = basis.dtype == DType::kInt8;
  const int TD = int8 ? project_int8_step_cols(bmax) : project_step_cols(vec_elems(es), bmax);
  p.k_tiles = ceil_div(basis.K, int8 ? project_int8_rows_per_block(bmax) : project_rows_per_block(bmax));
  p.split = make_split_plan(
      num_tiles(p.layout, TD),
      max_splits_resident(sm_count, stage1_blocks_per_sm(basis.dtype, bmax), p.k_tiles));
  return p;
}

template <typename T, int BMAX>
cudaError_t launch_project(const ProjectArgs& a, const ProjectPlan& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.k_tiles), static_cast<unsigned>(p.split.splits));
  project_stage1<T, BMAX><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(a.basis.data), a.basis.ld, a.basis.K, p.layout, p.split, a.x,
      a.x_dtype, static_cast<int>(a.B), a.workspace);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t n = a.B * a.basis.K;
  project_stage2<<<static_cast<unsigned>(ceil_div(n, kWarps)), kThreads, 0, stream>>>(
      a.workspace, p.split.splits, a.B, a.basis.K, a.scales, a.out);
  return cudaGetLastError();
}

template <int BMAX, bool XVEC>
cudaError_t launch_project_int8(const ProjectArgs& a, const ProjectPlan& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.k_tiles), static_cast<unsigned>(p.split.splits));
  project_int8_stage1<BMAX, XVEC><<<grid, kThreads, 0, stream>>>(
      static_cast<const int8_t*>(a.basis.data), a.basis.ld, a.basis.K, a.scales, a.scales_ld,
      p.layout, p.split, a.x, a.x_dtype, static_cast<int>(a.B), a.workspace);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t n = a.B * a.basis.K;
  project_stage2<<<static_cast<unsigned>(ceil_div(n, kWarps)), kThreads, 0, stream>>>(
      a.workspace, p.split.splits, a.B, a.basis.K, nullptr, a.out);
  return cudaGetLastError();
}

template <int BMAX>
cudaError_t launch_project_int8(const ProjectArgs& a, const ProjectPlan& p, cudaStream_t stream) {
  // 16-byte x loads when every x row of the pass starts 16-byte aligned (a full group's columns
  // start at a multiple of 16, so each of its 4-value words is then aligned too).
  const int64_t row_bytes = a.basis.D * dtype_size(a.x_dtype);
  const bool xvec = reinterpret_cast<uint64_t>(a.x) % kVecBytes == 0 &&
                    (a.B == 1 || row_bytes % kVecBytes == 0);
  return xvec ? launch_project_int8<BMAX, true>(a, p, stream)
              : launch_project_int8<BMAX, false>(a, p, stream);
}

cudaError_t dispatch_batch_int8(const ProjectArgs& a, const ProjectPlan& p, cudaStream_t stream) {
  return batch_tile(a.B) == 1 ? launch_project_int8<1>(a, p, stream)
                               : launch_project_int8<2>(a, p, stream);
}

template <typename T>
cudaError_t dispatch_batch(const ProjectArgs& a, const ProjectPlan& p, cudaStream_t stream) {
  switch (batch_tile(a.B)) {
    case 1:
      return launch_project<T, 1>(a, p, stream);
    case 2:
      return launch_project<T, 2>(a, p, stream);
    default:
      return launch_project<T, 4>(a, p, stream);
  }
}

}  // namespace

// Batches above kProjectBatch rows run as passes of at most kProjectBatch rows, one after the
// other on the stream, sharing the workspace.
int64_t project_workspace_elems(const BasisView& basis, int64_t B, int sm_count) {
  const int64_t pass_rows = project_pass_rows(basis.dtype);
  int64_t elems = 0;
  for (int64_t b0 = 0; b0 < B; b0 += pass_rows) {
    const int64_t nb = min64(pass_rows, B - b0);
    elems = max64(elems, plan_project(basis, nb, sm_count).split.splits * nb * basis.K);
  }
  return elems;
}

cudaError_t project(const ProjectArgs& a, cudaStream_t stream) {
  if (a.B < 1 || a.B > kMaxBatch || a.basis.K < 1 || a.basis.D < 1) return cudaErrorInvalidValue;
  if (a.x_dtype == DType::kFloat64) return cudaErrorInvalidValue;
  if (a.basis.dtype == DType::kInt8 && (a.scales == nullptr || a.scales_ld < 0)) {
    return cudaErrorInvalidValue;
  }
  const int64_t pass_rows = project_pass_rows(a.basis.dtype);
  for (int64_t b0 = 0; b0 < a.B; b0 += pass_rows) {
    ProjectArgs pass = a;
    pass.B = min64(pass_rows, a.B - b0);
    pass.x = static_cast<const char*>(a.x) + b0 * a.basis.D * dtype_size(a.x_dtype);
    pass.out = a.out + b0 * a.basis.K;
    const ProjectPlan p = plan_project(pass.basis, pass.B, pass.sm_count);
    if (p.k_tiles > 0x7fffffff) return cudaErrorInvalidValue;
    cudaError_t err = cudaSuccess;
    if (a.basis.dtype == DType::kInt8) {
      err = dispatch_batch_int8(pass, p, stream);
    } else {
      TWA_DISPATCH_STORAGE(a.basis.dtype, T, err = dispatch_batch<T>(pass, p, stream));
    }
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace twa
