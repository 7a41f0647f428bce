// Autograd of sgd_update and sgd_update_backward, in C++ so a MAML step pays no Python
// dispatch. Each backward calls ops that have autograd themselves, so any order of
// differentiation works: sgd_update's backward is sgd_update_backward, whose backward is plain
// ATen arithmetic (both outputs are (bi)linear in the inputs).
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <vector>

#include "sgd_update.h"

namespace pymeta {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using SgdUpdateFn = std::vector<at::Tensor>(at::TensorList, at::TensorList, at::TensorList);
using SgdUpdateBackwardFn = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>>(
    at::TensorList, at::TensorList, at::TensorList, bool);

std::vector<at::Tensor> call_sgd_update(at::TensorList p, at::TensorList g, at::TensorList lr) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pymeta::sgd_update", "")
                       .typed<SgdUpdateFn>();
  return op.call(p, g, lr);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> call_sgd_update_backward(
    at::TensorList g, at::TensorList u, at::TensorList lr, bool compute_lr_grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pymeta::sgd_update_backward", "")
                       .typed<SgdUpdateBackwardFn>();
  return op.call(g, u, lr, compute_lr_grad);
}

variable_list slice(const variable_list& v, size_t begin, size_t count) {
  return variable_list(v.begin() + begin, v.begin() + begin + count);
}

bool any_needs_grad(AutogradContext* ctx, size_t begin, size_t count) {
  for (size_t k = begin; k < begin + count; ++k) {
    if (ctx->needs_input_grad(k)) return true;
  }
  return false;
}

bool any_requires_grad(at::TensorList tensors) {
  for (const auto& t : tensors) {
    if (t.requires_grad()) return true;
  }
  return false;
}

// Sums x (T, ...) down to lr's shape: (), (...) or (T, ...).
at::Tensor reduce_to_lr(const at::Tensor& x, const at::Tensor& lr) {
  if (lr.dim() == 0) return x.sum();
  return lr.dim() == x.dim() ? x : x.sum(0);
}

class SgdUpdate : public torch::autograd::Function<SgdUpdate> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList params, at::TensorList grads,
                               at::TensorList lrs) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    // Save only what a backward can use: the grads matter only for a learned lr, the lrs only
    // when the grads carry a graph. In second-order MAML with a fixed lr, keeping every step's
    // (T, ...) gradients alive would cost one extra copy of the parameters per step.
    const bool keep_grads = any_requires_grad(lrs);
    const bool keep_lrs = any_requires_grad(grads) || keep_grads;
    ctx->saved_data["n"] = static_cast<int64_t>(params.size());
    ctx->saved_data["n_lrs"] = static_cast<int64_t>(lrs.size());
    ctx->saved_data["keep_grads"] = keep_grads;
    variable_list saved;
    if (keep_grads) saved.insert(saved.end(), grads.begin(), grads.end());
    if (keep_lrs) saved.insert(saved.end(), lrs.begin(), lrs.end());
    ctx->save_for_backward(saved);
    return call_sgd_update(params, grads, lrs);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const size_t n = ctx->saved_data["n"].toInt();
    const size_t n_lrs = ctx->saved_data["n_lrs"].toInt();
    const bool keep_grads = ctx->saved_data["keep_grads"].toBool();
    const bool need_grads = any_needs_grad(ctx, n, n);
    const bool need_lrs = any_needs_grad(ctx, 2 * n, n_lrs);
    const variable_list saved = ctx->get_saved_variables();
    const variable_list& upstream = grad_outputs;  // autograd materializes unused ones as zeros
    variable_list result(2 * n + n_lrs);
    if (any_needs_grad(ctx, 0, n)) {
      for (size_t i = 0; i < n; ++i) result[i] = upstream[i];
    }
    if (need_grads || need_lrs) {
      // Without a learned lr the grads were not kept; the op then reads only their shapes.
      const variable_list grads = keep_grads ? slice(saved, 0, n) : upstream;
      const variable_list lrs = slice(saved, keep_grads ? n : 0, n_lrs);
      auto [grad_grads, grad_lrs] = call_sgd_update_backward(grads, upstream, lrs, need_lrs);
      if (need_grads) std::move(grad_grads.begin(), grad_grads.end(), result.begin() + n);
      if (need_lrs) std::move(grad_lrs.begin(), grad_lrs.end(), result.begin() + 2 * n);
    }
    return result;
  }
};

class SgdUpdateBackward : public torch::autograd::Function<SgdUpdateBackward> {
 public:
  // Returns grad_grads (n tensors) followed by grad_lrs (len(lrs) tensors, or none).
  static variable_list forward(AutogradContext* ctx, at::TensorList grads, at::TensorList outs,
                               at::TensorList lrs, bool compute_lr_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->saved_data["n"] = static_cast<int64_t>(grads.size());
    ctx->saved_data["compute_lr_grad"] = compute_lr_grad;
    variable_list saved(grads.begin(), grads.end());
    saved.insert(saved.end(), outs.begin(), outs.end());
    saved.insert(saved.end(), lrs.begin(), lrs.end());
    ctx->save_for_backward(saved);
    auto [grad_grads, grad_lrs] = call_sgd_update_backward(grads, outs, lrs, compute_lr_grad);
    grad_grads.insert(grad_grads.end(), grad_lrs.begin(), grad_lrs.end());
    return grad_grads;
  }

  // A_i = -lr_i * u_i and B_j = -sum(g_i * u_i) reduced to lr_j, so with upstream (dA, dB):
  // dg_i = -dB * u_i, du_i = -lr_i * dA_i - dB * g_i, dlr_j = -sum(u_i * dA_i) reduced to lr_j.
  static variable_list backward(AutogradContext* ctx, variable_list upstream) {
    const size_t n = ctx->saved_data["n"].toInt();
    const bool has_lr_out = ctx->saved_data["compute_lr_grad"].toBool();
    const variable_list saved = ctx->get_saved_variables();
    const variable_list grads = slice(saved, 0, n);
    const variable_list outs = slice(saved, n, n);
    const variable_list lrs = slice(saved, 2 * n, saved.size() - 2 * n);
    const variable_list d_a = slice(upstream, 0, n);  // materialized: never undefined
    variable_list d_b(lrs.size());
    if (has_lr_out) d_b = slice(upstream, n, lrs.size());
    variable_list result(3 * n + lrs.size() + 1);
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& lr = lr_of(lrs, i);
      const at::Tensor& b = lr_of(d_b, i);
      at::Tensor du = -lr * d_a[i];
      if (b.defined()) {
        result[i] = -b * outs[i];
        du = du - b * grads[i];
      }
      result[n + i] = du;
      at::Tensor dlr = -reduce_to_lr(outs[i] * d_a[i], lr);
      at::Tensor& acc = result[2 * n + (lrs.size() == 1 ? 0 : i)];
      acc = acc.defined() ? acc + dlr : dlr;
    }
    return result;
  }
};

std::vector<at::Tensor> sgd_update_autograd(at::TensorList params, at::TensorList grads,
                                            at::TensorList lrs) {
  return SgdUpdate::apply(params, grads, lrs);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> sgd_update_backward_autograd(
    at::TensorList grads, at::TensorList outs, at::TensorList lrs, bool compute_lr_grad) {
  variable_list all = SgdUpdateBackward::apply(grads, outs, lrs, compute_lr_grad);
  std::vector<at::Tensor> grad_grads(all.begin(), all.begin() + grads.size());
  std::vector<at::Tensor> grad_lrs(all.begin() + grads.size(), all.end());
  return {std::move(grad_grads), std::move(grad_lrs)};
}

}  // namespace

TORCH_LIBRARY_IMPL(pymeta, Autograd, m) {
  m.impl("sgd_update", &sgd_update_autograd);
  m.impl("sgd_update_backward", &sgd_update_backward_autograd);
}

}  // namespace pymeta
