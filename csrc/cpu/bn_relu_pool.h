// Batch norm (batch statistics) -> ReLU -> 2x2 max pooling with stride 2, as one CPU block: the
// tail of every conv4 block. ATen runs it layer by layer: about five full-size passes forward
// (statistics, normalise, ReLU, pool) and as many backward (with the pooling backward's zero
// fill), keeping the normalised and ReLU outputs. This block reads the batch-norm input twice
// forward (statistics, then normalise + pool + ReLU) and twice backward (per-channel sums, then
// dL/dx), and keeps only the pooled output and the argmax. The model-aware core uses it for passes
// that need no Hessian-vector product (query sets, first-order and adapt-only inner loops); the
// R-operator rules still run layer by layer (net/layers.cpp, cpu/bn_tangent.h).
#pragma once

#include <ATen/core/Tensor.h>

namespace pymeta {

// Whether the block takes x (the batch-norm input): a CPU float or double (N, C, H, W) tensor,
// contiguous channels-last, with H, W >= 2 and N * H * W >= 2.
bool bn_relu_pool_applies(const at::Tensor& x);

struct BnReluPoolSaved {
  at::Tensor mean, inv_std;  // (C): the batch statistics the normalisation used
  // (N, C, H / 2, W / 2) channels-last: the window position 0..3 (row-major) of each maximum, in
  // x's dtype so that every loop handles one element width (mixing uint8 in stops GCC vectorising).
  at::Tensor argmax;
};

// out = max_pool2d(relu(batch_norm(x; w, b, eps)), 2), channels-last (N, C, H / 2, W / 2). w and b
// (C) are undefined for batch norm without affine parameters.
at::Tensor bn_relu_pool_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double eps,
                                BnReluPoolSaved& saved);

struct BnReluPoolGrads {
  at::Tensor x, w, b;  // dL/dx (only when need_x), dL/dw and dL/db (only with affine parameters)
};

// The vector-Jacobian product of the block for gout = dL/d(out); `out` is what the forward
// returned (a pooled element passes gradient only when it is > 0, as ReLU does).
BnReluPoolGrads bn_relu_pool_backward(const at::Tensor& gout, const at::Tensor& x, const at::Tensor& w,
                                      const at::Tensor& out, const BnReluPoolSaved& saved, bool need_x);

}  // namespace pymeta
