// net_layer_rules: one layer's forward, backward and R-operator rules on their own, so that the
// tests can check each rule against autograd (tests/test_layer_rules.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "net/layers.h"
#include "net/net.h"

namespace pymeta {
namespace {

at::Tensor value(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

// t, or zeros shaped like `like` when t is undefined (zero) and `like` exists.
at::Tensor or_zeros(const at::Tensor& t, const at::Tensor& like) {
  if (t.defined()) return t.contiguous();
  return like.defined() ? at::zeros_like(like) : at::Tensor();
}

std::vector<at::Tensor> net_layer_rules_kernel(at::IntArrayRef layer, double layer_arg, const at::Tensor& x,
                                               const std::optional<at::Tensor>& x2_opt,
                                               const std::optional<at::Tensor>& w_opt,
                                               const std::optional<at::Tensor>& b_opt, const at::Tensor& gy,
                                               const std::optional<at::Tensor>& rx_opt,
                                               const std::optional<at::Tensor>& rx2_opt,
                                               const std::optional<at::Tensor>& uw_opt,
                                               const std::optional<at::Tensor>& ub_opt,
                                               const std::optional<at::Tensor>& rgy_opt, int64_t tasks) {
  constexpr const char* op = "pymeta::net_layer_rules";
  TORCH_CHECK(tasks >= 1, op, ": tasks must be >= 1, got ", tasks);
  // One task's params come without the task dim; the rules take it on every param.
  auto batched = [&](const std::optional<at::Tensor>& t) {
    const at::Tensor v = value(t);
    return v.defined() && tasks == 1 ? v.unsqueeze(0) : v;
  };
  auto unbatched = [&](const at::Tensor& t) { return t.defined() && tasks == 1 ? t.squeeze(0) : t; };
  const at::Tensor x2 = value(x2_opt), w = batched(w_opt), b = batched(b_opt);
  std::vector<at::Tensor> params;  // one task's, for the layer's checks
  for (const auto& p : {w, b}) {
    if (p.defined()) {
      TORCH_CHECK(p.dim() >= 2 && p.size(0) == tasks, op, ": with tasks = ", tasks,
                  ", weight and bias must have a leading dim of that size, got ", p.sizes());
      params.push_back(p.select(0, 0));
    }
  }
  TORCH_CHECK(layer.size() == static_cast<size_t>(kLayerInts), op, ": layer must hold ", kLayerInts,
              " ints, got ", layer.size());
  size_t next = 0;
  const NetLayer L = read_net_layer(op, 0, layer.data(), layer_arg, params, next, 1);
  TORCH_CHECK(next == params.size(), op, ": the layer takes ", next, " params, got ", params.size());
  LayerSaved saved;
  const at::Tensor y = layer_forward(L, tasks, x, x2, w, b, saved);
  const LayerGrads g = layer_backward(L, tasks, x, w, b, saved, gy, true);
  at::Tensor r_saved;
  const at::Tensor rx = value(rx_opt), rx2 = value(rx2_opt), uw = batched(uw_opt), ub = batched(ub_opt);
  const at::Tensor ry = layer_r_forward(L, tasks, x, x2, w, saved, rx, rx2, uw, ub, r_saved);
  const LayerGrads r = layer_r_backward(L, tasks, x, w, saved, gy, value(rgy_opt), rx, uw, r_saved, true);
  const at::Tensor w1 = unbatched(w), b1 = unbatched(b);
  return {y.contiguous(),  or_zeros(g.x, x),  or_zeros(g.x2, x2), or_zeros(unbatched(g.w), w1),
          or_zeros(unbatched(g.b), b1),      or_zeros(ry, y),    or_zeros(r.x, x),
          or_zeros(r.x2, x2), or_zeros(unbatched(r.w), w1), or_zeros(unbatched(r.b), b1)};
}

}  // namespace

TORCH_LIBRARY_IMPL(pymeta, CPU, m) { m.impl("net_layer_rules", &net_layer_rules_kernel); }
#ifdef PYMETA_WITH_CUDA
// The same rules on CUDA, where the fused kernels of cuda/fused_layers.h run (tests/test_cuda_kernels.py).
TORCH_LIBRARY_IMPL(pymeta, CUDA, m) { m.impl("net_layer_rules", &net_layer_rules_kernel); }
#endif

}  // namespace pymeta
