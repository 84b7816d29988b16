"""The frontier experiment's report: frontier.md (settings, how the comparison is made,
tables with intervals and verdicts) and its two figures, from frontier_stats' results."""
from __future__ import annotations

import os

import numpy as np

from . import frontier_stats as S

NOTES_MARKER = "<!-- notes: kept when the report is regenerated -->"
COLORS = {"DPO": "tab:red", "TDPO1": "tab:orange", "TDPO2 a=0.1": "tab:cyan",
          "TDPO2 a=0.5": "tab:blue", "TDPO2 a=1.0": "tab:purple"}
MARKERS = ["o", "s", "^", "D", "v"]
GAP_KL = (2.0, 4.0)  # nats of sample KL at which the gaps are compared in the table


def fmt(x: float, digits: int = 3) -> str:
    return "-" if x != x else f"{round(x, digits) + 0.0:.{digits}f}"


def with_interval(samples: np.ndarray, digits: int = 3) -> list[str]:
    """'estimate [lo, hi]' per column of (R, K) replicates (row 0: the data)."""
    lo, hi = S.interval(samples)
    return [fmt(e, digits) if e != e else
            f"{fmt(e, digits)} [{fmt(a, digits)}, {fmt(b, digits)}]"
            for e, a, b in zip(samples[0], lo, hi)]


def plot_frontier(stats, grid, docs):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    top = grid[-1]
    for m, st in stats.items():
        for i, (beta, (_, reward, kl)) in enumerate(st.paths.items()):
            ok = ~np.isnan(kl) & (kl <= top * 1.5)
            left.plot(kl[ok], reward[ok], "-", color=COLORS.get(m), alpha=0.6, linewidth=1,
                      marker=MARKERS[i % len(MARKERS)], markersize=3,
                      label=m if i == 0 else None)
        lo, hi = S.interval(st.best)
        right.plot(grid, st.best[0], color=COLORS.get(m), label=m, linewidth=2)
        right.fill_between(grid, lo, hi, color=COLORS.get(m), alpha=0.15)
    for i, beta in enumerate(next(iter(stats.values())).paths):
        left.plot([], [], "k", marker=MARKERS[i % len(MARKERS)], linestyle="none",
                  label=f"beta {beta}", markersize=4)
    left.set_xlim(0, top * 1.5)
    left.set_xlabel("sequential KL(pi_ref || pi_theta) on policy samples (nats)")
    left.set_ylabel("task reward of policy samples (VADER compound)")
    left.set_title("Every run's path (seed means, one point per evaluation)")
    right.set_xlabel("KL budget (nats)")
    right.set_ylabel("best task reward within the budget")
    right.set_title(f"Frontier, with {S.LEVEL:.0%} bootstrap intervals")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(docs, "frontier.png"), dpi=100)
    plt.close(fig)


def plot_gap(stats, grid, betas, docs):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, len(betas), figsize=(4.6 * len(betas), 7.5), squeeze=False)
    for col, beta in enumerate(betas):
        top, bottom = axes[0][col], axes[1][col]
        for m, st in stats.items():
            steps, gap = st.gap[beta]
            lo, hi = S.interval(gap)
            ok = (steps > 0) & ~np.isnan(gap[0])
            top.plot(steps[ok], gap[0][ok], color=COLORS.get(m), label=m, linewidth=1.5)
            top.fill_between(steps[ok], lo[ok], hi[ok], color=COLORS.get(m), alpha=0.15)
            g = st.gap_at_kl[beta]
            lo, hi = S.interval(g)
            ok = ~np.isnan(g[0])
            bottom.plot(grid[ok], g[0][ok], color=COLORS.get(m), label=m, linewidth=1.5)
            bottom.fill_between(grid[ok], lo[ok], hi[ok], color=COLORS.get(m), alpha=0.15)
        top.set_xscale("log")
        top.set_title(f"beta {beta}: over training", fontsize=10)
        top.set_xlabel("step")
        bottom.set_title(f"beta {beta}: against the distance travelled", fontsize=10)
        bottom.set_xlabel("sequential KL on policy samples (nats)")
        for ax in (top, bottom):
            ax.axhline(0, color="gray", linewidth=0.8)
            ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("eval KL, rejected minus chosen (nats)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Sequential KL(pi_ref || pi_theta) on rejected minus chosen eval responses "
                 f"(seed means, {S.LEVEL:.0%} bootstrap intervals)")
    fig.tight_layout()
    fig.savefig(os.path.join(docs, "frontier_kl.png"), dpi=90)
    plt.close(fig)


def markdown(stats, grid, budgets, betas, seeds, args, runtime_s, command):
    """The report's lines."""
    methods = list(stats)
    base = methods[0]
    lines = [
        "# Reward / KL frontier on the embedded sentiment task", "",
        f"Made by (on this repository's 2-core CPU machine, {runtime_s / 60:.0f} min wall "
        "clock, two runs at a time):", "", "```", command, "```", "",
        "## Setup", "",
        "The embedded default task (tdpo_ext/training/tasks.py), a miniature of the paper's "
        "IMDb experiment: one SFT model and one set of preference pairs (two samples per "
        "prompt ranked by the VADER reward), then every method trained from that SFT model "
        f"for each beta in {betas} and each seed in {seeds} (the seed sets the data order "
        "and the sampling). Every run has the same settings: "
        f"lr {args.lr}, 32 pairs a step, an evaluation every {args.eval_every} steps on "
        f"{args.eval_prompts} held-out prompts (the task reward of one policy sample per "
        "prompt, and the sequential KL sum_t KL(pi_ref || pi_theta) on that sample) and on "
        "the eval pairs (the sequential KL of their chosen and rejected responses), and "
        + (f"{args.steps} steps each." if args.stop_sample_kl is None else
           "one stopping rule: a run ends after the first evaluation whose sample KL "
           f"exceeds {args.stop_sample_kl} nats, or at step {args.steps}."), "",
        "## How the comparison is made", "",
        "- **The same range for every method, by one rule.** The budgets reach "
        f"{budgets[-1]} nats. A method's KL grows at its own pace (TDPO2's KL term holds "
        "it back, more so with a larger alpha), so no fixed step count suits all: each "
        "run goes on until it is past the budgets (the stopping rule above) or reaches "
        f"step {args.steps}. The betas, {betas}, are the same for every method: a "
        "smaller beta lets a method travel further per step, a larger one moves it more "
        "cautiously. Nothing is set per method.",
        "- **Best reward within a budget.** Each (method, beta)'s seed-mean path through "
        "its evaluations is read at KL values every "
        f"{S.GRID_STEP} nats, interpolating between the two evaluations around each (a "
        "per-sequence mix of those two policies gets that reward with at most that KL), "
        "so a path whose KL grows in 20 steps is read as finely as one that takes 2000. "
        "A method's best reward within a budget is its best reading at or below the "
        "budget, over its betas, **chosen on one half of the eval prompts and scored on "
        "the other** (both ways, averaged). The best of many noisy readings is biased "
        "upwards, the more so the more readings there are: scored on its own data, it "
        "would favour the slowest methods, which have the most evaluations.",
        f"- **Intervals.** {S.LEVEL:.0%} percentile bootstrap intervals from {args.draws} "
        "replicates; each resamples the seeds and, within each drawn seed, the eval "
        "prompts (or pairs), and recomputes everything from the per-example values. The "
        "same draws serve every method, so differences are paired by seed and example.",
        f"- **Verdicts against {base}.** Above (or below) when the whole interval of the "
        f"difference from {base} is above (below) zero; level otherwise.", "",
        "![frontier](frontier.png)", "",
        "## How far each method goes", "",
        "| method | beta | steps run (per seed) | largest seed-mean sample KL | its reward |",
        "|---|---|---|---|---|"]
    for m in methods:
        for beta in betas:
            steps, reward, kl = stats[m].paths[beta]
            i = int(np.nanargmax(kl))
            last = stats[m].last_steps[beta]
            lines.append(f"| {m} | {beta} | {min(last)}-{max(last)} | {fmt(kl[i], 2)} "
                         f"(step {steps[i]}) | {fmt(reward[i])} |")
    start = stats[base].paths[betas[0]][1][0]
    lines += ["", f"Before preference training (step 0, the SFT model): task reward "
              f"{fmt(start)}.", "", "## Best task reward within a KL budget", "",
              f"Seed-mean reward, with its {S.LEVEL:.0%} interval. A dagger marks budgets "
              "beyond a method's furthest seed-mean KL: its best there is its best at all.",
              "", "| method | " + " | ".join(f"KL <= {b}" for b in budgets) + " |",
              "|---|" + "---|" * len(budgets)]
    cols = [int(np.argmin(np.abs(grid - b))) for b in budgets]
    for m in methods:
        cells = with_interval(stats[m].best[:, cols])
        cells = [c + (" †" if b > stats[m].reach else "") for c, b in zip(cells, budgets)]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", f"## Against {base}, per budget", "",
              f"Verdict, and the difference from {base}'s best with its interval.", "",
              "| method | " + " | ".join(f"KL <= {b}" for b in budgets) + " |",
              "|---|" + "---|" * len(budgets)]
    verdicts = {}
    for m in methods[1:]:
        diff = (stats[m].best - stats[base].best)[:, cols]
        verdicts[m] = [S.verdict(diff[:, j]) for j in range(len(budgets))]
        lines.append(f"| {m} | " + " | ".join(
            f"**{v}** {c}" for v, c in zip(verdicts[m], with_interval(diff))) + " |")
    lines += ["", "## The rejected-minus-chosen KL gap", "",
              "The paper's second observation: under DPO the sequential KL of rejected "
              "responses outgrows that of chosen ones; TDPO's token-level KL term should "
              "keep the two closer. The gap is the seed-mean eval KL of the rejected minus "
              "that of the chosen responses of the eval pairs.", "",
              "![KL gap](frontier_kl.png)", "",
              f"At {' and '.join(map(str, GAP_KL))} nats of sample KL (where each path "
              "first gets there, interpolated), with its interval, and the verdict of the "
              f"gap against {base}'s at the same beta (smaller, level, larger):", "",
              "| method | " + " | ".join(f"beta {b}, {k} nats" for b in betas
                                       for k in GAP_KL) + " |",
              "|---|" + "---|" * (len(betas) * len(GAP_KL))]
    gap_verdicts = {}
    for m in methods:
        cells = []
        for beta in betas:
            for k in GAP_KL:
                col = int(np.argmin(np.abs(grid - k)))
                g = stats[m].gap_at_kl[beta][:, col]
                cell = with_interval(g[:, None], 2)[0]
                if m != base:
                    v = S.verdict(g - stats[base].gap_at_kl[beta][:, col])
                    v = {"above": "larger", "below": "smaller"}.get(v, v)
                    gap_verdicts.setdefault(m, []).append(v)
                    cell += f" **{v}**"
                cells.append(cell)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    # As the paper plots it, over steps: at the last step of the baseline's runs (every
    # seed), where the others have travelled less far.
    last = {b: int(stats[base].gap[b][0][~np.isnan(stats[base].gap[b][1][0])][-1])
            for b in betas}
    lines += ["", f"At the same step: the last one every seed of {base} reached at that "
              "beta, with each method's sample KL there, and the verdict against "
              f"{base}'s:", "",
              "| method | " + " | ".join(f"beta {b}, step {last[b]}" for b in betas) + " |",
              "|---|" + "---|" * len(betas)]
    for m in methods:
        cells = []
        for b in betas:
            steps, gap = stats[m].gap[b]
            i = np.flatnonzero(steps == last[b])
            if not i.size:
                cells.append("-")
                continue
            g, kl = gap[:, i[0]], stats[m].paths[b][2][i[0]]
            cell = f"{with_interval(g[:, None], 2)[0]} at {fmt(kl, 1)} nats"
            if m != base:
                j = np.flatnonzero(stats[base].gap[b][0] == last[b])[0]
                v = S.verdict(g - stats[base].gap[b][1][:, j])
                v = {"above": "larger", "below": "smaller"}.get(v, v)
                gap_verdicts[m].append(v)
                cell += f" **{v}**"
            cells.append(cell)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "## Findings (computed)", ""]
    n_kl = len(betas) * len(GAP_KL)
    for m in methods[1:]:
        v, g = verdicts[m], gap_verdicts[m]
        lines.append(f"- {m} against {base}, best reward within the {len(budgets)} budgets: "
                     f"above at {v.count('above')}, level at {v.count('level')}, below at "
                     f"{v.count('below')}; its KL gap at equal sample KL ({n_kl} points): "
                     f"smaller at {g[:n_kl].count('smaller')}, level at "
                     f"{g[:n_kl].count('level')}, larger at {g[:n_kl].count('larger')}; at "
                     f"equal steps ({len(g) - n_kl}): smaller at "
                     f"{g[n_kl:].count('smaller')}, level at {g[n_kl:].count('level')}, "
                     f"larger at {g[n_kl:].count('larger')}.")
    return lines


def write(stats, grid, budgets, betas, seeds, args, docs, runtime_s, command):
    plot_frontier(stats, grid, docs)
    plot_gap(stats, grid, betas, docs)
    lines = markdown(stats, grid, budgets, betas, seeds, args, runtime_s, command)
    path, notes = os.path.join(docs, "frontier.md"), ""
    if os.path.isfile(path):  # hand-written notes after the marker survive a re-report
        with open(path) as f:
            old = f.read()
        if NOTES_MARKER in old:
            notes = "\n" + old[old.index(NOTES_MARKER):]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n" + notes)
    print("\n".join(lines))
