"""The frontier experiment's statistics: seed-mean trajectories, the best reward each method
reaches within a KL budget, the most sample diversity (entropy) it keeps at a reward level,
the rejected-minus-chosen KL gap, and bootstrap intervals for them over seeds and eval
examples, with verdicts against a baseline.

Every statistic is computed on the original data and on `draws` bootstrap replicates. A
replicate resamples the seeds with replacement and, within each drawn seed, the eval
prompts (or eval pairs) with replacement; the same draw serves every method and beta, so
differences between methods are paired by seed and by example.

A run's evaluations are vertices of a path in the (sample KL, task reward) plane, and of
one in the (task reward, sample entropy) plane. A path's value "at" a level of its other
coordinate is read off the seed-mean path by linear interpolation between the two
evaluations around it, at every point of a fixed grid (the reward at each KL, the entropy
at each reward), so a path that moves in 20 steps is read as finely as one that takes
2000. The interpolation is what a mix of those two policies gets, drawn per sequence: the
interpolated reward with at most the interpolated KL (KL is convex), and the interpolated
sample entropy (each sample's entropy taken under the policy that drew it). The best
reading within a budget (or at a reward level) is chosen on one half of the eval prompts
and scored on the other (best_crossfit): a maximum over noisy readings is biased upwards,
the more so the more readings there are, which would favour the slowest methods."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

GRID_STEP = 0.05  # nats between the KL values at which rewards are read
LEVEL_STEP = 0.01  # task reward between the levels at which sample entropies are read
LEVEL = 0.95


@dataclasses.dataclass
class Trajectory:
    """One (method, beta)'s evaluations over seeds: `steps` (T,), and per-example arrays
    (T, seeds, examples), NaN where a seed's run had ended before that step."""
    steps: np.ndarray
    reward: np.ndarray          # per eval prompt: task reward of the policy's sample
    sample_kl: np.ndarray       # per eval prompt: sequential KL on that sample
    sample_entropy: np.ndarray  # per eval prompt: mean policy entropy over its tokens
    kl_chosen: np.ndarray       # per eval pair
    kl_rejected: np.ndarray     # per eval pair
    distinct: np.ndarray        # (T, seeds, 2): distinct-1, distinct-2 of all the samples

    def last_steps(self) -> list[int]:
        """Each seed's last evaluated step (where its run ended)."""
        return [int(self.steps[~np.isnan(self.reward[:, j, 0])][-1])
                for j in range(self.reward.shape[1])]


def trajectory(runs: list[list[dict]], evals: list[list[dict]]) -> Trajectory:
    """From each seed's eval_examples.jsonl rows (one list per seed, same eval sets) and
    its metrics.jsonl rows of evaluations with samples (the run-level distinct-n)."""
    steps = sorted({r["step"] for rows in runs for r in rows})
    at = {s: i for i, s in enumerate(steps)}

    def stack(seeds_rows, keys):
        width = len(seeds_rows[0][0][keys[0]]) if len(keys) == 1 else len(keys)
        out = np.full((len(steps), len(seeds_rows), width), np.nan)
        for j, rows in enumerate(seeds_rows):
            for r in rows:
                out[at[r["step"]], j] = r[keys[0]] if len(keys) == 1 else [r[k] for k in keys]
        return out

    return Trajectory(np.array(steps), *(stack(runs, [k]) for k in (
        "task_reward/eval", "sample_kl/eval", "sample_entropy/eval", "kl_eval/chosen",
        "kl_eval/rejected")), stack(evals, ["distinct_1/eval", "distinct_2/eval"]))


@dataclasses.dataclass
class Draws:
    """Bootstrap weights; replicate 0 is the data itself (every weight 1)."""
    seeds: np.ndarray    # (R, S) how often each seed is drawn
    prompts: np.ndarray  # (R, S, P) how often each eval prompt is drawn, within each seed
    pairs: np.ndarray    # (R, S, Q) the same for the eval pairs


def draw(n_seeds: int, n_prompts: int, n_pairs: int, draws: int, seed: int = 0) -> Draws:
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=draws)
    counts = np.concatenate([np.ones((1, n_seeds), dtype=np.int64), counts])

    def within(n):  # a seed drawn k times: k independent draws of its n examples
        w = rng.multinomial(counts * n, np.full(n, 1 / n))
        w[0] = 1
        return w

    return Draws(counts, within(n_prompts), within(n_pairs))


def seed_means(values: np.ndarray, weights: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """(R, T) weighted means of values (T, S, E) per replicate; NaN at the steps where a
    drawn seed has no evaluation (its run had ended)."""
    missing = np.isnan(values[:, :, 0])  # (T, S)
    r, t = weights.shape[0], values.shape[0]
    total = weights.reshape(r, -1).astype(float) @ np.nan_to_num(values).reshape(t, -1).T
    mean = total / weights.sum(axis=(1, 2))[:, None]
    gone = np.einsum("rs,ts->rt", (seeds > 0).astype(float), missing.astype(float)) > 0
    mean[gone] = np.nan
    return mean


class Crossing(NamedTuple):
    """Where a path (R, T) has each grid value (R, G): the segment between evaluations
    `segment` and `segment + 1` (-1: nowhere), and how far along it."""
    segment: np.ndarray
    frac: np.ndarray

    def read(self, series: np.ndarray) -> np.ndarray:
        """(R, G) a series of the same path (R or 1, T) interpolated at the crossings."""
        seg = np.maximum(self.segment, 0)
        s0 = np.take_along_axis(series[:, :-1], seg, axis=1)
        s1 = np.take_along_axis(series[:, 1:], seg, axis=1)
        return np.where(self.segment >= 0, s0 + self.frac * (s1 - s0), np.nan)


def crossing(value: np.ndarray, along: np.ndarray, grid: np.ndarray, first=False) -> Crossing:
    """Where a seed-mean path (value, along: (R, T), steps in order) has `along` equal to
    each grid value, between consecutive evaluations: the crossing with the largest value,
    or with first=True the one the path reaches first. An evaluation exactly on a grid
    value (a segment with no extent) counts with the larger value of its two ends."""
    v0, v1 = value[:, :-1, None], value[:, 1:, None]
    a0, a1 = along[:, :-1, None], along[:, 1:, None]
    g = grid[None, None, :]
    lo, hi = np.minimum(a0, a1), np.maximum(a0, a1)
    inside = (lo <= g) & (g <= hi)  # NaN (an ended run) compares False
    frac = np.where(hi > lo, (g - a0) / np.where(hi > lo, a1 - a0, 1.0), v1 > v0)
    if first:
        seg = inside.argmax(axis=1)
    else:
        seg = np.where(inside, v0 + frac * (v1 - v0), -np.inf).argmax(axis=1)
    frac = np.take_along_axis(frac, seg[:, None, :], axis=1)[:, 0]
    return Crossing(np.where(inside.any(axis=1), seg, -1), frac)


def at_level(value: np.ndarray, along: np.ndarray, grid: np.ndarray, first=False) -> np.ndarray:
    """(R, G) a seed-mean path's value where its `along` equals each grid value (see
    crossing); NaN where the path never has it."""
    return crossing(value, along, grid, first).read(value)


def chosen(pick: np.ndarray, score: np.ndarray) -> np.ndarray:
    """(R, G, ...) at each grid point, `score` (R, paths, G, ...) at the reading (path,
    grid point at or before it in the grid's order) where `pick` (R, paths, G) is largest;
    NaN without a reading."""
    r, _, g = pick.shape
    out = np.full((r, g) + score.shape[3:], np.nan)
    for j in range(g):
        cand = np.where(np.isnan(pick[:, :, :j + 1]), -np.inf, pick[:, :, :j + 1])
        flat = cand.reshape(r, -1)
        idx = flat.argmax(axis=1)
        got = score[:, :, :j + 1].reshape((r, -1) + score.shape[3:])[np.arange(r), idx]
        found = np.isfinite(flat[np.arange(r), idx]).reshape((r,) + (1,) * (score.ndim - 3))
        out[:, j] = np.where(found, got, np.nan)
    return out


def best_within_crossfit(pick: list[np.ndarray], score: list[np.ndarray]) -> np.ndarray:
    """(R, G) the best reading at each grid point or before it in the grid's order (within
    a KL budget; at a reward level or above it, with the levels in descending order), over
    several paths' readings on the grid (at_level; one path per beta, (R, G) each): the
    reading is chosen on one half of the eval prompts (`pick`) and its value taken from
    the other half (`score`). The noise that makes a reading look best then does not count
    in its favour, so a method with more readings near a budget gains nothing from having
    more chances. NaN: no reading. Made non-decreasing along the grid afterwards (a larger
    budget allows all that a smaller one does, a lower reward level all that a higher one
    does), a maximum over readings that are mostly the same point, scored on the other
    half."""
    best = chosen(np.stack(pick, axis=1), np.stack(score, axis=1))
    return np.fmax.accumulate(best, axis=1)


def best_crossfit(paths: list[tuple[np.ndarray, np.ndarray]], d: Draws,
                  grid: np.ndarray) -> np.ndarray:
    """(R, G) best_within_crossfit over paths, one per beta, each (value, along): per-prompt
    arrays (T, S, P). Where a path crosses a grid value is read on all eval prompts: the
    path the report shows, the least noisy, so that a path stalled short of a grid value
    reaches it by chance as rarely as can be. Among those crossings and grid values, each
    half of the eval prompts picks by its values for the other, which is read at the
    picked crossing (the same evaluations, the same fraction between them), not at its own
    best crossing: on a path that hovers around a grid value (a plateau) the largest of
    its many crossings would be biased upwards again. The two halves' scores are
    averaged."""
    even = np.arange(d.prompts.shape[2]) % 2 == 0
    picks = {True: [], False: []}   # per half of the eval prompts: its readings, per path
    scores = {True: [], False: []}  # the other half's values at those readings
    for value, along in paths:
        x = seed_means(along, d.prompts, d.seeds)
        half = {h: seed_means(value, d.prompts * (even == h), d.seeds) for h in (True, False)}
        for h in (True, False):
            at = crossing(half[h], x, grid)
            picks[h].append(at.read(half[h]))
            scores[h].append(at.read(half[not h]))
    return np.nanmean(np.stack([best_within_crossfit(picks[h], scores[h])
                                for h in (True, False)]), axis=0)


def interval(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The percentile interval at LEVEL over replicates 1.. (axis 0)."""
    tail = (1 - LEVEL) / 2 * 100
    return (np.nanpercentile(samples[1:], tail, axis=0),
            np.nanpercentile(samples[1:], 100 - tail, axis=0))


def verdict(diff: np.ndarray) -> str:
    """'above', 'below' or 'level' for one difference's replicates (R,): above or below
    when the whole interval is; 'n/a' without data (no difference on the data itself, or
    in no replicate)."""
    lo, hi = interval(diff[:, None])
    if np.isnan(diff[0]) or np.isnan(lo[0]):
        return "n/a"
    return "above" if lo[0] > 0 else "below" if hi[0] < 0 else "level"


class Path(NamedTuple):
    """One (method, beta)'s seed-mean path on the data, per evaluation (T,)."""
    steps: np.ndarray
    reward: np.ndarray
    kl: np.ndarray
    entropy: np.ndarray
    distinct: np.ndarray  # (T, 2) distinct-1, distinct-2


@dataclasses.dataclass
class MethodStats:
    best: np.ndarray          # (R, G): best reward within each grid value as a budget
    diversity: np.ndarray     # (R, L): most sample entropy at each reward level or above
    distinct: np.ndarray      # (L, 2): distinct-1/2 at the data's most-entropy reading
    reach: float              # the largest seed-mean sample KL of any beta's path
    paths: dict               # beta -> Path
    gap: dict                 # beta -> (steps, (R, T) rejected-minus-chosen eval KL)
    gap_at_kl: dict           # beta -> (R, G) that gap where the path first has each KL
    last_steps: dict          # beta -> each seed's last evaluated step


def method_stats(by_beta: dict, d: Draws, grid: np.ndarray,
                 levels: np.ndarray) -> MethodStats:
    """Everything the report needs of one method, from its Trajectory per beta: `grid` the
    KL values (ascending), `levels` the reward levels (descending: a reading at a level
    or above it counts for it)."""
    paths, gap, gap_at_kl, last_steps, reach = {}, {}, {}, {}, 0.0
    pick, carried = [], []  # the data's entropy and distinct-n readings at the levels
    for beta, tr in by_beta.items():
        reward, kl, entropy = (seed_means(v, d.prompts, d.seeds)
                               for v in (tr.reward, tr.sample_kl, tr.sample_entropy))
        # Run-level values, without per-prompt ones to resample: the data's seed means
        # alone (NaN where a seed's run had ended, as seed_means has it).
        distinct = tr.distinct.mean(axis=1)
        paths[beta] = Path(tr.steps, reward[0], kl[0], entropy[0], distinct)
        reach = max(reach, float(np.nanmax(kl[0])))
        at = crossing(entropy[:1], reward[:1], levels)
        pick.append(at.read(entropy[:1]))
        carried.append(np.stack([at.read(distinct[None, :, k]) for k in (0, 1)], axis=-1))
        c = seed_means(tr.kl_chosen, d.pairs, d.seeds)
        r = seed_means(tr.kl_rejected, d.pairs, d.seeds)
        gap[beta], last_steps[beta] = (tr.steps, r - c), tr.last_steps()
        gap_at_kl[beta] = at_level(r - c, kl, grid, first=True)
    best = best_crossfit([(tr.reward, tr.sample_kl) for tr in by_beta.values()], d, grid)
    diversity = best_crossfit([(tr.sample_entropy, tr.reward) for tr in by_beta.values()],
                              d, levels)
    distinct = chosen(np.stack(pick, axis=1), np.stack(carried, axis=1))[0]
    return MethodStats(best, diversity, distinct, reach, paths, gap, gap_at_kl, last_steps)


def grid_to(top: float) -> np.ndarray:
    """KL values from 0 to top, ascending."""
    return np.round(np.arange(0, top + GRID_STEP / 2, GRID_STEP), 10)


def levels_from(top: float, bottom: float) -> np.ndarray:
    """Reward levels from top down to bottom."""
    return np.round(np.arange(top, bottom - LEVEL_STEP / 2, -LEVEL_STEP), 10)
