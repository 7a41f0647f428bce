// One model-aware core call, checked once (net_maml_loss, net_adapt): the parsed network, the
// loss, the inner steps and tasks, and the learning-rate layout. The driver (net/maml_core.cpp)
// and the MLP fast path (net/mlp_fast_path.cpp) both read it; the rates are expanded to one per
// param and reduced back to the lrs' layout here, for both.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "net/codes.h"
#include "net/net.h"

namespace pymeta {

using Params = std::vector<at::Tensor>;  // one tensor per param; undefined = zero

// Everything the per-task pipeline reads, checked once.
struct NetProblem {
  Net net;
  LossKind loss;
  LrMode lr_mode;
  int64_t steps, tasks;
  std::vector<bool> adapted;  // per param
};

// Calls fn(layer, param index, k) for every adapted param in order; k counts them (the index
// of its rate in lr_mode 2).
template <typename F>
void for_each_adapted_param(const NetProblem& pb, const F& fn) {
  int64_t k = 0;
  for (const NetLayer& L : pb.net.layers) {
    if (!L.adapted) continue;
    for (int64_t p : {L.w_param, L.b_param}) {
      if (p >= 0) fn(L, p, k++);
    }
  }
}

NetProblem make_problem(const char* op, at::TensorList params, at::TensorList lrs, const at::Tensor& sx,
                        const at::Tensor& sy, const at::Tensor* qx, const at::Tensor* qy, at::IntArrayRef layers,
                        at::ArrayRef<double> layer_args, int64_t steps, int64_t lr_mode, int64_t loss);

// Rows of per-step quantities (learning rates, their gradients): one per inner step when the
// rates differ between steps (per_layer_step), otherwise a single row shared by all steps.
inline int64_t lr_rows(const NetProblem& pb) { return pb.lr_mode == LrMode::kPerLayerStep ? pb.steps : 1; }
inline int64_t lr_row(const NetProblem& pb, int64_t j) { return pb.lr_mode == LrMode::kPerLayerStep ? j : 0; }

// The rate of every adapted param, per lr row (0-dim or the param's shape); undefined elsewhere.
std::vector<Params> expand_lrs(const NetProblem& pb, at::TensorList params, at::TensorList lrs);

// Reduces d loss / d(rate of each param element), per lr row, to the lrs' layout.
std::vector<at::Tensor> reduce_lr_grads(const NetProblem& pb, at::TensorList lrs, const std::vector<Params>& d);

}  // namespace pymeta
