// Formulas of the model-aware MLP core, shared by the CPU kernels and any future CUDA ones:
// activations with their first and second derivatives, and the MLP's layer description.
#pragma once

#include <cmath>
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

// h = act(a)
template <typename T>
inline T activate(Activation act, T a, T slope) {
  switch (act) {
    case Activation::kRelu:
      return a <= T(0) ? T(0) : a;  // keeps NaN, as torch.relu does (a > 0 ? a : 0 drops it)
    case Activation::kLeakyRelu:
      return a > T(0) ? a : slope * a;
    case Activation::kTanh:
      return std::tanh(a);
    case Activation::kSigmoid:
      return T(1) / (T(1) + std::exp(-a));
    default:
      return a;
  }
}

// v * act'(a), from the pre-activation a and the output h, with PyTorch's non-finite semantics:
// ReLU's backward selects (threshold_backward: 0 where a <= 0, v elsewhere, NaN a included), so
// a NaN or infinite v where a <= 0 gives 0, not 0 * v = NaN; LeakyReLU's takes the slope at a
// NaN a (leaky_relu_backward: a > 0 ? v : v * slope).
template <typename T>
inline T times_activation_d1(Activation act, T a, T h, T v, T slope) {
  switch (act) {
    case Activation::kRelu:
      return a <= T(0) ? T(0) : v;
    case Activation::kLeakyRelu:
      return v * (a > T(0) ? T(1) : slope);  // no arithmetic behind the select: it vectorizes
    case Activation::kTanh:
      return v * (T(1) - h * h);
    case Activation::kSigmoid:
      return v * (h * (T(1) - h));
    default:
      return v;
  }
}

// d^2 act / d a^2 (zero for the piecewise-linear ones).
template <typename T>
inline T activation_d2(Activation act, T a, T h) {
  switch (act) {
    case Activation::kTanh:
      return T(-2) * h * (T(1) - h * h);
    case Activation::kSigmoid:
      return h * (T(1) - h) * (T(1) - T(2) * h);
    default:
      return T(0);
  }
}

inline bool activation_is_piecewise_linear(Activation act) {
  return act == Activation::kNone || act == Activation::kRelu || act == Activation::kLeakyRelu;
}

}  // namespace pymeta
