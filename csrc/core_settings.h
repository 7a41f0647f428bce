// Process-wide settings of the compiled core, set from Python through pymeta._C.
#pragma once

#include <atomic>
#include <cstdint>

namespace pymeta {

// Most bytes of activations one thread keeps from the inner loop for the reverse sweep of the
// model-aware core; above it the sweep recomputes them (less memory, more arithmetic).
inline std::atomic<int64_t>& activation_cache_limit() {
  static std::atomic<int64_t> limit{int64_t{64} << 20};
  return limit;
}

// How many support passes the layered core's reverse sweeps have recomputed, and how many inner
// steps they ran again to recompute parameter iterates (what did not fit under
// activation_cache_limit), since the process started: diagnostics for tests and benchmarks.
inline std::atomic<int64_t>& sweep_recomputed_passes() {
  static std::atomic<int64_t> count{0};
  return count;
}
inline std::atomic<int64_t>& sweep_recomputed_steps() {
  static std::atomic<int64_t> count{0};
  return count;
}
// How many layers checkpointed forwards ran again in backward (values beyond the limit).
inline std::atomic<int64_t>& recomputed_layers() {
  static std::atomic<int64_t> count{0};
  return count;
}

// The layered core's CPU fast paths, all on by default: the channels-last layout for images
// and convolution weights, the fused kernels (cpu/bn_relu_pool.h, cpu/bn_tangent.h), and (below)
// matrix-product weight gradients and Winograd convolutions. Off,
// the core runs every layer in ATen ops, as it does on CUDA: tests switch them off to keep those
// rules tested on the CPU, and benchmarks/omniglot_step.py to measure what each path gains.
inline std::atomic<bool>& cpu_channels_last() {
  static std::atomic<bool> on{true};
  return on;
}
inline std::atomic<bool>& cpu_fused_kernels() {
  static std::atomic<bool> on{true};
  return on;
}
// The third: convolution weight gradients at small shapes as matrix products (net/layers.cpp,
// weight_grad_by_gemm) instead of oneDNN's backward-weights kernels.
inline std::atomic<bool>& cpu_gemm_weight_grads() {
  static std::atomic<bool> on{true};
  return on;
}

// The fourth: 3x3 convolutions (stride 1, padding 1) with enough channels by Winograd's
// F(2x2, 3x3) or F(4x4, 3x3) (cpu/winograd.h, chosen in net/layers.cpp by winograd_block)
// instead of oneDNN.
inline std::atomic<bool>& cpu_winograd() {
  static std::atomic<bool> on{true};
  return on;
}
// Its output block size: 0 (the default) chooses by shape (winograd_block_by_shape); 2 or 4 forces
// F(2x2) or F(4x4) on every convolution the path takes (3x3, stride 1, padding 1, channels-last):
// tests check both on every shape, and benchmarks/winograd_conv.py times both.
inline std::atomic<int>& winograd_blocks() {
  static std::atomic<int> block{0};
  return block;
}

// The layered core's float32 matrix products on the CPU (cpu/batched_gemm.h) through oneDNN,
// on by default; off, through at::bmm (BLAS), as float64's: benchmarks compare the two.
inline std::atomic<bool>& cpu_onednn_gemm() {
  static std::atomic<bool> on{true};
  return on;
}

// The fused CUDA kernels of batch norm and the activations (cuda/fused_layers.h), on by default
// where they are built. Off, those layers run in ATen ops, their twins: tests compare the two.
inline std::atomic<bool>& cuda_fused_kernels() {
  static std::atomic<bool> on{true};
  return on;
}

// The MLP fast path (net/mlp_net.h), on by default. Off, MLPs run through the layered rules
// like any other network: tests switch it off to check both paths on the same MLP.
inline std::atomic<bool>& mlp_fast_path() {
  static std::atomic<bool> on{true};
  return on;
}

// Tasks per chunk of the model-aware core's task-batched layout (net/layers.h): 0 (the default)
// chooses by network and device (net/maml_core.cpp, tasks_per_chunk); n >= 1 runs n at a time.
inline std::atomic<int64_t>& task_batch() {
  static std::atomic<int64_t> n{0};
  return n;
}

}  // namespace pymeta
