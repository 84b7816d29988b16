// Facts about this build, answered by the TORCH_LIBRARY ops and the Python module alike.
#pragma once

#include <string>
#include <string_view>

namespace tdpo_ext {

inline bool built_with_cuda() {
#ifdef TDPO_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// What CUDA tensors reaching a build without the CUDA kernels raise (no_cuda_kernels.cpp),
// from every op, and from TDPOTrainer on a GPU (tdpo_ext/ops.py: NO_CUDA_KERNELS).
inline constexpr std::string_view kNoCudaKernels =
    "tdpo_ext: CUDA tensors reached a build of tdpo_ext without CUDA kernels "
    "(tdpo_ext.built_with_cuda() is False: it was built where no CUDA toolkit was found, "
    "against a CPU-only torch, or with TDPO_EXT_CUDA=0). Rebuild it with nvcc on PATH or "
    "CUDA_HOME set, e.g. `TDPO_EXT_CUDA=1 pip install .` (README.md, Install), or keep the "
    "inputs on the CPU.";

// The CPU capability whose kernel copy the CPU ops run ("AVX512", "AVX2" or "DEFAULT").
std::string cpu_kernel_capability();

}  // namespace tdpo_ext
