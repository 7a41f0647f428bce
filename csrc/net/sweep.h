// The order of one task's meta-step after its inner loop, written once for both paths of the
// model-aware core (the per-layer driver, net/maml_core.cpp, and the MLP fast path,
// net/mlp_fast_path.cpp), which differ only in how they store parameters and activations.
//
// The task loss is sum_j w_j L_query(theta_j) over the inner steps j = 1..J with nonzero weight
// (the multi-step loss; w = (0, ..., 0, 1) for plain MAML). Its gradient goes backwards:
// v = dL/dtheta_J, then for j = J-1 down to 0, v_j = v_{j+1} - H_j (rate_j v_{j+1}) (second order)
// plus w_j dL_query/dtheta_j, with the learned rates' gradients -v_{j+1} g_j taken on the way.
#pragma once

#include <c10/util/ArrayRef.h>

#include <cstdint>

namespace pymeta {

// query_term(j, w): adds w * L_query(theta_j) to the task loss and, when computing gradients,
// w * its gradient to v. step_back(j): turns v_{j+1} into v_j's inner-step part (the rates'
// gradients and the Hessian term of inner step j). Without gradients only the losses run.
template <typename QueryTerm, typename StepBack>
void task_sweep(at::ArrayRef<double> step_weights, bool compute_grads, const QueryTerm& query_term,
                const StepBack& step_back) {
  const int64_t J = static_cast<int64_t>(step_weights.size());
  auto term = [&](int64_t j) {
    if (step_weights[j - 1] != 0.0) query_term(j, step_weights[j - 1]);
  };
  term(J);
  for (int64_t j = J - 1; j >= 0; --j) {
    if (compute_grads) step_back(j);
    if (j >= 1) term(j);
  }
}

}  // namespace pymeta
