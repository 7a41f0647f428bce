// The outer (meta-parameter) update of a compiled meta-step (ModelAwareMAML.compile_step): torch's
// Adam/AdamW and SGD with momentum in the operation order of their single-tensor implementations
// (torch/optim/adam.py, sgd.py), so the parameters equal optimizer.step()'s to float rounding;
// plus gradient clipping by the total 2-norm as torch.nn.utils.clip_grad_norm_ does it. One call
// for all tensors: the per-parameter Python loop of torch.optim is what costs. On the CPU each
// tensor's update is one loop over its elements (in ATen ops, Adam is about ten calls per tensor,
// each costing more than a small tensor's arithmetic); elsewhere, those ATen ops.
#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/clamp.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/stack.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace pymeta {
namespace {

void check_lists(const char* op, at::TensorList params, at::TensorList grads,
                 std::initializer_list<std::pair<const char*, at::TensorList>> states) {
  TORCH_CHECK(grads.size() == params.size(), op, ": expected as many grads as params (", params.size(), "), got ",
              grads.size());
  for (const auto& [name, list] : states) {
    TORCH_CHECK(list.size() == params.size(), op, ": expected as many ", name, " as params (", params.size(),
                "), got ", list.size());
  }
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(grads[i].sizes() == params[i].sizes(), op, ": grads[", i, "] has shape ", grads[i].sizes(),
                ", expected ", params[i].sizes(), " like params[", i, "]");
    for (const auto& [name, list] : states) {
      TORCH_CHECK(list[i].sizes() == params[i].sizes(), op, ": ", name, "[", i, "] has shape ", list[i].sizes(),
                  ", expected ", params[i].sizes(), " like params[", i, "]");
    }
  }
}

// clip_grad_norm_(grads, max_norm) in place when max_norm > 0: the total 2-norm of the
// per-tensor 2-norms, and every gradient scaled by min(1, max_norm / (norm + 1e-6)).
void clip_by_total_norm(at::TensorList grads, double max_norm) {
  if (max_norm <= 0 || grads.empty()) return;
  std::vector<at::Tensor> norms;
  for (const auto& g : grads) norms.push_back(at::linalg_vector_norm(g, 2));
  const at::Tensor total = at::linalg_vector_norm(at::stack(norms), 2);
  const at::Tensor coef = at::clamp(max_norm / (total + 1e-6), std::nullopt, 1.0);
  for (const auto& g : grads) g.mul_(coef);
}

// Whether the element loops take these tensors: CPU, contiguous, all one float or double dtype.
bool fused_update_applies(at::TensorList params, std::initializer_list<at::TensorList> others) {
  if (params.empty()) return false;
  const auto dtype = params[0].scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble) return false;
  auto ok = [&](const at::Tensor& t) { return t.is_cpu() && t.scalar_type() == dtype && t.is_contiguous(); };
  for (const auto& list : others) {
    for (const auto& t : list) {
      if (!ok(t)) return false;
    }
  }
  for (const auto& t : params) {
    if (!ok(t)) return false;
  }
  return true;
}

// Written through raw pointers: autograd must still see the tensors as modified in place.
void bump_versions(std::initializer_list<at::Tensor> tensors) {
  for (const auto& t : tensors) t.unsafeGetTensorImpl()->bump_version();
}

// step += 1 on a 0-dim step count, returning the new count (without an ATen call on the CPU).
double increment_step(const at::Tensor& step) {
  if (!step.is_cpu() || (step.scalar_type() != at::kFloat && step.scalar_type() != at::kDouble)) {
    step.add_(1);
    return step.item<double>();
  }
  double now = 0;
  AT_DISPATCH_FLOATING_TYPES(step.scalar_type(), "increment_step", [&] {
    scalar_t* count = step.mutable_data_ptr<scalar_t>();
    *count += scalar_t(1);
    now = static_cast<double>(*count);
  });
  bump_versions({step});
  return now;
}

// torch's single-tensor Adam on one tensor's elements, each scalar cast to T as torch's ops cast
// their Python-float arguments. ATen's own kernels may fuse a multiply-add here and there, so a
// float32 result can differ from optimizer.step()'s in the last bit.
template <typename T>
void adam_elements(int64_t n, T* p, const T* grad, T* m, T* v, double lr, double beta1, double beta2, double eps,
                   double weight_decay, bool decoupled, double step) {
  const T decay = static_cast<T>(1 - lr * weight_decay), l2 = static_cast<T>(weight_decay);
  const bool use_l2 = weight_decay != 0 && !decoupled, use_decay = weight_decay != 0 && decoupled;
  const T w = static_cast<T>(1 - beta1), b2 = static_cast<T>(beta2), one_minus_b2 = static_cast<T>(1 - beta2);
  const bool w_small = std::abs(w) < T(0.5);  // ATen's lerp takes one of two forms by weight
  const T bc2_sqrt = static_cast<T>(std::sqrt(1 - std::pow(beta2, step)));
  const T neg_step_size = static_cast<T>(-(lr / (1 - std::pow(beta1, step)))), e = static_cast<T>(eps);
  for (int64_t i = 0; i < n; ++i) {
    if (use_decay) p[i] = p[i] * decay;                       // param.mul_(1 - lr * wd)
    const T g = use_l2 ? grad[i] + l2 * p[i] : grad[i];       // grad.add(param, alpha=wd)
    m[i] = w_small ? m[i] + w * (g - m[i]) : g - (g - m[i]) * (T(1) - w);  // exp_avg.lerp_(g, 1 - beta1)
    v[i] = v[i] * b2 + one_minus_b2 * g * g;                  // mul_(beta2).addcmul_(g, g, 1 - beta2)
    const T denom = std::sqrt(v[i]) / bc2_sqrt + e;           // (sqrt / bc2_sqrt).add_(eps)
    p[i] = p[i] + neg_step_size * m[i] / denom;               // addcdiv_(m, denom, -step_size)
  }
}

void adam_step_kernel(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList steps, double lr, double beta1, double beta2,
                      double eps, double weight_decay, bool decoupled_weight_decay, double max_grad_norm) {
  constexpr const char* op = "pymeta::adam_step";
  check_lists(op, params, grads, {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}});
  TORCH_CHECK(steps.size() == params.size(), op, ": expected as many steps as params (", params.size(), "), got ",
              steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    TORCH_CHECK(steps[i].dim() == 0, op, ": steps[", i, "] must be a 0-dim count, got shape ", steps[i].sizes());
  }
  clip_by_total_norm(grads, max_grad_norm);
  const bool fused = fused_update_applies(params, {grads, exp_avgs, exp_avg_sqs});
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor param = params[i], grad = grads[i], exp_avg = exp_avgs[i], exp_avg_sq = exp_avg_sqs[i];
    const double step = increment_step(steps[i]);
    if (fused) {
      AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "adam_step_cpu", [&] {
        adam_elements<scalar_t>(param.numel(), param.mutable_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
                                exp_avg.mutable_data_ptr<scalar_t>(), exp_avg_sq.mutable_data_ptr<scalar_t>(), lr,
                                beta1, beta2, eps, weight_decay, decoupled_weight_decay, step);
      });
      bump_versions({param, exp_avg, exp_avg_sq});
      continue;
    }
    if (weight_decay != 0) {
      if (decoupled_weight_decay) {
        param.mul_(1 - lr * weight_decay);
      } else {
        grad = grad.add(param, weight_decay);
      }
    }
    exp_avg.lerp_(grad, 1 - beta1);
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2);
    const double bias_correction1 = 1 - std::pow(beta1, step);
    const double bias_correction2 = 1 - std::pow(beta2, step);
    const double step_size = lr / bias_correction1;
    const double bias_correction2_sqrt = std::sqrt(bias_correction2);
    const at::Tensor denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps);
    param.addcdiv_(exp_avg, denom, -step_size);
  }
}

// torch's single-tensor SGD on one tensor's elements (buf: the momentum buffer, null without).
template <typename T>
void sgd_elements(int64_t n, T* p, const T* grad, T* buf, double lr, double momentum, double dampening,
                  double weight_decay, bool nesterov, bool first) {
  const T wd = static_cast<T>(weight_decay), mom = static_cast<T>(momentum),
          keep = static_cast<T>(1 - dampening), neg_lr = static_cast<T>(-lr);
  for (int64_t i = 0; i < n; ++i) {
    T g = weight_decay != 0 ? grad[i] + wd * p[i] : grad[i];  // grad.add(param, alpha=wd)
    if (buf != nullptr) {
      buf[i] = first ? g : buf[i] * mom + keep * g;  // clone, or mul_(momentum).add_(g, alpha=1 - dampening)
      g = nesterov ? g + mom * buf[i] : buf[i];
    }
    p[i] = p[i] + neg_lr * g;  // param.add_(g, alpha=-lr)
  }
}

// first: the momentum buffers are new (torch clones the first gradient into them).
void sgd_step_kernel(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, double lr,
                     double momentum, double dampening, double weight_decay, bool nesterov, bool first,
                     double max_grad_norm) {
  check_lists("pymeta::sgd_step", params, grads, {{"momentum_buffers", momentum_buffers}});
  clip_by_total_norm(grads, max_grad_norm);
  const bool fused = fused_update_applies(params, {grads, momentum_buffers});
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor param = params[i], grad = grads[i];
    if (fused) {
      at::Tensor buf = momentum != 0 ? momentum_buffers[i] : at::Tensor();
      AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "sgd_step_cpu", [&] {
        sgd_elements<scalar_t>(param.numel(), param.mutable_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
                               buf.defined() ? buf.mutable_data_ptr<scalar_t>() : nullptr, lr, momentum, dampening,
                               weight_decay, nesterov, first);
      });
      bump_versions({param});
      if (buf.defined()) bump_versions({buf});
      continue;
    }
    if (weight_decay != 0) grad = grad.add(param, weight_decay);
    if (momentum != 0) {
      at::Tensor buf = momentum_buffers[i];
      if (first) {
        buf.copy_(grad);
      } else {
        buf.mul_(momentum).add_(grad, 1 - dampening);
      }
      grad = nesterov ? grad.add(buf, momentum) : buf;
    }
    param.add_(grad, -lr);
  }
}

}  // namespace

// ATen compositions: one registration per backend serves them all.
TORCH_LIBRARY_IMPL(pymeta, CPU, m) {
  m.impl("adam_step", &adam_step_kernel);
  m.impl("sgd_step", &sgd_step_kernel);
}

TORCH_LIBRARY_IMPL(pymeta, CUDA, m) {
  m.impl("adam_step", &adam_step_kernel);
  m.impl("sgd_step", &sgd_step_kernel);
}

}  // namespace pymeta
