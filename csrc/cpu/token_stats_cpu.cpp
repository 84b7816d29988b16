// CPU implementations of tdpo_ext::token_stats and its backward: validation, output
// allocation, and the choice of the kernel copy built for this CPU's capability.
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "../build_info.h"
#include "../checks.h"
#include "token_stats_kernel.h"

namespace tdpo_ext::cpu {
namespace {

struct KernelSet {
  const char* capability;
  TokenStatsFn forward;
  TokenStatsBackwardFn backward;
};

// at::get_cpu_capability() is ATen's own choice (it honours ATEN_CPU_CAPABILITY), so
// our kernels use the same instruction set as torch's on this machine.
KernelSet kernels_for_this_cpu() {
  const std::string capability = at::get_cpu_capability();
#ifdef TDPO_HAVE_AVX512
  if (capability == "AVX512") return {"AVX512", AVX512::token_stats_kernel, AVX512::token_stats_backward_kernel};
#endif
#ifdef TDPO_HAVE_AVX2
  if (capability == "AVX2" || capability == "AVX512") {
    return {"AVX2", AVX2::token_stats_kernel, AVX2::token_stats_backward_kernel};
  }
#endif
  return {"DEFAULT", DEFAULT::token_stats_kernel, DEFAULT::token_stats_backward_kernel};
}

const KernelSet& kernels() {
  static const KernelSet chosen = kernels_for_this_cpu();
  return chosen;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_stats_cpu(
    const at::Tensor& policy_logits_in, const at::Tensor& ref_logits_in,
    const at::Tensor& targets, int64_t ignore_index) {
  check_token_stats_inputs(policy_logits_in, ref_logits_in, targets);
  const at::Tensor policy_logits = with_unit_vocab_stride(policy_logits_in);
  const at::Tensor ref_logits = with_unit_vocab_stride(ref_logits_in);
  at::Tensor logp_pol, logp_ref, token_kl, lse_pol, lse_ref;
  std::tie(logp_pol, logp_ref, token_kl, lse_pol, lse_ref) =
      empty_token_stats(policy_logits, targets);
  kernels().forward(policy_logits, ref_logits, targets, ignore_index, logp_pol, logp_ref,
                    token_kl, lse_pol, lse_ref);
  return {logp_pol, logp_ref, token_kl, lse_pol, lse_ref};
}

at::Tensor token_stats_backward_cpu(const at::Tensor& grad_logp_pol,
                                    const at::Tensor& grad_token_kl,
                                    const at::Tensor& policy_logits, const at::Tensor& ref_logits,
                                    const at::Tensor& targets, const at::Tensor& lse_pol,
                                    const at::Tensor& lse_ref, int64_t ignore_index) {
  const TokenStatsBackwardInputs in = prepare_token_stats_backward_inputs(
      grad_logp_pol, grad_token_kl, policy_logits, ref_logits, targets, lse_pol, lse_ref);
  at::Tensor grad = in.empty_grad();
  kernels().backward(in.grad_logp_pol, in.grad_token_kl, in.policy_logits, in.ref_logits,
                     targets, in.lse_pol, in.lse_ref, ignore_index, grad);
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
  m.impl("token_stats_backward", &token_stats_backward_cpu);
}

}  // namespace tdpo_ext::cpu
