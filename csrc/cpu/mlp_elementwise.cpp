// See mlp_elementwise.h. The activation switch sits outside each loop; target_clones builds
// AVX-512, AVX2+FMA and baseline versions and picks one at load time.
#include "mlp_elementwise.h"
#include "multiversion.h"

#include <algorithm>
#include <type_traits>

namespace pymeta {

namespace {

// Calls f with the activation as a compile-time constant.
template <typename F>
inline void with_activation(Activation act, const F& f) {
  switch (act) {
    case Activation::kRelu:
      return f(std::integral_constant<Activation, Activation::kRelu>{});
    case Activation::kLeakyRelu:
      return f(std::integral_constant<Activation, Activation::kLeakyRelu>{});
    case Activation::kTanh:
      return f(std::integral_constant<Activation, Activation::kTanh>{});
    case Activation::kSigmoid:
      return f(std::integral_constant<Activation, Activation::kSigmoid>{});
    default:
      return f(std::integral_constant<Activation, Activation::kNone>{});
  }
}

template <typename T>
inline void act_forward_impl(Activation act, T slope, int64_t n, const T* a, T* h) {
  with_activation(act, [&](auto A) {
    for (int64_t k = 0; k < n; ++k) h[k] = activate<T>(A.value, a[k], slope);
  });
}

template <typename T>
inline void act_times_d1_impl(Activation act, T slope, int64_t n, const T* a, const T* h, const T* in,
                              T* out) {
  with_activation(act, [&](auto A) {
    for (int64_t k = 0; k < n; ++k) out[k] = times_activation_d1<T>(A.value, a[k], h[k], in[k], slope);
  });
}

template <typename T>
inline void act_r_backward_impl(Activation act, T slope, int64_t n, const T* a, const T* h, const T* rd,
                                const T* d, const T* ra, bool curved, T* re) {
  with_activation(act, [&](auto A) {
    if (curved) {
      for (int64_t k = 0; k < n; ++k)
        re[k] = times_activation_d1<T>(A.value, a[k], h[k], rd[k], slope) +
                d[k] * activation_d2<T>(A.value, a[k], h[k]) * ra[k];
    } else {
      for (int64_t k = 0; k < n; ++k) re[k] = times_activation_d1<T>(A.value, a[k], h[k], rd[k], slope);
    }
  });
}

}  // namespace

#define PYMETA_ELEMENTWISE_DEFS(T)                                                               \
  PYMETA_MULTIVERSION void act_forward(Activation act, T slope, int64_t n, const T* a, T* h) {   \
    act_forward_impl<T>(act, slope, n, a, h);                                                    \
  }                                                                                              \
  PYMETA_MULTIVERSION void act_times_d1(Activation act, T slope, int64_t n, const T* a,          \
                                        const T* h, const T* in, T* out) {                       \
    act_times_d1_impl<T>(act, slope, n, a, h, in, out);                                          \
  }                                                                                              \
  PYMETA_MULTIVERSION void act_r_backward(Activation act, T slope, int64_t n, const T* a,        \
                                          const T* h, const T* rd, const T* d, const T* ra,      \
                                          bool curved, T* re) {                                  \
    act_r_backward_impl<T>(act, slope, n, a, h, rd, d, ra, curved, re);                          \
  }                                                                                              \
  PYMETA_MULTIVERSION void add_row(int64_t rows, int64_t cols, const T* row, T* m) {             \
    for (int64_t i = 0; i < rows; ++i)                                                           \
      for (int64_t j = 0; j < cols; ++j) m[i * cols + j] += row[j];                              \
  }                                                                                              \
  PYMETA_MULTIVERSION void column_sums(int64_t rows, int64_t cols, const T* m, T* out) {         \
    std::fill(out, out + cols, T(0));                                                            \
    for (int64_t i = 0; i < rows; ++i)                                                           \
      for (int64_t j = 0; j < cols; ++j) out[j] += m[i * cols + j];                              \
  }                                                                                              \
  PYMETA_MULTIVERSION void axpy(int64_t n, T alpha, const T* x, T* y) {                          \
    for (int64_t k = 0; k < n; ++k) y[k] += alpha * x[k];                                        \
  }                                                                                              \
  PYMETA_MULTIVERSION void multiply(int64_t n, const T* a, const T* b, T* out) {                 \
    for (int64_t k = 0; k < n; ++k) out[k] = a[k] * b[k];                                        \
  }                                                                                              \
  PYMETA_MULTIVERSION void sub_product(int64_t n, const T* a, const T* b, T* y) {                \
    for (int64_t k = 0; k < n; ++k) y[k] -= a[k] * b[k];                                         \
  }

PYMETA_ELEMENTWISE_DEFS(float)
PYMETA_ELEMENTWISE_DEFS(double)
#undef PYMETA_ELEMENTWISE_DEFS

}  // namespace pymeta
