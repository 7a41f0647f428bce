// The model-aware core's codes, defined once: activations, losses and learning-rate layouts, with
// the names pymeta._C.encoding() exports to Python (pymeta/model_aware/encoding.py reads them).
#pragma once

#include <cstdint>
#include <iterator>

namespace pymeta {

enum class Activation : int64_t { kNone = 0, kRelu = 1, kLeakyRelu = 2, kTanh = 3, kSigmoid = 4 };
enum class LossKind : int64_t { kMse = 0, kCrossEntropy = 1 };
// How inner learning rates are laid out: one scalar; one per (step, adapted layer) (MAML++);
// one per element of every adapted parameter (Meta-SGD).
enum class LrMode : int64_t { kScalar = 0, kPerLayerStep = 1, kPerParameter = 2 };

// The names Python knows these codes by: pymeta._C.encoding() exports these tables, so the
// codes are written here only. Each table lists every enum value, in code order.
struct EncodingName {
  const char* name;
  int64_t code;
};
inline constexpr EncodingName kActivationNames[] = {
    {"none", static_cast<int64_t>(Activation::kNone)},
    {"relu", static_cast<int64_t>(Activation::kRelu)},
    {"leaky_relu", static_cast<int64_t>(Activation::kLeakyRelu)},
    {"tanh", static_cast<int64_t>(Activation::kTanh)},
    {"sigmoid", static_cast<int64_t>(Activation::kSigmoid)}};
inline constexpr EncodingName kLossNames[] = {
    {"mse", static_cast<int64_t>(LossKind::kMse)},
    {"cross_entropy", static_cast<int64_t>(LossKind::kCrossEntropy)}};
inline constexpr EncodingName kLrModeNames[] = {
    {"scalar", static_cast<int64_t>(LrMode::kScalar)},
    {"per_layer_step", static_cast<int64_t>(LrMode::kPerLayerStep)},
    {"per_parameter", static_cast<int64_t>(LrMode::kPerParameter)}};
// The parsers accept the codes [0, count).
constexpr int64_t kNumActivations = std::size(kActivationNames);
constexpr int64_t kNumLossKinds = std::size(kLossNames);
constexpr int64_t kNumLrModes = std::size(kLrModeNames);
static_assert(kNumActivations == static_cast<int64_t>(Activation::kSigmoid) + 1);
static_assert(kNumLossKinds == static_cast<int64_t>(LossKind::kCrossEntropy) + 1);
static_assert(kNumLrModes == static_cast<int64_t>(LrMode::kPerParameter) + 1);

}  // namespace pymeta
