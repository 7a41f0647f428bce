// The MLP that the model-aware core runs, read from the op's arguments and checked once.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <vector>

#include "mlp_maml_math.h"
#include "op_checks.h"

namespace pymeta {

// Ints per layer in the op's `layers` argument, and where each field sits among them.
constexpr int64_t kMlpActivationField = 0, kMlpHasBiasField = 1, kMlpAdaptedField = 2;
constexpr int64_t kMlpLayerInts = 3;

struct MlpLayer {
  int64_t in = 0, out = 0;
  Activation act = Activation::kNone;
  double slope = 0.0;
  bool bias = false;
  bool adapted = false;
  int64_t w_param = -1, b_param = -1;  // index into the params list
  int64_t w_off = 0, b_off = 0;        // offset into the flat parameter vector
  int64_t adapted_index = -1;          // ordinal among adapted layers
};

struct MlpNet {
  std::vector<MlpLayer> layers;
  int64_t num_params = 0;  // P: total elements of all params
  int64_t max_width = 0;
  int64_t num_adapted = 0;
  int64_t lowest_adapted = 0;  // first adapted layer: gradients below it are never needed

  int64_t in_features() const { return layers.front().in; }
  int64_t out_features() const { return layers.back().out; }
};

inline MlpNet parse_mlp(const char* op, at::TensorList params, at::IntArrayRef spec,
                        at::ArrayRef<double> activation_args) {
  TORCH_CHECK(!spec.empty() && spec.size() % kMlpLayerInts == 0, op,
              ": layers must hold [activation, has_bias, adapted] per layer, got ", spec.size(),
              " values");
  const size_t num_layers = spec.size() / kMlpLayerInts;
  TORCH_CHECK(activation_args.size() == num_layers, op, ": expected ", num_layers,
              " activation_args (one per layer), got ", activation_args.size());
  MlpNet net;
  size_t next = 0;
  int64_t offset = 0;
  for (size_t l = 0; l < num_layers; ++l) {
    const int64_t* r = spec.data() + l * kMlpLayerInts;
    MlpLayer layer;
    const int64_t act = r[kMlpActivationField];
    TORCH_CHECK(act >= 0 && act < kNumActivations, op, ": layer ", l, " has unknown activation code ",
                act);
    layer.act = static_cast<Activation>(act);
    layer.slope = activation_args[l];
    layer.bias = r[kMlpHasBiasField] != 0;
    layer.adapted = r[kMlpAdaptedField] != 0;
    TORCH_CHECK(next < params.size(), op, ": layer ", l, " needs a weight, but only ",
                params.size(), " params were given");
    const at::Tensor& w = params[next];
    TORCH_CHECK(w.dim() == 2, op, ": params[", next, "] (layer ", l,
                " weight) must be 2-D (out, in), got shape ", w.sizes());
    layer.out = w.size(0);
    layer.in = w.size(1);
    TORCH_CHECK(l == 0 || layer.in == net.layers.back().out, op, ": layer ", l, " takes ",
                layer.in, " features but layer ", l - 1, " gives ", net.layers.back().out);
    layer.w_param = static_cast<int64_t>(next++);
    layer.w_off = offset;
    offset += w.numel();
    if (layer.bias) {
      TORCH_CHECK(next < params.size(), op, ": layer ", l, " needs a bias");
      const at::Tensor& b = params[next];
      TORCH_CHECK(b.dim() == 1 && b.size(0) == layer.out, op, ": params[", next, "] (layer ", l,
                  " bias) must have shape [", layer.out, "], got ", b.sizes());
      layer.b_param = static_cast<int64_t>(next++);
      layer.b_off = offset;
      offset += b.numel();
    }
    if (layer.adapted) layer.adapted_index = net.num_adapted++;
    net.max_width = std::max({net.max_width, layer.in, layer.out});
    net.layers.push_back(layer);
  }
  TORCH_CHECK(next == params.size(), op, ": layers describe ", next, " params, got ",
              params.size());
  TORCH_CHECK(net.num_adapted > 0, op, ": at least one layer must adapt");
  check_params_dtype(op, params);
  net.num_params = offset;
  for (size_t l = 0; l < net.layers.size(); ++l) {
    if (net.layers[l].adapted) {
      net.lowest_adapted = static_cast<int64_t>(l);
      break;
    }
  }
  return net;
}

}  // namespace pymeta
