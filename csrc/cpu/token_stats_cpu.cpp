// CPU implementations of tdpo_ext::token_stats, its tiled form and its backward: validation, output
// allocation, and the choice of the kernel copy built for this CPU's capability.
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../build_info.h"
#include "../checks.h"
#include "token_stats_kernel.h"

namespace tdpo_ext::cpu {
namespace {

struct KernelSet {
  const char* capability;
  TokenStatsFn forward;
  TokenStatsTileFn tile;
  TokenStatsBackwardFn backward;
};

#define TDPO_KERNEL_SET(CAPABILITY)                                            \
  KernelSet {                                                                  \
    #CAPABILITY, CAPABILITY::token_stats_kernel, CAPABILITY::token_stats_tile_kernel, \
        CAPABILITY::token_stats_backward_kernel                                \
  }

// at::get_cpu_capability() is ATen's own choice (it honours ATEN_CPU_CAPABILITY), so
// our kernels use the same instruction set as torch's on this machine.
KernelSet kernels_for_this_cpu() {
  const std::string capability = at::get_cpu_capability();
#ifdef TDPO_HAVE_AVX512
  if (capability == "AVX512") return TDPO_KERNEL_SET(AVX512);
#endif
#ifdef TDPO_HAVE_AVX2
  if (capability == "AVX2" || capability == "AVX512") return TDPO_KERNEL_SET(AVX2);
#endif
  return TDPO_KERNEL_SET(DEFAULT);
}
#undef TDPO_KERNEL_SET

const KernelSet& kernels() {
  static const KernelSet chosen = kernels_for_this_cpu();
  return chosen;
}

TokenStatsOutputs token_stats_cpu(const at::Tensor& policy_logits_in,
                                    const at::Tensor& ref_logits_in, const at::Tensor& targets,
                                    int64_t ignore_index, bool policy_metrics) {
  check_token_stats_inputs(policy_logits_in, ref_logits_in, targets);
  const at::Tensor policy_logits = with_unit_vocab_stride(policy_logits_in);
  const at::Tensor ref_logits = with_unit_vocab_stride(ref_logits_in);
  const auto outputs = empty_token_stats(policy_logits, targets, policy_metrics);
  kernels().forward(policy_logits, ref_logits, targets, ignore_index,
                    token_stats_out(outputs, policy_metrics));
  return outputs;
}

at::Tensor token_stats_tile_cpu(const at::Tensor& policy_logits, const at::Tensor& ref_logits,
                                const at::Tensor& targets, int64_t ignore_index,
                                int64_t vocab_start, const std::optional<at::Tensor>& state,
                                bool policy_metrics) {
  const TokenStatsTileInputs in =
      prepare_token_stats_tile_inputs(policy_logits, ref_logits, targets, vocab_start, state,
                                      policy_metrics);
  at::Tensor state_out = in.empty_state(targets);
  kernels().tile(in.policy_logits, in.ref_logits, targets, ignore_index, vocab_start,
                 policy_metrics, in.state_in_data(), state_out.data_ptr<float>());
  return state_out;
}

TokenStatsOutputs token_stats_finish_cpu(
    const at::Tensor& state_in, const at::Tensor& targets, int64_t ignore_index) {
  const at::Tensor state = check_tile_state(state_in, targets);
  const bool policy_metrics = tile_state_has_metrics(state);
  const auto outputs = empty_token_stats(state, targets, policy_metrics);
  const TokenStatsOut out = token_stats_out(outputs, policy_metrics);
  const float* states = state.data_ptr<float>();
  const int64_t* tgt = targets.data_ptr<int64_t>();
  const int64_t T = targets.size(1);
  const int64_t floats = state.size(2);
  at::parallel_for(0, targets.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (tgt[(i / T) * targets.stride(0) + (i % T) * targets.stride(1)] == ignore_index) {
        out.write_masked(i);
        continue;
      }
      const float* p = states + i * floats;
      const TokenTileState s = load_tile_state(p);
      out.write(i, finish_tile_state(s));
      if (policy_metrics) {
        out.write_metrics(i, finish_policy_metrics(s.softmax, load_metrics_state(p),
                                                   s.pol_label_logit));
      }
    }
  });
  return outputs;
}

at::Tensor token_stats_backward_cpu(const at::Tensor& grad_logp_pol,
                                    const at::Tensor& grad_token_kl,
                                    const at::Tensor& policy_logits, const at::Tensor& ref_logits,
                                    const at::Tensor& targets, const at::Tensor& lse_pol,
                                    const at::Tensor& lse_ref, int64_t ignore_index,
                                    int64_t vocab_start) {
  const TokenStatsBackwardInputs in =
      prepare_token_stats_backward_inputs(grad_logp_pol, grad_token_kl, policy_logits,
                                          ref_logits, targets, lse_pol, lse_ref, vocab_start);
  at::Tensor grad = in.empty_grad();
  kernels().backward(in.grad_logp_pol, in.grad_token_kl, in.policy_logits, in.ref_logits,
                     targets, in.lse_pol, in.lse_ref, ignore_index, vocab_start, grad);
  return grad;
}

}  // namespace

}  // namespace tdpo_ext::cpu

namespace tdpo_ext {
std::string cpu_kernel_capability() { return cpu::kernels().capability; }
}  // namespace tdpo_ext

namespace tdpo_ext::cpu {

TORCH_LIBRARY_IMPL(tdpo_ext, CPU, m) {
  m.impl("token_stats", &token_stats_cpu);
  m.impl("token_stats_tile", &token_stats_tile_cpu);
  m.impl("token_stats_finish", &token_stats_finish_cpu);
  m.impl("token_stats_backward", &token_stats_backward_cpu);
}

}  // namespace tdpo_ext::cpu
