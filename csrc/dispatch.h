// The logits dtypes the token-stats kernels accept, for the CPU and CUDA dispatch alike.
#pragma once

#include <ATen/Dispatch.h>

// Instantiates the lambda for every (policy dtype, reference dtype) pair, with policy_t
// and ref_t naming the two element types. float64 is rejected earlier by checks.cpp.
#define TDPO_LOGITS_CASES(...)                            \
  AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)    \
  AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__) \
  AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)
#define TDPO_DISPATCH_LOGITS_PAIR(policy_type, ref_type, NAME, ...) \
  AT_DISPATCH_SWITCH(policy_type, NAME, TDPO_LOGITS_CASES([&] {     \
    using policy_t = scalar_t;                                      \
    AT_DISPATCH_SWITCH(ref_type, NAME, TDPO_LOGITS_CASES([&] {      \
      using ref_t = scalar_t;                                       \
      __VA_ARGS__();                                                \
    }));                                                            \
  }))
