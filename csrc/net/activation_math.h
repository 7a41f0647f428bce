// Activations with their first and second derivatives, elementwise, with PyTorch's non-finite
// semantics: the formulas of the model-aware core's MLP fast path (cpu/mlp_elementwise.cpp,
// net/mlp_fast_path.cpp) and of its CUDA activation kernels (cuda/activation_kernel.cu).
#pragma once

#include <cmath>

#include "net/codes.h"

#ifdef __CUDACC__
#define PYMETA_HOST_DEVICE __host__ __device__
#else
#define PYMETA_HOST_DEVICE
#endif

namespace pymeta {

// h = act(a)
template <typename T>
PYMETA_HOST_DEVICE inline T activate(Activation act, T a, T slope) {
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
PYMETA_HOST_DEVICE inline T times_activation_d1(Activation act, T a, T h, T v, T slope) {
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
PYMETA_HOST_DEVICE inline T activation_d2(Activation act, T a, T h) {
  switch (act) {
    case Activation::kTanh:
      return T(-2) * h * (T(1) - h * h);
    case Activation::kSigmoid:
      return h * (T(1) - h) * (T(1) - T(2) * h);
    default:
      return T(0);
  }
}

PYMETA_HOST_DEVICE inline bool activation_is_piecewise_linear(Activation act) {
  return act == Activation::kNone || act == Activation::kRelu || act == Activation::kLeakyRelu;
}

}  // namespace pymeta
