// Plain-loop GEMM for the tiniest per-task products of the model-aware core (a 10 x 40 by
// 40 x 1 product costs far less than a BLAS call's overhead). target_clones builds AVX-512,
// AVX2+FMA and baseline versions and picks one at load time, so any x86-64 runs the library.
#include <algorithm>
#include <cstdint>

#include "multiversion.h"
#include "small_gemm.h"

namespace pymeta {

namespace {

template <typename T>
inline void small_gemm_impl(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* A, const T* B,
                            T beta, T* C) {
  if (beta == T(0)) std::fill(C, C + m * n, T(0));
  // Loop orders keep the innermost loop contiguous in memory.
  if (k == 1) {
    // An outer product, whatever the transposes (a 1-input layer's forward, as in the sinusoid
    // MLP's first layer): as dot products of length 1, loop overhead was most of its cost.
    for (int64_t i = 0; i < m; ++i) {
      const T a = A[i];
      T* c = C + i * n;
      for (int64_t j = 0; j < n; ++j) c[j] += a * B[j];
    }
  } else if (!ta && !tb && n == 1) {
    // A b: dot products of A's rows with b.
    for (int64_t i = 0; i < m; ++i) {
      const T* a = A + i * k;
      T acc = T(0);
#pragma omp simd reduction(+ : acc)
      for (int64_t p = 0; p < k; ++p) acc += a[p] * B[p];
      C[i] += acc;
    }
  } else if (!ta && !tb) {
    for (int64_t i = 0; i < m; ++i) {
      T* c = C + i * n;
      for (int64_t p = 0; p < k; ++p) {
        const T a = A[i * k + p];
        const T* b = B + p * n;
        for (int64_t j = 0; j < n; ++j) c[j] += a * b[j];
      }
    }
  } else if (!ta && tb) {
    for (int64_t i = 0; i < m; ++i) {
      const T* a = A + i * k;
      for (int64_t j = 0; j < n; ++j) {
        const T* b = B + j * k;
        T acc = T(0);
#pragma omp simd reduction(+ : acc)
        for (int64_t p = 0; p < k; ++p) acc += a[p] * b[p];
        C[i * n + j] += acc;
      }
    }
  } else if (ta && n == 1) {
    // A^T b: a matrix-vector product, vectorized over the rows of C.
    for (int64_t p = 0; p < k; ++p) {
      const T* a = A + p * m;
      const T bp = B[p];
      for (int64_t i = 0; i < m; ++i) C[i] += a[i] * bp;
    }
  } else if (ta && !tb) {
    for (int64_t p = 0; p < k; ++p) {
      const T* a = A + p * m;
      const T* b = B + p * n;
      for (int64_t i = 0; i < m; ++i) {
        const T ai = a[i];
        T* c = C + i * n;
        for (int64_t j = 0; j < n; ++j) c[j] += ai * b[j];
      }
    }
  } else {
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        T acc = T(0);
        for (int64_t p = 0; p < k; ++p) acc += A[p * m + i] * B[j * k + p];
        C[i * n + j] += acc;
      }
    }
  }
}

}  // namespace

PYMETA_MULTIVERSION void small_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* A,
                                    const float* B, float beta, float* C) {
  small_gemm_impl<float>(ta, tb, m, n, k, A, B, beta, C);
}

PYMETA_MULTIVERSION void small_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const double* A,
                                    const double* B, double beta, double* C) {
  small_gemm_impl<double>(ta, tb, m, n, k, A, B, beta, C);
}

}  // namespace pymeta
