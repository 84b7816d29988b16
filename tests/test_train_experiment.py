"""The frontier experiment: its statistics on small made-up data, and a short run end to
end."""
import json

import numpy as np
import pytest
from training_runs import run_python

from tdpo_ext.training import experiment as E
from tdpo_ext.training import frontier_stats as S


def test_quick_frontier_run_writes_its_report(tmp_path):
    run_python("-m", "tdpo_ext.training.experiment", "frontier", "--quick", "--out", tmp_path,
               "--betas", "0.1", "--seeds", "0,1", "--methods", "DPO,TDPO2 a=0.5",
               "--draws", "50")
    points = json.loads((tmp_path / "frontier_points.json").read_text())
    assert {p["method"] for p in points} == {"DPO", "TDPO2 a=0.5"}
    assert {(p["seed"], p["step"]) for p in points} == {(s, t) for s in (0, 1)
                                                        for t in (0, 1, 2)}
    assert all(p["sample_entropy"] > 0 and 0 < p["distinct_1"] <= 1 for p in points)
    report = (tmp_path / "frontier.md").read_text()
    assert "| DPO | 0.1 | 2-2 |" in report
    # the verdict rows: per KL budget, then per reward level
    assert report.count("| TDPO2 a=0.5 | **") == 2
    assert "## Reward against sample diversity" in report
    assert "- **Does TDPO keep more diversity than DPO at equal reward?** " in report
    assert "-0.00" not in report
    for name in ("frontier.png", "frontier_diversity.png", "frontier_kl.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_readings_interpolate_between_evaluations():
    reward, kl = np.array([[0, 0.5, 0.9]]), np.array([[0, 1, 3.0]])
    got = S.at_level(reward, kl, np.array([0, 0.5, 2, 4.0]))
    np.testing.assert_allclose(got[0, :3], [0, 0.25, 0.7])
    assert np.isnan(got[0, 3])  # the path never gets that far
    # A path whose KL goes back: the best crossing, or the first one.
    value, kl = np.array([[0, 1, 5, 2.0]]), np.array([[0, 2, 1, 3.0]])
    assert S.at_level(value, kl, np.array([1.5]))[0, 0] == pytest.approx(4.25)
    assert S.at_level(value, kl, np.array([1.5]), first=True)[0, 0] == pytest.approx(0.75)
    # Another series of the same path, read at the same crossing (the best one, 4.25).
    at = S.crossing(value, kl, np.array([1.5]))
    assert at.read(np.array([[0, 10, 20, 30.0]]))[0, 0] == pytest.approx(22.5)
    # Two evaluations at the same KL: the larger value of the two, and its series value.
    at = S.crossing(np.array([[0, 1, 3.0]]), np.array([[0, 2, 2.0]]), np.array([1.0, 2.0]))
    np.testing.assert_allclose(at.read(np.array([[0, 10, 20.0]]))[0], [5, 20])


def test_seed_means_end_where_a_drawn_seed_has_ended():
    values = np.ones((2, 2, 3))
    values[:, 1] = 3.0
    values[1, 1] = np.nan  # seed 1 stopped before the second evaluation
    seeds = np.array([[1, 1], [2, 0]])
    weights = np.ones((2, 2, 3)) * seeds[:, :, None]
    got = S.seed_means(values, weights, seeds)
    assert got[0, 0] == 2.0 and np.isnan(got[0, 1])
    assert got[1].tolist() == [1.0, 1.0]  # a replicate without seed 1


def test_draws_resample_seeds_then_examples_and_keep_the_data_first():
    d = S.draw(4, 10, 6, draws=200, seed=1)
    assert (d.seeds[0] == 1).all() and (d.prompts[0] == 1).all() and (d.pairs[0] == 1).all()
    assert (d.seeds.sum(1) == 4).all()
    assert (d.prompts.sum(2) == 10 * d.seeds).all() and (d.pairs.sum(2) == 6 * d.seeds).all()
    assert len({tuple(r) for r in d.seeds[1:]}) > 20


def paths(true_reward, n_steps, noise, rng, n_prompts=64, n_seeds=4,
          true_entropy=lambda reward: 2 - reward, entropy_noise=0.3):
    """A Trajectory whose KL grows linearly to 4 nats over n_steps evaluations, with the
    reward true_reward(kl) and the sample entropy true_entropy(true reward), each plus
    per-sample noise."""
    kl = np.linspace(0, 4, n_steps)
    shape = (n_steps, n_seeds, n_prompts)
    reward = true_reward(kl)[:, None, None] + noise * rng.standard_normal(shape)
    entropy = (true_entropy(true_reward(kl))[:, None, None]
               + entropy_noise * rng.standard_normal(shape))
    pairs = np.zeros((n_steps, n_seeds, 5))
    distinct = np.stack([np.linspace(0.2, 0.1, n_steps)] * 2, axis=-1)[:, None]
    return S.Trajectory(np.arange(n_steps) * 20, reward, np.broadcast_to(kl[:, None, None],
                        shape).copy(), entropy, pairs, pairs + kl[:, None, None],
                        np.repeat(distinct, n_seeds, axis=1))


LEVELS = S.levels_from(1.0, 0.1)


def test_many_noisy_evaluations_do_not_win_by_their_number():
    """Two methods with the same true frontier, one evaluated 100 times on its way to 4
    nats, the other 5 times: scored on its own data, the best reading of the many would be
    biased upwards; cross-fitted, they are level."""
    rng = np.random.default_rng(0)
    flat = lambda kl: np.minimum(kl, 1.0) * 0.5  # noqa: E731  rises, then a plateau
    grid = S.grid_to(4.0)
    d = S.draw(4, 64, 5, draws=300, seed=2)
    slow = S.method_stats({0.1: paths(flat, 100, 0.5, rng)}, d, grid, LEVELS)
    fast = S.method_stats({0.1: paths(flat, 5, 0.5, rng)}, d, grid, LEVELS)
    at4 = np.argmin(np.abs(grid - 4.0))
    assert S.verdict(slow.best[:, at4] - fast.best[:, at4]) == "level"
    assert abs(slow.best[0, at4] - 0.5) < 0.05
    # the plain maximum over the slow path's 100 readings, for contrast
    naive = np.nanmax(slow.paths[0.1].reward)
    assert naive > 0.5 + 0.05


def test_a_path_that_hovers_around_a_level_gains_nothing_from_its_many_crossings():
    """A path whose KL goes back and forth across 2 nats 200 times (as a reward on a
    plateau hovers around a level), its value 0.5 throughout plus noise: the best within 2
    nats is scored where the picking half crossed, so it stays 0.5 within 3 standard errors
    (per sample 0.5, over 4 seeds * 32 prompts per half: 0.044; half way between two
    evaluations: / sqrt(2); the two halves' scores averaged: / sqrt(2) again: 0.022). Read
    at the scoring half's own crossings, it would be the largest of 200 noisy readings
    (0.58 to 0.61 over five seeds of this test)."""
    rng = np.random.default_rng(0)
    shape = (201, 4, 64)
    along = np.broadcast_to(np.where(np.arange(201) % 2 == 0, 1.9, 2.1)[:, None, None], shape)
    value = 0.5 + 0.5 * rng.standard_normal(shape)
    best = S.best_crossfit([(value, along)], S.draw(4, 64, 5, draws=200, seed=4),
                           np.array([2.0]))
    assert abs(best[0, 0] - 0.5) < 3 * 0.022
    assert S.verdict(best[:, 0] - 0.5) == "level"


# Noise of the diversity tests, per sample: the reward's 0.3 is the full frontier run's
# (the spread of a run's mean reward between consecutive evaluations, 0.018 over 256
# prompts, times sqrt(256)); the entropy's is of the same size. With 128 prompts, half of
# them per cross-fitted reading and 4 seeds, a reading's reward and entropy have a standard
# error of 0.3 / sqrt(4 * 64) = 0.019 each, and a reading's error in entropy is about
# sqrt(2) * 0.019 = 0.027 (its own, and the reward's times the slope, 1 here). READ_TOL is
# that times 2.5: a method's reading lies within it of the truth, and a true difference
# of twice that or more is found.
DIVERSITY_NOISE = dict(noise=0.3, entropy_noise=0.3, n_prompts=128)
READ_TOL = 2.5 * 0.027
RISE = lambda kl: 0.2 * kl  # noqa: E731  reward 0 to 0.8 over the 4 nats of KL


def diversity(by_method, draws=300):
    """Each made-up method's MethodStats at the report's reward levels (0.1 to 0.7), and
    the verdicts of the others against the first."""
    d = S.draw(4, DIVERSITY_NOISE["n_prompts"], 5, draws=draws, seed=3)
    stats = {m: S.method_stats({0.1: tr}, d, S.grid_to(4.0), LEVELS)
             for m, tr in by_method.items()}
    cols = [int(np.argmin(np.abs(LEVELS - r))) for r in E.REWARD_LEVELS]
    base = stats.pop("DPO")
    verdicts = {m: [S.verdict(st.diversity[:, j] - base.diversity[:, j]) for j in cols]
                for m, st in stats.items()}
    return base, stats, cols, verdicts


def test_more_sample_entropy_at_equal_reward_is_above():
    """DPO's sample entropy falls by 1 nat per unit of reward, the other's by half as
    much, from the same SFT model's 2 nats: at equal reward, the other keeps 0.5 * reward
    more, 0.15 to 0.35 nats at the levels 0.3 to 0.7 (at least twice READ_TOL)."""
    rng = np.random.default_rng(0)
    _, stats, cols, verdicts = diversity({
        "DPO": paths(RISE, 20, rng=rng, **DIVERSITY_NOISE),
        "TDPO": paths(RISE, 20, rng=rng, true_entropy=lambda r: 2 - 0.5 * r,
                      **DIVERSITY_NOISE)})
    assert verdicts["TDPO"][2:] == ["above"] * 5, verdicts
    got = stats["TDPO"].diversity[0, cols]
    np.testing.assert_allclose(got, 2 - 0.5 * np.array(E.REWARD_LEVELS), atol=READ_TOL)


def test_equal_sample_entropy_is_level_however_many_evaluations():
    """The same true reward/entropy curve, evaluated 100 times on its way or 5 times: the
    most entropy at a reward level is level at every level, and each reading within
    READ_TOL of the truth, though the many evaluations cross each level many times."""
    rng = np.random.default_rng(1)
    base, stats, cols, verdicts = diversity({
        "DPO": paths(RISE, 5, rng=rng, **DIVERSITY_NOISE),
        "TDPO": paths(RISE, 100, rng=rng, **DIVERSITY_NOISE)})
    assert verdicts["TDPO"] == ["level"] * len(cols), verdicts
    truth = 2 - np.array(E.REWARD_LEVELS)
    for st in (base, stats["TDPO"]):
        np.testing.assert_allclose(st.diversity[0, cols], truth, atol=READ_TOL)


def test_a_level_is_reached_by_the_path_on_all_prompts_not_by_a_half():
    """A reward that stalls at 0.45, 0.55 on the even prompts and 0.35 on the odd ones (as
    a half's noise can carry it): the path on all prompts never reaches 0.5, so there is no
    reading there, though the even half's path crosses 0.5 on its way to 0.55."""
    tr = paths(lambda kl: np.minimum(RISE(kl), 0.45), 100, 0.0, np.random.default_rng(0),
               n_prompts=128)
    tr.reward[:, :, 0::2] += 0.1
    tr.reward[:, :, 1::2] -= 0.1
    st = S.method_stats({0.1: tr}, S.draw(4, 128, 5, draws=20), S.grid_to(4.0), LEVELS)
    at = [int(np.argmin(np.abs(LEVELS - r))) for r in (0.4, 0.5)]
    assert not np.isnan(st.diversity[0, at[0]]) and np.isnan(st.diversity[:, at[1]]).all()


def test_distinct_n_is_read_at_the_most_entropy_reading():
    """Noise-free: the most entropy at reward >= 0.4 is where the path reaches 0.4 (2 nats of
    KL, half way), where the made-up distinct-n (0.2 falling to 0.1) is 0.15."""
    tr = paths(RISE, 9, 0.0, np.random.default_rng(0), entropy_noise=0.0)
    st = S.method_stats({0.1: tr}, S.draw(4, 64, 5, draws=5), S.grid_to(4.0), LEVELS)
    at = int(np.argmin(np.abs(LEVELS - 0.4)))
    assert st.diversity[0, at] == pytest.approx(1.6)
    np.testing.assert_allclose(st.distinct[at], [0.15, 0.15])
    assert np.isnan(st.distinct[0]).all()  # reward 1.0: never reached


def test_verdicts_follow_the_interval():
    rng = np.random.default_rng(0)
    assert S.verdict(0.1 + 0.01 * rng.standard_normal(500)) == "above"
    assert S.verdict(-0.1 + 0.01 * rng.standard_normal(500)) == "below"
    assert S.verdict(0.01 + 0.05 * rng.standard_normal(500)) == "level"
    assert S.verdict(np.full(10, np.nan)) == "n/a"


def test_the_gap_is_rejected_minus_chosen():
    rng = np.random.default_rng(0)
    tr = paths(lambda kl: kl * 0.1, 5, 0.1, rng)
    st = S.method_stats({0.3: tr}, S.draw(4, 64, 5, draws=20), S.grid_to(4.0), LEVELS)
    steps, gap = st.gap[0.3]
    np.testing.assert_allclose(gap[0], np.linspace(0, 4, 5))
    assert st.reach == pytest.approx(4.0)


def test_run_names_are_distinct():
    names = {E.slug(m, b, s) for m in E.METHODS for b in (0.1, 1.0) for s in (0, 1)}
    assert len(names) == len(E.METHODS) * 4
