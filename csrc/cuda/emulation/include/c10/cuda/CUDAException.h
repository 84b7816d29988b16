// Stand-in for c10's CUDA error check in the emulated build (cuda_emulation.h).
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#define C10_CUDA_CHECK(EXPR) \
  TORCH_CHECK((EXPR) == cudaSuccess, "emulated CUDA call failed: ", #EXPR)
