"""The training loop of one stage (SFT, or preference training): optimizer steps over a
resumable stream of examples, split over processes (DDP or FSDP2: parallel.py) and
micro-batches, with evaluation, a metrics row per step, checkpoints, and a stop at the
first non-finite loss or gradient."""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time

import torch

from . import checkpoint, hooks, parallel, safe_load
from . import data as D
from .files import MetricsLog
from .losses import Meter, batch_loss, fused_heads
from .processes import Processes, all_sum, gather, log, seed_all
from .sampling import sample_eval


class TrainingDiverged(RuntimeError):
    pass


def num(x: float, digits: int = 3) -> str:
    """x to `digits` decimals; a value that rounds to zero prints as 0, never -0."""
    return f"{round(x, digits) + 0.0:.{digits}f}"


def interleave(shares: list[list]) -> list:
    """The eval examples in their order, from each process's share (rank r holds r::world)."""
    out = [None] * sum(len(s) for s in shares)
    for rank, share in enumerate(shares):
        out[rank::len(shares)] = share
    return out


def progress_bar(name: str, total: int, initial: int):
    """A tqdm bar on a terminal; None when output goes to a file or pipe, where a bar's
    redraws would flood the log (the loop then logs a line every tenth of the stage)."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=name, dynamic_ncols=True)


class Stage:
    """Trains `policy` for cfg.steps optimizer steps on `train_items`, evaluating on
    `eval_items` (and, with a task, on the reward of samples for `eval_prompts`), logging to
    <folder>/metrics.jsonl and checkpointing to <folder>/checkpoint.pt (sharded: the
    folder <folder>/checkpoint)."""

    def __init__(self, name, folder, cfg, policy, ref, tok, train_items, eval_items,
                 procs: Processes, task=None, eval_prompts=None):
        self.name, self.dir, self.cfg, self.procs = name, folder, cfg, procs
        self.tok, self.ref, self.task, self.eval_prompts = tok, ref, task, eval_prompts
        self.train_items, self.eval_items = train_items, eval_items
        b, ga, world = cfg.batch_size, cfg.grad_accum, procs.world
        if b % (world * ga):
            raise SystemExit(f"tdpo-train: --batch-size {b} must be divisible by processes "
                             f"({world}) x --grad-accum ({ga})")
        self.micro = b // (world * ga)
        if eval_items and len(eval_items) < world:
            raise SystemExit(f"tdpo-train: {len(eval_items)} eval examples for {world} processes")
        self.heads = fused_heads(cfg, policy, ref)
        self.module = policy
        self.sharded = parallel.is_sharded(cfg, procs)
        self.policy = parallel.wrap(policy, ref, cfg, procs)
        self.opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr,
                                     weight_decay=cfg.weight_decay)
        # Mixed precision: the parameters and AdamW's state stay float32 (the masters); the
        # forward passes run under autocast in --dtype (sharded: FSDP2 casts the gathered
        # parameters instead, parallel.shard), and float16's narrow range needs its loss
        # scaled (a disabled scaler passes everything through).
        device_type = procs.device.type
        self.compute = (torch.autocast(device_type, dtype=getattr(torch, cfg.dtype))
                        if cfg.dtype != "float32" and not self.sharded
                        else contextlib.nullcontext())
        self.scaler = torch.amp.GradScaler(device_type, enabled=cfg.dtype == "float16")
        warm = cfg.warmup_steps
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / (warm + 1)))
        self.stream = D.ExampleStream(len(train_items), cfg.seed)
        self.step, self.saved_step, self.bar = 0, None, None
        self.first_eval, self.last_eval, self.last_train = {}, {}, {}
        self.chosen_only = cfg.loss == "sft"
        self.ckpt = os.path.join(folder, checkpoint.FOLDER if self.sharded
                                 else checkpoint.FILE)
        self.metrics = MetricsLog(os.path.join(folder, "metrics.jsonl"), procs.rank)
        # Each evaluation's per-example values (whose means metrics.jsonl holds, under the
        # same names): what confidence intervals over examples need.
        self.examples = MetricsLog(os.path.join(folder, "eval_examples.jsonl"), procs.rank)

    def _batch(self, items):
        b = D.collate(items, self.tok.pad_token_id, self.chosen_only)
        return {k: v.to(self.procs.device) for k, v in b.items()}

    def _loss(self, model, items, split):
        with self.compute:
            return batch_loss(model, self.ref, self._batch(items), self.cfg, split,
                              self.heads)

    # -- checkpoints
    def save(self):
        state = {"step": self.step, "scheduler": self.sched.state_dict(),
                 "scaler": self.scaler.state_dict(), "first_eval": self.first_eval,
                 "last_eval": self.last_eval, "last_train": self.last_train}
        if self.sharded:
            checkpoint.save_sharded(self.ckpt, self.module, self.opt, state, self.procs)
        else:
            checkpoint.save(self.ckpt, state | {"model": self.module.state_dict(),
                                                "optimizer": self.opt.state_dict()},
                            self.procs)
        self.saved_step = self.step

    def resume(self) -> bool:
        """Continues from the checkpoint if there is one; the metrics log keeps exactly the
        rows up to the step the stage continues from."""
        checkpoint.refuse_other_form(self.dir, self.sharded)
        shape = checkpoint.state_shape(self.sched, self.scaler,
                                       None if self.sharded else self.opt)
        if self.sharded:  # the model's and optimizer's shards loaded in place
            state = checkpoint.load_sharded(self.ckpt, self.module, self.opt, self.procs,
                                            shape)
        else:
            state = checkpoint.load(self.ckpt, self.procs, shape)
        if state is not None:
            self._apply(state)
        # Cut last: a checkpoint refused above leaves the logs as they were.
        self.metrics.cut_to(None if state is None else state["step"])
        self.examples.cut_to(None if state is None else state["step"])
        if state is None:
            return False
        self.step = self.saved_step = state["step"]
        self.first_eval, self.last_eval = state["first_eval"], state["last_eval"]
        self.last_train = state["last_train"]
        log(f"[{self.name}] resumed from {self.ckpt} at step {self.step}")
        return True

    def _apply(self, state: dict) -> None:
        """The checkpoint's model, optimizer, scheduler and scaler state loaded into this
        stage's; one that does not fit them (other names or shapes) is refused."""
        try:
            if not self.sharded:
                checkpoint.check_optimizer_state(self.opt, state["optimizer"], self.ckpt)
                self.module.load_state_dict(state["model"])
                self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            raise safe_load.refusal(self.ckpt, "it does not fit this run's model and "
                                    f"optimizer ({str(e).strip().splitlines()[0]})") from None

    # -- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        module, rank = self.module, self.procs.rank
        was_training = module.training
        module.eval()
        meter, per_pair = Meter(), {}
        mine = self.eval_items[rank::self.procs.world]
        size = max(1, self.micro)
        # A sharded forward gathers parameters from every process: all of them must take
        # as many forward passes, so a process whose share is shorter repeats a batch whose
        # metrics it drops.
        most = -(-len(self.eval_items) // self.procs.world) if self.sharded else len(mine)
        for i in range(0, most, size):
            values = self._loss(module, mine[i:i + size] or mine[:size], "eval")[1]
            if mine[i:i + size]:
                meter.add(values)
                for k in ("kl_eval/chosen", "kl_eval/rejected") & values.keys():
                    per_pair.setdefault(k, []).extend(values[k].tolist())
        module.train(was_training)
        metrics = meter.means("eval")
        examples = {k: interleave([p[k] for p in gather(per_pair)]) for k in per_pair}
        # Sampling runs on rank 0 alone, except with sharded models, whose every forward
        # needs all processes: they then all sample the same prompts in lockstep.
        if self.task is not None and self.eval_prompts and (rank == 0 or self.sharded):
            with self.compute:
                s = sample_eval(module, self.ref, self.tok, self.task, self.eval_prompts,
                                self.cfg, seed=self.cfg.seed + 4242, synced=self.sharded)
            metrics.update({"task_reward/eval": s["reward"], "sample_kl/eval": s["seq_kl"],
                            "sample_logratio/eval": s["logratio"],
                            "sample_tokens/eval": s["response_tokens"],
                            "sample_entropy/eval": s["sample_entropy"],
                            "distinct_1/eval": s["distinct_1"],
                            "distinct_2/eval": s["distinct_2"]})
            examples.update({"task_reward/eval": s["rewards"], "sample_kl/eval": s["seq_kls"],
                             "sample_entropy/eval": s["sample_entropies"]})
        if examples:
            self.examples.append({"step": self.step} | examples)
        return metrics

    def _log_eval(self, m):
        parts = [f"loss {num(m['loss/eval'], 4)}"]
        if "rewards_eval/accuracies" in m:
            parts += [f"acc {num(m['rewards_eval/accuracies'])}",
                      f"margin {num(m['rewards_eval/margins'])}",
                      f"KL chosen {num(m['kl_eval/chosen'])} rejected "
                      f"{num(m['kl_eval/rejected'])}"]
        if "task_reward/eval" in m:
            parts.append(f"task reward {num(m['task_reward/eval'])} "
                         f"(sample seq-KL {num(m['sample_kl/eval'])}, entropy "
                         f"{num(m['sample_entropy/eval'])}, distinct-2 "
                         f"{num(m['distinct_2/eval'])})")
        log(f"[{self.name}] eval @ step {self.step}: " + " | ".join(parts))

    # -- training
    def _train_step(self) -> tuple[dict, float]:
        """One optimizer step: (train metrics, gradient norm before clipping)."""
        cfg, ga = self.cfg, self.cfg.grad_accum
        global_idx = self.stream.take(self.step * cfg.batch_size, cfg.batch_size)
        mine = D.shard(global_idx, self.procs.rank, self.procs.world)
        meter = Meter()
        for j in range(ga):
            items = [self.train_items[i] for i in mine[j * self.micro:(j + 1) * self.micro]]
            # Gradients are averaged over processes on the last micro-batch's backward only.
            with parallel.gradient_sync(self.policy, j == ga - 1):
                loss, values = self._loss(self.policy, items, "train")
                self.scaler.scale(loss / ga).backward()
            meter.add(values)
        self.scaler.unscale_(self.opt)
        hooks.reached("gradients", stage=self)
        grad_norm = parallel.clip_grad_norm(self.module, cfg.max_grad_norm)
        metrics = meter.means("train")
        # With float16's loss scale, an overflowing gradient is expected now and then: the
        # scaler skips that step and lowers the scale.
        finite = math.isfinite(metrics["loss/train"]) and (
            math.isfinite(grad_norm) or self.scaler.is_enabled())
        if all_sum(torch.tensor(0.0 if finite else 1.0)).item() > 0:
            self._diverged(metrics["loss/train"], grad_norm)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return metrics, grad_norm

    def run(self) -> dict:
        cfg, steps = self.cfg, self.cfg.steps
        os.makedirs(self.dir, exist_ok=True)
        if not self.resume():
            # A new stage's random state (its dropout masks) comes from the seed alone, not
            # from the stages before it in this process, which a resumed run skips.
            seed_all(cfg.seed)
            if self.eval_items:
                self.last_eval = self.first_eval = self.evaluate()
                self.metrics.append({"step": 0, "examples": 0} | self.last_eval)
                self._log_eval(self.last_eval)
        self.bar = progress_bar(self.name, steps, self.step) if self.procs.rank == 0 else None
        t0 = time.time()
        self.policy.train()
        stop = self._past_kl_limit()
        while self.step < steps and not stop:
            metrics, grad_norm = self._train_step()
            self.step += 1
            record = {"step": self.step, "examples": self.step * cfg.batch_size,
                      "epoch": self.step * cfg.batch_size / len(self.train_items),
                      "lr": self.sched.get_last_lr()[0], "grad_norm": grad_norm,
                      **metrics, "time_s": time.time() - t0}
            self._show_progress(metrics)
            if self.eval_items and (self.step % cfg.eval_every == 0 or self.step == steps):
                self.last_eval = self.evaluate()
                record.update(self.last_eval)
                self._log_eval(self.last_eval)
                stop = self._past_kl_limit()
            self.last_train = record
            self.metrics.append(record)
            if self.step % cfg.save_every == 0 or self.step == steps or stop:
                self.save()
            hooks.reached("step", stage=self)
        if self.bar is not None:
            self.bar.close()
        hooks.reached("stage_done", stage=self)
        return {"steps": self.step, "last_train": self.last_train,
                "eval": self.last_eval, "first_eval": self.first_eval}

    def _past_kl_limit(self) -> bool:
        """--stop-sample-kl: the last evaluation's sample KL is beyond it (also when a
        resumed run had stopped there)."""
        limit, kl = self.cfg.stop_sample_kl, self.last_eval.get("sample_kl/eval")
        if limit is None or kl is None or kl <= limit:
            return False
        log(f"[{self.name}] sample KL {num(kl)} > --stop-sample-kl {limit} at step "
            f"{self.step}: training ends here")
        return True

    def _show_progress(self, metrics):
        if self.bar is not None:
            self.bar.update(1)
            post = {"loss": f"{metrics['loss/train']:.4f}"}
            if "rewards_train/accuracies" in metrics:
                post["acc"] = f"{metrics['rewards_train/accuracies']:.2f}"
            self.bar.set_postfix(post)
        elif self.procs.rank == 0 and (self.step % max(1, self.cfg.steps // 10) == 0
                                       or self.step == self.cfg.steps):
            log(f"[{self.name}] step {self.step}/{self.cfg.steps} loss "
                f"{num(metrics['loss/train'], 4)}")

    def _diverged(self, loss, grad_norm):
        if self.bar is not None:
            self.bar.close()
        where = (f"the last good checkpoint, {self.ckpt} (step {self.saved_step}), is kept"
                 if self.saved_step is not None else "no checkpoint had been saved yet")
        raise TrainingDiverged(
            f"[{self.name}] non-finite {'loss' if not math.isfinite(loss) else 'gradient'} "
            f"at step {self.step + 1} (loss {loss}, grad norm {grad_norm}): stopping; {where}. "
            f"Try a lower --lr or --beta, or --dtype float32.")
