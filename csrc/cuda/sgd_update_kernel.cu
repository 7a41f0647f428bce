// CUDA kernels of sgd_update and sgd_update_backward: one elementwise launch per param tensor on
// the current stream (inputs made contiguous); the lr-gradient reductions go through ATen.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "sgd_update.h"
#include "cuda/launch.h"

namespace pymeta {
namespace {

template <typename scalar_t>
__global__ void sgd_update_kernel(const scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                                  const scalar_t* __restrict__ lr, scalar_t* __restrict__ out,
                                  int64_t total, int64_t n, LrLayout layout) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < total;
       k += int64_t(gridDim.x) * blockDim.x) {
    const opmath_t rate = lr[lr_index(layout, k / n, k % n, n)];
    out[k] = sgd_step<opmath_t>(p[k], rate, g[k]);
  }
}

template <typename scalar_t>
__global__ void sgd_grad_wrt_grad_kernel(const scalar_t* __restrict__ u,
                                         const scalar_t* __restrict__ lr,
                                         scalar_t* __restrict__ out, int64_t total, int64_t n,
                                         LrLayout layout) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < total;
       k += int64_t(gridDim.x) * blockDim.x) {
    const opmath_t rate = lr[lr_index(layout, k / n, k % n, n)];
    out[k] = sgd_grad_wrt_grad<opmath_t>(rate, u[k]);
  }
}

std::vector<at::Tensor> sgd_update_cuda(at::TensorList params, at::TensorList grads,
                                        at::TensorList lrs) {
  constexpr const char* op = "pymeta::sgd_update";
  OneDevice(op).list("params", params).list("grads", grads).list("lrs", lrs);
  check_sgd_lists(op, params.size(), grads.size(), lrs.size());
  std::vector<at::Tensor> out;
  out.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const LrLayout layout = check_sgd_triple(op, i, params[i], grads[i], lr_of(lrs, i));
    const c10::cuda::OptionalCUDAGuard guard(params[i].device());
    const at::Tensor p = params[i].contiguous();
    const at::Tensor g = grads[i].contiguous();
    const at::Tensor lr = lr_of(lrs, i).contiguous();
    at::Tensor o = at::empty_like(p, at::MemoryFormat::Contiguous);
    const int64_t total = p.numel();
    if (total > 0) {
      const int64_t n = total / p.size(0);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "sgd_update_cuda", [&] {
        sgd_update_kernel<scalar_t><<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            p.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), lr.const_data_ptr<scalar_t>(),
            o.mutable_data_ptr<scalar_t>(), total, n, layout);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    out.push_back(std::move(o));
  }
  return out;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> sgd_update_backward_cuda(
    at::TensorList grads, at::TensorList grad_outputs, at::TensorList lrs, bool compute_lr_grad) {
  constexpr const char* op = "pymeta::sgd_update_backward";
  OneDevice(op).list("grads", grads).list("grad_outputs", grad_outputs).list("lrs", lrs);
  check_sgd_lists(op, grads.size(), grad_outputs.size(), lrs.size());
  std::vector<at::Tensor> grad_grads;
  std::vector<at::Tensor> grad_lrs(compute_lr_grad ? lrs.size() : 0);
  for (size_t i = 0; i < grads.size(); ++i) {
    const LrLayout layout = check_sgd_triple(op, i, grads[i], grad_outputs[i], lr_of(lrs, i));
    const c10::cuda::OptionalCUDAGuard guard(grads[i].device());
    const at::Tensor u = grad_outputs[i].contiguous();
    const at::Tensor lr = lr_of(lrs, i).contiguous();
    at::Tensor gg = at::empty_like(u, at::MemoryFormat::Contiguous);
    const int64_t total = u.numel();
    if (total > 0) {
      const int64_t n = total / u.size(0);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "sgd_update_backward_cuda", [&] {
        sgd_grad_wrt_grad_kernel<scalar_t><<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            u.const_data_ptr<scalar_t>(), lr.const_data_ptr<scalar_t>(), gg.mutable_data_ptr<scalar_t>(),
            total, n, layout);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    if (compute_lr_grad) add_lr_grad(grad_lrs, i, grads[i], u, layout);
    grad_grads.push_back(std::move(gg));
  }
  return {std::move(grad_grads), std::move(grad_lrs)};
}

}  // namespace

TORCH_LIBRARY_IMPL(pymeta, CUDA, m) {
  m.impl("sgd_update", &sgd_update_cuda);
  m.impl("sgd_update_backward", &sgd_update_backward_cuda);
}

}  // namespace pymeta
