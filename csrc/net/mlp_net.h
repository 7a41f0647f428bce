// The MLP fast path's view of a network: when the model-aware core's network is a chain of
// Linear layers, each followed by at most one activation (optionally after a leading Flatten),
// its CPU kernels (net/mlp_fast_path.cpp) run the whole meta-step on flat buffers instead of
// ATen ops. mlp_net_of() decides, from the network the driver has already parsed and checked.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "net/codes.h"
#include "net/net.h"

namespace pymeta {

struct MlpLayer {
  int64_t in = 0, out = 0;
  Activation act = Activation::kNone;
  double slope = 0.0;
  bool bias = false;
  bool adapted = false;
  int64_t w_param = -1, b_param = -1;  // index into the params list
  int64_t w_off = 0, b_off = 0;        // offset into the flat parameter vector
};

struct MlpNet {
  std::vector<MlpLayer> layers;
  bool flatten_input = false;  // the network starts with a Flatten: inputs are (T, K, ...)
  int64_t num_params = 0;      // P: total elements of all params
  int64_t max_width = 0;
  int64_t lowest_adapted = 0;  // first adapted layer: gradients below it are never needed

  int64_t in_features() const { return layers.front().in; }
  int64_t out_features() const { return layers.back().out; }
};

// Whether layers given as (kind, input value) form an MLP chain: [Flatten] then Linear layers,
// each followed by at most one activation, every layer reading the previous one's output. The
// one rule for choosing the fast path (pymeta._C.mlp_fast_path_applies asks it too).
inline bool is_mlp_chain(const std::vector<std::pair<LayerKind, int64_t>>& layers) {
  bool any_linear = false;
  for (size_t l = 0; l < layers.size(); ++l) {
    const auto [kind, input] = layers[l];
    if (input != static_cast<int64_t>(l)) return false;
    const bool leading_flatten = l == 0 && kind == LayerKind::kFlatten;
    const bool activation = kind == LayerKind::kActivation && l > 0 && layers[l - 1].first == LayerKind::kLinear;
    if (kind == LayerKind::kLinear) any_linear = true;
    if (kind != LayerKind::kLinear && !leading_flatten && !activation) return false;
  }
  return any_linear;
}

// The MLP of `net`, or nothing when it is not an MLP chain (or its widths do not chain, which
// the ATen path reports).
inline std::optional<MlpNet> mlp_net_of(const Net& net, at::TensorList params) {
  std::vector<std::pair<LayerKind, int64_t>> chain;
  for (const NetLayer& L : net.layers) chain.emplace_back(L.kind, L.input);
  if (!is_mlp_chain(chain)) return std::nullopt;
  MlpNet mlp;
  int64_t offset = 0;
  for (const NetLayer& L : net.layers) {
    if (L.kind == LayerKind::kFlatten) {
      mlp.flatten_input = true;
    } else if (L.kind == LayerKind::kActivation) {
      mlp.layers.back().act = L.activation();
      mlp.layers.back().slope = L.arg;
    } else {
      MlpLayer layer;
      const at::Tensor& w = params[L.w_param];
      layer.out = w.size(0);
      layer.in = w.size(1);
      if (!mlp.layers.empty() && layer.in != mlp.layers.back().out) return std::nullopt;
      layer.bias = L.b_param >= 0;
      layer.adapted = L.adapted;
      layer.w_param = L.w_param;
      layer.b_param = L.b_param;
      layer.w_off = offset;
      offset += w.numel();
      if (layer.bias) {
        layer.b_off = offset;
        offset += params[L.b_param].numel();
      }
      mlp.max_width = std::max({mlp.max_width, layer.in, layer.out});
      mlp.layers.push_back(layer);
    }
  }
  mlp.num_params = offset;
  for (size_t l = 0; l < mlp.layers.size(); ++l) {
    if (mlp.layers[l].adapted) {
      mlp.lowest_adapted = static_cast<int64_t>(l);
      break;
    }
  }
  return mlp;
}

// The op results of net_maml_loss: loss, grad_params, grad_lrs, task_losses, bn_stats.
using MamlLossResult =
    std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor>;

// net_maml_loss and net_adapt on the fast path, for calls the driver has checked (CPU); pb is
// that check's result (steps, loss, learning-rate layout).
struct NetProblem;
MamlLossResult mlp_maml_loss_fast(const NetProblem& pb, MlpNet net, at::TensorList params, at::TensorList lrs,
                                  const at::Tensor& support_x, const at::Tensor& support_y, const at::Tensor& query_x,
                                  const at::Tensor& query_y, at::ArrayRef<double> step_weights, bool first_order,
                                  bool compute_grads, bool compute_lr_grads);
std::vector<at::Tensor> mlp_adapt_fast(const NetProblem& pb, MlpNet net, at::TensorList params, at::TensorList lrs,
                                       const at::Tensor& support_x, const at::Tensor& support_y);

}  // namespace pymeta
