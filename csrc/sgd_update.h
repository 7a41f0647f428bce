// Argument checks and lr layout for sgd_update, shared by every backend.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/neg.h>
#include <ATen/ops/sum.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

#include "op_checks.h"
#include "sgd_update_math.h"

namespace pymeta {

inline std::string shape_str(at::IntArrayRef s) { return c10::str(s); }

// Checks one (param, grad, lr) triple and says how lr lines up with param.
inline LrLayout check_sgd_triple(const char* op, size_t i, const at::Tensor& param,
                                 const at::Tensor& grad, const at::Tensor& lr) {
  TORCH_CHECK(param.dim() >= 1, op, ": params[", i,
              "] must have a leading task dimension (T, ...), got a 0-dim tensor");
  TORCH_CHECK(grad.sizes() == param.sizes(), op, ": grads[", i, "] must have shape ",
              shape_str(param.sizes()), " like params[", i, "], got ", shape_str(grad.sizes()));
  TORCH_CHECK(at::isFloatingType(param.scalar_type()), op, ": params[", i,
              "] must be floating point, got ", param.scalar_type());
  TORCH_CHECK(grad.scalar_type() == param.scalar_type() && lr.scalar_type() == param.scalar_type(),
              op, ": params[", i, "], grads[", i, "] and its lr must share one dtype, got ",
              param.scalar_type(), ", ", grad.scalar_type(), ", ", lr.scalar_type());
  if (lr.dim() == 0) return LrLayout::kScalar;
  if (lr.sizes() == param.sizes().slice(1)) return LrLayout::kPerElement;
  TORCH_CHECK(lr.sizes() == param.sizes(), op, ": lr for params[", i, "] must have shape () or ",
              shape_str(param.sizes().slice(1)), " or ", shape_str(param.sizes()), ", got ",
              shape_str(lr.sizes()));
  return LrLayout::kPerTaskElement;
}

inline void check_sgd_lists(const char* op, size_t n_params, size_t n_grads, size_t n_lrs) {
  TORCH_CHECK(n_grads == n_params, op, ": expected as many grads as params (", n_params,
              "), got ", n_grads);
  TORCH_CHECK(n_lrs == 1 || n_lrs == n_params, op, ": expected 1 lr or one per param (",
              n_params, "), got ", n_lrs);
}

// -sum(g * u) reduced to the shape of an lr with this layout: (), (...) or (T, ...). Shared by
// every backend: the reduction is ATen's.
inline at::Tensor sgd_lr_grad_reduce(const at::Tensor& g, const at::Tensor& u, LrLayout layout) {
  at::Tensor prod = at::mul(g, u);
  switch (layout) {
    case LrLayout::kScalar:
      return prod.sum().neg_();
    case LrLayout::kPerElement:
      return prod.sum(0).neg_();
    default:
      return prod.neg_();
  }
}

// The lr of params[i]: one shared tensor or one per param.
inline const at::Tensor& lr_of(at::TensorList lrs, size_t i) { return lrs.size() == 1 ? lrs[0] : lrs[i]; }

// Adds params[i]'s share of d/d lr into grad_lrs (one entry shared by all params, or one each).
inline void add_lr_grad(std::vector<at::Tensor>& grad_lrs, size_t i, const at::Tensor& g,
                        const at::Tensor& u, LrLayout layout) {
  at::Tensor part = sgd_lr_grad_reduce(g, u, layout);
  at::Tensor& acc = grad_lrs[grad_lrs.size() == 1 ? 0 : i];
  acc = acc.defined() ? acc.add(part) : part;
}

}  // namespace pymeta
