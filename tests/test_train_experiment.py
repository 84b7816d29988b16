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
    report = (tmp_path / "frontier.md").read_text()
    assert "| TDPO2 a=0.5 | **" in report and "| DPO | 0.1 | 2-2 |" in report
    assert "-0.00" not in report
    for name in ("frontier.png", "frontier_kl.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_readings_interpolate_between_evaluations():
    reward, kl = np.array([[0, 0.5, 0.9]]), np.array([[0, 1, 3.0]])
    got = S.at_kl(reward, kl, np.array([0, 0.5, 2, 4.0]))
    np.testing.assert_allclose(got[0, :3], [0, 0.25, 0.7])
    assert np.isnan(got[0, 3])  # the path never gets that far
    # A path whose KL goes back: the best crossing, or the first one.
    value, kl = np.array([[0, 1, 5, 2.0]]), np.array([[0, 2, 1, 3.0]])
    assert S.at_kl(value, kl, np.array([1.5]))[0, 0] == pytest.approx(4.25)
    assert S.at_kl(value, kl, np.array([1.5]), first=True)[0, 0] == pytest.approx(0.75)


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


def paths(true_reward, n_steps, noise, rng, n_prompts=64, n_seeds=4):
    """A Trajectory whose KL grows linearly to 4 nats over n_steps evaluations, with the
    reward true_reward(kl) plus per-sample noise."""
    kl = np.linspace(0, 4, n_steps)
    shape = (n_steps, n_seeds, n_prompts)
    reward = true_reward(kl)[:, None, None] + noise * rng.standard_normal(shape)
    pairs = np.zeros((n_steps, n_seeds, 5))
    return S.Trajectory(np.arange(n_steps) * 20, reward, np.broadcast_to(kl[:, None, None],
                        shape).copy(), pairs, pairs + kl[:, None, None])


def test_many_noisy_evaluations_do_not_win_by_their_number():
    """Two methods with the same true frontier, one evaluated 100 times on its way to 4
    nats, the other 5 times: scored on its own data, the best reading of the many would be
    biased upwards; cross-fitted, they are level."""
    rng = np.random.default_rng(0)
    flat = lambda kl: np.minimum(kl, 1.0) * 0.5  # noqa: E731  rises, then a plateau
    grid = S.grid_to(4.0)
    d = S.draw(4, 64, 5, draws=300, seed=2)
    slow = S.method_stats({0.1: paths(flat, 100, 0.5, rng)}, d, grid)
    fast = S.method_stats({0.1: paths(flat, 5, 0.5, rng)}, d, grid)
    at4 = np.argmin(np.abs(grid - 4.0))
    assert S.verdict(slow.best[:, at4] - fast.best[:, at4]) == "level"
    assert abs(slow.best[0, at4] - 0.5) < 0.05
    # the plain maximum over the slow path's 100 readings, for contrast
    naive = np.nanmax(slow.paths[0.1][1])
    assert naive > 0.5 + 0.05


def test_verdicts_follow_the_interval():
    rng = np.random.default_rng(0)
    assert S.verdict(0.1 + 0.01 * rng.standard_normal(500)) == "above"
    assert S.verdict(-0.1 + 0.01 * rng.standard_normal(500)) == "below"
    assert S.verdict(0.01 + 0.05 * rng.standard_normal(500)) == "level"
    assert S.verdict(np.full(10, np.nan)) == "n/a"


def test_the_gap_is_rejected_minus_chosen():
    rng = np.random.default_rng(0)
    tr = paths(lambda kl: kl * 0.1, 5, 0.1, rng)
    st = S.method_stats({0.3: tr}, S.draw(4, 64, 5, draws=20), S.grid_to(4.0))
    steps, gap = st.gap[0.3]
    np.testing.assert_allclose(gap[0], np.linspace(0, 4, 5))
    assert st.reach == pytest.approx(4.0)


def test_run_names_are_distinct():
    names = {E.slug(m, b, s) for m in E.METHODS for b in (0.1, 1.0) for s in (0, 1)}
    assert len(names) == len(E.METHODS) * 4
