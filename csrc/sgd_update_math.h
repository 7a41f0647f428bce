// Formulas of the inner update, shared by the CPU and CUDA kernels so they cannot drift.
#pragma once

#if defined(__CUDACC__)
#define PYMETA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PYMETA_HOST_DEVICE inline
#endif

namespace pymeta {

// How one lr tensor lines up with a (T, N) view of its param.
enum class LrLayout : int { kScalar = 0, kPerElement = 1, kPerTaskElement = 2 };

// Index into the lr tensor for element j of task t (N elements per task).
PYMETA_HOST_DEVICE int64_t lr_index(LrLayout layout, int64_t t, int64_t j, int64_t n) {
  switch (layout) {
    case LrLayout::kScalar:
      return 0;
    case LrLayout::kPerElement:
      return j;
    default:
      return t * n + j;
  }
}

// theta' = theta - lr * g
template <typename scalar_t>
PYMETA_HOST_DEVICE scalar_t sgd_step(scalar_t theta, scalar_t lr, scalar_t g) {
  return theta - lr * g;
}

// d theta'/d g applied to the upstream gradient u: -lr * u
template <typename scalar_t>
PYMETA_HOST_DEVICE scalar_t sgd_grad_wrt_grad(scalar_t lr, scalar_t u) {
  return -lr * u;
}

}  // namespace pymeta
