// The small pybind11 module pymeta._C: build facts and the model-aware core's encoding. Ops live
// in the dispatcher (csrc/ops.cpp); loading this library registers them.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "core_settings.h"
#include "cpu/winograd.h"
#include "cpu/workspace.h"
#include "net/codes.h"
#include "net/mlp_net.h"
#include "net/net.h"

namespace {
bool with_cuda() {
#ifdef PYMETA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

template <size_t N>
pybind11::dict names_dict(const pymeta::EncodingName (&names)[N]) {
  pybind11::dict d;
  for (const auto& entry : names) d[entry.name] = entry.code;
  return d;
}

// The codes and layouts the model-aware ops read, from the constants their parsers use
// (csrc/net/codes.h, csrc/net/net.h): pymeta/model_aware/encoding.py reads this.
pybind11::dict encoding() {
  namespace py = pybind11;
  py::dict fields, batchnorm_ints, conv_ints, pool_ints, net, d;
  fields["kind"] = pymeta::kLayerKindField;
  fields["flag"] = pymeta::kLayerFlagField;
  fields["adapted"] = pymeta::kLayerAdaptedField;
  fields["input"] = pymeta::kLayerInputField;
  fields["input2"] = pymeta::kLayerInput2Field;
  fields["ints"] = pymeta::kLayerIntsField;
  batchnorm_ints["per_step"] = pymeta::kBnPerStepInt;
  batchnorm_ints["channels"] = pymeta::kBnChannelsInt;
  conv_ints["stride"] = pymeta::kConvStrideInt;  // (h, w) pairs from here on
  conv_ints["padding"] = pymeta::kConvPaddingInt;
  pool_ints["kernel"] = pymeta::kPoolKernelInt;
  pool_ints["stride"] = pymeta::kPoolStrideInt;
  pool_ints["padding"] = pymeta::kPoolPaddingInt;
  net["kinds"] = names_dict(pymeta::kLayerKindNames);
  net["fields"] = fields;
  net["num_ints"] = pymeta::kLayerNumInts;
  net["ints_per_layer"] = pymeta::kLayerInts;
  net["batchnorm_ints"] = batchnorm_ints;
  net["conv_ints"] = conv_ints;
  net["pool_ints"] = pool_ints;
  d["net"] = net;
  d["activations"] = names_dict(pymeta::kActivationNames);
  d["losses"] = names_dict(pymeta::kLossNames);
  d["lr_modes"] = names_dict(pymeta::kLrModeNames);
  return d;
}

// Whether net_maml_loss takes the MLP fast path for these layers (a CPU call in float32/64 with
// the path on): net/mlp_net.h's rule, read from the kind and input fields.
bool mlp_fast_path_applies(const std::vector<int64_t>& layers) {
  using namespace pymeta;
  if (layers.empty() || layers.size() % kLayerInts != 0) return false;
  std::vector<std::pair<LayerKind, int64_t>> chain;
  for (size_t i = 0; i < layers.size(); i += kLayerInts) {
    const int64_t kind = layers[i + kLayerKindField];
    if (kind < 0 || kind >= kNumLayerKinds) return false;
    chain.emplace_back(static_cast<LayerKind>(kind), layers[i + kLayerInputField]);
  }
  return mlp_fast_path().load() && is_mlp_chain(chain);
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pymeta compiled core: build information (ops are torch.ops.pymeta.*)";
  m.def("with_cuda", &with_cuda, "Whether the CUDA kernels were compiled in.");
  m.def("with_openmp", &with_openmp, "Whether the CPU kernels were compiled with OpenMP.");
  m.attr("cxx_standard") = __cplusplus;
  m.def("encoding", &encoding,
        "The model-aware ops' codes and layer layouts: {'net': {'kinds', 'fields', 'num_ints', "
        "'ints_per_layer', 'batchnorm_ints', 'conv_ints', 'pool_ints'}, 'activations', 'losses', "
        "'lr_modes'} (name -> code or index).");
  m.def("activation_cache_limit", [] { return pymeta::activation_cache_limit().load(); },
        "Most bytes of inner-loop activations one thread keeps for the model-aware reverse sweep.");
  m.def("set_activation_cache_limit",
        [](int64_t bytes) { pymeta::activation_cache_limit().store(bytes < 0 ? 0 : bytes); },
        "Sets that cap; 0 makes the sweep recompute every activation (least memory).");
  m.def("mlp_fast_path_applies", &mlp_fast_path_applies, pybind11::arg("layers"),
        "Whether net_maml_loss runs these layers (its `layers` ints) on the MLP fast path.");
  m.def("mlp_fast_path", [] { return pymeta::mlp_fast_path().load(); },
        "Whether the MLP fast path is on (default).");
  m.def("set_mlp_fast_path", [](bool on) { pymeta::mlp_fast_path().store(on); },
        "Switches the MLP fast path; off, MLPs run through the layered rules.");
  m.def("task_batch", [] { return pymeta::task_batch().load(); },
        "Tasks the model-aware core runs at once (task-batched layout); 0: chosen by network and device.");
  m.def("set_task_batch",
        [](int64_t n) {
          TORCH_CHECK(n >= 0, "set_task_batch: n must be >= 0 (0: chosen by device), got ", n);
          pymeta::task_batch().store(n);
        },
        pybind11::arg("n"),
        "Sets it: n >= 1 runs n tasks at a time (1: one after another); 0 (the default) runs all "
        "tasks at once, except convolutional networks on the CPU, one task at a time.");
  m.def("sweep_recomputed_passes", [] { return pymeta::sweep_recomputed_passes().load(); },
        "Support passes the layered core's reverse sweeps recomputed so far (diagnostics).");
  m.def("recomputed_layers", [] { return pymeta::recomputed_layers().load(); },
        "Layers checkpointed forwards of the layered core ran again in backward (diagnostics).");
  m.def("sweep_recomputed_steps", [] { return pymeta::sweep_recomputed_steps().load(); },
        "Inner steps the layered core ran again to recompute parameter iterates (diagnostics).");
  m.def("workspace_cached_bytes", &pymeta::workspace_cached_bytes,
        "Bytes of freed CPU blocks the model-aware core keeps for reuse (csrc/cpu/workspace.h).");
  m.def("workspace_cache_limit", &pymeta::workspace_cache_limit, "The most bytes it keeps.");
  m.def("set_workspace_cache_limit", &pymeta::set_workspace_cache_limit,
        "Sets that limit (bytes >= 0; 0 keeps nothing, as without the cache).");
  m.def("release_workspaces", &pymeta::release_workspaces, "Frees every cached block.");
  m.def("cpu_fast_paths", [] {
        return pybind11::make_tuple(pymeta::cpu_channels_last().load(), pymeta::cpu_fused_kernels().load(),
                                    pymeta::cpu_gemm_weight_grads().load(), pymeta::cpu_winograd().load());
      },
        "(channels_last, fused_kernels, gemm_weight_grads, winograd): whether the layered core's CPU fast paths are on.");
  m.def("set_cpu_fast_paths",
        [](bool channels_last, bool fused_kernels, bool gemm_weight_grads, bool winograd) {
          pymeta::cpu_channels_last().store(channels_last);
          pymeta::cpu_fused_kernels().store(fused_kernels);
          pymeta::cpu_gemm_weight_grads().store(gemm_weight_grads);
          pymeta::cpu_winograd().store(winograd);
        },
        pybind11::arg("channels_last"), pybind11::arg("fused_kernels"), pybind11::arg("gemm_weight_grads"),
        pybind11::arg("winograd"),
        "Switches the layered core's CPU fast paths (all on by default); off, every layer runs in ATen "
        "ops in the default layout, convolutions through the library's kernels. For tests and benchmarks.");
  m.def("winograd_blocks", [] { return pymeta::winograd_blocks().load(); },
        "The Winograd path's output block size: 0 chooses by shape (winograd_block_by_shape), 2 or 4 forces it.");
  m.def("set_winograd_blocks",
        [](int block) {
          if (block != 0 && block != 2 && block != 4) {
            throw pybind11::value_error("block: expected 0 (by shape), 2 or 4, received " + std::to_string(block));
          }
          pymeta::winograd_blocks().store(block);
        },
        pybind11::arg("block"),
        "Forces F(2x2, 3x3) (2) or F(4x4, 3x3) (4) on every convolution the Winograd path takes, or "
        "chooses by shape (0, the default). For tests and benchmarks.");
  m.def("winograd_block_by_shape", &pymeta::winograd_block_by_shape, pybind11::arg("n"), pybind11::arg("c"),
        pybind11::arg("o"), pybind11::arg("h"), pybind11::arg("w"),
        "The Winograd path's rule: output block size 4 or 2 for a 3x3 convolution (stride 1, padding 1) of n "
        "images of h x w, c channels in and o out per task, or 0 for oneDNN.");
  m.def("onednn_gemm", [] { return pymeta::cpu_onednn_gemm().load(); },
        "Whether the layered core's float32 matrix products on the CPU go through oneDNN (else BLAS).");
  m.def("set_onednn_gemm", [](bool on) { pymeta::cpu_onednn_gemm().store(on); }, pybind11::arg("on"),
        "Switches them (on by default); off, at::bmm (BLAS) runs them, as it runs float64's. For tests and "
        "benchmarks.");
  m.def("cuda_fused_kernels", [] { return pymeta::cuda_fused_kernels().load(); },
        "Whether the layered core's fused CUDA kernels (batch norm, activations) are on, where built.");
  m.def("set_cuda_fused_kernels", [](bool on) { pymeta::cuda_fused_kernels().store(on); }, pybind11::arg("on"),
        "Switches them (on by default); off, those layers run in ATen ops on CUDA. For tests and benchmarks.");
}
