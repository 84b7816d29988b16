"""tdpo-experiment frontier: the TDPO paper's reward/KL frontier on the embedded task.

One SFT model and one set of preference pairs (the embedded "sentiment" task), then DPO,
TDPO1 and TDPO2 (alpha 0.1, 0.5, 1.0) trained from it across beta values and seeds, each
evaluated every --eval-every steps on the task reward of policy samples and the
sequential KL sum_t KL(pi_ref || pi_theta) on those samples. Writes, in --docs:
frontier.md (command, settings, tables, findings), frontier.png (reward vs KL), frontier_kl.png
(chosen / rejected KL over steps) and frontier_points.json (every evaluated point).

    tdpo-experiment frontier --docs docs        # the committed results (see docs/frontier.md)
    tdpo-experiment frontier --quick --out /tmp/f --docs /tmp/f   # a smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from .loop import num

METHODS = {"DPO": ("dpo", 0.5), "TDPO1": ("tdpo1", 0.5), "TDPO2 a=0.1": ("tdpo2", 0.1),
           "TDPO2 a=0.5": ("tdpo2", 0.5), "TDPO2 a=1.0": ("tdpo2", 1.0)}
NOISE = 0.03
NOTES_MARKER = "<!-- notes: kept when the report is regenerated -->"
COLORS = {"DPO": "tab:red", "TDPO1": "tab:orange", "TDPO2 a=0.1": "tab:cyan",
          "TDPO2 a=0.5": "tab:blue", "TDPO2 a=1.0": "tab:purple"}


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
    folder = os.path.join(out, "runs", slug(method, beta, seed))
    if os.path.isfile(os.path.join(folder, "summary.json")):
        return folder
    loss, alpha = METHODS[method]
    cmd = [sys.executable, "-m", "tdpo_ext.training.train", "--task", "sentiment",
           "--model", os.path.join(base, "sft", "final"),
           "--data", os.path.join(base, "pairs_train.jsonl"),
           "--eval-data", os.path.join(base, "pairs_eval.jsonl"),
           "--loss", loss, "--beta", str(beta), "--alpha", str(alpha), "--seed", str(seed),
           "--steps", str(args.steps), "--eval-every", str(args.eval_every),
           "--lr", str(args.lr), "--eval-prompts", str(args.eval_prompts), "--no-plots"]
    if os.path.isfile(os.path.join(folder, "checkpoint.pt")):
        cmd = [sys.executable, "-m", "tdpo_ext.training.train", "--resume", folder]
    else:
        import shutil
        shutil.rmtree(folder, ignore_errors=True)
        cmd += ["--out", folder]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    t0 = time.time()
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with open(folder + ".log", "w") as logf:
        rc = subprocess.run(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT).returncode
    print(f"  {slug(method, beta, seed)}: {'ok' if rc == 0 else f'FAILED ({rc})'} in "
          f"{time.time() - t0:.0f} s", flush=True)
    if rc != 0:
        raise RuntimeError(f"run failed, see {folder}.log")
    return folder


def collect(out, methods, betas, seeds):
    points = []
    for m in methods:
        for b in betas:
            for s in seeds:
                path = os.path.join(out, "runs", slug(m, b, s), "metrics.jsonl")
                with open(path) as f:
                    for line in f:
                        r = json.loads(line)
                        if "task_reward/eval" in r:
                            points.append({"method": m, "beta": b, "seed": s, "step": r["step"],
                                           "reward": r["task_reward/eval"],
                                           "sample_kl": r["sample_kl/eval"],
                                           "kl_chosen": r["kl_eval/chosen"],
                                           "kl_rejected": r["kl_eval/rejected"],
                                           "accuracy": r["rewards_eval/accuracies"]})
    return points


def seed_mean(points):
    """Points averaged over seeds, per (method, beta, step)."""
    groups = {}
    for p in points:
        groups.setdefault((p["method"], p["beta"], p["step"]), []).append(p)
    out = []
    for (m, b, st), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        row = {"method": m, "beta": b, "step": st, "n": len(ps)}
        for k in ("reward", "sample_kl", "kl_chosen", "kl_rejected", "accuracy"):
            row[k] = sum(p[k] for p in ps) / len(ps)
        out.append(row)
    return out


def frontier(rows):
    """Upper-left envelope: points sorted by KL, keeping each that beats all with less KL."""
    best, env = -9.0, []
    for r in sorted(rows, key=lambda r: r["sample_kl"]):
        if r["reward"] > best:
            best = r["reward"]
            env.append(r)
    return env


def best_within(rows, budget):
    ok = [r["reward"] for r in rows if r["sample_kl"] <= budget]
    return max(ok) if ok else float("nan")


def plot(means, methods, betas, docs):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    markers = ["o", "s", "^", "D", "v"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for m in methods:
        rows = [r for r in means if r["method"] == m]
        for i, b in enumerate(betas):
            rb = [r for r in rows if r["beta"] == b]
            ax.scatter([r["sample_kl"] for r in rb], [r["reward"] for r in rb], s=22,
                       color=COLORS[m], marker=markers[i % len(markers)], alpha=0.55)
        env = frontier(rows)
        ax.plot([r["sample_kl"] for r in env], [r["reward"] for r in env], "-", color=COLORS[m],
                label=m, linewidth=2)
    for i, b in enumerate(betas):
        ax.scatter([], [], color="gray", marker=markers[i % len(markers)], label=f"beta {b}")
    ax.set_xlabel("sequential KL(pi_ref || pi_theta) on policy samples (nats)")
    ax.set_ylabel("task reward (VADER compound) of policy samples")
    ax.set_title("Reward / KL frontier (embedded sentiment task; seed means)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(docs, "frontier.png"), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(2, len(betas), figsize=(4.5 * len(betas), 7), sharey="row",
                             squeeze=False)
    for row, (key, what) in enumerate((("kl_chosen", "chosen"), ("kl_rejected", "rejected"))):
        for col, b in enumerate(betas):
            ax = axes[row][col]
            for m in methods:
                rows = [r for r in means if r["method"] == m and r["beta"] == b]
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], "o-",
                        color=COLORS[m], label=m, markersize=3)
            ax.set_title(f"{what} responses, beta {b}", fontsize=10)
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel("step")
        axes[row][0].set_ylabel(f"seq. KL on eval pairs, {what} (nats)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Sequential KL(pi_ref || pi_theta) of chosen and rejected eval responses")
    fig.tight_layout()
    fig.savefig(os.path.join(docs, "frontier_kl.png"), dpi=100)
    plt.close(fig)


def report(points, methods, betas, seeds, args, docs, runtime_s, command):
    means = seed_mean(points)
    last_step = max(r["step"] for r in means)
    plot(means, methods, betas, docs)
    with open(os.path.join(docs, "frontier_points.json"), "w") as f:
        json.dump(points, f, indent=0)
    lines = ["# Reward / KL frontier on the embedded sentiment task", "",
             "Made by (on this repository's 2-core CPU machine, "
             f"{runtime_s / 60:.0f} min wall clock):", "", "```", command, "```", "",
             "Setup: the embedded default task (tdpo_ext/training/tasks.py): one SFT model and "
             f"one set of preference pairs, then each method trained {args.steps} steps "
             f"(lr {args.lr}, 32 pairs a step) from the same SFT model for each beta in "
             f"{betas} and seed in {seeds}, evaluated every {args.eval_every} steps on "
             f"{args.eval_prompts} held-out prompts: the mean VADER compound score of one policy "
             "sample per prompt (task reward) and the sequential KL "
             "sum_t KL(pi_ref(.|x,y<t) || pi_theta(.|x,y<t)) on those samples. Seeds change "
             "the data order and the sampling. Values are seed means.", "",
             "![frontier](frontier.png)", "", "![KL curves](frontier_kl.png)", "",
             f"## Final step ({last_step})", "",
             "| method | beta | task reward | sample seq. KL | eval KL chosen | "
             "eval KL rejected | rejected - chosen | pref. accuracy |",
             "|---|---|---|---|---|---|---|---|"]
    for m in methods:
        for b in betas:
            r = next(r for r in means if r["method"] == m and r["beta"] == b
                     and r["step"] == last_step)
            lines.append(f"| {m} | {b} | {num(r['reward'])} | {num(r['sample_kl'], 2)} | "
                         f"{num(r['kl_chosen'], 2)} | {num(r['kl_rejected'], 2)} | "
                         f"{num(r['kl_rejected'] - r['kl_chosen'], 2)} | "
                         f"{num(r['accuracy'])} |")
    start = next(r for r in means if r["step"] == 0)
    lines += ["", f"Before preference training (step 0): task reward {start['reward']:.3f}.", ""]
    top = max(r["sample_kl"] for r in means)
    budgets = [b for b in (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0) if b <= top]
    lines += ["## Frontier: best seed-mean task reward within a KL budget", "",
              "The highest seed-mean reward among a method's evaluated points (every beta and "
              "step) whose sample KL is within the budget.", "",
              "| method | " + " | ".join(f"KL <= {b}" for b in budgets) + " |",
              "|---|" + "---|" * len(budgets)]
    best = {}
    for m in methods:  # nan where the method's points never reach half the budget
        rows = [r for r in means if r["method"] == m]
        reach = max(r["sample_kl"] for r in rows)
        best[m] = [best_within(rows, b) if reach >= b / 2 else float("nan") for b in budgets]
        lines.append(f"| {m} | " + " | ".join("-" if v != v else f"{v:.3f}" for v in best[m])
                     + " |")
    lines += ["", "(-: the method's points never reach half that KL, so it has no frontier "
              "there.)", ""]
    gap = {}
    for m in methods:  # rejected - chosen eval KL at the final step, per beta
        gap[m] = {r["beta"]: r["kl_rejected"] - r["kl_chosen"] for r in means
                  if r["method"] == m and r["step"] == last_step}
    lines += ["## Findings (computed)", "",
              f"Differences under {NOISE} are within noise (one point is the mean of "
              f"{args.eval_prompts} samples x {len(seeds)} seeds; the reward's spread is "
              "about 0.5 per sample).", ""]
    if "DPO" in best:
        for m in methods:
            if m == "DPO":
                continue
            d = [a - b for a, b in zip(best[m], best["DPO"]) if a == a and b == b]
            lines.append(f"- {m} vs DPO, best reward within the KL budgets both reach: "
                         f"above by more than {NOISE} at {sum(x > NOISE for x in d)}, "
                         f"within {NOISE} at {sum(abs(x) <= NOISE for x in d)}, below by more "
                         f"at {sum(x < -NOISE for x in d)} of {len(d)} "
                         f"(differences {', '.join(f'{x:+.3f}' for x in d)}).")
    lines += ["- Final rejected-minus-chosen eval KL per beta: " + "; ".join(
        f"{m} " + ", ".join(num(g, 2) for g in gap[m].values()) for m in methods) + "."]
    path, notes = os.path.join(docs, "frontier.md"), ""
    if os.path.isfile(path):  # hand-written notes after the marker survive a re-report
        with open(path) as f:
            old = f.read()
        if NOTES_MARKER in old:
            notes = "\n" + old[old.index(NOTES_MARKER):]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n" + notes)
    print("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tdpo-experiment", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("frontier", help="DPO vs TDPO1 vs TDPO2 reward/KL frontier")
    f.add_argument("--out", default="runs/frontier", help="where the runs go")
    f.add_argument("--docs", help="write frontier.md and the plots here (default: --out)")
    f.add_argument("--betas", default="0.1,0.3,1.0")
    f.add_argument("--seeds", default="0,1")
    f.add_argument("--methods", default=",".join(METHODS))
    f.add_argument("--steps", type=int, default=100)
    f.add_argument("--eval-every", type=int, default=20)
    f.add_argument("--eval-prompts", type=int, default=128)
    f.add_argument("--lr", type=float, default=3e-4)
    f.add_argument("--jobs", type=int, default=2, help="runs at once")
    f.add_argument("--threads", type=int, default=1, help="torch threads per run")
    f.add_argument("--quick", action="store_true", help="tiny settings, for a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.eval_prompts = 2, 1, 8
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
    jobs = [(m, b, s) for m in methods for b in betas for s in seeds]
    print(f"frontier: {len(jobs)} runs, {args.jobs} at a time", flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda j: run_one(base, args.out, *j, args), jobs))
    command = "tdpo-experiment " + " ".join(sys.argv[1:] if argv is None else argv)
    timing = os.path.join(args.out, "runtime.json")
    if os.path.isfile(timing) and time.time() - t0 < 120:  # only re-reported: keep the first
        with open(timing) as f:
            wall = json.load(f)["wall_s"]
    else:
        wall = time.time() - t0
        with open(timing, "w") as f:
            json.dump({"wall_s": wall}, f)
    report(collect(args.out, methods, betas, seeds), methods, betas, seeds, args, docs,
           wall, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
