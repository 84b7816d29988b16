"""tdpo_ext.trl's fused LM head under really sharded training: FSDP2 and DeepSpeed ZeRO-3,
two CPU processes (gloo) under `accelerate launch` with the configs of examples/, against
one process on the same global batch. trl_sharded_run.py runs the configurations (separate
reference with untied and tied heads, PEFT LoRA without a reference, sync_ref_model,
gradient checkpointing on and off, evaluation) and asserts that the models are sharded;
the first step's entropy, logits/* and mean_token_accuracy equal one process's."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl")
peft = pytest.importorskip("peft")

import transformers  # noqa: E402

from compare import assert_adam_alike  # noqa: E402
from ports import free_port  # noqa: E402
from trl_policy_metrics import assert_policy_metrics_close, policy_metrics_atol  # noqa: E402
from trl_setup import models_pair  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "trl_sharded_run.py")
EXAMPLES = os.path.join(os.path.dirname(HERE), "examples")
import trl_sharded_run  # noqa: E402  (its CONFIGURATIONS and HIDDEN)

ENV = dict(os.environ, OMP_NUM_THREADS="1",
           PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _run(cmd):
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    _run([sys.executable, SCRIPT, str(out), "one_process"])
    return out


def _saved(path, name):
    """The parameters that trainer.save_model() wrote, as from_pretrained loads them."""
    if name == "lora_no_ref":
        base = models_pair(move=1.0, hidden=trl_sharded_run.HIDDEN)[0]
        model = peft.PeftModel.from_pretrained(base, str(path))
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path))
    return dict(model.named_parameters())


@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_sharded_fused_head_equals_one_process(tmp_path, one_process, strategy):
    if strategy == "zero3":
        pytest.importorskip("deepspeed")
    _run([sys.executable, "-m", "accelerate.commands.launch",
          "--config_file", os.path.join(EXAMPLES, f"accelerate_{strategy}.yaml"),
          "--num_processes", "2", "--mixed_precision", "no",
          "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
          SCRIPT, str(tmp_path), strategy])
    for name in trl_sharded_run.CONFIGURATIONS:
        one = torch.load(one_process / f"{name}.pt")
        got = torch.load(tmp_path / f"{name}.pt")
        # The script asserted the sharding on every rank; this checks it reported it.
        sharding = got["sharding"]
        assert sharding["strategy"] == strategy, name
        for role in ("policy", "ref") if "ref" in sharding else ("policy",):
            held = sharding[role]
            assert held["sharded"] > 0 and held["head_local"] * 2 == held["head"], (name, held)
        assert len(got["losses"]) == len(one["losses"]) >= 2, name
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(one["losses"]),
                                   rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        # The first step's metrics, where both runs hold the same parameters.
        policy = models_pair(move=1.0, tied=trl_sharded_run.CONFIGURATIONS[name][1],
                             hidden=trl_sharded_run.HIDDEN)[0]
        assert_policy_metrics_close(got["first_step"], one["first_step"],
                                    policy_metrics_atol(policy), name)
        if "eval_loss" in one:
            assert got["eval_loss"] == pytest.approx(one["eval_loss"], abs=1e-5), name
        assert_adam_alike(got["params"], one["params"], **one["adam"], name=name)
        saved = _saved(tmp_path / name, name)
        for param, value in got["params"].items():
            assert torch.equal(saved[param], value), f"{name} {param}: saved != trained"
