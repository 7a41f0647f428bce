// Winograd convolutions on the CPU (Lavin & Gray 2016), F(2x2, 3x3) and F(4x4, 3x3): 3x3
// kernels, stride 1, padding 1, the T tasks of the model-aware core folded into the channels
// (groups = T, as in net/layers.cpp). The input's (m+2)x(m+2) tiles and the weights go to a
// transform domain of (m+2)^2 points, where the convolution is one matrix product per point and
// task (one BLAS batch), and back. Each m x m block of outputs costs (m+2)^2 multiply-adds per
// channel pair instead of 9 m^2: 2.25x fewer for F(2x2), 4x fewer for F(4x4), whose transforms
// also move fewer values per pixel but whose kernels have 36 points instead of 16 (it pays with
// many tiles per kernel). The weight gradient is the same computation's adjoint, so all three
// products of a convolution (forward, input and weight gradients) gain alike. Exact in exact
// arithmetic; in floating point its rounding differs from a direct convolution's: a few units in
// the last place for F(2x2), more for F(4x4), whose transforms have entries up to 8
// (docs/model-aware.md, "float32 accuracy"). net/layers.cpp takes the path and block that
// winograd_block_by_shape (below) gives.
#pragma once

#include <ATen/core/Tensor.h>

#include <initializer_list>
#include <utility>

namespace pymeta {

// One term (value, weight) of a sum of convolutions of the same geometry: a value
// (N, T*C, H, W) in the channels-last layout, and folded weights (T*O, C, 3, 3) in either layout.
// Undefined values or weights make the term zero.
using WinogradTerm = std::pair<const at::Tensor*, const at::Tensor*>;

// The output block size, 4 or 2, for a 3x3 convolution (stride 1, padding 1) of n images of h x w
// with c channels in and o out per task, or 0 where oneDNN's direct kernels are faster: from
// benchmarks/winograd_conv.py's per-shape table.
int winograd_block_by_shape(int64_t n, int64_t c, int64_t o, int64_t h, int64_t w);

// sum_i conv(x_i, w_i) + b (b: (T*O,) or undefined), channels-last (N, T*O, H, W); with
// `transposed`, sum_i conv_transpose(x_i, w_i), the input gradient of conv(., w_i) at output
// gradient x_i: (N, T*C, H, W). All terms in one batch of matrix products (their channels side
// by side). Output blocks of block x block (2 or 4). Undefined when no term is defined.
at::Tensor winograd_conv(std::initializer_list<WinogradTerm> terms, const at::Tensor& b, int64_t tasks,
                         bool transposed, int block);

// dL/dw of y = conv(x, w), summed over the pairs (gy_i, x_i) given as terms {&gy_i, &x_i}:
// folded (T*O, C, 3, 3) in w's layout (channels-last or contiguous), by output blocks of
// block x block (2 or 4). Undefined when no pair is.
at::Tensor winograd_conv_weight_grad(std::initializer_list<WinogradTerm> pairs, const at::Tensor& w,
                                     int64_t tasks, int block);

}  // namespace pymeta
