"""The public TDPO functions, and beside them the fake kernels and autograd of the
C++/CUDA ops they call (schemas: csrc/op_schemas.h).

Batch layout, as in the TDPO reference code: logits at position t predict labels at
t + 1; a label equal to ignore_index masks its position; tdpo_loss takes N = 2B rows,
the B chosen responses first, then the B rejected ones.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import _C  # loads the op registrations; also the facts the C++ side owns

VARIANTS = _C.VARIANTS  # ("tdpo1", "tdpo2", "dpo"): kVariantNames in csrc/tdpo_math.h


# ---------------------------------------------------------------------------------------
# tdpo_ext::token_stats: fake kernel and autograd

def _check_one_device(**tensors):
    """The device check of csrc/checks.cpp, for the fake kernels: with one input on
    'meta' the dispatcher runs them instead of a device kernel, and they must fail the
    same way rather than return a result."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise RuntimeError(f"tdpo_ext: inputs must be on one device, got {listed}")


def _empty_token_stats(like, targets, policy_metrics: bool):
    """The eight outputs of token_stats and token_stats_finish, as empty_token_stats
    (csrc/checks.cpp) allocates them on the device of `like`: five (N, T) float32, then
    entropy, logit_mean (float32) and label_is_argmax (bool), (N, T) with policy_metrics
    and (0,) without."""
    stats = [like.new_empty(targets.shape, dtype=torch.float32) for _ in range(5)]
    metrics_shape = targets.shape if policy_metrics else (0,)
    return (*stats, *(like.new_empty(metrics_shape, dtype=dtype)
                      for dtype in (torch.float32, torch.float32, torch.bool)))


@torch.library.register_fake("tdpo_ext::token_stats")
def _token_stats_fake(policy_logits, ref_logits, targets, ignore_index, policy_metrics=False):
    _check_one_device(policy_logits=policy_logits, ref_logits=ref_logits, labels=targets)
    return _empty_token_stats(policy_logits, targets, policy_metrics)


@torch.library.register_fake("tdpo_ext::token_stats_backward")
def _token_stats_backward_fake(grad_logp_pol, grad_token_kl, policy_logits, ref_logits,
                               targets, lse_pol, lse_ref, ignore_index, vocab_start=0):
    _check_one_device(policy_logits=policy_logits, ref_logits=ref_logits, labels=targets,
                      grad_logp_pol=grad_logp_pol, grad_token_kl=grad_token_kl)
    return policy_logits.new_empty(policy_logits.shape)


# tdpo_ext::token_stats_tile and token_stats_finish: token_stats over rows that arrive in
# tiles of vocabulary columns (used inside the fused LM-head ops, fused_linear.py; no
# autograd: the fused ops have their own backward).
TILE_STATE_FLOATS = _C.TILE_STATE_FLOATS  # kTileStateFloats in csrc/tdpo_math.h
# kTileStateWithMetricsFloats: the state with each token's PolicyMetricsState after it.
TILE_STATE_WITH_METRICS_FLOATS = _C.TILE_STATE_WITH_METRICS_FLOATS


@torch.library.register_fake("tdpo_ext::token_stats_tile")
def _token_stats_tile_fake(policy_logits, ref_logits, targets, ignore_index, vocab_start,
                           state, policy_metrics=False):
    _check_one_device(policy_logits=policy_logits, ref_logits=ref_logits, labels=targets)
    floats = TILE_STATE_WITH_METRICS_FLOATS if policy_metrics else TILE_STATE_FLOATS
    return policy_logits.new_empty((*targets.shape, floats), dtype=torch.float32)


@torch.library.register_fake("tdpo_ext::token_stats_finish")
def _token_stats_finish_fake(state, targets, ignore_index):
    _check_one_device(state=state, labels=targets)
    return _empty_token_stats(state, targets,
                              state.shape[-1] == TILE_STATE_WITH_METRICS_FLOATS)


def _token_stats_setup_context(ctx, inputs, output):
    policy_logits, ref_logits, targets, ignore_index, *_ = inputs
    lse_pol, lse_ref = output[3], output[4]
    ctx.save_for_backward(policy_logits, ref_logits, targets, lse_pol, lse_ref)
    ctx.ignore_index = ignore_index
    # logp_ref, the logsumexps and the policy metrics carry no gradient.
    ctx.mark_non_differentiable(output[1], lse_pol, lse_ref, *output[5:])


def _token_stats_backward(ctx, grad_logp_pol, grad_logp_ref, grad_token_kl, grad_lse_pol,
                          grad_lse_ref, grad_entropy, grad_logit_mean, grad_label_is_argmax):
    # Only logp_pol and token_kl depend on the policy; the reference gets no gradient.
    if grad_logp_pol is None and grad_token_kl is None:
        return None, None, None, None, None
    policy_logits, ref_logits, targets, lse_pol, lse_ref = ctx.saved_tensors
    if grad_logp_pol is None:
        grad_logp_pol = torch.zeros_like(lse_pol)
    if grad_token_kl is None:
        grad_token_kl = torch.zeros_like(lse_pol)
    grad = torch.ops.tdpo_ext.token_stats_backward(
        grad_logp_pol, grad_token_kl, policy_logits, ref_logits, targets, lse_pol, lse_ref,
        ctx.ignore_index)
    return grad, None, None, None, None


torch.library.register_autograd("tdpo_ext::token_stats", _token_stats_backward,
                                setup_context=_token_stats_setup_context)


# ---------------------------------------------------------------------------------------
# tdpo_ext::preference_loss: fake kernel and autograd

@torch.library.register_fake("tdpo_ext::preference_loss")
def _preference_loss_fake(chosen_logps_margin, rejected_logps_margin, chosen_kl, rejected_kl,
                          beta, alpha, variant):
    _check_one_device(chosen_logps_margin=chosen_logps_margin,
                      rejected_logps_margin=rejected_logps_margin, chosen_kl=chosen_kl,
                      rejected_kl=rejected_kl)
    return tuple(torch.empty_like(chosen_logps_margin) for _ in range(3))


@torch.library.register_fake("tdpo_ext::preference_loss_backward")
def _preference_loss_backward_fake(grad_losses, chosen_logps_margin, rejected_logps_margin,
                                   chosen_kl, rejected_kl, beta, alpha, variant):
    return tuple(torch.empty_like(chosen_logps_margin) for _ in range(4))


def _preference_loss_setup_context(ctx, inputs, output):
    *pair_inputs, beta, alpha, variant = inputs
    ctx.save_for_backward(*pair_inputs)
    ctx.hyper = (beta, alpha, variant)
    ctx.mark_non_differentiable(output[1], output[2])  # rewards are detached


def _preference_loss_backward(ctx, grad_losses, grad_chosen_rewards, grad_rejected_rewards):
    if grad_losses is None:
        return None, None, None, None, None, None, None
    grads = torch.ops.tdpo_ext.preference_loss_backward(grad_losses, *ctx.saved_tensors,
                                                        *ctx.hyper)
    return (*grads, None, None, None)


torch.library.register_autograd("tdpo_ext::preference_loss", _preference_loss_backward,
                                setup_context=_preference_loss_setup_context)


# ---------------------------------------------------------------------------------------
# Public functions

def built_with_cuda() -> bool:
    """Whether CUDA kernels were compiled into this build of the extension."""
    return _C.built_with_cuda()


# What every op raises for CUDA tensors in a build without CUDA kernels: the build
# registers a CUDA implementation of each op that says why there is none and what to do
# (csrc/no_cuda_kernels.cpp), instead of the dispatcher's "Could not run 'tdpo_ext::...'
# with arguments from the 'CUDA' backend".
NO_CUDA_KERNELS = _C.NO_CUDA_KERNELS


def check_device_has_kernels(device: torch.device) -> None:
    """Raises NO_CUDA_KERNELS for a CUDA device when this build has no CUDA kernels."""
    if torch.device(device).type == "cuda" and not built_with_cuda():
        raise RuntimeError(NO_CUDA_KERNELS)


def _check_labels(labels: torch.Tensor) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"tdpo_ext: labels must be a tensor, got {type(labels).__name__}")
    if labels.dim() != 2:
        raise ValueError(f"tdpo_ext: labels must have shape (N, T), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype in (torch.bool, torch.complex64,
                                                          torch.complex128):
        raise TypeError(f"tdpo_ext: labels must be an integer tensor (int64), got {labels.dtype}")


def _check_hyper(beta: float, variant: str) -> None:
    if variant not in VARIANTS:
        # The preference_loss op's words (csrc/checks.cpp), so that both raise one message.
        expected = ", ".join(repr(v) for v in VARIANTS)
        raise ValueError(f"tdpo_ext: unknown variant {variant!r}; expected one of {expected}")
    if not beta > 0:
        raise ValueError(f"tdpo_ext: beta must be > 0, got {beta}")


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """targets[n, t] = labels[n, t + 1], the token that logits[n, t] predicts; the last
    position predicts nothing and is masked."""
    _check_labels(labels)
    if labels.shape[1] == 0:
        return labels.long()  # T = 0: left for the op to reject by name
    pad = labels.new_full((labels.shape[0], 1), ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1).long()


def reduce_token_stats(logp_pol, logp_ref, token_kl, targets, ignore_index: int,
                       average_log_prob: bool):
    """Sums (or averages) per-token statistics (0 on masked tokens) over each row into
    (logps_margin, seq_kl, policy_logps)."""
    logps_margin = (logp_pol - logp_ref).sum(-1)
    seq_kl = token_kl.sum(-1)
    policy_logps = logp_pol.sum(-1)
    if average_log_prob:
        # A row with no unmasked token has all-zero sums: dividing by 1 keeps it 0, not NaN.
        count = (targets != ignore_index).sum(-1).clamp(min=1).to(logps_margin.dtype)
        logps_margin, seq_kl, policy_logps = (logps_margin / count, seq_kl / count,
                                              policy_logps / count)
    return logps_margin, seq_kl, policy_logps


class PolicyTokenMetrics(NamedTuple):
    """The policy's per-token metrics, (N, T) each, aligned with the shifted targets
    (position t: the token that logits[:, t] predict); 0 / False where masked. Those of
    TRL's DPOTrainer (entropy, logits/chosen and /rejected, mean_token_accuracy),
    computed in the pass that computes the token statistics; detached."""
    entropy: torch.Tensor          # float32, nats: H(pi_theta(.|prefix))
    logit_mean: torch.Tensor       # float32: mean policy logit over the vocabulary
    label_is_argmax: torch.Tensor  # bool: the label is torch.argmax of the policy logits
    mask: torch.Tensor             # bool: targets != ignore_index


def policy_token_metrics(stats, targets, ignore_index: int) -> PolicyTokenMetrics:
    """PolicyTokenMetrics from the eight outputs of a token-stats op run with
    policy_metrics=True."""
    entropy, logit_mean, label_is_argmax = stats[5:]
    return PolicyTokenMetrics(entropy, logit_mean, label_is_argmax, targets != ignore_index)


def sequence_stats(policy_logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor,
                   *, ignore_index: int = -100, average_log_prob: bool = False,
                   policy_metrics: bool = False):
    """Per-row TDPO statistics of a batch.

    Args:
        policy_logits, ref_logits: (N, T, V) float32, bfloat16 or float16 (the two may
            differ in dtype; any strides with a contiguous last dimension, e.g.
            ``logits[:, :-1]`` or a model's output, are read in place).
        labels: (N, T) int64; logits at t predict labels at t + 1; ``ignore_index`` masks.
        average_log_prob: divide each sum by its row's number of unmasked tokens (a row
            with none gives 0).
        policy_metrics: also compute the policy's per-token entropy, mean logit and
            whether the label is the argmax, in the same pass (off: not computed at all).

    Returns:
        (logps_margin, seq_kl, policy_logps), each float32 (N,):
        sum of log pi_theta(y) - log pi_ref(y), sum of KL(pi_ref || pi_theta) per
        position, and sum of log pi_theta(y). Differentiable w.r.t. policy_logits only.
        With policy_metrics, a fourth element: the PolicyTokenMetrics.
    """
    targets = shift_labels(labels, ignore_index)
    stats = torch.ops.tdpo_ext.token_stats(policy_logits, ref_logits, targets, ignore_index,
                                           policy_metrics)
    return sequence_result(stats, targets, ignore_index, average_log_prob, policy_metrics)


def sequence_result(stats, targets, ignore_index: int, average_log_prob: bool,
                    policy_metrics: bool):
    """What sequence_stats and fused_linear_sequence_stats return, from the eight outputs
    of their token-stats op."""
    logp_pol, logp_ref, token_kl = stats[:3]
    sums = reduce_token_stats(logp_pol, logp_ref, token_kl, targets, ignore_index,
                              average_log_prob)
    if not policy_metrics:
        return sums
    return (*sums, policy_token_metrics(stats, targets, ignore_index))


def preference_loss(chosen_logps_margin: torch.Tensor, rejected_logps_margin: torch.Tensor,
                    chosen_kl: torch.Tensor, rejected_kl: torch.Tensor, *, beta: float = 0.1,
                    alpha: float = 0.5, variant: str = "tdpo2"):
    """Pairwise TDPO/DPO loss per pair, with u = chosen_logps_margin - rejected_logps_margin:

    - tdpo1: -logsigmoid(beta * (u - (rejected_kl - chosen_kl)))
    - tdpo2: -logsigmoid(beta * (u - alpha * (rejected_kl - stopgrad(chosen_kl))))
    - dpo:   -logsigmoid(beta * u)

    Returns (losses, chosen_rewards, rejected_rewards), float32 (B,); the rewards are
    beta * (margin + kl) per response, detached.
    """
    _check_hyper(beta, variant)
    pair = [t.float() for t in (chosen_logps_margin, rejected_logps_margin, chosen_kl,
                                rejected_kl)]
    return torch.ops.tdpo_ext.preference_loss(*pair, float(beta), float(alpha), variant)


class TDPOOutput(NamedTuple):
    """What tdpo_loss returns. ``loss`` and ``losses`` carry the gradient; every other
    field is detached, for logging."""
    loss: torch.Tensor              # mean of losses, scalar
    losses: torch.Tensor            # (B,) per pair
    chosen_rewards: torch.Tensor    # (B,) beta * (margin + seq_kl) of the chosen response
    rejected_rewards: torch.Tensor  # (B,) same for the rejected response
    chosen_kl: torch.Tensor         # (B,) sequential KL(pi_ref || pi_theta), chosen
    rejected_kl: torch.Tensor       # (B,) same, rejected
    chosen_logps: torch.Tensor      # (B,) policy log-probability of the chosen response
    rejected_logps: torch.Tensor    # (B,) same, rejected
    # (2B, T) per token, chosen rows first, when asked for (policy_metrics=True).
    policy_metrics: Optional[PolicyTokenMetrics] = None


def tdpo_loss(policy_logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, *,
              beta: float = 0.1, alpha: float = 0.5, variant: str = "tdpo2",
              ignore_index: int = -100, average_log_prob: bool = False,
              policy_metrics: bool = False) -> TDPOOutput:
    """The TDPO loss of a concatenated batch: N = 2B rows, chosen rows first, then
    rejected. Arguments as in sequence_stats and preference_loss; with policy_metrics,
    TDPOOutput.policy_metrics holds the PolicyTokenMetrics of all 2B rows."""
    _check_hyper(beta, variant)
    n_rows = policy_logits.shape[0]
    if n_rows % 2:
        raise ValueError("tdpo_ext: tdpo_loss needs an even number of rows (B chosen, then B "
                         f"rejected), got N={n_rows}")
    stats = sequence_stats(policy_logits, ref_logits, labels, ignore_index=ignore_index,
                           average_log_prob=average_log_prob, policy_metrics=policy_metrics)
    return pairwise_output(*stats, beta=beta, alpha=alpha, variant=variant)


def pairwise_output(logps_margin, seq_kl, policy_logps, metrics=None, *, beta, alpha,
                    variant) -> TDPOOutput:
    """TDPOOutput from the per-row statistics of a concatenated batch (and its
    PolicyTokenMetrics, if computed)."""
    chosen_margin, rejected_margin = logps_margin.chunk(2)
    chosen_kl, rejected_kl = seq_kl.chunk(2)
    chosen_logps, rejected_logps = policy_logps.detach().chunk(2)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        chosen_margin, rejected_margin, chosen_kl, rejected_kl, beta=beta, alpha=alpha,
        variant=variant)
    return TDPOOutput(losses.mean(), losses, chosen_rewards, rejected_rewards,
                      chosen_kl.detach(), rejected_kl.detach(), chosen_logps, rejected_logps,
                      metrics)
