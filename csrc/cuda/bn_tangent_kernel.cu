// Batch norm's four rules as CUDA kernels (see fused_layers.h; the formulas and their notation
// are cpu/bn_tangent.cpp's). One thread block owns one channel: it sums the channel's terms in
// double, reduces them over its threads in a fixed order, derives the channel's coefficients and
// writes the channel's outputs, all in one launch.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/fused_layers.h"
#include "cuda/launch.h"

namespace pymeta {
namespace {

// Where element j of channel c lies in x: x is (outer, C, inner) in memory, inner = 1 for (N, C)
// and for channels-last images; `count` = outer * inner elements per channel.
struct ChannelView {
  int64_t C, inner, count;
  __device__ int64_t at(int64_t c, int64_t j) const {
    const int64_t n = j / inner;
    return (n * C + c) * inner + (j - n * inner);
  }
};

ChannelView channel_view(const at::Tensor& x) {
  const int64_t C = x.size(1);
  const int64_t inner = x.is_contiguous() ? x.numel() / (x.size(0) * C) : 1;
  return {C, inner, x.numel() / C};
}

// acc[0..P) summed over the block's threads in a fixed tree order; every thread gets the totals.
template <int P>
__device__ void block_sums(double (&acc)[P]) {
  __shared__ double buf[P][kThreads];
  for (int k = 0; k < P; ++k) buf[k][threadIdx.x] = acc[k];
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      for (int k = 0; k < P; ++k) buf[k][threadIdx.x] += buf[k][threadIdx.x + s];
    }
    __syncthreads();
  }
  for (int k = 0; k < P; ++k) acc[k] = buf[k][0];
  __syncthreads();  // buf is read by all before any thread may write it again
}

// A per-channel operand, or `fill` where it is absent (a null pointer).
template <typename T>
__device__ T channel_or(const T* p, int64_t c, T fill) {
  return p ? p[c] : fill;
}

// acc = {sum v, sum x̂ v} over channel c, x̂ = (x - mu) s, reduced over the block.
template <typename T>
__device__ void v_and_xhat_v_sums(const ChannelView& view, int64_t c, const T* __restrict__ x,
                                  const T* __restrict__ v, T mu, T s, double (&acc)[2]) {
  acc[0] = acc[1] = 0;
  for (int64_t j = threadIdx.x; j < view.count; j += blockDim.x) {
    const int64_t i = view.at(c, j);
    const T xh = (x[i] - mu) * s, vi = v[i];
    acc[0] += static_cast<double>(vi);
    acc[1] += static_cast<double>(xh * vi);
  }
  block_sums(acc);
}

// y = w x̂ + b; mean and inv_std from sums in double shifted by the channel's first element.
template <typename T>
__global__ void bn_forward_kernel(ChannelView v, const T* __restrict__ x, const T* __restrict__ w,
                                  const T* __restrict__ b, double eps, T* __restrict__ y, T* __restrict__ mean,
                                  T* __restrict__ inv_std) {
  const int64_t c = blockIdx.x;
  const double shift = static_cast<double>(x[v.at(c, 0)]);
  double acc[2] = {0, 0};
  for (int64_t j = threadIdx.x; j < v.count; j += blockDim.x) {
    const double d = static_cast<double>(x[v.at(c, j)]) - shift;
    acc[0] += d;
    acc[1] += d * d;
  }
  block_sums(acc);
  const double m = static_cast<double>(v.count), mean_shifted = acc[0] / m;
  double var = acc[1] / m - mean_shifted * mean_shifted;
  var = var < 0.0 ? 0.0 : var;  // a NaN stays NaN
  const T mu = static_cast<T>(shift + mean_shifted), s = static_cast<T>(1.0 / sqrt(var + eps));
  const T scale = s * channel_or(w, c, T(1)), offset = channel_or(b, c, T(0)) - mu * scale;
  if (threadIdx.x == 0) {
    mean[c] = mu;
    inv_std[c] = s;
  }
  for (int64_t j = threadIdx.x; j < v.count; j += blockDim.x) {
    const int64_t i = v.at(c, j);
    y[i] = x[i] * scale + offset;
  }
}

// dL/dx = alpha (x - mean) + k gy + gamma; dL/dw = sum(x̂ gy), dL/db = sum(gy).
template <typename T>
__global__ void bn_backward_kernel(ChannelView v, const T* __restrict__ x, const T* __restrict__ gy,
                                   const T* __restrict__ mean, const T* __restrict__ inv_std, const T* __restrict__ w,
                                   T* __restrict__ gx, T* __restrict__ gw, T* __restrict__ gb) {
  const int64_t c = blockIdx.x;
  const T mu = mean[c], s = inv_std[c];
  double acc[2];
  v_and_xhat_v_sums(v, c, x, gy, mu, s, acc);
  if (threadIdx.x == 0 && gw) {
    gw[c] = static_cast<T>(acc[1]);
    gb[c] = static_cast<T>(acc[0]);
  }
  if (!gx) return;
  const double m = static_cast<double>(v.count), sc = s, kc = sc * static_cast<double>(channel_or(w, c, T(1)));
  const T k = static_cast<T>(kc), alpha = static_cast<T>(-kc * sc * (acc[1] / m)),
          gamma = static_cast<T>(-kc * (acc[0] / m));
  for (int64_t j = threadIdx.x; j < v.count; j += blockDim.x) {
    const int64_t i = v.at(c, j);
    gx[i] = alpha * (x[i] - mu) + k * gy[i] + gamma;
  }
}

// rxhat = s (rx - mean(rx) - x̂ mean(x̂ rx)); ry = w rxhat + uw x̂ + ub (when ry is wanted).
template <typename T>
__global__ void bn_r_forward_kernel(ChannelView v, const T* __restrict__ x, const T* __restrict__ rx,
                                    const T* __restrict__ mean, const T* __restrict__ inv_std,
                                    const T* __restrict__ w, const T* __restrict__ uw, const T* __restrict__ ub,
                                    T* __restrict__ rxhat, T* __restrict__ ry) {
  const int64_t c = blockIdx.x;
  const T mu = mean[c], s = inv_std[c];
  double acc[2];
  v_and_xhat_v_sums(v, c, x, rx, mu, s, acc);
  const double m = static_cast<double>(v.count);
  const T m_rx = static_cast<T>(acc[0] / m), m_xrx = static_cast<T>(acc[1] / m);
  const T wc = channel_or(w, c, T(1)), uwc = channel_or(uw, c, T(0)), ubc = channel_or(ub, c, T(0));
  for (int64_t j = threadIdx.x; j < v.count; j += blockDim.x) {
    const int64_t i = v.at(c, j);
    const T xh = (x[i] - mu) * s;
    const T rxh = s * (rx[i] - m_rx - xh * m_xrx);
    rxhat[i] = rxh;
    if (ry) ry[i] = wc * rxh + uwc * xh + ubc;
  }
}

// The tangent of the backward: sums of gy, x̂ gy, rgy, x̂ rgy, x̂ rx, gy rxhat, then
// out = s (rĝ - m_rĝ - x̂ m_x̂rĝ) - s m_x̂rx gx - s (rxhat m_x̂ĝ + x̂ m_ĝrxhat) with ĝ = w gy,
// rĝ = w rgy + uw gy and gx = s (ĝ - m_ĝ - x̂ m_x̂ĝ); R{dL/dw} = sum(x̂ rgy + gy rxhat), R{dL/db} = sum(rgy).
template <typename T>
__global__ void bn_r_backward_kernel(ChannelView v, const T* __restrict__ x, const T* __restrict__ gy,
                                     const T* __restrict__ rgy, const T* __restrict__ rx,
                                     const T* __restrict__ rxhat, const T* __restrict__ mean,
                                     const T* __restrict__ inv_std, const T* __restrict__ w,
                                     const T* __restrict__ uw, T* __restrict__ out, T* __restrict__ rgw,
                                     T* __restrict__ rgb) {
  const int64_t c = blockIdx.x;
  const T mu = mean[c], s = inv_std[c];
  double acc[6] = {0, 0, 0, 0, 0, 0};
  for (int64_t j = threadIdx.x; j < v.count; j += blockDim.x) {
    const int64_t i = v.at(c, j);
    const T xh = (x[i] - mu) * s, g = gy[i], rg = rgy[i];
    acc[0] += static_cast<double>(g);
    acc[1] += static_cast<double>(xh * g);
    acc[2] += static_cast<double>(rg);
    acc[3] += static_cast<double>(xh * rg);
    acc[4] += static_cast<double>(xh * rx[i]);
    acc[5] += static_cast<double>(g * rxhat[i]);
  }
  block_sums(acc);
  if (threadIdx.x == 0 && rgw) {
    rgw[c] = static_cast<T>(acc[3] + acc[5]);
    rgb[c] = static_cast<T>(acc[2]);
  }
  if (!out) return;
  const double m = static_cast<double>(v.count);
  const double wd = static_cast<double>(channel_or(w, c, T(1))), ud = static_cast<double>(channel_or(uw, c, T(0)));
  const T wc = static_cast<T>(wd), uc = static_cast<T>(ud), m_gxh = static_cast<T>(wd * acc[0] / m),
          m_xgxh = static_cast<T>(wd * acc[1] / m), m_rgxh = static_cast<T>((wd * acc[2] + ud * acc[0]) / m),
          m_xrgxh = static_cast<T>((wd * acc[3] + ud * acc[1]) / m), m_xrx = static_cast<T>(acc[4] / m),
          m_gxh_rxh = static_cast<T>(wd * acc[5] / m);
  for (int64_t j = threadIdx.x; j < v.count; j += blockDim.x) {
    const int64_t i = v.at(c, j);
    const T xh = (x[i] - mu) * s;
    const T gxh = wc * gy[i], rgxh = wc * rgy[i] + uc * gy[i];
    const T gx = s * (gxh - m_gxh - xh * m_xgxh);
    out[i] = s * (rgxh - m_rgxh - xh * m_xrgxh) - s * m_xrx * gx - s * (rxhat[i] * m_xgxh + xh * m_gxh_rxh);
  }
}

// An operand of x's shape in x's layout (a no-op when it already is).
at::Tensor like_x(const char* what, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type() && t.device() == x.device(),
              "pymeta: batch norm's CUDA kernel got ", what, " of shape ", t.sizes(), ", ", t.scalar_type(), " on ",
              t.device(), " for an input of shape ", x.sizes(), ", ", x.scalar_type(), " on ", x.device());
  return t.contiguous(x.is_contiguous() ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast);
}

// A (C) per-channel operand, contiguous; undefined stays undefined (a null pointer below).
at::Tensor channel_operand(const char* what, const at::Tensor& t, const at::Tensor& x) {
  if (!t.defined()) return t;
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1) && t.scalar_type() == x.scalar_type() &&
                  t.device() == x.device(),
              "pymeta: batch norm's CUDA kernel got ", what, " of shape ", t.sizes(), ", ", t.scalar_type(), " on ",
              t.device(), "; expected (", x.size(1), "), ", x.scalar_type(), " on ", x.device());
  return t.contiguous();
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}
template <typename T>
T* mut_ptr(at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

void check_input(const char* rule, const at::Tensor& x) {
  TORCH_CHECK(bn_cuda_applies(x), "pymeta: ", rule, " got an input it does not take: ", x.sizes(), ", ",
              x.scalar_type(), " on ", x.device());
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// The outputs a backward rule writes: dL/dx (with need_x) in x's layout, dL/dw and dL/db (C)
// with affine parameters.
BnGrads grads_for(const at::Tensor& x, bool need_x, bool affine) {
  BnGrads r;
  if (need_x) r.x = at::empty_like(x);
  if (affine) {
    r.w = at::empty({x.size(1)}, x.options());
    r.b = at::empty({x.size(1)}, x.options());
  }
  return r;
}

}  // namespace

bool bn_cuda_applies(const at::Tensor& x) {
  return x.is_cuda() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) && x.dim() >= 2 &&
         x.numel() > 0 && (x.is_contiguous() || (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)));
}

at::Tensor bn_forward_cuda(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in, double eps,
                           at::Tensor& mean, at::Tensor& inv_std) {
  check_input("bn_forward_cuda", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = channel_operand("w", w_in, x), b = channel_operand("b", b_in, x);
  const ChannelView v = channel_view(x);
  mean = at::empty({v.C}, x.options());
  inv_std = at::empty({v.C}, x.options());
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_forward_cuda", [&] {
    bn_forward_kernel<scalar_t><<<v.C, kThreads, 0, stream()>>>(
        v, x.const_data_ptr<scalar_t>(), ptr<scalar_t>(w), ptr<scalar_t>(b), eps, y.mutable_data_ptr<scalar_t>(),
        mean.mutable_data_ptr<scalar_t>(), inv_std.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

BnGrads bn_backward_cuda(const at::Tensor& x, const at::Tensor& mean_in, const at::Tensor& inv_std_in,
                         const at::Tensor& gy_in, const at::Tensor& w_in, bool need_x) {
  check_input("bn_backward_cuda", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor gy = like_x("gy", gy_in, x), mean = channel_operand("mean", mean_in, x),
                   inv_std = channel_operand("inv_std", inv_std_in, x), w = channel_operand("w", w_in, x);
  const ChannelView v = channel_view(x);
  BnGrads r = grads_for(x, need_x, w.defined());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_backward_cuda", [&] {
    bn_backward_kernel<scalar_t><<<v.C, kThreads, 0, stream()>>>(
        v, x.const_data_ptr<scalar_t>(), gy.const_data_ptr<scalar_t>(), mean.const_data_ptr<scalar_t>(),
        inv_std.const_data_ptr<scalar_t>(), ptr<scalar_t>(w), mut_ptr<scalar_t>(r.x), mut_ptr<scalar_t>(r.w),
        mut_ptr<scalar_t>(r.b));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return r;
}

at::Tensor bn_r_forward_cuda(const at::Tensor& x, const at::Tensor& mean_in, const at::Tensor& inv_std_in,
                             const at::Tensor& rx_in, const at::Tensor& w_in, const at::Tensor& uw_in,
                             const at::Tensor& ub_in, at::Tensor& rxhat) {
  check_input("bn_r_forward_cuda", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor rx = like_x("rx", rx_in, x), mean = channel_operand("mean", mean_in, x),
                   inv_std = channel_operand("inv_std", inv_std_in, x), w = channel_operand("w", w_in, x),
                   uw = channel_operand("uw", uw_in, x), ub = channel_operand("ub", ub_in, x);
  const ChannelView v = channel_view(x);
  rxhat = at::empty_like(x);
  at::Tensor ry = w.defined() ? at::empty_like(x) : at::Tensor();  // without w (w = 1, uw = ub = 0), ry = rxhat
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_r_forward_cuda", [&] {
    bn_r_forward_kernel<scalar_t><<<v.C, kThreads, 0, stream()>>>(
        v, x.const_data_ptr<scalar_t>(), rx.const_data_ptr<scalar_t>(), mean.const_data_ptr<scalar_t>(),
        inv_std.const_data_ptr<scalar_t>(), ptr<scalar_t>(w), ptr<scalar_t>(uw), ptr<scalar_t>(ub),
        rxhat.mutable_data_ptr<scalar_t>(), mut_ptr<scalar_t>(ry));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return w.defined() ? ry : rxhat;
}

BnGrads bn_r_backward_cuda(const at::Tensor& x, const at::Tensor& mean_in, const at::Tensor& inv_std_in,
                           const at::Tensor& gy_in, const at::Tensor& rgy_in, const at::Tensor& rx_in,
                           const at::Tensor& rxhat_in, const at::Tensor& w_in, const at::Tensor& uw_in, bool need_x) {
  check_input("bn_r_backward_cuda", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor gy = like_x("gy", gy_in, x), rgy = like_x("rgy", rgy_in, x), rx = like_x("rx", rx_in, x),
                   rxhat = like_x("rxhat", rxhat_in, x), mean = channel_operand("mean", mean_in, x),
                   inv_std = channel_operand("inv_std", inv_std_in, x), w = channel_operand("w", w_in, x),
                   uw = channel_operand("uw", uw_in, x);
  const ChannelView v = channel_view(x);
  BnGrads r = grads_for(x, need_x, w.defined());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_r_backward_cuda", [&] {
    bn_r_backward_kernel<scalar_t><<<v.C, kThreads, 0, stream()>>>(
        v, x.const_data_ptr<scalar_t>(), gy.const_data_ptr<scalar_t>(), rgy.const_data_ptr<scalar_t>(),
        rx.const_data_ptr<scalar_t>(), rxhat.const_data_ptr<scalar_t>(), mean.const_data_ptr<scalar_t>(),
        inv_std.const_data_ptr<scalar_t>(), ptr<scalar_t>(w), ptr<scalar_t>(uw), mut_ptr<scalar_t>(r.x),
        mut_ptr<scalar_t>(r.w), mut_ptr<scalar_t>(r.b));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return r;
}

}  // namespace pymeta
