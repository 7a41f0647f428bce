// Batched matrix products of the model-aware core's CPU layers (Winograd's transform-domain
// products, linear layers, GEMM weight gradients). float32 on the CPU goes to oneDNN's brgemm
// micro-kernel (through torch's at::native::cpublas), which uses the CPU's widest vectors on any
// vendor's CPU: MKL's sgemm, behind at::bmm, runs AVX2 code on AMD CPUs with AVX-512 (1.4-2.9x
// slower on the Winograd shapes of benchmarks/batched_gemm.py on an AMD Zen 5). Column-major
// operands are transposed matrix by matrix into a per-thread buffer first. Everything else
// (float64, CUDA, overlapping rows, the path switched off: core_settings.h cpu_onednn_gemm) is
// at::bmm.
#pragma once

#include <ATen/core/Tensor.h>

namespace pymeta {

// a (B, M, K) @ b (B, K, N): (B, M, N), contiguous. Any strides.
at::Tensor batched_gemm(const at::Tensor& a, const at::Tensor& b);

// out (B, M, N) += a @ b.
void batched_gemm_add(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out);

}  // namespace pymeta
