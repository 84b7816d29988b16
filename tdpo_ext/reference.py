"""The TDPO reference implementation's pattern (Zeng et al., 2024, official code), in
plain PyTorch: log_softmax, softmax, log, a product and a sum over float32 (N, T, V)
copies. It is what users run today; the training loop offers it as
``--loss-impl reference`` and bench/ times it beside the fused ops. It is not the test
oracle (tests/oracle.py is written from the formulas in float64).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import TDPOOutput, _check_hyper


def reference_sequence_stats(policy_logits, ref_logits, labels, *, ignore_index=-100,
                             average_log_prob=False):
    """_tdpo_get_batch_logps of the reference code, line for line in spirit."""
    labels = labels[:, 1:].clone()
    logits = policy_logits[:, :-1, :].float()
    reference_logits = ref_logits[:, :-1, :].float()
    loss_mask = labels != ignore_index
    labels[~loss_mask] = 0  # dummy token; masked out below

    vocab_logps = logits.log_softmax(-1)
    reference_vocab_ps = reference_logits.softmax(-1)
    reference_vocab_logps = reference_vocab_ps.log()

    per_position_kl = (reference_vocab_ps * (reference_vocab_logps - vocab_logps)).sum(-1)
    per_token_logps = torch.gather(vocab_logps, 2, labels.unsqueeze(2)).squeeze(2)
    per_reference_token_logps = torch.gather(reference_vocab_logps, 2,
                                             labels.unsqueeze(2)).squeeze(2)
    logps_margin = per_token_logps - per_reference_token_logps

    sums = ((logps_margin * loss_mask).sum(-1), (per_position_kl * loss_mask).sum(-1),
            (per_token_logps * loss_mask).sum(-1))
    if average_log_prob:
        count = loss_mask.sum(-1)
        return tuple(s / count for s in sums)
    return sums


def reference_tdpo_loss(policy_logits, ref_logits, labels, *, beta=0.1, alpha=0.5,
                        variant="tdpo2", ignore_index=-100, average_log_prob=False) -> TDPOOutput:
    """tdpo_loss computed the reference code's way; same output object."""
    _check_hyper(beta, variant)
    margin, seq_kl, policy_logps = reference_sequence_stats(
        policy_logits, ref_logits.detach(), labels, ignore_index=ignore_index,
        average_log_prob=average_log_prob)
    chosen_margin, rejected_margin = margin.chunk(2)
    chosen_kl, rejected_kl = seq_kl.chunk(2)
    u = chosen_margin - rejected_margin
    if variant == "tdpo1":
        logits = u - (rejected_kl - chosen_kl)
    elif variant == "tdpo2":
        logits = u - alpha * (rejected_kl - chosen_kl.detach())
    else:
        logits = u
    losses = -F.logsigmoid(beta * logits)
    chosen_rewards = beta * (chosen_margin + chosen_kl).detach()
    rejected_rewards = beta * (rejected_margin + rejected_kl).detach()
    chosen_logps, rejected_logps = policy_logps.detach().chunk(2)
    return TDPOOutput(losses.mean(), losses, chosen_rewards, rejected_rewards,
                      chosen_kl.detach(), rejected_kl.detach(), chosen_logps, rejected_logps)
