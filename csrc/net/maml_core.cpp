// The model-aware core's driver (net_maml_loss, net_adapt): MAML on a network of convolutions,
// batch norm, pooling, linear layers, activations, residual adds and concatenations (net/net.h).
// Each task runs its whole meta-step here (inner loop, query losses, and the exact meta-gradient
// by a reverse sweep with Hessian-vector products) without an autograd graph. Every call is
// checked once (net/problem.h); an MLP then takes the fast path of flat-buffer CPU kernels
// (net/mlp_net.h), any other network the layer rules of net/layers.cpp, which are ATen ops and
// bring the library's tuned convolution kernels: this file only orchestrates them.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <vector>

#include "core_settings.h"
#include "cpu/bn_relu_pool.h"
#include "cpu/workspace.h"
#include "net/layers.h"
#include "net/mlp_net.h"
#include "net/net.h"
#include "net/problem.h"
#include "net/sweep.h"

namespace pymeta {
namespace {

// One forward pass and what the backward and R-passes after it need. Values are indexed as in
// Net: vals[0] is the input, vals[l + 1] layer l's output, vals.back() the network's output.
struct NetPass {
  int64_t step = 0;                // inner step: selects per-step batch-norm rows
  std::vector<at::Tensor> vals;
  std::vector<LayerSaved> saved;   // per layer
  at::Tensor probs;                // softmax of the output (cross-entropy)
  std::vector<at::Tensor> grad_vals;  // dL/d(value), per value, kept for hvp()
  // fused[l]: layers l..l+2 (batch norm, ReLU, max pooling) ran as one block; the block keeps
  // the pooled output only, the statistics in saved[l] and the argmax in saved[l + 2].
  std::vector<bool> fused;
  std::vector<int64_t> bn_count;  // batch norm layers: values per channel they normalised over
  std::vector<bool> anchor;        // values a checkpointed replay keeps as restart points
  int64_t limit = -1;              // bytes a checkpointed pass holds (-1: not checkpointed)

  bool empty() const { return vals.empty(); }

  // Bytes of the tensors it holds (a value shared by two entries counts twice).
  int64_t bytes() const {
    int64_t n = probs.defined() ? static_cast<int64_t>(probs.nbytes()) : 0;
    for (const auto* list : {&vals, &grad_vals}) {
      for (const auto& t : *list) n += t.defined() ? static_cast<int64_t>(t.nbytes()) : 0;
    }
    for (const auto& s : saved) {
      for (const auto* t : {&s.aux, &s.inv_std}) n += t->defined() ? static_cast<int64_t>(t->nbytes()) : 0;
    }
    return n;
  }
};

// Which param gradients NetTask::backward() computes: every param's (the meta-gradient), the
// adapted ones' (an inner step), or none (a support pass recomputed only for hvp()).
enum class ParamGrads { kAll, kAdapted, kNone };

// A chunk of T tasks that run together in the task-batched layout (net/layers.h): params with a
// leading task dim, values with the tasks folded into dim 1. T = 1 is one task at a time.
class NetTask {
 public:
  NetTask(const Net& net, LossKind loss, int64_t tasks)
      : net_(net), loss_(loss), tasks_(tasks), block_start_(net.layers.size(), false) {
    const auto& layers = net.layers;
    for (size_t l = 0; l + 2 < layers.size(); ++l) {
      const NetLayer &bn = layers[l], &act = layers[l + 1], &pool = layers[l + 2];
      // A chain whose inner values nobody else reads: the block does not materialise them.
      const bool chain = act.input == static_cast<int64_t>(l) + 1 && pool.input == static_cast<int64_t>(l) + 2 &&
                         net.uses[l + 1] == 1 && net.uses[l + 2] == 1;
      block_start_[l] = chain && bn.kind == LayerKind::kBatchNorm && act.kind == LayerKind::kActivation &&
                        act.activation() == Activation::kRelu && pool.kind == LayerKind::kMaxPool2d &&
                        pool.ints == std::array<int64_t, kLayerNumInts>{2, 2, 2, 2, 0, 0};
    }
  }

  // The weight and bias layer L uses at inner step `step` (undefined when it has none).
  std::pair<at::Tensor, at::Tensor> layer_params(const Params& theta, const NetLayer& L, int64_t step) const {
    at::Tensor w, b;
    if (L.w_param >= 0) w = L.per_step ? theta[L.w_param].select(1, step) : theta[L.w_param];
    if (L.b_param >= 0) b = L.per_step ? theta[L.b_param].select(1, step) : theta[L.b_param];
    return {w, b};
  }

  // With `fuse`, batch norm -> ReLU -> 2x2 max pooling runs as one block where the CPU kernel
  // takes the input (cpu/bn_relu_pool.h); such a pass has no hvp(). With a checkpoint_limit >= 0
  // (a pass only differentiated once), values beyond that many bytes are freed as soon as their
  // forward readers are done (free_cheapest), except at cut points (values no later layer
  // reaches across); backward() recomputes them from a kept value below, a segment at a time.
  NetPass forward(const Params& theta, const at::Tensor& x, int64_t step, bool fuse,
                  int64_t checkpoint_limit = -1) const {
    const size_t n = net_.layers.size();
    NetPass pass;
    pass.step = step;
    pass.saved.resize(n);
    pass.fused.assign(n, false);
    pass.bn_count.assign(n, 0);
    pass.anchor.assign(n + 1, false);
    pass.vals.resize(n + 1);
    pass.vals[0] = x;
    pass.limit = checkpoint_limit;
    run_layers(pass, theta, 0, n, fuse, false);
    return pass;
  }

  // Each task's mean loss (T) of the pass's output against the targets y (T, N, ...); with
  // `grad`, also dL/d(output) of their sum (each task's own gradient).
  at::Tensor loss(NetPass& pass, const at::Tensor& y, bool grad) const {
    const at::Tensor& out = pass.vals.back();
    const at::Tensor per_task = task_major(out, tasks_);  // (T, N, ...)
    pass.grad_vals.assign(pass.vals.size(), at::Tensor());
    if (loss_ == LossKind::kMse) {
      const at::Tensor diff = per_task - y;
      if (grad) pass.grad_vals.back() = task_folded(diff * (2.0 / static_cast<double>(diff[0].numel())));
      return diff.square().flatten(1).mean(1);
    }
    // make_problem refused negative classes; the class count is known only here, from the output.
    const int64_t classes = per_task.size(-1);
    if (y.numel() > 0) {
      const int64_t hi = y.max().item<int64_t>();
      TORCH_CHECK_VALUE(hi < classes, "pymeta: support_y and query_y: expected classes in [0, ", classes,
                        ") for the network's ", classes, " outputs, received class ", hi);
    }
    const at::Tensor logp = per_task.log_softmax(-1);
    const at::Tensor picked = logp.gather(-1, y.unsqueeze(-1));
    if (grad) {
      pass.probs = logp.exp();
      at::Tensor g = pass.probs.clone();
      g.scatter_add_(-1, y.unsqueeze(-1), at::full_like(picked, -1));
      pass.grad_vals.back() = task_folded(g.div_(static_cast<double>(per_task.size(1))));
    }
    return -picked.flatten(1).mean(1);
  }

  // Gradients of the params that `want` names (others stay undefined). keep: the pass keeps
  // dL/d(value) of every value after any param, for hvp().
  Params backward(NetPass& pass, const Params& theta, ParamGrads want, bool keep) const {
    TORCH_CHECK(keep || want != ParamGrads::kNone, "pymeta: internal error: a backward() that computes nothing");
    const std::vector<bool>& needed = keep || want == ParamGrads::kAll ? net_.after_param : net_.after_adapted;
    Params grads(theta.size());
    std::vector<at::Tensor>& gv = pass.grad_vals;
    for (int64_t l = static_cast<int64_t>(net_.layers.size()) - 1; l >= 0; --l) {
      const at::Tensor gy = gv[l + 1];
      if (!gy.defined()) continue;  // no parameter it depends on is needed
      restore_inputs(pass, theta, l, l >= 2 && pass.fused[l - 2]);
      if (l >= 2 && pass.fused[l - 2]) {  // the end of a fused block: back to its batch norm's input
        const int64_t bn = l - 2;         // ReLU and pooling have no parameters
        const NetLayer& L = net_.layers[bn];
        TORCH_CHECK(!keep, "pymeta: internal error: a fused pass cannot keep its gradients for hvp()");
        auto [w, b] = layer_params(theta, L, pass.step);
        const BnReluPoolSaved s{pass.saved[bn].aux, pass.saved[bn].inv_std, pass.saved[l].aux};
        const bool need_x = needed[L.input];
        BnReluPoolGrads g = bn_relu_pool_backward(gy, pass.vals[L.input], fold_tasks(w), pass.vals[l + 1], s, need_x);
        if (L.w_param >= 0) grads[L.w_param] = place(theta[L.w_param], L, pass.step, unfold_tasks(g.w, w));
        if (L.b_param >= 0) grads[L.b_param] = place(theta[L.b_param], L, pass.step, unfold_tasks(g.b, w));
        if (need_x) add_to(gv[L.input], g.x);
        if (!keep) release(pass, l + 1);
        l = bn;
        continue;
      }
      const NetLayer& L = net_.layers[l];
      auto [w, b] = layer_params(theta, L, pass.step);
      const bool need_x = needed[L.input] || (L.input2 >= 0 && needed[L.input2]);
      const bool need_w = want == ParamGrads::kAll || (want == ParamGrads::kAdapted && L.adapted);
      LayerGrads g = layer_backward(L, tasks_, pass.vals[L.input], w, b, saved_of(pass, l), gy, need_x, need_w);
      if (L.w_param >= 0 && need_w) grads[L.w_param] = place(theta[L.w_param], L, pass.step, g.w);
      if (L.b_param >= 0 && need_w) grads[L.b_param] = place(theta[L.b_param], L, pass.step, g.b);
      if (needed[L.input]) add_to(gv[L.input], g.x);
      if (L.input2 >= 0 && needed[L.input2]) add_to(gv[L.input2], g.x2);
      if (!keep) release(pass, l + 1);
    }
    if (!keep) gv.clear();
    return grads;
  }

  // H u: the Hessian of the pass's loss at theta applied to u (undefined entries are zero), by
  // forward-over-reverse differentiation. Needs forward(), loss(grad) and backward(keep).
  Params hvp(const NetPass& pass, const Params& theta, const Params& u) const {
    const size_t n = net_.layers.size();
    for (size_t l = 0; l < n; ++l) TORCH_CHECK(!pass.fused[l], "pymeta: internal error: hvp() of a fused pass");
    std::vector<at::Tensor> r_val(n + 1), r_saved(n);  // tangents of each value
    for (size_t l = 0; l < n; ++l) {
      const NetLayer& L = net_.layers[l];
      auto [w, b] = layer_params(theta, L, pass.step);
      auto [uw, ub] = direction(u, L, pass.step);
      const bool two = L.input2 >= 0;
      r_val[l + 1] = layer_r_forward(L, tasks_, pass.vals[L.input], two ? pass.vals[L.input2] : at::Tensor(), w,
                                   saved_of(pass, l), r_val[L.input], two ? r_val[L.input2] : at::Tensor(), uw,
                                   ub, r_saved[l]);
    }
    // The loss Hessian applied to the output tangent.
    std::vector<at::Tensor> rg(n + 1);  // tangents of dL/d(value)
    const at::Tensor& r_out = r_val[n];
    if (r_out.defined()) {
      const at::Tensor& out = pass.vals.back();
      if (loss_ == LossKind::kMse) {
        rg[n] = r_out * (2.0 / static_cast<double>(out.numel() / tasks_));
      } else {
        const at::Tensor& p = pass.probs;  // (T, N, classes)
        const at::Tensor r = task_major(r_out, tasks_);
        rg[n] = task_folded((p * (r - (p * r).sum(-1, true))).div_(static_cast<double>(out.size(0))));
      }
    }
    const std::vector<bool>& needed = net_.after_param;
    Params hu(theta.size());
    for (int64_t l = static_cast<int64_t>(n) - 1; l >= 0; --l) {
      const at::Tensor& gy = pass.grad_vals[l + 1];
      if (!gy.defined()) continue;
      const NetLayer& L = net_.layers[l];
      auto [w, b] = layer_params(theta, L, pass.step);
      auto [uw, ub] = direction(u, L, pass.step);
      const bool need_x = needed[L.input] || (L.input2 >= 0 && needed[L.input2]);
      LayerGrads r = layer_r_backward(L, tasks_, pass.vals[L.input], w, saved_of(pass, l), gy, rg[l + 1],
                                      r_val[L.input], uw, r_saved[l], need_x);
      if (L.w_param >= 0 && r.w.defined()) hu[L.w_param] = place(theta[L.w_param], L, pass.step, r.w);
      if (L.b_param >= 0 && r.b.defined()) hu[L.b_param] = place(theta[L.b_param], L, pass.step, r.b);
      if (needed[L.input]) add_to(rg[L.input], r.x);
      if (L.input2 >= 0 && needed[L.input2]) add_to(rg[L.input2], r.x2);
      // Every reader of value l + 1 (a later layer) is done with its tangents.
      r_val[l + 1] = at::Tensor();
      rg[l + 1] = at::Tensor();
    }
    return hu;
  }

 private:
  // Runs layers [from, to) of the pass's forward. replay: recompute them as the pass first ran
  // them (its fused blocks), for backward(); a checkpointed pass: see forward().
  void run_layers(NetPass& pass, const Params& theta, size_t from, size_t to, bool fuse, bool replay) const {
    // A replay for backward() holds a quarter of the limit: the values of one long segment
    // (a residual block, whose shortcut reaches across it) then need not be alive at once.
    const bool checkpoint = pass.limit >= 0;
    const int64_t limit = pass.limit / (replay ? 4 : 1);
    int64_t held = 0;
    for (size_t l = from; l < to; ++l) {
      const NetLayer& L = net_.layers[l];
      auto [w, b] = layer_params(theta, L, pass.step);
      const at::Tensor& in = pass.vals[L.input];
      const bool fused = replay ? pass.fused[l]
                                : fuse && block_start_[l] && cpu_fused_kernels() && bn_relu_pool_applies(in) &&
                                      in.size(1) == tasks_ * L.ints[kBnChannelsInt];
      if (fused) {
        BnReluPoolSaved s;
        pass.vals[l + 3] = bn_relu_pool_forward(in, fold_tasks(w), fold_tasks(b), L.arg, s);
        pass.saved[l] = {s.mean, s.inv_std};
        pass.saved[l + 2].aux = s.argmax;
        pass.bn_count[l] = in.numel() / in.size(1);
        pass.fused[l] = true;
        held += static_cast<int64_t>(pass.vals[l + 3].nbytes());
        l += 2;
      } else {
        const at::Tensor in2 = L.input2 >= 0 ? pass.vals[L.input2] : at::Tensor();
        if (L.kind == LayerKind::kBatchNorm) pass.bn_count[l] = in.numel() / in.size(1);
        pass.vals[l + 1] = layer_forward(L, tasks_, in, in2, w, b, pass.saved[l]);
        // An activation's rules read its output: the value itself (saved_of), not a second
        // reference that would keep it alive after a checkpointed forward frees it.
        if (L.kind == LayerKind::kActivation) pass.saved[l].aux = at::Tensor();
        held += static_cast<int64_t>(pass.vals[l + 1].nbytes());
        // Inputs no later rule reads (e.g. a batch norm's output, read by a ReLU that keeps its
        // own output): freed now, not at the end of the pass.
        for (int64_t v : {L.input, L.input2}) {
          if (v > 0 && net_.last_reader[v] == static_cast<int64_t>(l) && !net_.read_later[v]) {
            held -= static_cast<int64_t>(pass.vals[v].nbytes());
            pass.vals[v] = at::Tensor();
          }
        }
      }
      if (checkpoint && held > limit && !(replay && l + 1 == to)) {
        if (replay) {
          // Done with in this replay; the output (l + 1) stays and becomes a restart point for
          // the next one (the last layer's inputs stay: backward() reads them next).
          for (size_t v = from + 1; v <= l; ++v) {
            if (freeable(pass, v, l)) held -= release_value(pass, v);
          }
          pass.anchor[l + 1] = true;
        } else {
          free_cheapest(pass, l, limit, held);
        }
      }
    }
  }

  // Value v is freeable after layer l of a checkpointed forward: no later forward layer reads it,
  // and it is no restart point (a cut or a replay's anchor).
  bool freeable(const NetPass& pass, size_t v, size_t l) const {
    return pass.vals[v].defined() && !net_.cut[v] && !pass.anchor[v] && net_.last_reader[v] <= static_cast<int64_t>(l);
  }

  static int64_t release_value(NetPass& pass, size_t v) {
    const auto bytes = static_cast<int64_t>(pass.vals[v].nbytes());
    pass.vals[v] = at::Tensor();
    return bytes;
  }

  // A first forward over the limit after layer l frees values until it holds no more than the
  // limit: first those that elementwise layers made (batch norm, activations, adds, pooling:
  // backward() gets them back from a kept input below by a pass over memory), then convolution
  // and linear outputs, earliest first (usually the fewest input channels: the least arithmetic
  // per byte to recompute).
  void free_cheapest(NetPass& pass, size_t l, int64_t limit, int64_t& held) const {
    for (const bool products : {false, true}) {
      for (size_t v = 1; v <= l && held > limit; ++v) {
        const LayerKind kind = net_.layers[v - 1].kind;
        if ((kind == LayerKind::kConv2d || kind == LayerKind::kLinear) == products && freeable(pass, v, l)) {
          held -= release_value(pass, v);
        }
      }
    }
  }

  // What layer l's rules read from its forward; an activation's output is its value.
  LayerSaved saved_of(const NetPass& pass, int64_t l) const {
    LayerSaved s = pass.saved[l];
    if (net_.layers[l].kind == LayerKind::kActivation) s.aux = pass.vals[l + 1];
    return s;
  }

  // Before layer l's backward: when a value it reads was freed by a checkpointed forward, runs
  // the layers from the nearest kept value below again: through l when its rules read its own
  // output (an activation, a fused block), else up to its inputs.
  void restore_inputs(NetPass& pass, const Params& theta, int64_t l, bool fused_end) const {
    const int64_t first = fused_end ? l - 2 : l;
    const NetLayer& L = net_.layers[first];
    const bool own = (fused_end || L.kind == LayerKind::kActivation) && !pass.vals[l + 1].defined();
    bool missing = own;
    for (int64_t v : {L.input, L.input2}) {
      if (v >= 0 && (fused_end || L.reads_input_later()) && !pass.vals[v].defined()) missing = true;
    }
    if (!missing) return;
    const int64_t to = own ? l + 1 : first;
    // The nearest value below from which layers c..to-1 can run again: defined, with every
    // earlier value they read defined too (value 0, the input, always is).
    int64_t c = std::min(L.input, L.input2 >= 0 ? L.input2 : L.input);
    while (!restartable(pass, c, to - 1)) --c;
    recomputed_layers().fetch_add(to - c);
    run_layers(pass, theta, c, to, false, true);
  }

  bool restartable(const NetPass& pass, int64_t c, int64_t l) const {
    if (!pass.vals[c].defined()) return false;
    for (int64_t k = c; k <= l; ++k) {
      const NetLayer& K = net_.layers[k];
      for (int64_t v : {K.input, K.input2}) {
        if (v >= 0 && v < c && !pass.vals[v].defined()) return false;
      }
    }
    return true;
  }

  // Value v (the output of layer v - 1) once the reverse pass has gone below its producer: every
  // reader of it is a later layer, done. Frees it and its gradient (less peak memory).
  static void release(NetPass& pass, int64_t v) {
    pass.vals[v] = at::Tensor();
    pass.grad_vals[v] = at::Tensor();
    pass.anchor[v] = false;
  }

  // acc += t, undefined meaning zero. Out of place: a gradient may be shared (an add passes
  // its output's gradient to both inputs) or kept by the pass for hvp().
  static void add_to(at::Tensor& acc, const at::Tensor& t) {
    if (!t.defined()) return;
    acc = acc.defined() ? acc + t : t;
  }

  // A per-step param's gradient (T, steps + 1, C) is zero outside the step's row.
  static at::Tensor place(const at::Tensor& param, const NetLayer& L, int64_t step, const at::Tensor& g) {
    if (!L.per_step || !g.defined()) return g;
    at::Tensor full = at::zeros_like(param);
    full.select(1, step).copy_(g);
    return full;
  }

  // The HVP direction restricted to layer L (only adapted layers have one).
  static std::pair<at::Tensor, at::Tensor> direction(const Params& u, const NetLayer& L, int64_t step) {
    if (!L.adapted) return {};
    return {L.w_param >= 0 ? u[L.w_param] : at::Tensor(), L.b_param >= 0 ? u[L.b_param] : at::Tensor()};
  }

  const Net& net_;
  LossKind loss_;
  int64_t tasks_;
  std::vector<bool> block_start_;  // layer l starts a batch norm -> ReLU -> 2x2 max pooling block
};

// The fused inner-update op, pymeta::sgd_update (csrc/ops.cpp), through the dispatcher: each
// backend's kernel (csrc/cpu/, csrc/cuda/).
std::vector<at::Tensor> sgd_update_op(at::TensorList params, at::TensorList grads, at::TensorList lrs) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pymeta::sgd_update", "")
                             .typed<std::vector<at::Tensor>(at::TensorList, at::TensorList, at::TensorList)>();
  return op.call(params, grads, lrs);
}

// acc[i] += scale * t[i] for the defined entries.
void add_scaled(Params& acc, const Params& t, double scale) {
  for (size_t i = 0; i < t.size(); ++i) {
    if (!t[i].defined()) continue;
    if (!acc[i].defined()) {
      acc[i] = t[i] * scale;
    } else {
      acc[i].add_(t[i], scale);
    }
  }
}

// Writes the batch statistics of every batch norm layer in `pass` into out (T, 2, bn_channels):
// per task, row 0 the mean, row 1 the unbiased variance (what nn.BatchNorm's running_var averages).
void record_bn_stats(const Net& net, const NetPass& pass, at::Tensor out) {
  const int64_t tasks = out.size(0);
  for (size_t l = 0; l < net.layers.size(); ++l) {
    const NetLayer& L = net.layers[l];
    if (L.kind != LayerKind::kBatchNorm) continue;
    const double n = static_cast<double>(pass.bn_count[l]);
    // The forward kept 1 / sqrt(biased variance + eps).
    at::Tensor var = (pass.saved[l].inv_std.pow(-2) - L.arg).clamp_min_(0.0);
    if (n > 1) var.mul_(n / (n - 1));
    const int64_t channels = L.ints[kBnChannelsInt];
    out.select(1, 0).narrow(1, L.stats_offset, channels).copy_(pass.saved[l].aux.view({tasks, channels}));
    out.select(1, 1).narrow(1, L.stats_offset, channels).copy_(var.view({tasks, channels}));
  }
}

// One task's inner loop, and the iterates, support passes and gradients its reverse sweep reads.
// Kept for the sweep, within activation_cache_limit() bytes: the parameter iterates theta_j
// (a quarter of the limit, evenly spread; theta_0 and theta_J always) and the support passes (a
// second-order sweep's; half the limit), or only iterates, within the whole limit, when no pass
// fits in half. An iterate not kept is recomputed from the nearest kept one by running the inner
// steps again, a pass not kept by one forward and backward: memory then grows with the inner
// steps by the kept part only (at few shots an iterate is as big as a pass), at the price of
// that arithmetic. A step that the sweep runs again to recompute an iterate yields its support
// pass too, so the passes kept are those of steps it does not run again (theta_{j+1} kept), the
// highest first: the sweep reads and frees them first.
class InnerLoop {
 public:
  InnerLoop(const NetProblem& pb, const NetTask& task, const std::vector<Params>& lr, const at::Tensor& sx,
            const at::Tensor& sy)
      : pb_(pb), task_(task), lr_(lr), sx_(sx), sy_(sy) {}

  // Runs the steps from theta0. sweep: keep support passes for a second-order sweep;
  // keep_grads: keep each step's support gradient (learned rates); iterates: keep iterates for
  // later theta(j) calls (off: only theta_J is wanted, as by adapt). bn_stats (T, steps + 1, 2,
  // C), when defined, gets the support's batch statistics of step j in row j.
  void run(const Params& theta0, bool sweep, bool keep_grads, bool iterates, const at::Tensor& bn_stats) {
    const int64_t J = pb_.steps, limit = activation_cache_limit().load();
    int64_t iterate_bytes = 0;
    for (size_t p = 0; p < theta0.size(); ++p) {
      if (pb_.adapted[p]) iterate_bytes += static_cast<int64_t>(theta0[p].nbytes());  // frozen: shared
    }
    theta_.assign(J + 1, Params());
    theta_[0] = theta0;
    int64_t stride = 1;  // keep theta_j for j a multiple of it
    keep_from_ = J;
    auto next_kept = [&](int64_t j) { return j + 1 == J || (iterates && (j + 1) % stride == 0); };
    auto pass_kept = [&](int64_t j) { return j >= keep_from_ && next_kept(j); };
    Params cur = theta0;
    for (int64_t j = 0; j < J; ++j) {
      // Step 0's pass is kept differentiable, to measure what a kept pass takes. Kept passes are
      // differentiated again by the sweep, through every layer (no fused blocks); others run the
      // fused blocks.
      const bool keep = sweep && (j == 0 || pass_kept(j));
      NetPass pass;
      Params g;
      cur = step(cur, j, keep, pass, g, bn_stats.defined() ? bn_stats.select(1, j) : at::Tensor());
      if (j == 0) {
        const int64_t pass_bytes = std::max<int64_t>(pass.bytes(), 1), pass_limit = limit / 2;
        if (iterates && J > 1) {
          // The ones kept are spread evenly, so that the sweep recomputes fewer than `stride`
          // steps per iterate.
          const int64_t budget = pass_bytes > pass_limit ? limit : limit / 4;  // 0: keep none
          const int64_t fit = iterate_bytes > 0 ? budget / iterate_bytes : J;
          stride = fit >= J - 1 ? 1 : (J + fit) / (fit + 1);
        }
        // As many passes as fit in half the limit, of the highest steps not run again.
        for (int64_t n = pass_limit / pass_bytes; n > 0 && keep_from_ > 0;) {
          if (next_kept(--keep_from_)) --n;
        }
      }
      if (next_kept(j)) theta_[j + 1] = cur;
      if (sweep) passes_.push_back(pass_kept(j) ? std::move(pass) : NetPass());
      if (keep_grads) grads_.push_back(std::move(g));
    }
  }

  // theta_j, recomputed from the nearest kept iterate below when it was not kept. The last step
  // run again is step j - 1, whose support pass the sweep reads next: kept (differentiable) when
  // the inner loop did not keep it and a pass fits the limit (the inner loop keeps one: step
  // J - 1 never runs again), so that it is not computed a second time. When none fits, these
  // runs keep none either: the sweep holds at most one pass more than the inner loop keeps.
  const Params& theta(int64_t j) {
    if (!theta_[j].empty()) return theta_[j];
    int64_t i = j;
    while (theta_[i].empty()) --i;
    sweep_recomputed_steps().fetch_add(j - i);
    Params cur = theta_[i];
    for (; i < j; ++i) {
      const bool keep =
          keep_from_ < pb_.steps && i + 1 == j && static_cast<size_t>(i) < passes_.size() && passes_[i].empty();
      NetPass pass;
      Params unused_grad;
      cur = step(cur, i, keep, pass, unused_grad, at::Tensor());
      if (keep) passes_[i] = std::move(pass);
    }
    theta_[j] = std::move(cur);  // the sweep asks for each j twice; release_after frees it
    return theta_[j];
  }

  // The sweep is past step j: frees the iterates above it (less memory for the rest).
  void release_after(int64_t j) {
    for (size_t k = static_cast<size_t>(j) + 1; k < theta_.size(); ++k) theta_[k] = Params();
  }

  // Step j's kept support pass, or an empty one (the caller recomputes it).
  NetPass take_pass(int64_t j) { return std::move(passes_[j]); }
  const Params& grad(int64_t j) const { return grads_[j]; }

 private:
  // One inner step at theta = cur: the next iterate; the support pass (kept, differentiable
  // again, when keep) and gradient through the out-parameters.
  Params step(const Params& cur, int64_t j, bool keep, NetPass& pass, Params& g, const at::Tensor& stats_row) const {
    pass = task_.forward(cur, sx_, j, !keep, keep ? -1 : activation_cache_limit().load());
    if (stats_row.defined()) record_bn_stats(pb_.net, pass, stats_row);
    task_.loss(pass, sy_, true);
    g = task_.backward(pass, cur, ParamGrads::kAdapted, keep);
    Params next = cur;  // frozen params are shared, not copied
    const Params& rate = lr_[lr_row(pb_, j)];
    std::vector<at::Tensor> params, grads, rates;
    std::vector<size_t> which;
    for (size_t p = 0; p < cur.size(); ++p) {
      if (!pb_.adapted[p]) continue;
      TORCH_CHECK(g[p].defined(), "pymeta: internal error: no inner gradient for adapted param ", p);
      params.push_back(cur[p]);
      grads.push_back(g[p]);
      rates.push_back(rate[p]);
      which.push_back(p);
    }
    // theta - rate * g for every adapted param in one call of the fused update op (one kernel
    // for all of them on CUDA; the same arithmetic as the ATen expression).
    std::vector<at::Tensor> updated = sgd_update_op(params, grads, rates);
    for (size_t k = 0; k < which.size(); ++k) next[which[k]] = std::move(updated[k]);
    return next;
  }

  const NetProblem& pb_;
  const NetTask& task_;
  const std::vector<Params>& lr_;
  const at::Tensor sx_, sy_;
  std::vector<Params> theta_;  // an empty entry: not kept
  std::vector<NetPass> passes_;
  std::vector<Params> grads_;
  int64_t keep_from_ = 0;  // run() keeps the passes of steps >= it whose next iterate is kept
};

// Image batches go through the network channels-last (N, H, W, C in memory) on the CPU: oneDNN
// convolutions then run without reordering, and per-channel loops (ATen's and the fused kernels')
// run over contiguous channels; the default layout makes conv4's 1-channel first convolution and
// its 2x2 max pooling several times slower (benchmarks/omniglot_step.py's pymeta_aware_aten row).
// Results are the same; only the strides differ. Convolution weights (4-D) go channels-last too.
// A tensor with one channel is already "contiguous" in both layouts, so the strides are set
// explicitly: ATen picks the layout of a convolution's output from them.
at::Tensor network_layout(const at::Tensor& x) {
  if (x.dim() != 4 || !x.is_cpu() || !cpu_channels_last()) return x;
  return x.clone(at::MemoryFormat::ChannelsLast);
}

// The MLP fast path's network when it takes this call: an MLP chain, float32 or float64, on the
// CPU, with the path switched on.
std::optional<MlpNet> fast_path_mlp(const NetProblem& pb, at::TensorList params, const at::Tensor& x) {
  const auto dtype = params[0].scalar_type();
  if (!x.is_cpu() || !mlp_fast_path() || (dtype != at::kFloat && dtype != at::kDouble)) return std::nullopt;
  return mlp_net_of(pb.net, params);
}

// The params for a chunk of T tasks (net/layers.h): a leading task dim, in the network's layout;
// a view for one task, T copies for more (each task's weights are adapted on their own, and a
// grouped convolution reads them folded, so 4-D weights are laid out folded).
Params batched_params(at::TensorList params, int64_t tasks) {
  Params out;
  for (const auto& param : params) {
    const at::Tensor p = network_layout(param.detach());
    if (tasks == 1) {
      out.push_back(p.unsqueeze(0));
    } else if (p.dim() == 4) {
      at::Tensor folded = at::empty({tasks * p.size(0), p.size(1), p.size(2), p.size(3)},
                                    p.options().memory_format(p.suggest_memory_format()));
      at::Tensor per_task = folded.unflatten(0, {tasks, p.size(0)});
      per_task.copy_(p.unsqueeze(0).expand_as(per_task));
      out.push_back(per_task);
    } else {
      std::vector<int64_t> shape{tasks};
      shape.insert(shape.end(), p.sizes().begin(), p.sizes().end());
      out.push_back(p.unsqueeze(0).expand(shape).contiguous());
    }
  }
  return out;
}

// Tasks t0 .. t0 + T - 1 of a (tasks, N, ...) input in the network's layout: (N, T*C, ...).
at::Tensor chunk_input(const at::Tensor& x, int64_t t0, int64_t tasks) {
  return network_layout(x.narrow(0, t0, tasks).transpose(0, 1).flatten(1, 2));
}

// How many tasks run together (net/layers.h): task_batch() when set, otherwise all of them, but
// for convolutional networks on the CPU one at a time. Measured there (benchmarks/
// task_batched.py, docs/model-aware.md "Task-batched execution"): oneDNN's grouped convolutions
// are slower than one convolution per task and the activations of every task are alive at once
// (conv4, 32 tasks: 0.60x the time of one at a time, 20x the memory), while batching an MLP
// replaces many small matrix products with a few larger ones (sinusoid, 25 tasks: 5.3x). On a
// GPU one task's small kernels leave it idle.
int64_t tasks_per_chunk(const NetProblem& pb, const at::Tensor& x) {
  const int64_t set = task_batch().load();
  if (set > 0) return std::min(set, pb.tasks);
  const bool convolutional = std::any_of(pb.net.layers.begin(), pb.net.layers.end(),
                                         [](const NetLayer& L) { return L.kind == LayerKind::kConv2d; });
  return x.is_cpu() && convolutional ? 1 : pb.tasks;
}

// Sum over a chunk's tasks of per-task tensors (T, ...): acc[i] += sum_t t[i][t].
void add_task_sum(Params& acc, const Params& t) {
  for (size_t i = 0; i < t.size(); ++i) {
    if (!t[i].defined()) continue;
    const at::Tensor s = t[i].sum(0);
    acc[i] = acc[i].defined() ? acc[i].add_(s) : s;
  }
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor> net_maml_loss_kernel(
    at::TensorList params, at::TensorList lrs, const at::Tensor& support_x, const at::Tensor& support_y,
    const at::Tensor& query_x, const at::Tensor& query_y, at::IntArrayRef layers, at::ArrayRef<double> layer_args,
    at::ArrayRef<double> step_weights, int64_t lr_mode, int64_t loss, bool first_order, bool compute_grads,
    bool compute_lr_grads) {
  constexpr const char* op = "pymeta::net_maml_loss";
  const int64_t J = static_cast<int64_t>(step_weights.size());
  const NetProblem pb = make_problem(op, params, lrs, support_x, support_y, &query_x, &query_y, layers, layer_args,
                                     J, lr_mode, loss);
  if (auto mlp = fast_path_mlp(pb, params, support_x)) {
    return mlp_maml_loss_fast(pb, std::move(*mlp), params, lrs, support_x, support_y, query_x, query_y, step_weights,
                              first_order, compute_grads, compute_lr_grads);
  }
  std::optional<WorkspaceScope> workspace;  // CPU: activations freed by one task serve the next
  if (support_x.is_cpu()) workspace.emplace();
  compute_lr_grads = compute_lr_grads && compute_grads;
  const bool second_order = compute_grads && !first_order;
  const std::vector<Params> lr = expand_lrs(pb, params, lrs);
  at::Tensor task_losses = at::zeros({pb.tasks}, params[0].options());
  Params grad_acc(params.size());
  std::vector<Params> lr_acc(lr_rows(pb), Params(params.size()));
  // Row j: the support's batch statistics at inner step j; row J: the query's after the last
  // step (NaN while a zero step weight skips that query pass).
  at::Tensor bn_stats = at::full({pb.tasks, J + 1, 2, pb.net.bn_channels},
                                 std::numeric_limits<double>::quiet_NaN(), params[0].options());
  // Chunks run one after another, each op on ATen's intra-op threads. Spreading tasks over
  // threads instead would call oneDNN convolutions inside an OpenMP parallel region, where its
  // backward-weights kernels wait on a barrier for threads that never come (they hang).
  const int64_t chunk = tasks_per_chunk(pb, support_x);
  Params theta0;
  for (int64_t t0 = 0; t0 < pb.tasks; t0 += chunk) {
    const int64_t T = std::min(chunk, pb.tasks - t0);
    if (theta0.empty() || theta0[0].size(0) != T) theta0 = batched_params(params, T);
    const NetTask task(pb.net, pb.loss, T);
    const at::Tensor sx = chunk_input(support_x, t0, T), sy = support_y.narrow(0, t0, T);
    const at::Tensor qx = chunk_input(query_x, t0, T), qy = query_y.narrow(0, t0, T);
    // The sweep reads each step's support pass (second order) and gradient (learned rates).
    const at::Tensor task_stats = pb.net.bn_channels > 0 ? bn_stats.narrow(0, t0, T) : at::Tensor();
    InnerLoop inner(pb, task, lr, sx, sy);
    inner.run(theta0, second_order, compute_lr_grads, true, task_stats);
    at::Tensor task_loss;     // (T)
    Params v(params.size());  // d(task loss) / d theta_j per task, from j = J down to 0
    auto query_term = [&](int64_t j, double w) {
      const Params& theta = inner.theta(j);
      NetPass pass = task.forward(theta, qx, j, true, activation_cache_limit().load());
      if (j == J && task_stats.defined()) record_bn_stats(pb.net, pass, task_stats.select(1, J));
      const at::Tensor l = task.loss(pass, qy, compute_grads) * w;
      task_loss = task_loss.defined() ? task_loss + l : l;
      if (compute_grads) add_scaled(v, task.backward(pass, theta, ParamGrads::kAll, false), w);
    };
    auto step_back = [&](int64_t j) {
      inner.release_after(j);  // the query terms and steps above j are done
      const Params& rate = lr[lr_row(pb, j)];
      if (compute_lr_grads) {
        // d theta_{j+1} / d rate = -g_j, elementwise; summed over the chunk's tasks.
        Params& dl = lr_acc[lr_row(pb, j)];
        for (size_t p = 0; p < v.size(); ++p) {
          if (!pb.adapted[p] || !v[p].defined()) continue;
          const at::Tensor d = (v[p] * inner.grad(j)[p]).sum(0);
          if (dl[p].defined()) {
            dl[p].sub_(d);
          } else {
            dl[p] = -d;
          }
        }
      }
      if (!second_order) return;
      // v_j = v_{j+1} - H_j (rate_j * v_{j+1}), the direction living on adapted params only.
      Params u(v.size());
      for (size_t p = 0; p < v.size(); ++p) {
        if (pb.adapted[p] && v[p].defined()) u[p] = rate[p] * v[p];
      }
      const Params& theta = inner.theta(j);
      NetPass pass = inner.take_pass(j);
      if (pass.empty()) {  // not kept by the inner loop: the same pass again
        sweep_recomputed_passes().fetch_add(1);
        pass = task.forward(theta, sx, j, false);
        task.loss(pass, sy, true);
        task.backward(pass, theta, ParamGrads::kNone, true);  // hvp() reads dL/d(value) only
      }
      add_scaled(v, task.hvp(pass, theta, u), -1.0);
    };
    task_sweep(step_weights, compute_grads, query_term, step_back);
    if (task_loss.defined()) task_losses.narrow(0, t0, T).copy_(task_loss);
    if (compute_grads) add_task_sum(grad_acc, v);
  }
  const double inv_tasks = 1.0 / static_cast<double>(pb.tasks);
  at::Tensor mean_loss = task_losses.sum() * inv_tasks;
  std::vector<at::Tensor> grad_params, grad_lrs;
  if (compute_grads) {
    for (size_t p = 0; p < params.size(); ++p) {
      grad_params.push_back(grad_acc[p].defined() ? (grad_acc[p] * inv_tasks).contiguous() : at::zeros_like(params[p]));
    }
  }
  if (compute_lr_grads) {
    grad_lrs = reduce_lr_grads(pb, lrs, lr_acc);
    for (auto& g : grad_lrs) g.mul_(inv_tasks);
  }
  return {mean_loss, grad_params, grad_lrs, task_losses, bn_stats};
}

std::vector<at::Tensor> net_adapt_kernel(at::TensorList params, at::TensorList lrs, const at::Tensor& support_x,
                                         const at::Tensor& support_y, at::IntArrayRef layers,
                                         at::ArrayRef<double> layer_args, int64_t steps, int64_t lr_mode,
                                         int64_t loss) {
  constexpr const char* op = "pymeta::net_adapt";
  const NetProblem pb = make_problem(op, params, lrs, support_x, support_y, nullptr, nullptr, layers, layer_args,
                                     steps, lr_mode, loss);
  if (auto mlp = fast_path_mlp(pb, params, support_x)) {
    return mlp_adapt_fast(pb, std::move(*mlp), params, lrs, support_x, support_y);
  }
  std::optional<WorkspaceScope> workspace;  // CPU: activations freed by one task serve the next
  if (support_x.is_cpu()) workspace.emplace();
  const std::vector<Params> lr = expand_lrs(pb, params, lrs);
  std::vector<at::Tensor> adapted;
  for (const auto& p : params) {
    std::vector<int64_t> shape{pb.tasks};
    shape.insert(shape.end(), p.sizes().begin(), p.sizes().end());
    adapted.push_back(at::empty(shape, p.options()));
  }
  const int64_t chunk = tasks_per_chunk(pb, support_x);  // as in net_maml_loss
  Params theta0;
  for (int64_t t0 = 0; t0 < pb.tasks; t0 += chunk) {
    const int64_t T = std::min(chunk, pb.tasks - t0);
    if (theta0.empty() || theta0[0].size(0) != T) theta0 = batched_params(params, T);
    const NetTask task(pb.net, pb.loss, T);
    InnerLoop inner(pb, task, lr, chunk_input(support_x, t0, T), support_y.narrow(0, t0, T));
    inner.run(theta0, false, false, false, at::Tensor());
    for (size_t p = 0; p < adapted.size(); ++p) adapted[p].narrow(0, t0, T).copy_(inner.theta(pb.steps)[p]);
  }
  return adapted;
}

}  // namespace

// The kernels are ATen compositions, so one registration per backend serves them all.
TORCH_LIBRARY_IMPL(pymeta, CPU, m) {
  m.impl("net_maml_loss", &net_maml_loss_kernel);
  m.impl("net_adapt", &net_adapt_kernel);
}

TORCH_LIBRARY_IMPL(pymeta, CUDA, m) {
  m.impl("net_maml_loss", &net_maml_loss_kernel);
  m.impl("net_adapt", &net_adapt_kernel);
}

}  // namespace pymeta
