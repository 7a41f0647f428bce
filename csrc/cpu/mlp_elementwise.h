// Elementwise passes of the model-aware MLP core over contiguous (rows x width) buffers, each
// with the activation chosen once per call (not per element) so the loops vectorize. Compiled
// in mlp_elementwise.cpp for several instruction sets.
#pragma once

#include <cstdint>

#include "net/activation_math.h"

namespace pymeta {

#define PYMETA_ELEMENTWISE_DECLS(T)                                                              \
  /* h = act(a) */                                                                               \
  void act_forward(Activation act, T slope, int64_t n, const T* a, T* h);                        \
  /* out = in * act'(a) */                                                                       \
  void act_times_d1(Activation act, T slope, int64_t n, const T* a, const T* h, const T* in,     \
                    T* out);                                                                     \
  /* re = rd * act'(a) + d * act''(a) * ra (the last term only when `curved`) */                 \
  void act_r_backward(Activation act, T slope, int64_t n, const T* a, const T* h, const T* rd,   \
                      const T* d, const T* ra, bool curved, T* re);                              \
  /* m (rows x cols) += row, broadcast over rows */                                              \
  void add_row(int64_t rows, int64_t cols, const T* row, T* m);                                  \
  /* out (cols) = column sums of m (rows x cols) */                                              \
  void column_sums(int64_t rows, int64_t cols, const T* m, T* out);                              \
  /* y += alpha * x */                                                                           \
  void axpy(int64_t n, T alpha, const T* x, T* y);                                               \
  /* out = a * b, elementwise */                                                                 \
  void multiply(int64_t n, const T* a, const T* b, T* out);                                      \
  /* y -= a * b, elementwise */                                                                  \
  void sub_product(int64_t n, const T* a, const T* b, T* y);

PYMETA_ELEMENTWISE_DECLS(float)
PYMETA_ELEMENTWISE_DECLS(double)
#undef PYMETA_ELEMENTWISE_DECLS

}  // namespace pymeta
