// The network (convolutions, batch norm, pooling, linear layers, activations, residual adds and
// channel concatenations) that the model-aware core runs, read from the op's
// arguments and checked once. It is a graph in topological order: value 0 is the network's
// input, layer l reads one or two earlier values and produces value l + 1, and the last value
// is the output.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <iterator>
#include <vector>

#include "net/activation_math.h"
#include "op_checks.h"

namespace pymeta {

enum class LayerKind : int64_t {
  kLinear = 0,      // flag: has bias
  kConv2d = 1,      // flag: has bias; ints: stride_h, stride_w, pad_h, pad_w
  kBatchNorm = 2,   // flag: affine; ints[0]: per-step weights, ints[1]: channels; arg: eps
  kActivation = 3,  // flag: Activation code; arg: negative slope
  kMaxPool2d = 4,   // ints: kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w
  kAvgPool2d = 5,   // flag: count_include_pad; ints as kMaxPool2d
  kFlatten = 6,     // (N, ...) -> (N, features)
  kAdd = 7,         // two inputs of one shape: input + input2 (the residual add)
  kConcat = 8,      // two inputs: cat along the channels (dim 1)
  kGlobalAvgPool = 9,  // (N, C, H, W) -> (N, C, 1, 1): adaptive average pooling to 1x1
};

// Python's names of the kinds (pymeta._C.encoding() exports them), in code order.
inline constexpr EncodingName kLayerKindNames[] = {
    {"linear", static_cast<int64_t>(LayerKind::kLinear)},
    {"conv2d", static_cast<int64_t>(LayerKind::kConv2d)},
    {"batchnorm", static_cast<int64_t>(LayerKind::kBatchNorm)},
    {"activation", static_cast<int64_t>(LayerKind::kActivation)},
    {"maxpool", static_cast<int64_t>(LayerKind::kMaxPool2d)},
    {"avgpool", static_cast<int64_t>(LayerKind::kAvgPool2d)},
    {"flatten", static_cast<int64_t>(LayerKind::kFlatten)},
    {"add", static_cast<int64_t>(LayerKind::kAdd)},
    {"concat", static_cast<int64_t>(LayerKind::kConcat)},
    {"global_avgpool", static_cast<int64_t>(LayerKind::kGlobalAvgPool)}};
constexpr int64_t kNumLayerKinds = std::size(kLayerKindNames);
static_assert(kNumLayerKinds == static_cast<int64_t>(LayerKind::kGlobalAvgPool) + 1);

// One layer in the op's `layers` argument: [kind, flag, adapted, input, input2, six layer ints];
// the fields' positions, and those of batch norm's layer ints. input and input2 are value
// indices (0: the network's input, l + 1: layer l's output); input2 is -1 except for the
// two-input kinds (kAdd, kConcat).
constexpr int64_t kLayerKindField = 0, kLayerFlagField = 1, kLayerAdaptedField = 2, kLayerInputField = 3,
                  kLayerInput2Field = 4, kLayerIntsField = 5;
constexpr int64_t kLayerNumInts = 6;
constexpr int64_t kLayerInts = kLayerIntsField + kLayerNumInts;
// Positions within the six layer ints (an (h, w) pair takes two, from its position).
constexpr int64_t kBnPerStepInt = 0, kBnChannelsInt = 1;
constexpr int64_t kConvStrideInt = 0, kConvPaddingInt = 2;
constexpr int64_t kPoolKernelInt = 0, kPoolStrideInt = 2, kPoolPaddingInt = 4;

struct NetLayer {
  LayerKind kind = LayerKind::kFlatten;
  int64_t flag = 0;
  bool adapted = false;
  std::array<int64_t, kLayerNumInts> ints{};
  double arg = 0.0;
  int64_t input = 0, input2 = -1;      // the values it reads
  int64_t w_param = -1, b_param = -1;  // index into the params list
  int64_t adapted_index = -1;          // ordinal among adapted layers
  bool per_step = false;               // batch norm weights with a leading (steps + 1) dim
  int64_t stats_offset = -1;           // batch norm: first channel of its batch statistics

  bool has_params() const { return w_param >= 0; }
  // Whether its backward and R-rules read its input value(s): not an activation that reads its
  // output instead (net/layers.cpp), nor the residual add (linear, shape-preserving).
  bool reads_input_later() const {
    if (kind == LayerKind::kAdd) return false;
    return !(kind == LayerKind::kActivation && !(activation() == Activation::kLeakyRelu && arg < 0));
  }
  bool two_inputs() const { return kind == LayerKind::kAdd || kind == LayerKind::kConcat; }
  Activation activation() const { return static_cast<Activation>(flag); }
};

struct Net {
  std::vector<NetLayer> layers;
  int64_t num_adapted = 0;
  int64_t bn_channels = 0;  // channels of all batch norm layers (their statistics, concatenated)
  // Per value: how many layers read it, and whether it depends on any parameter / on an adapted
  // one (the gradient with respect to a value is needed only then).
  std::vector<int64_t> uses;
  std::vector<bool> after_param, after_adapted;
  // Per value: the last layer that reads it, and whether any rule reads it after the forward
  // (a reader's backward or R-rules, or its producer's when an activation); a value that none
  // does is freed as soon as its last reader has run forward.
  std::vector<int64_t> last_reader;
  std::vector<bool> read_later;
  // Per value: a cut point, where no later layer reads an earlier value (a checkpointed forward
  // keeps these and recomputes the values between them).
  std::vector<bool> cut;
};

inline const char* layer_kind_name(LayerKind kind) {
  static constexpr const char* names[] = {"Linear",    "Conv2d",    "BatchNorm", "activation",
                                          "MaxPool2d", "AvgPool2d", "Flatten",   "add",
                                          "concat",    "global average pooling"};
  static_assert(std::size(names) == kNumLayerKinds);
  return names[static_cast<int64_t>(kind)];
}

// One layer: row r of the op's `layers` (kLayerInts ints), with its arg; its params are taken
// from params[next...] (next advances past them). steps: inner steps of the call (per-step
// batch-norm weights have at least steps + 1 rows).
inline NetLayer read_net_layer(const char* op, size_t l, const int64_t* r, double arg, at::TensorList params,
                               size_t& next, int64_t steps) {
  auto take = [&](const char* what) {
    TORCH_CHECK(next < params.size(), op, ": layer ", l, " needs a ", what, ", but only ",
                params.size(), " params were given");
    return static_cast<int64_t>(next++);
  };
  NetLayer L;
  const int64_t kind = r[kLayerKindField];
  TORCH_CHECK(kind >= 0 && kind < kNumLayerKinds, op, ": layer ", l, " has unknown kind ", kind);
  L.kind = static_cast<LayerKind>(kind);
  L.flag = r[kLayerFlagField];
  L.adapted = r[kLayerAdaptedField] != 0;
  for (int64_t i = 0; i < kLayerNumInts; ++i) L.ints[i] = r[kLayerIntsField + i];
  L.arg = arg;
  L.input = r[kLayerInputField];
  L.input2 = r[kLayerInput2Field];
  const int64_t values = static_cast<int64_t>(l) + 1;  // values before this layer's output
  TORCH_CHECK(L.input >= 0 && L.input < values, op, ": layer ", l, " reads value ", L.input,
              ", expected an earlier value in [0, ", values, ")");
  TORCH_CHECK(L.two_inputs() ? (L.input2 >= 0 && L.input2 < values) : L.input2 == -1, op,
              ": layer ", l, " (", layer_kind_name(L.kind), ") has second input ", L.input2,
              L.two_inputs() ? ", expected an earlier value" : ", expected -1 (one input)");
  const bool parametric = L.kind == LayerKind::kLinear || L.kind == LayerKind::kConv2d ||
                          (L.kind == LayerKind::kBatchNorm && L.flag != 0);
  TORCH_CHECK(parametric || !L.adapted, op, ": layer ", l, " (", layer_kind_name(L.kind),
              ") has no parameters to adapt");
  if (parametric) {
    L.w_param = take("weight");
    const at::Tensor& w = params[L.w_param];
    if (L.kind == LayerKind::kLinear) {
      TORCH_CHECK(w.dim() == 2, op, ": layer ", l, " (Linear) weight must be 2-D, got ", w.sizes());
    } else if (L.kind == LayerKind::kConv2d) {
      TORCH_CHECK(w.dim() == 4, op, ": layer ", l, " (Conv2d) weight must be 4-D, got ", w.sizes());
      for (int i = 0; i < 2; ++i) {
        TORCH_CHECK(L.ints[kConvStrideInt + i] >= 1 && L.ints[kConvPaddingInt + i] >= 0, op, ": layer ", l,
                    " (Conv2d) needs strides >= 1 and paddings >= 0");
      }
    } else {
      L.per_step = L.ints[kBnPerStepInt] != 0;
      TORCH_CHECK(!(L.per_step && L.adapted), op, ": layer ", l,
                  " (BatchNorm) has per-step weights, which are meta-learned, not adapted");
      const int64_t dims = L.per_step ? 2 : 1;
      TORCH_CHECK(w.dim() == dims && (!L.per_step || w.size(0) >= steps + 1), op, ": layer ", l,
                  " (BatchNorm) weight must have shape ",
                  L.per_step ? "[>= steps + 1, C]" : "[C]", ", got ", w.sizes());
      TORCH_CHECK(L.arg > 0, op, ": layer ", l, " (BatchNorm) eps must be > 0, got ", L.arg);
    }
    // Affine batch norm always has a bias (beta); Linear and Conv2d say so in their flag.
    if (L.kind == LayerKind::kBatchNorm || L.flag != 0) {
      L.b_param = take("bias");
      const at::Tensor& b = params[L.b_param];
      const int64_t channels = L.kind == LayerKind::kBatchNorm ? w.size(-1) : w.size(0);
      TORCH_CHECK(b.dim() == (L.per_step ? 2 : 1) && b.size(-1) == channels &&
                      (!L.per_step || b.size(0) == w.size(0)),
                  op, ": layer ", l, " (", layer_kind_name(L.kind), ") bias has shape ", b.sizes(),
                  ", which does not match the weight ", w.sizes());
    }
  }
  if (L.kind == LayerKind::kBatchNorm) {
    const int64_t channels = L.ints[kBnChannelsInt];
    TORCH_CHECK(channels >= 1, op, ": layer ", l, " (BatchNorm) needs its channel count >= 1, got ", channels);
    TORCH_CHECK(!parametric || params[L.w_param].size(-1) == channels, op, ": layer ", l,
                " (BatchNorm) weight has ", params[L.w_param].size(-1), " channels, expected ", channels);
  }
  if (L.kind == LayerKind::kActivation) {
    TORCH_CHECK(L.flag >= 1 && L.flag < kNumActivations, op, ": layer ", l, " has unknown activation code ", L.flag);
  }
  if (L.kind == LayerKind::kMaxPool2d || L.kind == LayerKind::kAvgPool2d) {
    for (int i = 0; i < 2; ++i) {
      const int64_t kernel = L.ints[kPoolKernelInt + i], padding = L.ints[kPoolPaddingInt + i];
      TORCH_CHECK(kernel >= 1 && L.ints[kPoolStrideInt + i] >= 1 && padding >= 0 && 2 * padding <= kernel, op,
                  ": layer ", l, " (", layer_kind_name(L.kind),
                  ") needs kernel >= 1, stride >= 1 and 0 <= padding <= kernel / 2");
    }
  }
  return L;
}

// The whole network: every layer (read_net_layer) and the checks that span layers.
inline Net parse_net(const char* op, at::TensorList params, at::IntArrayRef spec,
                        at::ArrayRef<double> layer_args, int64_t steps) {
  TORCH_CHECK(!spec.empty() && spec.size() % kLayerInts == 0, op, ": layers must hold ",
              kLayerInts, " ints per layer, got ", spec.size(), " values");
  const size_t num_layers = spec.size() / kLayerInts;
  TORCH_CHECK(layer_args.size() == num_layers, op, ": expected ", num_layers,
              " layer args (one per layer), got ", layer_args.size());
  Net net;
  size_t next = 0;
  for (size_t l = 0; l < num_layers; ++l) {
    NetLayer L = read_net_layer(op, l, spec.data() + l * kLayerInts, layer_args[l], params, next, steps);
    if (L.kind == LayerKind::kBatchNorm) {
      L.stats_offset = net.bn_channels;
      net.bn_channels += L.ints[kBnChannelsInt];
    }
    if (L.adapted) L.adapted_index = net.num_adapted++;
    net.layers.push_back(L);
  }
  TORCH_CHECK(next == params.size(), op, ": layers describe ", next, " params, got ", params.size());
  TORCH_CHECK(net.num_adapted > 0, op, ": at least one layer must adapt");
  check_params_dtype(op, params);
  net.uses.assign(num_layers + 1, 0);
  net.after_param.assign(num_layers + 1, false);
  net.after_adapted.assign(num_layers + 1, false);
  net.last_reader.assign(num_layers + 1, -1);
  net.read_later.assign(num_layers + 1, false);
  for (size_t l = 0; l < num_layers; ++l) {
    const NetLayer& L = net.layers[l];
    bool param = L.has_params(), adapted = L.adapted;
    for (int64_t v : {L.input, L.input2}) {
      if (v < 0) continue;
      ++net.uses[v];
      net.last_reader[v] = static_cast<int64_t>(l);
      if (L.reads_input_later()) net.read_later[v] = true;
      param = param || net.after_param[v];
      adapted = adapted || net.after_adapted[v];
    }
    // An activation's rules read its output (net/layers.cpp).
    if (L.kind == LayerKind::kActivation) net.read_later[l + 1] = true;
    net.after_param[l + 1] = param;
    net.after_adapted[l + 1] = adapted;
  }
  net.cut.assign(num_layers + 1, false);
  int64_t lowest_read = static_cast<int64_t>(num_layers);  // lowest value read by layers >= l
  for (int64_t l = static_cast<int64_t>(num_layers); l >= 0; --l) {
    if (l < static_cast<int64_t>(num_layers)) {
      const NetLayer& L = net.layers[l];
      lowest_read = std::min({lowest_read, L.input, L.input2 >= 0 ? L.input2 : L.input});
    }
    net.cut[l] = lowest_read >= l;  // layers l, l + 1, ... read value l or later ones
  }
  // A value nobody reads would be a description error (the output is the last value).
  for (size_t v = 0; v < num_layers; ++v) {
    TORCH_CHECK(net.uses[v] > 0, op, ": value ", v, " (", v == 0 ? "the input" : "a layer's output",
                ") is never read; the network's output must be the last layer's");
  }
  return net;
}

}  // namespace pymeta
