// Stand-in for ATen's CUDA context in the emulated build (cuda_emulation.h): the current
// stream, which an emulated launch ignores (it runs before returning).
#pragma once

#include <cuda_runtime_api.h>

namespace at::cuda {
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace at::cuda
