"""The frontier experiment: its bookkeeping, and a short run end to end."""
import json

from training_runs import run_python

from tdpo_ext.training import experiment as E


def test_quick_frontier_run_writes_its_report(tmp_path):
    run_python("-m", "tdpo_ext.training.experiment", "frontier", "--quick", "--out", tmp_path,
               "--betas", "0.1", "--seeds", "0", "--methods", "DPO,TDPO2 a=0.5")
    points = json.loads((tmp_path / "frontier_points.json").read_text())
    assert {p["method"] for p in points} == {"DPO", "TDPO2 a=0.5"}
    assert {p["step"] for p in points} == {0, 1, 2}
    report = (tmp_path / "frontier.md").read_text()
    assert "| DPO | 0.1 |" in report and "-0.00" not in report
    for name in ("frontier.png", "frontier_kl.png"):
        assert (tmp_path / name).stat().st_size > 1000


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
