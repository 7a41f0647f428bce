// The activations' derivative rules as CUDA kernels (see fused_layers.h), one elementwise launch
// each, from the formulas of net/activation_math.h.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "cuda/fused_layers.h"
#include "cuda/launch.h"
#include "net/activation_math.h"

namespace pymeta {
namespace {

template <typename T>
__global__ void times_d1_kernel(int64_t n, Activation act, T slope, const T* __restrict__ a, const T* __restrict__ h,
                                const T* __restrict__ v, T* __restrict__ out) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n; k += int64_t(gridDim.x) * blockDim.x) {
    out[k] = times_activation_d1(act, a[k], h[k], v[k], slope);
  }
}

// rgy * act'(a) (rgy may be null) + act''(a) * ra * gy (ra may be null).
template <typename T>
__global__ void r_backward_kernel(int64_t n, Activation act, T slope, const T* __restrict__ a,
                                  const T* __restrict__ h, const T* __restrict__ gy, const T* __restrict__ rgy,
                                  const T* __restrict__ ra, T* __restrict__ out) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n; k += int64_t(gridDim.x) * blockDim.x) {
    T r = rgy ? times_activation_d1(act, a[k], h[k], rgy[k], slope) : T(0);
    if (ra) {
      const T second = activation_d2(act, a[k], h[k]) * ra[k] * gy[k];
      r = rgy ? r + second : second;
    }
    out[k] = r;
  }
}

// a, h and the first operand must be defined; the others may be undefined (zero).
void check_operands(const char* rule, const at::Tensor& a, const at::Tensor& h,
                    std::initializer_list<at::Tensor> operands) {
  TORCH_CHECK(a.defined() && h.defined() && operands.begin()->defined() &&
                  activation_cuda_applies(operands) && activation_cuda_applies({*operands.begin(), a, h}),
              "pymeta: ", rule, " takes CUDA float or double tensors of one shape, contiguous");
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

}  // namespace

bool activation_cuda_applies(std::initializer_list<at::Tensor> operands) {
  const at::Tensor& first = *operands.begin();
  if (!first.defined() || !first.is_cuda() ||
      (first.scalar_type() != at::kFloat && first.scalar_type() != at::kDouble)) {
    return false;
  }
  return std::all_of(operands.begin(), operands.end(), [&](const at::Tensor& t) {
    return !t.defined() || (t.device() == first.device() && t.scalar_type() == first.scalar_type() &&
                            t.sizes() == first.sizes() && t.is_contiguous());
  });
}

at::Tensor activation_times_d1_cuda(Activation act, double slope, const at::Tensor& a, const at::Tensor& h,
                                    const at::Tensor& v) {
  check_operands("activation_times_d1_cuda", a, h, {v});
  const c10::cuda::CUDAGuard guard(v.device());
  at::Tensor out = at::empty_like(v);
  const int64_t n = v.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "activation_times_d1_cuda", [&] {
    times_d1_kernel<scalar_t><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        n, act, static_cast<scalar_t>(slope), a.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
        v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor activation_r_backward_cuda(Activation act, double slope, const at::Tensor& a, const at::Tensor& h,
                                      const at::Tensor& gy, const at::Tensor& rgy, const at::Tensor& ra) {
  TORCH_CHECK(rgy.defined() || ra.defined(), "pymeta: activation_r_backward_cuda needs rgy or ra");
  TORCH_CHECK(!ra.defined() || !activation_is_piecewise_linear(act),
              "pymeta: activation_r_backward_cuda takes ra only for a smooth activation");
  check_operands("activation_r_backward_cuda", a, h, {gy, rgy, ra});
  const c10::cuda::CUDAGuard guard(gy.device());
  at::Tensor out = at::empty_like(gy);
  const int64_t n = gy.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(gy.scalar_type(), "activation_r_backward_cuda", [&] {
    r_backward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        n, act, static_cast<scalar_t>(slope), a.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
        gy.const_data_ptr<scalar_t>(), ptr<scalar_t>(rgy), ptr<scalar_t>(ra), out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace pymeta
