"""A checkpoint is loaded without running code from it: a planted checkpoint whose
unpickling would create a file is refused, with a message naming the file, the file is not
created, and nothing in the run folder changes; in the unsharded form (checkpoint.pt,
through tdpo-train --resume) and in every file of the sharded form (its training_state.pt,
torch.distributed.checkpoint's .metadata and the non-tensor entries of its shards; here
written by one process, and under torchrun in tests/test_fsdp.py)."""
import os
import pickle

import pytest
import torch
from training_runs import (PicklerOfEnumsByName, RunsCode, folder_digest, pairs,
                           plant_in_sharded_checkpoint, tiny_model_and_optimizer)

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


@pytest.mark.parametrize("kind", ["training_state", "metadata", "metadata_getattr",
                                  "shard_entry", "metadata_outside"])
def test_a_sharded_checkpoint_that_would_run_code_is_refused(tmp_path, kind):
    folder, marker = str(tmp_path / checkpoint.FOLDER), tmp_path / "code_ran"
    model, opt = tiny_model_and_optimizer(0)
    checkpoint.save_sharded(folder, model, opt, {"step": 2}, ONE_CPU_PROCESS)
    path = plant_in_sharded_checkpoint(kind, folder, marker)
    model, opt = tiny_model_and_optimizer(1)
    assert_refused_without_running_code(
        lambda: checkpoint.load_sharded(folder, model, opt, ONE_CPU_PROCESS), path,
        tmp_path, marker)


@pytest.mark.parametrize("enums", ["by_value", "by_name"])
def test_a_sharded_checkpoint_loads_in_one_process(tmp_path, enums):
    """What the refusals above are measured against: the unplanted checkpoint loads, also
    with the enum members of its .metadata pickled by name, as Python 3.11.2 writes them."""
    folder = str(tmp_path / checkpoint.FOLDER)
    saved, opt = tiny_model_and_optimizer(0)
    checkpoint.save_sharded(folder, saved, opt, {"step": 2}, ONE_CPU_PROCESS)
    if enums == "by_name":
        path = os.path.join(folder, ".metadata")
        with open(path, "rb") as f:
            metadata = pickle.load(f)
        with open(path, "wb") as f:
            PicklerOfEnumsByName(f).dump(metadata)
        with open(path, "rb") as f:
            assert b"getattr" in f.read()
    model, opt = tiny_model_and_optimizer(1)
    assert checkpoint.load_sharded(folder, model, opt, ONE_CPU_PROCESS)["step"] == 2
    for a, b in zip(saved.parameters(), model.parameters()):
        assert torch.equal(a, b)
