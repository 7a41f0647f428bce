// The two R-operator rules of batch norm (batch statistics) as fused CPU kernels: the tangent of
// the forward, and the tangent of the backward, that every Hessian-vector product through a
// batch-norm layer runs (seq_layers.cpp has the same formulas in ATen ops, and the derivation
// is in docs/model-aware.md). In ATen ops each rule is 15-30 elementwise and reduction ops; here
// it is one pass of per-channel sums and one elementwise pass.
//
// Notation per channel: x̂ = (x - mean) s with s = 1 / std; w, b the affine parameters (w = 1
// without them); rx, uw, ub the tangents of x, w, b (uw = ub = 0 for a frozen layer).
#pragma once

#include <ATen/core/Tensor.h>

namespace pymeta {

// Whether the kernels take x: a CPU float or double tensor with the channels innermost in memory,
// (N, C) contiguous or (N, C, H, W) contiguous channels-last. The other operands are brought to
// x's layout.
bool bn_tangent_applies(const at::Tensor& x);

// The tangent ry of y = w x̂ + b along (rx, uw, ub); rx must be defined, w, uw and ub may be
// undefined (then ry = R{x̂}). Sets rxhat = R{x̂} = s (rx - mean(rx) - x̂ mean(x̂ rx)), which
// bn_r_backward_fused needs.
at::Tensor bn_r_forward_fused(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& inv_std,
                              const at::Tensor& rx, const at::Tensor& w, const at::Tensor& uw, const at::Tensor& ub,
                              at::Tensor& rxhat);

struct BnTangentGrads {
  at::Tensor x, w, b;  // tangents of dL/dx (only with need_x), dL/dw and dL/db (only with w)
};

// The tangent of the backward pass at gy = dL/dy along rgy = R{gy} and (rx, uw): gy, rgy, rx and
// rxhat must be defined; w and uw may be undefined.
BnTangentGrads bn_r_backward_fused(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& inv_std,
                                   const at::Tensor& gy, const at::Tensor& rgy, const at::Tensor& rx,
                                   const at::Tensor& rxhat, const at::Tensor& w, const at::Tensor& uw, bool need_x);

}  // namespace pymeta
