"""tdpo-train: TDPO1 / TDPO2 / DPO (or SFT) fine-tuning of a causal LM on preference pairs,
the loss computed by tdpo_ext's fused ops (or, with --loss-impl reference, by the reference
code's pattern).

With no arguments it runs the embedded default end to end (task "sentiment", see
tasks.py): supervised fine-tuning of the tiny built-in GPT on a review corpus, preference
pairs made by sampling two completions per prompt and ranking them by VADER sentiment,
then TDPO2, with the task reward of policy samples before and after. With --data
FILE.jsonl it trains on your pairs. The same command under `torchrun --nproc_per_node=N`
trains with DistributedDataParallel, or with --parallel fsdp sharded by FSDP2.

Outputs in --out (default runs/<timestamp>): config.json, metrics.jsonl, summary.json,
final/ (the policy), checkpoint.pt (the latest full training state, for --resume; the
folder checkpoint/ when sharded), plots.
"""
from __future__ import annotations

import gc
import os
import sys
import time

import torch
import torch.distributed as dist

from . import config, parallel
from .data import DataError
from .files import write_json
from .loop import TrainingDiverged
from .pipeline import report, train
from .processes import barrier, log, setup_distributed


def new_run_folder(cfg, procs, argv) -> config.Config:
    """The new run's --out (a fresh timestamped folder by default), with its config.json."""
    if cfg.out is None:
        stamp = [time.strftime("runs/%Y%m%d-%H%M%S")]
        if dist.is_initialized():
            dist.broadcast_object_list(stamp, src=0)
        cfg = cfg.replace(out=stamp[0])
    if os.path.isdir(cfg.out) and os.listdir(cfg.out):
        raise SystemExit(f"tdpo-train: {cfg.out} exists and is not empty; give another "
                         f"--out, or --resume {cfg.out}")
    barrier()
    if procs.rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        write_json(os.path.join(cfg.out, "config.json"), cfg.to_json() | {
            "argv": sys.argv if argv is None else ["tdpo-train", *argv],
            "torch": torch.__version__, "world_size": procs.world})
    return cfg


def main(argv=None) -> int:
    cfg, resuming = config.from_command_line(argv)
    procs = setup_distributed(cfg.device, cfg.threads)
    parallel.check(cfg, procs)
    if not resuming:
        cfg = new_run_folder(cfg, procs, argv)
    log(f"tdpo-train: task {cfg.task}, loss {cfg.loss} (beta {cfg.beta}, alpha "
        f"{cfg.alpha}), model {cfg.model}, out {cfg.out}")
    try:
        summary = train(cfg, procs)
    except (TrainingDiverged, DataError) as e:
        print(f"tdpo-train: error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            # FSDP2's modules sit in reference cycles that hold their last gloo work
            # objects: freed only at interpreter shutdown, those abort the process
            # ("terminate called without an active exception"). Free them now, while the
            # interpreter and the process group are alive.
            gc.collect()
            dist.destroy_process_group()
    if procs.rank == 0:
        report(summary, cfg.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
