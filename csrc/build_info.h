// Facts about this build, answered by the TORCH_LIBRARY ops and the Python module alike.
#pragma once

#include <string>

namespace tdpo_ext {

inline bool built_with_cuda() {
#ifdef TDPO_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// The CPU capability whose kernel copy the CPU ops run ("AVX512", "AVX2" or "DEFAULT").
std::string cpu_kernel_capability();

}  // namespace tdpo_ext
