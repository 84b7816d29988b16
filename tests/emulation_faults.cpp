// Kernels with the bugs the CUDA emulation (csrc/cuda/emulation/cuda_emulation.h) must
// abort on, naming the kernel, block and thread: tests/test_cuda_emulation.py runs each
// case of this driver and checks the message. `full_shuffle` is the control: a correct
// warp reduction, which must run to the end.
#include <cstdio>
#include <cstring>

namespace {

__device__ int warp_sum(int value, unsigned int mask) {
  for (int lane_mask = 16; lane_mask > 0; lane_mask /= 2) {
    value += __shfl_xor_sync(mask, value, lane_mask);
  }
  return value;
}

__global__ void full_shuffle(int* out) {
  const int sum = warp_sum(1, 0xffffffffu);
  if (threadIdx.x % 32 == 0) out[blockIdx.x * 2 + threadIdx.x / 32] = sum;
}

__global__ void partial_mask() { warp_sum(1, 0x0000ffffu); }

// Lane 5 of warp 1 of block 1 leaves before the warp's shuffle.
__global__ void lane_returns() {
  if (blockIdx.x == 1 && threadIdx.x == 37) return;
  warp_sum(1, 0xffffffffu);
}

// Lane 0 of warp 0 of block 1 waits at __syncthreads while its warp shuffles.
__global__ void lane_at_syncthreads() {
  if (blockIdx.x == 1 && threadIdx.x == 0) {
    __syncthreads();
  } else {
    warp_sum(1, 0xffffffffu);
  }
}

}  // namespace

int main(int argc, char** argv) {
  using tdpo_ext::cuda::emulation::launch;
  const char* name = argc > 1 ? argv[1] : "";
  // Two blocks of two warps each.
  if (std::strcmp(name, "full_shuffle") == 0) {
    int out[4] = {};
    int* sums = out;  // a pointer argument, as the real launches pass
    launch("test", "full_shuffle", full_shuffle, 2, 64, sums);
    std::printf("sums %d %d %d %d\n", out[0], out[1], out[2], out[3]);
  } else if (std::strcmp(name, "partial_mask") == 0) {
    launch("test", "partial_mask", partial_mask, 2, 64);
  } else if (std::strcmp(name, "lane_returns") == 0) {
    launch("test", "lane_returns", lane_returns, 2, 64);
  } else if (std::strcmp(name, "lane_at_syncthreads") == 0) {
    launch("test", "lane_at_syncthreads", lane_at_syncthreads, 2, 64);
  } else {
    std::fprintf(stderr, "unknown case '%s'\n", name);
    return 2;
  }
  return 0;
}
