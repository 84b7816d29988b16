"""tdpo-train --parallel fsdp: FSDP2 (torch's fully_shard) over two CPU processes (gloo on
127.0.0.1), against one unsharded process on the same global batches; a sharded run
killed and resumed from its sharded checkpoint against an uninterrupted one, and one
planted with code refused; the fused LM head of a transformers model under FSDP2; and the
refusal of fsdp in one process."""
import os
import shutil

import pytest
import torch
from training_runs import (ROOT, assert_same_metrics, assert_trained_alike, final_params,
                           folder_digest, pairs, plant_in_sharded_checkpoint, read_metrics,
                           save_tiny_llama, tdpo_train, torchrun_2, transformers_state,
                           without_time, write_pairs)

from tdpo_ext.training import models as M
from tdpo_ext.training import train

assert pairs  # a fixture

# At a learning rate that moves the model, with two micro-batches per step and process
# (the first one's gradients kept local), a checkpoint at step 2 and evaluations at 0, 3.
COMMON = ["--eval-every", "3", "--save-every", "2", "--steps", "3", "--batch-size", "8",
          "--grad-accum", "2", "--lr", "3e-3", "--warmup-steps", "0", "--no-plots"]


def fsdp_args(data, out):
    return ["--data", data, "--eval-data", data, *COMMON, "--out", out]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """An uninterrupted FSDP2 run of two processes, on `pairs`' data, which the tests
    below compare with and do not change: its folder."""
    folder = tmp_path_factory.mktemp("fsdp")
    out = folder / "run"
    torchrun_2("-m", "tdpo_ext.training.train",
               *fsdp_args(write_pairs(folder / "pairs.jsonl"), out), "--parallel", "fsdp")
    return out


def test_fsdp_two_processes_equal_one_process(tmp_path, pairs, fsdp_run):
    """Every logged metric (the gradient norm, whose sharded parts must be summed over
    processes, included) and the final parameters (gathered from the shards into final/,
    which loads again as --model) equal one unsharded process's."""
    single = tmp_path / "single"
    tdpo_train(*fsdp_args(pairs, single))
    s = assert_same_metrics(single, fsdp_run)
    assert len(s) == 4 and abs(s[-1]["loss/train"] - s[1]["loss/train"]) > 0.05  # moved
    assert_trained_alike(final_params(fsdp_run), final_params(single), single)
    assert (fsdp_run / "checkpoint" / "training_state.pt").exists()
    model, _ = M.load_model(str(fsdp_run / "final"))
    assert isinstance(model, M.TinyGPT)


# Kill points: after the step-2 checkpoint (on both processes), and midway through
# writing the step-3 one (rank 0's part, last of it), which must leave the step-2
# checkpoint in place.
KILL_POINTS = ["step tdpo2 2", "torch.save */checkpoint*/training_state.pt 3"]


def test_fsdp_killed_and_resumed_ends_as_an_uninterrupted_run(tmp_path, pairs, fsdp_run):
    killed, used = tmp_path / "killed", tmp_path / "used_points"
    faults = os.path.join(ROOT, "tests", "train_with_faults.py")
    args = [*fsdp_args(pairs, killed), "--parallel", "fsdp"]
    for attempt in range(len(KILL_POINTS) + 1):
        p = torchrun_2(faults, used, ";".join(KILL_POINTS),
                       *(args if attempt == 0 else ["--resume", killed]), check=False)
        if p.returncode == 0:
            break
        assert not (killed / "final").exists(), p.stdout + p.stderr
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(set(used.read_text().splitlines())) == sorted(KILL_POINTS)
    assert without_time(read_metrics(killed)) == without_time(read_metrics(fsdp_run))
    a, b = final_params(fsdp_run), final_params(killed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kind", ["metadata", "rank_local"])
def test_fsdp_resume_refuses_a_checkpoint_that_would_run_code(tmp_path, fsdp_run, kind):
    """torch.distributed.checkpoint reads its .metadata with plain pickle, and falls back
    on each rank's __<rank>.metadata when it cannot use that: code planted in either is
    refused by both processes before it runs (more planted files, in one process:
    tests/test_checkpoint_safety.py), and the run folder is left as it was."""
    run, marker = tmp_path / "run", tmp_path / "code_ran"
    shutil.copytree(fsdp_run, run)
    path = plant_in_sharded_checkpoint(kind, str(run / "checkpoint"), marker)
    before = folder_digest(run)
    p = torchrun_2("-m", "tdpo_ext.training.train", "--resume", run, check=False)
    assert not marker.exists(), "the checkpoint's code ran"
    assert p.returncode != 0 and f"refused to load {path}" in p.stderr, p.stdout + p.stderr
    assert folder_digest(run) == before


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fused_linear_under_fsdp_equals_one_process(tmp_path, pairs, tied):
    """--fused-linear --parallel fsdp on a transformers Llama: the loss is computed inside
    the sharded root's forward, which gathers the head (tied to the embeddings or not)
    once; its gradient is reduce-scattered like every other. The final parameters equal
    one process's, and final/ is an ordinary transformers folder."""
    folder = save_tiny_llama(tmp_path / "hf_model", tied=tied)
    common = ["--model", folder, "--data", pairs, "--eval-data", pairs, "--task", "none",
              "--steps", "2", "--batch-size", "8", "--eval-every", "2", "--lr", "3e-3",
              "--warmup-steps", "0", "--fused-linear", "--no-plots"]
    tdpo_train(*common, "--out", tmp_path / "single")
    torchrun_2("-m", "tdpo_ext.training.train", *common, "--parallel", "fsdp",
               "--out", tmp_path / "fsdp")
    start, one = transformers_state(folder), transformers_state(tmp_path / "single" / "final")
    sharded, _ = M.load_model(str(tmp_path / "fsdp" / "final"))
    assert (sharded.lm_head.weight is sharded.model.embed_tokens.weight) == tied
    # written as save_pretrained writes it, a tied head once
    assert saved_tensor_names(tmp_path / "fsdp") == saved_tensor_names(tmp_path / "single")
    assert not torch.equal(one["lm_head.weight"], start["lm_head.weight"])  # it has moved
    assert_trained_alike(sharded.state_dict(), one, tmp_path / "single")
    assert_same_metrics(tmp_path / "single", tmp_path / "fsdp")


def saved_tensor_names(run):
    from safetensors import safe_open
    with safe_open(str(run / "final" / "model.safetensors"), "pt") as f:
        return sorted(f.keys())


def test_fsdp_evaluation_and_sampling_take_every_process(tmp_path, pairs):
    """Every forward of a sharded model needs all processes: with 5 eval pairs over 2
    processes (3 and 2, in batches of 2) and the task's sampling evaluation (which one
    unsharded process would run alone), the run finishes instead of waiting forever, and
    logs what one process logs."""
    common = ["--data", pairs, "--eval-data", pairs, "--eval-data-size", "5", "--task",
              "sentiment", "--eval-prompts", "4", "--max-new-tokens", "6", "--steps", "2",
              "--batch-size", "4", "--eval-every", "2", "--lr", "3e-3", "--no-plots"]
    tdpo_train(*common, "--out", tmp_path / "single")
    torchrun_2("-m", "tdpo_ext.training.train", *common, "--parallel", "fsdp",
               "--out", tmp_path / "fsdp", timeout=120)
    rows = assert_same_metrics(tmp_path / "single", tmp_path / "fsdp")
    assert "task_reward/eval" in rows[-1]


def test_fsdp_in_one_process_is_refused(tmp_path, pairs):
    with pytest.raises(SystemExit, match="--parallel fsdp shards the model over the "
                       "processes of a torchrun group; this is one process"):
        train.main(["--data", pairs, "--steps", "1", "--batch-size", "4", "--parallel",
                    "fsdp", "--no-plots", "--out", str(tmp_path / "run")])
