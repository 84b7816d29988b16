"""The loss of one batch for tdpo-train, with every loss (TDPO1, TDPO2, DPO, SFT) and loss
implementation (fused ops, the reference code's pattern, the fused LM head), and the
per-pair metrics it reports, named as in the TDPO reference implementation, with the
policy's token entropy beside them."""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..fused_linear import fused_linear_tdpo_loss
from ..lm_head import add_fused_head, head_inputs, lm_head_of
from ..ops import PolicyTokenMetrics, sequence_stats, tdpo_loss
from ..reference import reference_tdpo_loss
from . import data as D
from . import models as M
from .processes import all_sum


def sft_logps(logits, labels):
    """Sum of log p(label) over each row's unmasked tokens (logits at t predict t + 1)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != D.IGNORE_INDEX
    logp = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
    return (logp * mask).sum(-1)


def fused_heads(cfg, policy, ref):
    """(policy's, reference's) LMHead for --fused-linear, found once per run, with each
    model's forward taught to compute the loss from its hidden states (add_fused_head):
    the policy's loss is then computed inside its own forward call, so a DDP wrapper
    around it synchronizes every gradient, the LM head's included. None without
    --fused-linear. Refuses, with the reason, where it cannot run."""
    if not cfg.fused_linear:
        return None
    why = None
    if cfg.loss == "sft" or cfg.loss_impl != "fused":
        why = "it needs a preference loss and --loss-impl fused"
    elif isinstance(policy, M.TinyGPT):
        why = "the built-in tiny model has no separable LM head; use a transformers model"
    else:
        try:
            heads = lm_head_of(policy), lm_head_of(ref)
        except ValueError as e:
            why = str(e)
    if why is not None:
        raise SystemExit(f"tdpo-train: --fused-linear: {why}")
    for model, head in zip((policy, ref), heads):
        add_fused_head(model, head.body)
    return heads


def batch_loss(policy, ref, batch, cfg, split: str, heads=None):
    """(mean loss, per-pair metric tensors named as in the reference implementation).
    policy: the model or its DDP wrapper; heads: fused_heads(...) for --fused-linear."""
    kw = dict(beta=cfg.beta, alpha=cfg.alpha, variant=cfg.loss,
              average_log_prob=cfg.average_log_prob)
    if heads is not None:
        out = _fused_linear_loss(policy, ref, batch, heads, policy_metrics=True, **kw)
        return out.loss, pair_metrics(out, split)
    logits = M.forward_logits(policy, batch["input_ids"], batch["attention_mask"])
    if cfg.loss == "sft":
        logps = sft_logps(logits, batch["labels"])
        # The entropy from the op, run on the same logits without gradient (the policy's
        # logits stand in for the reference's, whose statistics are dropped): SFT's loss
        # is plain log_softmax, which gives no entropy.
        with torch.no_grad():
            *_, metrics = sequence_stats(logits, logits, batch["labels"], policy_metrics=True)
        return -logps.mean(), {"loss": -logps.detach(), f"logps_{split}/chosen": logps.detach(),
                               **entropy_metrics(metrics, split, ("chosen",))}
    with torch.no_grad():
        ref_logits = M.forward_logits(ref, batch["input_ids"], batch["attention_mask"])
    if cfg.loss_impl == "fused":
        out = tdpo_loss(logits, ref_logits, batch["labels"], policy_metrics=True, **kw)
    else:  # the reference code's pass as it is: it computes no entropy (docs/TRAINING.md)
        out = reference_tdpo_loss(logits, ref_logits, batch["labels"], **kw)
    return out.loss, pair_metrics(out, split)


def _fused_linear_loss(policy, ref, batch, heads, **kw):
    """fused_linear_tdpo_loss, the policy's side computed inside its forward call."""
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    head = heads[0]
    with torch.no_grad():
        ref_hidden, ref_weight, ref_bias = head_inputs(ref, **inputs)

    def loss(hidden, weight, bias):
        return fused_linear_tdpo_loss(
            hidden, weight, ref_hidden, ref_weight, batch["labels"], policy_bias=bias,
            ref_bias=ref_bias, logit_scale=head.logit_scale,
            logit_softcap=head.logit_softcap, **kw)

    return policy(**inputs, fused_head=loss)


def pair_metrics(out, split: str) -> dict:
    """Per-pair metric tensors of a TDPOOutput, named as in the reference implementation."""
    c, r = out.chosen_rewards, out.rejected_rewards
    return {
        "loss": out.losses.detach(),
        f"rewards_{split}/chosen": c, f"rewards_{split}/rejected": r,
        f"rewards_{split}/accuracies": (c > r).float(), f"rewards_{split}/margins": c - r,
        f"kl_{split}/chosen": out.chosen_kl, f"kl_{split}/rejected": out.rejected_kl,
        f"kl_{split}/margin": out.chosen_kl - out.rejected_kl,
        f"logps_{split}/chosen": out.chosen_logps, f"logps_{split}/rejected": out.rejected_logps,
        **({} if out.policy_metrics is None else
           entropy_metrics(out.policy_metrics, split, ("chosen", "rejected")))}


class TokenMean(NamedTuple):
    """A metric that Meter averages over tokens, not pairs: per-pair sums over the
    response tokens, and those tokens' counts."""
    sums: torch.Tensor
    tokens: torch.Tensor


def entropy_metrics(metrics: PolicyTokenMetrics, split: str, sides) -> dict:
    """entropy_<split>/<side>: the policy's entropy, token-weighted mean over the response
    tokens of each side's rows (the batch's rows split evenly among `sides`, in order)."""
    sums = metrics.entropy.sum(-1).chunk(len(sides))  # 0 at masked positions
    tokens = metrics.mask.sum(-1).chunk(len(sides))
    return {f"entropy_{split}/{side}": TokenMean(s, t)
            for side, s, t in zip(sides, sums, tokens)}


class Meter:
    """Sums of per-pair values (or of TokenMean's per-token ones) over micro-batches and
    processes -> means over pairs (over tokens)."""

    def __init__(self):
        self.sums, self.weights = {}, {}

    def add(self, values: dict):
        for k, v in values.items():
            total, weight = ((v.sums, v.tokens) if isinstance(v, TokenMean)
                             else (v, torch.ones_like(v)))
            self.sums[k] = self.sums.get(k, 0.0) + total.double().sum()
            self.weights[k] = self.weights.get(k, 0.0) + weight.double().sum()

    def means(self, split: str) -> dict:
        keys = sorted(self.sums)
        sums, weights = all_sum(torch.stack([torch.stack([self.sums[k], self.weights[k]])
                                             for k in keys]).cpu()).unbind(1)
        return {("loss/" + split if k == "loss" else k): (sums[i] / weights[i]).item()
                for i, k in enumerate(keys)}
