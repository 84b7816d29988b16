// The vectorized CPU kernels of the token-stats op. token_stats_kernel.cpp is compiled
// once per CPU capability (as ATen's DispatchStub kernels are), each copy inside its own
// namespace named by CPU_CAPABILITY; token_stats_cpu.cpp picks one at run time.
#pragma once

#include <ATen/core/Tensor.h>

#include "../tdpo_math.h"

namespace tdpo_ext::cpu {

// Forward: one pass over each unmasked vocabulary row of both models. Outputs are
// (N, T) and are written for every token (0 where masked); the policy metrics where
// out.has_metrics().
using TokenStatsFn = void (*)(const at::Tensor& policy_logits, const at::Tensor& ref_logits,
                              const at::Tensor& targets, int64_t ignore_index,
                              const TokenStatsOut& out);

// Forward over a tile of vocabulary columns [vocab_start, vocab_start + V): folds it into
// each token's TokenTileState, followed by its PolicyMetricsState with policy_metrics
// (state_in, (N, T, kTileStateFloats or kTileStateWithMetricsFloats) float32 contiguous,
// or null for none yet) and writes the result to state_out (same layout).
using TokenStatsTileFn = void (*)(const at::Tensor& policy_logits, const at::Tensor& ref_logits,
                                  const at::Tensor& targets, int64_t ignore_index,
                                  int64_t vocab_start, bool policy_metrics,
                                  const float* state_in, float* state_out);

// Backward: one pass writing grad_policy_logits (contiguous, policy dtype) in full,
// zeros on masked tokens. The logits may be the tile of columns [vocab_start,
// vocab_start + V) of rows whose logsumexps are lse_pol and lse_ref.
using TokenStatsBackwardFn = void (*)(const at::Tensor& grad_logp_pol,
                                      const at::Tensor& grad_token_kl,
                                      const at::Tensor& policy_logits,
                                      const at::Tensor& ref_logits, const at::Tensor& targets,
                                      const at::Tensor& lse_pol, const at::Tensor& lse_ref,
                                      int64_t ignore_index, int64_t vocab_start,
                                      at::Tensor& grad_policy_logits);

#define TDPO_DECLARE_CPU_KERNELS(CAPABILITY)                                            \
  namespace CAPABILITY {                                                               \
  void token_stats_kernel(const at::Tensor&, const at::Tensor&, const at::Tensor&,     \
                          int64_t, const TokenStatsOut&);                               \
  void token_stats_tile_kernel(const at::Tensor&, const at::Tensor&, const at::Tensor&, \
                               int64_t, int64_t, bool, const float*, float*);           \
  void token_stats_backward_kernel(const at::Tensor&, const at::Tensor&,                \
                                   const at::Tensor&, const at::Tensor&,                \
                                   const at::Tensor&, const at::Tensor&,                \
                                   const at::Tensor&, int64_t, int64_t, at::Tensor&);   \
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
