"""PNG plots of a run's metrics.jsonl (matplotlib, Agg backend)."""
from __future__ import annotations

import os

from .files import read_rows


def _series(rows, key):
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _panel(ax, rows, keys, title, ylabel):
    for key, style in keys:
        xs, ys = _series(rows, key)
        if xs:
            ax.plot(xs, ys, style, label=key, markersize=4,
                    alpha=0.5 if "_train" in key or key.endswith("/train") else 1.0)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)


def plot_run(folder: str) -> list[str]:
    """loss.png, rewards.png, kl.png and entropy.png in `folder`, from its metrics.jsonl
    (each with the panels whose metrics the run logged)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(os.path.join(folder, "metrics.jsonl"))
    written = []
    specs = {
        "loss.png": [("Loss", "loss", [("loss/train", "-"), ("loss/eval", "o-")])],
        "rewards.png": [
            ("Implicit rewards", "beta * (log-ratio + seq. KL)",
             [(f"rewards_{s}/{k}", st) for s, st in (("train", "-"), ("eval", "o-"))
              for k in ("chosen", "rejected", "margins")]),
            ("Reward accuracy", "fraction chosen > rejected",
             [("rewards_train/accuracies", "-"), ("rewards_eval/accuracies", "o-")]),
            ("Task reward of policy samples", "mean reward", [("task_reward/eval", "o-")])],
        "kl.png": [
            ("Sequential KL(ref || policy) of chosen and rejected responses", "KL (nats)",
             [(f"kl_{s}/{k}", st) for s, st in (("train", "-"), ("eval", "o-"))
              for k in ("chosen", "rejected")]),
            ("KL margin (chosen - rejected)", "KL (nats)",
             [("kl_train/margin", "-"), ("kl_eval/margin", "o-")]),
            ("Sequential KL on policy samples", "KL (nats)", [("sample_kl/eval", "o-")])],
        "entropy.png": [
            ("Policy entropy on chosen and rejected responses", "entropy per token (nats)",
             [(f"entropy_{s}/{k}", st) for s, st in (("train", "-"), ("eval", "o-"))
              for k in ("chosen", "rejected")]),
            ("Policy entropy on policy samples", "entropy per token (nats)",
             [("sample_entropy/eval", "o-")]),
            ("Distinct n-grams of policy samples", "distinct / all n-grams",
             [("distinct_1/eval", "o-"), ("distinct_2/eval", "o-")])],
    }
    for name, panels in specs.items():
        panels = [p for p in panels if any(_series(rows, k)[0] for k, _ in p[2])]
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
        for ax, (title, ylabel, keys) in zip(axes[0], panels):
            _panel(ax, rows, keys, title, ylabel)
        fig.tight_layout()
        fig.savefig(os.path.join(folder, name), dpi=100)
        plt.close(fig)
        written.append(name)
    return written
