"""The frontier experiment's statistics: seed-mean trajectories, the best reward each method
reaches within a KL budget, the rejected-minus-chosen KL gap, and bootstrap intervals for
them over seeds and eval examples, with verdicts against a baseline.

Every statistic is computed on the original data and on `draws` bootstrap replicates. A
replicate resamples the seeds with replacement and, within each drawn seed, the eval
prompts (or eval pairs) with replacement; the same draw serves every method and beta, so
differences between methods are paired by seed and by example.

A run's evaluations are vertices of a path in the (sample KL, task reward) plane. The
reward "at" a KL value is read off the seed-mean path by linear interpolation between the
two evaluations around it (a mix of those two policies, drawn per sequence, gets that
reward with at most that KL, by the convexity of KL), at every point of a fixed KL grid,
so a path whose KL grows in 20 steps is read as finely as one that takes 2000. The best
reading within a budget is chosen on one half of the eval prompts and scored on the
other (best_within_crossfit): a maximum over noisy readings is biased upwards, the more
so the more readings there are, which would favour the slowest methods."""
from __future__ import annotations

import dataclasses

import numpy as np

GRID_STEP = 0.05  # nats between the KL values at which rewards are read
LEVEL = 0.95


@dataclasses.dataclass
class Trajectory:
    """One (method, beta)'s evaluations over seeds: `steps` (T,), and per-example arrays
    (T, seeds, examples), NaN where a seed's run had ended before that step."""
    steps: np.ndarray
    reward: np.ndarray       # per eval prompt: task reward of the policy's sample
    sample_kl: np.ndarray    # per eval prompt: sequential KL on that sample
    kl_chosen: np.ndarray    # per eval pair
    kl_rejected: np.ndarray  # per eval pair

    def last_steps(self) -> list[int]:
        """Each seed's last evaluated step (where its run ended)."""
        return [int(self.steps[~np.isnan(self.reward[:, j, 0])][-1])
                for j in range(self.reward.shape[1])]


def trajectory(runs: list[list[dict]]) -> Trajectory:
    """From each seed's eval_examples.jsonl rows (one list per seed, same eval sets)."""
    steps = sorted({r["step"] for rows in runs for r in rows})
    at = {s: i for i, s in enumerate(steps)}

    def stack(key):
        width = len(runs[0][0][key])
        out = np.full((len(steps), len(runs), width), np.nan)
        for j, rows in enumerate(runs):
            for r in rows:
                out[at[r["step"]], j] = r[key]
        return out

    return Trajectory(np.array(steps), stack("task_reward/eval"), stack("sample_kl/eval"),
                      stack("kl_eval/chosen"), stack("kl_eval/rejected"))


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


def at_kl(value: np.ndarray, kl: np.ndarray, grid: np.ndarray, first=False) -> np.ndarray:
    """(R, G) a seed-mean path's value (value, kl: (R, T), steps in order) where its KL
    equals each grid value, interpolated between consecutive evaluations: the largest
    such value, or with first=True the one where the path first has that KL; NaN where
    the path never has it."""
    r0, r1, k0, k1 = value[:, :-1, None], value[:, 1:, None], kl[:, :-1, None], kl[:, 1:, None]
    g = grid[None, None, :]
    lo, hi = np.minimum(k0, k1), np.maximum(k0, k1)
    inside = (lo <= g) & (g <= hi)  # NaN (an ended run) compares False
    span = np.where(hi > lo, k1 - k0, 1.0)
    frac = np.where(hi > lo, (g - k0) / span, 0.0)
    value = np.where(hi > lo, r0 + frac * (r1 - r0), np.maximum(r0, r1))
    if first:
        hit = inside.argmax(axis=1)[:, None, :]
        out = np.take_along_axis(value, hit, axis=1)[:, 0]
        return np.where(inside.any(axis=1), out, np.nan)
    out = np.where(inside, value, -np.inf).max(axis=1)
    return np.where(np.isfinite(out), out, np.nan)


def best_within_crossfit(pick: list[np.ndarray], score: list[np.ndarray]) -> np.ndarray:
    """(R, G) the best reward within each grid value taken as a budget, over several
    paths' readings on the grid (at_kl; one path per beta, (R, G) each): the reading is
    chosen on one half of the eval prompts (`pick`) and its reward taken from the other
    half (`score`). The noise that makes a reading look best then does not count in its
    favour, so a method with more readings near a budget gains nothing from having more
    chances. NaN: no reading. Made non-decreasing in the budget afterwards (a larger
    budget allows all that a smaller one does), a maximum over readings that are mostly
    the same point, scored on the other half."""
    pick, score = np.stack(pick, axis=1), np.stack(score, axis=1)  # (R, betas, G)
    r, b, g = pick.shape
    out = np.full((r, g), np.nan)
    for j in range(g):
        cand = np.where(np.isnan(pick[:, :, :j + 1]), -np.inf, pick[:, :, :j + 1])
        flat = cand.reshape(r, -1)
        idx = flat.argmax(axis=1)
        chosen = score[:, :, :j + 1].reshape(r, -1)[np.arange(r), idx]
        out[:, j] = np.where(np.isfinite(flat[np.arange(r), idx]), chosen, np.nan)
    # A larger budget allows all that a smaller one does: its best is never less.
    return np.fmax.accumulate(out, axis=1)


def interval(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The percentile interval at LEVEL over replicates 1.. (axis 0)."""
    tail = (1 - LEVEL) / 2 * 100
    return (np.nanpercentile(samples[1:], tail, axis=0),
            np.nanpercentile(samples[1:], 100 - tail, axis=0))


def verdict(diff: np.ndarray) -> str:
    """'above', 'below' or 'level' for one difference's replicates (R,): above or below
    when the whole interval is; 'n/a' without data."""
    lo, hi = interval(diff[:, None])
    if np.isnan(lo[0]):
        return "n/a"
    return "above" if lo[0] > 0 else "below" if hi[0] < 0 else "level"


@dataclasses.dataclass
class MethodStats:
    best: np.ndarray          # (R, G): best reward within each grid value as a budget
    reach: float              # the largest seed-mean sample KL of any beta's path
    paths: dict               # beta -> (steps, seed-mean reward, seed-mean KL) of the data
    gap: dict                 # beta -> (steps, (R, T) rejected-minus-chosen eval KL)
    gap_at_kl: dict           # beta -> (R, G) that gap where the path first has each KL
    last_steps: dict          # beta -> each seed's last evaluated step


def method_stats(by_beta: dict, d: Draws, grid: np.ndarray) -> MethodStats:
    """Everything the report needs of one method, from its Trajectory per beta."""
    paths, gap, gap_at_kl, last_steps, reach = {}, {}, {}, {}, 0.0
    even = np.arange(d.prompts.shape[2]) % 2 == 0
    halves = {True: [], False: []}  # per half of the eval prompts: readings, per beta
    for beta, tr in by_beta.items():
        reward = seed_means(tr.reward, d.prompts, d.seeds)
        kl = seed_means(tr.sample_kl, d.prompts, d.seeds)
        for half, readings in halves.items():
            w = d.prompts * (even == half)
            readings.append(at_kl(seed_means(tr.reward, w, d.seeds),
                                  seed_means(tr.sample_kl, w, d.seeds), grid))
        paths[beta] = (tr.steps, reward[0], kl[0])
        reach = max(reach, float(np.nanmax(kl[0])))
        c = seed_means(tr.kl_chosen, d.pairs, d.seeds)
        r = seed_means(tr.kl_rejected, d.pairs, d.seeds)
        gap[beta], last_steps[beta] = (tr.steps, r - c), tr.last_steps()
        gap_at_kl[beta] = at_kl(r - c, kl, grid, first=True)
    a, b = halves[True], halves[False]
    best = np.nanmean(np.stack([best_within_crossfit(a, b), best_within_crossfit(b, a)]),
                      axis=0)
    return MethodStats(best, reach, paths, gap, gap_at_kl, last_steps)


def grid_to(top: float) -> np.ndarray:
    return np.round(np.arange(0, top + GRID_STEP / 2, GRID_STEP), 10)
