// What the kernels of csrc/cuda/*.cu use from CUDA beyond plain C++ that the emulated build
// (emulation/cuda_emulation.h) must intercept: the launch of a kernel and 16-byte vector
// accesses. The CUDA build compiles both to exactly what a kernel would write by hand.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace tdpo_ext::cuda {

// The most blocks a launch of these kernels may have: CUDA's limit on gridDim.x (the
// kernels index blocks along x only).
constexpr int64_t kMaxGridBlocks = (int64_t{1} << 31) - 1;

// A kernel and its name as written at the launch (for the emulation's messages).
template <typename... Params>
struct Kernel {
  void (*function)(Params...);
  const char* name;
};

template <typename... Params>
Kernel<Params...> kernel_named(void (*function)(Params...), const char* name) {
  return {function, name};
}

#define TDPO_KERNEL(...) ::tdpo_ext::cuda::kernel_named(__VA_ARGS__, #__VA_ARGS__)

// The one place csrc/cuda/ queues a kernel: `blocks` blocks of `threads` threads on
// `stream`, kernel(args...); returns the launch's status. Raises, naming op, when blocks
// exceeds kMaxGridBlocks (a launch would fail, or a cast to unsigned int would wrap and
// leave outputs unwritten).
template <typename... Params, typename... Args>
cudaError_t launch_kernel(const char* op, const Kernel<Params...>& kernel, int64_t blocks,
                          int threads, cudaStream_t stream, const Args&... args) {
  TORCH_CHECK(blocks <= kMaxGridBlocks, op, ": this input needs ", blocks, " blocks of ",
              threads, " threads, more than the ", kMaxGridBlocks,
              " (2^31 - 1) blocks a CUDA launch can have; split the batch");
#ifdef TDPO_CUDA_EMULATION
  (void)stream;
  emulation::launch(op, kernel.name, kernel.function, blocks, threads, args...);
#else
  kernel.function<<<static_cast<unsigned int>(blocks), threads, 0, stream>>>(args...);
#endif
  return cudaGetLastError();
}

// The 16-byte aligned Vector at p (a GPU faults on a misaligned one; the emulation aborts).
template <typename Vector, typename T>
__device__ __forceinline__ Vector* vector_at(T* p) {
#ifdef TDPO_CUDA_EMULATION
  emulation::check_vector_alignment(p, alignof(Vector));
#endif
  return reinterpret_cast<Vector*>(p);
}

}  // namespace tdpo_ext::cuda
