// The small pybind11 module pymeta._C: build facts only. Ops live in the dispatcher
// (csrc/ops.cpp); loading this library registers them.
#include <pybind11/pybind11.h>

#include "core_settings.h"

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
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pymeta compiled core: build information (ops are torch.ops.pymeta.*)";
  m.def("with_cuda", &with_cuda, "Whether the CUDA kernels were compiled in.");
  m.def("with_openmp", &with_openmp, "Whether the CPU kernels were compiled with OpenMP.");
  m.attr("cxx_standard") = __cplusplus;
  m.def("activation_cache_limit", [] { return pymeta::activation_cache_limit().load(); },
        "Most bytes of inner-loop activations one thread keeps for the model-aware reverse sweep.");
  m.def("set_activation_cache_limit",
        [](int64_t bytes) { pymeta::activation_cache_limit().store(bytes < 0 ? 0 : bytes); },
        "Sets that cap; 0 makes the sweep recompute every activation (least memory).");
  m.def("cpu_fast_paths", [] {
        return pybind11::make_tuple(pymeta::cpu_channels_last().load(), pymeta::cpu_fused_kernels().load());
      },
        "(channels_last, fused_kernels): whether the layered core's CPU fast paths are on.");
  m.def("set_cpu_fast_paths",
        [](bool channels_last, bool fused_kernels) {
          pymeta::cpu_channels_last().store(channels_last);
          pymeta::cpu_fused_kernels().store(fused_kernels);
        },
        pybind11::arg("channels_last"), pybind11::arg("fused_kernels"),
        "Switches the layered core's CPU fast paths (both on by default); off, every layer runs in ATen "
        "ops in the default layout, as on CUDA. For tests and benchmarks.");
}
