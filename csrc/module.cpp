// The small pybind11 module pymeta._C: build facts and the model-aware core's encoding. Ops live
// in the dispatcher (csrc/ops.cpp); loading this library registers them.
#include <pybind11/pybind11.h>

#include "core_settings.h"
#include "cpu/workspace.h"
#include "mlp_net.h"
#include "seq_net.h"

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
// (csrc/mlp_maml_math.h, csrc/mlp_net.h, csrc/seq_net.h): pymeta/encoding.py reads this.
pybind11::dict encoding() {
  namespace py = pybind11;
  py::dict seq_fields, mlp_fields, batchnorm_ints, seq, mlp, d;
  seq_fields["kind"] = pymeta::kSeqKindField;
  seq_fields["flag"] = pymeta::kSeqFlagField;
  seq_fields["adapted"] = pymeta::kSeqAdaptedField;
  seq_fields["input"] = pymeta::kSeqInputField;
  seq_fields["input2"] = pymeta::kSeqInput2Field;
  seq_fields["ints"] = pymeta::kSeqIntsField;
  batchnorm_ints["per_step"] = pymeta::kBnPerStepInt;
  batchnorm_ints["channels"] = pymeta::kBnChannelsInt;
  seq["kinds"] = names_dict(pymeta::kSeqKindNames);
  seq["fields"] = seq_fields;
  seq["num_ints"] = pymeta::kSeqNumInts;
  seq["ints_per_layer"] = pymeta::kSeqLayerInts;
  seq["batchnorm_ints"] = batchnorm_ints;
  mlp_fields["activation"] = pymeta::kMlpActivationField;
  mlp_fields["has_bias"] = pymeta::kMlpHasBiasField;
  mlp_fields["adapted"] = pymeta::kMlpAdaptedField;
  mlp["fields"] = mlp_fields;
  mlp["ints_per_layer"] = pymeta::kMlpLayerInts;
  d["seq"] = seq;
  d["mlp"] = mlp;
  d["activations"] = names_dict(pymeta::kActivationNames);
  d["losses"] = names_dict(pymeta::kLossNames);
  d["lr_modes"] = names_dict(pymeta::kLrModeNames);
  return d;
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pymeta compiled core: build information (ops are torch.ops.pymeta.*)";
  m.def("with_cuda", &with_cuda, "Whether the CUDA kernels were compiled in.");
  m.def("with_openmp", &with_openmp, "Whether the CPU kernels were compiled with OpenMP.");
  m.attr("cxx_standard") = __cplusplus;
  m.def("encoding", &encoding,
        "The model-aware ops' codes and layer layouts: {'seq': {'kinds', 'fields', 'num_ints', "
        "'ints_per_layer', 'batchnorm_ints'}, 'mlp': {'fields', 'ints_per_layer'}, 'activations', "
        "'losses', 'lr_modes'} (name -> code or index).");
  m.def("activation_cache_limit", [] { return pymeta::activation_cache_limit().load(); },
        "Most bytes of inner-loop activations one thread keeps for the model-aware reverse sweep.");
  m.def("set_activation_cache_limit",
        [](int64_t bytes) { pymeta::activation_cache_limit().store(bytes < 0 ? 0 : bytes); },
        "Sets that cap; 0 makes the sweep recompute every activation (least memory).");
  m.def("sweep_recomputed_passes", [] { return pymeta::sweep_recomputed_passes().load(); },
        "Support passes the layered core's reverse sweeps recomputed so far (diagnostics).");
  m.def("workspace_cached_bytes", &pymeta::workspace_cached_bytes,
        "Bytes of freed CPU blocks the model-aware core keeps for reuse (csrc/cpu/workspace.h).");
  m.def("workspace_cache_limit", &pymeta::workspace_cache_limit, "The most bytes it keeps.");
  m.def("set_workspace_cache_limit", &pymeta::set_workspace_cache_limit,
        "Sets that limit (bytes >= 0; 0 keeps nothing, as without the cache).");
  m.def("release_workspaces", &pymeta::release_workspaces, "Frees every cached block.");
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
