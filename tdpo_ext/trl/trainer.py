"""TDPOConfig and TDPOTrainer, on TRL's DPOConfig and DPOTrainer.

    from tdpo_ext.trl import TDPOConfig, TDPOTrainer
    args = TDPOConfig(output_dir="out", loss_type="tdpo2", beta=0.1, tdpo_alpha=0.5)
    trainer = TDPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                          peft_config=lora_config)   # everything else as DPOTrainer takes it
    trainer.train()

Everything but the loss is DPOTrainer's: datasets (standard or conversational, explicit or
implicit prompt), chat templates, PEFT, accelerate (DDP, FSDP2, DeepSpeed ZeRO; docs/TRL.md
says which are tested), logging, checkpoints and resume. The loss needs the reference
model's whole next-token distribution at every response token, so TDPOTrainer replaces
DPOTrainer._compute_loss: both models run their backbones through their own forward call
(accelerate's DDP, FSDP and DeepSpeed wrappers see it), and with ``use_fused_linear`` (the
default) the policy's forward hands its last hidden states and LM-head weight to
fused_linear_sequence_stats, so that no (N, T, V) logits tensor exists. docs/TRL.md says
which DPOConfig features work and which do not, and why.
"""
from __future__ import annotations

import contextlib
import math
import textwrap
from dataclasses import dataclass, field

import torch
from accelerate.utils import is_peft_model
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import get_config_model_id, use_adapter

from ..fused_linear import fused_linear_sequence_stats
from ..lm_head import LMHead, add_fused_head, head_inputs, lm_head_of, verify_lm_head
from ..ops import check_device_has_kernels, pairwise_output, sequence_stats
from .compat import (TRL_VERSION, liger_bypasses_compute_loss, seed_before_adapters,
                     tensor_parallel_size)
from .dataset_checks import check_preference_dataset

__all__ = ["TDPOConfig", "TDPOTrainer", "LOSS_TYPES"]

# loss_type -> the variant of tdpo_ext's ops that computes it.
LOSS_TYPES = {"tdpo1": "tdpo1", "tdpo2": "tdpo2", "sigmoid": "dpo"}
# Batch keys of TRL's DataCollatorForPreference that are not model inputs.
_NON_MODEL_KEYS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")


@dataclass
class TDPOConfig(DPOConfig):
    r"""DPOConfig for TDPOTrainer. Every DPOConfig field keeps its meaning; those that cannot
    work with TDPO are refused here, each with the reason.

    Parameters beyond DPOConfig's:
        tdpo_alpha (`float`, defaults to `0.5`): TDPO2's weight of the KL term.
        average_log_prob (`bool`, defaults to `False`): average each response's token
            statistics instead of summing them.
        use_fused_linear (`bool`, defaults to `True`): compute the loss from the models'
            last hidden states and LM-head weights, never materializing their logits.
    """

    loss_type: list[str] = field(
        default_factory=lambda: ["tdpo2"],
        metadata={"help": "One of 'tdpo2', 'tdpo1' (the TDPO paper's two losses) or "
                          "'sigmoid' (plain DPO, computed by tdpo_ext's ops). With u = "
                          "logratio_chosen - logratio_rejected and the sequential KLs: tdpo1 "
                          "is -logsigmoid(beta * (u - (kl_rejected - kl_chosen))), tdpo2 is "
                          "-logsigmoid(beta * (u - tdpo_alpha * (kl_rejected - "
                          "stopgrad(kl_chosen)))), sigmoid is -logsigmoid(beta * u)."})
    tdpo_alpha: float = field(
        default=0.5,
        metadata={"help": "TDPO2's weight alpha of the KL term (>= 0); unused by tdpo1 and "
                          "sigmoid."})
    average_log_prob: bool = field(
        default=False,
        metadata={"help": "Average each response's log-probabilities and KLs over its tokens "
                          "instead of summing them."})
    use_fused_linear: bool = field(
        default=True,
        metadata={"help": "Compute the loss from the models' last hidden states and LM-head "
                          "weights, a block of tokens by a tile of the vocabulary at a time, "
                          "without ever materializing either model's (N, T, V) logits. False: "
                          "from the models' logits."})

    def __post_init__(self):
        super().__post_init__()  # makes loss_type a list
        why = _refusal(self)
        if why:
            raise ValueError(f"TDPOConfig: {why}")


def _refusal(args: TDPOConfig) -> str | None:
    """Why args cannot configure TDPOTrainer, or None."""
    if len(args.loss_type) != 1:
        return (f"loss_type={args.loss_type} combines several losses; TDPOTrainer computes "
                f"one, of {sorted(LOSS_TYPES)}")
    if args.loss_type[0] not in LOSS_TYPES:
        return (f"unknown loss_type {args.loss_type[0]!r}: TDPOTrainer computes "
                f"{sorted(LOSS_TYPES)} ('sigmoid' is plain DPO); TRL's other losses are "
                "DPOTrainer's")
    if args.precompute_ref_log_probs:
        return ("precompute_ref_log_probs=True cannot work: TDPO needs the reference "
                "model's whole next-token distribution at every response token (for the "
                "KL), not its sequence log-probabilities")
    if not (math.isfinite(args.beta) and args.beta > 0):
        return f"beta must be > 0, got {args.beta}"
    if not (math.isfinite(args.tdpo_alpha) and args.tdpo_alpha >= 0):
        return f"tdpo_alpha must be >= 0, got {args.tdpo_alpha}"
    if args.ld_alpha is not None:
        return ("ld_alpha (LD-DPO) reweights the tokens of the sequence log-probabilities; "
                "TDPO's statistics are plain sums (or means, with average_log_prob)")
    if args.f_divergence_type != "reverse_kl":
        return (f"f_divergence_type={args.f_divergence_type!r} replaces DPO's log-ratio "
                "reward; TDPO's loss is defined on the log-ratio and the sequential "
                "KL(pi_ref || pi_theta)")
    if args.use_weighting:
        return "use_weighting (WPO) is not implemented for TDPO"
    if args.use_liger_kernel and liger_bypasses_compute_loss():
        return (f"use_liger_kernel=True makes TRL {TRL_VERSION} compute Liger's DPO loss "
                "instead of TDPO's (TRL 1.14 and later only patch the model's kernels); "
                "set use_liger_kernel=False or upgrade TRL")
    if args.label_smoothing:
        return ("label_smoothing belongs to the 'robust' and 'exo_pair' losses, not to "
                f"{args.loss_type[0]!r}")
    return None


def _fusable_head(model, role: str, verify: bool, mixed_precision: bool) -> LMHead:
    """lm_head_of(model), checked on a few token ids when verify; a refusal names the
    model's role and the way out."""
    try:
        head = lm_head_of(model)
        if verify:
            ids = torch.arange(min(8, head.weight.shape[0]), device=model.device)[None]
            # A reference prepared by accelerate runs its forward under autocast.
            verify_lm_head(model, head, ids, rtol=2e-2 if mixed_precision else 1e-3)
    except ValueError as e:
        raise ValueError(f"TDPOTrainer, {role} model: {e}. Set use_fused_linear=False to "
                         "compute the loss from its logits") from e
    return head


class TDPOTrainer(DPOTrainer):
    """DPOTrainer with the TDPO loss (Zeng et al., ICML 2024), computed by tdpo_ext's
    ops. Arguments as DPOTrainer's, with a TDPOConfig.

    The reference is ``ref_model``, or, when training a PEFT adapter without one, the
    base model with its adapters disabled, as DPOTrainer does. Logged beside DPOTrainer's
    names (rewards/*, logps/*, entropy, logits/*, mean_token_accuracy): kl/chosen,
    kl/rejected and kl/margin (rejected - chosen), the sequential KL(pi_ref || pi_theta) of
    each response. The rewards are TDPO's, beta * (log-ratio + sequential KL), for every
    loss_type.
    """

    _tag_names = ["trl", "tdpo", "tdpo-ext"]
    _name = "TDPO"
    _paper = {
        "title": "Token-level Direct Preference Optimization",
        "id": "2404.11999",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{zeng2024token,
                title        = {{Token-level Direct Preference Optimization}},
                author       = {Yongcheng Zeng and Guoqing Liu and Weiyu Ma and Ning Yang and Haifeng Zhang and Jun Wang},
                year         = 2024,
                booktitle    = {Forty-first International Conference on Machine Learning, {ICML} 2024},
            }"""),
    }

    def __init__(self, model, ref_model=None, args: TDPOConfig | None = None,
                 data_collator=None, train_dataset=None, eval_dataset=None, *rest, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = TDPOConfig(f"{name.split('/')[-1]}-TDPO")
        elif not isinstance(args, TDPOConfig):
            raise TypeError(f"TDPOTrainer takes a TDPOConfig, got {type(args).__name__}: "
                            "TDPOConfig(**your_dpo_config.to_dict()) converts one, with "
                            "loss_type='tdpo2'")
        check_device_has_kernels(args.device)  # a CPU-only build on a GPU: now, not at step 1
        # Before TRL's dataset preparation, whose errors on bad rows name neither row nor column.
        train_dataset = check_preference_dataset(train_dataset, "train")
        if isinstance(eval_dataset, dict):
            eval_dataset = {key: check_preference_dataset(dataset, f"eval {key!r}")
                            for key, dataset in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = check_preference_dataset(eval_dataset, "eval")
        seed_before_adapters(args.seed)
        super().__init__(model, ref_model, args, data_collator, train_dataset, eval_dataset,
                         *rest, **kwargs)
        self.variant = LOSS_TYPES[args.loss_type[0]]
        if self.aux_loss_enabled:
            raise ValueError("TDPOTrainer: the MoE load-balancing loss is not added to the "
                             "TDPO loss; set router_aux_loss_coef=0.0")
        if args.use_fused_linear:
            self._setup_fused_head()

    def _setup_fused_head(self) -> None:
        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        models = {"policy": policy}
        if self.ref_model is not None:
            models["reference"] = self.accelerator.unwrap_model(self.ref_model)
        # Verified numerically, unless sharded: what the config does not say (a hidden-state
        # scaling, a patched forward, a hook) is refused.
        verify = not (self.is_fsdp_enabled or self.is_deepspeed_enabled)
        mixed_precision = self.args.bf16 or self.args.fp16
        heads = [_fusable_head(model, role, verify, mixed_precision)
                 for role, model in models.items()]
        transforms = {(head.logit_scale, head.logit_softcap) for head in heads}
        if len(transforms) > 1:
            raise ValueError("TDPOTrainer: the policy and the reference transform their "
                             f"logits differently {sorted(transforms)}; set "
                             "use_fused_linear=False")
        (self._logit_scale, self._logit_softcap), = transforms
        for model, head in zip(models.values(), heads):
            add_fused_head(model, head.body)

    @contextlib.contextmanager
    def _reference(self):
        """The model to run as the reference, without gradient: ref_model, or the
        policy with its adapters disabled (its "ref" adapter, if it came with one)."""
        with torch.no_grad(), disable_gradient_checkpointing(
                self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is None and is_peft_model(self.model):
                unwrapped = self.accelerator.unwrap_model(self.model)
                adapter = "ref" if "ref" in unwrapped.peft_config else None
                with use_adapter(unwrapped, adapter_name=adapter):
                    yield self.model
            else:
                yield self.ref_model

    def _fused_stats(self, model, model_kwargs, labels):
        # Prompt-learning PEFT prepends virtual tokens: keep the positions of the real ones.
        seq_len = labels.shape[1]
        with self._reference() as reference:
            ref_hidden, ref_weight, ref_bias = head_inputs(reference, **model_kwargs)

        def policy_stats(hidden, weight, bias):
            return fused_linear_sequence_stats(
                hidden[:, -seq_len:], weight, ref_hidden[:, -seq_len:], ref_weight, labels,
                policy_bias=bias, ref_bias=ref_bias,
                average_log_prob=self.args.average_log_prob, logit_scale=self._logit_scale,
                logit_softcap=self._logit_softcap, policy_metrics=True)

        return model(**model_kwargs, fused_head=policy_stats)

    def _logits_stats(self, model, model_kwargs, labels):
        seq_len = labels.shape[1]
        with self._reference() as reference:
            ref_logits = reference(**model_kwargs).logits[:, -seq_len:]
        logits = model(**model_kwargs).logits[:, -seq_len:]
        return sequence_stats(logits, ref_logits, labels,
                              average_log_prob=self.args.average_log_prob, policy_metrics=True)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        *stats, token_metrics = (
            self._fused_stats if self.args.use_fused_linear else self._logits_stats)(
            model, model_kwargs, labels)
        out = pairwise_output(*stats, beta=self.beta, alpha=self.args.tdpo_alpha,
                              variant=self.variant)
        loss = out.loss * self.loss_weights[0]
        self._log_tdpo_metrics(mode, out, inputs)
        self._log_policy_metrics(mode, token_metrics)
        if return_outputs:  # DPOTrainer's deprecated compute_metrics path wants logits
            with torch.no_grad():
                return loss, model(**model_kwargs)
        return loss

    def _log_tdpo_metrics(self, mode, out, inputs) -> None:
        """DPOTrainer's metric names (averaged over every process's pairs), and kl/*."""
        gather = self.accelerator.gather
        metrics = self._metrics[mode]
        chosen_rewards, rejected_rewards = gather(out.chosen_rewards), gather(out.rejected_rewards)
        chosen_kl, rejected_kl = gather(out.chosen_kl), gather(out.rejected_kl)
        for name, value in (
                ("rewards/chosen", chosen_rewards),
                ("rewards/rejected", rejected_rewards),
                ("rewards/accuracies", (chosen_rewards > rejected_rewards).float()),
                ("rewards/margins", chosen_rewards - rejected_rewards),
                ("logps/chosen", gather(out.chosen_logps)),
                ("logps/rejected", gather(out.rejected_logps)),
                ("kl/chosen", chosen_kl),
                ("kl/rejected", rejected_kl),
                ("kl/margin", rejected_kl - chosen_kl)):
            metrics[name].append(value.mean().item())
        if mode == "train":
            tokens = gather(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // tensor_parallel_size(self)
        metrics["num_tokens"] = [self._total_train_tokens]

    def _log_policy_metrics(self, mode, token_metrics) -> None:
        """DPOTrainer's entropy, logits/chosen, logits/rejected and mean_token_accuracy, as
        it defines and gathers them: each is a sum over completion tokens (the policy's
        per-token entropy, its mean logit over the vocabulary, whether the label is its
        first argmax) divided by their number, both summed over every process (a token
        weighs the same whichever process holds it); 0 when there are none. entropy is
        over all rows, logits/* over the chosen or rejected half, mean_token_accuracy over
        the chosen half."""
        entropy, logit_mean, label_is_argmax, mask = token_metrics
        chosen, rejected = slice(None, len(mask) // 2), slice(len(mask) // 2, None)
        # Masked tokens hold 0 / False, so plain sums are sums over completion tokens.
        totals = {"entropy": (entropy.sum(), mask.sum()),
                  "logits/chosen": (logit_mean[chosen].sum(), mask[chosen].sum()),
                  "logits/rejected": (logit_mean[rejected].sum(), mask[rejected].sum()),
                  "mean_token_accuracy": (label_is_argmax[chosen].sum(), mask[chosen].sum())}
        # One row per process, so that one collective carries them all and, at the end of
        # an uneven evaluation, gather_for_metrics keeps the processes that DPOTrainer's
        # per-scalar gathers keep. float32 holds token counts exactly up to 2**24.
        local = torch.stack([value.float() for pair in totals.values() for value in pair])
        summed = self.accelerator.gather_for_metrics(local[None]).sum(0).tolist()
        for (name, _), total, count in zip(totals.items(), summed[::2], summed[1::2]):
            self._metrics[mode][name].append(total / count if count > 0 else 0.0)
