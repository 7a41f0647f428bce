// Per-layer rules of the layered model-aware core: forward, backward (vector-Jacobian), and the
// two R-operator passes (Pearlmutter) that a Hessian-vector product through the network needs.
// They are written with ATen ops, so they run on any device and dtype ATen supports, and with
// the convention that an undefined tensor is an exact zero (skipped, never materialised).
//
// The rules run T tasks at once, in the task-batched layout (T = 1 is one task):
// - a value is (N, T*C, ...): each task's channels (or features) side by side along dim 1, task
//   major, so batch norm with per-task statistics is batch norm over T*C channels, and
//   activations, pooling, residual adds and flattening need no change;
// - every param has a leading task dim: (T, ...); a convolution runs as one grouped convolution
//   (groups = T) with the weights folded to (T*O, C, kh, kw), a linear layer as a batched matrix
//   product over (T, N, F) views.
#pragma once

#include <ATen/core/Tensor.h>

#include "net/net.h"

namespace pymeta {

// (T, n, ...) -> (T*n, ...): a param's task dim folded into its first (a convolution's output
// channels, batch norm's channels); grads come back with unfold_tasks(g, param).
at::Tensor fold_tasks(const at::Tensor& p);
at::Tensor unfold_tasks(const at::Tensor& g, const at::Tensor& param);

// A value's tasks as a leading dim, (N, T*C, ...) -> (T, N, C, ...) (a view), and back (a view for
// one task, a copy for more).
at::Tensor task_major(const at::Tensor& v, int64_t tasks);
at::Tensor task_folded(const at::Tensor& v);

// What a layer's forward keeps for the passes after it. Batch norm: the batch mean and the
// inverse standard deviation (C each); max pooling: the argmax indices; tanh and sigmoid:
// their output.
struct LayerSaved {
  at::Tensor aux, inv_std;
};

// Gradients of one layer: with respect to its input (and second input x2 for add and concat)
// and its weight and bias.
struct LayerGrads {
  at::Tensor x, w, b, x2;
};

// y = layer(x; w, b), or layer(x, x2) for the two-input kinds (x2 is undefined for the others).
// w and b are undefined for layers without them; for per-step batch norm they are the current
// step's rows.
at::Tensor layer_forward(const NetLayer& L, int64_t tasks, const at::Tensor& x, const at::Tensor& x2,
                       const at::Tensor& w, const at::Tensor& b, LayerSaved& saved);

// Vector-Jacobian products of gy = dL/dy: dL/dx and dL/dx2 (only when need_x) and dL/dw, dL/db
// (only when need_w).
LayerGrads layer_backward(const NetLayer& L, int64_t tasks, const at::Tensor& x, const at::Tensor& w,
                        const at::Tensor& b, const LayerSaved& saved, const at::Tensor& gy,
                        bool need_x, bool need_w = true);

// Tangent of y along (rx, rx2, uw, ub), the tangents of x, x2, w and b. Batch norm keeps the
// tangent of x̂ in r_saved for r_backward.
at::Tensor layer_r_forward(const NetLayer& L, int64_t tasks, const at::Tensor& x, const at::Tensor& x2,
                         const at::Tensor& w, const LayerSaved& saved, const at::Tensor& rx,
                         const at::Tensor& rx2, const at::Tensor& uw, const at::Tensor& ub,
                         at::Tensor& r_saved);

// Tangent of the backward pass: given gy and its tangent rgy, the tangents of dL/dx and dL/dx2
// (only when need_x), dL/dw and dL/db along the same direction as r_forward. The two-input
// kinds are linear, so their rules need neither x2 nor its tangent.
LayerGrads layer_r_backward(const NetLayer& L, int64_t tasks, const at::Tensor& x, const at::Tensor& w,
                          const LayerSaved& saved, const at::Tensor& gy, const at::Tensor& rgy,
                          const at::Tensor& rx, const at::Tensor& uw, const at::Tensor& r_saved,
                          bool need_x);

}  // namespace pymeta
