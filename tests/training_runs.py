"""Helpers of the training tests: tdpo-train in a subprocess, a small preference data
file, and a run's outputs."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The embedded pipeline (SFT, pairs, TDPO2) at a size that runs in seconds.
TINY_PIPELINE = ["--sft-steps", "4", "--sft-batch-size", "8", "--pair-prompts", "24",
                 "--eval-data-size", "8", "--eval-prompts", "8", "--steps", "4",
                 "--batch-size", "8", "--eval-every", "2", "--max-new-tokens", "12"]
REVIEWS = [("the movie was", "very good .", "awful ."), ("i would", "recommend it .", "not ."),
           ("the acting", "was great .", "was dull and boring ."),
           ("this film", "is wonderful .", "is bad ."), ("the plot", "was clever .", "was weak ."),
           ("overall a", "fun ride .", "painful watch ."), ("the music", "was lovely .",
                                                            "was annoying ."),
           ("the cast", "seemed strong .", "seemed lazy .")]


def env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")


def run_python(*args, check=True):
    p = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def tdpo_train(*args, check=True):
    return run_python("-m", "tdpo_ext.training.train", *args, check=check)


@pytest.fixture
def pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in REVIEWS * 2]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def without_time(rows):
    """Metrics rows without their wall-clock time, the one value two runs need not share."""
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def final_params(folder):
    return torch.load(os.path.join(folder, "final", "model.pt"), weights_only=True)


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
