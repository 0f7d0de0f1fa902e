// Launch interface between the torch glue (bindings.cpp) and the kernels (*.cu). Plain pointers,
// sizes and dtype codes only, so the kernel sources compile without torch headers (about 1 s
// per file instead of about 60 s).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace twa {

// kInt8: a basis with one fp32 scale per 64 values of a row (project, reconstruct,
// orthogonalize and the fused step).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3, kInt8 = 4 };

inline int dtype_size(DType t) {
  switch (t) {
    case DType::kFloat64:
      return 8;
    case DType::kFloat32:
      return 4;
    case DType::kInt8:
      return 1;
    default:
      return 2;
  }
}

struct BasisView {
  const void* data;  // basis[0, 0]
  int64_t ld;        // elements between rows (>= D for a column slice)
  int64_t K;
  int64_t D;
  DType dtype;       // fp32, fp16, bf16 or int8
};

// Scales of a basis: fp32 [K] (float storage, one per row; scales_ld unused), or for an int8
// basis fp32 [K, ceil(D / 64)], row k at scales + k * scales_ld: basis[k, j] stands for
// basis[k, j] * scales[k * scales_ld + j / 64].
//
// out[b, k] = sum_j P[k, j] x[b, j] for b < B (B <= 16 per call), P[k, j] = scales[k] basis[k, j]
// (float storage) or as above (int8).
struct ProjectArgs {
  BasisView basis;
  const float* scales;
  int64_t scales_ld;  // int8 basis only
  const void* x;     // [B, D] contiguous
  DType x_dtype;
  int64_t B;
  float* out;        // [B, K]
  float* workspace;  // project_workspace_elems(...) floats
  int sm_count;
};
int64_t project_workspace_elems(const BasisView& basis, int64_t B, int sm_count);
cudaError_t project(const ProjectArgs& a, cudaStream_t stream);

// out[j] = w0[j] + sum_k alpha[k] P[k, j], rounded once to out's dtype (P as in ProjectArgs).
struct ReconstructArgs {
  BasisView basis;
  const float* scales;
  int64_t scales_ld;  // int8 basis only
  const float* w0;
  const float* alpha;
  void* out;
  DType out_dtype;
};
cudaError_t reconstruct(const ReconstructArgs& a, cudaStream_t stream);

// CGS2 of sample against rows [0, rank); see reference.orthogonalize_.
//
// orthogonalize runs three phases on one stream; orthogonalize_phase runs one of them, so that a
// caller holding one shard (a column range) of a basis sharded along D can combine the shards'
// partial results in the workspace between them (OrthWorkspace in twa_common.h):
//   phase 1  pass 1 -> workspace[sums1, sums1 + rank + 1) = raw P^T v, ||v||^2      (then: sum)
//   phase 2  finalize 1, pass 2 -> workspace[sums2, sums2 + rank + 1) = raw P^T v1,
//            ||v1||^2 (then: sum), workspace[sums2 + rank + 1] = max|v1|            (then: max)
//   phase 3  finalize 2 (result, scales[rank]), store of row `rank` when rank < K
// The split over D depends on the basis address, ld, D, rank, dtype and sm_count: every phase
// must get the same args (workspace included) as orthogonalize_workspace_elems.
constexpr int kOrthPhases = 3;

struct OrthogonalizeArgs {
  void* basis;       // [K, D], rows ld elements apart; row `rank` is written when rank < K
  int64_t ld;
  float* scales;     // scales[rank] is written when rank < K (int8: row `rank` of the scales)
  int64_t scales_ld;  // int8 basis only: elements between rows of the scales [K, ceil(D / 64)]
  DType dtype;
  int64_t K;
  int64_t D;
  int64_t rank;
  const float* sample;
  double* result;     // [rank + 2]: h, ||u||, ||v||
  double* workspace;  // orthogonalize_workspace_elems(...) doubles
  int sm_count;
};
// Doubles of a.workspace (a.workspace and a.result are not read).
int64_t orthogonalize_workspace_elems(const OrthogonalizeArgs& a);
cudaError_t orthogonalize(const OrthogonalizeArgs& a, cudaStream_t stream);
// phase in [1, kOrthPhases]; the phases of one call in order, on one stream (or ordered).
cudaError_t orthogonalize_phase(const OrthogonalizeArgs& a, int phase, cudaStream_t stream);

struct SubspaceStepArgs {
  float* alpha;
  float* momentum_buffer;
  int64_t* counters;
  const float* coord_grad;
  const float* gram;
  const float* pw0;
  float* workspace;  // K floats
  int64_t K;
  const float* lr;  // 0-dim tensor on the device: read by the kernel (CUDA graphs replay it)
  bool use_momentum;  // momentum != 0 in double, as the reference tests it
  float momentum;
  float one_minus_dampening;
  bool use_weight_decay;
  float weight_decay;
  bool nesterov;
};
cudaError_t subspace_step(const SubspaceStepArgs& a, cudaStream_t stream);

// The fused step over a parameter list (step.cu), through the tables of
// twa_kernels/_param_table.py (layout in twa_step.h): ptab int64 [params, 8], btab int64
// [nblk, 4]. Gradients are read and parameters written at the addresses in ptab.
struct StepTables {
  const int64_t* ptab;
  const int64_t* btab;
  int64_t nblk;  // rows of btab (>= 1)
};

// Projection sizes: partials [splits, K] fp32, tickets [k_tiles] (zero before the first launch;
// every launch leaves them zero).
struct StepProjectSizes {
  int64_t splits;
  int64_t k_tiles;
};
cudaError_t step_project_sizes(const BasisView& basis, int64_t nblk, int sm_count,
                               StepProjectSizes* out);

// out[k] = sum_j P[k, j] g[j] (P as in ProjectArgs: row scales, or an int8 basis's block
// scales), g the gradients the tables point at (zero where a parameter has none). One launch:
// stage-1 partials, then the last block of threads of each K tile adds them over the splits in
// a fixed order.
struct StepProjectArgs {
  StepTables tables;
  BasisView basis;
  const float* scales;
  int64_t scales_ld;  // int8 basis only
  float* partials;    // step_project_sizes(...).splits x K
  unsigned* tickets;  // step_project_sizes(...).k_tiles
  float* out;         // [K]
  int sm_count;
};
cudaError_t step_project(const StepProjectArgs& a, cudaStream_t stream);

// Every parameter the tables point at <- w0[cols] + sum_k alpha[k] P[k, cols] (P as in
// ProjectArgs), fp32, rounded once to the parameter's dtype. One launch. With segments
// (per-block coordinates), alpha is [rows, K] and parameter i takes its row segments[i].
struct StepWriteArgs {
  StepTables tables;
  BasisView basis;
  const float* scales;
  int64_t scales_ld;  // int8 basis only
  const float* w0;
  const float* alpha;        // [K], or [rows, K] with segments
  const int64_t* segments;   // null, or [params]: each parameter's row of alpha
  int sm_count;
};
cudaError_t step_write(const StepWriteArgs& a, cudaStream_t stream);

// Per-block projection: out[l, k] = sum over the parameters i with segments[i] == l of
// P_i^T g_i (scales as in StepProjectArgs), 0 for a row no parameter has; segments [params]
// non-decreasing in [0, rows). Two launches: each warp's partial sums per segment of its
// blocks (the projection's grid and walk), then one block of threads per row and K tile adds
// the partials of the warps that hold the row's blocks, in a fixed order.
struct StepProjectBlocksArgs {
  StepTables tables;
  BasisView basis;
  const float* scales;
  int64_t scales_ld;         // int8 basis only
  const int64_t* segments;   // [params]
  int64_t rows;
  float* partials;           // step_project_blocks_partials(...) x K
  int32_t* starts;           // [rows + 1]: the first table block of each row (written)
  float* out;                // [rows, K]
  int sm_count;
};
// Rows of StepProjectBlocksArgs::partials: one per warp of the projection's grid and segment
// it can reach (warps + rows).
cudaError_t step_project_blocks_partials(const BasisView& basis, int64_t nblk, int64_t rows,
                                         int sm_count, int64_t* out);
cudaError_t step_project_blocks(const StepProjectBlocksArgs& a, cudaStream_t stream);

// The per-block coordinate step (reference.block_step_) on L blocks of K coordinates, fp32,
// every array [L, K] contiguous (gram [L, K, K]):
//   c = coord_grad * inv_norms, r = pw0 + gram a (per block), then SGD (buf1: momentum) or
//   AdamW (buf1, buf2: moments); taken only when every entry of c is finite (counters[0] += 1,
//   else counters[1] += 1); coef = alpha * inv_norms afterwards in either case.
// One launch: every block of threads checks c, updates its blocks; the last one to finish
// (an integer ticket, left zero) updates the counters once all have read them.
struct BlockStepArgs {
  float* alpha;
  float* buf1;  // [L, K] when read (adamw, or sgd with momentum)
  float* buf2;  // [L, K] when read (adamw)
  int64_t* counters;
  const float* coord_grad;
  const float* gram;
  const float* pw0;
  const float* inv_norms;
  float* coef;
  unsigned* ticket;  // [1], zero before the first launch
  int64_t L;
  int64_t K;
  const float* lr;  // 0-dim tensor on the device
  bool adamw;
  bool use_momentum;
  float momentum;
  float one_minus_dampening;
  bool use_weight_decay;
  float weight_decay;
  bool nesterov;
  float beta1;
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float eps;
  int sm_count;
};
cudaError_t block_step(const BlockStepArgs& a, cudaStream_t stream);

}  // namespace twa
