"""A run folder from elsewhere, resumed, is data: a folder with a link (a temporary file
linked out of it, a log or a checkpoint linked to a file outside, a checkpoint linked to
/dev/null) or a folder where a file belongs is refused before anything is written; a
model folder that names code of its own is refused at once, with no prompt, even with
`y` on stdin; malformed files (a zip whose members climb out of it, a TorchScript
archive, a metrics log with a string step, a model file that would run code, a
config.json value that its flag would refuse) are refused, not met with a traceback. In
each case the message names the file, no planted code runs, and neither the folder nor
any file outside it changes (checkpoints planted with code: test_checkpoint_safety.py)."""
import json
import os
import shutil
import zipfile

import pytest
import torch
from training_runs import (RunsCode, folder_digest, save_tiny_llama, tdpo_train,
                           write_pairs)

from tdpo_ext.training import checkpoint, train


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tdpo-train run on a few pairs (its final/ a TinyGPT folder), which the
    tests below copy and do not change: its folder."""
    folder = tmp_path_factory.mktemp("finished")
    out = folder / "run"
    assert train.main(["--data", write_pairs(folder / "pairs.jsonl"), "--steps", "2",
                       "--batch-size", "4", "--eval-every", "10", "--no-plots",
                       "--out", str(out)]) == 0
    return out


@pytest.fixture
def run(tmp_path, finished_run):
    """A copy of finished_run in tmp_path, beside a file `outside.txt` outside it."""
    (tmp_path / "outside.txt").write_text("a file outside the run folder\n")
    shutil.copytree(finished_run, tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def assert_refused(resume, named, tmp_path):
    """resume() refused (SystemExit) with a message naming `named`, no planted code run
    (its marker, tmp_path/code_ran, absent), nothing under tmp_path (the run folder and
    the files outside it) changed; returns the message."""
    before = folder_digest(tmp_path)
    with pytest.raises(SystemExit) as refused:
        resume()
    assert not (tmp_path / "code_ran").exists(), "the folder's code ran"
    assert folder_digest(tmp_path) == before
    message = str(refused.value)
    assert str(named) in message and "Nothing in the run folder was changed" in message, \
        message
    return message


def link_to_outside(run, name):
    (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(run.parent / "outside.txt")


def planted_links(run, kind):
    """Plants `kind` in the run folder; returns the path the refusal must name."""
    if kind == "tmp_link":  # the temporary file of summary.json's atomic write
        link_to_outside(run, "summary.json.tmp")
        return run / "summary.json.tmp"
    if kind == "log_link":
        link_to_outside(run, "metrics.jsonl")
        return run / "metrics.jsonl"
    path = run / checkpoint.FILE
    if kind == "checkpoint_outside":  # the real checkpoint, moved out of the folder
        shutil.move(path, run.parent / "outside.pt")
        path.symlink_to(run.parent / "outside.pt")
    elif kind == "checkpoint_dev_null":
        path.unlink()
        path.symlink_to(os.devnull)
    else:  # "checkpoint_folder"
        path.unlink()
        path.mkdir()
    return path


def test_a_model_folder_with_code_of_its_own_is_refused_without_a_prompt(tmp_path, run):
    """config.json's ref_model names a transformers folder in the run folder whose
    config maps the model to its own evil.py: refused at once, even with `y` on stdin
    (transformers would otherwise ask whether to run it)."""
    model = save_tiny_llama(run / "ref")
    evil = f"open({str(tmp_path / 'code_ran')!r}, 'w').close()\n"
    (run / "ref" / "evil.py").write_text(evil + "from transformers import LlamaConfig as "
                                         "EvilConfig, LlamaForCausalLM as EvilModel\n")
    config = json.loads((run / "ref" / "config.json").read_text())
    # a model type that transformers does not ship, so that only the folder's code has it
    config |= {"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig",
                                                  "AutoModelForCausalLM": "evil.EvilModel"}}
    (run / "ref" / "config.json").write_text(json.dumps(config))
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(saved | {"ref_model": model}))
    before = folder_digest(tmp_path)
    p = tdpo_train("--resume", run, check=False, stdin_text="y\ny\ny\n")
    assert not (tmp_path / "code_ran").exists(), "the model folder's code ran"
    assert folder_digest(tmp_path) == before
    assert p.returncode != 0 and "Do you wish to run the custom code" not in p.stdout
    assert f"refused to load the model in {model}: its config.json names code" in p.stderr, \
        p.stdout + p.stderr


def zip_climbing_out(path):
    """The checkpoint at `path`, its members renamed to climb out of the archive."""
    with zipfile.ZipFile(path) as z:
        members = {name: z.read(name) for name in z.namelist()}
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr("../../" + name, data)


def planted_malformed(run, kind):
    """Plants `kind` in the run folder; returns the path the refusal must name."""
    if kind == "zip_climbing_out":
        zip_climbing_out(run / checkpoint.FILE)
    elif kind == "torchscript":
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), run / checkpoint.FILE)
    elif kind in ("metrics_string_step", "model_file_running_code"):
        return planted_in_log_or_model(run, kind)
    else:  # "dtype_load": a value that --dtype refuses, which would reach getattr(torch, ...)
        saved = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps(saved | {"dtype": "load"}))
        return run / "config.json"
    return run / checkpoint.FILE


def planted_in_log_or_model(run, kind):
    if kind == "metrics_string_step":
        rows = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
        rows[0] = json.dumps(json.loads(rows[0]) | {"step": "0"}) + "\n"
        (run / "metrics.jsonl").write_text("".join(rows))
        return run / "metrics.jsonl"
    # the run's final/ (a TinyGPT folder) as the model config.json starts from, its
    # model.pt a pickle that would run code
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(saved | {"model": str(run / "final")}))
    torch.save({"planted": RunsCode(run.parent / "code_ran")}, run / "final" / "model.pt")
    return run / "final" / "model.pt"


LINKS = ["tmp_link", "log_link", "checkpoint_outside", "checkpoint_dev_null",
         "checkpoint_folder"]
MALFORMED = ["zip_climbing_out", "torchscript", "metrics_string_step",
             "model_file_running_code", "dtype_load"]


@pytest.mark.parametrize("kind", LINKS + MALFORMED)
def test_a_planted_run_folder_is_refused_not_resumed(tmp_path, run, kind):
    """Links and folders where files belong are refused before anything is read or
    written; malformed files with a refusal, not a traceback."""
    named = (planted_links if kind in LINKS else planted_malformed)(run, kind)
    assert_refused(lambda: train.main(["--resume", str(run)]), named, tmp_path)


def test_the_run_folder_resumes(tmp_path, run):
    """What the refusals above are measured against: the unplanted copy resumes."""
    assert train.main(["--resume", str(run)]) == 0
