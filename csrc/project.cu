// project: out[b, k] = scales[k] * sum_j basis[k, j] x[b, j], fp32 accumulation.
//
// Stage 1: grid (K tiles, splits over D). blockIdx.x (the K tile) varies fastest, so the blocks
// that read the same columns of x run together and share them through L2: DRAM sees x about
// once while the basis, the bulk of the bytes (2 K D), streams through once. Each block walks
// its contiguous range of column tiles: x tile to shared memory, then dot_rows for its
// kRowsPerTile rows, accumulating per-row sums in shared memory; at the end it writes one
// partial per (b, k) to the workspace. Stage 2 adds the partials over splits in a fixed order
// and applies the row scale.
#include "twa_device.cuh"

namespace twa {
namespace {

template <typename T, int BMAX>
__global__ void __launch_bounds__(kThreads, 2)
    project_stage1(const T* __restrict__ basis, int64_t ld, int64_t K, ColumnLayout L,
                   SplitPlan plan, const void* __restrict__ x, DType x_dtype, int B,
                   float* __restrict__ partial) {
  constexpr int V = kVecBytes / static_cast<int>(sizeof(T));
  constexpr int U = project_groups_per_lane(V, BMAX);
  constexpr int TD = project_tile_cols(V, BMAX);
  __shared__ __align__(16) float xs[BMAX * TD];
  __shared__ float acc_s[BMAX * kRowsPerTile];

  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerTile;
  const int rows = static_cast<int>(min64(kRowsPerTile, K - row0));
  const int64_t split = blockIdx.y;

  for (int i = threadIdx.x; i < BMAX * kRowsPerTile; i += kThreads) acc_s[i] = 0.f;

  const int64_t t_end = split_tile_end(plan, split);
  for (int64_t tile = split_tile_begin(plan, split); tile < t_end; ++tile) {
    const int64_t c0 = tile_col0(L, tile, TD);
    __syncthreads();  // the previous tile's xs is no longer read; acc_s is initialised
    for (int i = threadIdx.x; i < B * TD; i += kThreads) {
      const int b = i / TD;
      const int64_t col = c0 + (i - b * TD);
      xs[i] = col_valid(L, col) ? load_as_float(x, x_dtype, b * L.D + col) : 0.f;
    }
    __syncthreads();
    dot_rows<T, float, BMAX, U>(basis, ld, row0, rows, L, c0, xs, B, acc_s, kRowsPerTile);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < B * kRowsPerTile; i += kThreads) {
    const int b = i / kRowsPerTile;
    const int r = i - b * kRowsPerTile;
    if (r < rows) partial[partial_index(split, b, row0 + r, B, K)] = acc_s[i];
  }
}

__global__ void __launch_bounds__(kThreads)
    project_stage2(const float* __restrict__ partial, int64_t splits, int64_t B, int64_t K,
                   const float* __restrict__ scales, float* __restrict__ out) {
  const int64_t n = B * K;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  if (i >= n) return;  // whole warps leave together: i is uniform across a warp
  const float s = stage2_sum<float>(partial, splits, n, i);
  if (threadIdx.x % kWarp == 0) out[i] = s * scales[i % K];
}

struct ProjectPlan {
  ColumnLayout layout;
  SplitPlan split;
  int64_t k_tiles;
};

ProjectPlan plan_project(const BasisView& basis, int64_t B, int sm_count) {
  const int es = dtype_size(basis.dtype);
  ProjectPlan p;
  p.layout = make_layout(reinterpret_cast<uint64_t>(basis.data), basis.ld, basis.K, basis.D, es);
  const int TD = project_tile_cols(vec_elems(es), batch_tile(B));
  p.k_tiles = ceil_div(basis.K, kRowsPerTile);
  p.split = make_split_plan(num_tiles(p.layout, TD), max_splits_for(sm_count, p.k_tiles));
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

template <typename T>
cudaError_t dispatch_batch(const ProjectArgs& a, const ProjectPlan& p, cudaStream_t stream) {
  switch (batch_tile(a.B)) {
    case 1:
      return launch_project<T, 1>(a, p, stream);
    case 2:
      return launch_project<T, 2>(a, p, stream);
    case 4:
      return launch_project<T, 4>(a, p, stream);
    case 8:
      return launch_project<T, 8>(a, p, stream);
    default:
      return launch_project<T, 16>(a, p, stream);
  }
}

}  // namespace

int64_t project_workspace_elems(const BasisView& basis, int64_t B, int sm_count) {
  return plan_project(basis, B, sm_count).split.splits * B * basis.K;
}

cudaError_t project(const ProjectArgs& a, cudaStream_t stream) {
  if (a.B < 1 || a.B > kMaxBatch || a.basis.K < 1 || a.basis.D < 1) return cudaErrorInvalidValue;
  const ProjectPlan p = plan_project(a.basis, a.B, a.sm_count);
  if (p.k_tiles > 0x7fffffff) return cudaErrorInvalidValue;
  TWA_DISPATCH_STORAGE(a.basis.dtype, T, return dispatch_batch<T>(a, p, stream));
  return cudaSuccess;
}

}  // namespace twa
