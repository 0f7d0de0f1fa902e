// Torch glue: argument checks, workspaces from the caching allocator, the current stream, and
// the twa_cuda:: op registrations. The kernels (*.cu) see only plain pointers (twa_launch.h).
//
// The ops are registered for the CPU dispatch key too, only so that CPU tensors reach the
// device check below and get this library's message instead of a dispatcher error.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
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
  check_same_device(op, "w0", w0, basis);
  check_vector(op, "w0", w0, pa.basis.D, at::kFloat);
  sa.workspace = direction.data_ptr<float>();

  twa::StepWriteArgs wa;
  wa.tables = tables;
  wa.basis = pa.basis;
  wa.scales = pa.scales;
  wa.scales_ld = pa.scales_ld;
  wa.w0 = w0.data_ptr<float>();
  wa.alpha = sa.alpha;
  wa.sm_count = pa.sm_count;

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
}

// Importing the module (prebuilt twa_kernels._C or the JIT build) runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "twa_kernels CUDA kernels; the ops are torch.ops.twa_cuda.*";
}
