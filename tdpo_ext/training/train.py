"""tdpo-train: TDPO1 / TDPO2 / DPO (or SFT) fine-tuning of a causal LM on preference pairs,
the loss computed by tdpo_ext's fused ops (or, with --loss-impl reference, by the reference
code's pattern).

With no arguments it runs the embedded default end to end (task "sentiment", see
tdpo_ext/training/tasks.py): supervised fine-tuning of the tiny built-in GPT on a review
corpus, preference pairs made by sampling two completions per prompt and ranking them by VADER
sentiment, then TDPO2, with the task reward of policy samples before and after. With
--data FILE.jsonl it trains on your pairs. Same command under
`torchrun --nproc_per_node=N` trains with DistributedDataParallel.

Outputs in --out (default runs/<timestamp>): config.json, metrics.jsonl, summary.json,
final/ (the policy), checkpoint/ (the latest full training state, for --resume), plots.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist

from . import data as D
from . import models as M
from .losses import Meter, batch_loss, check_fused_linear
from .processes import (all_sum, barrier, log, rng_state, seed_all, set_rng_state,
                        setup_distributed)
from .sampling import make_pairs, sample_eval
from .tasks import TASKS, get_task

GENERIC_DEFAULTS = dict(
    model="tiny", loss="tdpo2", beta=0.1, alpha=0.5, lr=5e-6, epochs=1.0, batch_size=32,
    grad_accum=1, max_length=512, max_prompt_length=256, eval_every=100, warmup_steps=10,
    eval_data_size=256, pair_prompts=0, eval_prompts=64, max_new_tokens=64)
FIXED_DEFAULTS = dict(seed=0, loss_impl="fused", device="auto", dtype="float32",
                      truncation_mode="keep_end", max_grad_norm=10.0, weight_decay=0.0,
                      temperature=1.0, top_k=0, average_log_prob=False, plots=True,
                      fused_linear=False)
DEBUG_KEYS = ("stop_after_steps", "debug_nan_at_step", "resume", "out")


class TrainingDiverged(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------
# Command line and settings

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tdpo-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--task", choices=[*TASKS, "none"], help="task with a reward function (default: "
      "sentiment without --data, none with it); with --data, only scores samples")
    a("--loss", choices=["tdpo1", "tdpo2", "dpo", "sft"])
    a("--beta", type=float), a("--alpha", type=float, help="TDPO2's weight of the KL term")
    a("--lr", type=float), a("--warmup-steps", type=int)
    a("--steps", type=int, help="optimizer steps (overrides --epochs)")
    a("--epochs", type=float)
    a("--batch-size", type=int, help="pairs per optimizer step, over all processes")
    a("--grad-accum", type=int, help="micro-batches per optimizer step and process")
    a("--max-length", type=int), a("--max-prompt-length", type=int)
    a("--truncation-mode", choices=["keep_end", "keep_start"])
    a("--average-log-prob", action="store_true", default=None)
    a("--seed", type=int)
    a("--model", help="tiny | smollm2 | a folder (transformers causal LM or a tiny checkpoint)")
    a("--ref-model", help="reference model (default: a frozen copy of the starting policy)")
    a("--chat-template", action=argparse.BooleanOptionalAction, default=None,
      help="wrap prompts in the tokenizer's chat template (default: on for smollm2)")
    a("--data", help="training pairs, JSONL {prompt, chosen, rejected}")
    a("--eval-data", help="eval pairs (default: the task's, or the last --eval-data-size "
      "pairs of --data held out)")
    a("--eval-data-size", type=int, help="at most this many eval pairs")
    a("--eval-every", type=int, help="steps between evaluations")
    a("--save-every", type=int, help="steps between checkpoints (default: --eval-every)")
    a("--loss-impl", choices=["fused", "reference"])
    a("--fused-linear", action="store_true", default=None,
      help="compute the loss from the body's hidden states and the LM-head weight "
      "(fused_linear_tdpo_loss), never materializing logits; transformers models whose "
      "head is a plain linear layer, one process")
    a("--out", help="output folder (default: runs/<timestamp>)")
    a("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    a("--device", help="auto | cpu | cuda | cuda:N"), a("--dtype",
                                                       choices=["float32", "bfloat16", "float16"])
    a("--threads", type=int, help="torch CPU threads (default: 1 for the tiny model, whose "
      "matrices are too small to gain from more, and torch's default otherwise)")
    a("--max-grad-norm", type=float), a("--weight-decay", type=float)
    g = p.add_argument_group("embedded task pipeline (SFT stage, pair sampling, reward eval)")
    g.add_argument("--sft-steps", type=int), g.add_argument("--sft-lr", type=float)
    g.add_argument("--sft-batch-size", type=int)
    g.add_argument("--pair-prompts", type=int, help="prompts sampled twice to make pairs")
    g.add_argument("--eval-prompts", type=int, help="prompts for the task-reward eval")
    g.add_argument("--max-new-tokens", type=int), g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", type=int)
    a("--no-plots", dest="plots", action="store_false", default=None)
    d = p.add_argument_group("debugging")
    d.add_argument("--stop-after-steps", type=int,
                   help="exit abruptly after this many steps, as if killed")
    d.add_argument("--debug-nan-at-step", type=int, help="make the loss NaN at this step")
    return p


def resolve(args: argparse.Namespace) -> dict:
    """Every setting, explicit or default, in one dict (what config.json holds)."""
    cfg = {k: v for k, v in vars(args).items()}
    if cfg["task"] is None:
        cfg["task"] = "none" if cfg["data"] else "sentiment"
    task_defaults = TASKS[cfg["task"]].defaults if cfg["task"] != "none" else {}
    for source in (task_defaults, GENERIC_DEFAULTS, FIXED_DEFAULTS):
        for k, v in source.items():
            if cfg.get(k) is None:
                cfg[k] = v
    if cfg["threads"] is None and "OMP_NUM_THREADS" not in os.environ and (
            cfg["model"] == "tiny" or os.path.isfile(os.path.join(cfg["model"],
                                                                  M.TINY_CONFIG_FILE))):
        cfg["threads"] = 1
    if cfg["save_every"] is None:
        cfg["save_every"] = cfg["eval_every"]
    if cfg["loss"] == "sft" and cfg["task"] != "none" and not cfg["data"]:
        raise SystemExit("tdpo-train: --loss sft with a task pipeline makes no sense; "
                         "give --data or a preference loss")
    return cfg


# ---------------------------------------------------------------------------------------
# The training loop of one stage

class Stage:
    """Trains `policy` for cfg["steps"] optimizer steps on `train_items`, evaluating,
    logging to <dir>/metrics.jsonl and checkpointing to <dir>/checkpoint."""

    def __init__(self, name, folder, cfg, policy, ref, tok, train_items, eval_items,
                 rank, world, device, task=None, eval_prompts=None):
        self.name, self.dir, self.cfg = name, folder, cfg
        self.tok, self.ref, self.task, self.eval_prompts = tok, ref, task, eval_prompts
        self.train_items, self.eval_items = train_items, eval_items
        self.rank, self.world, self.device = rank, world, device
        b, ga = cfg["batch_size"], cfg["grad_accum"]
        if b % (world * ga):
            raise SystemExit(f"tdpo-train: --batch-size {b} must be divisible by processes "
                             f"({world}) x --grad-accum ({ga})")
        self.micro = b // (world * ga)
        if eval_items and len(eval_items) < world:
            raise SystemExit(f"tdpo-train: {len(eval_items)} eval examples for {world} processes")
        self.module = policy
        self.policy = policy
        if world > 1:
            self.policy = torch.nn.parallel.DistributedDataParallel(
                policy, device_ids=[device.index] if device.type == "cuda" else None)
        self.opt = torch.optim.AdamW(policy.parameters(), lr=cfg["lr"],
                                     weight_decay=cfg["weight_decay"])
        warm = cfg["warmup_steps"]
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / (warm + 1)))
        self.stream = D.ExampleStream(len(train_items), cfg["seed"])
        self.step = 0
        self.last_eval: dict = {}
        self.first_eval: dict = {}
        self.chosen_only = cfg["loss"] == "sft"
        self.ckpt = os.path.join(folder, "checkpoint")
        self.metrics_path = os.path.join(folder, "metrics.jsonl")

    # -- batches
    def _batch(self, items):
        b = D.collate(items, self.tok.pad_token_id, self.chosen_only)
        return {k: v.to(self.device) for k, v in b.items()}

    # -- checkpoints
    def save(self):
        barrier()
        tmp = self.ckpt + ".tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            torch.save({"step": self.step, "position": self.step * self.cfg["batch_size"],
                        "model": self.module.state_dict(), "optimizer": self.opt.state_dict(),
                        "scheduler": self.sched.state_dict(), "last_eval": self.last_eval,
                        "first_eval": self.first_eval, "world_size": self.world},
                       os.path.join(tmp, "state.pt"))
        barrier()
        torch.save(rng_state(), os.path.join(tmp, f"rng_rank{self.rank}.pt"))
        barrier()
        if self.rank == 0:  # swap in the new checkpoint only once it is complete
            old = self.ckpt + ".old"
            shutil.rmtree(old, ignore_errors=True)
            if os.path.isdir(self.ckpt):
                os.replace(self.ckpt, old)
            os.replace(tmp, self.ckpt)
            shutil.rmtree(old, ignore_errors=True)
        barrier()

    def maybe_resume(self) -> bool:
        path = os.path.join(self.ckpt, "state.pt")
        if not os.path.isfile(path):
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.module.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step, self.last_eval = state["step"], state["last_eval"]
        self.first_eval = state.get("first_eval", {})
        rng = os.path.join(self.ckpt, f"rng_rank{self.rank}.pt")
        if os.path.isfile(rng) and state["world_size"] == self.world:
            set_rng_state(torch.load(rng, weights_only=False))
        if self.rank == 0 and os.path.isfile(self.metrics_path):  # drop lines past the ckpt
            with open(self.metrics_path) as f:
                lines = [ln for ln in f if json.loads(ln)["step"] <= self.step]
            with open(self.metrics_path, "w") as f:
                f.writelines(lines)
        log(f"[{self.name}] resumed from {self.ckpt} at step {self.step}")
        return True

    # -- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        module = self.module
        was_training = module.training
        module.eval()
        meter = Meter()
        mine = self.eval_items[self.rank::self.world]
        size = max(1, self.micro)
        for i in range(0, len(mine), size):
            _, values = batch_loss(module, self.ref, self._batch(mine[i:i + size]),
                                   self.cfg, "eval")
            meter.add(values)
        module.train(was_training)
        metrics = meter.means("eval")
        if self.task is not None and self.eval_prompts and self.rank == 0:
            s = sample_eval(module, self.ref, self.tok, self.task, self.eval_prompts, self.cfg,
                            seed=self.cfg["seed"] + 4242)
            metrics.update({"task_reward/eval": s["reward"], "sample_kl/eval": s["seq_kl"],
                            "sample_logratio/eval": s["logratio"],
                            "sample_tokens/eval": s["response_tokens"]})
        return metrics

    def _log_eval(self, m):
        parts = [f"loss {m['loss/eval']:.4f}"]
        if "rewards_eval/accuracies" in m:
            parts += [f"acc {m['rewards_eval/accuracies']:.3f}",
                      f"margin {m['rewards_eval/margins']:.3f}",
                      f"KL chosen {m['kl_eval/chosen']:.3f} rejected {m['kl_eval/rejected']:.3f}"]
        if "task_reward/eval" in m:
            parts.append(f"task reward {m['task_reward/eval']:.3f} "
                         f"(sample seq-KL {m['sample_kl/eval']:.3f})")
        log(f"[{self.name}] eval @ step {self.step}: " + " | ".join(parts))

    def _write(self, record):
        if self.rank == 0:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- training
    def run(self) -> dict:
        cfg, steps = self.cfg, self.cfg["steps"]
        os.makedirs(self.dir, exist_ok=True)
        resumed = self.maybe_resume()
        if not resumed and self.eval_items:
            self.last_eval = self.first_eval = self.evaluate()
            self._write({"step": 0, "examples": 0} | self.last_eval)
            self._log_eval(self.last_eval)
        bar = None
        if self.rank == 0:
            try:
                from tqdm import tqdm
                bar = tqdm(total=steps, initial=self.step, desc=self.name, dynamic_ncols=True)
            except ImportError:
                pass
        t0, record = time.time(), {}
        self.policy.train()
        while self.step < steps:
            global_idx = self.stream.take(self.step * cfg["batch_size"], cfg["batch_size"])
            mine = D.shard(global_idx, self.rank, self.world)
            meter = Meter()
            for j in range(cfg["grad_accum"]):
                items = [self.train_items[i] for i in mine[j * self.micro:(j + 1) * self.micro]]
                sync = j == cfg["grad_accum"] - 1 or self.world == 1
                ctx = self.policy.no_sync() if not sync else contextlib.nullcontext()
                with ctx:
                    loss, values = batch_loss(self.policy, self.ref, self._batch(items), cfg,
                                              "train")
                    if cfg.get("debug_nan_at_step") == self.step + 1:
                        loss = loss * float("nan")
                        values["loss"] = values["loss"] * float("nan")
                    (loss / cfg["grad_accum"]).backward()
                meter.add(values)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(),
                                                       cfg["max_grad_norm"])
            metrics = meter.means("train")
            bad = all_sum(torch.tensor(0.0 if math.isfinite(metrics["loss/train"]) and
                                       math.isfinite(float(grad_norm)) else 1.0))
            if bad.item() > 0:
                self._diverged(metrics["loss/train"], float(grad_norm), bar)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            record = {"step": self.step, "examples": self.step * cfg["batch_size"],
                      "epoch": self.step * cfg["batch_size"] / len(self.train_items),
                      "lr": self.sched.get_last_lr()[0], "grad_norm": float(grad_norm),
                      **metrics, "time_s": time.time() - t0}
            if bar is not None:
                bar.update(1)
                post = {"loss": f"{metrics['loss/train']:.4f}"}
                if "rewards_train/accuracies" in metrics:
                    post["acc"] = f"{metrics['rewards_train/accuracies']:.2f}"
                bar.set_postfix(post)
            elif self.rank == 0 and (self.step % 10 == 0 or self.step == steps):
                log(f"[{self.name}] step {self.step}/{steps} loss {metrics['loss/train']:.4f}")
            if self.eval_items and (self.step % cfg["eval_every"] == 0 or self.step == steps):
                self.last_eval = self.evaluate()
                record.update(self.last_eval)
                self._log_eval(self.last_eval)
            self._write(record)
            if self.step % cfg["save_every"] == 0 or self.step == steps:
                self.save()
            if cfg.get("stop_after_steps") and self.step >= cfg["stop_after_steps"] \
                    and self.step < steps:
                log(f"[{self.name}] --stop-after-steps {self.step}: exiting as if killed")
                sys.stdout.flush()
                os._exit(3)
        if bar is not None:
            bar.close()
        return {"steps": self.step, "last_train": record,
                "eval": self.last_eval, "first_eval": self.first_eval}

    def _diverged(self, loss, grad_norm, bar):
        if bar is not None:
            bar.close()
        saved = os.path.join(self.ckpt, "state.pt")
        where = (f"the last good checkpoint, {self.ckpt} (step "
                 f"{torch.load(saved, weights_only=False)['step']}), is kept"
                 if os.path.isfile(saved) else "no checkpoint had been saved yet")
        raise TrainingDiverged(
            f"[{self.name}] non-finite {'loss' if not math.isfinite(loss) else 'gradient'} "
            f"at step {self.step + 1} (loss {loss}, grad norm {grad_norm}): stopping; {where}. "
            f"Try a lower --lr or --beta, or --dtype float32.")


# ---------------------------------------------------------------------------------------
# The run: (SFT stage, pairs) -> preference stage -> summary

def prepare_task_data(cfg, task, rank, world, device, summary):
    """The task pipeline's first stages, when a task is trained without --data: (1) SFT of
    the model on the task's corpus, (2) preference pairs sampled from it and ranked by the
    task reward. Each is skipped when its output exists (so --resume continues).
    Returns (starting policy, train pairs path, eval pairs path)."""
    out, dtype = cfg["out"], getattr(torch, cfg["dtype"])
    policy_spec, train_path, eval_path = cfg["model"], cfg["data"], cfg["eval_data"]
    if task is not None and not cfg["data"]:
        # Stage 1: supervised fine-tuning on the task's corpus (the paper's SFT model).
        sft_final = os.path.join(out, "sft", "final")
        if hasattr(task, "sft_texts"):
            if not os.path.isdir(sft_final):
                model, tok = M.load_model(cfg["model"], dtype=dtype, device=device,
                                          seed=cfg["seed"], chat_template=cfg["chat_template"])
                texts = task.sft_texts()
                n_eval = min(256, len(texts) // 10)
                items = [D.tokenize_sft_text(t, tok, cfg["max_length"]) for t in texts]
                sft_cfg = cfg | {"loss": "sft", "lr": cfg["sft_lr"], "steps": cfg["sft_steps"],
                                 "batch_size": cfg["sft_batch_size"], "grad_accum": 1,
                                 "eval_every": cfg["sft_steps"], "save_every": cfg["sft_steps"],
                                 "stop_after_steps": None, "debug_nan_at_step": None}
                stage = Stage("sft", os.path.join(out, "sft"), sft_cfg, model, None, tok,
                              items[n_eval:], items[:n_eval], rank, world, device)
                summary["sft"] = stage.run()["eval"]
                if rank == 0:
                    M.save_model(model, tok, sft_final)
                    with open(os.path.join(out, "sft", "summary.json"), "w") as f:
                        json.dump(summary["sft"], f, indent=1)
                barrier()
            elif os.path.isfile(os.path.join(out, "sft", "summary.json")):
                with open(os.path.join(out, "sft", "summary.json")) as f:
                    summary["sft"] = json.load(f)
            policy_spec = sft_final
        # Stage 2: preference pairs sampled from the SFT model, ranked by the reward.
        train_path = os.path.join(out, "pairs_train.jsonl")
        eval_path = os.path.join(out, "pairs_eval.jsonl")
        stats_path = os.path.join(out, "pairs_stats.json")
        if not os.path.isfile(stats_path):
            if rank == 0:
                model, tok = M.load_model(policy_spec, dtype=dtype, device=device,
                                          chat_template=cfg["chat_template"])
                stats = {"train": make_pairs(model, tok, task, "train", cfg["pair_prompts"],
                                             cfg, train_path),
                         "eval": make_pairs(model, tok, task, "eval", cfg["eval_data_size"],
                                            cfg, eval_path)}
                with open(stats_path, "w") as f:
                    json.dump(stats, f, indent=1)
                del model
            barrier()
        with open(stats_path) as f:
            summary["pairs"] = json.load(f)

    return policy_spec, train_path, eval_path


def run(cfg: dict) -> dict:
    rank, world, device = setup_distributed(cfg["device"], cfg.get("threads"))
    out = cfg["out"]
    dtype = getattr(torch, cfg["dtype"])
    task = get_task(cfg["task"]) if cfg["task"] != "none" else None
    t_start = time.time()
    seed_all(cfg["seed"])
    summary: dict = {"task": cfg["task"], "loss": cfg["loss"], "model": cfg["model"]}

    policy_spec, train_path, eval_path = prepare_task_data(cfg, task, rank, world, device,
                                                           summary)

    # Stage 3: preference training (or SFT on --data's chosen responses).
    policy, tok = M.load_model(policy_spec, dtype=dtype, device=device, seed=cfg["seed"],
                               chat_template=cfg["chat_template"])
    if cfg["loss"] == "sft":
        ref = None
    elif cfg["ref_model"]:
        ref = M.frozen_copy(M.load_model(cfg["ref_model"], dtype=dtype, device=device,
                                         chat_template=cfg["chat_template"])[0])
    else:
        ref = M.frozen_copy(policy)
    check_fused_linear(cfg, policy, ref, world)
    if isinstance(policy, M.TinyGPT) and cfg["max_length"] > policy.config.max_len:
        log(f"--max-length {cfg['max_length']} -> {policy.config.max_len}, the tiny model's "
            f"context")
        cfg = cfg | {"max_length": policy.config.max_len,
                     "max_prompt_length": min(cfg["max_prompt_length"],
                                              policy.config.max_len // 2)}
    train_rows = D.load_jsonl(train_path)
    if eval_path:
        eval_rows = D.load_jsonl(eval_path)[:cfg["eval_data_size"]]
    else:
        n_eval = min(cfg["eval_data_size"], len(train_rows) // 10)
        train_rows, eval_rows = train_rows[:len(train_rows) - n_eval], \
            train_rows[len(train_rows) - n_eval:]
        log(f"no --eval-data: holding out the last {n_eval} of {len(train_rows) + n_eval} "
            f"pairs of {train_path} for evaluation")

    def tok_rows(rows):
        return [D.tokenize_pair(r["prompt"], r["chosen"], r["rejected"], tok,
                                max_length=cfg["max_length"],
                                max_prompt_length=cfg["max_prompt_length"],
                                truncation_mode=cfg["truncation_mode"], source=r["source"])
                for r in rows]

    train_items, eval_items = tok_rows(train_rows), tok_rows(eval_rows)
    steps = cfg["steps"] or math.ceil(cfg["epochs"] * len(train_items) / cfg["batch_size"])
    pcfg = cfg | {"steps": steps}
    eval_prompts = task.prompts("eval", cfg["eval_prompts"]) if task is not None else None
    stage = Stage(cfg["loss"], out, pcfg, policy, ref, tok, train_items, eval_items, rank,
                  world, device, task=task if ref is not None else None,
                  eval_prompts=eval_prompts)
    log(f"[{cfg['loss']}] {len(train_items)} train / {len(eval_items)} eval pairs, {steps} "
        f"steps of {cfg['batch_size']} pairs, {world} process(es) on {device}, "
        f"loss impl {cfg['loss_impl']}")
    result = stage.run()
    if rank == 0:
        M.save_model(policy, tok, os.path.join(out, "final"))
    barrier()

    summary.update({"steps": result["steps"], "eval": result["eval"],
                    "train": {k: v for k, v in result["last_train"].items()
                              if k.startswith(("loss/", "rewards_", "kl_", "logps_"))},
                    "final_checkpoint": os.path.join(out, "final"),
                    "runtime_s": round(time.time() - t_start, 1), "world_size": world})
    first, last = result["first_eval"], result["eval"]
    if "task_reward/eval" in last:
        summary["task_reward"] = {"before": first.get("task_reward/eval"),
                                  "after": last["task_reward/eval"]}
        summary["sample_kl"] = {"before": first.get("sample_kl/eval"),
                                "after": last["sample_kl/eval"]}
        summary["sample_logratio"] = {"before": first.get("sample_logratio/eval"),
                                      "after": last["sample_logratio/eval"]}
    if rank == 0:
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        if cfg["plots"]:
            try:
                from .plots import plot_run
                plot_run(out)
            except ImportError as e:
                log(f"plots skipped ({e}); pip install matplotlib")
    return summary


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.resume:
        with open(os.path.join(args.resume, "config.json")) as f:
            cfg = json.load(f)
        for k, v in vars(args).items():
            if v is not None and k not in ("resume", "out") and cfg.get(k) != v:
                if k not in DEBUG_KEYS:
                    print(f"tdpo-train: --resume: overriding {k}={cfg.get(k)!r} with {v!r}")
                cfg[k] = v
        cfg["out"] = args.resume
    else:
        cfg = resolve(args)
    rank, world, _ = setup_distributed(cfg["device"], cfg.get("threads"))
    if not args.resume:
        if cfg["out"] is None:
            stamp = [time.strftime("runs/%Y%m%d-%H%M%S")]
            if dist.is_initialized():
                dist.broadcast_object_list(stamp, src=0)
            cfg["out"] = stamp[0]
        if os.path.isdir(cfg["out"]) and os.listdir(cfg["out"]):
            raise SystemExit(f"tdpo-train: {cfg['out']} exists and is not empty; give another "
                             f"--out, or --resume {cfg['out']}")
        barrier()
        if rank == 0:
            os.makedirs(cfg["out"], exist_ok=True)
            saved = {k: v for k, v in cfg.items() if k not in DEBUG_KEYS}
            saved |= {"argv": sys.argv if argv is None else ["tdpo-train", *argv],
                      "torch": torch.__version__, "world_size": world}
            with open(os.path.join(cfg["out"], "config.json"), "w") as f:
                json.dump(saved, f, indent=1)
    log(f"tdpo-train: task {cfg['task']}, loss {cfg['loss']} (beta {cfg['beta']}, alpha "
        f"{cfg['alpha']}), model {cfg['model']}, out {cfg['out']}")
    try:
        summary = run(cfg)
    except (TrainingDiverged, D.DataError) as e:
        print(f"tdpo-train: error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank != 0:
        return 0
    if "task_reward" in summary:
        log(f"task reward of policy samples: {summary['task_reward']['before']:.3f} before -> "
            f"{summary['task_reward']['after']:.3f} after (sequential KL from the reference "
            f"{summary['sample_kl']['after']:.3f})")
    log(f"done in {summary['runtime_s']:.0f} s: {cfg['out']}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
