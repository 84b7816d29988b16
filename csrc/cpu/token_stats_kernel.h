// The vectorized CPU kernels of the token-stats op. token_stats_kernel.cpp is compiled
// once per CPU capability (as ATen's DispatchStub kernels are), each copy inside its own
// namespace named by CPU_CAPABILITY; cpu_ops.cpp picks one at run time.
#pragma once

#include <ATen/core/Tensor.h>

namespace tdpo_ext::cpu {

// Forward: one pass over each unmasked vocabulary row of both models. Outputs are
// (N, T) float32 and are written for every token (0 where masked).
using TokenStatsFn = void (*)(const at::Tensor& policy_logits, const at::Tensor& ref_logits,
                              const at::Tensor& targets, int64_t ignore_index,
                              at::Tensor& logp_pol, at::Tensor& logp_ref, at::Tensor& token_kl,
                              at::Tensor& lse_pol, at::Tensor& lse_ref);

// Backward: one pass writing grad_policy_logits (contiguous, policy dtype) in full,
// zeros on masked tokens.
using TokenStatsBackwardFn = void (*)(const at::Tensor& grad_logp_pol,
                                      const at::Tensor& grad_token_kl,
                                      const at::Tensor& policy_logits,
                                      const at::Tensor& ref_logits, const at::Tensor& targets,
                                      const at::Tensor& lse_pol, const at::Tensor& lse_ref,
                                      int64_t ignore_index, at::Tensor& grad_policy_logits);

#define TDPO_DECLARE_CPU_KERNELS(CAPABILITY)                                          \
  namespace CAPABILITY {                                                             \
  void token_stats_kernel(const at::Tensor&, const at::Tensor&, const at::Tensor&,   \
                          int64_t, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, \
                          at::Tensor&);                                               \
  void token_stats_backward_kernel(const at::Tensor&, const at::Tensor&,              \
                                   const at::Tensor&, const at::Tensor&,              \
                                   const at::Tensor&, const at::Tensor&,              \
                                   const at::Tensor&, int64_t, at::Tensor&);          \
  }

TDPO_DECLARE_CPU_KERNELS(DEFAULT)
#ifdef TDPO_HAVE_AVX2
TDPO_DECLARE_CPU_KERNELS(AVX2)
#endif
#ifdef TDPO_HAVE_AVX512
TDPO_DECLARE_CPU_KERNELS(AVX512)
#endif
#undef TDPO_DECLARE_CPU_KERNELS

}  // namespace tdpo_ext::cpu
