// tdpo_ext._C: importing it loads the op registrations of this library; the module
// itself answers build questions for Python and hands it the facts that the C++ side
// owns (tdpo_ext/ops.py reads them instead of copying them).
#include <pybind11/pybind11.h>

#include <string>

#include "build_info.h"
#include "checks.h"
#include "tdpo_math.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "tdpo_ext C++/CUDA ops (registered under torch.ops.tdpo_ext)";
  m.def("built_with_cuda", &tdpo_ext::built_with_cuda,
        "Whether CUDA kernels were compiled into this build.");
  m.def("cpu_kernel_capability", &tdpo_ext::cpu_kernel_capability,
        "The CPU capability (AVX512, AVX2 or DEFAULT) whose kernels the CPU ops run.");
  m.def("bad_label_message", &tdpo_ext::bad_label_message, py::arg("row"),
        py::arg("position"), py::arg("label"), py::arg("vocab"), py::arg("ignore_index"),
        "The ops' message for targets[row, position] = label outside [0, vocab) that is "
        "not ignore_index.");
  py::tuple variants(tdpo_ext::kVariantNames.size());
  for (size_t i = 0; i < tdpo_ext::kVariantNames.size(); ++i) {
    variants[i] = std::string(tdpo_ext::kVariantNames[i]);
  }
  m.attr("VARIANTS") = variants;  // the preference_loss op's variant names
  // What CUDA tensors raise in a build without the CUDA kernels (csrc/no_cuda_kernels.cpp).
  m.attr("NO_CUDA_KERNELS") = std::string(tdpo_ext::kNoCudaKernels);
  m.attr("TILE_STATE_FLOATS") = tdpo_ext::kTileStateFloats;  // floats per token in a tile state
  // ... and with the policy metrics (token_stats_tile with policy_metrics=True)
  m.attr("TILE_STATE_WITH_METRICS_FLOATS") = tdpo_ext::kTileStateWithMetricsFloats;
}
