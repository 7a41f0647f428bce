// small_gemm: the model-aware core's per-task matrix product (cpu/small_gemm.h) on its own, so
// that tests can check each path it picks by shape (BLAS; the AVX2 kernel with its masked tails
// and its transposed B; the plain loops with their depth-1 outer product) against torch.matmul
// (tests/test_small_gemm.py).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>

#include "cpu/small_gemm.h"

namespace pymeta {
namespace {

at::Tensor small_gemm_kernel(const at::Tensor& a, const at::Tensor& b, bool transpose_a, bool transpose_b,
                             const std::optional<at::Tensor>& c) {
  constexpr const char* op = "pymeta::small_gemm";
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, op, ": a and b must be 2-d, got shapes ", a.sizes(), " and ",
              b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type() &&
                  (a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble),
              op, ": a and b must both be float32 or both float64, got ", a.scalar_type(), " and ",
              b.scalar_type());
  const int64_t m = transpose_a ? a.size(1) : a.size(0), k = transpose_a ? a.size(0) : a.size(1);
  const int64_t kb = transpose_b ? b.size(1) : b.size(0), n = transpose_b ? b.size(0) : b.size(1);
  TORCH_CHECK(k == kb, op, ": op(a) is ", m, " x ", k, " but op(b) is ", kb, " x ", n);
  const at::Tensor A = a.contiguous(), B = b.contiguous();
  at::Tensor C;
  if (c.has_value()) {
    TORCH_CHECK(c->sizes() == at::IntArrayRef({m, n}) && c->scalar_type() == a.scalar_type(), op,
                ": c must be ", m, " x ", n, " ", a.scalar_type(), ", got ", c->sizes(), " ", c->scalar_type());
    C = c->clone(at::MemoryFormat::Contiguous);
  } else {
    C = at::empty({m, n}, a.options());
  }
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "small_gemm", [&] {
    gemm<scalar_t>(transpose_a, transpose_b, m, n, k, A.const_data_ptr<scalar_t>(), B.const_data_ptr<scalar_t>(),
                   c.has_value() ? scalar_t(1) : scalar_t(0), C.mutable_data_ptr<scalar_t>());
  });
  return C;
}

}  // namespace

TORCH_LIBRARY_IMPL(pymeta, CPU, m) { m.impl("small_gemm", &small_gemm_kernel); }

}  // namespace pymeta
