// Stand-in for the CUDA runtime's header in the emulated build (cuda_emulation.h): the
// types and the one call the launchers use.
#pragma once

using cudaStream_t = struct CUstream_st*;
enum cudaError_t { cudaSuccess = 0 };

// An emulated launch either runs or aborts: there is no pending error.
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error"; }
