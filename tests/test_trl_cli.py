"""tdpo-trl (python -m tdpo_ext.trl): TRL's command line for TDPOTrainer, offline, with a
tiny random Llama saved to a folder (trl_setup.py): --help, a YAML recipe with flags beside
it, datasets from a local file and folder, LoRA flags, one process (run in the test's
process) against two (torchrun, gloo), and what it saves."""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")
yaml = pytest.importorskip("yaml")

from safetensors.torch import load_file  # noqa: E402

from ports import free_port  # noqa: E402
from tdpo_ext.trl.cli import cli, make_parser  # noqa: E402
from trl_setup import make_dataset, make_model, save_model_folder  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
# The fast settings of trl_setup.make_config, as a recipe.
FAST = dict(max_steps=2, learning_rate=1e-3, logging_steps=1, save_strategy="no",
            report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
            max_grad_norm=0.0, dataloader_num_workers=0, disable_tqdm=True, seed=0,
            beta=0.5, tdpo_alpha=0.7, max_length=64)


def run_cli(args, procs=1):
    """tdpo-trl ARGS: in this process, or under torchrun as `python -m tdpo_ext.trl`."""
    args = [str(arg) for arg in args]
    if procs == 1:
        cli(args)
        return
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
                "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    done = subprocess.run(launcher + ["-m", "tdpo_ext.trl", *args], env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_console_script_is_this_cli():
    """setup.py's tdpo-trl entry point names the function these tests run."""
    with open(os.path.join(os.path.dirname(HERE), "setup.py")) as f:
        (module, function), = re.findall(r'"tdpo-trl=([\w.]+):(\w+)"', f.read())
    assert getattr(importlib.import_module(module), function) is cli


# Installed as sitecustomize in a `python -m tdpo_ext.trl` process: at its exit, the
# TDPOConfig classes that its modules hold, by module name.
COUNT_CONFIG_CLASSES = """
import atexit, json, sys

def count():
    held = {}
    for name, module in list(sys.modules.items()):
        config = getattr(module, "TDPOConfig", None)
        if isinstance(config, type):
            held.setdefault(f"{config.__module__}.{id(config)}", []).append(name)
    print("TDPOConfig classes:", json.dumps(held))

atexit.register(count)
"""


def test_python_m_runs_one_trainer_module(tmp_path):
    """`python -m tdpo_ext.trl` imports the trainer once: one TDPOConfig class in the
    process (a module run as __main__ that the command line imports again under its own
    name would define a second one, which TrlParser and isinstance checks would tell
    apart)."""
    (tmp_path / "sitecustomize.py").write_text(COUNT_CONFIG_CLASSES)
    env = dict(ENV, PYTHONPATH=os.pathsep.join([str(tmp_path), ENV.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "tdpo_ext.trl", "--help"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "usage: tdpo-trl" in done.stdout, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines()
               if line.startswith("TDPOConfig classes:")]
    held = json.loads(line.split(":", 1)[1])
    assert len(held) == 1 and next(iter(held)).startswith("tdpo_ext.trl.trainer."), held


def test_help_lists_every_field_with_its_default():
    text = make_parser().format_help()  # what --help prints
    flags = {m.group(1): m.group(2) for m in re.finditer(
        r"^  --(\w+).*?\n(.*?)(?=^  -)", text, re.S | re.M)}
    for flag, default in (("loss_type", "['tdpo2']"), ("tdpo_alpha", "0.5"),
                          ("average_log_prob", "False"), ("use_fused_linear", "True"),
                          ("beta", "0.1"), ("precompute_ref_log_probs", "False"),
                          ("lora_r", "16"), ("dataset_train_split", "train")):
        assert flag in flags, flag
        assert f"(default: {default})" in " ".join(flags[flag].split()), (flag, flags[flag])
    assert "use_peft" in flags and "model_name_or_path" in flags and "dataset_name" in flags


def test_lora_recipe_two_processes_equal_one(tmp_path):
    """A YAML recipe (a .jsonl file as the dataset, LoRA flags) run by one process with 4
    pairs a step and by two under torchrun with 2 each (flags beside --config win): the
    saved adapters are equal, and moved from their zero start."""
    model = save_model_folder(tmp_path / "model")
    data = tmp_path / "pairs.jsonl"
    make_dataset().to_json(data)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(dict(
        FAST, model_name_or_path=model, dataset_name=str(data), use_peft=True, lora_r=4,
        lora_alpha=8, lora_dropout=0.0, lora_target_modules=["q_proj", "v_proj"],
        per_device_train_batch_size=4, output_dir=str(tmp_path / "unused"))))
    adapters = []
    for procs in (1, 2):
        out = tmp_path / f"procs{procs}"
        gloo = ["--ddp_backend", "gloo"] if procs > 1 else []
        run_cli(["--config", recipe, "--output_dir", out, *gloo,
                 "--per_device_train_batch_size", 4 // procs], procs)
        assert not (out / "model.safetensors").exists()  # the adapter alone, as DPO saves it
        adapters.append(load_file(out / "adapter_model.safetensors"))
    one, two = adapters
    assert one.keys() == two.keys() and any("lora_B" in name for name in one)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert all(one[name].abs().sum() > 0 for name in one if "lora_B" in name)


def test_full_model_from_a_dataset_folder_with_evaluation(tmp_path, capsys):
    """No LoRA: the reference is a second copy loaded from --model_name_or_path; the
    dataset a folder whose files name the splits; evaluation on --dataset_test_split; the
    whole model and its tokenizer saved to --output_dir."""
    model = save_model_folder(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    make_dataset().to_json(data / "train.jsonl")
    make_dataset(4, seed=1).to_json(data / "validation.jsonl")
    out = tmp_path / "out"
    args = ["--model_name_or_path", model, "--dataset_name", data, "--output_dir", out,
            "--dataset_test_split", "validation", "--eval_strategy", "steps", "--eval_steps", 2,
            "--per_device_train_batch_size", 2, "--per_device_eval_batch_size", 2]
    for name, value in FAST.items():
        args += [f"--{name}", value]
    run_cli(args)
    assert "'eval_kl/rejected'" in capsys.readouterr().out
    saved = load_file(out / "model.safetensors")
    start = make_model().state_dict()
    assert saved.keys() == start.keys()
    assert not torch.equal(saved["lm_head.weight"], start["lm_head.weight"])
    assert (out / "tokenizer.json").is_file()
