// See bn_relu_pool.h. Channels-last memory is (N, H, W, C): every loop below runs over the C
// contiguous channels of one pixel innermost, so it vectorises; images are spread over threads,
// and per-image partial sums are added in image order, so results do not depend on the thread
// count.
#include "cpu/bn_relu_pool.h"
#include "cpu/bn_tangent.h"
#include "cpu/fixed_order_sums.h"
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

// ---- The channel loops: one 2x2 window (four pixels of C channels, `p` rows apart) per call.
// Each is a non-template function per dtype with `restrict` pointer parameters, built for
// AVX-512, AVX2 and baseline x86-64 (PYMETA_MULTIVERSION): GCC vectorises these loops only with
// restrict parameters, and a loop inlined from a template would be built for baseline x86-64.
// Selects compute both sides and are written before the stores, which GCC if-converts.
//
// NaN needs no test in the forward: a NaN or infinite input makes its channel's statistics, and
// so every y of the channel, NaN; the output then stays NaN (testing y != y too stops GCC
// vectorising the loop).
#define PYMETA_BN_RELU_POOL_DEFS(T)                                                                              \
  /* y = x * scale + offset at the four pixels; out = ReLU(max y) (ReLU commutes with the max), */             \
  /* arg = the first maximum's position 0..3 in row-major order, as in ATen. */                                 \
  PYMETA_MULTIVERSION void forward_window(int64_t C, const T* __restrict p0, const T* __restrict p1,            \
                                          const T* __restrict p2, const T* __restrict p3,                      \
                                          const T* __restrict scale, const T* __restrict offset,               \
                                          T* __restrict out, T* __restrict arg) {                               \
    for (int64_t c = 0; c < C; ++c) {                                                                            \
      const T s = scale[c], o = offset[c];                                                                       \
      const T y0 = p0[c] * s + o, y1 = p1[c] * s + o, y2 = p2[c] * s + o, y3 = p3[c] * s + o;                   \
      T best = y0, at = T(0);                                                                                    \
      const bool t1 = y1 > best;                                                                                 \
      best = t1 ? y1 : best;                                                                                     \
      at = t1 ? T(1) : at;                                                                                       \
      const bool t2 = y2 > best;                                                                                 \
      best = t2 ? y2 : best;                                                                                     \
      at = t2 ? T(2) : at;                                                                                       \
      const bool t3 = y3 > best;                                                                                 \
      best = t3 ? y3 : best;                                                                                     \
      at = t3 ? T(3) : at;                                                                                       \
      out[c] = best <= T(0) ? T(0) : best; /* keeps NaN, as ReLU does */                                         \
      arg[c] = at;                                                                                               \
    }                                                                                                            \
  }                                                                                                              \
  /* gy = gout where out > 0 (or NaN), else 0, at the argmax: acc[c] += gy, acc2[c] += gy x̂. */                \
  PYMETA_MULTIVERSION void grad_sums_window(                                                                     \
      int64_t C, const T* __restrict p0, const T* __restrict p1, const T* __restrict p2,                        \
      const T* __restrict p3, const T* __restrict gout, const T* __restrict out, const T* __restrict arg,       \
      const T* __restrict mean, const T* __restrict inv_std, double* __restrict acc, double* __restrict acc2) { \
    for (int64_t c = 0; c < C; ++c) {                                                                            \
      const T a = arg[c], v0 = p0[c], v1 = p1[c], v2 = p2[c], v3 = p3[c], g = gout[c];                          \
      const T v = a == T(0) ? v0 : a == T(1) ? v1 : a == T(2) ? v2 : v3;                                        \
      const double gy = out[c] <= T(0) ? 0.0 : static_cast<double>(g);                                          \
      acc[c] += gy;                                                                                              \
      acc2[c] += gy * ((static_cast<double>(v) - mean[c]) * inv_std[c]);                                        \
    }                                                                                                            \
  }                                                                                                              \
  /* dL/dx at the four pixels: alpha (x - mean) + gamma, plus k gy at the argmax. */                            \
  PYMETA_MULTIVERSION void grad_x_window(                                                                        \
      int64_t C, const T* __restrict p0, const T* __restrict p1, const T* __restrict p2,                        \
      const T* __restrict p3, const T* __restrict gout, const T* __restrict out, const T* __restrict arg,       \
      const T* __restrict k, const T* __restrict alpha, const T* __restrict mean, const T* __restrict gamma,    \
      T* __restrict g0, T* __restrict g1, T* __restrict g2, T* __restrict g3) {                                 \
    for (int64_t c = 0; c < C; ++c) {                                                                            \
      const T a = arg[c], al = alpha[c], mu = mean[c], ga = gamma[c], z = T(0);                                 \
      const T kgo = k[c] * gout[c];                                                                              \
      const T kg = out[c] <= z ? z : kgo; /* NaN passes */                                                       \
      const T s0 = a == T(0) ? kg : z, s1 = a == T(1) ? kg : z, s2 = a == T(2) ? kg : z, s3 = a == T(3) ? kg : z; \
      g0[c] = al * (p0[c] - mu) + ga + s0;                                                                       \
      g1[c] = al * (p1[c] - mu) + ga + s1;                                                                       \
      g2[c] = al * (p2[c] - mu) + ga + s2;                                                                       \
      g3[c] = al * (p3[c] - mu) + ga + s3;                                                                       \
    }                                                                                                            \
  }                                                                                                              \
  /* dL/dx of a pixel in no window (the last row or column of an odd size): gy = 0 there. */                   \
  PYMETA_MULTIVERSION void grad_x_pixel(int64_t C, const T* __restrict x, const T* __restrict alpha,             \
                                        const T* __restrict mean, const T* __restrict gamma, T* __restrict g) { \
    for (int64_t c = 0; c < C; ++c) g[c] = alpha[c] * (x[c] - mean[c]) + gamma[c];                               \
  }

PYMETA_BN_RELU_POOL_DEFS(float)
PYMETA_BN_RELU_POOL_DEFS(double)
#undef PYMETA_BN_RELU_POOL_DEFS

// Calls fn(p0, p1, p2, p3, q) for every 2x2 window of image i: the offsets of its four pixels
// in x and of its pooled element.
template <typename F>
void for_each_window(const Geometry& g, int64_t i, const F& fn) {
  const int64_t row = g.w * g.c;
  for (int64_t ph = 0; ph < g.ho; ++ph) {
    for (int64_t pw = 0; pw < g.wo; ++pw) {
      const int64_t p0 = i * g.image() + (2 * ph * g.w + 2 * pw) * g.c;
      fn(p0, p0 + g.c, p0 + row, p0 + row + g.c, i * g.pooled_image() + (ph * g.wo + pw) * g.c);
    }
  }
}

template <typename T>
void forward_impl(const Geometry& g, const T* x, const T* w, const T* b, const BnStats& stats, T* out, T* arg,
                  T* mean_out, T* inv_std_out) {
  const int64_t C = g.c;
  std::vector<T> scale(C), offset(C);
  for (int64_t c = 0; c < C; ++c) {
    const T mean = static_cast<T>(stats.mean[c]), inv_std = static_cast<T>(stats.inv_std[c]);
    mean_out[c] = mean;
    inv_std_out[c] = inv_std;
    // y = x * scale + offset, as ATen's batch norm computes it.
    const T s = inv_std * (w != nullptr ? w[c] : T(1));
    scale[c] = s;
    offset[c] = (b != nullptr ? b[c] : T(0)) - mean * s;
  }
  at::parallel_for(0, g.n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for_each_window(g, i, [&](int64_t p0, int64_t p1, int64_t p2, int64_t p3, int64_t q) {
        forward_window(C, x + p0, x + p1, x + p2, x + p3, scale.data(), offset.data(), out + q, arg + q);
      });
    }
  });
}

template <typename T>
void backward_impl(const Geometry& g, const T* gout, const T* x, const T* w, const T* out, const T* arg,
                   const T* mean, const T* inv_std, T* gx, T* gw, T* gb) {
  const int64_t C = g.c;
  // The batch-norm output's gradient gy is gout at each window's argmax where out > 0, else 0;
  // its per-channel sums of gy and gy * x̂:
  const std::vector<double> sums = fixed_order_sums(g.n, 2 * C, [&](int64_t i, double* acc) {
    for_each_window(g, i, [&](int64_t p0, int64_t p1, int64_t p2, int64_t p3, int64_t q) {
      grad_sums_window(C, x + p0, x + p1, x + p2, x + p3, gout + q, out + q, arg + q, mean, inv_std, acc, acc + C);
    });
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
      for_each_window(g, i, [&](int64_t p0, int64_t p1, int64_t p2, int64_t p3, int64_t q) {
        grad_x_window(C, x + p0, x + p1, x + p2, x + p3, gout + q, out + q, arg + q, k.data(), alpha.data(), mean,
                      gamma.data(), gx + p0, gx + p1, gx + p2, gx + p3);
      });
      // Pixels in no window (odd sizes): the last column, and the last row.
      auto pixel = [&](int64_t r, int64_t col) {
        const int64_t p = i * g.image() + (r * g.w + col) * C;
        grad_x_pixel(C, x + p, alpha.data(), mean, gamma.data(), gx + p);
      };
      for (int64_t r = 0; r < 2 * g.ho && g.w % 2 == 1; ++r) pixel(r, g.w - 1);
      for (int64_t r = 2 * g.ho; r < g.h; ++r) {
        for (int64_t col = 0; col < g.w; ++col) pixel(r, col);
      }
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
  const BnStats stats = bn_batch_stats(x, eps);  // in double (cpu/bn_tangent.h)
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_pool_forward", [&] {
    forward_impl<scalar_t>(g, x.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(wc), data_or_null<scalar_t>(bc),
                           stats, out.mutable_data_ptr<scalar_t>(), saved.argmax.mutable_data_ptr<scalar_t>(),
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
