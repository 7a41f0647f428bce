// Fused CUDA kernels for the model-aware core's elementwise layers: batch norm's forward, backward
// and two R-operator rules (the contract of cpu/bn_tangent.h, one launch each where ATen runs
// 5-30 elementwise and reduction kernels), and the activations' derivative rules (one launch where
// tanh's tangent of the backward is ~10). Their ATen twins are the rules in net/layers.cpp, which
// run when these do not apply or are switched off (pymeta._C.set_cuda_fused_kernels); tests
// compare the two wherever CUDA is present (tests/test_cuda_kernels.py).
//
// Built only with PYMETA_WITH_CUDA. Batch norm's per-channel sums are taken in double, in a fixed
// order (one thread block per channel), so results do not depend on scheduling.
#pragma once

#include <ATen/core/Tensor.h>

#include "cpu/bn_tangent.h"
#include "net/codes.h"

namespace pymeta {

// Whether the batch-norm kernels take x: a CUDA float or double tensor (N, C, ...) that is
// contiguous (or 4-d channels-last), with elements. The other operands are brought to x's layout.
bool bn_cuda_applies(const at::Tensor& x);

at::Tensor bn_forward_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double eps, at::Tensor& mean,
                           at::Tensor& inv_std);
BnGrads bn_backward_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& inv_std, const at::Tensor& gy,
                         const at::Tensor& w, bool need_x);
at::Tensor bn_r_forward_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& inv_std,
                             const at::Tensor& rx, const at::Tensor& w, const at::Tensor& uw, const at::Tensor& ub,
                             at::Tensor& rxhat);
BnGrads bn_r_backward_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& inv_std,
                           const at::Tensor& gy, const at::Tensor& rgy, const at::Tensor& rx, const at::Tensor& rxhat,
                           const at::Tensor& w, const at::Tensor& uw, bool need_x);

// Whether the activation kernels take these operands: CUDA float or double tensors of one shape,
// all contiguous.
bool activation_cuda_applies(std::initializer_list<at::Tensor> operands);

// v * act'(a), with h = act(a) (activation_math.h: a may be h where its sign is a's).
at::Tensor activation_times_d1_cuda(Activation act, double slope, const at::Tensor& a, const at::Tensor& h,
                                    const at::Tensor& v);
// The tangent of the backward dL/da = gy * act'(a): rgy * act'(a) + act''(a) * ra * gy; rgy or
// ra may be undefined (zero), not both. act must be smooth (tanh, sigmoid) when ra is defined.
at::Tensor activation_r_backward_cuda(Activation act, double slope, const at::Tensor& a, const at::Tensor& h,
                                      const at::Tensor& gy, const at::Tensor& rgy, const at::Tensor& ra);

}  // namespace pymeta
