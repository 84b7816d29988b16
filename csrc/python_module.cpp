// tdpo_ext._C: importing it loads the op registrations of this library; the module
// itself answers build questions for Python.
#include <pybind11/pybind11.h>

#include "build_info.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "tdpo_ext C++/CUDA ops (registered under torch.ops.tdpo_ext)";
  m.def("built_with_cuda", &tdpo_ext::built_with_cuda,
        "Whether CUDA kernels were compiled into this build.");
  m.def("cpu_kernel_capability", &tdpo_ext::cpu_kernel_capability,
        "The CPU capability (AVX512, AVX2 or DEFAULT) whose kernels the CPU ops run.");
}
