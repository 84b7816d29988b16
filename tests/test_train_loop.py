"""The training loop's state, in one process on the tiny model: the gradient that
--grad-accum 2 accumulates against --grad-accum 1's, a resume that restores the random
state (the model's dropout draws from it), and a checkpoint write interrupted midway."""
import io
import json

import pytest
import torch
from training_runs import REVIEWS

from tdpo_ext.training import checkpoint, hooks
from tdpo_ext.training import data as D
from tdpo_ext.training import models as M
from tdpo_ext.training.config import Config
from tdpo_ext.training.loop import Stage, num
from tdpo_ext.training.processes import ONE_CPU_PROCESS
from tdpo_ext.training.tasks import get_task


class Killed(Exception):
    """Stands in for a kill: the stage is dropped where it stands."""


def make_stage(folder, dropout=0.0, **settings):
    """A fresh stage of 4 TDPO2 steps, checkpointed every 2, at a learning rate that moves
    the model; the random state seeded as a new run's is."""
    cfg = Config(task="none", steps=4, batch_size=8, save_every=2, eval_every=100, lr=3e-3,
                 warmup_steps=0).replace(**settings)
    policy, tok = M.load_model("tiny", seed=0, tiny_config={"dropout": dropout})
    items = [D.tokenize_pair(*review, tok, max_length=32, max_prompt_length=8)
             for review in REVIEWS * 2]
    torch.manual_seed(0)
    return Stage(cfg.loss, str(folder), cfg, policy, M.frozen_copy(policy), tok, items, [],
                 ONE_CPU_PROCESS)


def kill_at(event_name, **at):
    def listener(event, where):
        if event == event_name and all(
                getattr(where.get("stage"), k, where.get(k)) == v for k, v in at.items()):
            raise Killed
    return listener


def test_grad_accum_2_accumulates_the_gradient_of_one_batch(tmp_path):
    def gradients(stage):
        grads = []

        def keep(event, where):
            if event == "gradients":
                grads.append(torch.cat([p.grad.flatten() for p in stage.module.parameters()]))
        with hooks.listening(keep):
            stage.run()
        return grads

    one = gradients(make_stage(tmp_path / "one", grad_accum=1))
    two = gradients(make_stage(tmp_path / "two", grad_accum=2))
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):  # float rounding apart: each micro-batch pads differently
        assert (b - a).norm() < 1e-4 * a.norm()


def test_resume_restores_the_random_state(tmp_path):
    straight = make_stage(tmp_path / "straight", dropout=0.3)
    straight.run()
    with hooks.listening(kill_at("step", step=3)), pytest.raises(Killed):
        make_stage(tmp_path / "killed", dropout=0.3).run()
    resumed = make_stage(tmp_path / "killed", dropout=0.3)
    torch.manual_seed(1)  # what the new process drew before resuming must not matter
    resumed.run()
    assert resumed.step == 4
    for a, b in zip(straight.module.parameters(), resumed.module.parameters()):
        assert torch.equal(a, b)


def test_an_interrupted_checkpoint_write_leaves_the_previous_checkpoint(tmp_path,
                                                                         monkeypatch):
    real_save = torch.save

    def killed_midway_at_step_4(obj, f):
        if obj["step"] != 4:
            return real_save(obj, f)
        whole = io.BytesIO()
        real_save(obj, whole)
        f.write(whole.getvalue()[:len(whole.getvalue()) // 2])
        raise Killed

    monkeypatch.setattr(torch, "save", killed_midway_at_step_4)
    with pytest.raises(Killed):
        make_stage(tmp_path).run()
    monkeypatch.undo()
    assert torch.load(tmp_path / checkpoint.FILE, weights_only=True)["step"] == 2
    resumed = make_stage(tmp_path)
    assert resumed.resume() and resumed.step == 2


def test_stop_sample_kl_ends_training_after_the_evaluation_past_it(tmp_path):
    """--stop-sample-kl: training stops after the first evaluation whose sample KL exceeds
    it, checkpointed there, and a resume does not go on; eval_examples.jsonl holds each
    evaluation's per-prompt and per-pair values, whose means metrics.jsonl logs."""
    task = get_task("sentiment")

    def stage():
        s = make_stage(tmp_path, steps=6, eval_every=2, save_every=100, stop_sample_kl=1e-4,
                       max_new_tokens=8)
        s.task, s.eval_prompts = task, task.prompts("eval", 6)
        s.eval_items = s.train_items[:5]
        return s

    first = stage()
    assert first.run()["steps"] == 2
    assert first.last_eval["sample_kl/eval"] > 1e-4
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2]
    examples = [json.loads(line) for line in open(tmp_path / "eval_examples.jsonl")]
    assert [r["step"] for r in examples] == [0, 2]
    for ex, row in zip(examples, (rows[0], rows[2])):
        assert len(ex["task_reward/eval"]) == len(ex["sample_kl/eval"]) == \
            len(ex["sample_entropy/eval"]) == 6
        assert len(ex["kl_eval/chosen"]) == len(ex["kl_eval/rejected"]) == 5
        for k in ("task_reward/eval", "sample_kl/eval", "sample_entropy/eval",
                  "kl_eval/chosen", "kl_eval/rejected"):
            assert sum(ex[k]) / len(ex[k]) == pytest.approx(row[k], rel=1e-6, abs=1e-9), k
    assert torch.load(tmp_path / checkpoint.FILE, weights_only=True)["step"] == 2
    again = stage()
    assert again.run()["steps"] == 2  # resumed at the checkpoint of step 2, and stopped


def test_numbers_in_log_lines_never_read_minus_zero():
    assert [num(x) for x in (-1e-9, -0.0004, 0.0, -0.0006, 1.23456)] == \
        ["0.000", "0.000", "0.000", "-0.001", "1.235"]
