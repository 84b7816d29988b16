"""Offline parts for the TRL tests: a word-level tokenizer with a chat template, a tiny
random Llama over its vocabulary, preference datasets in TRL's four formats, and a
TDPOConfig for fast CPU runs. Also imported by trl_ddp_run.py under torchrun."""
from __future__ import annotations

import copy
import random

import torch
import transformers
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers

from tdpo_ext.trl import TDPOConfig

SPECIAL = ["<unk>", "<pad>", "<eos>", "<|user|>", "<|assistant|>", "<|end|>"]
N_WORDS = 2042  # a vocabulary of 2048 tokens
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")


def make_tokenizer():
    vocab = {w: i for i, w in enumerate(SPECIAL + [f"w{i}" for i in range(N_WORDS)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
        additional_special_tokens=SPECIAL[3:])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model(seed=0, tied=False, vocab=len(SPECIAL) + N_WORDS, hidden=32):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
        pad_token_id=1, eos_token_id=2, bos_token_id=None)
    return transformers.LlamaForCausalLM(config)


def models_pair(seed=0, tied=False, move=0.2, hidden=32):
    """(policy, reference): the reference random, the policy a perturbed copy of it, so
    that the first step already has nonzero margins and KLs."""
    ref = make_model(seed, tied, hidden=hidden)
    policy = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * move * p.std().nan_to_num(0.02))
    return policy, ref


def _words(rng, n):
    return " ".join(f"w{rng.randrange(N_WORDS)}" for _ in range(n))


def make_dataset(n_pairs=8, *, conversational=False, implicit=False, echo=False, seed=0):
    """Preference pairs in one of TRL's four formats. Completions start with a space so
    that prompt + completion splits into the same words as each part alone. With echo,
    each chosen response repeats one word: a random model with tied embeddings predicts
    the token it reads as the next one, so its mean_token_accuracy (over the chosen
    responses) is far from 0, and from its value over the rejected ones."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_pairs):
        prompt = _words(rng, rng.randint(2, 6))
        chosen, rejected = _words(rng, rng.randint(1, 6)), _words(rng, rng.randint(1, 6))
        if echo:
            chosen = " ".join([chosen.split()[0]] * (len(chosen.split()) + 1))
        if conversational:
            row = {"prompt": [{"role": "user", "content": prompt}],
                   "chosen": [{"role": "assistant", "content": chosen}],
                   "rejected": [{"role": "assistant", "content": rejected}]}
            if implicit:
                row = {k: row["prompt"] + row[k] for k in ("chosen", "rejected")}
        else:
            row = {"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected}
            if implicit:
                row = {k: prompt + row[k] for k in ("chosen", "rejected")}
        rows.append(row)
    return Dataset.from_list(rows)


def make_config(out, **kwargs):
    settings = dict(
        output_dir=str(out), per_device_train_batch_size=2, max_steps=2,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, bf16=False, gradient_checkpointing=False, max_grad_norm=0.0,
        dataloader_num_workers=0, disable_tqdm=True, seed=0, beta=0.5, tdpo_alpha=0.7,
        max_length=64)
    settings.update(kwargs)
    return TDPOConfig(**settings)


def adam_settings(args) -> dict:
    """What tests/compare.assert_adam_alike needs to know of a run's TDPOConfig: AdamW's
    largest learning rate (the schedule only lowers it), steps and betas."""
    return dict(lr=args.learning_rate, steps=args.max_steps,
                betas=(args.adam_beta1, args.adam_beta2))


def save_model_folder(folder, seed=0):
    """A tiny random Llama and the word-level tokenizer, saved as a transformers model
    folder (what --model_name_or_path names)."""
    make_model(seed).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return str(folder)
