// Winograd F(2x2, 3x3) on the CPU (cpu/winograd.h). With B^T, G and A^T the transforms of Lavin
// & Gray (2016), a 2x2 output block of one channel pair is A^T [(G g G^T) ⊙ (B^T d B)] A for the
// 4x4 input tile d under it and the 3x3 kernel g. Summed over input channels, the ⊙ becomes 16
// matrix products (one per point of the 4x4 transform domain) per task:
//   M[k, t] = V[k, t] U[k, t]^T,  V (P tiles, C), U (O, C), M (P, O),
// which one at::bmm runs as a batch of 16*T. The transposed convolution (input gradient) is the
// convolution with each kernel flipped and its channel pair swapped; flipping g permutes the
// transform domain (G R = Π G with Π swapping rows 0 and 3), so it multiplies the same U, met in
// permuted order, untransposed. The weight gradient is the adjoint: dU[k, t] = dM[k, t]^T V[k, t]
// with dM = A dy A^T per 2x2 output block, and dg = G^T dU G.
#include "cpu/winograd.h"

#include "cpu/multiversion.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

namespace pymeta {
namespace {

constexpr int64_t kBlock = 64;  // channels per call of a channel loop (the zero and discard rows)

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
  const int* slot = kSlots[0];
  T* at(int64_t k, int64_t t, int64_t p) const { return base + slot[k] * sk + t * st + p * sp; }
};

// Image geometry of a value (N, H, W, T*C) (its channels-last memory) and its 2x2-block grid.
struct Grid {
  int64_t n, h, w, tasks, c, th, tw;
  int64_t tiles() const { return n * th * tw; }
  Grid(const at::Tensor& v, int64_t tasks_) : n(v.size(0)), h(v.size(2)), w(v.size(3)), tasks(tasks_),
      c(v.size(1) / tasks_), th((v.size(2) + 1) / 2), tw((v.size(3) + 1) / 2) {}
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
  const int64_t grain = std::max<int64_t>(1, 16384 / (16 * g.c));
  at::parallel_for(0, range.size() * g.tasks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t t = q % g.tasks, i = q / g.tasks, p = range.begin + i;
      f(t, i, p / (g.tw * g.th), 2 * ((p / g.tw) % g.th), 2 * (p % g.tw));
    }
  });
}

// Tiles per chunk of products for rows of `width` values (both operands' widths summed), out of
// `total`: the chunk's transform-domain values stay in the L2 cache between their transforms and
// products; one chunk for all tiles would stream them through memory (at 16x16 maps with 75
// images, that took 1.9x oneDNN's time). The chunks are of equal size: a short last chunk's
// products run at a much lower rate than full ones (a torch.profiler view of the 1-shot step).
int64_t chunk_tiles(int64_t total, int64_t tasks, int64_t width, size_t element_size) {
  constexpr int64_t kChunkBytes = int64_t{2} << 20, kMinTiles = 64;
  const int64_t most = std::max<int64_t>(kMinTiles, kChunkBytes / (16 * tasks * width * static_cast<int64_t>(element_size)));
  const int64_t chunks = (total + most - 1) / most;
  return (total + chunks - 1) / chunks;
}

// A row of kBlock zeros: what a transform reads for pixels outside the image (the padding).
template <typename T>
const T* zero_row() {
  alignas(64) static const T zeros[kBlock] = {};
  return zeros;
}

// V = B^T d B for every 4x4 input tile of the range (zero outside the image: the padding).
template <typename T>
void input_transform(const T* x, const Grid& g, TileRange range, const DomainRows<T>& out) {
  for_tiles(g, range, [&](int64_t t, int64_t p, int64_t n, int64_t r0, int64_t s0) {
    const T* src[16];
    for (int i = 0; i < 16; ++i) src[i] = g.pixel(x, t, n, r0 - 1 + i / 4, s0 - 1 + i % 4);
    for (int64_t c0 = 0; c0 < g.c; c0 += kBlock) {
      const T* d[16];
      T* v[16];
      for (int k = 0; k < 16; ++k) {
        d[k] = src[k] ? src[k] + c0 : zero_row<T>();
        v[k] = out.at(k, t, p) + c0;
      }
      input_points(std::min(kBlock, g.c - c0), d, v);
    }
  });
}

// dM = A dy A^T for every 2x2 output block of the range (zero outside the image): the adjoint
// of output_transform.
template <typename T>
void output_adjoint(const T* gy, const Grid& g, TileRange range, const DomainRows<T>& out) {
  for_tiles(g, range, [&](int64_t t, int64_t p, int64_t n, int64_t r0, int64_t s0) {
    const T* src[4];
    for (int i = 0; i < 4; ++i) src[i] = g.pixel(gy, t, n, r0 + i / 2, s0 + i % 2);
    for (int64_t c0 = 0; c0 < g.c; c0 += kBlock) {
      const T* e[4];
      T* m[16];
      for (int i = 0; i < 4; ++i) e[i] = src[i] ? src[i] + c0 : zero_row<T>();
      for (int k = 0; k < 16; ++k) m[k] = out.at(k, t, p) + c0;
      adjoint_output_points(std::min(kBlock, g.c - c0), e, m);
    }
  });
}

// y = A^T m A (+ b) for every 2x2 output block of the range, m from M (16, T, range, O) (point k
// in slot[k]); y (N, H, W, T*O).
template <typename T>
void output_transform(const T* M, const int* slot, const T* bias, const Grid& g, TileRange range, T* y) {
  const DomainRows<T> in{const_cast<T*>(M), g.tasks * range.size() * g.c, range.size() * g.c, g.c, slot};
  for_tiles(g, range, [&](int64_t t, int64_t p, int64_t n, int64_t r0, int64_t s0) {
    T* dst[4];
    for (int i = 0; i < 4; ++i) dst[i] = const_cast<T*>(g.pixel(static_cast<const T*>(y), t, n, r0 + i / 2, s0 + i % 2));
    alignas(64) T discard[kBlock];  // where outputs beyond the image's edge go
    for (int64_t c0 = 0; c0 < g.c; c0 += kBlock) {
      const T* m[16];
      T* o[4];
      for (int k = 0; k < 16; ++k) m[k] = in.at(k, t, p) + c0;
      for (int i = 0; i < 4; ++i) o[i] = dst[i] ? dst[i] + c0 : discard;
      output_points(std::min(kBlock, g.c - c0), m, bias ? bias + t * g.c + c0 : zero_row<T>(), o);
    }
  });
}

// The transformed kernels of folded weights w (T*O, 3, 3, C) (channels innermost), one row of
// C per output channel: U[k, t, o, :] at out + k*sk + t*st + o*so.
template <typename T>
void weight_transform(const T* w, int64_t tasks, int64_t o, int64_t c, T* out, int64_t sk, int64_t st, int64_t so) {
  at::parallel_for(0, tasks * o, std::max<int64_t>(1, 4096 / c), [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const T* taps[9];
      T* points[16];
      for (int i = 0; i < 9; ++i) taps[i] = w + (q * 9 + i) * c;
      for (int k = 0; k < 16; ++k) points[k] = out + k * sk + (q / o) * st + (q % o) * so;
      kernel_points(c, taps, points);
    }
  });
}

// dw[t*O + o, :, :, c] = G^T dU[:, t, o, c] G, dU (16, T, O, C); dw (T*O, 3, 3, C).
template <typename T>
void weight_adjoint(const T* dU, int64_t tasks, int64_t o, int64_t c, T* dw) {
  const int64_t sk = tasks * o * c;
  at::parallel_for(0, tasks * o, std::max<int64_t>(1, 4096 / c), [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const T* points[16];
      T* taps[9];
      for (int k = 0; k < 16; ++k) points[k] = dU + k * sk + q * c;
      for (int i = 0; i < 9; ++i) taps[i] = dw + (q * 9 + i) * c;
      kernel_adjoint_points(c, points, taps);
    }
  });
}

// A value's channels-last memory, (N, H, W, T*C) contiguous (a view when it already is).
at::Tensor nhwc(const at::Tensor& v) { return v.permute({0, 2, 3, 1}).contiguous(); }
// Folded weights with channels innermost, (T*O, 3, 3, C).
at::Tensor ohwc(const at::Tensor& w) { return w.permute({0, 2, 3, 1}).contiguous(); }

std::vector<WinogradTerm> defined_terms(std::initializer_list<WinogradTerm> terms) {
  std::vector<WinogradTerm> used;
  for (const auto& term : terms) {
    if (term.first->defined() && term.second->defined()) used.push_back(term);
  }
  return used;
}

}  // namespace

at::Tensor winograd_conv(std::initializer_list<WinogradTerm> terms, const at::Tensor& b, int64_t tasks,
                         bool transposed) {
  const std::vector<WinogradTerm> used = defined_terms(terms);
  if (used.empty()) return at::Tensor();
  const at::Tensor& x0 = *used[0].first;
  const at::Tensor& w0 = *used[0].second;
  const Grid g(x0, tasks);
  // Input channels c and output channels o per task; the weights are (T*o_w, c_w, 3, 3).
  const int64_t o_w = w0.size(0) / tasks, c_w = w0.size(1);
  const int64_t c = transposed ? o_w : c_w, o = transposed ? c_w : o_w, nt = static_cast<int64_t>(used.size());
  const int64_t kdepth = nt * c, tiles = g.tiles();
  const int64_t chunk = chunk_tiles(tiles, tasks, kdepth + o, x0.element_size());
  // The right operand U[k, t]: for the convolution (o, nt*c), the terms side by side, which the
  // product takes transposed (BLAS reads it in place, cheaper than a transposed copy); for the
  // transposed convolution (nt*c, o), the terms stacked: rows of w are its input channels, and
  // its values' points go to permuted slots (kSlots), so that it needs no kernels of its own.
  at::Tensor U = transposed ? at::empty({16 * tasks, kdepth, o}, x0.options())
                            : at::empty({16 * tasks, o, kdepth}, x0.options());
  const at::Tensor V = at::empty({16 * tasks, chunk, kdepth}, x0.options());
  at::Tensor y = at::empty({g.n, g.h, g.w, tasks * o}, x0.options());
  const Grid gy(y.permute({0, 3, 1, 2}), tasks);
  const int* slot = kSlots[transposed ? 1 : 0];
  std::vector<at::Tensor> values;
  for (const auto& term : used) values.push_back(nhwc(*term.first));
  AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "winograd_conv", [&] {
    for (int64_t i = 0; i < nt; ++i) {
      const at::Tensor wi = ohwc(*used[i].second);
      scalar_t* u = U.data_ptr<scalar_t>() + (transposed ? i * c * o : i * c);
      weight_transform<scalar_t>(wi.data_ptr<scalar_t>(), tasks, o_w, c_w, u, tasks * o * kdepth, o * kdepth,
                                 transposed ? o : kdepth);
    }
    const at::Tensor right = transposed ? U : U.transpose(1, 2);
    const scalar_t* bias = b.defined() ? b.contiguous().data_ptr<scalar_t>() : nullptr;
    for (int64_t p0 = 0; p0 < tiles; p0 += chunk) {
      const TileRange range{p0, std::min(tiles, p0 + chunk)};
      const at::Tensor v = V.narrow(1, 0, range.size());
      for (int64_t i = 0; i < nt; ++i) {
        input_transform<scalar_t>(
            values[i].data_ptr<scalar_t>(), g, range,
            {V.data_ptr<scalar_t>() + i * c, tasks * chunk * kdepth, chunk * kdepth, kdepth, slot});
      }
      const at::Tensor M = at::bmm(v, right);  // (16*T, range, o)
      output_transform<scalar_t>(M.data_ptr<scalar_t>(), slot, bias, gy, range, y.data_ptr<scalar_t>());
    }
  });
  return y.permute({0, 3, 1, 2});
}

at::Tensor winograd_conv_weight_grad(std::initializer_list<WinogradTerm> pairs, const at::Tensor& w, int64_t tasks) {
  const std::vector<WinogradTerm> used = defined_terms(pairs);
  if (used.empty()) return at::Tensor();
  const Grid gy0(*used[0].first, tasks), gx0(*used[0].second, tasks);
  const int64_t o = gy0.c, c = gx0.c, tiles = gy0.tiles();
  const at::TensorOptions opts = w.options();
  // The pairs' tiles, one after another, in chunks; each chunk's products add to dU.
  const int64_t total = tiles * static_cast<int64_t>(used.size());
  const int64_t chunk = chunk_tiles(total, tasks, c + o, w.element_size());
  const at::Tensor V = at::empty({16 * tasks, chunk, c}, opts), dM = at::empty({16 * tasks, chunk, o}, opts);
  std::vector<at::Tensor> values;  // gy_i, x_i
  for (const auto& pair : used) values.insert(values.end(), {nhwc(*pair.first), nhwc(*pair.second)});
  at::Tensor dU;  // (16*T, o, c)
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "winograd_conv_weight_grad", [&] {
    for (int64_t r0 = 0; r0 < total; r0 += chunk) {
      const int64_t rows = std::min(chunk, total - r0);
      for (int64_t r = r0; r < r0 + rows;) {  // the pieces of the pairs' tile runs in this chunk
        const int64_t i = r / tiles, p = r % tiles, len = std::min(tiles - p, r0 + rows - r);
        const TileRange range{p, p + len};
        input_transform<scalar_t>(values[2 * i + 1].data_ptr<scalar_t>(), gx0, range,
                                  {V.data_ptr<scalar_t>() + (r - r0) * c, tasks * chunk * c, chunk * c, c});
        output_adjoint<scalar_t>(values[2 * i].data_ptr<scalar_t>(), gy0, range,
                                 {dM.data_ptr<scalar_t>() + (r - r0) * o, tasks * chunk * o, chunk * o, o});
        r += len;
      }
      const at::Tensor v = V.narrow(1, 0, rows), m = dM.narrow(1, 0, rows).transpose(1, 2);
      if (dU.defined()) dU.baddbmm_(m, v);
      else dU = at::bmm(m, v);
    }
  });
  at::Tensor dw = at::empty({tasks * o, 3, 3, c}, opts);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "winograd_conv_weight_grad", [&] {
    weight_adjoint<scalar_t>(dU.data_ptr<scalar_t>(), tasks, o, c, dw.data_ptr<scalar_t>());
  });
  at::Tensor folded = dw.permute({0, 3, 1, 2});
  return w.is_contiguous(at::MemoryFormat::ChannelsLast) ? folded : folded.contiguous();
}

}  // namespace pymeta
