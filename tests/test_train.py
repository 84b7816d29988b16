"""tdpo-train end to end, on tiny settings: outputs of the embedded pipeline, kill and
resume, NaN stop, and DistributedDataParallel over two CPU processes (gloo on 127.0.0.1)."""
import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from tdpo_ext.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    e = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    return e


def tdpo_train(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "tdpo_ext.training.train", *map(str, args)], cwd=ROOT,
                       env=env(), capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"tdpo-train failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture
def pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in REVIEWS * 2]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_params(folder):
    return torch.load(os.path.join(folder, "final", "model.pt"), weights_only=True)


def test_cli_embedded_pipeline_writes_all_outputs(tmp_path):
    out = tmp_path / "run"
    p = tdpo_train(*TINY_PIPELINE, "--out", out)
    assert "eval @ step 4" in p.stdout + p.stderr
    for name in ("config.json", "metrics.jsonl", "summary.json", "final/model.pt",
                 "final/tiny_gpt.json", "final/vocab.txt", "checkpoint/state.pt",
                 "pairs_train.jsonl", "pairs_eval.jsonl", "sft/final/model.pt"):
        assert (out / name).exists(), name
    if importlib.util.find_spec("matplotlib"):
        for name in ("loss.png", "rewards.png", "kl.png"):
            assert (out / name).stat().st_size > 1000, name
    config = json.loads((out / "config.json").read_text())
    assert config["loss"] == "tdpo2" and config["steps"] == 4 and config["beta"] == 0.1
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    for key in ("loss/train", "rewards_train/chosen", "rewards_train/rejected",
                "rewards_train/accuracies", "rewards_train/margins", "kl_train/chosen",
                "kl_train/rejected", "kl_train/margin", "logps_train/chosen",
                "logps_train/rejected"):
        assert key in rows[1], key
    assert "rewards_eval/margins" in rows[2] and "kl_eval/rejected" in rows[4]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["task_reward"]) == {"before", "after"}
    assert summary["sample_kl"]["before"] == pytest.approx(0.0, abs=1e-4)
    assert summary["sample_kl"]["after"] > 0
    assert "loss/eval" in summary["eval"] and "kl_eval/chosen" in summary["eval"]


def test_kill_and_resume_ends_with_the_same_parameters(tmp_path, pairs):
    common = ["--data", pairs, "--eval-data", pairs, "--steps", "6", "--batch-size", "4",
              "--save-every", "2", "--eval-every", "3", "--lr", "1e-3", "--no-plots"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    tdpo_train(*common, "--out", straight)
    p = tdpo_train(*common, "--out", killed, "--stop-after-steps", "5", check=False)
    assert p.returncode == 3 and not (killed / "final").exists()
    assert torch.load(killed / "checkpoint" / "state.pt", weights_only=False)["step"] == 4
    tdpo_train("--resume", killed)
    a, b = final_params(straight), final_params(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = read_metrics(straight), read_metrics(killed)
    assert [r["step"] for r in rb] == [r["step"] for r in ra]
    assert [r["loss/train"] for r in rb[1:]] == [r["loss/train"] for r in ra[1:]]


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, pairs, capsys):
    out = tmp_path / "run"
    rc = train.main(["--data", pairs, "--steps", "6", "--batch-size", "4", "--save-every", "2",
                     "--eval-every", "10", "--debug-nan-at-step", "3", "--out", str(out),
                     "--no-plots"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "non-finite loss at step 3" in err and "last good checkpoint" in err
    assert "(step 2)" in err
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=False)["step"] == 2
    assert not (out / "final").exists()
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_first_step_loss_equals_one_process(tmp_path, pairs):
    common = ["--data", pairs, "--eval-data", pairs, "--steps", "2", "--batch-size", "8",
              "--eval-every", "2", "--no-plots"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    tdpo_train(*common, "--out", single)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "tdpo_ext.training.train",
           *common, "--out", str(ddp)]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (ddp / "final" / "model.pt").exists() and (ddp / "summary.json").exists()
    assert json.loads((ddp / "summary.json").read_text())["world_size"] == 2
    s, d = read_metrics(single), read_metrics(ddp)
    assert d[1]["loss/train"] == pytest.approx(s[1]["loss/train"], rel=1e-5, abs=1e-6)
    assert d[0]["loss/eval"] == pytest.approx(s[0]["loss/eval"], rel=1e-5, abs=1e-6)
    # the same global batch and averaged gradients: the second step agrees too
    assert d[2]["loss/train"] == pytest.approx(s[2]["loss/train"], rel=1e-4, abs=1e-5)


def save_tiny_llama(folder):
    """A tiny random transformers causal LM (Llama, tied head) with a word-level
    tokenizer over the built-in vocabulary, saved to folder."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from tdpo_ext.training import models as M
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
                                      eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_transformers_model_from_a_folder(tmp_path, pairs, capsys):
    """--model DIR with a (tiny, random) transformers causal LM and its tokenizer: trains,
    writes a save_pretrained folder that loads again as --model."""
    transformers = pytest.importorskip("transformers")
    from tdpo_ext.training import models as M
    folder = save_tiny_llama(tmp_path / "hf_model")
    out = tmp_path / "run"
    rc = train.main(["--model", str(folder), "--data", pairs, "--task", "sentiment",
                     "--eval-prompts", "4", "--max-new-tokens", "6", "--steps", "2",
                     "--batch-size", "4", "--eval-every", "2", "--lr", "1e-3",
                     "--out", str(out), "--no-plots"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and "task_reward" in summary
    model, _ = M.load_model(str(out / "final"))
    assert isinstance(model, transformers.LlamaForCausalLM)


def test_fused_linear_matches_materialized_logits(tmp_path, pairs, capsys):
    """--fused-linear (hidden states + LM-head weight, no logits) trains a transformers
    model to the same losses and parameters as the materialized-logits path."""
    folder = save_tiny_llama(tmp_path / "hf_model")
    common = ["--model", folder, "--data", pairs, "--task", "none", "--steps", "3",
              "--batch-size", "4", "--eval-every", "3", "--lr", "1e-3", "--no-plots"]
    runs = {}
    for name, extra in (("logits", []), ("fused_linear", ["--fused-linear"])):
        out = tmp_path / name
        assert train.main([*common, *extra, "--out", str(out)]) == 0, capsys.readouterr().err
        runs[name] = out
    logits_run, fused_run = ([m for m in read_metrics(runs[n]) if "loss/train" in m]
                             for n in ("logits", "fused_linear"))
    assert len(logits_run) == len(fused_run) == 3
    for a, b in zip(logits_run, fused_run):
        assert b["loss/train"] == pytest.approx(a["loss/train"], rel=1e-4, abs=1e-6)
        assert b["kl_train/rejected"] == pytest.approx(a["kl_train/rejected"], rel=1e-3,
                                                       abs=1e-6)
    config = json.loads((runs["fused_linear"] / "config.json").read_text())
    assert config["fused_linear"] is True


def test_fused_linear_refuses_the_tiny_model(tmp_path, pairs):
    with pytest.raises(SystemExit, match="--fused-linear: the built-in tiny model"):
        train.main(["--data", pairs, "--task", "none", "--steps", "1", "--batch-size", "4",
                    "--fused-linear", "--no-plots", "--out", str(tmp_path / "run")])
