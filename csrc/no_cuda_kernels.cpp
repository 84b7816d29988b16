// Compiled instead of csrc/cuda/ in a build without the CUDA kernels: each device op's
// CUDA implementation raises kNoCudaKernels, which names the cause and the fix, instead of
// the dispatcher's "Could not run 'tdpo_ext::...' with arguments from the 'CUDA' backend".
// Registered with the ops, so the Python module and the CMake-built library alike have it;
// CPU tensors never reach it.
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "build_info.h"
#include "op_schemas.h"

namespace tdpo_ext {
namespace {

void refuse_cuda(const c10::OperatorHandle&, torch::jit::Stack*) {
  TORCH_CHECK(false, kNoCudaKernels);
}

}  // namespace

TORCH_LIBRARY_IMPL(tdpo_ext, CUDA, m) {
  for (const std::string_view schema : kDeviceOpSchemas) {
    m.impl(op_name(schema).c_str(), torch::CppFunction::makeFromBoxedFunction<&refuse_cuda>());
  }
}

}  // namespace tdpo_ext
