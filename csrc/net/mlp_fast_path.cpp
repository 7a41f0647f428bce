// The model-aware core's MLP fast path: CPU kernels that run net_maml_loss and net_adapt on
// flat buffers when the network is an MLP (net/mlp_net.h; the driver, net/maml_core.cpp, has
// checked the call and chooses this path). Tasks are spread over threads with at::parallel_for; each thread runs its tasks one at a time through the whole
// meta-step with its own workspace, so there is no per-op dispatch inside the inner loop and
// memory is one task's worth per thread: the inner-step parameter iterates, and activations
// that the reverse sweep recomputes instead of keeping.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core_settings.h"
#include "cpu/mlp_elementwise.h"
#include "net/mlp_net.h"
#include "net/problem.h"
#include "net/sweep.h"
#include "cpu/small_gemm.h"

namespace pymeta {
namespace {

// One task's targets: floats (rows, out) for MSE, class indices (rows) for cross-entropy.
template <typename T>
struct Targets {
  const T* values = nullptr;
  const int64_t* labels = nullptr;
};

// Forward, backward and R-operator (Hessian-vector) passes of one task's MLP, on a flat
// parameter vector theta laid out as MlpNet describes. Activations live in numbered slots, so
// the inner loop can leave each step's activations for the reverse sweep (one slot per step)
// or, under a memory cap, share one slot and let the sweep recompute them.
template <typename T>
class MlpTask {
 public:
  // The last slot holds query_rows rows (the query set), the others support_rows; the
  // Hessian-vector products run on the support set only.
  MlpTask(const MlpNet& net, int64_t support_rows, int64_t query_rows, LossKind loss, int64_t num_slots)
      : net_(net), loss_(loss), slots_(num_slots) {
    const size_t n = net.layers.size();
    for (size_t s = 0; s < slots_.size(); ++s) {
      Slot& slot = slots_[s];
      const int64_t rows = s + 1 == slots_.size() ? query_rows : support_rows;
      for (auto* buf : {&slot.a, &slot.h, &slot.e, &slot.d}) buf->resize(n);
      for (size_t l = 0; l < n; ++l) {
        const size_t size = static_cast<size_t>(rows * net.layers[l].out);
        for (auto* buf : {&slot.a, &slot.h, &slot.e, &slot.d}) (*buf)[l].assign(size, T(0));
      }
      slot.softmax.assign(static_cast<size_t>(rows * net.out_features()), T(0));
    }
    for (auto* buf : {&ra_, &rh_, &re_, &rd_}) buf->resize(n);
    for (size_t l = 0; l < n; ++l) {
      const size_t size = static_cast<size_t>(support_rows * net.layers[l].out);
      for (auto* buf : {&ra_, &rh_, &re_, &rd_}) (*buf)[l].assign(size, T(0));
    }
    r_zero_.assign(n, true);
  }

  // Bytes of activations one slot holds for `rows` rows.
  static int64_t slot_bytes(const MlpNet& net, int64_t rows) {
    int64_t elems = rows * net.out_features();
    for (const MlpLayer& L : net.layers) elems += 4 * rows * L.out;
    return elems * static_cast<int64_t>(sizeof(T));
  }

  // Activations of every layer at theta for x (rows, in), into a slot.
  void forward(int64_t slot, const T* theta, const T* x, int64_t rows) {
    Slot& S = slots_[slot];
    S.x = x;
    for (size_t l = 0; l < net_.layers.size(); ++l) {
      const MlpLayer& L = net_.layers[l];
      T* a = S.a[l].data();
      gemm<T>(false, true, rows, L.out, L.in, input(S, l), theta + L.w_off, T(0), a);
      if (L.bias) add_row(rows, L.out, theta + L.b_off, a);
      act_forward(L.act, static_cast<T>(L.slope), rows * L.out, a, S.h[l].data());
    }
  }

  // Mean loss of the slot's forward; with `grad`, also dL/dh of the output layer.
  T loss(int64_t slot, const Targets<T>& tgt, int64_t rows, bool grad) {
    Slot& S = slots_[slot];
    const int64_t c = net_.out_features();
    const T* h = S.h.back().data();
    T* d = S.d.back().data();
    T total = T(0);
    if (loss_ == LossKind::kMse) {
      const T n = static_cast<T>(rows * c);
      for (int64_t k = 0; k < rows * c; ++k) {
        const T diff = h[k] - tgt.values[k];
        total += diff * diff;
        if (grad) d[k] = T(2) * diff / n;
      }
      return total / n;
    }
    for (int64_t i = 0; i < rows; ++i) {
      const T* hi = h + i * c;
      T m = hi[0];
      for (int64_t j = 1; j < c; ++j) m = std::max(m, hi[j]);
      T sum = T(0);
      for (int64_t j = 0; j < c; ++j) sum += std::exp(hi[j] - m);
      const T lse = m + std::log(sum);
      const int64_t y = tgt.labels[i];
      total += lse - hi[y];
      if (grad) {
        T* si = S.softmax.data() + i * c;
        T* di = d + i * c;
        for (int64_t j = 0; j < c; ++j) {
          si[j] = std::exp(hi[j] - lse);
          di[j] = si[j] / static_cast<T>(rows);
        }
        di[y] -= T(1) / static_cast<T>(rows);
      }
    }
    return total / static_cast<T>(rows);
  }

  // Gradients of layers >= lowest into g (flat); keeps dL/da and dL/dh in the slot for hvp().
  void backward(int64_t slot, const T* theta, int64_t rows, int64_t lowest, T* g) {
    Slot& S = slots_[slot];
    for (int64_t l = static_cast<int64_t>(net_.layers.size()) - 1; l >= lowest; --l) {
      const MlpLayer& L = net_.layers[l];
      const T* a = S.a[l].data();
      const T* h = S.h[l].data();
      const T* d = S.d[l].data();
      T* e = S.e[l].data();
      act_times_d1(L.act, static_cast<T>(L.slope), rows * L.out, a, h, d, e);
      gemm<T>(true, false, L.out, L.in, rows, e, input(S, l), T(0), g + L.w_off);
      if (L.bias) column_sums(rows, L.out, e, g + L.b_off);
      if (l > lowest) gemm<T>(false, false, rows, L.in, L.out, e, theta + L.w_off, T(0), S.d[l - 1].data());
    }
  }

  // hu = H u, the Hessian of the slot's loss at theta applied to u (zero outside adapted
  // layers), by forward-over-reverse differentiation (Pearlmutter's R-operator). Needs
  // forward(), loss(grad=true) and backward(lowest=0) in that slot at the same theta.
  void hvp(int64_t slot, const T* theta, const T* u, int64_t rows, T* hu) {
    const Slot& S = slots_[slot];
    const size_t n = net_.layers.size();
    // R-forward: R{a_l} = R{h_{l-1}} W^T + h_{l-1} dW^T + db, R{h_l} = act'(a_l) R{a_l}.
    for (size_t l = 0; l < n; ++l) {
      const MlpLayer& L = net_.layers[l];
      const bool from_below = l > 0 && !r_zero_[l - 1];
      r_zero_[l] = !from_below && !L.adapted;
      if (r_zero_[l]) continue;
      T* ra = ra_[l].data();
      if (from_below) {
        gemm<T>(false, true, rows, L.out, L.in, rh_[l - 1].data(), theta + L.w_off, T(0), ra);
      } else {
        std::fill(ra, ra + rows * L.out, T(0));
      }
      if (L.adapted) {
        gemm<T>(false, true, rows, L.out, L.in, input(S, l), u + L.w_off, T(1), ra);
        if (L.bias) add_row(rows, L.out, u + L.b_off, ra);
      }
      act_times_d1(L.act, static_cast<T>(L.slope), rows * L.out, S.a[l].data(), S.h[l].data(), ra, rh_[l].data());
    }
    // R{dL/dh} at the output: the loss Hessian applied to R{h}.
    const int64_t c = net_.out_features();
    const T* rh_out = rh_.back().data();
    T* rd = rd_.back().data();
    if (loss_ == LossKind::kMse) {
      const T scale = T(2) / static_cast<T>(rows * c);
      for (int64_t k = 0; k < rows * c; ++k) rd[k] = scale * rh_out[k];
    } else {
      for (int64_t i = 0; i < rows; ++i) {
        const T* si = S.softmax.data() + i * c;
        const T* ri = rh_out + i * c;
        T dot = T(0);
        for (int64_t j = 0; j < c; ++j) dot += si[j] * ri[j];
        for (int64_t j = 0; j < c; ++j) rd[i * c + j] = si[j] * (ri[j] - dot) / static_cast<T>(rows);
      }
    }
    // R-backward: R{e_l} = R{d_l} act' + d_l act'' R{a_l}; H u for W_l = R{e_l}^T h_{l-1} +
    // e_l^T R{h_{l-1}}, for b_l = sum R{e_l}; R{d_{l-1}} = R{e_l} W_l + e_l dW_l.
    for (int64_t l = static_cast<int64_t>(n) - 1; l >= 0; --l) {
      const MlpLayer& L = net_.layers[l];
      const T* a = S.a[l].data();
      const T* h = S.h[l].data();
      const T* d = S.d[l].data();
      const T* rdl = rd_[l].data();
      T* re = re_[l].data();
      const bool curved = !activation_is_piecewise_linear(L.act) && !r_zero_[l];
      act_r_backward(L.act, static_cast<T>(L.slope), rows * L.out, a, h, rdl, d, ra_[l].data(), curved, re);
      gemm<T>(true, false, L.out, L.in, rows, re, input(S, l), T(0), hu + L.w_off);
      if (l > 0 && !r_zero_[l - 1]) {
        gemm<T>(true, false, L.out, L.in, rows, S.e[l].data(), rh_[l - 1].data(), T(1), hu + L.w_off);
      }
      if (L.bias) column_sums(rows, L.out, re, hu + L.b_off);
      if (l > 0) {
        T* rd_below = rd_[l - 1].data();
        gemm<T>(false, false, rows, L.in, L.out, re, theta + L.w_off, T(0), rd_below);
        if (L.adapted) gemm<T>(false, false, rows, L.in, L.out, S.e[l].data(), u + L.w_off, T(1), rd_below);
      }
    }
  }

 private:
  // Per layer, (rows, out): pre-activation, output, dL/da and dL/dh; the input and softmax.
  struct Slot {
    const T* x = nullptr;
    std::vector<std::vector<T>> a, h, e, d;
    std::vector<T> softmax;
  };

  const T* input(const Slot& S, size_t l) const { return l == 0 ? S.x : S.h[l - 1].data(); }

  const MlpNet& net_;
  LossKind loss_;
  std::vector<Slot> slots_;
  // Tangents R{a}, R{h}, R{dL/da}, R{dL/dh} per layer, shared by every slot.
  std::vector<std::vector<T>> ra_, rh_, re_, rd_;
  std::vector<bool> r_zero_;  // R{h_l} is identically zero (below the first adapted layer)
};

// Everything the per-task pipeline reads, made contiguous once; `checked` is the driver's view of
// the call (its learning-rate layout is the one both paths use).
struct FlatProblem {
  const NetProblem& checked;  // steps, loss and learning-rate layout
  MlpNet net;
  int64_t tasks, k_support, k_query;
  at::Tensor support_x, support_y, query_x, query_y;
  std::vector<at::Tensor> params;
  std::vector<int64_t> offsets;  // of each param in the flat parameter vector
};

// The kernels read raw memory, so the shapes the driver's ATen path would check as it goes are
// checked here first: inputs (T, K, in_features) after a leading Flatten, MSE targets
// (T, K, out_features), classes below out_features.
at::Tensor mlp_inputs(const char* op, const char* name, const at::Tensor& x, const MlpNet& net) {
  const at::Tensor flat = net.flatten_input ? x.flatten(2) : x;
  TORCH_CHECK(flat.dim() == 3 && flat.size(2) == net.in_features(), op, ": ", name, " must have shape [T, K, ",
              net.in_features(), "] for the first Linear layer, got ", x.sizes());
  return flat.contiguous();
}

at::Tensor mlp_targets(const char* op, const char* name, const at::Tensor& y, const MlpNet& net, LossKind loss) {
  if (loss == LossKind::kMse) {
    TORCH_CHECK(y.dim() == 3 && y.size(2) == net.out_features(), op, ": ", name, " must have shape [T, K, ",
                net.out_features(), "] for MSE, got ", y.sizes());
  } else if (y.numel() > 0) {
    const int64_t hi = y.max().item<int64_t>();
    TORCH_CHECK_VALUE(hi < net.out_features(), op, ": ", name, ": expected classes in [0, ", net.out_features(),
                      ") for the network's ", net.out_features(), " outputs, received class ", hi);
  }
  return y.contiguous();
}

FlatProblem flat_problem(const char* op, const NetProblem& checked, MlpNet net, at::TensorList params,
                     const at::Tensor& sx, const at::Tensor& sy, const at::Tensor* qx, const at::Tensor* qy) {
  const LossKind loss = checked.loss;
  FlatProblem pb{checked, std::move(net), sx.size(0), sx.size(1), 0};
  pb.support_x = mlp_inputs(op, "support_x", sx, pb.net);
  pb.support_y = mlp_targets(op, "support_y", sy, pb.net, loss);
  if (qx != nullptr) {
    pb.k_query = qx->size(1);
    pb.query_x = mlp_inputs(op, "query_x", *qx, pb.net);
    pb.query_y = mlp_targets(op, "query_y", *qy, pb.net, loss);
  }
  int64_t offset = 0;
  for (const auto& p : params) {
    pb.params.push_back(p.contiguous());
    pb.offsets.push_back(offset);
    offset += p.numel();
  }
  return pb;
}

// Copies the params into one flat vector (the layout of MlpNet).
template <typename T>
std::vector<T> flatten_params(const FlatProblem& pb) {
  std::vector<T> flat(pb.net.num_params);
  int64_t off = 0;
  for (const auto& p : pb.params) {
    std::memcpy(flat.data() + off, p.const_data_ptr<T>(), sizeof(T) * p.numel());
    off += p.numel();
  }
  return flat;
}

// The driver's per-param rates (expand_lrs) laid out flat: (lr_rows, P), one rate per param
// element, zero for params that do not adapt.
template <typename T>
std::vector<T> flat_lrs(const FlatProblem& pb, at::TensorList lrs) {
  const int64_t P = pb.net.num_params;
  std::vector<T> flat(static_cast<size_t>(lr_rows(pb.checked) * P), T(0));
  const std::vector<Params> rows = expand_lrs(pb.checked, pb.params, lrs);
  for (int64_t j = 0; j < lr_rows(pb.checked); ++j) {
    for (size_t p = 0; p < pb.params.size(); ++p) {
      const at::Tensor& rate = rows[j][p];
      if (!rate.defined()) continue;
      T* dst = flat.data() + j * P + pb.offsets[p];
      if (rate.dim() == 0) {  // one rate for the whole param
        std::fill(dst, dst + pb.params[p].numel(), rate.item<T>());
      } else {  // one per element, shaped like the param
        const at::Tensor c = rate.contiguous();
        std::memcpy(dst, c.const_data_ptr<T>(), sizeof(T) * c.numel());
      }
    }
  }
  return flat;
}

// How one thread runs its tasks: whether each inner step's activations (and, for learned
// rates, its support gradient) stay for the reverse sweep, and which layers the inner loop
// differentiates.
struct SweepPlan {
  bool cache = false;
  bool keep_grads = false;  // one support gradient per step (cache and learned rates)
  int64_t lowest = 0;       // lowest layer the inner loop's backward reaches
  int64_t slots = 2;
  int64_t query_slot() const { return slots - 1; }
  int64_t support_slot(int64_t j) const { return cache ? j : 0; }
  int64_t grad_row(int64_t j) const { return keep_grads ? j : 0; }
};

template <typename T>
SweepPlan plan_sweep(const FlatProblem& pb, bool second_order_grads, bool lr_grads) {
  SweepPlan plan;
  const int64_t per_step = MlpTask<T>::slot_bytes(pb.net, pb.k_support) +
                           (lr_grads ? pb.net.num_params * int64_t(sizeof(T)) : 0);
  plan.cache = pb.checked.steps * per_step <= activation_cache_limit().load();
  plan.keep_grads = plan.cache && lr_grads;
  plan.slots = plan.cache ? pb.checked.steps + 1 : 2;
  // The HVP needs every layer's backward quantities; kept from the inner loop, they must be
  // complete there. Otherwise the inner loop stops at the lowest adapted layer (cheap ANIL).
  plan.lowest = plan.cache && second_order_grads ? 0 : pb.net.lowest_adapted;
  return plan;
}

// Runs one task's inner loop; iterates[j - 1] (P each) holds theta after step j, and
// grads[plan.grad_row(j)] the support gradient at step j.
template <typename T>
void inner_loop(const FlatProblem& pb, const SweepPlan& plan, MlpTask<T>& work, const T* theta0,
                const T* lr_flat, const T* sx, const Targets<T>& sy, T* iterates, T* grads) {
  const int64_t P = pb.net.num_params;
  for (int64_t j = 0; j < pb.checked.steps; ++j) {
    const T* cur = j == 0 ? theta0 : iterates + (j - 1) * P;
    T* next = iterates + j * P;
    T* g = grads + plan.grad_row(j) * P;
    const int64_t slot = plan.support_slot(j);
    work.forward(slot, cur, sx, pb.k_support);
    work.loss(slot, sy, pb.k_support, true);
    work.backward(slot, cur, pb.k_support, plan.lowest, g);
    std::memcpy(next, cur, sizeof(T) * P);
    const T* lr = lr_flat + lr_row(pb.checked, j) * P;
    for (const MlpLayer& L : pb.net.layers) {
      if (L.adapted) sub_product(L.in * L.out + (L.bias ? L.out : 0), lr + L.w_off, g + L.w_off, next + L.w_off);
    }
  }
}

// Multiply-adds of one task's meta-step, roughly: forward and backward passes over the support
// and query rows, with the sweep's R-passes. Used only to decide whether threads are worth it.
int64_t task_macs(const FlatProblem& pb) {
  int64_t weights = 0;
  for (const MlpLayer& L : pb.net.layers) weights += L.in * L.out;
  return weights * (pb.checked.steps * pb.k_support * 9 + pb.k_query * 3);
}

// Runs body(t0, t1) over the tasks: on threads when the meta-step is big enough, otherwise on
// the calling thread. A small meta-step (sinusoid: a fraction of a millisecond) gains little
// from a second thread and loses a lot when another process holds a core and the OpenMP
// team waits for it.
template <typename F>
void for_each_task_chunk(const FlatProblem& pb, const F& body) {
  constexpr int64_t kParallelMacs = int64_t{50} << 20;
  if (pb.tasks * task_macs(pb) < kParallelMacs) {
    body(int64_t{0}, pb.tasks);
  } else {
    at::parallel_for(0, pb.tasks, 1, body);
  }
}

template <typename T>
Targets<T> targets_of(const at::Tensor& y, int64_t t, int64_t rows, int64_t width, LossKind loss) {
  Targets<T> out;
  if (loss == LossKind::kMse) {
    out.values = y.const_data_ptr<T>() + t * rows * width;
  } else {
    out.labels = y.const_data_ptr<int64_t>() + t * rows;
  }
  return out;
}

// Splits a flat (P) vector into tensors shaped like the params.
template <typename T>
std::vector<at::Tensor> unflatten(const FlatProblem& pb, const std::vector<T>& flat, T scale) {
  std::vector<at::Tensor> out;
  int64_t off = 0;
  for (const auto& p : pb.params) {
    at::Tensor t = at::empty(p.sizes(), p.options());
    T* dst = t.mutable_data_ptr<T>();
    for (int64_t i = 0; i < p.numel(); ++i) dst[i] = flat[off + i] * scale;
    off += p.numel();
    out.push_back(t);
  }
  return out;
}

// d loss / d (per-element rate), (lr_rows, P), times scale, reduced to the lrs' layout by the
// driver's reduce_lr_grads.
template <typename T>
std::vector<at::Tensor> flat_lr_grads(const FlatProblem& pb, at::TensorList lrs, const std::vector<T>& dflat, T scale) {
  const int64_t P = pb.net.num_params;
  std::vector<Params> d(lr_rows(pb.checked), Params(pb.params.size()));
  for (int64_t j = 0; j < lr_rows(pb.checked); ++j) {
    for (size_t p = 0; p < pb.params.size(); ++p) {
      if (!pb.checked.adapted[p]) continue;
      at::Tensor g = at::empty(pb.params[p].sizes(), pb.params[p].options());
      T* dst = g.mutable_data_ptr<T>();
      const T* src = dflat.data() + j * P + pb.offsets[p];
      for (int64_t i = 0; i < g.numel(); ++i) dst[i] = src[i] * scale;
      d[j][p] = g;
    }
  }
  return reduce_lr_grads(pb.checked, lrs, d);
}

}  // namespace

MamlLossResult mlp_maml_loss_fast(const NetProblem& checked, MlpNet net, at::TensorList params, at::TensorList lrs,
                                  const at::Tensor& support_x, const at::Tensor& support_y, const at::Tensor& query_x,
                                  const at::Tensor& query_y, at::ArrayRef<double> step_weights, bool first_order,
                                  bool compute_grads, bool compute_lr_grads) {
  const FlatProblem pb = flat_problem("pymeta::net_maml_loss", checked, std::move(net), params, support_x, support_y,
                                  &query_x, &query_y);
  compute_lr_grads = compute_lr_grads && compute_grads;
  at::Tensor task_losses = at::empty({pb.tasks}, params[0].options());
  at::Tensor mean_loss;
  std::vector<at::Tensor> grad_params, grad_lrs;
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "mlp_maml_loss_cpu", [&] {
    using T = scalar_t;
    const int64_t P = pb.net.num_params, J = pb.checked.steps;
    const std::vector<T> theta0 = flatten_params<T>(pb);
    const std::vector<T> lr_flat = flat_lrs<T>(pb, lrs);
    const int threads = at::get_num_threads();
    std::vector<std::vector<T>> grad_acc(threads), lr_acc(threads);
    T* losses = task_losses.mutable_data_ptr<T>();
    const int64_t in = pb.net.in_features(), out = pb.net.out_features();
    const SweepPlan plan = plan_sweep<T>(pb, compute_grads && !first_order, compute_lr_grads);
    for_each_task_chunk(pb, [&](int64_t t0, int64_t t1) {
      const int tid = at::get_thread_num();
      MlpTask<T> work(pb.net, pb.k_support, pb.k_query, pb.checked.loss, plan.slots);
      std::vector<T> iterates(J * P), grads((plan.keep_grads ? J : 1) * P, T(0)), gq(P), v(P), u(P), hu(P);
      std::vector<T>& gacc = grad_acc[tid];
      std::vector<T>& lacc = lr_acc[tid];
      if (compute_grads) gacc.assign(P, T(0));
      if (compute_lr_grads) lacc.assign(lr_rows(pb.checked) * P, T(0));
      const int64_t qs = plan.query_slot();
      auto theta_at = [&](int64_t j) { return j == 0 ? theta0.data() : iterates.data() + (j - 1) * P; };
      for (int64_t t = t0; t < t1; ++t) {
        const T* sx = pb.support_x.const_data_ptr<T>() + t * pb.k_support * in;
        const T* qx = pb.query_x.const_data_ptr<T>() + t * pb.k_query * in;
        const Targets<T> sy = targets_of<T>(pb.support_y, t, pb.k_support, out, pb.checked.loss);
        const Targets<T> qy = targets_of<T>(pb.query_y, t, pb.k_query, out, pb.checked.loss);
        inner_loop<T>(pb, plan, work, theta0.data(), lr_flat.data(), sx, sy, iterates.data(), grads.data());
        T task_loss = T(0);
        std::fill(v.begin(), v.end(), T(0));  // d(task loss)/d theta_j, from j = J down to 0
        auto query_term = [&](int64_t j, double weight) {
          const T w = static_cast<T>(weight);
          work.forward(qs, theta_at(j), qx, pb.k_query);
          task_loss += w * work.loss(qs, qy, pb.k_query, compute_grads);
          if (!compute_grads) return;
          work.backward(qs, theta_at(j), pb.k_query, 0, gq.data());
          axpy(P, w, gq.data(), v.data());
        };
        auto step_back = [&](int64_t j) {
          if (first_order && !compute_lr_grads) return;
          const T* theta = theta_at(j);
          const int64_t slot = plan.support_slot(j);
          const T* g = grads.data() + plan.grad_row(j) * P;
          if (!plan.cache) {  // recompute step j's activations and support gradient
            work.forward(slot, theta, sx, pb.k_support);
            work.loss(slot, sy, pb.k_support, true);
            work.backward(slot, theta, pb.k_support, first_order ? pb.net.lowest_adapted : 0, grads.data());
          }
          const T* lr = lr_flat.data() + lr_row(pb.checked, j) * P;
          if (compute_lr_grads) {
            T* dl = lacc.data() + lr_row(pb.checked, j) * P;
            for (const MlpLayer& L : pb.net.layers) {
              if (L.adapted) sub_product(L.in * L.out + (L.bias ? L.out : 0), v.data() + L.w_off, g + L.w_off, dl + L.w_off);
            }
          }
          if (!first_order) {
            // v_j = v_{j+1} - H_j (lr_j * v_{j+1}); lr is zero outside adapted layers.
            multiply(P, lr, v.data(), u.data());
            work.hvp(slot, theta, u.data(), pb.k_support, hu.data());
            axpy(P, T(-1), hu.data(), v.data());
          }
        };
        task_sweep(step_weights, compute_grads, query_term, step_back);
        losses[t] = task_loss;
        if (!compute_grads) continue;
        axpy(P, T(1), v.data(), gacc.data());
      }
    });
    const T inv_tasks = T(1) / static_cast<T>(pb.tasks);
    mean_loss = task_losses.sum().mul_(inv_tasks);
    if (compute_grads) {
      std::vector<T> total(P, T(0));
      for (const auto& acc : grad_acc)
        for (size_t p = 0; p < acc.size(); ++p) total[p] += acc[p];
      grad_params = unflatten<T>(pb, total, inv_tasks);
    }
    if (compute_lr_grads) {
      std::vector<T> total(lr_rows(pb.checked) * P, T(0));
      for (const auto& acc : lr_acc)
        for (size_t p = 0; p < acc.size(); ++p) total[p] += acc[p];
      grad_lrs = flat_lr_grads<T>(pb, lrs, total, inv_tasks);
    }
  });
  // An MLP has no batch norm: no statistics.
  at::Tensor bn_stats = at::empty({pb.tasks, pb.checked.steps + 1, 2, 0}, params[0].options());
  return {mean_loss, grad_params, grad_lrs, task_losses, bn_stats};
}

std::vector<at::Tensor> mlp_adapt_fast(const NetProblem& checked, MlpNet net, at::TensorList params,
                                       at::TensorList lrs, const at::Tensor& support_x, const at::Tensor& support_y) {
  const FlatProblem pb = flat_problem("pymeta::net_adapt", checked, std::move(net), params, support_x, support_y,
                                  nullptr, nullptr);
  std::vector<at::Tensor> adapted;
  for (const auto& p : pb.params) {
    std::vector<int64_t> shape{pb.tasks};
    shape.insert(shape.end(), p.sizes().begin(), p.sizes().end());
    adapted.push_back(at::empty(shape, p.options()));
  }
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "mlp_adapt_cpu", [&] {
    using T = scalar_t;
    const int64_t P = pb.net.num_params;
    const std::vector<T> theta0 = flatten_params<T>(pb);
    const std::vector<T> lr_flat = flat_lrs<T>(pb, lrs);
    const int64_t in = pb.net.in_features(), out = pb.net.out_features();
    SweepPlan plan;  // no sweep: one slot, gradients down to the lowest adapted layer only
    plan.lowest = pb.net.lowest_adapted;
    for_each_task_chunk(pb, [&](int64_t t0, int64_t t1) {
      MlpTask<T> work(pb.net, pb.k_support, pb.k_support, pb.checked.loss, plan.slots);
      std::vector<T> iterates(pb.checked.steps * P), g(P, T(0));
      for (int64_t t = t0; t < t1; ++t) {
        const T* sx = pb.support_x.const_data_ptr<T>() + t * pb.k_support * in;
        const Targets<T> sy = targets_of<T>(pb.support_y, t, pb.k_support, out, pb.checked.loss);
        inner_loop<T>(pb, plan, work, theta0.data(), lr_flat.data(), sx, sy, iterates.data(), g.data());
        const T* final_theta = iterates.data() + (pb.checked.steps - 1) * P;
        int64_t off = 0;
        for (auto& a : adapted) {
          const int64_t n = a.numel() / pb.tasks;
          std::memcpy(a.mutable_data_ptr<T>() + t * n, final_theta + off, sizeof(T) * n);
          off += n;
        }
      }
    });
  });
  return adapted;
}

}  // namespace pymeta
