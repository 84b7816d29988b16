"""tdpo-train end to end, on tiny settings: outputs of the embedded pipeline, SIGKILL at
every stage and resume, NaN stop, DistributedDataParallel over two CPU processes (gloo on
127.0.0.1) against one process, transformers models and --fused-linear, and the command
line itself."""
import importlib.util
import json
import math
import os

import pytest
import torch
from training_runs import (ROOT, TINY_PIPELINE, assert_same_metrics, assert_same_params,
                           assert_trained_alike, final_params, pairs, read_metrics,
                           run_python, save_tiny_llama, tdpo_train, torchrun_2,
                           transformers_state, without_time)

from tdpo_ext.training import config, hooks, losses, pipeline, train
from tdpo_ext.training import models as M

assert pairs  # a fixture


@pytest.fixture(scope="module")
def tiny_with_dropout(tmp_path_factory):
    """A tiny-model folder (--model DIR) whose training forwards draw dropout masks from
    the random state, which a resumed run must then restore to end as an uninterrupted one."""
    folder = str(tmp_path_factory.mktemp("tiny_dropout") / "model")
    M.save_model(*M.load_model("tiny", seed=0, tiny_config={"dropout": 0.1}), folder)
    return folder


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory, tiny_with_dropout):
    """The embedded pipeline run once, uninterrupted, on the tiny model with dropout:
    (folder, its output)."""
    out = tmp_path_factory.mktemp("embedded") / "run"
    p = tdpo_train(*TINY_PIPELINE, "--model", tiny_with_dropout, "--out", out)
    return out, p.stdout + p.stderr


def test_cli_embedded_pipeline_writes_all_outputs(embedded_run):
    out, output = embedded_run
    assert "eval @ step 4" in output
    # not a terminal: no progress bar redraws flooding the log
    assert "\r" not in output and "it/s" not in output
    for name in ("config.json", "metrics.jsonl", "summary.json", "final/model.pt",
                 "final/tiny_gpt.json", "final/vocab.txt", "checkpoint.pt",
                 "pairs_train.jsonl", "pairs_eval.jsonl", "sft/final/model.pt"):
        assert (out / name).exists(), name
    if importlib.util.find_spec("matplotlib"):
        for name in ("loss.png", "rewards.png", "kl.png", "entropy.png"):
            assert (out / name).stat().st_size > 1000, name
    saved = json.loads((out / "config.json").read_text())
    assert saved["loss"] == "tdpo2" and saved["steps"] == 4 and saved["beta"] == 0.1
    assert saved["lr"] == 3e-4  # the sentiment task's preset
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    for key in ("loss/train", "rewards_train/chosen", "rewards_train/rejected",
                "rewards_train/accuracies", "rewards_train/margins", "kl_train/chosen",
                "kl_train/rejected", "kl_train/margin", "logps_train/chosen",
                "logps_train/rejected"):
        assert key in rows[1], key
    assert "rewards_eval/margins" in rows[2] and "kl_eval/rejected" in rows[4]
    # The policy's entropy on pairs (every step, and SFT's) and on samples (each eval),
    # and the samples' distinct n-grams: within their ranges
    log_vocab = math.log(len(M.builtin_tokenizer()))
    entropies = [(r["step"], k, r[k]) for r in rows + read_metrics(out / "sft")
                 for k in r if k.startswith(("entropy_", "sample_entropy/"))]
    assert {k for _, k, _ in entropies} == {"sample_entropy/eval", "entropy_train/chosen",
                                            "entropy_train/rejected", "entropy_eval/chosen",
                                            "entropy_eval/rejected"}
    assert all(0 < h < log_vocab for _, _, h in entropies), entropies
    for r in rows[::2]:  # the evaluations
        assert 0 < r["distinct_2/eval"] <= 1 and 0 < r["distinct_1/eval"] <= 1, r
    assert len(read_metrics(out, "eval_examples.jsonl")[0]["sample_entropy/eval"]) == 8
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["task_reward"]) == {"before", "after"}
    assert summary["sample_kl"]["before"] == pytest.approx(0.0, abs=1e-4)
    assert summary["sample_kl"]["after"] > 0
    assert "loss/eval" in summary["eval"] and "kl_eval/chosen" in summary["eval"]
    assert "loss/train" in summary["train"] and "sft" in summary and "pairs" in summary


# Kill points spread over every stage, in the order a run reaches them (see
# train_with_faults.py): SFT before its checkpoint, midway through writing that
# checkpoint and the SFT model; pair making between the two splits; preference training
# before its first checkpoint (after the step-0 eval row), midway through writing it,
# after it, and after the last checkpoint, before the final policy is saved.
KILL_POINTS = ["step sft 2", "torch.save */sft/checkpoint.pt* 4",
               "torch.save */sft/final*/model.pt None", "pairs_written train", "step tdpo2 1",
               "torch.save */killed/checkpoint.pt* 2", "step tdpo2 3", "stage_done tdpo2 4"]


def test_sigkill_at_every_stage_then_resume_ends_as_an_uninterrupted_run(
        embedded_run, tiny_with_dropout, tmp_path):
    """With dropout: a stage resumed from its checkpoint must restore the random state, and
    one started afresh after a resume must not depend on the stages skipped before it."""
    straight, killed, used = embedded_run[0], tmp_path / "killed", tmp_path / "used_points"
    first = ["--out", killed, *TINY_PIPELINE, "--model", tiny_with_dropout]
    for attempt in range(len(KILL_POINTS) + 1):
        args = first if attempt == 0 else ["--resume", killed]
        p = run_python(os.path.join(ROOT, "tests", "train_with_faults.py"), used,
                       ";".join(KILL_POINTS), *args, check=False)
        if p.returncode == 0:
            break
        assert p.returncode == -9, p.stdout + p.stderr  # SIGKILL, at the next point
    assert used.read_text().splitlines() == KILL_POINTS and p.returncode == 0
    assert_same_params(final_params(straight), final_params(killed))
    for stage in ("sft", "."):
        assert without_time(read_metrics(killed / stage)) == \
            without_time(read_metrics(straight / stage)), stage
    examples = read_metrics(killed, "eval_examples.jsonl")
    assert examples == read_metrics(straight, "eval_examples.jsonl")
    assert len(examples[0]["task_reward/eval"]) == len(examples[0]["sample_kl/eval"]) > 0
    for name in ("pairs_train.jsonl", "pairs_eval.jsonl", "pairs_stats.json"):
        assert (killed / name).read_text() == (straight / name).read_text(), name
    a, b = (json.loads((d / "summary.json").read_text()) for d in (straight, killed))
    for summary in (a, b):
        summary.pop("runtime_s"), summary.pop("final_checkpoint")
    assert a == b


def test_nan_gradient_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, pairs,
                                                                        capsys):
    def poison_step_3(event, where):
        if event == "gradients" and where["stage"].step == 2:  # the third step
            next(where["stage"].module.parameters()).grad.fill_(float("nan"))

    out = tmp_path / "run"
    with hooks.listening(poison_step_3):
        rc = train.main(["--data", pairs, "--steps", "6", "--batch-size", "4",
                         "--save-every", "2", "--eval-every", "10", "--out", str(out),
                         "--no-plots"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "non-finite gradient at step 3" in err and "last good checkpoint" in err
    assert "(step 2)" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not (out / "final").exists()
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2]


def test_ddp_two_processes_killed_and_resumed_log_what_one_process_logs(tmp_path, pairs):
    """Every logged metric (train and eval, reduced over processes) and the gradient norm
    of each step, at a learning rate that moves the model: the same global batches and
    averaged gradients give the same numbers as one process, also when the two processes
    are killed after step 2 and resumed from its checkpoint."""
    common = ["--data", pairs, "--eval-data", pairs, "--steps", "3", "--batch-size", "8",
              "--eval-every", "3", "--save-every", "2", "--lr", "3e-3", "--warmup-steps", "0",
              "--no-plots"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    tdpo_train(*common, "--out", single)
    killed = torchrun_2(os.path.join(ROOT, "tests", "train_with_faults.py"),
                        tmp_path / "used_points", "step tdpo2 2", *common, "--out", ddp,
                        check=False)
    assert killed.returncode != 0 and not (ddp / "final").exists()
    torchrun_2("-m", "tdpo_ext.training.train", "--resume", ddp)
    assert (ddp / "final" / "model.pt").exists()
    assert json.loads((ddp / "summary.json").read_text())["world_size"] == 2
    s = assert_same_metrics(single, ddp)
    # The per-pair eval values, gathered from both processes, in the eval file's order.
    one, two = (read_metrics(d, "eval_examples.jsonl") for d in (single, ddp))
    assert [r["step"] for r in two] == [r["step"] for r in one] == [0, 3]
    for a, b in zip(one, two):
        for k in ("kl_eval/chosen", "kl_eval/rejected"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (a["step"], k)
    assert abs(s[-1]["loss/train"] - math.log(2)) > 0.05  # the model has moved
    assert_trained_alike(final_params(ddp), final_params(single), single)


def test_transformers_model_from_a_folder(tmp_path, pairs, capsys):
    """--model DIR with a (tiny, random) transformers causal LM and its tokenizer: trains,
    writes a save_pretrained folder that loads again as --model."""
    transformers = pytest.importorskip("transformers")
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


def test_a_tied_head_is_written_once_in_any_dtype(tmp_path):
    """final/ of a model whose head is tied to its embeddings holds the tensor once, as
    save_pretrained writes it, also when cast to --dtype (which copies each name's tensor;
    so does gathering FSDP shards: tests/test_fsdp.py)."""
    from safetensors import safe_open
    model, tok = M.load_model(save_tiny_llama(tmp_path / "hf_model", tied=True))
    names = {}
    for dtype in (None, torch.bfloat16):
        M.save_model(model, tok, str(tmp_path / str(dtype)), dtype=dtype)
        with safe_open(str(tmp_path / str(dtype) / "model.safetensors"), "pt") as f:
            names[dtype] = set(f.keys())
    assert "lm_head.weight" not in names[None] and names[torch.bfloat16] == names[None]


def test_fused_linear_matches_materialized_logits(tmp_path, pairs, capsys, monkeypatch):
    """--fused-linear (hidden states + LM-head weight, no logits) trains a transformers
    model to the same losses and parameters as the materialized-logits path, finding each
    model's LM head once, not at every step."""
    folder = save_tiny_llama(tmp_path / "hf_model")
    heads_found = []
    monkeypatch.setattr(losses, "lm_head_of",
                        lambda model, real=losses.lm_head_of: heads_found.append(model) or
                        real(model))
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
        # The two paths' logits may differ by the rounding of 32-term float32 dot
        # products, <= 32 EPS32 sum|h w| (sum|h w| < 1 here: hidden states of norm ~1,
        # weights of std 0.02); H moves by at most sum p|log p + H| <= 2H ~ 10 times
        # that: < 4e-5 nats of ~5, 1e-5 relative. (Measured on CPU: equal.)
        assert b["entropy_train/chosen"] == pytest.approx(a["entropy_train/chosen"],
                                                          rel=1e-4)
    saved = json.loads((runs["fused_linear"] / "config.json").read_text())
    assert saved["fused_linear"] is True
    assert len(heads_found) == 2  # policy and reference, for 3 steps and 2 evaluations


@pytest.mark.parametrize("tied", [False, True])
def test_fused_linear_under_ddp_equals_one_process(tmp_path, pairs, tied):
    """--fused-linear under torchrun (2 gloo processes): the policy's loss is computed inside
    the DDP wrapper's forward, so every gradient, the LM head's (tied to the embeddings or
    not) included, is averaged: after two steps both ranks hold bit-identical parameters,
    equal to one process's on the same global batches."""
    folder = save_tiny_llama(tmp_path / "hf_model", tied=tied)
    common = ["--model", folder, "--data", pairs, "--eval-data", pairs, "--task", "none",
              "--steps", "2", "--batch-size", "8", "--eval-every", "2", "--lr", "3e-3",
              "--warmup-steps", "0", "--fused-linear", "--no-plots"]
    saver = os.path.join(ROOT, "tests", "train_saving_params.py")
    run_python(saver, tmp_path / "single", *common, "--out", tmp_path / "single_run")
    torchrun_2(saver, tmp_path / "ddp", *common, "--out", tmp_path / "ddp_run")
    one = torch.load(tmp_path / "single" / "tdpo2.rank0.pt", weights_only=True)
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"tdpo2.rank{r}.pt", weights_only=True)
                    for r in (0, 1))
    start = transformers_state(folder)
    assert not torch.equal(one["lm_head.weight"], start["lm_head.weight"])  # it has moved
    for name in one:
        assert torch.equal(rank0[name], rank1[name]), name
    assert_trained_alike(rank0, one, tmp_path / "single_run")


def test_fused_linear_refuses_the_tiny_model(tmp_path, pairs):
    with pytest.raises(SystemExit, match="--fused-linear: the built-in tiny model"):
        train.main(["--data", pairs, "--task", "none", "--steps", "1", "--batch-size", "4",
                    "--fused-linear", "--no-plots", "--out", str(tmp_path / "run")])


def test_help_shows_every_default(capsys):
    parser = config.build_parser()
    helps = {a.option_strings[0]: a.help for a in parser._actions if a.option_strings}
    for field in config.dataclasses.fields(config.Config):
        assert "(default: " in helps["--" + field.name.replace("_", "-")], field.name
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--lr LR learning rate (AdamW) (default: 5e-06; sentiment task: 0.0003" in text


def test_no_task_and_no_data_is_refused():
    with pytest.raises(SystemExit, match="--task none trains on your pairs: give --data"):
        config.from_command_line(["--task", "none"])


def test_a_bigger_model_without_data_is_refused_with_a_command_that_works():
    with pytest.raises(SystemExit) as e:
        config.from_command_line(["--model", "smollm2"])
    command = str(e.value).split("\n")[1].split()
    assert command[:5] == ["tdpo-train", "--model", "smollm2", "--task", "movie-reviews"]
    cfg, _ = config.from_command_line(command[1:])
    assert cfg.task == "movie-reviews" and cfg.steps == 2
    for path in (cfg.data, cfg.eval_data):
        assert os.path.isfile(path), path


def test_the_library_imports_no_training_dependency():
    p = run_python("-c", "import sys, tdpo_ext; print(sorted(m for m in sys.modules if "
                   "m.split('.')[0] in ('transformers', 'matplotlib', 'datasets', 'trl') "
                   "or m.startswith('tdpo_ext.training')))")
    assert p.stdout.strip() == "[]"


def test_long_stages_on_cpu_are_announced_before_they_start(capsys):
    cpu = torch.device("cpu")
    big = torch.nn.Linear(15_000, 9_000, device="meta")  # 135 M parameters, no memory
    pipeline.announce_cost("[tdpo2] 12 steps", big, 12 * 8 * 90, 4, cpu)
    assert "[tdpo2] 12 steps: a 135 M-parameter model on CPU, roughly 8 min" in \
        capsys.readouterr().out
    pipeline.announce_cost("[tdpo2] 150 steps", M.load_model("tiny")[0], 150 * 64 * 40, 4, cpu)
    pipeline.announce_cost("[tdpo2] 12 steps", big, 12 * 8 * 90, 4, torch.device("meta"))
    assert capsys.readouterr().out == ""
