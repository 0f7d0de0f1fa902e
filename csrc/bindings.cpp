// Torch glue: argument checks, workspaces from the caching allocator, the current stream, and
// the twa_cuda:: op registrations. The kernels (*.cu) see only plain pointers (twa_launch.h).
//
// The ops are registered for the CPU dispatch key too, only so that CPU tensors reach the
// device check below and get this library's message instead of a dispatcher error.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "twa_common.h"
#include "twa_launch.h"
#include "twa_step.h"

namespace {

void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "twa_cuda::", op, " runs on CUDA tensors only, but ", name, " is on ",
              t.device(), " (backend=\"torch\" handles CPU tensors)");
}

void check_same_device(const char* op, const char* name, const at::Tensor& t,
                       const at::Tensor& ref) {
  check_cuda(op, name, t);
  TORCH_CHECK(t.device() == ref.device(), "twa_cuda::", op, ": ", name, " is on ", t.device(),
              ", expected ", ref.device());
}

void check_vector(const char* op, const char* name, const at::Tensor& t, int64_t size,
                  at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, "twa_cuda::", op, ": ", name,
              " must have shape [", size, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "twa_cuda::", op, ": ", name, " must be ", dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "twa_cuda::", op, ": ", name, " must be contiguous");
}

twa::DType to_dtype(const char* op, const char* name, const at::Tensor& t, bool allow_double) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return twa::DType::kFloat32;
    case at::kHalf:
      return twa::DType::kFloat16;
    case at::kBFloat16:
      return twa::DType::kBFloat16;
    case at::kDouble:
      if (allow_double) return twa::DType::kFloat64;
      break;
    default:
      break;
  }
  TORCH_CHECK(false, "twa_cuda::", op, ": ", name, " dtype must be float32, float16 or bfloat16",
              allow_double ? " (or float64)" : "", ", got ", t.scalar_type());
}

// The storage dtype of a basis; int8 only where the op has int8 kernels (int8_ok).
twa::DType basis_dtype(const char* op, const at::Tensor& basis, bool int8_ok) {
  if (basis.scalar_type() == at::kChar) {
    TORCH_CHECK(int8_ok, "twa_cuda::", op, ": an int8 basis has no CUDA kernel for this op (the CUDA "
                "backend takes int8 in project, reconstruct_, orthogonalize_ and the fused step "
                "(step_project_, fused_step_); backend=\"triton\" or \"torch\" may have one)");
    return twa::DType::kInt8;
  }
  switch (basis.scalar_type()) {
    case at::kFloat:
    case at::kHalf:
    case at::kBFloat16:
      return to_dtype(op, "basis", basis, false);
    default:
      TORCH_CHECK(false, "twa_cuda::", op, ": basis dtype must be float32, float16 or bfloat16",
                  int8_ok ? " (or int8)" : "", ", got ", basis.scalar_type());
  }
}

// Scales of an int8 basis [K, D]: float32 [K, ceil(D / 64)], contiguous along the last dim, any
// row stride. Returns the row stride in elements.
int64_t check_block_scales(const char* op, const at::Tensor& scales, int64_t K, int64_t D) {
  const int64_t blocks = twa::scale_blocks(D);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == K && scales.size(1) == blocks, "twa_cuda::",
              op, ": scales must have shape [", K, ", ", blocks, "] for an int8 basis of shape [", K,
              ", ", D, "] (one scale per ", twa::kQuantBlock, " values of a row), got ",
              scales.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kFloat, "twa_cuda::", op, ": scales must be ",
              at::kFloat, ", got ", scales.scalar_type());
  TORCH_CHECK(scales.stride(1) == 1 || blocks == 1, "twa_cuda::", op,
              ": scales must be contiguous along their last dim (stride(1) == 1), got strides ",
              scales.strides());
  return K == 1 ? blocks : scales.stride(0);
}

// The basis and its scales: fp32 [K] for a float basis; for an int8 basis (int8_ok: ops with
// int8 kernels) fp32 [K, ceil(D / 64)], whose row stride goes to *scales_ld.
twa::BasisView basis_view(const char* op, const at::Tensor& basis, const at::Tensor& scales,
                          bool int8_ok = false, int64_t* scales_ld = nullptr) {
  TORCH_CHECK(basis.dim() == 2, "twa_cuda::", op, ": basis must be 2-D [K, D], got ",
              basis.sizes());
  TORCH_CHECK(basis.size(0) >= 1 && basis.size(1) >= 1, "twa_cuda::", op,
              ": basis must have K >= 1 rows and D >= 1 columns, got ", basis.sizes());
  TORCH_CHECK(basis.stride(1) == 1 || basis.size(1) == 1, "twa_cuda::", op,
              ": basis rows must be contiguous (stride(1) == 1)");
  twa::BasisView v;
  v.dtype = basis_dtype(op, basis, int8_ok);
  v.data = basis.data_ptr();
  v.ld = basis.size(0) == 1 ? basis.size(1) : basis.stride(0);
  v.K = basis.size(0);
  v.D = basis.size(1);
  if (v.dtype == twa::DType::kInt8) {
    const int64_t ld = check_block_scales(op, scales, v.K, v.D);
    if (scales_ld != nullptr) *scales_ld = ld;
  } else {
    check_vector(op, "scales", scales, basis.size(0), at::kFloat);
    if (scales_ld != nullptr) *scales_ld = 0;
  }
  return v;
}

int sm_count(const at::Tensor& t) {
  int n = 0;
  const cudaError_t err =
      cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, t.get_device());
  TORCH_CHECK(err == cudaSuccess, "twa_cuda: cudaDeviceGetAttribute failed: ",
              cudaGetErrorString(err));
  return n;
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "twa_cuda::", op, ": kernel launch failed: ",
              cudaGetErrorString(err));
}

at::Tensor project(const at::Tensor& basis, const at::Tensor& scales, const at::Tensor& x) {
  const char* op = "project";
  check_cuda(op, "x", x);
  check_same_device(op, "basis", basis, x);
  check_same_device(op, "scales", scales, x);
  int64_t scales_ld = 0;
  const twa::BasisView bv = basis_view(op, basis, scales, true, &scales_ld);
  TORCH_CHECK(x.dim() == 1 || x.dim() == 2, "twa_cuda::project: x must be [D] or [B, D], got ",
              x.sizes());
  TORCH_CHECK(x.size(-1) == bv.D, "twa_cuda::project: x has ", x.size(-1),
              " columns, the basis has D=", bv.D);
  TORCH_CHECK(x.is_contiguous(), "twa_cuda::project: x must be contiguous");
  const twa::DType xt = to_dtype(op, "x", x, false);

  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.dim() == 2 ? x.size(0) : 1;
  const auto fopt = x.options().dtype(at::kFloat);
  at::Tensor out = x.dim() == 2 ? at::empty({B, bv.K}, fopt) : at::empty({bv.K}, fopt);
  if (B == 0) return out;

  const int sms = sm_count(x);
  int64_t ws = 0;
  for (int64_t b0 = 0; b0 < B; b0 += twa::kMaxBatch) {
    ws = std::max(ws, twa::project_workspace_elems(bv, std::min<int64_t>(twa::kMaxBatch, B - b0), sms));
  }
  at::Tensor workspace = at::empty({ws}, fopt);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto* xb = static_cast<const char*>(x.data_ptr());
  for (int64_t b0 = 0; b0 < B; b0 += twa::kMaxBatch) {
    twa::ProjectArgs a;
    a.basis = bv;
    a.scales = scales.data_ptr<float>();
    a.scales_ld = scales_ld;
    a.x = xb + b0 * bv.D * x.element_size();
    a.x_dtype = xt;
    a.B = std::min<int64_t>(twa::kMaxBatch, B - b0);
    a.out = out.data_ptr<float>() + b0 * bv.K;
    a.workspace = workspace.data_ptr<float>();
    a.sm_count = sms;
    check_launch(op, twa::project(a, stream));
  }
  return out;
}

void reconstruct_(const at::Tensor& out, const at::Tensor& w0, const at::Tensor& basis,
                  const at::Tensor& scales, const at::Tensor& alpha) {
  const char* op = "reconstruct_";
  check_cuda(op, "out", out);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"w0", &w0},
                                {"basis", &basis}, {"scales", &scales}, {"alpha", &alpha}}) {
    check_same_device(op, name, *t, out);
  }
  int64_t scales_ld = 0;
  const twa::BasisView bv = basis_view(op, basis, scales, true, &scales_ld);
  TORCH_CHECK(out.dim() == 1 && out.size(0) == bv.D, "twa_cuda::reconstruct_: out must have shape [",
              bv.D, "], got ", out.sizes());
  TORCH_CHECK(out.is_contiguous(), "twa_cuda::reconstruct_: out must be contiguous");
  const twa::DType ot = to_dtype(op, "out", out, true);
  check_vector(op, "w0", w0, bv.D, at::kFloat);
  check_vector(op, "alpha", alpha, bv.K, at::kFloat);

  const c10::cuda::CUDAGuard guard(out.device());
  twa::ReconstructArgs a;
  a.basis = bv;
  a.scales = scales.data_ptr<float>();
  a.scales_ld = scales_ld;
  a.w0 = w0.data_ptr<float>();
  a.alpha = alpha.data_ptr<float>();
  a.out = out.data_ptr();
  a.out_dtype = ot;
  check_launch(op, twa::reconstruct(a, c10::cuda::getCurrentCUDAStream().stream()));
}

// Checks shared by the orthogonalize ops; result and workspace are left null.
twa::OrthogonalizeArgs orth_args(const char* op, const at::Tensor& basis, const at::Tensor& scales,
                                 const at::Tensor& sample, int64_t rank) {
  check_cuda(op, "sample", sample);
  check_same_device(op, "basis", basis, sample);
  check_same_device(op, "scales", scales, sample);
  int64_t scales_ld = 0;
  const twa::BasisView bv = basis_view(op, basis, scales, true, &scales_ld);
  TORCH_CHECK(rank >= 0 && rank <= bv.K, "twa_cuda::", op, ": rank must be in [0, ", bv.K,
              "], got ", rank);
  TORCH_CHECK(rank <= twa::kMaxOrthRank, "twa_cuda::", op, ": the CUDA kernel supports rank <= ",
              twa::kMaxOrthRank, ", got ", rank, " (backend=\"triton\" or \"torch\" has no limit)");
  check_vector(op, "sample", sample, bv.D, at::kFloat);

  twa::OrthogonalizeArgs a;
  a.basis = basis.data_ptr();
  a.ld = bv.ld;
  a.scales = scales.data_ptr<float>();
  a.scales_ld = scales_ld;
  a.dtype = bv.dtype;
  a.K = bv.K;
  a.D = bv.D;
  a.rank = rank;
  a.sample = sample.data_ptr<float>();
  a.result = nullptr;
  a.workspace = nullptr;
  a.sm_count = sm_count(sample);
  return a;
}

at::Tensor orthogonalize_(const at::Tensor& basis, const at::Tensor& scales,
                          const at::Tensor& sample, int64_t rank) {
  const char* op = "orthogonalize_";
  twa::OrthogonalizeArgs a = orth_args(op, basis, scales, sample, rank);
  const c10::cuda::CUDAGuard guard(sample.device());
  const auto dopt = sample.options().dtype(at::kDouble);
  at::Tensor result = at::empty({rank + 2}, dopt);
  at::Tensor workspace = at::empty({twa::orthogonalize_workspace_elems(a)}, dopt);
  a.result = result.data_ptr<double>();
  a.workspace = workspace.data_ptr<double>();
  check_launch(op, twa::orthogonalize(a, c10::cuda::getCurrentCUDAStream().stream()));
  return result;
}

// [workspace elements, sums1 offset, sums2 offset] for orthogonalize_phase_ with these arguments:
// the caller allocates the fp64 workspace and all-reduces its sums1/sums2 ranges between phases.
std::vector<int64_t> orthogonalize_workspace(const at::Tensor& basis, const at::Tensor& scales,
                                             const at::Tensor& sample, int64_t rank) {
  const twa::OrthogonalizeArgs a = orth_args("orthogonalize_workspace", basis, scales, sample, rank);
  const twa::OrthWorkspace W{rank};
  return {twa::orthogonalize_workspace_elems(a), W.sums1(), W.sums2()};
}

// One phase (1, 2 or 3) of orthogonalize_; see twa_launch.h. result [rank + 2] is written by
// phase 3. The workspace must come from orthogonalize_workspace with the same basis (same
// address), sample device and rank, so that every phase uses the split it was sized for.
void orthogonalize_phase_(const at::Tensor& basis, const at::Tensor& scales,
                          const at::Tensor& sample, int64_t rank, const at::Tensor& workspace,
                          const at::Tensor& result, int64_t phase) {
  const char* op = "orthogonalize_phase_";
  TORCH_CHECK(phase >= 1 && phase <= twa::kOrthPhases,
              "twa_cuda::orthogonalize_phase_: phase must be 1, 2 or 3, got ", phase);
  twa::OrthogonalizeArgs a = orth_args(op, basis, scales, sample, rank);
  check_same_device(op, "workspace", workspace, sample);
  check_same_device(op, "result", result, sample);
  const int64_t elems = twa::orthogonalize_workspace_elems(a);
  TORCH_CHECK(workspace.scalar_type() == at::kDouble,
              "twa_cuda::orthogonalize_phase_: workspace must be float64, got ",
              workspace.scalar_type());
  TORCH_CHECK(workspace.dim() == 1 && workspace.size(0) == elems,
              "twa_cuda::orthogonalize_phase_: workspace must have shape [", elems,
              "] (twa_cuda::orthogonalize_workspace(basis, scales, sample, rank)[0] for this "
              "basis, rank and device), got ",
              workspace.sizes());
  TORCH_CHECK(workspace.is_contiguous(), "twa_cuda::orthogonalize_phase_: workspace must be contiguous");
  check_vector(op, "result", result, rank + 2, at::kDouble);

  const c10::cuda::CUDAGuard guard(sample.device());
  a.result = result.data_ptr<double>();
  a.workspace = workspace.data_ptr<double>();
  check_launch(op, twa::orthogonalize_phase(a, static_cast<int>(phase),
                                            c10::cuda::getCurrentCUDAStream().stream()));
}

// Checks of the K-dimensional step's arguments (op names the caller); workspace left null.
twa::SubspaceStepArgs subspace_args(const char* op, const at::Tensor& alpha,
                                    const at::Tensor& momentum_buffer, const at::Tensor& counters,
                                    const at::Tensor& coord_grad, const at::Tensor& gram,
                                    const at::Tensor& pw0, const at::Tensor& lr, double momentum,
                                    double dampening, double weight_decay, bool nesterov) {
  check_cuda(op, "alpha", alpha);
  for (const auto& [name, t] :
       {std::pair<const char*, const at::Tensor*>{"momentum_buffer", &momentum_buffer},
        {"counters", &counters}, {"coord_grad", &coord_grad}, {"gram", &gram}, {"pw0", &pw0},
        {"lr", &lr}}) {
    check_same_device(op, name, *t, alpha);
  }
  TORCH_CHECK(alpha.dim() == 1 && alpha.size(0) >= 1, "twa_cuda::", op,
              ": alpha must be a non-empty vector, got ", alpha.sizes());
  const int64_t K = alpha.size(0);
  check_vector(op, "alpha", alpha, K, at::kFloat);
  check_vector(op, "momentum_buffer", momentum_buffer, K, at::kFloat);
  check_vector(op, "coord_grad", coord_grad, K, at::kFloat);
  check_vector(op, "pw0", pw0, K, at::kFloat);
  check_vector(op, "counters", counters, 2, at::kLong);
  TORCH_CHECK(gram.dim() == 2 && gram.size(0) == K && gram.size(1) == K &&
                  gram.scalar_type() == at::kFloat && gram.is_contiguous(),
              "twa_cuda::", op, ": gram must be a contiguous float32 [", K, ", ", K, "], got ",
              gram.scalar_type(), " ", gram.sizes());
  TORCH_CHECK(lr.dim() == 0 && lr.scalar_type() == at::kFloat, "twa_cuda::", op,
              ": lr must be a 0-dim float32 tensor, got ", lr.scalar_type(), " ", lr.sizes());

  twa::SubspaceStepArgs a;
  a.alpha = alpha.data_ptr<float>();
  a.momentum_buffer = momentum_buffer.data_ptr<float>();
  a.counters = counters.data_ptr<int64_t>();
  a.coord_grad = coord_grad.data_ptr<float>();
  a.gram = gram.data_ptr<float>();
  a.pw0 = pw0.data_ptr<float>();
  a.workspace = nullptr;
  a.K = K;
  a.lr = lr.data_ptr<float>();
  a.use_momentum = momentum != 0.0;
  a.momentum = static_cast<float>(momentum);
  a.one_minus_dampening = static_cast<float>(1.0 - dampening);
  a.use_weight_decay = weight_decay != 0.0;
  a.weight_decay = static_cast<float>(weight_decay);
  a.nesterov = nesterov;
  return a;
}

void subspace_step_(const at::Tensor& alpha, const at::Tensor& momentum_buffer,
                    const at::Tensor& counters, const at::Tensor& coord_grad,
                    const at::Tensor& gram, const at::Tensor& pw0, const at::Tensor& lr, double momentum,
                    double dampening, double weight_decay, bool nesterov) {
  const char* op = "subspace_step_";
  twa::SubspaceStepArgs a = subspace_args(op, alpha, momentum_buffer, counters, coord_grad, gram,
                                          pw0, lr, momentum, dampening, weight_decay, nesterov);
  const c10::cuda::CUDAGuard guard(alpha.device());
  at::Tensor workspace = at::empty({a.K}, alpha.options());
  a.workspace = workspace.data_ptr<float>();
  check_launch(op, twa::subspace_step(a, c10::cuda::getCurrentCUDAStream().stream()));
}

// ---- the fused step over a parameter list (step.cu) -------------------------------------------

// The tables of twa_kernels._param_table: ptab int64 [params, 8], btab int64 [nblk >= 1, 4].
// Their contents (addresses, offsets) are read by the kernels only: checking them here would
// copy them to the host.
twa::StepTables step_tables(const char* op, const at::Tensor& ptab, const at::Tensor& btab,
                            const at::Tensor& ref) {
  check_same_device(op, "ptab", ptab, ref);
  check_same_device(op, "btab", btab, ref);
  for (const auto& [name, t, fields] :
       {std::tuple<const char*, const at::Tensor*, int64_t>{"ptab", &ptab, twa::step::kParamFields},
        {"btab", &btab, twa::step::kBlockFields}}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) >= 1 && t->size(1) == fields, "twa_cuda::", op, ": ",
                name, " must have shape [n >= 1, ", fields, "], got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == at::kLong, "twa_cuda::", op, ": ", name,
                " must be int64, got ", t->scalar_type());
    TORCH_CHECK(t->is_contiguous(), "twa_cuda::", op, ": ", name, " must be contiguous");
  }
  twa::StepTables tables;
  tables.ptab = ptab.data_ptr<int64_t>();
  tables.btab = btab.data_ptr<int64_t>();
  tables.nblk = btab.size(0);
  return tables;
}

twa::StepProjectSizes project_sizes(const char* op, const twa::BasisView& bv, int64_t nblk,
                                    int sms) {
  twa::StepProjectSizes sizes;
  const cudaError_t err = twa::step_project_sizes(bv, nblk, sms, &sizes);
  TORCH_CHECK(err == cudaSuccess, "twa_cuda::", op, ": sizing the projection failed: ",
              cudaGetErrorString(err));
  return sizes;
}

// [splits, K tiles, block columns] of the fused step's projection: its partials are float32
// [splits, K], its tickets int32 [K tiles] (zero before the first call), and the tables must
// cut the parameters into blocks of that many columns.
std::vector<int64_t> step_sizes(const at::Tensor& basis, int64_t nblk) {
  const char* op = "step_sizes";
  check_cuda(op, "basis", basis);
  TORCH_CHECK(basis.dim() == 2 && basis.size(0) >= 1 && basis.size(1) >= 1, "twa_cuda::", op,
              ": basis must be 2-D [K >= 1, D >= 1], got ", basis.sizes());
  TORCH_CHECK(nblk >= 1, "twa_cuda::", op, ": nblk must be >= 1, got ", nblk);
  const c10::cuda::CUDAGuard guard(basis.device());
  twa::BasisView bv;
  bv.data = basis.data_ptr();
  bv.ld = basis.size(0) == 1 ? basis.size(1) : basis.stride(0);
  bv.K = basis.size(0);
  bv.D = basis.size(1);
  bv.dtype = basis_dtype(op, basis, true);
  const twa::StepProjectSizes sizes = project_sizes(op, bv, nblk, sm_count(basis));
  return {sizes.splits, sizes.k_tiles, twa::step::kBlockCols};
}

// Checks the projection's workspaces against the sizes for this basis and table.
twa::StepProjectArgs step_project_args(const char* op, const twa::StepTables& tables,
                                       const at::Tensor& basis, const at::Tensor& scales,
                                       const at::Tensor& partials, const at::Tensor& tickets,
                                       const at::Tensor& out) {
  for (const auto& [name, t] :
       {std::pair<const char*, const at::Tensor*>{"scales", &scales}, {"partials", &partials},
        {"tickets", &tickets}, {"out", &out}}) {
    check_same_device(op, name, *t, basis);
  }
  int64_t scales_ld = 0;
  const twa::BasisView bv = basis_view(op, basis, scales, true, &scales_ld);
  const int sms = sm_count(basis);
  const twa::StepProjectSizes sizes = project_sizes(op, bv, tables.nblk, sms);
  TORCH_CHECK(partials.dim() == 2 && partials.size(0) == sizes.splits && partials.size(1) == bv.K &&
                  partials.scalar_type() == at::kFloat && partials.is_contiguous(),
              "twa_cuda::", op, ": partials must be a contiguous float32 [", sizes.splits, ", ",
              bv.K, "] (twa_cuda::step_sizes), got ", partials.scalar_type(), " ",
              partials.sizes());
  check_vector(op, "tickets", tickets, sizes.k_tiles, at::kInt);
  check_vector(op, "out", out, bv.K, at::kFloat);
  twa::StepProjectArgs a;
  a.tables = tables;
  a.basis = bv;
  a.scales = scales.data_ptr<float>();
  a.scales_ld = scales_ld;
  a.partials = partials.data_ptr<float>();
  a.tickets = reinterpret_cast<unsigned*>(tickets.data_ptr<int32_t>());
  a.out = out.data_ptr<float>();
  a.sm_count = sms;
  return a;
}

// out = P^T g of the gradients the tables point at: one launch.
void step_project_(const at::Tensor& ptab, const at::Tensor& btab, const at::Tensor& basis,
                   const at::Tensor& scales, const at::Tensor& partials, const at::Tensor& tickets,
                   const at::Tensor& out) {
  const char* op = "step_project_";
  check_cuda(op, "basis", basis);
  const c10::cuda::CUDAGuard guard(basis.device());  // the occupancy cache is per device
  const twa::StepTables tables = step_tables(op, ptab, btab, basis);
  const twa::StepProjectArgs a =
      step_project_args(op, tables, basis, scales, partials, tickets, out);
  check_launch(op, twa::step_project(a, c10::cuda::getCurrentCUDAStream().stream()));
}

// A contiguous float32 [rows, cols].
void check_matrix(const char* op, const char* name, const at::Tensor& t, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols && t.scalar_type() == at::kFloat &&
                  t.is_contiguous(),
              "twa_cuda::", op, ": ", name, " must be a contiguous float32 [", rows, ", ", cols,
              "], got ", t.scalar_type(), " ", t.sizes());
}

// segments: int64 [params] on the basis's device, each parameter's coefficient row. Its values
// (non-decreasing, in [0, rows)) are read by the kernels only: checking them here would copy
// them to the host.
const int64_t* segment_table(const char* op, const at::Tensor& segments, const at::Tensor& ptab,
                             const at::Tensor& basis) {
  check_same_device(op, "segments", segments, basis);
  check_vector(op, "segments", segments, ptab.size(0), at::kLong);
  return segments.data_ptr<int64_t>();
}

// The write pass's arguments over checked tables and basis (bv, scales, scales_ld from
// basis_view or the projection's): w0 float32 [D]; coef float32 [K], or with segments [rows, K].
twa::StepWriteArgs step_write_args(const char* op, const twa::StepTables& tables,
                                   const at::Tensor& ptab, const at::Tensor& basis,
                                   const twa::BasisView& bv, const float* scales, int64_t scales_ld,
                                   int sms, const at::Tensor& w0, const char* coef_name,
                                   const at::Tensor& coef, const std::optional<at::Tensor>& segments) {
  check_same_device(op, "w0", w0, basis);
  check_vector(op, "w0", w0, bv.D, at::kFloat);
  check_same_device(op, coef_name, coef, basis);
  twa::StepWriteArgs wa;
  wa.segments = nullptr;
  if (segments.has_value()) {
    TORCH_CHECK(coef.dim() == 2 && coef.size(0) >= 1, "twa_cuda::", op, ": with segments, ",
                coef_name, " must be float32 [rows >= 1, ", bv.K, "], got ", coef.sizes());
    check_matrix(op, coef_name, coef, coef.size(0), bv.K);
    wa.segments = segment_table(op, *segments, ptab, basis);
  } else {
    check_vector(op, coef_name, coef, bv.K, at::kFloat);
  }
  wa.tables = tables;
  wa.basis = bv;
  wa.scales = scales;
  wa.scales_ld = scales_ld;
  wa.w0 = w0.data_ptr<float>();
  wa.alpha = coef.data_ptr<float>();
  wa.sm_count = sms;
  return wa;
}

// Every parameter the tables point at <- w0 + P coef (coef [K]; with segments [rows, K], row
// segments[i] for parameter i), rounded to its dtype: one launch.
void step_write_(const at::Tensor& ptab, const at::Tensor& btab, const at::Tensor& w0,
                 const at::Tensor& basis, const at::Tensor& scales, const at::Tensor& coef,
                 const std::optional<at::Tensor>& segments) {
  const char* op = "step_write_";
  check_cuda(op, "basis", basis);
  const c10::cuda::CUDAGuard guard(basis.device());  // the occupancy cache is per device
  const twa::StepTables tables = step_tables(op, ptab, btab, basis);
  check_same_device(op, "scales", scales, basis);
  int64_t scales_ld = 0;
  const twa::BasisView bv = basis_view(op, basis, scales, true, &scales_ld);
  const twa::StepWriteArgs wa = step_write_args(op, tables, ptab, basis, bv, scales.data_ptr<float>(),
                                                scales_ld, sm_count(basis), w0, "coef", coef, segments);
  check_launch(op, twa::step_write(wa, c10::cuda::getCurrentCUDAStream().stream()));
}

int64_t blocks_partials(const char* op, const twa::BasisView& bv, int64_t nblk, int64_t rows, int sms) {
  int64_t n = 0;
  const cudaError_t err = twa::step_project_blocks_partials(bv, nblk, rows, sms, &n);
  TORCH_CHECK(err == cudaSuccess, "twa_cuda::", op, ": sizing the per-block projection failed: ",
              cudaGetErrorString(err));
  return n;
}

// [partial rows] of the per-block projection with `rows` coefficient rows: its partials are
// float32 [partial rows, K], its starts int32 [rows + 1].
std::vector<int64_t> step_blocks_sizes(const at::Tensor& basis, int64_t nblk, int64_t rows) {
  const char* op = "step_blocks_sizes";
  check_cuda(op, "basis", basis);
  TORCH_CHECK(basis.dim() == 2 && basis.size(0) >= 1 && basis.size(1) >= 1, "twa_cuda::", op,
              ": basis must be 2-D [K >= 1, D >= 1], got ", basis.sizes());
  TORCH_CHECK(nblk >= 1, "twa_cuda::", op, ": nblk must be >= 1, got ", nblk);
  TORCH_CHECK(rows >= 1, "twa_cuda::", op, ": rows must be >= 1, got ", rows);
  const c10::cuda::CUDAGuard guard(basis.device());
  twa::BasisView bv;
  bv.data = basis.data_ptr();
  bv.ld = basis.size(0) == 1 ? basis.size(1) : basis.stride(0);
  bv.K = basis.size(0);
  bv.D = basis.size(1);
  bv.dtype = basis_dtype(op, basis, true);
  return {blocks_partials(op, bv, nblk, rows, sm_count(basis))};
}

// Checks the per-block projection's arguments: out float32 [rows >= 1, K], partials
// [step_blocks_sizes, K], starts int32 [rows + 1], segments int64 [params].
twa::StepProjectBlocksArgs step_project_blocks_args(const char* op, const twa::StepTables& tables,
                                                    const at::Tensor& ptab, const at::Tensor& basis,
                                                    const at::Tensor& scales,
                                                    const at::Tensor& segments,
                                                    const at::Tensor& partials,
                                                    const at::Tensor& starts, const at::Tensor& out) {
  for (const auto& [name, t] :
       {std::pair<const char*, const at::Tensor*>{"scales", &scales}, {"partials", &partials},
        {"starts", &starts}, {"out", &out}}) {
    check_same_device(op, name, *t, basis);
  }
  int64_t scales_ld = 0;
  const twa::BasisView bv = basis_view(op, basis, scales, true, &scales_ld);
  TORCH_CHECK(out.dim() == 2 && out.size(0) >= 1, "twa_cuda::", op,
              ": out must be float32 [rows >= 1, ", bv.K, "], got ", out.sizes());
  const int64_t rows = out.size(0);
  check_matrix(op, "out", out, rows, bv.K);
  TORCH_CHECK(rows <= 0x7fffffff && tables.nblk <= 0x7fffffff, "twa_cuda::", op,
              ": at most 2^31 - 1 rows and table blocks, got ", rows, " and ", tables.nblk);
  const int sms = sm_count(basis);
  const int64_t n = blocks_partials(op, bv, tables.nblk, rows, sms);
  TORCH_CHECK(partials.dim() == 2 && partials.size(0) == n && partials.size(1) == bv.K &&
                  partials.scalar_type() == at::kFloat && partials.is_contiguous(),
              "twa_cuda::", op, ": partials must be a contiguous float32 [", n, ", ", bv.K,
              "] (twa_cuda::step_blocks_sizes), got ", partials.scalar_type(), " ", partials.sizes());
  check_vector(op, "starts", starts, rows + 1, at::kInt);
  twa::StepProjectBlocksArgs a;
  a.tables = tables;
  a.basis = bv;
  a.scales = scales.data_ptr<float>();
  a.scales_ld = scales_ld;
  a.segments = segment_table(op, segments, ptab, basis);
  a.rows = rows;
  a.partials = partials.data_ptr<float>();
  a.starts = starts.data_ptr<int32_t>();
  a.out = out.data_ptr<float>();
  a.sm_count = sms;
  return a;
}

// out[l] = sum over the parameters i with segments[i] == l of P_i^T g_i: two launches.
void step_project_blocks_(const at::Tensor& ptab, const at::Tensor& btab, const at::Tensor& basis,
                          const at::Tensor& scales, const at::Tensor& segments,
                          const at::Tensor& partials, const at::Tensor& starts,
                          const at::Tensor& out) {
  const char* op = "step_project_blocks_";
  check_cuda(op, "basis", basis);
  const c10::cuda::CUDAGuard guard(basis.device());  // the occupancy cache is per device
  const twa::StepTables tables = step_tables(op, ptab, btab, basis);
  const twa::StepProjectBlocksArgs a =
      step_project_blocks_args(op, tables, ptab, basis, scales, segments, partials, starts, out);
  check_launch(op, twa::step_project_blocks(a, c10::cuda::getCurrentCUDAStream().stream()));
}

// Checks of the per-block coordinate step's arguments (op names the caller): alpha float32
// [L >= 1, K >= 1] and every [L, K] array like it, gram [L, K, K], counters int64 [2], lr a
// 0-dim float32, ticket int32 [1]; buf1 only where the rule reads it (adamw, or momentum),
// buf2 only for adamw.
twa::BlockStepArgs block_step_args(const char* op, const at::Tensor& alpha, const at::Tensor& buf1,
                                   const at::Tensor& buf2, const at::Tensor& counters,
                                   const at::Tensor& coord_grad, const at::Tensor& gram,
                                   const at::Tensor& pw0, const at::Tensor& inv_norms,
                                   const at::Tensor& coef, const at::Tensor& lr,
                                   const at::Tensor& ticket, const std::string& rule,
                                   double momentum, double dampening, double weight_decay,
                                   bool nesterov, double beta1, double beta2, double eps) {
  TORCH_CHECK(rule == "sgd" || rule == "adamw", "twa_cuda::", op,
              ": rule must be \"sgd\" or \"adamw\", got \"", rule, "\"");
  const bool adamw = rule == "adamw";
  const bool use_momentum = momentum != 0.0;
  check_cuda(op, "alpha", alpha);
  for (const auto& [name, t] :
       {std::pair<const char*, const at::Tensor*>{"buf1", &buf1}, {"buf2", &buf2},
        {"counters", &counters}, {"coord_grad", &coord_grad}, {"gram", &gram}, {"pw0", &pw0},
        {"inv_norms", &inv_norms}, {"coef", &coef}, {"lr", &lr}, {"ticket", &ticket}}) {
    check_same_device(op, name, *t, alpha);
  }
  TORCH_CHECK(alpha.dim() == 2 && alpha.size(0) >= 1 && alpha.size(1) >= 1, "twa_cuda::", op,
              ": alpha must be float32 [L >= 1, K >= 1], got ", alpha.sizes());
  const int64_t L = alpha.size(0), K = alpha.size(1);
  check_matrix(op, "alpha", alpha, L, K);
  if (adamw || use_momentum) check_matrix(op, "buf1", buf1, L, K);
  if (adamw) check_matrix(op, "buf2", buf2, L, K);
  check_matrix(op, "coord_grad", coord_grad, L, K);
  check_matrix(op, "pw0", pw0, L, K);
  check_matrix(op, "inv_norms", inv_norms, L, K);
  check_matrix(op, "coef", coef, L, K);
  TORCH_CHECK(gram.dim() == 3 && gram.size(0) == L && gram.size(1) == K && gram.size(2) == K &&
                  gram.scalar_type() == at::kFloat && gram.is_contiguous(),
              "twa_cuda::", op, ": gram must be a contiguous float32 [", L, ", ", K, ", ", K,
              "], got ", gram.scalar_type(), " ", gram.sizes());
  check_vector(op, "counters", counters, 2, at::kLong);
  TORCH_CHECK(lr.dim() == 0 && lr.scalar_type() == at::kFloat, "twa_cuda::", op,
              ": lr must be a 0-dim float32 tensor, got ", lr.scalar_type(), " ", lr.sizes());
  check_vector(op, "ticket", ticket, 1, at::kInt);

  twa::BlockStepArgs a;
  a.alpha = alpha.data_ptr<float>();
  a.buf1 = adamw || use_momentum ? buf1.data_ptr<float>() : nullptr;
  a.buf2 = adamw ? buf2.data_ptr<float>() : nullptr;
  a.counters = counters.data_ptr<int64_t>();
  a.coord_grad = coord_grad.data_ptr<float>();
  a.gram = gram.data_ptr<float>();
  a.pw0 = pw0.data_ptr<float>();
  a.inv_norms = inv_norms.data_ptr<float>();
  a.coef = coef.data_ptr<float>();
  a.ticket = reinterpret_cast<unsigned*>(ticket.data_ptr<int32_t>());
  a.L = L;
  a.K = K;
  a.lr = lr.data_ptr<float>();
  a.adamw = adamw;
  a.use_momentum = use_momentum;
  a.momentum = static_cast<float>(momentum);
  a.one_minus_dampening = static_cast<float>(1.0 - dampening);
  a.use_weight_decay = weight_decay != 0.0;
  a.weight_decay = static_cast<float>(weight_decay);
  a.nesterov = nesterov;
  a.beta1 = static_cast<float>(beta1);
  a.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  a.beta2 = static_cast<float>(beta2);
  a.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  a.eps = static_cast<float>(eps);
  a.sm_count = sm_count(alpha);
  return a;
}

// The per-block coordinate step: one launch, no host sync.
void block_step_(const at::Tensor& alpha, const at::Tensor& buf1, const at::Tensor& buf2,
                 const at::Tensor& counters, const at::Tensor& coord_grad, const at::Tensor& gram,
                 const at::Tensor& pw0, const at::Tensor& inv_norms, const at::Tensor& coef,
                 const at::Tensor& lr, const at::Tensor& ticket, const std::string& rule,
                 double momentum, double dampening, double weight_decay, bool nesterov,
                 double beta1, double beta2, double eps) {
  const char* op = "block_step_";
  const twa::BlockStepArgs a =
      block_step_args(op, alpha, buf1, buf2, counters, coord_grad, gram, pw0, inv_norms, coef, lr,
                      ticket, rule, momentum, dampening, weight_decay, nesterov, beta1, beta2, eps);
  const c10::cuda::CUDAGuard guard(alpha.device());
  check_launch(op, twa::block_step(a, c10::cuda::getCurrentCUDAStream().stream()));
}

// The whole per-block step: the per-block projection into coord_grad [L, K] (two launches),
// the coordinate step, then every parameter <- w0 + P coef[segments[i]]. Four launches, no
// host sync.
void fused_block_step_(const at::Tensor& ptab, const at::Tensor& btab, const at::Tensor& w0,
                       const at::Tensor& basis, const at::Tensor& scales,
                       const at::Tensor& segments, const at::Tensor& alpha, const at::Tensor& buf1,
                       const at::Tensor& buf2, const at::Tensor& counters, const at::Tensor& gram,
                       const at::Tensor& pw0, const at::Tensor& inv_norms, const at::Tensor& coef,
                       const at::Tensor& lr, const at::Tensor& partials, const at::Tensor& starts,
                       const at::Tensor& coord_grad, const at::Tensor& ticket,
                       const std::string& rule, double momentum, double dampening,
                       double weight_decay, bool nesterov, double beta1, double beta2, double eps) {
  const char* op = "fused_block_step_";
  check_cuda(op, "basis", basis);
  const c10::cuda::CUDAGuard guard(basis.device());  // the occupancy cache is per device
  const twa::StepTables tables = step_tables(op, ptab, btab, basis);
  const twa::StepProjectBlocksArgs pa = step_project_blocks_args(
      op, tables, ptab, basis, scales, segments, partials, starts, coord_grad);
  check_same_device(op, "alpha", alpha, basis);
  const twa::BlockStepArgs sa =
      block_step_args(op, alpha, buf1, buf2, counters, coord_grad, gram, pw0, inv_norms, coef, lr,
                      ticket, rule, momentum, dampening, weight_decay, nesterov, beta1, beta2, eps);
  TORCH_CHECK(sa.K == pa.basis.K && sa.L == pa.rows, "twa_cuda::", op, ": alpha is [", sa.L, ", ",
              sa.K, "], coord_grad [", pa.rows, ", ", pa.basis.K, "] (the basis K=", pa.basis.K,
              " rows)");
  const twa::StepWriteArgs wa =
      step_write_args(op, tables, ptab, basis, pa.basis, pa.scales, pa.scales_ld, pa.sm_count, w0,
                      "coef", coef, segments);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(op, twa::step_project_blocks(pa, stream));
  check_launch(op, twa::block_step(sa, stream));
  check_launch(op, twa::step_write(wa, stream));
}

// The whole step: P^T g into coord_grad, the K-dimensional step (direction: its [K] workspace),
// then every parameter the tables point at <- w0 + P alpha. Four launches, no host sync.
void fused_step_(const at::Tensor& ptab, const at::Tensor& btab, const at::Tensor& w0,
                 const at::Tensor& basis, const at::Tensor& scales, const at::Tensor& alpha,
                 const at::Tensor& momentum_buffer, const at::Tensor& counters,
                 const at::Tensor& gram, const at::Tensor& pw0, const at::Tensor& lr,
                 const at::Tensor& partials, const at::Tensor& tickets,
                 const at::Tensor& coord_grad, const at::Tensor& direction, double momentum,
                 double dampening, double weight_decay, bool nesterov) {
  const char* op = "fused_step_";
  check_cuda(op, "basis", basis);
  const c10::cuda::CUDAGuard guard(basis.device());  // the occupancy cache is per device
  const twa::StepTables tables = step_tables(op, ptab, btab, basis);
  const twa::StepProjectArgs pa =
      step_project_args(op, tables, basis, scales, partials, tickets, coord_grad);
  check_same_device(op, "alpha", alpha, basis);
  twa::SubspaceStepArgs sa = subspace_args(op, alpha, momentum_buffer, counters, coord_grad, gram,
                                           pw0, lr, momentum, dampening, weight_decay, nesterov);
  TORCH_CHECK(sa.K == pa.basis.K, "twa_cuda::fused_step_: alpha has ", sa.K,
              " coordinates, the basis K=", pa.basis.K, " rows");
  check_same_device(op, "direction", direction, basis);
  check_vector(op, "direction", direction, sa.K, at::kFloat);
  sa.workspace = direction.data_ptr<float>();
  const twa::StepWriteArgs wa =
      step_write_args(op, tables, ptab, basis, pa.basis, pa.scales, pa.scales_ld, pa.sm_count, w0,
                      "alpha", alpha, std::nullopt);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(op, twa::step_project(pa, stream));
  check_launch(op, twa::subspace_step(sa, stream));
  check_launch(op, twa::step_write(wa, stream));
}

}  // namespace

TORCH_LIBRARY(twa_cuda, m) {
  m.def("project(Tensor basis, Tensor scales, Tensor x) -> Tensor");
  m.def("reconstruct_(Tensor(a!) out, Tensor w0, Tensor basis, Tensor scales, Tensor alpha) -> ()");
  m.def("orthogonalize_(Tensor(a!) basis, Tensor(b!) scales, Tensor sample, int rank) -> Tensor");
  m.def("orthogonalize_workspace(Tensor basis, Tensor scales, Tensor sample, int rank) -> int[]");
  m.def(
      "orthogonalize_phase_(Tensor(a!) basis, Tensor(b!) scales, Tensor sample, int rank, "
      "Tensor(c!) workspace, Tensor(d!) result, int phase) -> ()");
  m.def(
      "subspace_step_(Tensor(a!) alpha, Tensor(b!) momentum_buffer, Tensor(c!) counters, "
      "Tensor coord_grad, Tensor gram, Tensor pw0, Tensor lr, float momentum, float dampening, "
      "float weight_decay, bool nesterov) -> ()");
  m.def("step_sizes(Tensor basis, int nblk) -> int[]");
  m.def(
      "step_project_(Tensor ptab, Tensor btab, Tensor basis, Tensor scales, Tensor(a!) partials, "
      "Tensor(b!) tickets, Tensor(c!) out) -> ()");
  // Also writes every parameter the tables point at (not visible to the schema).
  m.def(
      "fused_step_(Tensor ptab, Tensor btab, Tensor w0, Tensor basis, Tensor scales, "
      "Tensor(a!) alpha, Tensor(b!) momentum_buffer, Tensor(c!) counters, Tensor gram, "
      "Tensor pw0, Tensor lr, Tensor(d!) partials, Tensor(e!) tickets, Tensor(f!) coord_grad, "
      "Tensor(g!) direction, float momentum, float dampening, float weight_decay, "
      "bool nesterov) -> ()");
  // Per-block coordinates. step_write_ and fused_block_step_ also write every parameter the
  // tables point at (not visible to the schema).
  m.def(
      "step_write_(Tensor ptab, Tensor btab, Tensor w0, Tensor basis, Tensor scales, Tensor coef, "
      "Tensor? segments) -> ()");
  m.def("step_blocks_sizes(Tensor basis, int nblk, int rows) -> int[]");
  m.def(
      "step_project_blocks_(Tensor ptab, Tensor btab, Tensor basis, Tensor scales, "
      "Tensor segments, Tensor(a!) partials, Tensor(b!) starts, Tensor(c!) out) -> ()");
  m.def(
      "block_step_(Tensor(a!) alpha, Tensor(b!) buf1, Tensor(c!) buf2, Tensor(d!) counters, "
      "Tensor coord_grad, Tensor gram, Tensor pw0, Tensor inv_norms, Tensor(e!) coef, Tensor lr, "
      "Tensor(f!) ticket, str rule, float momentum, float dampening, float weight_decay, "
      "bool nesterov, float beta1, float beta2, float eps) -> ()");
  m.def(
      "fused_block_step_(Tensor ptab, Tensor btab, Tensor w0, Tensor basis, Tensor scales, "
      "Tensor segments, Tensor(a!) alpha, Tensor(b!) buf1, Tensor(c!) buf2, Tensor(d!) counters, "
      "Tensor gram, Tensor pw0, Tensor inv_norms, Tensor(e!) coef, Tensor lr, "
      "Tensor(f!) partials, Tensor(g!) starts, Tensor(h!) coord_grad, Tensor(i!) ticket, "
      "str rule, float momentum, float dampening, float weight_decay, bool nesterov, "
      "float beta1, float beta2, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(twa_cuda, CUDA, m) {
  m.impl("project", &project);
  m.impl("reconstruct_", &reconstruct_);
  m.impl("orthogonalize_", &orthogonalize_);
  m.impl("orthogonalize_workspace", &orthogonalize_workspace);
  m.impl("orthogonalize_phase_", &orthogonalize_phase_);
  m.impl("subspace_step_", &subspace_step_);
  m.impl("step_sizes", &step_sizes);
  m.impl("step_project_", &step_project_);
  m.impl("fused_step_", &fused_step_);
  m.impl("step_write_", &step_write_);
  m.impl("step_blocks_sizes", &step_blocks_sizes);
  m.impl("step_project_blocks_", &step_project_blocks_);
  m.impl("block_step_", &block_step_);
  m.impl("fused_block_step_", &fused_block_step_);
}

TORCH_LIBRARY_IMPL(twa_cuda, CPU, m) {
  m.impl("project", &project);
  m.impl("reconstruct_", &reconstruct_);
  m.impl("orthogonalize_", &orthogonalize_);
  m.impl("orthogonalize_workspace", &orthogonalize_workspace);
  m.impl("orthogonalize_phase_", &orthogonalize_phase_);
  m.impl("subspace_step_", &subspace_step_);
  m.impl("step_sizes", &step_sizes);
  m.impl("step_project_", &step_project_);
  m.impl("fused_step_", &fused_step_);
  m.impl("step_write_", &step_write_);
  m.impl("step_blocks_sizes", &step_blocks_sizes);
  m.impl("step_project_blocks_", &step_project_blocks_);
  m.impl("block_step_", &block_step_);
  m.impl("fused_block_step_", &fused_block_step_);
}

// Importing the module (prebuilt twa_kernels._C or the JIT build) runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "twa_kernels CUDA kernels; the ops are torch.ops.twa_cuda.*";
}
