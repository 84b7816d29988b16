"""tdpo_ext.trl: TDPOTrainer on TRL's DPOTrainer, against tdpo_loss computed by hand from
the two models' logits, against TRL's own DPO loss, through TRL's data formats, PEFT,
resume, and two processes. Offline: a word-level tokenizer and tiny random Llamas
(trl_setup.py)."""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl")
peft = pytest.importorskip("peft")

import tdpo_ext  # noqa: E402
from tdpo_ext.trl import TDPOConfig, TDPOTrainer  # noqa: E402
from tdpo_ext.trl.compat import TRL_VERSION  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from packaging.version import Version  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import DPOTrainer  # noqa: E402

from compare import assert_adam_alike  # noqa: E402
from ports import free_port  # noqa: E402
from trl_policy_metrics import (POLICY_METRICS, assert_policy_metrics_close,  # noqa: E402
                                policy_metrics_atol)
from trl_setup import make_config, make_dataset, make_tokenizer, models_pair  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


class _Recorder(TrainerCallback):
    """The gradients of every trainable parameter just before each optimizer step."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()
                           if p.grad is not None})


def _recording(trainer_class):
    class Recording(trainer_class):
        """Each step's batch and the loss that _compute_loss returned for it."""

        def _compute_loss(self, model, inputs, return_outputs):
            loss = super()._compute_loss(model, inputs, return_outputs)
            self.steps.append(({k: v.clone() for k, v in inputs.items()}, loss.detach()))
            return loss
    return Recording


def train(tmp_path, *, trainer_class=TDPOTrainer, policy=None, ref=None, dataset=None,
          peft_config=None, resume=None, **config):
    """Trains with a recording trainer; returns (trainer, recorder of gradients)."""
    if policy is None:
        policy, ref = models_pair(move=1.0)
    args = make_config(tmp_path / "out", **config)
    recorder = _Recorder()
    trainer = _recording(trainer_class)(
        model=policy, ref_model=ref, args=args, processing_class=make_tokenizer(),
        train_dataset=make_dataset() if dataset is None else dataset, callbacks=[recorder],
        peft_config=peft_config)
    trainer.steps = []
    trainer.train(resume_from_checkpoint=resume)
    return trainer, recorder


def by_hand(policy, ref, batch, **kw):
    """tdpo_loss of the two models' logits on a recorded batch, and the policy's
    parameter gradients."""
    policy = copy.deepcopy(policy)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        ref_logits = ref(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).logits
    out = tdpo_ext.tdpo_loss(logits, ref_logits, labels, **kw)
    out.loss.backward()
    return out, {n: p.grad for n, p in policy.named_parameters()}


def assert_grads_close(got, expected, rtol=1e-5):
    assert got.keys() == expected.keys()
    for name, g in got.items():
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(g, expected[name], rtol=rtol, atol=rtol * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("loss_type,tied", [("tdpo2", False), ("tdpo1", True),
                                            ("sigmoid", False)])
def test_first_step_equals_tdpo_loss_by_hand(tmp_path, loss_type, tied):
    policy, ref = models_pair(move=1.0, tied=tied)
    start = copy.deepcopy(policy)
    trainer, recorder = train(tmp_path, policy=policy, ref=ref, loss_type=loss_type,
                              max_steps=1)
    batch, loss = trainer.steps[0]
    variant = {"sigmoid": "dpo"}.get(loss_type, loss_type)
    out, grads = by_hand(start, ref, batch, beta=0.5, alpha=0.7, variant=variant)
    torch.testing.assert_close(loss, out.loss.detach(), rtol=1e-5, atol=0)
    logged = trainer.state.log_history[0]
    for name, value in (("rewards/chosen", out.chosen_rewards),
                        ("rewards/rejected", out.rejected_rewards),
                        ("kl/chosen", out.chosen_kl), ("kl/rejected", out.rejected_kl),
                        ("logps/chosen", out.chosen_logps)):
        assert math.isclose(logged[name], value.mean().item(), rel_tol=1e-5, abs_tol=1e-7), name
    assert out.rejected_kl.abs().min() > 1e-3  # the check is not on zeros
    assert_grads_close(recorder.grads[0], grads)


def train_echoing(tmp_path, **config):
    """train() with tied embeddings, on chosen responses that echo a word
    (trl_setup.make_dataset): a mean_token_accuracy far from 0, and other than over the
    rejected responses."""
    policy, ref = models_pair(move=1.0, tied=True)
    return train(tmp_path, policy=policy, ref=ref, dataset=make_dataset(echo=True), **config)


def assert_first_policy_metrics_close(got, expected, what: str) -> None:
    """entropy, logits/* and mean_token_accuracy of two runs' first step, where both hold
    train_echoing's start parameters."""
    expected = expected.state.log_history[0]
    assert 0.2 < expected["mean_token_accuracy"] < 0.8, expected  # neither all nor none
    assert_policy_metrics_close(got.state.log_history[0], expected,
                                policy_metrics_atol(models_pair(move=1.0, tied=True)[0]), what)


def test_fused_head_equals_logits_path(tmp_path):
    runs = [train_echoing(tmp_path / str(fused), use_fused_linear=fused, max_steps=2)
            for fused in (True, False)]
    (fused, fused_grads), (logits, logits_grads) = runs
    for (_, a), (_, b) in zip(fused.steps, logits.steps):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    for a, b in zip(fused_grads.grads, logits_grads.grads):
        assert_grads_close(a, b)
    assert_first_policy_metrics_close(logits, fused, "logits path")


def test_sigmoid_equals_trl_dpo(tmp_path):
    """DPO's loss and gradients, and the metrics of the policy's tokens (from the kernels'
    per-token metrics), equal DPOTrainer's own; with test_fused_head_equals_logits_path,
    on both paths. Every release of the supported range (TRL 1.8 to 1.16) logs the four,
    so none skips the comparison."""
    ours, ours_grads = train_echoing(tmp_path / "ours", loss_type="sigmoid", max_steps=2)
    theirs, theirs_grads = train_echoing(tmp_path / "trl", trainer_class=DPOTrainer,
                                         loss_type="sigmoid", max_steps=2)
    for (_, a), (_, b) in zip(ours.steps, theirs.steps):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    for a, b in zip(ours_grads.grads, theirs_grads.grads):
        assert_grads_close(a, b, rtol=1e-4)
    assert_first_policy_metrics_close(ours, theirs, "fused head")


@pytest.mark.parametrize("conversational", [False, True])
@pytest.mark.parametrize("implicit", [False, True])
def test_dataset_formats(tmp_path, conversational, implicit):
    """Every completion token the trainer scores is exactly the response's (with EOS or
    the chat template's end), and the loss is tdpo_loss by hand on that batch."""
    dataset = make_dataset(2, conversational=conversational, implicit=implicit)
    policy, ref = models_pair(move=1.0)
    start = copy.deepcopy(policy)
    trainer, _ = train(tmp_path, policy=policy, ref=ref, dataset=dataset, max_steps=1)
    batch, loss = trainer.steps[0]
    tok = make_tokenizer()
    scored = sorted(tok.decode(ids[mask.bool()])
                    for ids, mask in zip(batch["input_ids"], batch["completion_mask"]))
    explicit = make_dataset(2, conversational=conversational)
    if conversational:
        expected = [f"{m[0]['content']} <|end|>" for k in ("chosen", "rejected")
                    for m in explicit[k]]
    else:
        expected = [f"{text.strip()} <eos>" for k in ("chosen", "rejected")
                    for text in explicit[k]]
    if implicit and not conversational and TRL_VERSION < Version("1.14"):
        # Before TRL 1.14, DPOTrainer split an implicit prompt of strings at the longest
        # common prefix of characters, which can cut into the responses' first word:
        # TDPOTrainer scores what DPOTrainer scores.
        theirs, _ = train(tmp_path / "trl", trainer_class=DPOTrainer, dataset=dataset,
                          loss_type="sigmoid", max_steps=1)
        expected = [tok.decode(ids[mask.bool()]) for ids, mask in zip(
            theirs.steps[0][0]["input_ids"], theirs.steps[0][0]["completion_mask"])]
    assert scored == sorted(expected)
    out, _ = by_hand(start, ref, batch, beta=0.5, alpha=0.7)
    torch.testing.assert_close(loss, out.loss.detach(), rtol=1e-5, atol=0)


def test_peft_lora_trains_adapters_only(tmp_path):
    policy, _ = models_pair()
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           task_type="CAUSAL_LM")
    trainer, _ = train(tmp_path, policy=policy, ref=None, peft_config=lora, max_steps=3,
                       learning_rate=1e-2)
    # The reference is the base model (adapters disabled), equal to the policy at step 0.
    assert trainer.steps[0][1].item() == pytest.approx(math.log(2), abs=1e-6)
    assert trainer.steps[-1][1].item() != pytest.approx(math.log(2), abs=1e-4)
    changed = {n for n, p in trainer.model.named_parameters()
               if "lora_" not in n and not torch.equal(
                   p, before[n.replace("base_model.model.", "").replace(".base_layer", "")])}
    assert changed == set()
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # moved from their zero init


def test_resume_from_checkpoint_continues_the_same_losses(tmp_path):
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2)
    whole, _ = train(tmp_path / "whole", **kw)
    policy, ref = models_pair(move=1.0)
    interrupted, _ = train(tmp_path / "resumed", policy=policy, ref=ref, **kw)
    checkpoint = tmp_path / "resumed" / "out" / "checkpoint-2"
    assert checkpoint.is_dir()
    resumed, _ = train(tmp_path / "resumed", resume=str(checkpoint), **kw)
    assert len(resumed.steps) == 2
    for (_, a), (_, b) in zip(resumed.steps, whole.steps[2:]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    del interrupted


@pytest.mark.parametrize("settings,message", [
    (dict(loss_type="ipo"), "unknown loss_type 'ipo'"),
    (dict(loss_type=["tdpo2", "sft"]), "combines several losses"),
    (dict(precompute_ref_log_probs=True), "whole next-token distribution"),
    (dict(tdpo_alpha=-0.1), "tdpo_alpha must be >= 0"),
    (dict(beta=0.0), "beta must be > 0"),
    (dict(ld_alpha=0.5), "ld_alpha"),
    (dict(f_divergence_type="js_divergence"), "f_divergence_type"),
    (dict(use_weighting=True), "WPO"),
    (dict(label_smoothing=0.1), "label_smoothing"),
])
def test_bad_configuration_fails_at_construction(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        TDPOConfig(output_dir=str(tmp_path), use_cpu=True, **settings)


class _HalvedLlama(transformers.LlamaForCausalLM):
    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out


def _hooked_reference(policy):
    ref = copy.deepcopy(policy)
    ref.lm_head.register_forward_hook(lambda module, args, output: output * 2)
    return ref


def _subclassed_reference(policy):
    ref = _HalvedLlama(policy.config)
    ref.load_state_dict(policy.state_dict())
    return ref


@pytest.mark.parametrize("make_reference", [_hooked_reference, _subclassed_reference])
def test_reference_whose_logits_differ_from_its_head_is_refused(tmp_path, make_reference):
    """A reference equal to the policy but for its logits (an LM-head hook, a subclass):
    the fused head would read its hidden states and plain head, and see KL 0."""
    policy, _ = models_pair()
    ref = make_reference(policy)
    with pytest.raises(ValueError, match=r"reference model: tdpo_ext: cannot fuse the LM head "
                                         r"of \w*Llama\w*: .*use_fused_linear=False"):
        train(tmp_path, policy=policy, ref=ref, max_steps=1)
    trainer, _ = train(tmp_path, policy=policy, ref=ref, max_steps=1, use_fused_linear=False)
    assert trainer.state.log_history[0]["kl/rejected"] > 1e-3


def test_dpo_config_is_refused(tmp_path):
    from trl import DPOConfig
    policy, ref = models_pair()
    with pytest.raises(TypeError, match="TDPOConfig"):
        TDPOTrainer(model=policy, ref_model=ref, args=DPOConfig(str(tmp_path), use_cpu=True),
                    train_dataset=make_dataset(), processing_class=make_tokenizer())


def _with_row(dataset, row, **values):
    rows = dataset.to_list()
    rows[row].update(values)
    return Dataset.from_list(rows)


@pytest.mark.parametrize("split,make,message", [
    ("train", lambda: make_dataset().select([]),
     r"the train dataset is empty \(0 rows\); expected rows of preference pairs, in the "
     r"standard format \('prompt', 'chosen' and 'rejected' strings\) or the conversational"),
    ("train", lambda: _with_row(make_dataset(), 5, rejected=None),
     r"train dataset, row 5, column 'rejected': found None; expected a string \(the "
     r"standard format with an explicit prompt, as row 0's 'prompt' is: 'prompt', "
     r"'chosen', 'rejected'\)"),
    ("eval", lambda: make_dataset(implicit=True).remove_columns("rejected"),
     r"the eval dataset has no 'rejected' column \(its columns: \['chosen'\]\); expected "
     r"the standard format"),
    ("train", lambda: make_dataset(3).map(lambda row, i: {"rejected": i}, with_indices=True),
     r"train dataset, row 0, column 'rejected': found int 0; expected a string \(the "
     r"standard format with an explicit prompt, as row 0's 'prompt' is"),
    ("eval", lambda: Dataset.from_list([{**row, "rejected": [
        {"role": "assistant", "content": None if i == 2 else "w1"}]}
        for i, row in enumerate(make_dataset(4, conversational=True))]),
     r"eval dataset, row 2, column 'rejected': found a list whose item 0 is not a message: "
     r"\{'role': 'assistant', 'content': None\}; expected a non-empty list of messages.*"
     r"\(the conversational format with an explicit prompt, as row 0's 'prompt' is"),
    ("train", lambda: make_dataset().map(
        lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]}),
     r"train dataset, row 0, column 'chosen': found a string ' w\d+.*'; expected a non-empty "
     r"list of messages, .* \(the conversational format with an explicit prompt, as row 0's "
     r"'prompt' is: 'prompt', 'chosen', 'rejected'\)"),
])
def test_bad_dataset_is_refused_by_name_row_and_column(tmp_path, split, make, message):
    datasets = {"train_dataset": make_dataset(), "eval_dataset": None}
    datasets[f"{split}_dataset"] = make()
    policy, ref = models_pair()
    with pytest.raises(ValueError, match=message):
        TDPOTrainer(model=policy, ref_model=ref, args=make_config(tmp_path),
                    processing_class=make_tokenizer(), **datasets)


def test_bad_row_of_a_streamed_dataset_is_refused_as_it_streams(tmp_path):
    """An IterableDataset is checked row by row as training reads it, not read twice."""
    stream = _with_row(make_dataset(), 1, rejected=None).to_iterable_dataset()
    with pytest.raises(ValueError, match="train dataset, row 1, column 'rejected': found None"):
        train(tmp_path, dataset=stream, max_steps=1)


def test_two_processes_equal_one(tmp_path):
    """torchrun, 2 CPU processes (gloo), fused LM head: after two steps both ranks hold
    the same parameters, and log the same metrics, equal to one process's on the same
    global batch (the metrics averaged over both processes' pairs, not each one's own;
    entropy, logits/* and mean_token_accuracy over both processes' tokens, whose counts
    differ between the processes)."""
    script = os.path.join(HERE, "trl_ddp_run.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=HERE + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    for procs in (1, 2):
        out = tmp_path / f"procs{procs}"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
               "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               script, str(out), str(4 // procs)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one, rank0, rank1 = (torch.load(tmp_path / run / f"rank{rank}.pt", weights_only=True)
                         for run, rank in (("procs1", 0), ("procs2", 0), ("procs2", 1)))
    logged = [[{k: v for k, v in log.items() if k.startswith(("rewards/", "kl/", "logps/"))}
               for log in run["log_history"] if "loss" in log] for run in (one, rank0, rank1)]
    assert len(logged[0]) == 2 and len(logged[0][0]) == 9
    for step, (expected, *got) in enumerate(zip(*logged)):
        for name, value in expected.items():
            for rank, ranks in enumerate(got):
                assert ranks[name] == pytest.approx(value, rel=1e-4, abs=1e-6), \
                    (step, rank, name)
    # The first step's, where both runs hold the same parameters (afterwards they may
    # differ by what Adam can move them, compare.py).
    first = [next(log for log in run["log_history"] if "loss" in log)
             for run in (one, rank0, rank1)]
    atol = policy_metrics_atol(models_pair(move=1.0, tied=True)[0])
    for rank, ranks in enumerate(first[1:]):
        assert_policy_metrics_close(ranks, first[0], atol, f"rank {rank}")
    adam = one["adam"]
    one, rank0, rank1 = (run["params"] for run in (one, rank0, rank1))
    start = models_pair(move=1.0, tied=True)[0].state_dict()
    for name in one:
        assert torch.equal(rank0[name], rank1[name]), name
    assert_adam_alike(rank0, one, **adam, name="rank 0")
    assert not torch.equal(one["lm_head.weight"], start["lm_head.weight"])


def test_sync_ref_model(tmp_path):
    """TR-DPO's reference sync works as in DPOTrainer: with mixup alpha 1 after each step,
    the second step's reference is the policy itself (KL 0, loss ln 2)."""
    trainer, _ = train(tmp_path, sync_ref_model=True, ref_model_sync_steps=1,
                       ref_model_mixup_alpha=1.0, max_steps=2)
    first, second = (h for h in trainer.state.log_history if "loss" in h)
    assert first["kl/rejected"] > 1e-3 and second["kl/rejected"] == pytest.approx(0, abs=1e-6)
    assert trainer.steps[1][1].item() == pytest.approx(math.log(2), abs=1e-6)


def test_checkpointing_bf16_and_eval(tmp_path):
    """TRL's defaults beyond the fast test settings: gradient checkpointing and bf16
    autocast, fused head against the logits path (to bf16 rounding), and evaluation
    logging the same metrics under eval_."""
    losses = []
    for fused in (True, False):
        trainer, _ = train(tmp_path / str(fused), gradient_checkpointing=True, bf16=True,
                           use_fused_linear=fused, max_steps=2)
        losses.append(torch.stack([loss for _, loss in trainer.steps]))
    torch.testing.assert_close(losses[0], losses[1], rtol=2e-2, atol=0)
    metrics = trainer.evaluate(make_dataset(4, seed=3))
    for name in ("loss", "rewards/accuracies", "kl/chosen", "kl/rejected", "kl/margin",
                 *POLICY_METRICS):
        assert math.isfinite(metrics[f"eval_{name}"]), name
