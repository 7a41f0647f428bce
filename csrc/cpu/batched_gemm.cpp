#include "cpu/batched_gemm.h"

#include "core_settings.h"
#include "cpu/small_gemm.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>

#include <vector>

namespace pymeta {
namespace {

// How a (rows, cols) matrix (dims 1, 2 of a batch) lies in memory: row-major or column-major with
// a leading dimension brgemm takes (no overlapping rows or columns), or neither.
enum class Major { kRow, kColumn, kOther };
Major major(const at::Tensor& t) {
  const int64_t rows = t.size(1), cols = t.size(2);
  if ((cols <= 1 || t.stride(2) == 1) && (rows <= 1 || t.stride(1) >= cols)) return Major::kRow;
  if ((rows <= 1 || t.stride(1) == 1) && (cols <= 1 || t.stride(2) >= rows)) return Major::kColumn;
  return Major::kOther;
}

// One operand's matrices as brgemm reads them: row-major in place, or a row-major copy of each
// column-major matrix in a per-thread buffer (transposed there by 8 x 8 register blocks).
struct Operand {
  const float* data;
  int64_t batch_stride, rows, cols, ld;
  bool copy;
  Operand(const at::Tensor& t)
      : data(t.const_data_ptr<float>()),
        batch_stride(t.stride(0)),
        rows(t.size(1)),
        cols(t.size(2)),
        copy(major(t) == Major::kColumn) {
    ld = copy ? (cols <= 1 ? rows : t.stride(2)) : (rows <= 1 ? cols : t.stride(1));
  }
  // Matrix i, row-major with leading dimension leading(); buffer holds the copy when one is made.
  const float* matrix(int64_t i, std::vector<float>& buffer) const {
    const float* m = data + i * batch_stride;
    if (!copy) return m;
    buffer.resize(rows * cols);
    transpose(cols, rows, m, ld, buffer.data(), cols);  // stays in cache for the product
    return buffer.data();
  }
  int64_t leading() const { return copy ? cols : ld; }
};

bool by_onednn(const at::Tensor& a, const at::Tensor& b) {
  return cpu_onednn_gemm().load() && a.device().is_cpu() && a.scalar_type() == at::kFloat &&
         b.scalar_type() == at::kFloat && major(a) != Major::kOther && major(b) != Major::kOther;
}

// out (contiguous) = a @ b, or += with `add`: float32 on the CPU, by brgemm, oneDNN's
// micro-kernel, one call per matrix.
void onednn_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out, bool add) {
  const int64_t batch = a.size(0), m = a.size(1), k = a.size(2), n = b.size(2);
  if (out.numel() == 0) return;
  if (k == 0) {
    if (!add) out.zero_();
    return;
  }
  const Operand A(a), B(b);
  float* pc = out.mutable_data_ptr<float>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    // Per thread and kept between calls: a transposed copy can pass malloc's mmap threshold,
    // and a fresh one per call would page-fault in every time.
    thread_local std::vector<float> buffer_a, buffer_b;
    for (int64_t i = begin; i < end; ++i) {
      at::native::cpublas::brgemm(m, n, k, A.leading(), B.leading(), n, add, A.matrix(i, buffer_a),
                                  B.matrix(i, buffer_b), pc + i * m * n, false);
    }
  });
}

}  // namespace

at::Tensor batched_gemm(const at::Tensor& a, const at::Tensor& b) {
  if (!by_onednn(a, b)) return at::bmm(a, b);
  at::Tensor out = at::empty({a.size(0), a.size(1), b.size(2)}, a.options());
  onednn_gemm(a, b, out, false);
  return out;
}

void batched_gemm_add(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out) {
  if (!by_onednn(a, b) || !out.is_contiguous()) {
    out.baddbmm_(a, b);
    return;
  }
  onednn_gemm(a, b, out, true);
}

}  // namespace pymeta
