// Every op of tdpo_ext, defined in one place (the device ops' schemas: op_schemas.h).
//
// Device implementations register themselves under their dispatch key:
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA), or csrc/no_cuda_kernels.cpp (CUDA, in a
// build without the kernels). Fake kernels and autograd are registered from Python,
// beside the public functions (tdpo_ext/ops.py).
#include <torch/library.h>

#include "build_info.h"
#include "op_schemas.h"

TORCH_LIBRARY(tdpo_ext, m) {
  tdpo_ext::define_device_ops(m);
  // Build facts as ops too, so that a library loaded with torch.ops.load_library (the
  // CMake build) answers them without Python bindings.
  m.def("built_with_cuda() -> bool", [] { return tdpo_ext::built_with_cuda(); });
  m.def("cpu_kernel_capability() -> str", [] { return tdpo_ext::cpu_kernel_capability(); });
}
