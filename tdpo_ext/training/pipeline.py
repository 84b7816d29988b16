"""A tdpo-train run from its settings to its summary: for a task trained without --data,
(1) SFT of the model on the task's corpus and (2) preference pairs sampled from it and
ranked by the task reward; then (3) preference training (or SFT on --data's chosen
responses), the final policy, summary.json and plots. Each part that finished in an
earlier attempt is skipped, and the training stages continue from their checkpoints, so
that a resumed run ends as an uninterrupted one would."""
from __future__ import annotations

import math
import os
import time

import torch

from . import data as D
from . import models as M
from . import parallel, safe_load
from .checkpoint import METRICS
from .files import write_json
from .loop import Stage, num
from .processes import ONE_CPU_PROCESS, Processes, barrier, log, seed_all
from .sampling import make_pairs
from .tasks import get_task

# Floating-point operations a second that a CPU run gets, for the cost notices before
# long stages: SmolLM2-135M's training step (8 rows of 90 tokens) took 35 s on this
# project's 2-core machine (docs/TRAINING.md). A rough guide, not a measurement of yours.
CPU_FLOPS = 2e10
NOTICE_SECONDS = 180


def announce_cost(what: str, model, tokens: float, passes: int, device) -> None:
    """Says, before it starts, that a stage will take more than a few minutes: `passes`
    forward-equivalents (a backward counts as two) of `model` over `tokens` tokens."""
    if device.type != "cpu":
        return
    params = sum(p.numel() for p in M.unwrap(model).parameters())
    seconds = 2 * params * tokens * passes / CPU_FLOPS
    if seconds > NOTICE_SECONDS:
        log(f"{what}: a {params / 1e6:.0f} M-parameter model on CPU, roughly "
            f"{seconds / 60:.0f} min (at {CPU_FLOPS / 1e9:.0f} GFLOP/s)")


def _mean_tokens(items, names) -> float:
    return sum(len(it[f"{n}_input_ids"]) for it in items for n in names) / max(1, len(items))


def save_final(model, tok, folder: str, procs: Processes, dtype=None) -> None:
    """The trained model as an ordinary model folder (rank 0 writes it; a sharded model is
    first gathered, which every process takes part in)."""
    state = parallel.full_state_dict(model)
    if procs.rank == 0:
        M.save_model(model, tok, folder, dtype=dtype, state=state)
    barrier()


def sft_stage(cfg, task, procs: Processes, summary: dict) -> str:
    """Stage 1: supervised fine-tuning on the task's corpus (the paper's SFT model).
    Returns the folder of the fine-tuned model."""
    out = os.path.join(cfg.out, "sft")
    final, summary_path = os.path.join(out, "final"), os.path.join(out, "summary.json")
    if not os.path.isdir(final):
        # float32 master weights; --dtype is the compute dtype (Stage's autocast). The SFT
        # model is saved in float32 for the preference stage to start from.
        model, tok = M.load_model(cfg.model, device=parallel.load_device(cfg, procs),
                                  seed=cfg.seed, chat_template=cfg.chat_template)
        texts = task.sft_texts()
        n_eval = min(256, len(texts) // 10)
        items = [D.tokenize_sft_text(t, tok, cfg.max_length) for t in texts]
        sft_cfg = cfg.replace(loss="sft", lr=cfg.sft_lr, steps=cfg.sft_steps,
                              batch_size=cfg.sft_batch_size, grad_accum=1,
                              eval_every=cfg.sft_steps, save_every=cfg.sft_steps,
                              fused_linear=False)
        announce_cost(f"[sft] {cfg.sft_steps} steps", model,
                      cfg.sft_steps * cfg.sft_batch_size * _mean_tokens(items, ["chosen"]),
                      3, procs.device)
        stage = Stage("sft", out, sft_cfg, model, None, tok, items[n_eval:], items[:n_eval],
                      procs)
        result = stage.run()["eval"]
        if procs.rank == 0:  # the summary first: a finished final/ implies it exists
            write_json(summary_path, result)
        save_final(model, tok, final, procs)
    summary["sft"] = safe_load.json_file(summary_path, METRICS)
    return final


def pairs_stage(cfg, task, policy_spec: str, procs: Processes, summary: dict):
    """Stage 2: preference pairs sampled from the model and ranked by the task reward.
    Returns the (train, eval) pairs files."""
    paths = [os.path.join(cfg.out, f"pairs_{split}.jsonl") for split in ("train", "eval")]
    stats_path = os.path.join(cfg.out, "pairs_stats.json")
    if not os.path.isfile(stats_path):  # written last: the pairs files are complete
        if procs.rank == 0:
            model, tok = M.load_model(policy_spec, dtype=getattr(torch, cfg.dtype),
                                      device=procs.device, chat_template=cfg.chat_template)
            n_samples = 2 * (cfg.pair_prompts + cfg.eval_data_size)
            announce_cost(f"[pairs] sampling {n_samples} responses", model,
                          n_samples * (cfg.max_prompt_length + cfg.max_new_tokens), 1,
                          procs.device)
            stats = {split: make_pairs(model, tok, task, split, n, cfg, path)
                     for split, n, path in (("train", cfg.pair_prompts, paths[0]),
                                            ("eval", cfg.eval_data_size, paths[1]))}
            write_json(stats_path, stats)
            del model
        barrier()
    summary["pairs"] = safe_load.json_file(stats_path, {"train": METRICS, "eval": METRICS})
    return paths


def prepare_task_data(cfg, task, procs: Processes = ONE_CPU_PROCESS, summary=None):
    """The task pipeline's first stages, when a task is trained without --data: the SFT
    stage (for tasks with a corpus) and the pairs. Returns (starting policy, train pairs
    path, eval pairs path); without a task or with --data, the configured ones."""
    summary = {} if summary is None else summary
    if task is None or cfg.data:
        return cfg.model, cfg.data, cfg.eval_data
    policy_spec = sft_stage(cfg, task, procs, summary) if hasattr(task, "sft_texts") \
        else cfg.model
    return (policy_spec, *pairs_stage(cfg, task, policy_spec, procs, summary))


def _split_eval(cfg, train_path, eval_path):
    train_rows = D.load_jsonl(train_path)
    if eval_path:
        return train_rows, D.load_jsonl(eval_path)[:cfg.eval_data_size]
    n_eval = min(cfg.eval_data_size, len(train_rows) // 10)
    log(f"no --eval-data: holding out the last {n_eval} of {len(train_rows)} pairs of "
        f"{train_path} for evaluation")
    return train_rows[:len(train_rows) - n_eval], train_rows[len(train_rows) - n_eval:]


def train(cfg, procs: Processes) -> dict:
    """The whole run in cfg.out; returns what summary.json holds."""
    dtype = getattr(torch, cfg.dtype)
    task = get_task(cfg.task) if cfg.task != "none" else None
    t_start = time.time()
    seed_all(cfg.seed)
    summary: dict = {"task": cfg.task, "loss": cfg.loss, "model": cfg.model}
    policy_spec, train_path, eval_path = prepare_task_data(cfg, task, procs, summary)

    # Stage 3: preference training (or SFT on --data's chosen responses). The policy keeps
    # float32 master weights for AdamW (--dtype is the compute dtype: Stage's autocast);
    # the frozen reference has no optimizer, so it is held in the compute dtype.
    device = parallel.load_device(cfg, procs)
    policy, tok = M.load_model(policy_spec, device=device, seed=cfg.seed,
                               chat_template=cfg.chat_template)
    if cfg.loss == "sft":
        ref = None
    elif cfg.ref_model:
        ref = M.frozen_copy(M.load_model(cfg.ref_model, dtype=dtype, device=device,
                                         chat_template=cfg.chat_template)[0])
    else:
        ref = M.frozen_copy(policy).to(dtype)
    if isinstance(policy, M.TinyGPT) and cfg.max_length > policy.config.max_len:
        log(f"--max-length {cfg.max_length} -> {policy.config.max_len}, the tiny model's "
            f"context")
        cfg = cfg.replace(max_length=policy.config.max_len,
                          max_prompt_length=min(cfg.max_prompt_length,
                                                policy.config.max_len // 2))
    train_rows, eval_rows = _split_eval(cfg, train_path, eval_path)

    def tok_rows(rows):
        return [D.tokenize_pair(r["prompt"], r["chosen"], r["rejected"], tok,
                                max_length=cfg.max_length,
                                max_prompt_length=cfg.max_prompt_length,
                                truncation_mode=cfg.truncation_mode, source=r["source"])
                for r in rows]

    train_items, eval_items = tok_rows(train_rows), tok_rows(eval_rows)
    steps = cfg.steps or math.ceil(cfg.epochs * len(train_items) / cfg.batch_size)
    eval_prompts = task.prompts("eval", cfg.eval_prompts) if task is not None else None
    announce_cost(f"[{cfg.loss}] {steps} steps", policy,
                  steps * cfg.batch_size * _mean_tokens(train_items, ["chosen", "rejected"]),
                  3 if ref is None else 4, procs.device)
    stage = Stage(cfg.loss, cfg.out, cfg.replace(steps=steps), policy, ref, tok, train_items,
                  eval_items, procs, task=task if ref is not None else None,
                  eval_prompts=eval_prompts)
    log(f"[{cfg.loss}] {len(train_items)} train / {len(eval_items)} eval pairs, {steps} "
        f"steps of {cfg.batch_size} pairs, {procs.world} process(es) on {procs.device}, "
        f"loss impl {cfg.loss_impl}")
    result = stage.run()
    save_final(policy, tok, os.path.join(cfg.out, "final"), procs, dtype=dtype)

    summary.update({"steps": result["steps"], "eval": result["eval"],
                    "train": {k: v for k, v in result["last_train"].items()
                              if k.startswith(("loss/", "rewards_", "kl_", "logps_",
                                                "entropy_"))},
                    "final_checkpoint": os.path.join(cfg.out, "final"),
                    "runtime_s": round(time.time() - t_start, 1), "world_size": procs.world})
    first, last = result["first_eval"], result["eval"]
    for name, key in (("task_reward", "task_reward/eval"), ("sample_kl", "sample_kl/eval"),
                      ("sample_logratio", "sample_logratio/eval"),
                      ("sample_entropy", "sample_entropy/eval"),
                      ("distinct_1", "distinct_1/eval"), ("distinct_2", "distinct_2/eval")):
        if key in last:
            summary[name] = {"before": first.get(key), "after": last[key]}
    if procs.rank == 0:
        write_json(os.path.join(cfg.out, "summary.json"), summary)
        if cfg.plots:
            try:
                from .plots import plot_run
                plot_run(cfg.out)
            except ImportError as e:
                log(f"plots skipped ({e}); pip install matplotlib")
    return summary


def report(summary: dict, out: str) -> None:
    if "task_reward" in summary:
        log(f"task reward of policy samples: {num(summary['task_reward']['before'])} before "
            f"-> {num(summary['task_reward']['after'])} after (sequential KL from the "
            f"reference {num(summary['sample_kl']['after'])})")
    log(f"done in {summary['runtime_s']:.0f} s: {out}/summary.json")
