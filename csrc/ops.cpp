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

  // Model-aware MAML, the whole meta-step in one call: for every task, the inner loop on the
  // support set, the weighted query losses, and (compute_grads) the exact meta-gradient by a
  // reverse sweep over the inner steps with Hessian-vector products (R-operator). The network
  // is a graph of Linear, Conv2d, BatchNorm (batch statistics), activation, MaxPool2d,
  // AvgPool2d, Flatten, global average pooling, residual add and channel concat layers in
  // topological order (an MLP takes the CPU fast path, csrc/net/mlp_net.h).
  //   params: the parametric layers' weight, [bias], in layer order; shared by all tasks.
  //   lrs: lr_mode 0: [()]; 1: [(steps, n_adapted_layers)]; 2: one per adapted param, its shape.
  //   layers: per layer [kind, flag, adapted, input, input2, six ints] (csrc/net/net.h);
  //   layer_args: per layer (batch-norm eps or activation slope).
  //   support_x (T, K, ...), query_x (T, Q, ...); targets (T, K, ...) floats like the output
  //   for MSE (loss 0) or (T, K) int64 classes for cross-entropy (loss 1).
  //   step_weights (steps,): weight of the query loss after each inner step.
  // Returns the weighted query loss averaged over tasks, its gradient for each param (empty
  // unless compute_grads) and each lr (empty unless compute_lr_grads), and the per-task
  // weighted query losses (T,). Per-step batch-norm weights and biases carry a leading dim of
  // at least steps + 1: row j is used at inner step j, row steps by the query after the last
  // step. bn_stats (T, steps + 1, 2, C) holds the batch statistics each task's batch norm
  // layers normalised with, their channels concatenated in layer order (C in all; layers
  // ints[1] gives each layer's): [t, j, 0] the means and [t, j, 1] the unbiased variances, row
  // j < steps of the support at inner step j, row steps of the query after the last step (NaN
  // if its step weight is 0). Running statistics per step (MAML++) average them.
  m.def(
      "net_maml_loss(Tensor[] params, Tensor[] lrs, Tensor support_x, Tensor support_y, "
      "Tensor query_x, Tensor query_y, int[] layers, float[] layer_args, "
      "float[] step_weights, int lr_mode, int loss, bool first_order, bool compute_grads, "
      "bool compute_lr_grads) "
      "-> (Tensor loss, Tensor[] grad_params, Tensor[] grad_lrs, Tensor task_losses, Tensor bn_stats)");
  // One layer's rules on their own, for tests against autograd: layer is one row of
  // net_maml_loss's layers (its inputs read value 0), layer_arg its arg. Returns
  // [y, dL/dx, dL/dx2, dL/dw, dL/db] for gy = dL/dy, then the tangents along
  // (r_x, r_x2, r_weight, r_bias) and r_grad_y: [R{y}, R{dL/dx}, R{dL/dx2}, R{dL/dw}, R{dL/db}].
  // Absent inputs read as zero; absent outputs are zero tensors shaped like their input. tasks > 1
  // runs the rules task-batched (net/layers.h): values folded (N, tasks*C, ...), params (tasks, ...).
  m.def(
      "net_layer_rules(int[] layer, float layer_arg, Tensor x, Tensor? x2, Tensor? weight, "
      "Tensor? bias, Tensor grad_y, Tensor? r_x, Tensor? r_x2, Tensor? r_weight, Tensor? r_bias, "
      "Tensor? r_grad_y, int tasks=1) -> Tensor[]");
  // The core's per-task matrix product on its own, for tests (csrc/cpu/small_gemm_op.cpp):
  // op(a) op(b), plus c when given, with op a transpose where asked; row-major float32/float64.
  m.def("small_gemm(Tensor a, Tensor b, bool transpose_a, bool transpose_b, Tensor? c=None) -> Tensor");
  // The layered core's batched matrix product on its own, for tests (cpu/batched_gemm_op.cpp):
  // a (B, M, K) @ b (B, K, N), plus c (B, M, N) when given; any strides.
  m.def("batched_gemm(Tensor a, Tensor b, Tensor? c=None) -> Tensor");
  // The outer update of a compiled meta-step (csrc/optim/outer_step.cpp), in place: torch's
  // Adam (decoupled_weight_decay: AdamW) and SGD with momentum, in the operation order of their
  // single-tensor implementations, after clipping the grads (in place) to a total 2-norm of
  // max_grad_norm when it is > 0. steps: Adam's per-param step counts (0-dim). sgd_step's first:
  // the momentum buffers are new and take the first gradient.
  m.def(
      "adam_step(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] steps, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, bool decoupled_weight_decay, float max_grad_norm) -> ()");
  m.def(
      "sgd_step(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, float lr, "
      "float momentum, float dampening, float weight_decay, bool nesterov, bool first, "
      "float max_grad_norm) -> ()");
  // The inner loop alone (fast adaptation): per-task adapted params, each (T, *param.shape).
  m.def(
      "net_adapt(Tensor[] params, Tensor[] lrs, Tensor support_x, Tensor support_y, "
      "int[] layers, float[] layer_args, int steps, int lr_mode, int loss) -> Tensor[]");
}
