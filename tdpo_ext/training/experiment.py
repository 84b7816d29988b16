"""tdpo-experiment frontier: the TDPO paper's reward/KL frontier on the embedded task.

One SFT model and one set of preference pairs (the embedded "sentiment" task), then DPO,
TDPO1 and TDPO2 (alpha 0.1, 0.5, 1.0) trained from it across beta values and seeds, each
run until its sample KL passes --stop-sample-kl (or --steps), evaluated every
--eval-every steps on the task reward of policy samples, the sequential KL
sum_t KL(pi_ref || pi_theta) on those samples, and the KL of the eval pairs' chosen and
rejected responses, and the diversity of the samples (their policy entropy per token,
distinct-1/2). Writes, in --docs: frontier.md (command, settings, method, tables with
bootstrap intervals, verdicts against DPO), frontier.png (paths, and the best reward
within a KL budget), frontier_diversity.png (reward against sample entropy: paths, and
the most entropy kept at each reward level), frontier_kl.png (the rejected-minus-chosen
KL gap) and frontier_points.json (every evaluation of every run, as seed-level means).
The statistics are frontier_stats', the report frontier_report's.

    tdpo-experiment frontier --docs docs        # the committed results (see docs/frontier.md)
    tdpo-experiment frontier --quick --out /tmp/f --docs /tmp/f   # a smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed

from .files import read_rows

METHODS = {"DPO": ("dpo", 0.5), "TDPO1": ("tdpo1", 0.5), "TDPO2 a=0.1": ("tdpo2", 0.1),
           "TDPO2 a=0.5": ("tdpo2", 0.5), "TDPO2 a=1.0": ("tdpo2", 1.0)}
BUDGETS = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0)  # nats of sample KL, the report's columns
# Task reward (VADER compound, at most REWARD_TOP): the diversity report's columns.
REWARD_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
REWARD_TOP = 1.0


def slug(method, beta, seed):
    return f"{METHODS[method][0]}_a{METHODS[method][1]}_b{beta}_s{seed}"


def prepare_base(out, args):
    """SFT model + pairs, once (each is skipped when done), with the embedded task's
    settings."""
    from .config import resolve
    from .pipeline import prepare_task_data
    from .processes import seed_all
    from .tasks import get_task
    given = {"out": out, "seed": 0}
    if args.quick:
        given |= {"sft_steps": 4, "pair_prompts": 32, "eval_data_size": 8}
    cfg = resolve(given)
    os.makedirs(out, exist_ok=True)
    seed_all(cfg.seed)
    prepare_task_data(cfg, get_task("sentiment"))


def run_one(base, out, method, beta, seed, args):
    """Trains one run (resuming it if it was cut short); its seconds, None if it was done."""
    folder = os.path.join(out, "runs", slug(method, beta, seed))
    if os.path.isfile(os.path.join(folder, "summary.json")):
        return None
    loss, alpha = METHODS[method]
    cmd = [sys.executable, "-m", "tdpo_ext.training.train", "--task", "sentiment",
           "--model", os.path.join(base, "sft", "final"),
           "--data", os.path.join(base, "pairs_train.jsonl"),
           "--eval-data", os.path.join(base, "pairs_eval.jsonl"),
           "--loss", loss, "--beta", str(beta), "--alpha", str(alpha), "--seed", str(seed),
           "--steps", str(args.steps), "--eval-every", str(args.eval_every),
           "--lr", str(args.lr), "--eval-prompts", str(args.eval_prompts), "--no-plots"]
    if args.stop_sample_kl is not None:
        cmd += ["--stop-sample-kl", str(args.stop_sample_kl)]
    if os.path.isfile(os.path.join(folder, "checkpoint.pt")):
        cmd = [sys.executable, "-m", "tdpo_ext.training.train", "--resume", folder]
    else:
        shutil.rmtree(folder, ignore_errors=True)
        cmd += ["--out", folder]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    t0 = time.time()
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with open(folder + ".log", "w") as logf:
        rc = subprocess.run(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"run {slug(method, beta, seed)} failed ({rc}), see {folder}.log")
    return time.time() - t0


def collect(out, methods, betas, seeds):
    """Per (method, beta): a Trajectory over seeds; and the seed-level points (one per run
    and evaluation) for frontier_points.json."""
    from . import frontier_stats as S
    trajectories, points = {}, []
    for m in methods:
        for b in betas:
            per_seed, evals = [], []
            for s in seeds:
                folder = os.path.join(out, "runs", slug(m, b, s))
                rows = read_rows(os.path.join(folder, "eval_examples.jsonl"))
                if "sample_entropy/eval" not in rows[0]:
                    raise SystemExit(f"{folder} has no sample entropies: it was trained by a "
                                     "tdpo-train that did not record them; use a new --out")
                per_seed.append(rows)
                evals.append([r for r in read_rows(os.path.join(folder, "metrics.jsonl"))
                              if "task_reward/eval" in r])
                points += [{"method": m, "beta": b, "seed": s, "step": r["step"],
                            "reward": r["task_reward/eval"], "sample_kl": r["sample_kl/eval"],
                            "sample_entropy": r["sample_entropy/eval"],
                            "distinct_1": r["distinct_1/eval"],
                            "distinct_2": r["distinct_2/eval"],
                            "kl_chosen": r["kl_eval/chosen"],
                            "kl_rejected": r["kl_eval/rejected"],
                            "accuracy": r["rewards_eval/accuracies"]} for r in evals[-1]]
            trajectories[m, b] = S.trajectory(per_seed, evals)
    return trajectories, points


def report(out, methods, betas, seeds, args, docs, runtime_s, command):
    from . import frontier_report as F
    from . import frontier_stats as S
    trajectories, points = collect(out, methods, betas, seeds)
    with open(os.path.join(docs, "frontier_points.json"), "w") as f:
        json.dump([{k: round(v, 5) if isinstance(v, float) else v for k, v in p.items()}
                   for p in points], f, indent=0)
    some = next(iter(trajectories.values()))
    draws = S.draw(len(seeds), some.reward.shape[2], some.kl_chosen.shape[2], args.draws)
    limit = args.stop_sample_kl
    budgets = [b for b in BUDGETS if limit is None or b < limit]
    grid = S.grid_to(budgets[-1])
    levels = S.levels_from(REWARD_TOP, REWARD_LEVELS[0])
    with warnings.catch_warnings():  # all-NaN slices (budgets or levels never reached)
        warnings.simplefilter("ignore", RuntimeWarning)
        stats = {m: S.method_stats({b: trajectories[m, b] for b in betas}, draws, grid,
                                   levels) for m in methods}
    F.write(stats, grid, budgets, levels, REWARD_LEVELS, betas, seeds, args, docs,
            runtime_s, command)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tdpo-experiment", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("frontier", help="DPO vs TDPO1 vs TDPO2 reward/KL frontier")
    f.add_argument("--out", default="runs/frontier", help="where the runs go")
    f.add_argument("--docs", help="write frontier.md and the plots here (default: --out)")
    f.add_argument("--betas", default="0.01,0.1,1.0")
    f.add_argument("--seeds", default="0,1,2,3")
    f.add_argument("--methods", default=",".join(METHODS))
    f.add_argument("--steps", type=int, default=2000, help="steps of a run at most")
    f.add_argument("--stop-sample-kl", type=float, default=6.0,
                   help="a run ends after an evaluation whose sample KL exceeds this (nats)")
    f.add_argument("--eval-every", type=int, default=20)
    f.add_argument("--eval-prompts", type=int, default=256)
    f.add_argument("--lr", type=float, default=3e-4)
    f.add_argument("--jobs", type=int, default=2, help="runs at once")
    f.add_argument("--draws", type=int, default=1000, help="bootstrap replicates")
    f.add_argument("--threads", type=int, default=1, help="torch threads per run")
    f.add_argument("--quick", action="store_true", help="tiny settings, for a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.eval_prompts, args.stop_sample_kl = 2, 1, 8, None
    betas = [float(b) for b in args.betas.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; expected some of {list(METHODS)}")
    docs = args.docs or args.out
    import torch
    torch.set_num_threads(args.threads)
    os.makedirs(docs, exist_ok=True)
    t0 = time.time()
    base = os.path.join(args.out, "base")
    print(f"frontier: base SFT model and pairs in {base}", flush=True)
    prepare_base(base, args)
    # The likely longest runs first (the most KL-constrained methods, the largest beta),
    # so that the two workers finish together.
    jobs = [(m, b, s) for m in reversed(methods) for b in sorted(betas, reverse=True)
            for s in seeds]
    print(f"frontier: {len(jobs)} runs, {args.jobs} at a time (a finished run is kept, a cut "
          "one resumed)", flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        running = {pool.submit(run_one, base, args.out, *j, args): j for j in jobs}
        for done, future in enumerate(as_completed(running), 1):
            took = future.result()
            if took is not None:
                print(f"  [{done}/{len(jobs)}] {slug(*running[future])}: ok in {took:.0f} s "
                      f"({(time.time() - t0) / 60:.0f} min so far)", flush=True)
    command = "tdpo-experiment " + " ".join(sys.argv[1:] if argv is None else argv)
    timing = os.path.join(args.out, "runtime.json")
    if os.path.isfile(timing) and time.time() - t0 < 120:  # only re-reported: keep the first
        with open(timing) as f:
            wall = json.load(f)["wall_s"]
    else:
        wall = time.time() - t0
        with open(timing, "w") as f:
            json.dump({"wall_s": wall}, f)
    report(args.out, methods, betas, seeds, args, docs, wall, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
