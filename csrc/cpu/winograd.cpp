// Winograd F(2x2, 3x3) and F(4x4, 3x3) on the CPU (cpu/winograd.h). F(2x2) first; F(4x4) is the
// same computation on 4x4 output blocks with its own transforms (below), except that its
// transposed convolution transforms the flipped kernels. With B^T, G and A^T the transforms of
// Lavin & Gray (2016), a 2x2 output block of one channel pair is A^T [(G g G^T) ⊙ (B^T d B)] A for the
// 4x4 input tile d under it and the 3x3 kernel g. Summed over input channels, the ⊙ becomes 16
// matrix products (one per point of the 4x4 transform domain) per task:
//   M[k, t] = V[k, t] U[k, t],  V (P tiles, C), U (C, O), M (P, O),
// which batched_gemm (cpu/batched_gemm.h) runs as a batch of 16*T. The transposed convolution
// (input gradient) is the convolution with each kernel flipped and its channel pair swapped;
// flipping g permutes the transform domain (G R = Π G with Π swapping rows 0 and 3), so its
// U[k, t] is the forward's U transposed, met in permuted order (transformed from w's own rows).
// The weight gradient is the adjoint: dU[k, t] = dM[k, t]^T V[k, t] with dM = A dy A^T per 2x2
// output block, and dg = G^T dU G.
#include "cpu/winograd.h"

#include "cpu/batched_gemm.h"
#include "cpu/multiversion.h"
#include "cpu/small_gemm.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

namespace pymeta {
namespace {

constexpr int64_t kBlock = 64;  // channels per call of a channel loop (the zero and discard rows)

// Winograd convolutions need, per task, at least this many channels in and out: with fewer, the
// transforms' memory traffic outweighs the multiply-adds saved (benchmarks/winograd_conv.py's
// per-shape table). F(4x4, 3x3) moves fewer values per pixel, so it pays from fewer channels.
constexpr int64_t kWinograd2x2MinChannels = 48, kWinograd4x4MinChannels = 32;
// F(4x4, 3x3) needs at least this many 4x4 output blocks per task (images x blocks per map): its
// kernels have 36 transform points, which few blocks do not amortise.
constexpr int64_t kWinograd4x4MinBlocks = 64;

// ---- The channel loops: each is a non-template function per dtype with `restrict` pointer
// parameters (or, where it reads and writes rows through arrays of row pointers, `ivdep`), built
// for AVX-512, AVX2 and baseline x86-64 (PYMETA_MULTIVERSION), like bn_relu_pool.cpp's: GCC
// vectorises them only so. They read and write the tensors' rows in place: staging rows through
// block buffers took variable-length copies that cost more than the arithmetic (perf: `rep movsq`
// was half of input_transform's time).
#define PYMETA_WINOGRAD_DEFS(T)                                                                                 \
  /* v = B^T d B for nb channels of one 4x4 tile: d and v, 16 rows (row-major points). */                      \
  PYMETA_MULTIVERSION void input_points(int64_t nb, const T* const* rows_in, T* const* rows_out) {             \
    const T* d[16];                                                                                             \
    T* v[16];                                                                                                   \
    for (int k = 0; k < 16; ++k) d[k] = rows_in[k], v[k] = rows_out[k];                                         \
    _Pragma("GCC ivdep") for (int64_t c = 0; c < nb; ++c) {                                                     \
      T u[16];                                                                                                  \
      for (int j = 0; j < 4; ++j) { /* rows: B^T d */                                                          \
        u[0 + j] = d[0 + j][c] - d[8 + j][c];                                                                   \
        u[4 + j] = d[4 + j][c] + d[8 + j][c];                                                                   \
        u[8 + j] = d[8 + j][c] - d[4 + j][c];                                                                   \
        u[12 + j] = d[4 + j][c] - d[12 + j][c];                                                                 \
      }                                                                                                         \
      for (int i = 0; i < 16; i += 4) { /* columns: (.) B */                                                   \
        v[i + 0][c] = u[i + 0] - u[i + 2];                                                                      \
        v[i + 1][c] = u[i + 1] + u[i + 2];                                                                      \
        v[i + 2][c] = u[i + 2] - u[i + 1];                                                                      \
        v[i + 3][c] = u[i + 1] - u[i + 3];                                                                      \
      }                                                                                                         \
    }                                                                                                           \
  }                                                                                                             \
  /* m = A e A^T for nb channels of one 2x2 output block: e 4 rows, m 16 rows. */                              \
  PYMETA_MULTIVERSION void adjoint_output_points(int64_t nb, const T* const* rows_in, T* const* rows_out) {    \
    const T* e[4];                                                                                              \
    T* m[16];                                                                                                   \
    for (int k = 0; k < 4; ++k) e[k] = rows_in[k];                                                              \
    for (int k = 0; k < 16; ++k) m[k] = rows_out[k];                                                            \
    _Pragma("GCC ivdep") for (int64_t c = 0; c < nb; ++c) {                                                     \
      T h[8]; /* A e: 4 rows of 2 */                                                                            \
      for (int j = 0; j < 2; ++j) {                                                                             \
        const T e0 = e[j][c], e1 = e[2 + j][c];                                                                 \
        h[0 + j] = e0;                                                                                          \
        h[2 + j] = e0 + e1;                                                                                     \
        h[4 + j] = e0 - e1;                                                                                     \
        h[6 + j] = -e1;                                                                                         \
      }                                                                                                         \
      for (int i = 0; i < 4; ++i) { /* (.) A^T */                                                              \
        m[i * 4 + 0][c] = h[i * 2];                                                                             \
        m[i * 4 + 1][c] = h[i * 2] + h[i * 2 + 1];                                                              \
        m[i * 4 + 2][c] = h[i * 2] - h[i * 2 + 1];                                                              \
        m[i * 4 + 3][c] = -h[i * 2 + 1];                                                                        \
      }                                                                                                         \
    }                                                                                                           \
  }                                                                                                             \
  /* y = A^T m A + b for nb channels of one 2x2 output block: m 16 rows, b 1, y 4 rows. */                     \
  PYMETA_MULTIVERSION void output_points(int64_t nb, const T* const* rows_in, const T* __restrict b,           \
                                         T* const* rows_out) {                                                  \
    const T* m[16];                                                                                             \
    T* y[4];                                                                                                    \
    for (int k = 0; k < 16; ++k) m[k] = rows_in[k];                                                             \
    for (int k = 0; k < 4; ++k) y[k] = rows_out[k];                                                             \
    _Pragma("GCC ivdep") for (int64_t c = 0; c < nb; ++c) {                                                     \
      T s[8]; /* A^T m: 2 rows of 4 */                                                                          \
      for (int j = 0; j < 4; ++j) {                                                                             \
        s[j] = m[j][c] + m[4 + j][c] + m[8 + j][c];                                                             \
        s[4 + j] = m[4 + j][c] - m[8 + j][c] - m[12 + j][c];                                                    \
      }                                                                                                         \
      for (int i = 0; i < 2; ++i) { /* (.) A */                                                                \
        y[i * 2 + 0][c] = s[i * 4] + s[i * 4 + 1] + s[i * 4 + 2] + b[c];                                        \
        y[i * 2 + 1][c] = s[i * 4 + 1] - s[i * 4 + 2] - s[i * 4 + 3] + b[c];                                    \
      }                                                                                                         \
    }                                                                                                           \
  }                                                                                                             \
  /* u = G k G^T for nb 3x3 kernels: k 9 rows (row-major taps), u 16 rows. */                                 \
  PYMETA_MULTIVERSION void kernel_points(int64_t nb, const T* const* rows_in, T* const* rows_out) {            \
    const T* g[9];                                                                                              \
    T* u[16];                                                                                                   \
    for (int k = 0; k < 9; ++k) g[k] = rows_in[k];                                                              \
    for (int k = 0; k < 16; ++k) u[k] = rows_out[k];                                                            \
    _Pragma("GCC ivdep") for (int64_t c = 0; c < nb; ++c) {                                                     \
      T k[9], a[12]; /* a = G k: 4 rows of 3 */                                                                 \
      for (int i = 0; i < 9; ++i) k[i] = g[i][c];                                                               \
      for (int j = 0; j < 3; ++j) {                                                                             \
        a[0 + j] = k[j];                                                                                        \
        a[3 + j] = T(0.5) * (k[j] + k[3 + j] + k[6 + j]);                                                       \
        a[6 + j] = T(0.5) * (k[j] - k[3 + j] + k[6 + j]);                                                       \
        a[9 + j] = k[6 + j];                                                                                    \
      }                                                                                                         \
      for (int i = 0; i < 4; ++i) { /* (.) G^T */                                                              \
        const T* r = a + 3 * i;                                                                                 \
        u[i * 4 + 0][c] = r[0];                                                                                 \
        u[i * 4 + 1][c] = T(0.5) * (r[0] + r[1] + r[2]);                                                        \
        u[i * 4 + 2][c] = T(0.5) * (r[0] - r[1] + r[2]);                                                        \
        u[i * 4 + 3][c] = r[2];                                                                                 \
      }                                                                                                         \
    }                                                                                                           \
  }                                                                                                             \
  /* t = G^T d G for nb channels: d 16 rows (points), t 9 rows (the taps). */                                  \
  PYMETA_MULTIVERSION void kernel_adjoint_points(int64_t nb, const T* const* rows_in, T* const* rows_out) {    \
    const T* d[16];                                                                                             \
    T* t[9];                                                                                                    \
    for (int k = 0; k < 16; ++k) d[k] = rows_in[k];                                                             \
    for (int k = 0; k < 9; ++k) t[k] = rows_out[k];                                                             \
    _Pragma("GCC ivdep") for (int64_t c = 0; c < nb; ++c) {                                                     \
      T a[12]; /* G^T d: 3 rows of 4 */                                                                         \
      for (int j = 0; j < 4; ++j) {                                                                             \
        const T d0 = d[j][c], d1 = d[4 + j][c], d2 = d[8 + j][c], d3 = d[12 + j][c];                            \
        a[0 + j] = d0 + T(0.5) * (d1 + d2);                                                                     \
        a[4 + j] = T(0.5) * (d1 - d2);                                                                          \
        a[8 + j] = T(0.5) * (d1 + d2) + d3;                                                                     \
      }                                                                                                         \
      for (int i = 0; i < 3; ++i) { /* (.) G */                                                                \
        const T* r = a + 4 * i;                                                                                 \
        t[i * 3 + 0][c] = r[0] + T(0.5) * (r[1] + r[2]);                                                        \
        t[i * 3 + 1][c] = T(0.5) * (r[1] - r[2]);                                                               \
        t[i * 3 + 2][c] = T(0.5) * (r[1] + r[2]) + r[3];                                                        \
      }                                                                                                         \
    }                                                                                                           \
  }

PYMETA_WINOGRAD_DEFS(float)
PYMETA_WINOGRAD_DEFS(double)
#undef PYMETA_WINOGRAD_DEFS

// ---- F(4x4, 3x3) (points 0, 1, -1, 2, -2 and infinity): 6x6 input tiles, 4x4 output blocks, 36
// transform points. Each block costs 36 multiply-adds per channel pair instead of F(2x2)'s 64
// (four 2x2 blocks) and a direct convolution's 144, and its transforms move 2.25 values per pixel
// instead of 4; its kernels are 36 points instead of 16, so it pays where there are many tiles
// per kernel (winograd_tile). The 1-D transforms, applied to the rows and then the columns:
//   B^T d:  (4 d0 - 5 d2 + d4, -4 (d1 + d2) + d3 + d4, 4 (d1 - d2) - d3 + d4,
//            2 (d3 - d1) - d2 + d4, 2 (d1 - d3) - d2 + d4, 4 d1 - 5 d3 + d5)
//   G g:    (g0 / 4, -(g0 + g1 + g2) / 6, -(g0 - g1 + g2) / 6, g0 / 24 + g1 / 12 + g2 / 6,
//            g0 / 24 - g1 / 12 + g2 / 6, g2)
//   A^T m:  (m0 + m1 + m2 + m3 + m4, m1 - m2 + 2 (m3 - m4), m1 + m2 + 4 (m3 + m4),
//            m1 - m2 + 8 (m3 - m4) + m5)
template <typename T>
[[gnu::always_inline]] inline void bt6(T d0, T d1, T d2, T d3, T d4, T d5, T* v, int s) {
  v[0] = T(4) * d0 - T(5) * d2 + d4;
  v[s] = d3 + d4 - T(4) * (d1 + d2);
  v[2 * s] = T(4) * (d1 - d2) - d3 + d4;
  v[3 * s] = T(2) * (d3 - d1) - d2 + d4;
  v[4 * s] = T(2) * (d1 - d3) - d2 + d4;
  v[5 * s] = T(4) * d1 - T(5) * d3 + d5;
}
template <typename T>
[[gnu::always_inline]] inline void g6(T g0, T g1, T g2, T* u, int s) {
  const T sixth = T(1) / T(6), even = g0 + g2, quarter = T(0.25) * g0 + g2;
  u[0] = T(0.25) * g0;
  u[s] = -(even + g1) * sixth;
  u[2 * s] = (g1 - even) * sixth;
  u[3 * s] = (quarter + T(0.5) * g1) * sixth;
  u[4 * s] = (quarter - T(0.5) * g1) * sixth;
  u[5 * s] = g2;
}
template <typename T>
[[gnu::always_inline]] inline void at6(T m0, T m1, T m2, T m3, T m4, T m5, T* y, int s) {
  const T a = m1 + m2, b = m1 - m2, c = m3 + m4, d = m3 - m4;
  y[0] = m0 + a + c;
  y[s] = b + T(2) * d;
  y[2 * s] = a + T(4) * c;
  y[3 * s] = b + T(8) * d + m5;
}

// The adjoints, for the weight gradient: A e (4 values to 6) and G^T d (6 values to 3).
template <typename T>
[[gnu::always_inline]] inline void a6(T e0, T e1, T e2, T e3, T* m, int s) {
  const T even = e0 + e2, odd = e1 + e3, even4 = e0 + T(4) * e2, odd2 = T(2) * e1 + T(8) * e3;
  m[0] = e0;
  m[s] = even + odd;
  m[2 * s] = even - odd;
  m[3 * s] = even4 + odd2;
  m[4 * s] = even4 - odd2;
  m[5 * s] = e3;
}
template <typename T>
[[gnu::always_inline]] inline void gt6(T d0, T d1, T d2, T d3, T d4, T d5, T* t, int s) {
  const T sixth = T(1) / T(6), p12 = d1 + d2, p34 = d3 + d4;
  t[0] = T(0.25) * d0 - p12 * sixth + p34 * (T(0.25) * sixth);
  t[s] = ((d2 - d1) + T(0.5) * (d3 - d4)) * sixth;
  t[2 * s] = (p34 - p12) * sixth + d5;
}

// The channel loops below unroll their inner loops explicitly: at 36 points these exceed GCC's
// complete-unrolling limit, and a loop left rolled kept the whole channel loop scalar
// (-fopt-info-vec: "data ref analysis failed"), which ran the transforms several times slower.
#define PYMETA_WINOGRAD6_DEFS(T)                                                                                 \
  /* v = B^T d B for nb channels of one 6x6 tile: d and v, 36 rows (row-major points). */                        \
  PYMETA_MULTIVERSION void input_points6(int64_t nb, const T* const* rows_in, T* const* rows_out) {              \
    const T* d[36];                                                                                              \
    T* v[36];                                                                                                    \
    for (int k = 0; k < 36; ++k) d[k] = rows_in[k], v[k] = rows_out[k];                                          \
    _Pragma("GCC ivdep") for (int64_t c = 0; c < nb; ++c) {                                                      \
      T u[36], w[36];                                                                                            \
      _Pragma("GCC unroll 36")                                                                                   \
      for (int j = 0; j < 6; ++j) /* rows: B^T d */                                                              \
        bt6<T>(d[j][c], d[6 + j][c], d[12 + j][c], d[18 + j][c], d[24 + j][c], d[30 + j][c], u + j, 6);          \
      _Pragma("GCC unroll 36")                                                                                   \
      for (int i = 0; i < 6; ++i) /* columns: (.) B */                                                           \
        bt6<T>(u[6 * i], u[6 * i + 1], u[6 * i + 2], u[6 * i + 3], u[6 * i + 4], u[6 * i + 5], w + 6 * i, 1);    \
      _Pragma("GCC unroll 36")                                                                                   \
      for (int k = 0; k < 36; ++k) v[k][c] = w[k];                                                               \
    }                                                                                                            \
  }                                                                                                              \
  /* y = A^T m A + b for nb channels of one 4x4 output block: m 36 rows, b 1, y 16 rows. */                      \
  PYMETA_MULTIVERSION void output_points6(int64_t nb, const T* const* rows_in, const T* __restrict b,            \
                                          T* const* rows_out) {                                                  \
    const T* m[36];                                                                                              \
    T* y[16];                                                                                                    \
    for (int k = 0; k < 36; ++k) m[k] = rows_in[k];                                                              \
    for (int k = 0; k < 16; ++k) y[k] = rows_out[k];                                                             \
    _Pragma("GCC ivdep") for (int64_t c = 0; c < nb; ++c) {                                                      \
      T s[24], o[16]; /* A^T m: 4 rows of 6 */                                                                   \
      _Pragma("GCC unroll 36")                                                                                   \
      for (int j = 0; j < 6; ++j)                                                                                \
        at6<T>(m[j][c], m[6 + j][c], m[12 + j][c], m[18 + j][c], m[24 + j][c], m[30 + j][c], s + j, 6);          \
      _Pragma("GCC unroll 36")                                                                                   \
      for (int i = 0; i < 4; ++i) /* (.) A */                                                                    \
        at6<T>(s[6 * i], s[6 * i + 1], s[6 * i + 2], s[6 * i + 3], s[6 * i + 4], s[6 * i + 5], o + 4 * i, 1);    \
      _Pragma("GCC unroll 36")                                                                                   \
      for (int k = 0; k < 16; ++k) y[k][c] = o[k] + b[c];                                                        \
    }                                                                                                            \
  }                                                                                                              \
  /* u = G k G^T for nb 3x3 kernels: k 9 rows (row-major taps), u 36 rows. */                                    \
  PYMETA_MULTIVERSION void kernel_points6(int64_t nb, const T* const* rows_in, T* const* rows_out) {             \
    const T* g[9];                                                                                               \
    T* u[36];                                                                                                    \
    for (int k = 0; k < 9; ++k) g[k] = rows_in[k];                                                               \
    for (int k = 0; k < 36; ++k) u[k] = rows_out[k];                                                             \
    _Pragma("GCC ivdep") for (int64_t c = 0; c < nb; ++c) {                                                      \
      T a[18], r[36]; /* a = G k: 6 rows of 3 */                                                                 \
      _Pragma("GCC unroll 36")                                                                                   \
      for (int j = 0; j < 3; ++j) g6<T>(g[j][c], g[3 + j][c], g[6 + j][c], a + j, 3);                            \
      _Pragma("GCC unroll 36")                                                                                   \
      for (int i = 0; i < 6; ++i) g6<T>(a[3 * i], a[3 * i + 1], a[3 * i + 2], r + 6 * i, 1); /* (.) G^T */       \
      _Pragma("GCC unroll 36")                                                                                   \
      for (int k = 0; k < 36; ++k) u[k][c] = r[k];                                                               \
    }                                                                                                            \
  }                                                                                                              \
  /* m = A e A^T for nb channels of one 4x4 output block: e 16 rows, m 36 rows. */                               \
  PYMETA_MULTIVERSION void adjoint_output_points6(int64_t nb, const T* const* rows_in, T* const* rows_out) {     \
    const T* e[16];                                                                                              \
    T* m[36];                                                                                                    \
    for (int k = 0; k < 16; ++k) e[k] = rows_in[k];                                                              \
    for (int k = 0; k < 36; ++k) m[k] = rows_out[k];                                                             \
    _Pragma("GCC ivdep") for (int64_t c = 0; c < nb; ++c) {                                                      \
      T h[24], r[36]; /* A e: 6 rows of 4 */                                                                     \
      _Pragma("GCC unroll 36")                                                                                   \
      for (int j = 0; j < 4; ++j) a6<T>(e[j][c], e[4 + j][c], e[8 + j][c], e[12 + j][c], h + j, 4);              \
      _Pragma("GCC unroll 36")                                                                                   \
      for (int i = 0; i < 6; ++i) a6<T>(h[4 * i], h[4 * i + 1], h[4 * i + 2], h[4 * i + 3], r + 6 * i, 1);       \
      _Pragma("GCC unroll 36")                                                                                   \
      for (int k = 0; k < 36; ++k) m[k][c] = r[k];                                                               \
    }                                                                                                            \
  }                                                                                                              \
  /* t = G^T d G for nb channels: d 36 rows (points), t 9 rows (the taps). */                                    \
  PYMETA_MULTIVERSION void kernel_adjoint_points6(int64_t nb, const T* const* rows_in, T* const* rows_out) {     \
    const T* d[36];                                                                                              \
    T* t[9];                                                                                                     \
    for (int k = 0; k < 36; ++k) d[k] = rows_in[k];                                                              \
    for (int k = 0; k < 9; ++k) t[k] = rows_out[k];                                                              \
    _Pragma("GCC ivdep") for (int64_t c = 0; c < nb; ++c) {                                                      \
      T a[18], r[9]; /* G^T d: 3 rows of 6 */                                                                    \
      _Pragma("GCC unroll 36")                                                                                   \
      for (int j = 0; j < 6; ++j)                                                                                \
        gt6<T>(d[j][c], d[6 + j][c], d[12 + j][c], d[18 + j][c], d[24 + j][c], d[30 + j][c], a + j, 6);          \
      _Pragma("GCC unroll 36")                                                                                   \
      for (int i = 0; i < 3; ++i)                                                                                \
        gt6<T>(a[6 * i], a[6 * i + 1], a[6 * i + 2], a[6 * i + 3], a[6 * i + 4], a[6 * i + 5], r + 3 * i, 1);    \
      _Pragma("GCC unroll 36")                                                                                   \
      for (int k = 0; k < 9; ++k) t[k][c] = r[k];                                                                \
    }                                                                                                            \
  }

PYMETA_WINOGRAD6_DEFS(float)
PYMETA_WINOGRAD6_DEFS(double)
#undef PYMETA_WINOGRAD6_DEFS

// The slot of each transform point: in order, or permuted by Π on both axes (rows and columns
// 0 and 3 swapped) for the transposed convolution, whose flipped kernels have the points of the
// unflipped ones in that order: its values go to the slots where the product meets U[Π k].
constexpr int kSlots[2][16] = {{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
                               {15, 13, 14, 12, 7, 5, 6, 4, 11, 9, 10, 8, 3, 1, 2, 0}};

// Where the 16 transform points of one (task, tile) row go: point k's element (t, p, c) at
// base + slot[k]*sk + t*st + p*sp + c.
template <typename T>
struct DomainRows {
  T* base;
  int64_t sk, st, sp;
  const int* slot = nullptr;  // none: in order
  T* at(int64_t k, int64_t t, int64_t p) const { return base + (slot ? slot[k] : k) * sk + t * st + p * sp; }
};

// Image geometry of a value (N, H, W, T*C) (its channels-last memory) and its grid of m x m
// output blocks (m = 2 for F(2x2, 3x3), 4 for F(4x4, 3x3)).
struct Grid {
  int64_t n, h, w, tasks, c, m, th, tw;
  int64_t tiles() const { return n * th * tw; }
  Grid(const at::Tensor& v, int64_t tasks_, int64_t m_) : n(v.size(0)), h(v.size(2)), w(v.size(3)), tasks(tasks_),
      c(v.size(1) / tasks_), m(m_), th((v.size(2) + m_ - 1) / m_), tw((v.size(3) + m_ - 1) / m_) {}
  // Task t's channels at pixel (n, r, s), or nullptr outside the image.
  template <typename T>
  const T* pixel(const T* v, int64_t t, int64_t n_, int64_t r, int64_t s) const {
    if (r < 0 || r >= h || s < 0 || s >= w) return nullptr;
    return v + ((n_ * h + r) * w + s) * tasks * c + t * c;
  }
};

// A run of consecutive tiles, [begin, end): what one chunk of products takes.
struct TileRange {
  int64_t begin, end;
  int64_t size() const { return end - begin; }
};

// Runs f(t, i, n, r0, s0) over every (task, tile) pair of the range; i: the tile's place in the
// range; (n, r0, s0): its image and top-left output pixel.
template <typename F>
void for_tiles(const Grid& g, TileRange range, F f) {
  const int64_t grain = std::max<int64_t>(1, 16384 / ((g.m + 2) * (g.m + 2) * g.c));
  at::parallel_for(0, range.size() * g.tasks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t t = q % g.tasks, i = q / g.tasks, p = range.begin + i;
      f(t, i, p / (g.tw * g.th), g.m * ((p / g.tw) % g.th), g.m * (p % g.tw));
    }
  });
}

// Tiles per chunk of products for rows of `width` values (both operands' widths summed) at each
// of `points` transform points, out of
// `total`: the chunk's transform-domain values stay in the L2 cache between their transforms and
// products; one chunk for all tiles would stream them through memory (at 16x16 maps with 75
// images, that took 1.9x oneDNN's time). The chunks are of equal size: a short last chunk's
// products run at a much lower rate than full ones (a torch.profiler view of the 1-shot step).
int64_t chunk_tiles(int64_t total, int64_t tasks, int64_t width, size_t element_size, int64_t points) {
  constexpr int64_t kChunkBytes = int64_t{2} << 20, kMinTiles = 64;
  const int64_t most =
      std::max<int64_t>(kMinTiles, kChunkBytes / (points * tasks * width * static_cast<int64_t>(element_size)));
  const int64_t chunks = (total + most - 1) / most;
  return (total + chunks - 1) / chunks;
}

// A row of kBlock zeros: what a transform reads for pixels outside the image (the padding).
template <typename T>
const T* zero_row() {
  alignas(64) static const T zeros[kBlock] = {};
  return zeros;
}

// V = B^T d B for every (m + 2) x (m + 2) input tile of the range (zero outside the image: the
// padding).
template <typename T, int M>
void input_transform(const T* x, const Grid& g, TileRange range, const DomainRows<T>& out) {
  constexpr int kSide = M + 2, kPoints = kSide * kSide;
  for_tiles(g, range, [&](int64_t t, int64_t p, int64_t n, int64_t r0, int64_t s0) {
    const T* src[kPoints];
    for (int i = 0; i < kPoints; ++i) src[i] = g.pixel(x, t, n, r0 - 1 + i / kSide, s0 - 1 + i % kSide);
    for (int64_t c0 = 0; c0 < g.c; c0 += kBlock) {
      const T* d[kPoints];
      T* v[kPoints];
      for (int k = 0; k < kPoints; ++k) {
        d[k] = src[k] ? src[k] + c0 : zero_row<T>();
        v[k] = out.at(k, t, p) + c0;
      }
      if constexpr (M == 2) input_points(std::min(kBlock, g.c - c0), d, v);
      else input_points6(std::min(kBlock, g.c - c0), d, v);
    }
  });
}

// dM = A dy A^T for every m x m output block of the range (zero outside the image): the
// adjoint of output_transform.
template <typename T, int Mb>
void output_adjoint(const T* gy, const Grid& g, TileRange range, const DomainRows<T>& out) {
  constexpr int kPoints = (Mb + 2) * (Mb + 2), kOut = Mb * Mb;
  for_tiles(g, range, [&](int64_t t, int64_t p, int64_t n, int64_t r0, int64_t s0) {
    const T* src[kOut];
    for (int i = 0; i < kOut; ++i) src[i] = g.pixel(gy, t, n, r0 + i / Mb, s0 + i % Mb);
    for (int64_t c0 = 0; c0 < g.c; c0 += kBlock) {
      const T* e[kOut];
      T* m[kPoints];
      for (int i = 0; i < kOut; ++i) e[i] = src[i] ? src[i] + c0 : zero_row<T>();
      for (int k = 0; k < kPoints; ++k) m[k] = out.at(k, t, p) + c0;
      if constexpr (Mb == 2) adjoint_output_points(std::min(kBlock, g.c - c0), e, m);
      else adjoint_output_points6(std::min(kBlock, g.c - c0), e, m);
    }
  });
}

// y = A^T m A (+ b) for every m x m output block of the range, m from M (P, T, range, O) (point
// k in slot[k]); y (N, H, W, T*O).
template <typename T, int Mb>
void output_transform(const T* M, const int* slot, const T* bias, const Grid& g, TileRange range, T* y) {
  constexpr int kPoints = (Mb + 2) * (Mb + 2), kOut = Mb * Mb;
  const DomainRows<T> in{const_cast<T*>(M), g.tasks * range.size() * g.c, range.size() * g.c, g.c, slot};
  for_tiles(g, range, [&](int64_t t, int64_t p, int64_t n, int64_t r0, int64_t s0) {
    T* dst[kOut];
    for (int i = 0; i < kOut; ++i) {
      dst[i] = const_cast<T*>(g.pixel(static_cast<const T*>(y), t, n, r0 + i / Mb, s0 + i % Mb));
    }
    alignas(64) T discard[kBlock];  // where outputs beyond the image's edge go
    for (int64_t c0 = 0; c0 < g.c; c0 += kBlock) {
      const T* m[kPoints];
      T* o[kOut];
      for (int k = 0; k < kPoints; ++k) m[k] = in.at(k, t, p) + c0;
      for (int i = 0; i < kOut; ++i) o[i] = dst[i] ? dst[i] + c0 : discard;
      const T* b = bias ? bias + t * g.c + c0 : zero_row<T>();
      if constexpr (Mb == 2) output_points(std::min(kBlock, g.c - c0), m, b, o);
      else output_points6(std::min(kBlock, g.c - c0), m, b, o);
    }
  });
}

// The transformed kernels of weights w (T*R, 3, 3, S), the last dim innermost: U[k, t, r, :]
// (S values) at out + k*sk + t*st + r*so; with `flip`, those of the kernels turned by 180
// degrees (the transposed convolution's, for F(4x4, 3x3)).
template <typename T, int M>
void weight_transform(const T* w, int64_t tasks, int64_t rows, int64_t cols, T* out, int64_t sk, int64_t st,
                      int64_t so, bool flip) {
  constexpr int kPoints = (M + 2) * (M + 2);
  at::parallel_for(0, tasks * rows, std::max<int64_t>(1, 4096 / cols), [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const T* taps[9];
      T* points[kPoints];
      for (int i = 0; i < 9; ++i) taps[i] = w + (q * 9 + (flip ? 8 - i : i)) * cols;
      for (int k = 0; k < kPoints; ++k) points[k] = out + k * sk + (q / rows) * st + (q % rows) * so;
      if constexpr (M == 2) kernel_points(cols, taps, points);
      else kernel_points6(cols, taps, points);
    }
  });
}

// dw[t*O + o, :, :, c] = G^T dU[:, t, o, c] G, dU (P, T, O, C); dw (T*O, 3, 3, C).
template <typename T, int M>
void weight_adjoint(const T* dU, int64_t tasks, int64_t o, int64_t c, T* dw) {
  constexpr int kPoints = (M + 2) * (M + 2);
  const int64_t sk = tasks * o * c;
  at::parallel_for(0, tasks * o, std::max<int64_t>(1, 4096 / c), [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const T* points[kPoints];
      T* taps[9];
      for (int k = 0; k < kPoints; ++k) points[k] = dU + k * sk + q * c;
      for (int i = 0; i < 9; ++i) taps[i] = dw + (q * 9 + i) * c;
      if constexpr (M == 2) kernel_adjoint_points(c, points, taps);
      else kernel_adjoint_points6(c, points, taps);
    }
  });
}

// A value's channels-last memory, (N, H, W, T*C) contiguous (a view when it already is).
at::Tensor nhwc(const at::Tensor& v) { return v.permute({0, 2, 3, 1}).contiguous(); }
// Folded weights with channels innermost, (T*O, 3, 3, C).
at::Tensor ohwc(const at::Tensor& w) { return w.permute({0, 2, 3, 1}).contiguous(); }
// Folded weights with output channels innermost, (T*C, 3, 3, O): per task and tap, the (O, C)
// matrix of ohwc(w) (a view of channels-last weights) transposed; float32 by 8 x 8 register
// blocks, which ATen's strided permuted copy is not.
at::Tensor ihwo(const at::Tensor& w, int64_t tasks) {
  const int64_t o = w.size(0) / tasks, c = w.size(1);
  if (w.scalar_type() != at::kFloat) {
    return w.view({tasks, o, c, 3, 3}).permute({0, 2, 3, 4, 1}).contiguous();
  }
  const at::Tensor rows = ohwc(w);
  at::Tensor out = at::empty({tasks * c, 3, 3, o}, w.options());
  const float* src = rows.const_data_ptr<float>();
  float* dst = out.mutable_data_ptr<float>();
  at::parallel_for(0, tasks * 9, 1, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t t = q / 9, tap = q % 9;
      transpose(o, c, src + t * o * 9 * c + tap * c, 9 * c, dst + t * c * 9 * o + tap * o, 9 * o);
    }
  });
  return out;
}

std::vector<WinogradTerm> defined_terms(std::initializer_list<WinogradTerm> terms) {
  std::vector<WinogradTerm> used;
  for (const auto& term : terms) {
    if (term.first->defined() && term.second->defined()) used.push_back(term);
  }
  return used;
}

// The convolution (or transposed convolution) of winograd_conv by F(m x m, 3x3), m = M.
template <int M>
at::Tensor winograd_conv_blocks(const std::vector<WinogradTerm>& used, const at::Tensor& b, int64_t tasks,
                                bool transposed) {
  constexpr int64_t kPoints = (M + 2) * (M + 2);
  const at::Tensor& x0 = *used[0].first;
  const at::Tensor& w0 = *used[0].second;
  const Grid g(x0, tasks, M);
  // Input channels c and output channels o per task; the weights are (T*o_w, c_w, 3, 3).
  const int64_t o_w = w0.size(0) / tasks, c_w = w0.size(1);
  const int64_t c = transposed ? o_w : c_w, o = transposed ? c_w : o_w, nt = static_cast<int64_t>(used.size());
  const int64_t kdepth = nt * c, tiles = g.tiles();
  const int64_t chunk = chunk_tiles(tiles, tasks, kdepth + o, x0.element_size(), kPoints);
  // The right operand U[k, t] (nt*c, o): the terms stacked, one row per input channel, so the
  // products read both operands row-major (cpu/batched_gemm.h). The convolution's kernels come
  // from weights turned to (T*C, 3, 3, O); the transposed convolution's rows are w's own (its input
  // channels are w's outputs), and its kernels are the flipped ones: F(2x2)'s points of a flipped
  // kernel are the unflipped one's in permuted order, so its values' points go to permuted slots
  // (kSlots) and it needs no kernels of its own; F(4x4)'s points (0, +-1, +-2) have no such
  // symmetry, so it transforms flipped taps.
  const at::Tensor U = at::empty({kPoints * tasks, kdepth, o}, x0.options());
  const at::Tensor V = at::empty({kPoints * tasks, chunk, kdepth}, x0.options());
  at::Tensor y = at::empty({g.n, g.h, g.w, tasks * o}, x0.options());
  const Grid gy(y.permute({0, 3, 1, 2}), tasks, M);
  const int* slot = M == 2 && transposed ? kSlots[1] : nullptr;
  std::vector<at::Tensor> values;
  for (const auto& term : used) values.push_back(nhwc(*term.first));
  AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "winograd_conv", [&] {
    for (int64_t i = 0; i < nt; ++i) {
      const at::Tensor rows = transposed ? ohwc(*used[i].second) : ihwo(*used[i].second, tasks);
      weight_transform<scalar_t, M>(rows.data_ptr<scalar_t>(), tasks, c, o, U.data_ptr<scalar_t>() + i * c * o,
                                    tasks * kdepth * o, kdepth * o, o, M == 4 && transposed);
    }
    const scalar_t* bias = b.defined() ? b.contiguous().data_ptr<scalar_t>() : nullptr;
    for (int64_t p0 = 0; p0 < tiles; p0 += chunk) {
      const TileRange range{p0, std::min(tiles, p0 + chunk)};
      const at::Tensor v = V.narrow(1, 0, range.size());
      for (int64_t i = 0; i < nt; ++i) {
        input_transform<scalar_t, M>(
            values[i].data_ptr<scalar_t>(), g, range,
            {V.data_ptr<scalar_t>() + i * c, tasks * chunk * kdepth, chunk * kdepth, kdepth, slot});
      }
      const at::Tensor prod = batched_gemm(v, U);  // (P*T, range, o)
      output_transform<scalar_t, M>(prod.data_ptr<scalar_t>(), slot, bias, gy, range, y.data_ptr<scalar_t>());
    }
  });
  return y.permute({0, 3, 1, 2});
}

// winograd_conv_weight_grad by F(m x m, 3x3), m = M.
template <int M>
at::Tensor winograd_weight_grad_blocks(const std::vector<WinogradTerm>& used, const at::Tensor& w, int64_t tasks) {
  constexpr int64_t kPoints = (M + 2) * (M + 2);
  const Grid gy0(*used[0].first, tasks, M), gx0(*used[0].second, tasks, M);
  const int64_t o = gy0.c, c = gx0.c, tiles = gy0.tiles();
  const at::TensorOptions opts = w.options();
  // The pairs' tiles, one after another, in chunks; each chunk's products add to dU.
  const int64_t total = tiles * static_cast<int64_t>(used.size());
  const int64_t chunk = chunk_tiles(total, tasks, c + o, w.element_size(), kPoints);
  const at::Tensor V = at::empty({kPoints * tasks, chunk, c}, opts), dM = at::empty({kPoints * tasks, chunk, o}, opts);
  std::vector<at::Tensor> values;  // gy_i, x_i
  for (const auto& pair : used) values.insert(values.end(), {nhwc(*pair.first), nhwc(*pair.second)});
  at::Tensor dU;  // (P*T, o, c)
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "winograd_conv_weight_grad", [&] {
    for (int64_t r0 = 0; r0 < total; r0 += chunk) {
      const int64_t rows = std::min(chunk, total - r0);
      for (int64_t r = r0; r < r0 + rows;) {  // the pieces of the pairs' tile runs in this chunk
        const int64_t i = r / tiles, p = r % tiles, len = std::min(tiles - p, r0 + rows - r);
        const TileRange range{p, p + len};
        input_transform<scalar_t, M>(values[2 * i + 1].data_ptr<scalar_t>(), gx0, range,
                                     {V.data_ptr<scalar_t>() + (r - r0) * c, tasks * chunk * c, chunk * c, c});
        output_adjoint<scalar_t, M>(values[2 * i].data_ptr<scalar_t>(), gy0, range,
                                    {dM.data_ptr<scalar_t>() + (r - r0) * o, tasks * chunk * o, chunk * o, o});
        r += len;
  
    }
      const at::Tensor v = V.narrow(1, 0, rows), m = dM.narrow(1, 0, rows).transpose(1, 2);
      if (dU.defined()) batched_gemm_add(m, v, dU);
      else dU = batched_gemm(m, v);
    }
  });
  at::Tensor dw = at::empty({tasks * o, 3, 3, c}, opts);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "winograd_conv_weight_grad", [&] {
    weight_adjoint<scalar_t, M>(dU.data_ptr<scalar_t>(), tasks, o, c, dw.data_ptr<scalar_t>());
  });
  at::Tensor folded = dw.permute({0, 3, 1, 2});
  return w.is_contiguous(at::MemoryFormat::ChannelsLast) ? folded : folded.contiguous();
}

}  // namespace

// The blocks must cover the map with little waste: at least 1.5x fewer multiply-adds than the
// direct convolution's 9 per output once partial blocks count (F(2x2) fails on 3x3 and 1x1 maps),
// and F(4x4) no more than F(2x2).
int winograd_block_by_shape(int64_t n, int64_t c, int64_t o, int64_t h, int64_t w) {
  const int64_t blocks2 = ((h + 1) / 2) * ((w + 1) / 2), blocks4 = ((h + 3) / 4) * ((w + 3) / 4);
  if (std::min(c, o) >= kWinograd4x4MinChannels && 2 * 9 * h * w >= 3 * 36 * blocks4 && 36 * blocks4 <= 16 * blocks2 &&
      n * blocks4 >= kWinograd4x4MinBlocks) {
    return 4;
  }
  if (std::min(c, o) >= kWinograd2x2MinChannels && 2 * 9 * h * w >= 3 * 16 * blocks2) return 2;
  return 0;
}

at::Tensor winograd_conv(std::initializer_list<WinogradTerm> terms, const at::Tensor& b, int64_t tasks,
                         bool transposed, int block) {
  const std::vector<WinogradTerm> used = defined_terms(terms);
  if (used.empty()) return at::Tensor();
  return block == 4 ? winograd_conv_blocks<4>(used, b, tasks, transposed)
                    : winograd_conv_blocks<2>(used, b, tasks, transposed);
}

at::Tensor winograd_conv_weight_grad(std::initializer_list<WinogradTerm> pairs, const at::Tensor& w, int64_t tasks,
                                     int block) {
  const std::vector<WinogradTerm> used = defined_terms(pairs);
  if (used.empty()) return at::Tensor();
  return block == 4 ? winograd_weight_grad_blocks<4>(used, w, tasks) : winograd_weight_grad_blocks<2>(used, w, tasks);
}

}  // namespace pymeta
