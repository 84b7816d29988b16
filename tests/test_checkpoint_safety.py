"""A checkpoint is loaded without running code from it: a planted checkpoint whose
unpickling would create a file is refused, with a message naming the file, the file is not
created, and nothing in the run folder changes; in the unsharded form (checkpoint.pt,
through tdpo-train --resume) and in every file of the sharded form (its training_state.pt,
torch.distributed.checkpoint's .metadata, the rank-local __<rank>.metadata that torch
falls back on and the non-tensor entries of its shards; here written by one process, and
under torchrun in tests/test_fsdp.py); a shard linked to a file outside the folder, or
metadata of the wrong type, is refused too. A pickle of what torch's own allowlist admits but
tdpo-train does not write (traceback.FrameSummary, which reads a line of a file when it is
built) is refused before it is built. Other malformed run folders: test_run_folder_safety.py."""
import os
import pickle
import sys
import traceback

import pytest
import torch
from training_runs import (PicklerOfEnumsByName, RunsCode, folder_digest, pairs,
                           plant_in_sharded_checkpoint, stage_state,
                           tiny_model_and_optimizer)

from tdpo_ext.training import checkpoint, train
from tdpo_ext.training.processes import ONE_CPU_PROCESS

assert pairs  # a fixture


def assert_refused_without_running_code(resume, path, folder, marker):
    before = folder_digest(folder)
    try:
        with pytest.raises(SystemExit) as refused:
            resume()
    finally:
        assert not os.path.exists(marker), "the checkpoint's code ran"
    message = str(refused.value)
    assert f"refused to load {path}" in message and "Nothing in the run folder" in message
    assert folder_digest(folder) == before


def test_a_checkpoint_file_that_would_run_code_is_refused(tmp_path, pairs):
    out, marker = tmp_path / "run", tmp_path / "code_ran"
    args = ["--data", pairs, "--steps", "2", "--batch-size", "4", "--eval-every", "10",
            "--no-plots"]
    assert train.main([*args, "--out", str(out)]) == 0
    path = out / checkpoint.FILE
    state = torch.load(path, weights_only=True)  # what tdpo-train writes loads this way
    for planted in ("torch.save", "pickle"):
        with open(path, "wb") as f:
            if planted == "torch.save":  # the real checkpoint, its RNG state replaced
                torch.save(state | {"rng": [RunsCode(marker)]}, f)
            else:
                pickle.dump(RunsCode(marker), f)
        assert_refused_without_running_code(lambda: train.main(["--resume", str(out)]),
                                            path, out, marker)


SHARDED_PLANTS = ["training_state", "metadata", "metadata_getattr", "rank_local",
                  "shard_entry", "metadata_outside", "shard_outside", "storage_data_type"]


def save_sharded_and_plant(tmp_path, kind, marker):
    """A sharded checkpoint saved in one process, planted (plant_in_sharded_checkpoint;
    kind None: not planted); (its folder, the planted file, or its training state, a
    loader of it into another model)."""
    folder = str(tmp_path / checkpoint.FOLDER)
    model, opt = tiny_model_and_optimizer(0)
    state, shape = stage_state(opt, 2)
    checkpoint.save_sharded(folder, model, opt, state, ONE_CPU_PROCESS)
    path = plant_in_sharded_checkpoint(kind, folder, marker) if kind else \
        os.path.join(folder, checkpoint.TRAINING_STATE)
    model, opt = tiny_model_and_optimizer(1)
    return folder, path, lambda: checkpoint.load_sharded(folder, model, opt,
                                                         ONE_CPU_PROCESS, shape)


@pytest.mark.parametrize("kind", SHARDED_PLANTS)
def test_a_sharded_checkpoint_that_would_run_code_is_refused(tmp_path, kind):
    marker = tmp_path / "code_ran"
    _, path, load = save_sharded_and_plant(tmp_path, kind, marker)
    assert_refused_without_running_code(load, path, tmp_path, marker)


@pytest.mark.parametrize("enums", ["by_value", "by_name"])
def test_a_sharded_checkpoint_loads_in_one_process(tmp_path, enums):
    """What the refusals above are measured against: the unplanted checkpoint loads, also
    with the enum members of its .metadata pickled by name, as Python 3.11.2 writes them."""
    folder = str(tmp_path / checkpoint.FOLDER)
    saved, opt = tiny_model_and_optimizer(0)
    state, shape = stage_state(opt, 2)
    checkpoint.save_sharded(folder, saved, opt, state, ONE_CPU_PROCESS)
    if enums == "by_name":
        path = os.path.join(folder, ".metadata")
        with open(path, "rb") as f:
            metadata = pickle.load(f)
        with open(path, "wb") as f:
            PicklerOfEnumsByName(f).dump(metadata)
        with open(path, "rb") as f:
            assert b"getattr" in f.read()
    model, opt = tiny_model_and_optimizer(1)
    assert checkpoint.load_sharded(folder, model, opt, ONE_CPU_PROCESS, shape)["step"] == 2
    for a, b in zip(saved.parameters(), model.parameters()):
        assert torch.equal(a, b)


class ReadsALine:
    """Pickled, it is traceback.FrameSummary(path, 1, ...), whose building reads the
    first line of the file at `path` (allowed by torch's weights-only unpickler once
    torch.distributed.checkpoint is imported)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return traceback.FrameSummary, (self.path, 1, "planted")


OPENED = []  # the paths opened while a test below watches, by an audit hook
sys.addaudithook(lambda event, args: OPENED.append(str(args[0]))
                 if event == "open" and OPENED[:1] == ["watching"] else None)


def test_a_training_state_that_would_read_a_file_outside_is_refused(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("a line from outside the run folder\n")
    _, path, load = save_sharded_and_plant(tmp_path, None, tmp_path / "unused")
    state = torch.load(path, weights_only=True)
    torch.save(state | {"first_eval": {"loss/eval": ReadsALine(secret)}}, path)
    def watched_load():
        OPENED[:] = ["watching"]
        try:
            load()
        finally:
            OPENED[0] = "watched"

    assert_refused_without_running_code(watched_load, path, tmp_path, tmp_path / "unused")
    assert str(secret) not in OPENED, "the planted object read a file outside the folder"
    message = refused_message(load)
    assert "traceback.FrameSummary" in message


def refused_message(load):
    with pytest.raises(SystemExit) as refused:
        load()
    return str(refused.value)


@pytest.mark.parametrize("planted", ["os.system", "a list", "a missing key"])
def test_the_refusal_of_a_checkpoint_says_what_it_holds(tmp_path, pairs, planted):
    """What the file holds is named in our own words (not torch's, which vary from one
    release to the next): posix.system, the most common payload; plain data of another
    shape than tdpo-train writes, which would otherwise fail with a traceback."""
    out = tmp_path / "run"
    assert train.main(["--data", pairs, "--steps", "2", "--batch-size", "4",
                       "--eval-every", "10", "--no-plots", "--out", str(out)]) == 0
    path = out / checkpoint.FILE
    state = torch.load(path, weights_only=True)
    planted_state, expected = {
        "os.system": (state | {"rng": [RunsSystem()]}, "it holds posix.system, which is "
                      "not plain data"),
        "a list": ([state], "it is list, where tdpo-train writes a dict of 'step'"),
        "a missing key": ({k: v for k, v in state.items() if k != "scheduler"},
                          "it lacks the keys [\"'scheduler'\"]")}[planted]
    torch.save(planted_state, path)
    assert_refused_without_running_code(lambda: train.main(["--resume", str(out)]), path,
                                        out, tmp_path / "code_ran")
    assert expected in refused_message(lambda: train.main(["--resume", str(out)]))


class RunsSystem:
    """Pickled, it is os.system("true") (posix.system on Linux)."""

    def __reduce__(self):
        return os.system, ("true",)


def test_torchs_forced_weights_only_load_is_named_not_taken_for_a_bad_file(
        tmp_path, pairs, monkeypatch):
    """TORCH_FORCE_WEIGHTS_ONLY_LOAD makes torch.load refuse our unpickler; the resume
    says that, rather than calling a good checkpoint malformed, and changes nothing."""
    out = tmp_path / "run"
    assert train.main(["--data", pairs, "--steps", "2", "--batch-size", "4",
                       "--eval-every", "10", "--no-plots", "--out", str(out)]) == 0
    before = folder_digest(out)
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(SystemExit) as refused:
        train.main(["--resume", str(out)])
    assert "while TORCH_FORCE_WEIGHTS_ONLY_LOAD is set" in str(refused.value)
    assert folder_digest(out) == before
