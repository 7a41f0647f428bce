// See bn_tangent.h. Memory is (rows, C) with the channels innermost, so each loop runs over C
// contiguous channels and vectorises; per-channel coefficients travel packed in one array
// (coef[k * C + c]). Sums are taken per block of rows in double and added in block order, so
// results do not depend on the thread count.
#include "cpu/bn_tangent.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/fixed_order_sums.h"
#include "cpu/multiversion.h"

namespace pymeta {
namespace {

constexpr int64_t kBlockRows = 256;  // rows per partial sum

// The channel loops, one function per dtype built for AVX-512, AVX2 and baseline x86-64 (see
// bn_relu_pool.cpp for why they take restrict parameters and are not templates).
#define PYMETA_BN_TANGENT_DEFS(T)                                                                               \
  /* acc[0:C] += sum (x - shift), acc[C:2C] += sum (x - shift)^2, in double: the batch statistics. */          \
  PYMETA_MULTIVERSION void stats_sums(int64_t rows, int64_t C, const T* __restrict x,                          \
                                      const double* __restrict shift, double* __restrict acc) {                 \
    for (int64_t r = 0; r < rows; ++r) {                                                                        \
      for (int64_t c = 0; c < C; ++c) {                                                                         \
        const double d = static_cast<double>(x[r * C + c]) - shift[c];                                          \
        acc[c] += d;                                                                                            \
        acc[C + c] += d * d;                                                                                    \
      }                                                                                                         \
    }                                                                                                           \
  }                                                                                                             \
  /* y = x * scale + offset, as ATen's batch norm computes it. */                                               \
  PYMETA_MULTIVERSION void affine_apply(int64_t rows, int64_t C, const T* __restrict x,                        \
                                        const T* __restrict scale, const T* __restrict offset,                 \
                                        T* __restrict y) {                                                      \
    for (int64_t r = 0; r < rows; ++r) {                                                                        \
      for (int64_t c = 0; c < C; ++c) y[r * C + c] = x[r * C + c] * scale[c] + offset[c];                       \
    }                                                                                                           \
  }                                                                                                             \
  /* acc[0:C] += sum gy, acc[C:2C] += sum x̂ gy. */                                                              \
  PYMETA_MULTIVERSION void grad_sums(int64_t rows, int64_t C, const T* __restrict x, const T* __restrict gy,   \
                                     const T* __restrict mean, const T* __restrict s,                          \
                                     double* __restrict acc) {                                                  \
    for (int64_t r = 0; r < rows; ++r) {                                                                        \
      for (int64_t c = 0; c < C; ++c) {                                                                         \
        const T xh = (x[r * C + c] - mean[c]) * s[c], g = gy[r * C + c];                                        \
        acc[c] += g;                                                                                            \
        acc[C + c] += static_cast<double>(xh * g);                                                              \
      }                                                                                                         \
    }                                                                                                           \
  }                                                                                                             \
  /* coef: mean, k = w s, alpha, gamma. dL/dx = k (gy - mean(gy) - x̂ mean(x̂ gy)) */                             \
  /*   = alpha (x - mean) + k gy + gamma. */                                                                    \
  PYMETA_MULTIVERSION void grad_apply(int64_t rows, int64_t C, const T* __restrict x, const T* __restrict gy,  \
                                      const T* __restrict coef, T* __restrict gx) {                             \
    const T *mean = coef, *k = coef + C, *alpha = coef + 2 * C, *gamma = coef + 3 * C;                         \
    for (int64_t r = 0; r < rows; ++r) {                                                                        \
      for (int64_t c = 0; c < C; ++c) {                                                                         \
        const int64_t i = r * C + c;                                                                            \
        gx[i] = alpha[c] * (x[i] - mean[c]) + k[c] * gy[i] + gamma[c];                                          \
      }                                                                                                         \
    }                                                                                                           \
  }                                                                                                             \
  /* acc[0:C] += sum rx, acc[C:2C] += sum x̂ rx. */                                                              \
  PYMETA_MULTIVERSION void r_forward_sums(int64_t rows, int64_t C, const T* __restrict x,                      \
                                          const T* __restrict rx, const T* __restrict mean,                    \
                                          const T* __restrict s, double* __restrict acc) {                      \
    for (int64_t r = 0; r < rows; ++r) {                                                                        \
      for (int64_t c = 0; c < C; ++c) {                                                                         \
        const T xh = (x[r * C + c] - mean[c]) * s[c], v = rx[r * C + c];                                        \
        acc[c] += v;                                                                                            \
        acc[C + c] += static_cast<double>(xh * v);                                                              \
      }                                                                                                         \
    }                                                                                                           \
  }                                                                                                             \
  /* coef: mean, s, mean(rx), mean(x̂ rx), w, uw, ub. rxhat = s (rx - mean(rx) - x̂ mean(x̂ rx)), */               \
  /* ry = w rxhat + uw x̂ + ub. */                                                                               \
  PYMETA_MULTIVERSION void r_forward_apply(int64_t rows, int64_t C, const T* __restrict x,                     \
                                           const T* __restrict rx, const T* __restrict coef,                   \
                                           T* __restrict rxhat, T* __restrict ry) {                             \
    const T *mean = coef, *s = coef + C, *m_rx = coef + 2 * C, *m_xrx = coef + 3 * C, *w = coef + 4 * C,      \
            *uw = coef + 5 * C, *ub = coef + 6 * C;                                                             \
    for (int64_t r = 0; r < rows; ++r) {                                                                        \
      for (int64_t c = 0; c < C; ++c) {                                                                         \
        const int64_t i = r * C + c;                                                                            \
        const T xh = (x[i] - mean[c]) * s[c];                                                                   \
        const T rxh = s[c] * (rx[i] - m_rx[c] - xh * m_xrx[c]);                                                 \
        rxhat[i] = rxh;                                                                                         \
        ry[i] = w[c] * rxh + uw[c] * xh + ub[c];                                                                \
      }                                                                                                         \
    }                                                                                                           \
  }                                                                                                             \
  /* acc[k C + c] += sums of gy, x̂ gy, rgy, x̂ rgy, x̂ rx, gy rxhat (k = 0..5). */                              \
  PYMETA_MULTIVERSION void r_backward_sums(int64_t rows, int64_t C, const T* __restrict x,                     \
                                           const T* __restrict gy, const T* __restrict rgy,                    \
                                           const T* __restrict rx, const T* __restrict rxhat,                  \
                                           const T* __restrict mean, const T* __restrict s,                    \
                                           double* __restrict acc) {                                            \
    for (int64_t r = 0; r < rows; ++r) {                                                                        \
      for (int64_t c = 0; c < C; ++c) {                                                                         \
        const int64_t i = r * C + c;                                                                            \
        const T xh = (x[i] - mean[c]) * s[c], g = gy[i], rg = rgy[i];                                           \
        acc[c] += g;                                                                                            \
        acc[C + c] += static_cast<double>(xh * g);                                                              \
        acc[2 * C + c] += rg;                                                                                   \
        acc[3 * C + c] += static_cast<double>(xh * rg);                                                         \
        acc[4 * C + c] += static_cast<double>(xh * rx[i]);                                                      \
        acc[5 * C + c] += static_cast<double>(g * rxhat[i]);                                                    \
      }                                                                                                         \
    }                                                                                                           \
  }                                                                                                             \
  /* coef: mean, s, w, uw, m_gxh, m_xgxh, m_rgxh, m_xrgxh, m_xrx, m_gxh_rxh (means of ĝ = w gy, x̂ ĝ, */       \
  /* rĝ = w rgy + uw gy, x̂ rĝ, x̂ rx, ĝ rxhat). out = s (rĝ - m_rgxh - x̂ m_xrgxh) - s m_xrx gx */              \
  /*   - s (rxhat m_xgxh + x̂ m_gxh_rxh), with gx = s (ĝ - m_gxh - x̂ m_xgxh). */                                \
  PYMETA_MULTIVERSION void r_backward_apply(int64_t rows, int64_t C, const T* __restrict x,                    \
                                            const T* __restrict gy, const T* __restrict rgy,                   \
                                            const T* __restrict rxhat, const T* __restrict coef,               \
                                            T* __restrict out) {                                                \
    const T *mean = coef, *s = coef + C, *w = coef + 2 * C, *uw = coef + 3 * C, *m_gxh = coef + 4 * C,          \
            *m_xgxh = coef + 5 * C, *m_rgxh = coef + 6 * C, *m_xrgxh = coef + 7 * C, *m_xrx = coef + 8 * C,     \
            *m_gxh_rxh = coef + 9 * C;                                                                          \
    for (int64_t r = 0; r < rows; ++r) {                                                                        \
      for (int64_t c = 0; c < C; ++c) {                                                                         \
        const int64_t i = r * C + c;                                                                            \
        const T xh = (x[i] - mean[c]) * s[c];                                                                   \
        const T gxh = w[c] * gy[i], rgxh = w[c] * rgy[i] + uw[c] * gy[i];                                       \
        const T gx = s[c] * (gxh - m_gxh[c] - xh * m_xgxh[c]);                                                  \
        out[i] = s[c] * (rgxh - m_rgxh[c] - xh * m_xrgxh[c]) - s[c] * m_xrx[c] * gx -                           \
                 s[c] * (rxhat[i] * m_xgxh[c] + xh * m_gxh_rxh[c]);                                             \
      }                                                                                                         \
    }                                                                                                           \
  }

PYMETA_BN_TANGENT_DEFS(float)
PYMETA_BN_TANGENT_DEFS(double)
#undef PYMETA_BN_TANGENT_DEFS

at::MemoryFormat layout_of(const at::Tensor& x) {
  return x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// An operand in x's layout (a no-op when it already is).
at::Tensor like_x(const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.sizes() == x.sizes(), "pymeta: batch norm tangent operand of shape ", t.sizes(),
              " for an input of shape ", x.sizes());
  return t.contiguous(layout_of(x));
}

// `parts` per-channel sums over all rows: block_sums(r0, rows, acc) adds rows [r0, r0 + rows).
template <typename F>
std::vector<double> channel_sums(int64_t rows, int64_t C, int64_t parts, const F& block_sums) {
  const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
  return fixed_order_sums(blocks, parts * C, [&](int64_t k, double* acc) {
    const int64_t r0 = k * kBlockRows;
    block_sums(r0, std::min(kBlockRows, rows - r0), acc);
  });
}

// Calls fn(r0, rows) over blocks of rows, in parallel.
template <typename F>
void for_row_blocks(int64_t rows, const F& fn) {
  at::parallel_for(0, rows, kBlockRows, [&](int64_t begin, int64_t end) { fn(begin, end - begin); });
}

// A (C) parameter or tangent as a vector, `fill` where it is undefined.
template <typename T>
std::vector<T> per_channel(const at::Tensor& t, int64_t C, T fill) {
  if (!t.defined()) return std::vector<T>(C, fill);
  const at::Tensor c = t.contiguous();
  return std::vector<T>(c.const_data_ptr<T>(), c.const_data_ptr<T>() + C);
}

}  // namespace

bool bn_tangent_applies(const at::Tensor& x) {
  return x.is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) &&
         ((x.dim() == 2 && x.is_contiguous()) ||
          (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast))) &&
         x.numel() > 0;
}

BnStats bn_batch_stats(const at::Tensor& x, double eps) {
  TORCH_CHECK(bn_tangent_applies(x), "pymeta: bn_batch_stats got an input it does not take: ", x.sizes());
  const int64_t C = x.size(1), rows = x.numel() / C;
  BnStats st{std::vector<double>(C), std::vector<double>(C)};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_batch_stats", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    // Shifted by the first row, so that a large mean does not cancel the variance.
    const std::vector<double> shift(xp, xp + C);
    const std::vector<double> sums = channel_sums(rows, C, 2, [&](int64_t r0, int64_t n, double* acc) {
      stats_sums(n, C, xp + r0 * C, shift.data(), acc);
    });
    const double m = static_cast<double>(rows);
    for (int64_t c = 0; c < C; ++c) {
      const double mean_shifted = sums[c] / m;
      const double var = std::max(sums[C + c] / m - mean_shifted * mean_shifted, 0.0);  // keeps NaN
      st.mean[c] = shift[c] + mean_shifted;
      st.inv_std[c] = 1.0 / std::sqrt(var + eps);
    }
  });
  return st;
}

at::Tensor bn_forward_fused(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double eps, at::Tensor& mean,
                            at::Tensor& inv_std) {
  const BnStats st = bn_batch_stats(x, eps);
  const int64_t C = x.size(1), rows = x.numel() / C;
  mean = at::empty({C}, x.options());
  inv_std = at::empty({C}, x.options());
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(layout_of(x)));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_forward_fused", [&] {
    using T = scalar_t;
    const std::vector<T> wv = per_channel<T>(w, C, 1), bv = per_channel<T>(b, C, 0);
    std::vector<T> scale(C), offset(C);
    for (int64_t c = 0; c < C; ++c) {
      const T mu = static_cast<T>(st.mean[c]), s = static_cast<T>(st.inv_std[c]);
      mean.mutable_data_ptr<T>()[c] = mu;
      inv_std.mutable_data_ptr<T>()[c] = s;
      scale[c] = s * wv[c];
      offset[c] = bv[c] - mu * scale[c];
    }
    const T* xp = x.const_data_ptr<T>();
    T* yp = y.mutable_data_ptr<T>();
    for_row_blocks(rows, [&](int64_t r0, int64_t n) {
      affine_apply(n, C, xp + r0 * C, scale.data(), offset.data(), yp + r0 * C);
    });
  });
  return y;
}

BnGrads bn_backward_fused(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& inv_std,
                          const at::Tensor& gy_in, const at::Tensor& w, bool need_x) {
  TORCH_CHECK(bn_tangent_applies(x), "pymeta: bn_backward_fused got an input it does not take: ", x.sizes());
  const int64_t C = x.size(1), rows = x.numel() / C;
  const at::Tensor gy = like_x(gy_in, x);
  BnGrads r;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_backward_fused", [&] {
    using T = scalar_t;
    const T *xp = x.const_data_ptr<T>(), *gp = gy.const_data_ptr<T>();
    const std::vector<T> mu = per_channel<T>(mean, C, 0), s = per_channel<T>(inv_std, C, 0);
    const std::vector<double> sums = channel_sums(rows, C, 2, [&](int64_t r0, int64_t n, double* acc) {
      grad_sums(n, C, xp + r0 * C, gp + r0 * C, mu.data(), s.data(), acc);
    });
    if (w.defined()) {  // dL/dw = sum(gy x̂), dL/db = sum(gy)
      r.w = at::empty({C}, x.options());
      r.b = at::empty({C}, x.options());
      for (int64_t c = 0; c < C; ++c) {
        r.w.mutable_data_ptr<T>()[c] = static_cast<T>(sums[C + c]);
        r.b.mutable_data_ptr<T>()[c] = static_cast<T>(sums[c]);
      }
    }
    if (!need_x) return;
    const std::vector<T> wv = per_channel<T>(w, C, 1);
    const double m = static_cast<double>(rows);
    std::vector<T> coef(4 * C);
    for (int64_t c = 0; c < C; ++c) {
      const double sc = s[c], kc = sc * static_cast<double>(wv[c]);
      const double row[4] = {static_cast<double>(mu[c]), kc, -kc * sc * (sums[C + c] / m), -kc * (sums[c] / m)};
      for (int k = 0; k < 4; ++k) coef[k * C + c] = static_cast<T>(row[k]);
    }
    r.x = at::empty(x.sizes(), x.options().memory_format(layout_of(x)));
    T* out = r.x.mutable_data_ptr<T>();
    for_row_blocks(rows, [&](int64_t r0, int64_t n) {
      grad_apply(n, C, xp + r0 * C, gp + r0 * C, coef.data(), out + r0 * C);
    });
  });
  return r;
}

at::Tensor bn_r_forward_fused(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& inv_std,
                              const at::Tensor& rx_in, const at::Tensor& w, const at::Tensor& uw, const at::Tensor& ub,
                              at::Tensor& rxhat) {
  TORCH_CHECK(bn_tangent_applies(x), "pymeta: bn_r_forward_fused got an input it does not take: ", x.sizes());
  const int64_t C = x.size(1), rows = x.numel() / C;
  const at::Tensor rx = like_x(rx_in, x);
  const auto options = x.options().memory_format(layout_of(x));
  rxhat = at::empty(x.sizes(), options);
  at::Tensor ry = at::empty(x.sizes(), options);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_r_forward_fused", [&] {
    using T = scalar_t;
    const T *xp = x.const_data_ptr<T>(), *rp = rx.const_data_ptr<T>();
    const std::vector<T> mu = per_channel<T>(mean, C, 0), s = per_channel<T>(inv_std, C, 0);
    const std::vector<double> sums = channel_sums(rows, C, 2, [&](int64_t r0, int64_t n, double* acc) {
      r_forward_sums(n, C, xp + r0 * C, rp + r0 * C, mu.data(), s.data(), acc);
    });
    std::vector<T> coef(7 * C);
    const std::vector<T> wv = per_channel<T>(w, C, 1), uwv = per_channel<T>(uw, C, 0), ubv = per_channel<T>(ub, C, 0);
    for (int64_t c = 0; c < C; ++c) {
      const T row[7] = {mu[c],  s[c], static_cast<T>(sums[c] / rows), static_cast<T>(sums[C + c] / rows),
                        wv[c], uwv[c], ubv[c]};
      for (int k = 0; k < 7; ++k) coef[k * C + c] = row[k];
    }
    T *rxh = rxhat.mutable_data_ptr<T>(), *ryp = ry.mutable_data_ptr<T>();
    for_row_blocks(rows, [&](int64_t r0, int64_t n) {
      r_forward_apply(n, C, xp + r0 * C, rp + r0 * C, coef.data(), rxh + r0 * C, ryp + r0 * C);
    });
  });
  return w.defined() ? ry : rxhat;  // without affine parameters (w = 1, uw = ub = 0) they are equal
}

BnGrads bn_r_backward_fused(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& inv_std,
                                   const at::Tensor& gy_in, const at::Tensor& rgy_in, const at::Tensor& rx_in,
                                   const at::Tensor& rxhat_in, const at::Tensor& w, const at::Tensor& uw, bool need_x) {
  TORCH_CHECK(bn_tangent_applies(x), "pymeta: bn_r_backward_fused got an input it does not take: ", x.sizes());
  const int64_t C = x.size(1), rows = x.numel() / C;
  const at::Tensor gy = like_x(gy_in, x), rgy = like_x(rgy_in, x), rx = like_x(rx_in, x),
                   rxhat = like_x(rxhat_in, x);
  BnGrads r;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_r_backward_fused", [&] {
    using T = scalar_t;
    const T *xp = x.const_data_ptr<T>(), *gp = gy.const_data_ptr<T>(), *rgp = rgy.const_data_ptr<T>(),
            *rxp = rx.const_data_ptr<T>(), *rxhp = rxhat.const_data_ptr<T>();
    const std::vector<T> mu = per_channel<T>(mean, C, 0), s = per_channel<T>(inv_std, C, 0);
    const std::vector<double> sums = channel_sums(rows, C, 6, [&](int64_t r0, int64_t n, double* acc) {
      const int64_t o = r0 * C;
      r_backward_sums(n, C, xp + o, gp + o, rgp + o, rxp + o, rxhp + o, mu.data(), s.data(), acc);
    });
    auto sum = [&](int k, int64_t c) { return sums[k * C + c]; };
    if (w.defined()) {  // R{dL/dw} = sum(rgy x̂ + gy R{x̂}), R{dL/db} = sum(rgy)
      r.w = at::empty({C}, x.options());
      r.b = at::empty({C}, x.options());
      for (int64_t c = 0; c < C; ++c) {
        r.w.mutable_data_ptr<T>()[c] = static_cast<T>(sum(3, c) + sum(5, c));
        r.b.mutable_data_ptr<T>()[c] = static_cast<T>(sum(2, c));
      }
    }
    if (!need_x) return;
    const std::vector<T> wv = per_channel<T>(w, C, 1), uwv = per_channel<T>(uw, C, 0);
    std::vector<T> coef(10 * C);
    const double m = static_cast<double>(rows);
    for (int64_t c = 0; c < C; ++c) {
      const double wc = wv[c], uc = uwv[c];
      const double row[10] = {static_cast<double>(mu[c]),
                              static_cast<double>(s[c]),
                              wc,
                              uc,
                              wc * sum(0, c) / m,
                              wc * sum(1, c) / m,
                              (wc * sum(2, c) + uc * sum(0, c)) / m,
                              (wc * sum(3, c) + uc * sum(1, c)) / m,
                              sum(4, c) / m,
                              wc * sum(5, c) / m};
      for (int k = 0; k < 10; ++k) coef[k * C + c] = static_cast<T>(row[k]);
    }
    r.x = at::empty(x.sizes(), x.options().memory_format(layout_of(x)));
    T* out = r.x.mutable_data_ptr<T>();
    for_row_blocks(rows, [&](int64_t r0, int64_t n) {
      const int64_t o = r0 * C;
      r_backward_apply(n, C, xp + o, gp + o, rgp + o, rxhp + o, coef.data(), out + o);
    });
  });
  return r;
}

}  // namespace pymeta
