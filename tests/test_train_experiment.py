"""The frontier experiment's bookkeeping (the runs themselves are the training loop's)."""
from tdpo_ext.training import experiment as E


def pt(method, beta, seed, step, reward, kl):
    return {"method": method, "beta": beta, "seed": seed, "step": step, "reward": reward,
            "sample_kl": kl, "kl_chosen": kl, "kl_rejected": 2 * kl, "accuracy": 0.5}


def test_seed_mean_averages_matching_points():
    means = E.seed_mean([pt("DPO", 0.1, 0, 10, 0.2, 1.0), pt("DPO", 0.1, 1, 10, 0.4, 3.0),
                         pt("DPO", 0.1, 0, 20, 0.5, 4.0)])
    assert [(m["step"], m["n"]) for m in means] == [(10, 2), (20, 1)]
    assert abs(means[0]["reward"] - 0.3) < 1e-12 and means[0]["sample_kl"] == 2.0


def test_frontier_is_the_upper_left_envelope():
    rows = [{"reward": r, "sample_kl": k} for r, k in
            [(0.1, 0.0), (0.3, 1.0), (0.2, 2.0), (0.6, 3.0), (0.5, 4.0)]]
    assert [(r["sample_kl"], r["reward"]) for r in E.frontier(rows)] == \
        [(0.0, 0.1), (1.0, 0.3), (3.0, 0.6)]
    assert E.best_within(rows, 2.5) == 0.3 and E.best_within(rows, 10) == 0.6


def test_run_names_are_distinct():
    names = {E.slug(m, b, s) for m in E.METHODS for b in (0.1, 1.0) for s in (0, 1)}
    assert len(names) == len(E.METHODS) * 4
