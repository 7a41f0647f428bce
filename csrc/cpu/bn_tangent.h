// Batch norm (batch statistics) as fused CPU kernels: the forward and the backward, and the two
// R-operator rules, the tangent of the forward and the tangent of the backward, that every
// Hessian-vector product through a batch-norm layer runs (net/layers.cpp has the same formulas in
// ATen ops, and the derivation is in docs/model-aware.md). In ATen ops each R-rule is 15-30
// elementwise and reduction ops; here it is one pass of per-channel sums and one elementwise pass.
//
// Every per-channel sum is taken in double. ATen's channels-last batch norm sums in float32, one
// row after another: over a support set of 5 images of 28 x 28 its float32 mean is ~3e-6 off
// (relative), 50x worse than its default-layout kernel. With it the core's float32 meta-gradient
// was up to 3.4x further from float64 than a per-task autograd loop's, and flipped 10x more ReLU
// decisions in conv4 (docs/model-aware.md, tests/test_float32_accuracy.py).
//
// Notation per channel: x̂ = (x - mean) s with s = 1 / std; w, b the affine parameters (w = 1
// without them); rx, uw, ub the tangents of x, w, b (uw = ub = 0 for a frozen layer).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace pymeta {

// Whether the kernels take x: a CPU float or double tensor with the channels innermost in memory,
// (N, C) contiguous or (N, C, H, W) contiguous channels-last. The other operands are brought to
// x's layout.
bool bn_tangent_applies(const at::Tensor& x);

struct BnStats {
  std::vector<double> mean, inv_std;  // (C): the batch mean and 1 / sqrt(biased variance + eps)
};

// The batch statistics of x, from sums in double shifted by x's first row (so that a large mean
// does not cancel the variance).
BnStats bn_batch_stats(const at::Tensor& x, double eps);

// y = w x̂ + b (w, b may be undefined: no affine parameters), in x's layout; sets the batch mean
// and inverse standard deviation (C) that the other rules take.
at::Tensor bn_forward_fused(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double eps, at::Tensor& mean,
                            at::Tensor& inv_std);

struct BnGrads {
  at::Tensor x, w, b;  // (tangents of) dL/dx (only with need_x), dL/dw and dL/db (only with w)
};

// The vector-Jacobian product of the forward for gy = dL/dy; w may be undefined.
BnGrads bn_backward_fused(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& inv_std,
                          const at::Tensor& gy, const at::Tensor& w, bool need_x);

// The tangent ry of y = w x̂ + b along (rx, uw, ub); rx must be defined, w, uw and ub may be
// undefined (then ry = R{x̂}). Sets rxhat = R{x̂} = s (rx - mean(rx) - x̂ mean(x̂ rx)), which
// bn_r_backward_fused needs.
at::Tensor bn_r_forward_fused(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& inv_std,
                              const at::Tensor& rx, const at::Tensor& w, const at::Tensor& uw, const at::Tensor& ub,
                              at::Tensor& rxhat);

// The tangent of the backward pass at gy = dL/dy along rgy = R{gy} and (rx, uw): gy, rgy, rx and
// rxhat must be defined; w and uw may be undefined.
BnGrads bn_r_backward_fused(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& inv_std,
                            const at::Tensor& gy, const at::Tensor& rgy, const at::Tensor& rx,
                            const at::Tensor& rxhat, const at::Tensor& w, const at::Tensor& uw, bool need_x);

}  // namespace pymeta
