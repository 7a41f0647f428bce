// Row-major GEMM for the per-task matrices of the model-aware core: BLAS (the sgemm_/dgemm_
// that torch's CPU library carries) for real work, our own loops (small_gemm.cpp) for the tiny
// products where a BLAS call costs more than the arithmetic. Called from inside at::parallel_for, one task per
// thread, so BLAS runs single-threaded there.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc);
}

namespace pymeta {

inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                      const float* alpha, const float* a, const int* lda, const float* b,
                      const int* ldb, const float* beta, float* c, const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                      const double* alpha, const double* a, const int* lda, const double* b,
                      const int* ldb, const double* beta, double* c, const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Below this many multiply-adds, our loops beat a BLAS call (measured on the sinusoid and
// wide-mlp shapes: a BLAS call costs about a microsecond before any arithmetic).
constexpr int64_t kSmallGemm = 4096;

// The loop kernels (small_gemm.cpp), compiled for several instruction sets.
void small_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* A, const float* B,
                float beta, float* C);
void small_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const double* A, const double* B,
                double beta, double* C);

// The AVX2+FMA float kernel (small_gemm_avx2.cpp), for CPUs that have those instructions.
bool small_gemm_avx2_available();
// out (cols x rows, row stride ld_out) = in (rows x cols, row stride ld_in)^T, float32: 8 x 8
// blocks in AVX2 registers where the CPU has them (small_gemm_avx2.cpp).
void transpose(int64_t rows, int64_t cols, const float* in, int64_t ld_in, float* out, int64_t ld_out);
void small_gemm_avx2(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* A, const float* B,
                     float beta, float* C);

// C (m x n) = op(A) (m x k) * op(B) (k x n) + beta * C, all row-major and contiguous.
// A is stored (m x k), or (k x m) when ta; B is stored (k x n), or (n x k) when tb.
// beta is 0 (overwrite) or 1 (accumulate).
// Whether the AVX2 kernel should take this float product: it matches or beats BLAS (about
// 100 GFLOP/s on one core here) on the per-task shapes while they fit in cache, when the
// columns come in multiples of 8, and for small products of any shape, where BLAS's fixed cost
// dominates. Its A B^T case works on dot products, so only small ones take it.
inline bool use_avx2_kernel(bool ta, bool tb, int64_t m, int64_t n, int64_t k) {
  const int64_t macs = m * n * k;
  if ((ta && tb) || !small_gemm_avx2_available()) return false;
  if (tb) return macs <= 65536 && k >= 8;
  return n >= 8 && macs <= (int64_t{8} << 20) && (n % 8 == 0 || macs <= 65536);
}

// C (m x n) = op(A) (m x k) * op(B) (k x n) + beta * C, all row-major and contiguous.
// A is stored (m x k), or (k x m) when ta; B is stored (k x n), or (n x k) when tb.
// beta is 0 (overwrite) or 1 (accumulate).
template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* A, const T* B, T beta, T* C) {
  if (m == 0 || n == 0) return;
  if constexpr (std::is_same_v<T, float>) {
    if (use_avx2_kernel(ta, tb, m, n, k)) {
      small_gemm_avx2(ta, tb, m, n, k, A, B, beta, C);
      return;
    }
  }
  if (m * n * k > kSmallGemm) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
    const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
    const int lda = std::max(1, static_cast<int>(ta ? m : k));
    const int ldb = std::max(1, static_cast<int>(tb ? k : n));
    const int ldc = std::max(1, in);
    const T one = T(1);
    blas_gemm(tb ? "T" : "N", ta ? "T" : "N", &in, &im, &ik, &one, B, &ldb, A, &lda, &beta, C, &ldc);
    return;
  }
  small_gemm(ta, tb, m, n, k, A, B, beta, C);
}

}  // namespace pymeta
