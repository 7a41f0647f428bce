// CPU kernels of sgd_update and sgd_update_backward. TensorIterator walks each param in the
// memory layout it already has (autograd under vmap hands back transposed weight gradients), so
// nothing is copied to make it contiguous; it also vectorizes and spreads the work over threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorIterator.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/cpu/Loops.h>
#include <torch/library.h>

#include <vector>

#include "sgd_update.h"

namespace pymeta {
namespace {

using at::vec::Vectorized;

// out = a - lr * b elementwise, lr a scalar or a tensor broadcast to a's shape. With
// `b_only`, out = -lr * b (the backward with respect to the gradient).
at::Tensor axpy_like(const at::Tensor& a, const at::Tensor& b, const at::Tensor& lr,
                     LrLayout layout, bool b_only) {
  at::TensorIteratorConfig config;
  at::Tensor out;  // allocated by the iterator in the inputs' memory layout
  config.add_output(out);
  // b (the gradient) leads so the output takes its layout: under vmap, weight gradients come
  // back transposed, and the next step's params then match them.
  config.add_const_input(b);
  if (!b_only) config.add_const_input(a);
  const bool scalar = layout == LrLayout::kScalar;
  const at::Tensor lr_full = scalar ? lr : lr.expand(b.sizes());
  if (!scalar) config.add_const_input(lr_full);
  at::TensorIterator iter = config.build();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.scalar_type(), "sgd_update_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    constexpr bool kVec = std::is_same_v<scalar_t, opmath_t>;  // float, double
    if (scalar) {
      const scalar_t rate = lr.item<scalar_t>();
      if (b_only) {
        if constexpr (kVec) {
          at::native::cpu_kernel_vec(
              iter, [=](scalar_t g) { return sgd_grad_wrt_grad<scalar_t>(rate, g); },
              [=](Vectorized<scalar_t> g) { return Vectorized<scalar_t>(-rate) * g; });
        } else {
          at::native::cpu_kernel(iter, [=](scalar_t g) -> scalar_t {
            return sgd_grad_wrt_grad<opmath_t>(rate, g);
          });
        }
      } else {
        if constexpr (kVec) {
          at::native::cpu_kernel_vec(
              iter, [=](scalar_t g, scalar_t p) { return sgd_step<scalar_t>(p, rate, g); },
              [=](Vectorized<scalar_t> g, Vectorized<scalar_t> p) {
                return p - Vectorized<scalar_t>(rate) * g;
              });
        } else {
          at::native::cpu_kernel(iter, [=](scalar_t g, scalar_t p) -> scalar_t {
            return sgd_step<opmath_t>(p, rate, g);
          });
        }
      }
    } else if (b_only) {
      if constexpr (kVec) {
        at::native::cpu_kernel_vec(
            iter, [](scalar_t g, scalar_t r) { return sgd_grad_wrt_grad<scalar_t>(r, g); },
            [](Vectorized<scalar_t> g, Vectorized<scalar_t> r) { return Vectorized<scalar_t>(0) - r * g; });
      } else {
        at::native::cpu_kernel(iter, [](scalar_t g, scalar_t r) -> scalar_t {
          return sgd_grad_wrt_grad<opmath_t>(r, g);
        });
      }
    } else {
      if constexpr (kVec) {
        at::native::cpu_kernel_vec(
            iter, [](scalar_t g, scalar_t p, scalar_t r) { return sgd_step<scalar_t>(p, r, g); },
            [](Vectorized<scalar_t> g, Vectorized<scalar_t> p, Vectorized<scalar_t> r) { return p - r * g; });
      } else {
        at::native::cpu_kernel(iter, [](scalar_t g, scalar_t p, scalar_t r) -> scalar_t {
          return sgd_step<opmath_t>(p, r, g);
        });
      }
    }
  });
  return iter.output();
}

std::vector<at::Tensor> sgd_update_cpu(at::TensorList params, at::TensorList grads,
                                       at::TensorList lrs) {
  constexpr const char* op = "pymeta::sgd_update";
  OneDevice(op).list("params", params).list("grads", grads).list("lrs", lrs);
  check_sgd_lists(op, params.size(), grads.size(), lrs.size());
  std::vector<at::Tensor> out;
  out.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const LrLayout layout = check_sgd_triple(op, i, params[i], grads[i], lr_of(lrs, i));
    out.push_back(axpy_like(params[i], grads[i], lr_of(lrs, i), layout, false));
  }
  return out;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> sgd_update_backward_cpu(
    at::TensorList grads, at::TensorList grad_outputs, at::TensorList lrs, bool compute_lr_grad) {
  constexpr const char* op = "pymeta::sgd_update_backward";
  OneDevice(op).list("grads", grads).list("grad_outputs", grad_outputs).list("lrs", lrs);
  check_sgd_lists(op, grads.size(), grad_outputs.size(), lrs.size());
  std::vector<at::Tensor> grad_grads;
  grad_grads.reserve(grads.size());
  std::vector<at::Tensor> grad_lrs(compute_lr_grad ? lrs.size() : 0);
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& lr = lr_of(lrs, i);
    const LrLayout layout = check_sgd_triple(op, i, grads[i], grad_outputs[i], lr);
    grad_grads.push_back(axpy_like(grad_outputs[i], grad_outputs[i], lr, layout, true));
    if (!compute_lr_grad) continue;
    add_lr_grad(grad_lrs, i, grads[i], grad_outputs[i], layout);
  }
  return {std::move(grad_grads), std::move(grad_lrs)};
}

}  // namespace

TORCH_LIBRARY_IMPL(pymeta, CPU, m) {
  m.impl("sgd_update", &sgd_update_cpu);
  m.impl("sgd_update_backward", &sgd_update_backward_cpu);
}

}  // namespace pymeta
