// Formulas of the model-aware MLP core, shared by the CPU kernels and any future CUDA ones:
// activations with their first and second derivatives, and the MLP's layer description.
#pragma once

#include <cmath>
#include <cstdint>

namespace pymeta {

enum class Activation : int64_t { kNone = 0, kRelu = 1, kLeakyRelu = 2, kTanh = 3, kSigmoid = 4 };
enum class LossKind : int64_t { kMse = 0, kCrossEntropy = 1 };
// How inner learning rates are laid out: one scalar; one per (step, adapted layer) (MAML++);
// one per element of every adapted parameter (Meta-SGD).
enum class LrMode : int64_t { kScalar = 0, kPerLayerStep = 1, kPerParameter = 2 };

// h = act(a)
template <typename T>
inline T activate(Activation act, T a, T slope) {
  switch (act) {
    case Activation::kRelu:
      return a > T(0) ? a : T(0);
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

// d act / d a, from the pre-activation a and the output h.
template <typename T>
inline T activation_d1(Activation act, T a, T h, T slope) {
  switch (act) {
    case Activation::kRelu:
      return a > T(0) ? T(1) : T(0);
    case Activation::kLeakyRelu:
      return a > T(0) ? T(1) : slope;
    case Activation::kTanh:
      return T(1) - h * h;
    case Activation::kSigmoid:
      return h * (T(1) - h);
    default:
      return T(1);
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
