// subspace_step: torch.optim.SGD's update on the K coordinates (reference.subspace_step_):
//
//   d   = c + weight_decay * (pw0 + G alpha)        (skipped when weight_decay == 0)
//   buf = d (first step) else momentum * buf + (1 - dampening) * d
//   alpha -= lr * (d + momentum * buf if nesterov else buf)
//
// A step whose coord_grad is not finite changes only counters[1]. Two launches: the K x K
// matrix-vector product with one warp per row over many blocks (G is 1 MiB at K = 512), then
// one block that checks finiteness and applies the update, so every read of alpha happens
// before any write without a grid-wide barrier. Arithmetic is fp32 with separately rounded
// products and sums (no contraction), as the reference's tensor ops do.
#include "twa_device.cuh"

namespace twa {
namespace {

__global__ void __launch_bounds__(kThreads)
    step_direction(const float* __restrict__ alpha, const float* __restrict__ coord_grad,
                   const float* __restrict__ gram, const float* __restrict__ pw0, int64_t K,
                   bool use_weight_decay, float weight_decay, float* __restrict__ d) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  if (i >= K) return;  // uniform across a warp
  const int lane = threadIdx.x % kWarp;
  if (!use_weight_decay) {
    if (lane == 0) d[i] = coord_grad[i];
    return;
  }
  const float* row = gram + i * K;
  float s = 0.f;
  for (int64_t j = lane; j < K; j += kWarp) s = fmaf(row[j], alpha[j], s);
  s = warp_sum(s);
  if (lane == 0) d[i] = __fadd_rn(coord_grad[i], __fmul_rn(weight_decay, __fadd_rn(pw0[i], s)));
}

__device__ __forceinline__ bool is_finite(float v) { return isfinite(v); }

__global__ void __launch_bounds__(kThreads)
    step_apply(float* __restrict__ alpha, float* __restrict__ momentum_buffer,
               int64_t* __restrict__ counters, const float* __restrict__ coord_grad,
               const float* __restrict__ d, int64_t K, const float* __restrict__ lr_ptr,
               bool use_momentum,
               float momentum, float one_minus_dampening, bool nesterov) {
  const float lr = *lr_ptr;
  bool ok = true;
  for (int64_t i = threadIdx.x; i < K; i += kThreads) ok = ok && is_finite(coord_grad[i]);
  const bool finite = __syncthreads_and(ok) != 0;
  const bool first = counters[0] == 0;
  __syncthreads();  // every thread has read counters before thread 0 updates them
  if (finite) {
    for (int64_t i = threadIdx.x; i < K; i += kThreads) {
      const float di = d[i];
      float update = di;
      if (use_momentum) {
        const float buf =
            first ? di
                  : __fadd_rn(__fmul_rn(momentum, momentum_buffer[i]),
                              __fmul_rn(one_minus_dampening, di));
        momentum_buffer[i] = buf;
        update = nesterov ? __fadd_rn(di, __fmul_rn(momentum, buf)) : buf;
      }
      alpha[i] = __fsub_rn(alpha[i], __fmul_rn(lr, update));
    }
  }
  if (threadIdx.x == 0) {
    counters[0] += finite ? 1 : 0;
    counters[1] += finite ? 0 : 1;
  }
}

}  // namespace

cudaError_t subspace_step(const SubspaceStepArgs& a, cudaStream_t stream) {
  if (a.K < 1) return cudaErrorInvalidValue;
  const int64_t blocks = ceil_div(a.K, kWarps);
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  step_direction<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      a.alpha, a.coord_grad, a.gram, a.pw0, a.K, a.use_weight_decay, a.weight_decay, a.workspace);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  step_apply<<<1, kThreads, 0, stream>>>(a.alpha, a.momentum_buffer, a.counters, a.coord_grad,
                                         a.workspace, a.K, a.lr, a.use_momentum, a.momentum,
                                         a.one_minus_dampening, a.nesterov);
  return cudaGetLastError();
}

}  // namespace twa
