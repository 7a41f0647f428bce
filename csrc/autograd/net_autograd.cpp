// Autograd of the model-aware core's ops (net_maml_loss, net_adapt).
// They compute the exact meta-gradient in the same call as the loss, so the backward only
// scales the stored gradients by the incoming one.
// That gradient is exact but not differentiable again: create_graph=True through it is refused.
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <vector>

namespace pymeta {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using MamlLossResult =
    std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor>;
using MamlLossFn = MamlLossResult(at::TensorList, at::TensorList, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                                        at::ArrayRef<double>, at::ArrayRef<double>, int64_t, int64_t, bool,
                                        bool, bool);
using AdaptFn = std::vector<at::Tensor>(at::TensorList, at::TensorList, const at::Tensor&, const at::Tensor&,
                                           at::IntArrayRef, at::ArrayRef<double>, int64_t, int64_t, int64_t);

// The op's non-tensor arguments, passed to the autograd Function as one value.
struct CoreOptions {
  at::IntArrayRef layers;
  at::ArrayRef<double> layer_args, step_weights;
  int64_t lr_mode, loss;
  bool first_order, compute_grads, compute_lr_grads;
  bool grad_mode;  // autograd was recording at the call (Function::forward runs without it)
};

bool any_requires_grad(at::TensorList tensors) {
  for (const auto& t : tensors) {
    if (t.requires_grad()) return true;
  }
  return false;
}

class MamlLoss : public torch::autograd::Function<MamlLoss> {
 public:
  // Returns loss, task_losses, bn_stats, grad_params..., grad_lrs...
  static variable_list forward(AutogradContext* ctx, const c10::TypedOperatorHandle<MamlLossFn>& op,
                               at::TensorList params, at::TensorList lrs, const at::Tensor& sx,
                               const at::Tensor& sy, const at::Tensor& qx, const at::Tensor& qy,
                               const CoreOptions& o) {
    // Under torch.no_grad() nothing will call backward: only gradients asked for are computed.
    const bool need_params = o.grad_mode && any_requires_grad(params);
    const bool need_lrs = o.grad_mode && any_requires_grad(lrs);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, grad_params, grad_lrs, task_losses, bn_stats] =
        op.call(params, lrs, sx, sy, qx, qy, o.layers, o.layer_args, o.step_weights, o.lr_mode, o.loss,
                o.first_order, o.compute_grads || need_params || need_lrs, o.compute_lr_grads || need_lrs);
    ctx->saved_data["n_params"] = static_cast<int64_t>(params.size());
    ctx->saved_data["n_lrs"] = static_cast<int64_t>(lrs.size());
    ctx->saved_data["grad_params"] = grad_params;
    ctx->saved_data["grad_lrs"] = grad_lrs;
    variable_list out{loss, task_losses, bn_stats};
    out.insert(out.end(), grad_params.begin(), grad_params.end());
    out.insert(out.end(), grad_lrs.begin(), grad_lrs.end());
    ctx->mark_non_differentiable(variable_list(out.begin() + 1, out.end()));
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    TORCH_CHECK(!at::GradMode::is_enabled(), "pymeta: the model-aware meta-gradient is exact but ",
                "cannot be differentiated again (create_graph=True); use pymeta.MAML for higher-order gradients");
    const int64_t n_params = ctx->saved_data["n_params"].toInt();
    const int64_t n_lrs = ctx->saved_data["n_lrs"].toInt();
    const auto grad_params = ctx->saved_data["grad_params"].toTensorVector();
    const auto grad_lrs = ctx->saved_data["grad_lrs"].toTensorVector();
    const at::Tensor& scale = grad_outputs[0];
    // One slot per forward input: the op, params, lrs, the four data tensors, the options.
    variable_list result(1 + n_params + n_lrs + 5);
    for (int64_t i = 0; i < n_params && i < static_cast<int64_t>(grad_params.size()); ++i) {
      result[1 + i] = grad_params[i] * scale;
    }
    for (int64_t i = 0; i < n_lrs && i < static_cast<int64_t>(grad_lrs.size()); ++i) {
      result[1 + n_params + i] = grad_lrs[i] * scale;
    }
    return result;
  }
};

template <const char* Name>
MamlLossResult maml_loss_autograd(at::TensorList params, at::TensorList lrs, const at::Tensor& sx,
                                  const at::Tensor& sy, const at::Tensor& qx, const at::Tensor& qy,
                                  at::IntArrayRef layers, at::ArrayRef<double> layer_args,
                                  at::ArrayRef<double> step_weights, int64_t lr_mode, int64_t loss,
                                  bool first_order, bool compute_grads, bool compute_lr_grads) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow(Name, "").typed<MamlLossFn>();
  if (!at::GradMode::is_enabled()) {
    // No graph to record (the compiled step, evaluation): the op itself, without the autograd
    // Function's bookkeeping.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(params, lrs, sx, sy, qx, qy, layers, layer_args, step_weights, lr_mode, loss, first_order,
                   compute_grads, compute_lr_grads);
  }
  const CoreOptions o{layers,        layer_args,       step_weights, lr_mode, loss, first_order,
                      compute_grads, compute_lr_grads, at::GradMode::is_enabled()};
  variable_list out = MamlLoss::apply(op, params, lrs, sx, sy, qx, qy, o);
  std::vector<at::Tensor> grad_params, grad_lrs;
  // out = [loss, task_losses, bn_stats, grad_params..., grad_lrs...] with the gradients present
  // when they were computed (asked for, or needed by autograd); return them only when asked for.
  const auto grads_begin = out.begin() + 3, lrs_begin = grads_begin + params.size();
  if (compute_grads && out.size() > 3) grad_params.assign(grads_begin, lrs_begin);
  if (compute_grads && compute_lr_grads && out.end() > lrs_begin) grad_lrs.assign(lrs_begin, out.end());
  return {out[0], grad_params, grad_lrs, out[1], out[2]};
}

// Fast adaptation builds no graph: the adapted params are plain tensors.
template <const char* Name>
std::vector<at::Tensor> adapt_autograd(at::TensorList params, at::TensorList lrs, const at::Tensor& sx,
                                       const at::Tensor& sy, at::IntArrayRef layers,
                                       at::ArrayRef<double> layer_args, int64_t steps, int64_t lr_mode,
                                       int64_t loss) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow(Name, "").typed<AdaptFn>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(params, lrs, sx, sy, layers, layer_args, steps, lr_mode, loss);
}

constexpr char kNetLoss[] = "pymeta::net_maml_loss";
constexpr char kNetAdapt[] = "pymeta::net_adapt";

}  // namespace

TORCH_LIBRARY_IMPL(pymeta, Autograd, m) {
  m.impl("net_maml_loss", &maml_loss_autograd<kNetLoss>);
  m.impl("net_adapt", &adapt_autograd<kNetAdapt>);
}

}  // namespace pymeta
