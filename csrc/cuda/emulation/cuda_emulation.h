// The CUDA execution model on the CPU, as much of it as csrc/cuda/*.cu uses, so that the
// host C++ compiler can build and run those very files (force-included with -include, as
// nvcc includes its runtime header). Used only by tests: CMakeLists.txt's
// TDPO_EXT_CUDA_EMULATION targets and tests/test_cuda_emulation.py.
//
//  - Qualifiers (__global__, __device__, ...) are no-ops; threadIdx, blockIdx, blockDim and
//    gridDim are per OS thread.
//  - A launch (emulation::launch, reached through launch_kernel in ../device.h) runs one
//    OS thread per CUDA thread of a block, the blocks one after another with the same
//    threads, and one launch at a time in the process.
//  - __syncthreads() waits for every thread of the block that has not returned (a
//    returned thread drops out, as on a GPU).
//  - __shfl_xor_sync exchanges values among the 32 lanes of a warp. A mask that is not
//    full, or a lane that returns or waits at __syncthreads instead of joining the
//    shuffle, aborts naming the kernel, block and thread: on a GPU that is a hang or
//    undefined.
//  - __shared__ variables are statics of their function: one per kernel instantiation,
//    used by one block at a time since blocks and launches run one at a time.
//  - atomicMin through std::atomic_ref; the math functions are the C library's.
//  - 16-byte vector accesses (vector_at, ../device.h) abort when misaligned, where a GPU
//    would fault.
// Each barrier and shuffle synchronizes only the threads it involves (a mutex per warp,
// one per block), so that ThreadSanitizer reports an access that only a missing barrier
// would order.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned int x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace tdpo_ext::cuda::emulation {

// Runs body once per CUDA thread of a grid of `blocks` blocks of `threads` threads, with
// threadIdx and friends set; returns when every thread has returned. kernel and op name
// the launch in failure messages.
void run_grid(const char* op, const char* kernel, int64_t blocks, int threads,
              const std::function<void()>& body);

template <typename... Params, typename... Args>
void launch(const char* op, const char* kernel_name, void (*kernel)(Params...),
            int64_t blocks, int threads, const Args&... args) {
  run_grid(op, kernel_name, blocks, threads, [&] { kernel(args...); });
}

void sync_threads();
uint64_t shuffle_xor(unsigned int mask, uint64_t bits, int lane_mask, int width);
// Aborts naming the kernel, block and thread unless p is a multiple of `alignment`.
void check_vector_alignment(const void* p, std::size_t alignment);
// Prints "CUDA emulation: <op>, kernel <kernel>, block <b>, thread <t> (warp w, lane l):
// <what>" and aborts.
[[noreturn]] void fail(const char* what);

}  // namespace tdpo_ext::cuda::emulation

inline void __syncthreads() { tdpo_ext::cuda::emulation::sync_threads(); }

template <typename T>
T __shfl_xor_sync(unsigned int mask, T value, int lane_mask, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(uint64_t),
                "a shuffle moves one register of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = tdpo_ext::cuda::emulation::shuffle_xor(mask, bits, lane_mask, width);
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

template <typename T>
T atomicMin(T* address, T value) {
  static_assert(std::is_integral_v<T>, "CUDA's atomicMin takes integers");
  std::atomic_ref<T> target(*address);
  T old = target.load();
  while (value < old && !target.compare_exchange_weak(old, value)) {
  }
  return old;
}
