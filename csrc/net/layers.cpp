// Forward, backward and R-operator rules of each layer kind, from ATen ops. The formulas are in
// docs/model-aware.md ("Convolutional networks"); an undefined tensor stands for zero.
#include "net/layers.h"

#include "core_settings.h"
#include "cpu/batched_gemm.h"
#include "cpu/bn_tangent.h"
#include "cpu/winograd.h"
#include "net/activation_math.h"
#ifdef PYMETA_WITH_CUDA
#include "cuda/fused_layers.h"
#endif

#include <ATen/TensorOperators.h>
#include <ATen/ops/avg_pool2d.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/avg_pool2d_backward.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/leaky_relu.h>
#include <ATen/ops/leaky_relu_backward.h>
#include <ATen/ops/max_pool2d_with_indices.h>
#include <ATen/ops/max_pool2d_with_indices_backward.h>
#include <ATen/ops/threshold_backward.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/ops/native_batch_norm.h>
#include <ATen/ops/native_batch_norm_backward.h>

#include <c10/core/MemoryFormat.h>
#include <c10/util/strides.h>

#include <initializer_list>
#include <utility>
#include <vector>

namespace pymeta {
namespace {

std::optional<at::Tensor> optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// acc += t, where either may be undefined (zero); acc is only ever a fresh temporary here.
void accumulate(at::Tensor& acc, const at::Tensor& t) {
  if (!t.defined()) return;
  if (!acc.defined()) {
    acc = t;
  } else {
    acc.add_(t);
  }
}

// ---- convolution (and Linear, its 1x1 special case done with matrix products)
struct ConvGeometry {
  std::vector<int64_t> stride, padding, dilation{1, 1}, output_padding{0, 0};
  explicit ConvGeometry(const NetLayer& L)
      : stride{L.ints[kConvStrideInt], L.ints[kConvStrideInt + 1]},
        padding{L.ints[kConvPaddingInt], L.ints[kConvPaddingInt + 1]} {}
};

// 3x3 convolutions with stride 1 and padding 1 on channels-last CPU values run by Winograd's
// F(4x4, 3x3) or F(2x2, 3x3) (cpu/winograd.h) where winograd_block_by_shape (or the block that
// set_winograd_blocks forces) says: forward, both gradients and the R-operator terms. Returns the
// output block size, 4 or 2, or 0 for oneDNN.
int winograd_block(const ConvGeometry& g, int64_t tasks, const at::Tensor& x, const at::Tensor& w) {
  if (!x.is_cpu() || !cpu_winograd() || x.dim() != 4 || w.size(2) != 3 || w.size(3) != 3) return 0;
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble) return 0;
  if (g.stride != std::vector<int64_t>{1, 1} || g.padding != std::vector<int64_t>{1, 1}) return 0;
  if (!x.is_contiguous(at::MemoryFormat::ChannelsLast)) return 0;
  if (const int forced = winograd_blocks()) return forced;
  return winograd_block_by_shape(x.size(0), w.size(1), w.size(0) / tasks, x.size(2), x.size(3));
}

// One grouped convolution for T tasks: w and b are folded ((T*O, C, kh, kw) and (T*O)).
at::Tensor conv(const ConvGeometry& g, int64_t tasks, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  if (const int block = winograd_block(g, tasks, x, w)) return winograd_conv({{&x, &w}}, b, tasks, false, block);
  return at::convolution(x, w, optional(b), g.stride, g.padding, g.dilation, false, g.output_padding, tasks);
}

// Weight gradients of small convolutions (kernels beyond 1x1 with deep patches, and few output
// positions or maps of 4x4 or less) as one matrix product per task: dL/dw = sum over pairs of
// gy^T patches(x), with patches(x) the input patch under each output position, (N*Ho*Wo, kh*kw*C). oneDNN's backward-weights kernels
// are slow there, several times a forward convolution of the same shape; larger maps and batches
// stay with oneDNN, which wins there. The rule below is from benchmarks/conv_weight_grad.py's
// per-shape table (docs/model-aware.md, "Fused CPU kernels").
bool weight_grad_by_gemm(const at::Tensor& gy, const at::Tensor& w) {
  if (!gy.is_cpu() || !cpu_gemm_weight_grads() || gy.dim() != 4) return false;
  if (gy.scalar_type() != at::kFloat && gy.scalar_type() != at::kDouble) return false;
  // A 1x1 kernel's weight gradient is one matrix product in oneDNN too.
  if (w.size(2) * w.size(3) == 1) return false;
  // Shallow patches (conv4's 64 channels: 576 values) gain too little to be worth the path's
  // extra blocks, which cost a small network's workspace cache page faults (tests/test_memory.py).
  const int64_t maps = gy.size(2) * gy.size(3), rows = gy.size(0) * maps, depth = w.size(1) * w.size(2) * w.size(3);
  return depth >= 720 && (rows <= 320 || maps <= 16);
}

// The patches of x under the outputs, (T, N*Ho*Wo, kh*kw*C), written into out: row (n, ho, wo)
// of task t holds x's task-t channels at (ho*stride + i - pad, wo*stride + j - pad) in (i, j, c)
// order, the order of a channels-last weight, so that the product comes out in that layout.
// pad_buffer: room for x zero-padded with channels innermost (padded_numel(g, x) values).
void write_patches(const ConvGeometry& g, int64_t tasks, const at::Tensor& x, at::IntArrayRef kernel, int64_t ho,
                   int64_t wo, at::Tensor out, const at::Tensor& pad_buffer) {
  const int64_t n = x.size(0), c = x.size(1) / tasks, ph = g.padding[0], pw = g.padding[1];
  // (N, H + 2 ph, W + 2 pw, T*C): channels innermost in either input layout.
  at::Tensor padded = x.permute({0, 2, 3, 1});
  if (ph > 0 || pw > 0 || !padded.is_contiguous()) {
    at::Tensor buf = pad_buffer.view({n, x.size(2) + 2 * ph, x.size(3) + 2 * pw, x.size(1)});
    if (ph > 0 || pw > 0) buf.zero_();
    buf.narrow(1, ph, x.size(2)).narrow(2, pw, x.size(3)).copy_(padded);
    padded = buf;
  }
  const auto s = padded.strides();
  const at::Tensor windows = padded.as_strided({tasks, n, ho, wo, kernel[0], kernel[1], c},
                                               {c * s[3], s[0], g.stride[0] * s[1], g.stride[1] * s[2], s[1], s[2], s[3]});
  out.view({tasks, n, ho, wo, kernel[0], kernel[1], c}).copy_(windows);
}

int64_t padded_numel(const ConvGeometry& g, const at::Tensor& x) {
  return x.size(0) * (x.size(2) + 2 * g.padding[0]) * (x.size(3) + 2 * g.padding[1]) * x.size(1);
}

// dL/dw of y = conv(x, w) (w folded, (T*O, C, kh, kw)), summed over the pairs (gy, x) whose
// tensors are defined, by one batched matrix product over the tasks; channels-last like w, or
// contiguous when w is not. Undefined when no pair is.
at::Tensor gemm_weight_grad(const ConvGeometry& g, int64_t tasks, const at::Tensor& w,
                            std::initializer_list<std::pair<const at::Tensor*, const at::Tensor*>> pairs) {
  std::vector<std::pair<const at::Tensor*, const at::Tensor*>> used;
  for (const auto& p : pairs) {
    if (p.first->defined() && p.second->defined()) used.push_back(p);
  }
  if (used.empty()) return at::Tensor();
  const at::Tensor& gy0 = *used[0].first;
  const int64_t o = w.size(0) / tasks, ho = gy0.size(2), wo = gy0.size(3), rows = gy0.size(0) * ho * wo;
  const int64_t depth = w.size(1) * w.size(2) * w.size(3), k = rows * static_cast<int64_t>(used.size());
  // One scratch block for the patches, the output gradients and the padded input.
  const int64_t patch_n = tasks * k * depth, grad_n = tasks * o * k, pad_n = padded_numel(g, *used[0].second);
  const at::Tensor scratch = at::empty({patch_n + grad_n + pad_n}, gy0.options());
  const at::Tensor patches = scratch.narrow(0, 0, patch_n).view({tasks, k, depth});
  const at::Tensor grads = scratch.narrow(0, patch_n, grad_n).view({tasks, o, k});
  const at::Tensor pad_buffer = scratch.narrow(0, patch_n + grad_n, pad_n);
  for (size_t i = 0; i < used.size(); ++i) {
    const at::Tensor& gy = *used[i].first;
    write_patches(g, tasks, *used[i].second, w.sizes().slice(2), ho, wo, patches.narrow(1, i * rows, rows),
                  pad_buffer);
    // (N, Ho, Wo, T, O) -> (T, O, N*Ho*Wo)
    grads.narrow(2, i * rows, rows).view({tasks, o, gy.size(0), ho, wo}).copy_(
        gy.reshape({gy.size(0), tasks, o, ho, wo}).permute({1, 2, 0, 3, 4}));
  }
  // (T, O, kh*kw*C) is (T*O, kh, kw, C) in memory: the folded weight, channels-last.
  at::Tensor gw = batched_gemm(grads, patches).view({tasks * o, w.size(2), w.size(3), w.size(1)}).permute({0, 3, 1, 2});
  return w.is_contiguous(at::MemoryFormat::ChannelsLast) ? gw : gw.contiguous();
}

// (dL/dx, dL/dw, dL/db) of y = conv(x, w) + b for the outputs the mask asks for.
// w is folded; so are the weight and bias gradients.
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_vjp(const ConvGeometry& g, int64_t tasks, const at::Tensor& gy,
                                                        const at::Tensor& x, const at::Tensor& w,
                                                        std::array<bool, 3> mask) {
  if (const int block = winograd_block(g, tasks, x, w)) {
    return {mask[0] ? winograd_conv({{&gy, &w}}, at::Tensor(), tasks, true, block) : at::Tensor(),
            mask[1] ? winograd_conv_weight_grad({{&gy, &x}}, w, tasks, block) : at::Tensor(),
            mask[2] ? gy.sum({0, 2, 3}) : at::Tensor()};
  }
  at::Tensor gw;
  if (mask[1] && weight_grad_by_gemm(gy, w)) {
    gw = gemm_weight_grad(g, tasks, w, {{&gy, &x}});
    mask[1] = false;
  }
  if (!mask[0] && !mask[1] && !mask[2]) return {at::Tensor(), gw, at::Tensor()};
  const std::vector<int64_t> bias_sizes{w.size(0)};
  auto r = at::convolution_backward(gy, x, w, mask[2] ? at::OptionalIntArrayRef(bias_sizes) : std::nullopt,
                                    g.stride, g.padding, g.dilation, false, g.output_padding, tasks, mask);
  if (gw.defined()) std::get<1>(r) = gw;
  return r;
}

// A convolution's weights (T, O, C, kh, kw) folded to (T*O, C, kh, kw), with exactly the strides
// of the contiguous or the channels-last layout, else copied to x's: an iterate's strides come
// from the elementwise ops that made it, and with size-1 dims they can pass for either layout
// while ATen's fallback convolution (float64) refuses the weight gradient they lead to.
at::Tensor conv_weight(const at::Tensor& w, const at::Tensor& x) {
  if (!w.defined()) return w;
  at::Tensor f = w.flatten(0, 1);
  const auto strides = f.strides();
  if (strides != at::IntArrayRef(c10::contiguous_strides(f.sizes())) &&
      strides != at::IntArrayRef(c10::get_channels_last_strides_2d(f.sizes()))) {
    f = f.clone(x.suggest_memory_format());  // contiguous() would keep strides that pass for it
  }
  return f;
}

// ---- linear layers: values (N, T*F) seen as (T, N, F) (task_major) for batched matrix products
// x w^T (+ b) per task, for x (T, N, F), w (T, O, F), b (T, O): (T, N, O).
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  if (!b.defined()) return batched_gemm(x, w.transpose(1, 2));
  // A copy, never a view: with one row, contiguous() would return b itself, and the product
  // would add into the bias.
  at::Tensor y = b.unsqueeze(1).expand({x.size(0), x.size(1), w.size(1)}).clone(at::MemoryFormat::Contiguous);
  batched_gemm_add(x, w.transpose(1, 2), y);
  return y;
}
// gy^T x per task, (T, O, F): the weight gradient of linear().
at::Tensor linear_w_grad(const at::Tensor& gy, const at::Tensor& x) { return batched_gemm(gy.transpose(1, 2), x); }

// t + b broadcast over the channels (dim 1) of an output of the given shape; t may be undefined.
at::Tensor add_bias(const at::Tensor& t, const at::Tensor& b, const std::vector<int64_t>& shape) {
  std::vector<int64_t> view(shape.size(), 1);
  view[1] = b.size(0);
  const at::Tensor bias = b.view(view);
  return t.defined() ? t + bias : bias.expand(shape).contiguous();
}

// ---- batch norm over every dimension but the channels (dim 1), with batch statistics
std::vector<int64_t> channel_reduce_dims(const at::Tensor& x) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  return dims;
}

// A (C) tensor shaped to broadcast against x: (1, C, 1, ...).
at::Tensor per_channel(const at::Tensor& v, const at::Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = v.size(0);
  return v.view(shape);
}

at::Tensor channel_mean(const at::Tensor& t) { return t.mean(channel_reduce_dims(t), true); }
at::Tensor channel_sum(const at::Tensor& t) { return t.sum(channel_reduce_dims(t)); }

// s * (v - mean(v) - x̂ mean(x̂ v)): how the normalisation maps a tangent (forward) or a
// cotangent (backward) through x̂ = (x - mean) * s.
at::Tensor bn_project(const at::Tensor& v, const at::Tensor& xhat, const at::Tensor& s) {
  return (v - channel_mean(v) - xhat * channel_mean(xhat * v)) * s;
}

// The forward keeps the batch mean and inverse standard deviation (C each), as ATen's fused
// batch norm gives them; x̂ and a broadcastable s are rebuilt only for the R-passes, which run
// on the (small) support set.
at::Tensor bn_inv_std(const at::Tensor& x, const LayerSaved& saved) { return per_channel(saved.inv_std, x); }
at::Tensor bn_xhat(const at::Tensor& x, const LayerSaved& saved) {
  return (x - per_channel(saved.aux, x)) * bn_inv_std(x, saved);
}

// Batch norm's fused kernels, on the CPU (cpu/bn_tangent.h) and on CUDA (cuda/fused_layers.h),
// share one signature per rule. The ATen rules here are their twins: they run where neither
// applies or the kernels are switched off.
struct BnKernels {
  decltype(&bn_forward_fused) forward;
  decltype(&bn_backward_fused) backward;
  decltype(&bn_r_forward_fused) r_forward;
  decltype(&bn_r_backward_fused) r_backward;
};
constexpr BnKernels kCpuBn{&bn_forward_fused, &bn_backward_fused, &bn_r_forward_fused, &bn_r_backward_fused};
#ifdef PYMETA_WITH_CUDA
constexpr BnKernels kCudaBn{&bn_forward_cuda, &bn_backward_cuda, &bn_r_forward_cuda, &bn_r_backward_cuda};
#endif

// The fused kernels that take x on its device, or null.
const BnKernels* fused_bn(const at::Tensor& x) {
  if (x.is_cpu()) return cpu_fused_kernels() && bn_tangent_applies(x) ? &kCpuBn : nullptr;
#ifdef PYMETA_WITH_CUDA
  if (cuda_fused_kernels() && bn_cuda_applies(x)) return &kCudaBn;
#endif
  return nullptr;
}

// ---- activations
at::Tensor act_forward(const NetLayer& L, const at::Tensor& x) {
  switch (L.activation()) {
    case Activation::kRelu:
      return x.relu();
    case Activation::kLeakyRelu:
      return at::leaky_relu(x, L.arg);
    case Activation::kTanh:
      return x.tanh();
    default:
      return x.sigmoid();
  }
}

// What act'(x) is read from: the output y = act(x) the forward kept (the sign of y is the sign of
// x for ReLU and LeakyReLU with slope >= 0, NaN included; tanh' and sigmoid' are functions of y),
// so the activation's input need not be kept; only LeakyReLU with a negative slope reads x.
const at::Tensor& act_d1_source(const NetLayer& L, const at::Tensor& x, const LayerSaved& s) {
  return L.activation() == Activation::kLeakyRelu && L.arg < 0 ? x : s.aux;
}

// act'(x) * v. Where the fused CUDA kernel takes the operands it is one launch (ATen's tanh and
// sigmoid rules are 3).
at::Tensor act_times_d1(const NetLayer& L, const at::Tensor& x, const LayerSaved& s, const at::Tensor& v) {
  const at::Tensor& y = s.aux;
  const at::Tensor& a = act_d1_source(L, x, s);
#ifdef PYMETA_WITH_CUDA
  if (cuda_fused_kernels() && activation_cuda_applies({v, a, y})) {
    return activation_times_d1_cuda(L.activation(), L.arg, a, y, v);
  }
#endif
  switch (L.activation()) {
    case Activation::kRelu:
      return at::threshold_backward(v, y, 0);
    case Activation::kLeakyRelu:
      return at::leaky_relu_backward(v, a, L.arg, false);
    case Activation::kTanh:
      return v * (1 - y * y);
    default:
      return v * y * (1 - y);
  }
}

// act''(x), or undefined for the piecewise-linear activations (zero almost everywhere).
at::Tensor act_d2(const NetLayer& L, const LayerSaved& s) {
  const at::Tensor& y = s.aux;
  switch (L.activation()) {
    case Activation::kTanh:
      return -2 * y * (1 - y * y);
    case Activation::kSigmoid:
      return y * (1 - y) * (1 - 2 * y);
    default:
      return at::Tensor();
  }
}

struct PoolGeometry {
  std::vector<int64_t> kernel, stride, padding, dilation{1, 1};
  explicit PoolGeometry(const NetLayer& L)
      : kernel{L.ints[kPoolKernelInt], L.ints[kPoolKernelInt + 1]},
        stride{L.ints[kPoolStrideInt], L.ints[kPoolStrideInt + 1]},
        padding{L.ints[kPoolPaddingInt], L.ints[kPoolPaddingInt + 1]} {}
};

}  // namespace

at::Tensor task_major(const at::Tensor& v, int64_t tasks) { return v.unflatten(1, {tasks, -1}).transpose(0, 1); }
at::Tensor task_folded(const at::Tensor& v) { return v.transpose(0, 1).flatten(1, 2); }
at::Tensor fold_tasks(const at::Tensor& p) { return p.defined() ? p.flatten(0, 1) : p; }
at::Tensor unfold_tasks(const at::Tensor& g, const at::Tensor& param) {
  return g.defined() ? g.reshape(param.sizes()) : g;
}

namespace {

// Batch norm's check: x holds T tasks' channels.
void check_bn_input(const NetLayer& L, int64_t tasks, const at::Tensor& x) {
  const int64_t channels = L.ints[kBnChannelsInt];
  TORCH_CHECK(x.dim() >= 2 && x.size(1) == tasks * channels, "pymeta: BatchNorm over ", channels, " channels (",
              tasks, " task(s)) received an input of shape ", x.sizes());
}

}  // namespace

at::Tensor layer_forward(const NetLayer& L, int64_t tasks, const at::Tensor& x, const at::Tensor& x2,
                         const at::Tensor& w, const at::Tensor& b, LayerSaved& saved) {
  switch (L.kind) {
    case LayerKind::kLinear:
      return task_folded(linear(task_major(x, tasks), w, b));
    case LayerKind::kConv2d:
      return conv(ConvGeometry(L), tasks, x, conv_weight(w, x), fold_tasks(b));
    case LayerKind::kBatchNorm: {
      check_bn_input(L, tasks, x);
      const at::Tensor fw = fold_tasks(w), fb = fold_tasks(b);
      if (const BnKernels* fused = fused_bn(x)) return fused->forward(x, fw, fb, L.arg, saved.aux, saved.inv_std);
      auto [y, mean, inv_std] = at::native_batch_norm(x, optional(fw), optional(fb), {}, {}, true, 0.0, L.arg);
      saved.aux = mean;
      saved.inv_std = inv_std;
      return y;
    }
    case LayerKind::kActivation: {
      at::Tensor y = act_forward(L, x);
      saved.aux = y;  // the same tensor as the output value: no copy
      return y;
    }
    case LayerKind::kMaxPool2d: {
      const PoolGeometry g(L);
      auto [y, indices] = at::max_pool2d_with_indices(x, g.kernel, g.stride, g.padding, g.dilation, false);
      saved.aux = indices;
      return y;
    }
    case LayerKind::kAvgPool2d: {
      const PoolGeometry g(L);
      return at::avg_pool2d(x, g.kernel, g.stride, g.padding, false, L.flag != 0, std::nullopt);
    }
    case LayerKind::kFlatten:
      // (N, T*C, H, W) -> (N, T*C*H*W) keeps each task's features together, in their order.
      return x.flatten(1);
    case LayerKind::kAdd:
      TORCH_CHECK(x.sizes() == x2.sizes(), "pymeta: a residual add received inputs of shapes ", x.sizes(),
                  " and ", x2.sizes(), "; expected one shape");
      return x + x2;
    case LayerKind::kConcat:
      TORCH_CHECK(x.dim() >= 2 && x.dim() == x2.dim() && x.size(0) == x2.size(0) &&
                      x.sizes().slice(2) == x2.sizes().slice(2),
                  "pymeta: a channel concatenation received inputs of shapes ", x.sizes(), " and ", x2.sizes(),
                  "; expected equal shapes but for dim 1");
      if (tasks == 1) return at::cat({x, x2}, 1);
      return at::cat({x.unflatten(1, {tasks, -1}), x2.unflatten(1, {tasks, -1})}, 2).flatten(1, 2);
    case LayerKind::kGlobalAvgPool:
      TORCH_CHECK(x.dim() == 4, "pymeta: global average pooling expects (N, C, H, W) inputs, received ", x.sizes());
      return x.mean({2, 3}, true);
  }
  TORCH_CHECK(false, "pymeta: unknown layer kind");
}

LayerGrads layer_backward(const NetLayer& L, int64_t tasks, const at::Tensor& x, const at::Tensor& w,
                          const at::Tensor& b, const LayerSaved& saved, const at::Tensor& gy, bool need_x,
                          bool need_w) {
  LayerGrads g;
  switch (L.kind) {
    case LayerKind::kLinear: {
      const at::Tensor gyt = task_major(gy, tasks);
      if (need_x) g.x = task_folded(batched_gemm(gyt, w));
      if (!need_w) return g;
      g.w = linear_w_grad(gyt, task_major(x, tasks));
      if (b.defined()) g.b = gyt.sum(1);
      return g;
    }
    case LayerKind::kConv2d:
      if (!need_x && !need_w) return g;
      std::tie(g.x, g.w, g.b) =
          conv_vjp(ConvGeometry(L), tasks, gy, x, conv_weight(w, x), {need_x, need_w, need_w && b.defined()});
      g.w = unfold_tasks(g.w, w);
      g.b = unfold_tasks(g.b, b);
      return g;
    case LayerKind::kBatchNorm: {
      if (!need_x && (!w.defined() || !need_w)) return g;
      const at::Tensor fw = fold_tasks(w);
      if (const BnKernels* fused = fused_bn(x)) {
        BnGrads f = fused->backward(x, saved.aux, saved.inv_std, gy, fw, need_x);
        return {f.x, unfold_tasks(f.w, w), unfold_tasks(f.b, w)};
      }
      std::tie(g.x, g.w, g.b) = at::native_batch_norm_backward(gy, x, optional(fw), {}, {}, saved.aux, saved.inv_std,
                                                               true, L.arg, {need_x, w.defined(), w.defined()});
      g.w = unfold_tasks(g.w, w);
      g.b = unfold_tasks(g.b, w);
      return g;
    }
    case LayerKind::kActivation:
      if (need_x) g.x = act_times_d1(L, x, saved, gy);
      return g;
    case LayerKind::kMaxPool2d:
      if (need_x) {
        const PoolGeometry p(L);
        g.x = at::max_pool2d_with_indices_backward(gy, x, p.kernel, p.stride, p.padding, p.dilation, false,
                                                   saved.aux);
      }
      return g;
    case LayerKind::kAvgPool2d:
      if (need_x) {
        const PoolGeometry p(L);
        g.x = at::avg_pool2d_backward(gy, x, p.kernel, p.stride, p.padding, false, L.flag != 0, std::nullopt);
      }
      return g;
    case LayerKind::kFlatten:
      if (need_x) g.x = gy.reshape(x.sizes());
      return g;
    case LayerKind::kAdd:
      if (need_x) g.x = g.x2 = gy;
      return g;
    case LayerKind::kConcat:
      if (need_x) {
        const at::Tensor per_task = gy.unflatten(1, {tasks, -1});
        const int64_t c = x.size(1) / tasks;
        g.x = per_task.narrow(2, 0, c).flatten(1, 2);
        g.x2 = per_task.narrow(2, c, per_task.size(2) - c).flatten(1, 2);
      }
      return g;
    case LayerKind::kGlobalAvgPool:
      // Materialised in x's layout: the layers below expect dense gradients.
      if (need_x) {
        g.x = (gy * (1.0 / static_cast<double>(x.size(2) * x.size(3)))).expand(x.sizes())
                  .contiguous(x.suggest_memory_format());
      }
      return g;
  }
  TORCH_CHECK(false, "pymeta: unknown layer kind");
}

at::Tensor layer_r_forward(const NetLayer& L, int64_t tasks, const at::Tensor& x, const at::Tensor& x2,
                           const at::Tensor& w, const LayerSaved& saved, const at::Tensor& rx, const at::Tensor& rx2,
                           const at::Tensor& uw, const at::Tensor& ub, at::Tensor& r_saved) {
  at::Tensor ry;
  switch (L.kind) {
    case LayerKind::kLinear: {
      if (rx.defined()) ry = linear(task_major(rx, tasks), w, at::Tensor());
      if (uw.defined()) {
        accumulate(ry, linear(task_major(x, tasks), uw, ub));
      } else if (ub.defined()) {  // a bias tangent alone
        const at::Tensor bias = ub.unsqueeze(1);
        ry = ry.defined() ? ry + bias : bias.expand({tasks, x.size(0), ub.size(1)}).contiguous();
      }
      return ry.defined() ? task_folded(ry) : ry;
    }
    case LayerKind::kConv2d: {
      const ConvGeometry g(L);
      const at::Tensor fw = conv_weight(w, x), fub = fold_tasks(ub);
      if (const int block = winograd_block(g, tasks, x, fw)) {  // both terms in one batch of products
        const at::Tensor fuw = conv_weight(uw, x);
        ry = winograd_conv({{&rx, &fw}, {&x, &fuw}}, fub, tasks, false, block);
        if (ry.defined() || !ub.defined()) return ry;
        return add_bias(ry, fub, {x.size(0), fw.size(0), x.size(2), x.size(3)});
      }
      if (rx.defined()) ry = conv(g, tasks, rx, fw, at::Tensor());
      if (uw.defined()) {
        accumulate(ry, conv(g, tasks, x, conv_weight(uw, x), fub));
      } else if (ub.defined()) {  // a bias tangent alone
        std::vector<int64_t> shape{x.size(0), fw.size(0)};
        for (int i = 0; i < 2; ++i) {
          shape.push_back((x.size(2 + i) + 2 * g.padding[i] - fw.size(2 + i)) / g.stride[i] + 1);
        }
        ry = add_bias(ry, fub, shape);
      }
      return ry;
    }
    case LayerKind::kBatchNorm: {
      const at::Tensor fw = fold_tasks(w), fuw = fold_tasks(uw), fub = fold_tasks(ub);
      const BnKernels* fused = rx.defined() ? fused_bn(x) : nullptr;
      if (fused) return fused->r_forward(x, saved.aux, saved.inv_std, rx, fw, fuw, fub, r_saved);
      const at::Tensor xhat = bn_xhat(x, saved);
      if (rx.defined()) r_saved = bn_project(rx, xhat, bn_inv_std(x, saved));
      if (!w.defined()) return r_saved;
      if (r_saved.defined()) ry = r_saved * per_channel(fw, x);
      if (uw.defined()) {
        const at::Tensor scaled = xhat * per_channel(fuw, x);
        accumulate(ry, ub.defined() ? scaled + per_channel(fub, x) : scaled);
      } else if (ub.defined()) {  // a bias tangent alone
        ry = add_bias(ry, fub, x.sizes().vec());
      }
      return ry;
    }
    case LayerKind::kActivation:
      return rx.defined() ? act_times_d1(L, x, saved, rx) : ry;
    case LayerKind::kMaxPool2d: {
      if (!rx.defined()) return ry;
      const at::Tensor& indices = saved.aux;
      return rx.flatten(2).gather(2, indices.flatten(2)).view(indices.sizes());
    }
    case LayerKind::kAvgPool2d:
    case LayerKind::kFlatten:
    case LayerKind::kGlobalAvgPool:
      // Linear maps: the tangent goes through the layer itself.
      if (!rx.defined()) return ry;
      {
        LayerSaved unused;
        return layer_forward(L, tasks, rx, at::Tensor(), at::Tensor(), at::Tensor(), unused);
      }
    case LayerKind::kAdd:
      ry = rx.defined() ? rx : ry;
      if (rx2.defined()) ry = ry.defined() ? ry + rx2 : rx2;
      return ry;
    case LayerKind::kConcat: {
      if (!rx.defined() && !rx2.defined()) return ry;
      LayerSaved unused;
      return layer_forward(L, tasks, rx.defined() ? rx : at::zeros_like(x), rx2.defined() ? rx2 : at::zeros_like(x2),
                           at::Tensor(), at::Tensor(), unused);
    }
  }
  TORCH_CHECK(false, "pymeta: unknown layer kind");
}

LayerGrads layer_r_backward(const NetLayer& L, int64_t tasks, const at::Tensor& x, const at::Tensor& w,
                            const LayerSaved& saved, const at::Tensor& gy, const at::Tensor& rgy,
                            const at::Tensor& rx, const at::Tensor& uw, const at::Tensor& r_saved, bool need_x) {
  LayerGrads r;
  switch (L.kind) {
    case LayerKind::kLinear: {
      const at::Tensor xt = task_major(x, tasks), gyt = task_major(gy, tasks);
      if (rgy.defined()) {
        const at::Tensor rgyt = task_major(rgy, tasks);
        if (need_x) r.x = batched_gemm(rgyt, w);
        r.w = linear_w_grad(rgyt, xt);
        if (L.b_param >= 0) r.b = rgyt.sum(1);
      }
      if (need_x && uw.defined()) accumulate(r.x, batched_gemm(gyt, uw));
      if (rx.defined()) accumulate(r.w, linear_w_grad(gyt, task_major(rx, tasks)));
      if (r.x.defined()) r.x = task_folded(r.x);
      return r;
    }
    case LayerKind::kConv2d: {
      const ConvGeometry g(L);
      const at::Tensor fw = conv_weight(w, x);
      if (const int block = winograd_block(g, tasks, x, fw)) {  // each sum of two terms in one batch of products
        const at::Tensor fuw = conv_weight(uw, x);
        if (need_x) r.x = winograd_conv({{&rgy, &fw}, {&gy, &fuw}}, at::Tensor(), tasks, true, block);
        r.w = unfold_tasks(winograd_conv_weight_grad({{&rgy, &x}, {&gy, &rx}}, fw, tasks, block), w);
        if (rgy.defined() && L.b_param >= 0) r.b = rgy.sum({0, 2, 3}).view({tasks, -1});
        return r;
      }
      // R{dL/dw} = dw(rgy, x) + dw(gy, rx): one matrix product of both where that path applies.
      const bool gemm = weight_grad_by_gemm(gy, fw);
      if (rgy.defined()) std::tie(r.x, r.w, r.b) = conv_vjp(g, tasks, rgy, x, fw, {need_x, !gemm, L.b_param >= 0});
      if (need_x && uw.defined()) {
        accumulate(r.x, std::get<0>(conv_vjp(g, tasks, gy, x, conv_weight(uw, x), {true, false, false})));
      }
      if (gemm) {
        r.w = gemm_weight_grad(g, tasks, fw, {{&rgy, &x}, {&gy, &rx}});
      } else if (rx.defined()) {
        accumulate(r.w, std::get<1>(conv_vjp(g, tasks, gy, rx, fw, {false, true, false})));
      }
      r.w = unfold_tasks(r.w, w);
      if (r.b.defined()) r.b = r.b.view({tasks, -1});
      return r;
    }
    case LayerKind::kBatchNorm: {
      const at::Tensor fw = fold_tasks(w), fuw = fold_tasks(uw);
      const BnKernels* fused = rgy.defined() && rx.defined() ? fused_bn(x) : nullptr;
      if (fused) {
        BnGrads f = fused->r_backward(x, saved.aux, saved.inv_std, gy, rgy, rx, r_saved, fw, fuw, need_x);
        return {f.x, unfold_tasks(f.w, w), unfold_tasks(f.b, w)};
      }
      const at::Tensor xhat = bn_xhat(x, saved);
      const at::Tensor s = bn_inv_std(x, saved);
      const at::Tensor& rxhat = r_saved;
      if (w.defined()) {
        if (rgy.defined()) {
          r.w = channel_sum(rgy * xhat);
          r.b = channel_sum(rgy);
        }
        if (rxhat.defined()) accumulate(r.w, channel_sum(gy * rxhat));
        r.w = unfold_tasks(r.w, w);
        r.b = unfold_tasks(r.b, w);
      }
      if (!need_x) return r;
      // With gx̂ = w gy: dL/dx = s (gx̂ - mean(gx̂) - x̂ mean(gx̂ x̂)); its tangent, using
      // R{s} = -s^2 mean(x̂ rx) and the tangent R{x̂} kept by r_forward.
      const at::Tensor gxhat = w.defined() ? gy * per_channel(fw, x) : gy;
      at::Tensor rgxhat;
      if (rgy.defined()) rgxhat = w.defined() ? rgy * per_channel(fw, x) : rgy;
      if (uw.defined()) accumulate(rgxhat, gy * per_channel(fuw, x));
      if (rgxhat.defined()) r.x = bn_project(rgxhat, xhat, s);
      if (rxhat.defined()) {
        const at::Tensor gx = bn_project(gxhat, xhat, s);
        const at::Tensor r_s_over_s = -s * channel_mean(xhat * rx);
        at::Tensor t = gx * r_s_over_s - (rxhat * channel_mean(gxhat * xhat) + xhat * channel_mean(gxhat * rxhat)) * s;
        accumulate(r.x, t);
      }
      return r;
    }
    case LayerKind::kActivation: {
      if (!need_x) return r;
      // The second-order term act''(x) rx gy is zero almost everywhere for piecewise-linear ones.
      const bool second = rx.defined() && !activation_is_piecewise_linear(L.activation());
#ifdef PYMETA_WITH_CUDA
      const at::Tensor& a = act_d1_source(L, x, saved);
      const at::Tensor ra = second ? rx : at::Tensor();
      if ((rgy.defined() || second) && cuda_fused_kernels() && activation_cuda_applies({gy, a, saved.aux, rgy, ra})) {
        r.x = activation_r_backward_cuda(L.activation(), L.arg, a, saved.aux, gy, rgy, ra);  // one launch
        return r;
      }
#endif
      if (rgy.defined()) r.x = act_times_d1(L, x, saved, rgy);
      if (rx.defined()) {
        const at::Tensor d2 = act_d2(L, saved);
        if (d2.defined()) accumulate(r.x, d2 * rx * gy);
      }
      return r;
    }
    case LayerKind::kMaxPool2d:
    case LayerKind::kAvgPool2d:
    case LayerKind::kFlatten:
    case LayerKind::kAdd:
    case LayerKind::kConcat:
    case LayerKind::kGlobalAvgPool:
      // Linear in x with no parameters: the tangent goes back through the same backward.
      if (need_x && rgy.defined()) {
        const LayerGrads g = layer_backward(L, tasks, x, w, at::Tensor(), saved, rgy, true);
        r.x = g.x;
        r.x2 = g.x2;
      }
      return r;
  }
  TORCH_CHECK(false, "pymeta: unknown layer kind");
}

}  // namespace pymeta
