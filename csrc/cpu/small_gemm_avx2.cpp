// AVX2+FMA register-tiled float GEMM for the small per-task products of the model-aware core
// (a 10 x 40 by 40 x 40 product is a few thousand cycles of arithmetic, less than a BLAS
// call's overhead). Built with a function-level target attribute and used only when the CPU
// reports AVX2 and FMA, so the library still loads on any x86-64.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "small_gemm.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

namespace pymeta {
namespace {

#define PYMETA_AVX2 __attribute__((target("avx2,fma")))

// C[i0 .. i0+MR) x [j0 .. j0+8*NV) (+)= op(A) B over all k, accumulators in registers.
template <int MR, int NV, bool TA>
PYMETA_AVX2 inline void tile(int64_t i0, int64_t j0, int64_t m, int64_t n, int64_t k, const float* A,
                             const float* B, bool accumulate, float* C) {
  __m256 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v)
      acc[r][v] = accumulate ? _mm256_loadu_ps(C + (i0 + r) * n + j0 + 8 * v) : _mm256_setzero_ps();
  for (int64_t p = 0; p < k; ++p) {
    __m256 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm256_loadu_ps(B + p * n + j0 + 8 * v);
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_set1_ps(TA ? A[p * m + i0 + r] : A[(i0 + r) * k + p]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(a, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(C + (i0 + r) * n + j0 + 8 * v, acc[r][v]);
}

// All rows for the column block [j0, j0 + 8*NV): blocks of 4 rows, then single rows.
template <int NV, bool TA>
PYMETA_AVX2 inline void column_block(int64_t j0, int64_t m, int64_t n, int64_t k, const float* A,
                                     const float* B, bool accumulate, float* C) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) tile<4, NV, TA>(i, j0, m, n, k, A, B, accumulate, C);
  for (; i < m; ++i) tile<1, NV, TA>(i, j0, m, n, k, A, B, accumulate, C);
}

// The last n % 8 columns [j0, n): tile's arithmetic with masked loads and stores (lanes past
// the mask are neither read nor written).
template <int MR, bool TA>
PYMETA_AVX2 inline void tail_tile(int64_t i0, int64_t j0, int64_t m, int64_t n, int64_t k, const float* A,
                                  const float* B, bool accumulate, __m256i mask, float* C) {
  __m256 acc[MR];
  for (int r = 0; r < MR; ++r)
    acc[r] = accumulate ? _mm256_maskload_ps(C + (i0 + r) * n + j0, mask) : _mm256_setzero_ps();
  for (int64_t p = 0; p < k; ++p) {
    const __m256 b = _mm256_maskload_ps(B + p * n + j0, mask);
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_set1_ps(TA ? A[p * m + i0 + r] : A[(i0 + r) * k + p]);
      acc[r] = _mm256_fmadd_ps(a, b, acc[r]);
    }
  }
  for (int r = 0; r < MR; ++r) _mm256_maskstore_ps(C + (i0 + r) * n + j0, mask, acc[r]);
}

template <bool TA>
PYMETA_AVX2 void nn_avx2(int64_t m, int64_t n, int64_t k, const float* A, const float* B, bool accumulate,
                         float* C) {
  int64_t j = 0;
  for (; j + 24 <= n; j += 24) column_block<3, TA>(j, m, n, k, A, B, accumulate, C);
  for (; j + 8 <= n; j += 8) column_block<1, TA>(j, m, n, k, A, B, accumulate, C);
  if (j == n) return;
  const __m256i mask =
      _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - j)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) tail_tile<4, TA>(i, j, m, n, k, A, B, accumulate, mask, C);
  for (; i < m; ++i) tail_tile<1, TA>(i, j, m, n, k, A, B, accumulate, mask, C);
}

PYMETA_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// C[i0 .. i0+MR) x [j0 .. j0+NC) (+)= A B^T with A (m x k) and B (n x k): dot products of
// contiguous rows, eight lanes at a time, summed across lanes at the end.
template <int MR, int NC>
PYMETA_AVX2 inline void nt_tile(int64_t i0, int64_t j0, int64_t n, int64_t k, const float* A, const float* B,
                                bool accumulate, float* C) {
  __m256 acc[MR][NC];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = _mm256_setzero_ps();
  const int64_t k8 = k - k % 8;
  for (int64_t p = 0; p < k8; p += 8) {
    __m256 a[MR];
    for (int r = 0; r < MR; ++r) a[r] = _mm256_loadu_ps(A + (i0 + r) * k + p);
    for (int c = 0; c < NC; ++c) {
      const __m256 b = _mm256_loadu_ps(B + (j0 + c) * k + p);
      for (int r = 0; r < MR; ++r) acc[r][c] = _mm256_fmadd_ps(a[r], b, acc[r][c]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int c = 0; c < NC; ++c) {
      float sum = hsum(acc[r][c]);
      for (int64_t p = k8; p < k; ++p) sum += A[(i0 + r) * k + p] * B[(j0 + c) * k + p];
      float* out = C + (i0 + r) * n + j0 + c;
      *out = accumulate ? *out + sum : sum;
    }
  }
}

template <int MR>
PYMETA_AVX2 inline void nt_rows(int64_t i0, int64_t n, int64_t k, const float* A, const float* B,
                                bool accumulate, float* C) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) nt_tile<MR, 4>(i0, j, n, k, A, B, accumulate, C);
  for (; j < n; ++j) nt_tile<MR, 1>(i0, j, n, k, A, B, accumulate, C);
}

PYMETA_AVX2 void nt_avx2(int64_t m, int64_t n, int64_t k, const float* A, const float* B, bool accumulate,
                         float* C) {
  int64_t i = 0;
  for (; i + 2 <= m; i += 2) nt_rows<2>(i, n, k, A, B, accumulate, C);
  for (; i < m; ++i) nt_rows<1>(i, n, k, A, B, accumulate, C);
}

// out (cols x rows, row stride ld_out) = in (rows x cols, row stride ld_in)^T: 8 x 8 blocks in
// registers, the edges scalar.
PYMETA_AVX2 void transpose_avx2(int64_t rows, int64_t cols, const float* in, int64_t ld_in, float* out,
                                int64_t ld_out) {
  const int64_t r8 = rows - rows % 8, c8 = cols - cols % 8;
  for (int64_t i = 0; i < r8; i += 8) {
    for (int64_t j = 0; j < c8; j += 8) {
      __m256 r[8], t[8];
      for (int q = 0; q < 8; ++q) r[q] = _mm256_loadu_ps(in + (i + q) * ld_in + j);
      for (int q = 0; q < 8; q += 2) {
        t[q] = _mm256_unpacklo_ps(r[q], r[q + 1]);
        t[q + 1] = _mm256_unpackhi_ps(r[q], r[q + 1]);
      }
      for (int q = 0; q < 8; q += 4) {
        r[q] = _mm256_shuffle_ps(t[q], t[q + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[q + 1] = _mm256_shuffle_ps(t[q], t[q + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[q + 2] = _mm256_shuffle_ps(t[q + 1], t[q + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[q + 3] = _mm256_shuffle_ps(t[q + 1], t[q + 3], _MM_SHUFFLE(3, 2, 3, 2));
      }
      for (int q = 0; q < 4; ++q) {
        _mm256_storeu_ps(out + (j + q) * ld_out + i, _mm256_permute2f128_ps(r[q], r[q + 4], 0x20));
        _mm256_storeu_ps(out + (j + q + 4) * ld_out + i, _mm256_permute2f128_ps(r[q], r[q + 4], 0x31));
      }
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = i < r8 ? c8 : 0; j < cols; ++j) out[j * ld_out + i] = in[i * ld_in + j];
  }
}

}  // namespace

bool small_gemm_avx2_available() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

void small_gemm_avx2(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* A, const float* B,
                     float beta, float* C) {
  const bool accumulate = beta != 0.0f;
  if (tb && n % 8 == 0) {
    // A B^T as A (B^T) when its columns fill whole vectors: B transposed once into a per-thread
    // buffer, then the register-tiled kernel, which beats dot products that each end in a
    // horizontal sum (the sinusoid MLP's (10 x 40) (40 x 40)^T); the copy is n k moves against
    // m n k FMAs.
    thread_local std::vector<float> bt;
    bt.resize(static_cast<size_t>(n * k));
    transpose_avx2(n, k, B, k, bt.data(), n);
    nn_avx2<false>(m, n, k, A, bt.data(), accumulate, C);
  } else if (tb) {  // only A B^T reaches here with tb (never A^T B^T)
    nt_avx2(m, n, k, A, B, accumulate, C);
  } else if (ta) {
    nn_avx2<true>(m, n, k, A, B, accumulate, C);
  } else {
    nn_avx2<false>(m, n, k, A, B, accumulate, C);
  }
}

}  // namespace pymeta

#else

namespace pymeta {
bool small_gemm_avx2_available() { return false; }
void small_gemm_avx2(bool, bool, int64_t, int64_t, int64_t, const float*, const float*, float, float*) {}
}  // namespace pymeta

#endif

namespace pymeta {

void transpose(int64_t rows, int64_t cols, const float* in, int64_t ld_in, float* out, int64_t ld_out) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (small_gemm_avx2_available()) {
    transpose_avx2(rows, cols, in, ld_in, out, ld_out);
    return;
  }
#endif
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) out[j * ld_out + i] = in[i * ld_in + j];
  }
}

}  // namespace pymeta
