// Stand-in for c10's device guard in the emulated build (cuda_emulation.h): the emulated
// ops take CPU tensors, there is no device to set.
#pragma once

#include <c10/core/Device.h>

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
