"""Helpers of the training tests: tdpo-train in a subprocess, a small preference data
file, a run's outputs, and checkpoints planted with code to run."""
import enum
import hashlib
import json
import os
import pathlib
import pickle
import signal
import subprocess
import sys

import pytest
import torch
from compare import assert_adam_alike
from ports import free_port

from tdpo_ext.training import checkpoint
from tdpo_ext.training import models as M
from tdpo_ext.training.files import read_rows

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


def run_python(*args, check=True, timeout=300, stdin_text=None):
    # In a session of its own, so that a timeout (a hung collective) kills torchrun's
    # workers with it instead of leaving them waiting.
    with subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=env(),
                          stdin=subprocess.PIPE if stdin_text is not None else None,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(stdin_text, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    p = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def tdpo_train(*args, check=True, stdin_text=None):
    return run_python("-m", "tdpo_ext.training.train", *args, check=check,
                      stdin_text=stdin_text)


def torchrun_2(*args, check=True, timeout=300):
    return run_python("-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                      "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args,
                      check=check, timeout=timeout)


def write_pairs(path):
    """A small preference data file at `path` (a pathlib.Path): its path, as a string."""
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in REVIEWS * 2]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def pairs(tmp_path):
    return write_pairs(tmp_path / "pairs.jsonl")


def read_metrics(folder, name="metrics.jsonl"):
    """A run's metrics rows (or, name="eval_examples.jsonl", its per-example eval rows)."""
    return read_rows(os.path.join(folder, name))


def without_time(rows):
    """Metrics rows without their wall-clock time, the one value two runs need not share."""
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def assert_same_metrics(a, b):
    """Two runs' metrics rows (those of `a` and `b` folders) alike: the same rows and keys,
    every value equal to float32 rounding. Returns a's rows."""
    rows_a, rows_b = without_time(read_metrics(a)), without_time(read_metrics(b))
    assert [r.keys() for r in rows_b] == [r.keys() for r in rows_a]
    for ra, rb in zip(rows_a, rows_b):
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-5), (ra["step"], k)
    return rows_a


def final_params(folder):
    return torch.load(os.path.join(folder, "final", "model.pt"), weights_only=True)


def assert_trained_alike(actual, expected, run):
    """Parameters (name -> tensor) trained like `expected`, the one-process run in folder
    `run` whose gradients differ from theirs in rounding only: within what AdamW can move
    them in that run's steps at its learning rate (tests/compare.py says why)."""
    cfg = json.loads(open(os.path.join(run, "config.json")).read())
    assert_adam_alike(actual, expected, lr=cfg["lr"], steps=cfg["steps"], name=str(run))


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def folder_digest(folder):
    """Every entry under `folder` (hidden ones too) by relative path: a file with its
    content's SHA-256, a symbolic link with its target, a folder as such: equal digests,
    nothing in the folder written, added, deleted or replaced."""
    digest = {}
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = os.path.join(root, name)
            if os.path.islink(path):
                digest[os.path.relpath(path, folder)] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                digest[os.path.relpath(path, folder)] = "folder"
            else:
                with open(path, "rb") as f:
                    digest[os.path.relpath(path, folder)] = hashlib.sha256(
                        f.read()).hexdigest()
    return digest


class RunsCode:
    """Pickled, it is a call of exec that creates the file `marker` when unpickled: what a
    malicious checkpoint could do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def tiny_model_and_optimizer(seed):
    model, _ = M.load_model("tiny", seed=seed)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def stage_state(optimizer, step):
    """(the state a stage saves beside its model and optimizer, that state's shape) for a
    stage with `optimizer`, at `step`."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = {"step": step, "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "first_eval": {}, "last_eval": {},
             "last_train": {}}
    return state, checkpoint.state_shape(scheduler, scaler)


def plant_in_sharded_checkpoint(kind, folder, marker):
    """Makes the sharded checkpoint in `folder` run code when loaded, in one of its files;
    returns that file's path (the folder, for an entry of the shards). "rank_local": a
    global .metadata that passes an allowlist but that torch's reader fails on (its
    storage_meta a torch.Size, which takes no attribute), beside rank-local
    __<rank>.metadata files that run code; torch then falls back on those."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.state_dict import get_state_dict
    if kind == "training_state":
        path = os.path.join(folder, checkpoint.TRAINING_STATE)
        state = torch.load(path, weights_only=True)
        torch.save(state | {"rng": [RunsCode(marker)]}, path)
        return path
    if kind == "shard_outside":  # a shard file moved out of the folder, linked to there
        path = os.path.join(folder, "__0_0.distcp")
        outside = os.path.join(os.path.dirname(folder), "outside.distcp")
        os.replace(path, outside)
        os.symlink(outside, path)
        return path
    if kind == "shard_entry":  # the optimizer's learning rate, a pickled entry
        model, opt = tiny_model_and_optimizer(0)
        model_state, optim_state = get_state_dict(model, opt)
        optim_state["param_groups"][0]["lr"] = RunsCode(marker)
        dcp_save({"model": model_state, "optimizer": optim_state},
                 storage_writer=FileSystemWriter(folder, overwrite=True))
        return folder
    path = os.path.join(folder, ".metadata")
    with open(path, "rb") as f:
        metadata = pickle.load(f)
    if kind == "metadata":  # torch's own metadata, with code beside it
        metadata.planner_data = RunsCode(marker)
    elif kind == "rank_local":
        metadata.storage_meta = torch.Size([])
        for rank in range(2):
            with open(os.path.join(folder, f"__{rank}.metadata"), "wb") as f:
                pickle.dump(RunsCode(marker), f)
    elif kind == "storage_data_type":  # not code: the wrong type
        metadata.storage_data = list(metadata.storage_data.values())
    elif kind == "metadata_getattr":  # a method reached through getattr, called
        metadata.planner_data = TouchesThroughGetattr(marker)
    else:  # "metadata_outside": a shard read from outside the folder
        info = next(iter(metadata.storage_data.values()))
        info.relative_path = os.path.join("..", info.relative_path)
    with open(path, "wb") as f:
        PicklerOfEnumsByName(f).dump(metadata)
    return path


class TouchesThroughGetattr:
    """Pickled, it is pathlib.PosixPath.touch(marker), the method written as getattr of an
    allowed class: what the enum-member form of getattr must not let through."""

    def __init__(self, marker):
        self.marker = pathlib.PosixPath(marker)

    def __reduce__(self):
        return getattr(pathlib.PosixPath, "touch"), (self.marker,)


class PicklerOfEnumsByName(pickle.Pickler):
    """Pickles an enum member as getattr(its class, its name), as Python 3.11.2 does, and a
    function of a class (pathlib.PosixPath.touch) as getattr of the class too."""

    def reducer_override(self, obj):
        if isinstance(obj, enum.Enum):
            return getattr, (type(obj), obj.name)
        if getattr(obj, "__qualname__", "") == "Path.touch":
            return getattr, (pathlib.PosixPath, "touch")
        return NotImplemented


def save_tiny_llama(folder, tied=False):
    """A tiny random transformers causal LM (Llama, its head tied to the input embeddings
    or not) with a word-level tokenizer over the built-in vocabulary, saved to folder."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    words = M.builtin_tokenizer().words
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>"] + words[3:])}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>",
                                               eos_token="</s>", unk_token="<unk>")
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32,
                                      intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=64, pad_token_id=0,
                                      eos_token_id=1, bos_token_id=1,
                                      tie_word_embeddings=tied)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def transformers_state(folder):
    model, _ = M.load_model(str(folder))
    return model.state_dict()
