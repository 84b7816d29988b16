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
ENTROPY_AXIS = "policy entropy on its samples (nats per token, mean over samples)"


def fmt(x: float, digits: int = 3) -> str:
    return "-" if x != x else f"{round(x, digits) + 0.0:.{digits}f}"


def with_interval(samples: np.ndarray, digits: int = 3) -> list[str]:
    """'estimate [lo, hi]' per column of (R, K) replicates (row 0: the data)."""
    lo, hi = S.interval(samples)
    return [fmt(e, digits) if e != e else
            f"{fmt(e, digits)} [{fmt(a, digits)}, {fmt(b, digits)}]"
            for e, a, b in zip(samples[0], lo, hi)]


def plot_paths_and_best(stats, grid, path_xy, best_of, labels, file, xmax=None):
    """Left: every (method, beta)'s seed-mean path, path_xy(Path) -> (x, y), up to xmax;
    right: best_of(MethodStats) (R, G) on the grid, with its intervals. labels: the left
    x, y and title, then the right ones."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for m, st in stats.items():
        for i, path in enumerate(st.paths.values()):
            x, y = path_xy(path)
            ok = ~np.isnan(x) & ~np.isnan(y) & (x <= (np.inf if xmax is None else xmax))
            left.plot(x[ok], y[ok], "-", color=COLORS.get(m), alpha=0.6, linewidth=1,
                      marker=MARKERS[i % len(MARKERS)], markersize=3,
                      label=m if i == 0 else None)
        best = best_of(st)
        lo, hi = S.interval(best)
        right.plot(grid, best[0], color=COLORS.get(m), label=m, linewidth=2)
        # intervals only where the data has a reading, as the line
        right.fill_between(grid, lo, hi, where=~np.isnan(best[0]), color=COLORS.get(m),
                           alpha=0.15)
    for i, beta in enumerate(next(iter(stats.values())).paths):
        left.plot([], [], "k", marker=MARKERS[i % len(MARKERS)], linestyle="none",
                  label=f"beta {beta}", markersize=4)
    if xmax is not None:
        left.set_xlim(0, xmax)
    for ax, (x, y, title) in ((left, labels[:3]), (right, labels[3:])):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=100)
    plt.close(fig)


def plot_frontier(stats, grid, docs):
    plot_paths_and_best(
        stats, grid, lambda p: (p.kl, p.reward), lambda st: st.best,
        ("sequential KL(pi_ref || pi_theta) on policy samples (nats)",
         "task reward of policy samples (VADER compound)",
         "Every run's path (seed means, one point per evaluation)",
         "KL budget (nats)", "best task reward within the budget",
         f"Frontier, with {S.LEVEL:.0%} bootstrap intervals"),
        os.path.join(docs, "frontier.png"), xmax=grid[-1] * 1.5)


def plot_diversity(stats, levels, docs):
    plot_paths_and_best(
        stats, levels, lambda p: (p.reward, p.entropy), lambda st: st.diversity,
        ("task reward of policy samples (VADER compound)", ENTROPY_AXIS,
         "Every run's path (seed means, one point per evaluation)",
         "reward level", "most sample entropy at the level or above (nats per token)",
         f"Diversity kept at equal reward, with {S.LEVEL:.0%} bootstrap intervals"),
        os.path.join(docs, "frontier_diversity.png"))


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


def table(heads: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table with a first column "method"."""
    return (["| method | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
            + ["| " + " | ".join(r) + " |" for r in rows])


def value_table(stats, of, cols, heads, mark=lambda st, j: "") -> list[str]:
    """Each method's statistic of(MethodStats) (R, G) at the grid columns, with its
    interval; mark(MethodStats, j) is appended to the j-th cell."""
    return table(heads, [[m] + [c + mark(st, j) for j, c in
                                enumerate(with_interval(of(st)[:, cols]))]
                         for m, st in stats.items()])


def verdict_table(stats, of, cols, heads) -> tuple[list[str], dict]:
    """The verdict of each method but the first against the first, and the difference
    with its interval, at the grid columns; and the verdicts, per method."""
    (base, first), rows, verdicts = next(iter(stats.items())), [], {}
    for m, st in list(stats.items())[1:]:
        diff = (of(st) - of(first))[:, cols]
        verdicts[m] = [S.verdict(diff[:, j]) for j in range(len(cols))]
        rows.append([m] + [f"**{v}** {c}" for v, c in zip(verdicts[m], with_interval(diff))])
    return table(heads, rows), verdicts


def diversity(stats, levels, reward_levels, betas) -> tuple[list[str], dict, list]:
    """The report's section on reward against sample diversity; its verdicts per method,
    and the columns of `levels` that it reports."""
    base = next(iter(stats))
    cols = [int(np.argmin(np.abs(levels - r))) for r in reward_levels]
    heads = [f"reward >= {r}" for r in reward_levels]
    start = stats[base].paths[betas[0]]

    def unreached(st, j):  # reached on the data, but not in every replicate
        got = st.diversity[:, cols[j]]
        return " ‡" if not np.isnan(got[0]) and np.isnan(got[1:]).any() else ""

    lines = [
        "", "## Reward against sample diversity", "",
        "The paper's claim is that TDPO's token-level KL control keeps generation diversity "
        "while aligning (its Table 1 reports entropy beside alignment). Here a policy's "
        "diversity is its **sample entropy**: for each eval prompt, the policy's entropy "
        "H(pi_theta(.|prefix)) in nats, averaged over the tokens of its sample (the same "
        "samples that give the task reward and the sample KL), then averaged over prompts.",
        "",
        "- **Diversity at a reward level.** Each (method, beta)'s seed-mean path through "
        f"(reward, entropy) is read at reward levels every {S.LEVEL_STEP}, interpolating "
        "between the two evaluations around each (a per-sequence mix of those two policies "
        "has that reward and, each sample's entropy taken under the policy that drew it, "
        "that entropy). A method's diversity at a level is its most entropy at that reward "
        "or above, over its betas, chosen on one half of the eval prompts and scored on "
        "the other (both ways, averaged), as the best reward within a budget is.",
        "- **Intervals and verdicts** from the same bootstrap draws as above, paired by "
        f"seed and prompt: above (below) {base} when the whole interval of the difference "
        f"in entropy from {base}'s is above (below) zero, level otherwise; n/a where one of "
        "the two never reaches the level.", "",
        "![reward against sample diversity](frontier_diversity.png)", "",
        f"Before preference training (step 0, the SFT model): sample entropy "
        f"{fmt(start.entropy[0])} nats per token, distinct-1 {fmt(start.distinct[0, 0])}, "
        f"distinct-2 {fmt(start.distinct[0, 1])}.", "",
        "### Most sample entropy at a reward level or above", "",
        f"Seed-mean entropy (nats per token), with its {S.LEVEL:.0%} interval; - where the "
        "method's seed-mean paths never reach the level. A double dagger marks levels that "
        "some bootstrap replicates never reach: the interval is over those that do.", ""]
    lines += value_table(stats, lambda st: st.diversity, cols, heads, unreached)
    lines += ["", f"### Against {base}, per reward level", "",
              f"Verdict, and the difference from {base}'s entropy with its interval.", ""]
    rows, verdicts = verdict_table(stats, lambda st: st.diversity, cols, heads)
    lines += rows + [
        "", "### Distinct-1 / distinct-2 at those points", "",
        "The distinct token unigrams (bigrams) over all unigrams (bigrams) of an "
        "evaluation's samples (Li et al., 2016), seed means, at each method's reading with "
        "the most entropy at the level or above on all eval prompts. They are one number "
        "per evaluation of a run, with no per-prompt values to split or resample: the "
        "reading is not cross-fitted and the values have no interval.", ""]
    lines += table(heads, [[m] + [f"{fmt(d1)} / {fmt(d2)}" for d1, d2 in st.distinct[cols]]
                           for m, st in stats.items()])
    return lines, verdicts, cols


def diversity_findings(stats, verdicts, cols, reward_levels) -> list[str]:
    """The computed answer to the paper's question: more diversity than the baseline at
    equal reward?"""
    base, first = next(iter(stats.items()))
    lines, counts = [], {"above": 0, "level": 0, "below": 0}
    for m, v in verdicts.items():
        line = (f"- {m} against {base}, sample entropy at equal reward ({len(v)} levels): "
                f"more at {v.count('above')}, level at {v.count('level')}, less at "
                f"{v.count('below')}, n/a at {v.count('n/a')}")
        both = [j for j, x in enumerate(v) if x != "n/a"]
        if both:
            j = both[-1]
            diff = (stats[m].diversity - first.diversity)[:, cols[j]]
            line += (f"; at the highest level both reach, reward >= {reward_levels[j]}: "
                     f"{with_interval(diff[:, None])[0]} nats per token")
        lines.append(line + ".")
        for k in counts:
            counts[k] += v.count(k)
    n = sum(counts.values())
    more, less = counts["above"], counts["below"]
    answer = ("not answered: no reward level that both reach" if n == 0 else
              "no difference found" if more == less == 0 else
              "yes, where they differ" if less == 0 else
              "no: less where they differ" if more == 0 else "mixed")
    counted = (f": over the {n} (method, level) comparisons with data, more at {more}, "
               f"level at {counts['level']}, less at {less}" if n else "")
    lines.append(f"- **Does TDPO keep more diversity than {base} at equal reward?** "
                 f"{answer[0].upper() + answer[1:]}{counted}.")
    return lines


def markdown(stats, grid, budgets, levels, reward_levels, betas, seeds, args, runtime_s,
             command):
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
        "the other** (both ways, averaged; where a path reaches each KL value is read on "
        "all eval prompts, and the other half is scored at that point). The best of many "
        "noisy readings is biased upwards, the more so the more readings there are: "
        "scored on its own data, it would favour the slowest methods, which have the most "
        "evaluations.",
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
            path = stats[m].paths[beta]
            i = int(np.nanargmax(path.kl))
            last = stats[m].last_steps[beta]
            lines.append(f"| {m} | {beta} | {min(last)}-{max(last)} | {fmt(path.kl[i], 2)} "
                         f"(step {path.steps[i]}) | {fmt(path.reward[i])} |")
    start = stats[base].paths[betas[0]].reward[0]
    lines += ["", f"Before preference training (step 0, the SFT model): task reward "
              f"{fmt(start)}.", "", "## Best task reward within a KL budget", "",
              f"Seed-mean reward, with its {S.LEVEL:.0%} interval. A dagger marks budgets "
              "beyond a method's furthest seed-mean KL: its best there is its best at all.",
              ""]
    cols = [int(np.argmin(np.abs(grid - b))) for b in budgets]
    heads = [f"KL <= {b}" for b in budgets]
    lines += value_table(stats, lambda st: st.best, cols, heads,
                         lambda st, j: " †" if budgets[j] > st.reach else "")
    lines += ["", f"## Against {base}, per budget", "",
              f"Verdict, and the difference from {base}'s best with its interval.", ""]
    rows, verdicts = verdict_table(stats, lambda st: st.best, cols, heads)
    lines += rows
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
            g, kl = gap[:, i[0]], stats[m].paths[b].kl[i[0]]
            cell = f"{with_interval(g[:, None], 2)[0]} at {fmt(kl, 1)} nats"
            if m != base:
                j = np.flatnonzero(stats[base].gap[b][0] == last[b])[0]
                v = S.verdict(g - stats[base].gap[b][1][:, j])
                v = {"above": "larger", "below": "smaller"}.get(v, v)
                gap_verdicts[m].append(v)
                cell += f" **{v}**"
            cells.append(cell)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    diversity_lines, diversity_verdicts, cols = diversity(stats, levels, reward_levels, betas)
    lines += diversity_lines + ["", "## Findings (computed)", ""]
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
    return lines + diversity_findings(stats, diversity_verdicts, cols, reward_levels)


def write(stats, grid, budgets, levels, reward_levels, betas, seeds, args, docs, runtime_s,
          command):
    plot_frontier(stats, grid, docs)
    plot_diversity(stats, levels, docs)
    plot_gap(stats, grid, betas, docs)
    lines = markdown(stats, grid, budgets, levels, reward_levels, betas, seeds, args,
                     runtime_s, command)
    path, notes = os.path.join(docs, "frontier.md"), ""
    if os.path.isfile(path):  # hand-written notes after the marker survive a re-report
        with open(path) as f:
            old = f.read()
        if NOTES_MARKER in old:
            notes = "\n" + old[old.index(NOTES_MARKER):]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n" + notes)
    print("\n".join(lines))
