"""The loss of one batch for tdpo-train, with every loss (TDPO1, TDPO2, DPO, SFT) and loss
implementation (fused ops, the reference code's pattern, the fused LM head), and the
per-pair metrics it reports, named as in the TDPO reference implementation."""
from __future__ import annotations

import torch

from ..fused_linear import fused_linear_tdpo_loss
from ..lm_head import add_fused_head, head_inputs, lm_head_of
from ..ops import tdpo_loss
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
        out = _fused_linear_loss(policy, ref, batch, heads, **kw)
        return out.loss, pair_metrics(out, split)
    logits = M.forward_logits(policy, batch["input_ids"], batch["attention_mask"])
    if cfg.loss == "sft":
        logps = sft_logps(logits, batch["labels"])
        return -logps.mean(), {"loss": -logps.detach(), f"logps_{split}/chosen": logps.detach()}
    with torch.no_grad():
        ref_logits = M.forward_logits(ref, batch["input_ids"], batch["attention_mask"])
    fn = tdpo_loss if cfg.loss_impl == "fused" else reference_tdpo_loss
    out = fn(logits, ref_logits, batch["labels"], **kw)
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
        f"logps_{split}/chosen": out.chosen_logps, f"logps_{split}/rejected": out.rejected_logps}


class Meter:
    """Sums of per-pair values over micro-batches and processes -> means."""

    def __init__(self):
        self.sums, self.count = {}, 0

    def add(self, values: dict):
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.double().sum()
        self.count += len(next(iter(values.values())))

    def means(self, split: str) -> dict:
        keys = sorted(self.sums)
        vec = all_sum(torch.stack([self.sums[k].cpu() for k in keys] +
                                  [torch.tensor(float(self.count), dtype=torch.double)]))
        out = {("loss/" + split if k == "loss" else k): (vec[i] / vec[-1]).item()
               for i, k in enumerate(keys)}
        return out
