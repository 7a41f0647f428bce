// Winograd F(2x2, 3x3) convolutions on the CPU (Lavin & Gray 2016): 3x3 kernels, stride 1,
// padding 1, the T tasks of the model-aware core folded into the channels (groups = T, as in
// net/layers.cpp). Each 2x2 block of outputs costs 16 multiply-adds per channel pair instead of
// 36: the input's 4x4 tiles and the weights go to a 16-point transform domain, where the
// convolution is 16 matrix products per task (one BLAS batch), and back. The weight gradient is
// the same computation's adjoint, so all three products of a convolution (forward, input and
// weight gradients) take 2.25x fewer multiply-adds than oneDNN's direct kernels. Exact in exact
// arithmetic; in floating point its rounding differs from a direct convolution's by a few units
// in the last place. net/layers.cpp chooses it by shape (winograd_applies).
#pragma once

#include <ATen/core/Tensor.h>

#include <initializer_list>
#include <utility>

namespace pymeta {

// One term (value, weight) of a sum of convolutions of the same geometry: a value
// (N, T*C, H, W) in the channels-last layout, and folded weights (T*O, C, 3, 3) in either layout.
// Undefined values or weights make the term zero.
using WinogradTerm = std::pair<const at::Tensor*, const at::Tensor*>;

// sum_i conv(x_i, w_i) + b (b: (T*O,) or undefined), channels-last (N, T*O, H, W); with
// `transposed`, sum_i conv_transpose(x_i, w_i), the input gradient of conv(., w_i) at output
// gradient x_i: (N, T*C, H, W). All terms in one batch of matrix products (their channels side
// by side). Undefined when no term is defined.
at::Tensor winograd_conv(std::initializer_list<WinogradTerm> terms, const at::Tensor& b, int64_t tasks,
                         bool transposed);

// dL/dw of y = conv(x, w), summed over the pairs (gy_i, x_i) given as terms {&gy_i, &x_i}:
// folded (T*O, C, 3, 3) in w's layout (channels-last or contiguous). Undefined when no pair is.
at::Tensor winograd_conv_weight_grad(std::initializer_list<WinogradTerm> pairs, const at::Tensor& w,
                                     int64_t tasks);

}  // namespace pymeta
