// The sequential network (convolutions, batch norm, pooling, linear layers, activations) that
// the model-aware core's layered path runs, read from the op's arguments and checked once.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <iterator>
#include <vector>

#include "mlp_maml_math.h"
#include "op_checks.h"

namespace pymeta {

enum class SeqKind : int64_t {
  kLinear = 0,      // flag: has bias
  kConv2d = 1,      // flag: has bias; ints: stride_h, stride_w, pad_h, pad_w
  kBatchNorm = 2,   // flag: affine; ints[0]: per-step weights, ints[1]: channels; arg: eps
  kActivation = 3,  // flag: Activation code; arg: negative slope
  kMaxPool2d = 4,   // ints: kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w
  kAvgPool2d = 5,   // flag: count_include_pad; ints as kMaxPool2d
  kFlatten = 6,     // (N, ...) -> (N, features)
};

// Python's names of the kinds (pymeta._C.encoding() exports them), in code order.
inline constexpr EncodingName kSeqKindNames[] = {
    {"linear", static_cast<int64_t>(SeqKind::kLinear)},
    {"conv2d", static_cast<int64_t>(SeqKind::kConv2d)},
    {"batchnorm", static_cast<int64_t>(SeqKind::kBatchNorm)},
    {"activation", static_cast<int64_t>(SeqKind::kActivation)},
    {"maxpool", static_cast<int64_t>(SeqKind::kMaxPool2d)},
    {"avgpool", static_cast<int64_t>(SeqKind::kAvgPool2d)},
    {"flatten", static_cast<int64_t>(SeqKind::kFlatten)}};
constexpr int64_t kNumSeqKinds = std::size(kSeqKindNames);
static_assert(kNumSeqKinds == static_cast<int64_t>(SeqKind::kFlatten) + 1);

// One layer in the op's `layers` argument: [kind, flag, adapted, six layer ints]; the fields'
// positions, and those of batch norm's layer ints.
constexpr int64_t kSeqKindField = 0, kSeqFlagField = 1, kSeqAdaptedField = 2, kSeqIntsField = 3;
constexpr int64_t kSeqNumInts = 6;
constexpr int64_t kSeqLayerInts = kSeqIntsField + kSeqNumInts;
constexpr int64_t kBnPerStepInt = 0, kBnChannelsInt = 1;

struct SeqLayer {
  SeqKind kind = SeqKind::kFlatten;
  int64_t flag = 0;
  bool adapted = false;
  std::array<int64_t, kSeqNumInts> ints{};
  double arg = 0.0;
  int64_t w_param = -1, b_param = -1;  // index into the params list
  int64_t adapted_index = -1;          // ordinal among adapted layers
  bool per_step = false;               // batch norm weights with a leading (steps + 1) dim
  int64_t stats_offset = -1;           // batch norm: first channel of its batch statistics

  bool has_params() const { return w_param >= 0; }
  Activation activation() const { return static_cast<Activation>(flag); }
};

struct SeqNet {
  std::vector<SeqLayer> layers;
  int64_t num_adapted = 0;
  int64_t lowest_adapted = 0;  // first adapted layer: gradients below it are never needed
  int64_t bn_channels = 0;     // channels of all batch norm layers (their statistics, concatenated)
};

inline const char* seq_kind_name(SeqKind kind) {
  static constexpr const char* names[] = {"Linear",     "Conv2d",    "BatchNorm", "activation",
                                          "MaxPool2d", "AvgPool2d", "Flatten"};
  return names[static_cast<int64_t>(kind)];
}

// steps: inner steps of the call (per-step batch-norm weights have at least steps + 1 rows).
inline SeqNet parse_seq(const char* op, at::TensorList params, at::IntArrayRef spec,
                        at::ArrayRef<double> layer_args, int64_t steps) {
  TORCH_CHECK(!spec.empty() && spec.size() % kSeqLayerInts == 0, op, ": layers must hold ",
              kSeqLayerInts, " ints per layer, got ", spec.size(), " values");
  const size_t num_layers = spec.size() / kSeqLayerInts;
  TORCH_CHECK(layer_args.size() == num_layers, op, ": expected ", num_layers,
              " layer args (one per layer), got ", layer_args.size());
  SeqNet net;
  size_t next = 0;
  auto take = [&](size_t l, const char* what) {
    TORCH_CHECK(next < params.size(), op, ": layer ", l, " needs a ", what, ", but only ",
                params.size(), " params were given");
    return static_cast<int64_t>(next++);
  };
  for (size_t l = 0; l < num_layers; ++l) {
    const int64_t* r = spec.data() + l * kSeqLayerInts;
    SeqLayer L;
    const int64_t kind = r[kSeqKindField];
    TORCH_CHECK(kind >= 0 && kind < kNumSeqKinds, op, ": layer ", l, " has unknown kind ", kind);
    L.kind = static_cast<SeqKind>(kind);
    L.flag = r[kSeqFlagField];
    L.adapted = r[kSeqAdaptedField] != 0;
    for (int64_t i = 0; i < kSeqNumInts; ++i) L.ints[i] = r[kSeqIntsField + i];
    L.arg = layer_args[l];
    const bool parametric = L.kind == SeqKind::kLinear || L.kind == SeqKind::kConv2d ||
                            (L.kind == SeqKind::kBatchNorm && L.flag != 0);
    TORCH_CHECK(parametric || !L.adapted, op, ": layer ", l, " (", seq_kind_name(L.kind),
                ") has no parameters to adapt");
    if (parametric) {
      L.w_param = take(l, "weight");
      const at::Tensor& w = params[L.w_param];
      if (L.kind == SeqKind::kLinear) {
        TORCH_CHECK(w.dim() == 2, op, ": layer ", l, " (Linear) weight must be 2-D, got ", w.sizes());
      } else if (L.kind == SeqKind::kConv2d) {
        TORCH_CHECK(w.dim() == 4, op, ": layer ", l, " (Conv2d) weight must be 4-D, got ", w.sizes());
        for (int i = 0; i < 2; ++i) {
          TORCH_CHECK(L.ints[i] >= 1 && L.ints[2 + i] >= 0, op, ": layer ", l,
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
      if (L.kind == SeqKind::kBatchNorm || L.flag != 0) {
        L.b_param = take(l, "bias");
        const at::Tensor& b = params[L.b_param];
        const int64_t channels = L.kind == SeqKind::kBatchNorm ? w.size(-1) : w.size(0);
        TORCH_CHECK(b.dim() == (L.per_step ? 2 : 1) && b.size(-1) == channels &&
                        (!L.per_step || b.size(0) == w.size(0)),
                    op, ": layer ", l, " (", seq_kind_name(L.kind), ") bias has shape ", b.sizes(),
                    ", which does not match the weight ", w.sizes());
      }
    }
    if (L.kind == SeqKind::kBatchNorm) {
      const int64_t channels = L.ints[kBnChannelsInt];
      TORCH_CHECK(channels >= 1, op, ": layer ", l, " (BatchNorm) needs its channel count >= 1, got ", channels);
      TORCH_CHECK(!parametric || params[L.w_param].size(-1) == channels, op, ": layer ", l,
                  " (BatchNorm) weight has ", params[L.w_param].size(-1), " channels, expected ", channels);
      L.stats_offset = net.bn_channels;
      net.bn_channels += channels;
    }
    if (L.kind == SeqKind::kActivation) {
      TORCH_CHECK(L.flag >= 1 && L.flag < kNumActivations, op, ": layer ", l, " has unknown activation code ", L.flag);
    }
    if (L.kind == SeqKind::kMaxPool2d || L.kind == SeqKind::kAvgPool2d) {
      TORCH_CHECK(L.ints[0] >= 1 && L.ints[1] >= 1 && L.ints[2] >= 1 && L.ints[3] >= 1 && L.ints[4] >= 0 &&
                      L.ints[5] >= 0 && 2 * L.ints[4] <= L.ints[0] && 2 * L.ints[5] <= L.ints[1],
                  op, ": layer ", l, " (", seq_kind_name(L.kind),
                  ") needs kernel >= 1, stride >= 1 and 0 <= padding <= kernel / 2");
    }
    if (L.adapted) L.adapted_index = net.num_adapted++;
    net.layers.push_back(L);
  }
  TORCH_CHECK(next == params.size(), op, ": layers describe ", next, " params, got ", params.size());
  TORCH_CHECK(net.num_adapted > 0, op, ": at least one layer must adapt");
  check_params_dtype(op, params);
  for (size_t l = 0; l < net.layers.size(); ++l) {
    if (net.layers[l].adapted) {
      net.lowest_adapted = static_cast<int64_t>(l);
      break;
    }
  }
  return net;
}

}  // namespace pymeta
