// batched_gemm: the layered core's batched matrix product (cpu/batched_gemm.h) on its own, so that
// tests can check each path it takes (brgemm for row-major operands, oneDNN's matmul for large
// transposed ones, at::bmm otherwise) against torch.bmm (tests/test_batched_gemm.py).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>

#include "cpu/batched_gemm.h"

namespace pymeta {
namespace {

at::Tensor batched_gemm_kernel(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& c) {
  constexpr const char* op = "pymeta::batched_gemm";
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3, op, ": a and b must be 3-d, got shapes ", a.sizes(), " and ",
              b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type() &&
                  (a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble),
              op, ": a and b must both be float32 or both float64, got ", a.scalar_type(), " and ",
              b.scalar_type());
  TORCH_CHECK(a.size(0) == b.size(0) && a.size(2) == b.size(1), op, ": a is ", a.sizes(), " but b is ",
              b.sizes(), "; expected (B, M, K) and (B, K, N)");
  if (!c.has_value()) return batched_gemm(a, b);
  TORCH_CHECK(c->sizes() == at::IntArrayRef({a.size(0), a.size(1), b.size(2)}) && c->scalar_type() == a.scalar_type(),
              op, ": c must be (", a.size(0), ", ", a.size(1), ", ", b.size(2), ") ", a.scalar_type(), ", got ",
              c->sizes(), " ", c->scalar_type());
  at::Tensor out = c->clone(at::MemoryFormat::Contiguous);
  batched_gemm_add(a, b, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pymeta, CPU, m) { m.impl("batched_gemm", &batched_gemm_kernel); }

}  // namespace pymeta
