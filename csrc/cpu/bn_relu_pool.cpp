// See bn_relu_pool.h. Channels-last memory is (N, H, W, C): every loop below runs over the C
// contiguous channels of one pixel innermost, so it vectorises; images are spread over threads,
// and per-image partial sums are added in image order, so results do not depend on the thread
// count.
#include "cpu/bn_relu_pool.h"
#include "cpu/multiversion.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace pymeta {
namespace {

struct Geometry {
  int64_t n, c, h, w, ho, wo;
  explicit Geometry(const at::Tensor& x)
      : n(x.size(0)), c(x.size(1)), h(x.size(2)), w(x.size(3)), ho(h / 2), wo(w / 2) {}
  int64_t image() const { return h * w * c; }          // elements of one image
  int64_t pooled_image() const { return ho * wo * c; }  // elements of one pooled image
  int64_t pixels() const { return n * h * w; }          // values per channel
};

// `parts` sums of C channels per image (image_sums(i, acc) adds image i's into acc), reduced in
// image order.
template <typename F>
std::vector<double> per_channel_sums(const Geometry& g, int64_t parts, const F& image_sums) {
  const int64_t width = parts * g.c;
  std::vector<double> partial(g.n * width, 0.0);
  at::parallel_for(0, g.n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) image_sums(i, partial.data() + i * width);
  });
  std::vector<double> total(width, 0.0);
  for (int64_t i = 0; i < g.n; ++i) {
    for (int64_t k = 0; k < width; ++k) total[k] += partial[i * width + k];
  }
  return total;
}

// ---- per-image loops over raw pointers, built for AVX-512, AVX2 and baseline x86-64
// (PYMETA_MULTIVERSION); `restrict` lets the compiler vectorise the channel loops.

// acc[c] += sum of (x - shift[c]), acc[C + c] += sum of its square, over one image's pixels.
template <typename T>
inline void image_stats_impl(int64_t pixels, int64_t C, const T* __restrict x, const double* __restrict shift,
                             double* __restrict acc) {
  double* __restrict acc2 = acc + C;
  for (int64_t p = 0; p < pixels; ++p) {
    const T* __restrict v = x + p * C;
    for (int64_t c = 0; c < C; ++c) {
      const double d = static_cast<double>(v[c]) - shift[c];
      acc[c] += d;
      acc2[c] += d * d;
    }
  }
}

// One image's pooled output and argmax: y = x * scale + offset, max over each 2x2 window (the
// first maximum in row-major order wins, as in ATen), then ReLU (which commutes with the
// maximum). NaN needs no test here: a NaN or infinite input makes its channel's statistics, and
// so every y of the channel, NaN, and the output stays NaN. (Testing y != y too, with | or ||,
// stops GCC vectorising the loop.)
template <typename T>
inline void image_forward_impl(int64_t H, int64_t W, int64_t C, const T* __restrict x, const T* __restrict scale,
                               const T* __restrict offset, T* __restrict out, T* __restrict arg) {
  const int64_t Ho = H / 2, Wo = W / 2, row = W * C;
  for (int64_t ph = 0; ph < Ho; ++ph) {
    for (int64_t pw = 0; pw < Wo; ++pw) {
      const T* __restrict p00 = x + (2 * ph * W + 2 * pw) * C;
      const T* __restrict p01 = p00 + C;
      const T* __restrict p10 = p00 + row;
      const T* __restrict p11 = p10 + C;
      T* __restrict o = out + (ph * Wo + pw) * C;
      T* __restrict a = arg + (ph * Wo + pw) * C;
      for (int64_t c = 0; c < C; ++c) {
        T best = p00[c] * scale[c] + offset[c];
        T at = T(0);
        const T y1 = p01[c] * scale[c] + offset[c];
        const T y2 = p10[c] * scale[c] + offset[c];
        const T y3 = p11[c] * scale[c] + offset[c];
        const bool t1 = y1 > best;
        best = t1 ? y1 : best;
        at = t1 ? T(1) : at;
        const bool t2 = y2 > best;
        best = t2 ? y2 : best;
        at = t2 ? T(2) : at;
        const bool t3 = y3 > best;
        best = t3 ? y3 : best;
        at = t3 ? T(3) : at;
        o[c] = best <= T(0) ? T(0) : best;  // keeps NaN, as ReLU does
        a[c] = at;
      }
    }
  }
}

// The batch-norm output's gradient gy is gout at each window's argmax where out > 0, else 0;
// acc[c] += its sum, acc[C + c] += the sum of gy * x̂, over one image.
template <typename T>
inline void image_grad_sums_impl(int64_t H, int64_t W, int64_t C, const T* __restrict x, const T* __restrict gout,
                                 const T* __restrict out, const T* __restrict arg, const T* __restrict mean,
                                 const T* __restrict inv_std, double* __restrict acc) {
  const int64_t Ho = H / 2, Wo = W / 2, row = W * C;
  double* __restrict acc2 = acc + C;
  for (int64_t ph = 0; ph < Ho; ++ph) {
    for (int64_t pw = 0; pw < Wo; ++pw) {
      const T* __restrict p00 = x + (2 * ph * W + 2 * pw) * C;
      const T* __restrict p01 = p00 + C;
      const T* __restrict p10 = p00 + row;
      const T* __restrict p11 = p10 + C;
      const int64_t k = (ph * Wo + pw) * C;
      for (int64_t c = 0; c < C; ++c) {
        // Unconditional loads and selects, so the loop vectorises.
        const T at = arg[k + c];
        const T v0 = p00[c], v1 = p01[c], v2 = p10[c], v3 = p11[c], go = gout[k + c];
        const T v = at == T(0) ? v0 : at == T(1) ? v1 : at == T(2) ? v2 : v3;
        const double gy = out[k + c] <= T(0) ? 0.0 : static_cast<double>(go);  // NaN passes
        acc[c] += gy;
        acc2[c] += gy * ((static_cast<double>(v) - mean[c]) * inv_std[c]);
      }
    }
  }
}

// dL/dx over one image: alpha (x - mean) + gamma everywhere, plus k gy at the argmaxes.
template <typename T>
inline void image_grad_x_impl(int64_t H, int64_t W, int64_t C, const T* __restrict x, const T* __restrict gout,
                              const T* __restrict out, const T* __restrict arg, const T* __restrict mean,
                              const T* __restrict k, const T* __restrict alpha, const T* __restrict gamma,
                              T* __restrict gx) {
  const int64_t Ho = H / 2, Wo = W / 2, row = W * C;
  auto linear = [&](int64_t pixel) {  // a pixel in no window: gy = 0
    const T* __restrict xs = x + pixel * C;
    T* __restrict gs = gx + pixel * C;
    for (int64_t c = 0; c < C; ++c) gs[c] = alpha[c] * (xs[c] - mean[c]) + gamma[c];
  };
  // Per pooled row, first k gy (zero where ReLU stopped the gradient).
  std::vector<T> kg_row(Wo * C);
  for (int64_t ph = 0; ph < Ho; ++ph) {
    const int64_t q = ph * Wo * C;
    T* __restrict kg_buf = kg_row.data();
    for (int64_t pw = 0; pw < Wo; ++pw) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t e = pw * C + c;
        kg_buf[e] = out[q + e] <= T(0) ? T(0) : k[c] * gout[q + e];  // NaN passes
      }
    }
    for (int64_t pw = 0; pw < Wo; ++pw) {
      const int64_t o = (2 * ph * W + 2 * pw) * C;
      const T* __restrict x00 = x + o;
      const T* __restrict x01 = x00 + C;
      const T* __restrict x10 = x00 + row;
      const T* __restrict x11 = x10 + C;
      T* __restrict g00 = gx + o;
      T* __restrict g01 = g00 + C;
      T* __restrict g10 = g00 + row;
      T* __restrict g11 = g10 + C;
      const T* __restrict at = arg + q + pw * C;
      const T* __restrict kg = kg_buf + pw * C;
      for (int64_t c = 0; c < C; ++c) {
        // All four selects first, then the stores: in this order GCC if-converts the loop.
        const T al = alpha[c], mu = mean[c], ga = gamma[c], a = at[c], g = kg[c], z = T(0);
        const T s0 = a == T(0) ? g : z, s1 = a == T(1) ? g : z, s2 = a == T(2) ? g : z, s3 = a == T(3) ? g : z;
        g00[c] = al * (x00[c] - mu) + ga + s0;
        g01[c] = al * (x01[c] - mu) + ga + s1;
        g10[c] = al * (x10[c] - mu) + ga + s2;
        g11[c] = al * (x11[c] - mu) + ga + s3;
      }
    }
    if (W % 2 == 1) {  // the last column of both rows is in no window
      linear(2 * ph * W + W - 1);
      linear((2 * ph + 1) * W + W - 1);
    }
  }
  for (int64_t p = 2 * Ho * W; p < H * W; ++p) linear(p);  // the last row, when H is odd
}

#define PYMETA_BN_RELU_POOL_DEFS(T)                                                                          \
  PYMETA_MULTIVERSION void image_stats(int64_t pixels, int64_t C, const T* x, const double* shift,          \
                                       double* acc) {                                                       \
    image_stats_impl<T>(pixels, C, x, shift, acc);                                                          \
  }                                                                                                         \
  PYMETA_MULTIVERSION void image_forward(int64_t H, int64_t W, int64_t C, const T* x, const T* scale,       \
                                         const T* offset, T* out, T* arg) {                          \
    image_forward_impl<T>(H, W, C, x, scale, offset, out, arg);                                             \
  }                                                                                                         \
  PYMETA_MULTIVERSION void image_grad_sums(int64_t H, int64_t W, int64_t C, const T* x, const T* gout,      \
                                           const T* out, const T* arg, const T* mean,                \
                                           const T* inv_std, double* acc) {                                 \
    image_grad_sums_impl<T>(H, W, C, x, gout, out, arg, mean, inv_std, acc);                                \
  }                                                                                                         \
  PYMETA_MULTIVERSION void image_grad_x(int64_t H, int64_t W, int64_t C, const T* x, const T* gout,         \
                                        const T* out, const T* arg, const T* mean, const T* k,        \
                                        const T* alpha, const T* gamma, T* gx) {                            \
    image_grad_x_impl<T>(H, W, C, x, gout, out, arg, mean, k, alpha, gamma, gx);                            \
  }

PYMETA_BN_RELU_POOL_DEFS(float)
PYMETA_BN_RELU_POOL_DEFS(double)
#undef PYMETA_BN_RELU_POOL_DEFS

template <typename T>
void forward_impl(const Geometry& g, const T* x, const T* w, const T* b, double eps, T* out, T* arg,
                  T* mean_out, T* inv_std_out) {
  const int64_t C = g.c;
  // Sums of (x - shift) and its square, shifted by one sample per channel so that a large mean
  // does not cancel the variance.
  const std::vector<double> shift(x, x + C);
  const std::vector<double> sums = per_channel_sums(
      g, 2, [&](int64_t i, double* acc) { image_stats(g.h * g.w, C, x + i * g.image(), shift.data(), acc); });
  const double m = static_cast<double>(g.pixels());
  std::vector<T> scale(C), offset(C);
  for (int64_t c = 0; c < C; ++c) {
    const double mean_shifted = sums[c] / m;
    const double var = std::max(sums[C + c] / m - mean_shifted * mean_shifted, 0.0);
    const double mean = shift[c] + mean_shifted;
    const double inv_std = 1.0 / std::sqrt(var + eps);
    mean_out[c] = static_cast<T>(mean);
    inv_std_out[c] = static_cast<T>(inv_std);
    // y = x * scale + offset, as ATen's batch norm computes it.
    const T s = static_cast<T>(inv_std) * (w != nullptr ? w[c] : T(1));
    scale[c] = s;
    offset[c] = (b != nullptr ? b[c] : T(0)) - static_cast<T>(mean) * s;
  }
  at::parallel_for(0, g.n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      image_forward(g.h, g.w, C, x + i * g.image(), scale.data(), offset.data(), out + i * g.pooled_image(),
                    arg + i * g.pooled_image());
    }
  });
}

template <typename T>
void backward_impl(const Geometry& g, const T* gout, const T* x, const T* w, const T* out, const T* arg,
                   const T* mean, const T* inv_std, T* gx, T* gw, T* gb) {
  const int64_t C = g.c;
  const std::vector<double> sums = per_channel_sums(g, 2, [&](int64_t i, double* acc) {
    const int64_t q = i * g.pooled_image();
    image_grad_sums(g.h, g.w, C, x + i * g.image(), gout + q, out + q, arg + q, mean, inv_std, acc);
  });
  for (int64_t c = 0; c < C && gw != nullptr; ++c) {
    gw[c] = static_cast<T>(sums[C + c]);
    gb[c] = static_cast<T>(sums[c]);
  }
  if (gx == nullptr) return;
  // dL/dx = k (gy - mean(gy) - x̂ mean(gy x̂)) with k = w * inv_std, that is
  // alpha (x - mean) + k gy + gamma per element.
  const double m = static_cast<double>(g.pixels());
  std::vector<T> k(C), alpha(C), gamma(C);
  for (int64_t c = 0; c < C; ++c) {
    const double kc = static_cast<double>(inv_std[c]) * (w != nullptr ? static_cast<double>(w[c]) : 1.0);
    k[c] = static_cast<T>(kc);
    alpha[c] = static_cast<T>(-kc * (sums[C + c] / m) * static_cast<double>(inv_std[c]));
    gamma[c] = static_cast<T>(-kc * (sums[c] / m));
  }
  at::parallel_for(0, g.n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t q = i * g.pooled_image();
      image_grad_x(g.h, g.w, C, x + i * g.image(), gout + q, out + q, arg + q, mean, k.data(), alpha.data(),
                   gamma.data(), gx + i * g.image());
    }
  });
}

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

}  // namespace

bool bn_relu_pool_applies(const at::Tensor& x) {
  return x.is_cpu() && x.dim() == 4 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) &&
         x.size(2) >= 2 && x.size(3) >= 2 && x.size(0) * x.size(2) * x.size(3) >= 2 &&
         x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::Tensor bn_relu_pool_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double eps,
                                BnReluPoolSaved& saved) {
  TORCH_CHECK(bn_relu_pool_applies(x), "pymeta: bn_relu_pool_forward got an input it does not take: ", x.sizes());
  const Geometry g(x);
  const auto channels_last = x.options().memory_format(at::MemoryFormat::ChannelsLast);
  at::Tensor out = at::empty({g.n, g.c, g.ho, g.wo}, channels_last);
  saved.argmax = at::empty({g.n, g.c, g.ho, g.wo}, channels_last);
  saved.mean = at::empty({g.c}, x.options());
  saved.inv_std = at::empty({g.c}, x.options());
  const at::Tensor wc = w.defined() ? w.contiguous() : w, bc = b.defined() ? b.contiguous() : b;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_pool_forward", [&] {
    forward_impl<scalar_t>(g, x.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(wc), data_or_null<scalar_t>(bc),
                           eps, out.mutable_data_ptr<scalar_t>(), saved.argmax.mutable_data_ptr<scalar_t>(),
                           saved.mean.mutable_data_ptr<scalar_t>(), saved.inv_std.mutable_data_ptr<scalar_t>());
  });
  return out;
}

BnReluPoolGrads bn_relu_pool_backward(const at::Tensor& gout, const at::Tensor& x, const at::Tensor& w,
                                      const at::Tensor& out, const BnReluPoolSaved& saved, bool need_x) {
  const Geometry g(x);
  BnReluPoolGrads grads;
  if (!need_x && !w.defined()) return grads;
  const at::Tensor go = gout.contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(go.sizes() == out.sizes(), "pymeta: bn_relu_pool_backward: gradient of shape ", go.sizes(),
              " for an output of shape ", out.sizes());
  if (need_x) grads.x = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (w.defined()) {
    grads.w = at::empty({g.c}, x.options());
    grads.b = at::empty({g.c}, x.options());
  }
  const at::Tensor wc = w.defined() ? w.contiguous() : w;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_pool_backward", [&] {
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.mutable_data_ptr<scalar_t>() : nullptr; };
    backward_impl<scalar_t>(g, go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                            data_or_null<scalar_t>(wc), out.const_data_ptr<scalar_t>(),
                            saved.argmax.const_data_ptr<scalar_t>(), saved.mean.const_data_ptr<scalar_t>(),
                            saved.inv_std.const_data_ptr<scalar_t>(), ptr(grads.x), ptr(grads.w), ptr(grads.b));
  });
  return grads;
}

}  // namespace pymeta
