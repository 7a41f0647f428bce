// Every pymeta op schema, declared once. Kernels register per backend with TORCH_LIBRARY_IMPL
// (csrc/cpu, csrc/cuda); autograd and fake kernels are registered from Python (pymeta/_ops.py).
#include <torch/library.h>

TORCH_LIBRARY(pymeta, m) {
  // Task-batched multi-tensor inner update: out[i] = params[i] - lrs[i] * grads[i].
  // params[i], grads[i]: (T, ...). lrs: one tensor shared by all params, or one per param;
  // each of shape () (scalar), params[i].shape[1:] (per element, shared over tasks) or
  // params[i].shape (per task and element).
  m.def("sgd_update(Tensor[] params, Tensor[] grads, Tensor[] lrs) -> Tensor[]");
  // Backward of sgd_update with respect to grads and lrs (the params part is the identity):
  // grad_grads[i] = -lrs[i] * grad_outputs[i]; grad_lrs[j] = -sum(grads * grad_outputs) reduced
  // to lrs[j]'s shape (over every param that shares lrs[j]). grad_lrs is empty when
  // compute_lr_grad is false.
  m.def(
      "sgd_update_backward(Tensor[] grads, Tensor[] grad_outputs, Tensor[] lrs, "
      "bool compute_lr_grad) -> (Tensor[] grad_grads, Tensor[] grad_lrs)");
}
