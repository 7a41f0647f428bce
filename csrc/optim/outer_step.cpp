// The outer (meta-parameter) update of a compiled meta-step (ModelAwareMAML.compile_step): torch's
// Adam/AdamW and SGD with momentum, as their single-tensor implementations compute them
// (torch/optim/adam.py, sgd.py), op for op, so the parameters equal optimizer.step()'s; plus
// gradient clipping by the total 2-norm as torch.nn.utils.clip_grad_norm_ does it. ATen ops,
// one call for all tensors: the per-parameter Python loop of torch.optim is what costs.
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
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor param = params[i], grad = grads[i], exp_avg = exp_avgs[i], exp_avg_sq = exp_avg_sqs[i];
    steps[i].add_(1);
    if (weight_decay != 0) {
      if (decoupled_weight_decay) {
        param.mul_(1 - lr * weight_decay);
      } else {
        grad = grad.add(param, weight_decay);
      }
    }
    exp_avg.lerp_(grad, 1 - beta1);
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2);
    const double step = steps[i].item<double>();
    const double bias_correction1 = 1 - std::pow(beta1, step);
    const double bias_correction2 = 1 - std::pow(beta2, step);
    const double step_size = lr / bias_correction1;
    const double bias_correction2_sqrt = std::sqrt(bias_correction2);
    const at::Tensor denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps);
    param.addcdiv_(exp_avg, denom, -step_size);
  }
}

// first: the momentum buffers are new (torch clones the first gradient into them).
void sgd_step_kernel(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, double lr,
                     double momentum, double dampening, double weight_decay, bool nesterov, bool first,
                     double max_grad_norm) {
  check_lists("pymeta::sgd_step", params, grads, {{"momentum_buffers", momentum_buffers}});
  clip_by_total_norm(grads, max_grad_norm);
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor param = params[i], grad = grads[i];
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
