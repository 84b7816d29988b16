"""Sampling for tdpo-train's task pipeline: the task reward, sequential KL and diversity of
policy samples (the evaluation), and preference pairs made by ranking two samples per
prompt."""
from __future__ import annotations

import torch

from . import data as D
from . import hooks
from . import models as M
from ..ops import sequence_stats
from .processes import log


@torch.no_grad()
def sample_eval(policy, ref, tok, task, prompts, cfg, seed, synced=False) -> dict:
    """Mean task reward of one policy sample per prompt, and the sequential KL
    sum_t KL(pi_ref || pi_theta) (and log pi_theta / pi_ref) on those samples; their
    diversity: "sample_entropy", the mean over samples of each sample's mean per-token
    entropy H(pi_theta(.|prefix)) over its sampled tokens (the policy's own distribution,
    not the temperature's or top-k's; an empty sample counts 0), and "distinct_1",
    "distinct_2" (distinct_n). Also each sample's reward, KL and entropy, in prompt order
    ("rewards", "seq_kls", "sample_entropies"). synced: every process calls it (sharded
    models), and they take the same forward passes."""
    policy = M.unwrap(policy)
    prompt_ids = [tok.encode(tok.format_prompt(p))[-cfg.max_prompt_length:] for p in prompts]
    responses = M.generate(policy, tok, prompt_ids, max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature, top_k=cfg.top_k, seed=seed,
                           synced=synced)
    rewards = task.reward(prompts, [tok.decode(r) for r in responses])
    kls, ratios, entropies = [], [], []
    chunk = 64 if isinstance(policy, M.TinyGPT) else 4
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    for i in range(0, len(prompts), chunk):
        items = [{"chosen_input_ids": p + r, "chosen_labels": [D.IGNORE_INDEX] * len(p) + r}
                 for p, r in zip(prompt_ids[i:i + chunk], responses[i:i + chunk])]
        b = {k: v.to(device) for k, v in D.collate(items, tok.pad_token_id, True).items()}
        pol = M.forward_logits(policy, b["input_ids"], b["attention_mask"])
        refl = M.forward_logits(ref, b["input_ids"], b["attention_mask"])
        margin, seq_kl, _, metrics = sequence_stats(pol, refl, b["labels"],
                                                    policy_metrics=True)
        kls += seq_kl.tolist()
        ratios += margin.tolist()
        tokens = metrics.mask.sum(-1).clamp(min=1)  # an empty sample: 0 / 1
        entropies += (metrics.entropy.double().sum(-1) / tokens).tolist()
    policy.train(was_training)
    n = len(prompts)
    return {"reward": sum(rewards) / n, "seq_kl": sum(kls) / n, "logratio": sum(ratios) / n,
            "sample_entropy": sum(entropies) / n, "distinct_1": distinct_n(responses, 1),
            "distinct_2": distinct_n(responses, 2),
            "response_tokens": sum(len(r) for r in responses) / n,
            "rewards": rewards, "seq_kls": kls, "sample_entropies": entropies}


def distinct_n(samples: list[list[int]], n: int) -> float:
    """Distinct-n (Li et al., 2016): the number of distinct token n-grams over all
    samples, divided by the number of n-grams they hold (n-grams do not span two samples;
    0 when no sample has n tokens). Over token ids as sampled, EOS included, as the
    samples' KL and entropy are."""
    grams = [tuple(s[i:i + n]) for s in samples for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def make_pairs(model, tok, task, split, n_prompts, cfg, path) -> dict:
    """Two samples per prompt from `model`, ranked by the task reward, written as JSONL.
    A tie (equal reward) gives no preference, so it makes no pair; the count is reported."""
    prompts = task.prompts(split, n_prompts)
    ids = [tok.encode(tok.format_prompt(p))[-cfg.max_prompt_length:] for p in prompts]
    seed = cfg.seed * 7919 + (1 if split == "train" else 2)
    samples = M.generate(model, tok, ids + ids, max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature, top_k=cfg.top_k, seed=seed)
    texts = [tok.decode(s) for s in samples]
    rewards = task.reward(prompts + prompts, texts)
    rows, ties = [], 0
    for i, p in enumerate(prompts):
        a, b = i, i + n_prompts
        if rewards[a] == rewards[b] or texts[a] == texts[b]:
            ties += 1
            continue
        hi, lo = (a, b) if rewards[a] > rewards[b] else (b, a)
        rows.append({"prompt": p, "chosen": texts[hi], "rejected": texts[lo],
                     "chosen_reward": rewards[hi], "rejected_reward": rewards[lo]})
    D.write_jsonl(path, rows)
    hooks.reached("pairs_written", split=split)
    stats = {"pairs": len(rows), "prompts": n_prompts, "ties_skipped": ties,
             "mean_sample_reward": sum(rewards) / len(rewards),
             "mean_chosen_reward": sum(r["chosen_reward"] for r in rows) / max(1, len(rows)),
             "mean_rejected_reward": sum(r["rejected_reward"] for r in rows) / max(1, len(rows))}
    log(f"pairs ({split}): {len(rows)} from {n_prompts} prompts ({ties} ties skipped), "
        f"chosen reward {stats['mean_chosen_reward']:.3f} vs rejected "
        f"{stats['mean_rejected_reward']:.3f} -> {path}")
    return stats
