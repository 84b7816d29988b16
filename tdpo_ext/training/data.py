"""Preference data: JSONL loading, the reference implementation's tokenization, padding
into concatenated batches, and a resumable, DDP-sharded order of examples.

A JSONL line is {"prompt": str, "chosen": str, "rejected": str}; blank lines are allowed
and skipped, anything else that is not such an object is an error naming file and line.
"""
from __future__ import annotations

import json

import torch

IGNORE_INDEX = -100


class DataError(ValueError):
    """A malformed data file; the message names the file and line."""


def load_jsonl(path: str, keys=("prompt", "chosen", "rejected")) -> list[dict]:
    examples = []
    with open(path, "rb") as f:  # decoded line by line, so that a bad byte names its line
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} "
                                f"at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column "
                                f"{e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object with keys "
                                f"{list(keys)}, got {type(obj).__name__}")
            missing = [k for k in keys if k not in obj]
            if missing:
                raise DataError(f"{path}:{lineno}: missing key(s) {missing}")
            bad = [k for k in keys if not isinstance(obj[k], str)]
            if bad:
                raise DataError(f"{path}:{lineno}: value(s) of {bad} must be strings")
            examples.append({k: obj[k] for k in keys} | {"source": f"{path}:{lineno}"})
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def tokenize_pair(prompt: str, chosen: str, rejected: str, tokenizer, *, max_length: int,
                  max_prompt_length: int, truncation_mode: str = "keep_end",
                  source: str = "") -> dict:
    """tokenize_batch_element of the DPO/TDPO reference code: prompt and responses are
    tokenized separately (no special tokens), EOS is appended to each response; if prompt +
    longer response exceed max_length the prompt is cut to max_prompt_length (keeping its
    end, or its start with truncation_mode="keep_start"); if still too long, the responses
    are cut to max_length - max_prompt_length. Labels copy the input ids with the prompt
    positions set to -100."""
    where = f"{source}: " if source else ""
    formatted = tokenizer.format_prompt(prompt)  # a chat template may add EOS-ended turns
    prompt_ids = tokenizer.encode(formatted)
    raw_prompt_ids = prompt_ids if formatted == prompt else tokenizer.encode(prompt)
    chosen_ids, rejected_ids = tokenizer.encode(chosen), tokenizer.encode(rejected)
    eos = tokenizer.eos_token_id
    for name, ids in (("prompt", raw_prompt_ids), ("chosen", chosen_ids),
                      ("rejected", rejected_ids)):
        if eos in ids:
            raise DataError(f"{where}{name} contains the EOS token")
    chosen_ids, rejected_ids = chosen_ids + [eos], rejected_ids + [eos]
    longer = max(len(chosen_ids), len(rejected_ids))
    if len(prompt_ids) + longer > max_length:
        if truncation_mode == "keep_start":
            prompt_ids = prompt_ids[:max_prompt_length]
        elif truncation_mode == "keep_end":
            prompt_ids = prompt_ids[-max_prompt_length:]
        else:
            raise ValueError(f"unknown truncation mode {truncation_mode!r}")
    if len(prompt_ids) + longer > max_length:
        keep = max_length - max_prompt_length
        chosen_ids, rejected_ids = chosen_ids[:keep], rejected_ids[:keep]
    out = {}
    for name, resp in (("chosen", chosen_ids), ("rejected", rejected_ids)):
        out[f"{name}_input_ids"] = prompt_ids + resp
        out[f"{name}_labels"] = [IGNORE_INDEX] * len(prompt_ids) + resp
    out["prompt_input_ids"] = prompt_ids
    return out


def tokenize_sft_text(text: str, tokenizer, max_length: int) -> dict:
    """A plain text for language-model fine-tuning: every token but the first is a label
    (as a pair with an empty prompt would be, minus the missing first prediction)."""
    ids = (tokenizer.encode(text) + [tokenizer.eos_token_id])[:max_length]
    return {"chosen_input_ids": ids, "chosen_labels": list(ids)}


def _pad(rows: list[list[int]], value: int, width: int) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for r, row in enumerate(rows):
        out[r, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def collate(items: list[dict], pad_token_id: int, chosen_only: bool = False) -> dict:
    """Right-padded tensors; the concatenated batch has the B chosen rows, then the B
    rejected rows (tdpo_loss's layout), padded to one width."""
    names = ["chosen"] if chosen_only else ["chosen", "rejected"]
    ids = [it[f"{n}_input_ids"] for n in names for it in items]
    labels = [it[f"{n}_labels"] for n in names for it in items]
    width = max(len(r) for r in ids)
    input_ids = _pad(ids, pad_token_id, width)
    return {"input_ids": input_ids, "labels": _pad(labels, IGNORE_INDEX, width),
            "attention_mask": _pad([[1] * len(r) for r in ids], 0, width)}


class ExampleStream:
    """The order of examples: a fresh seeded permutation each epoch, concatenated, so a
    step's global batch is examples [step * B, (step + 1) * B) of the stream (no example is
    dropped at an epoch's end). The position is just the number of examples consumed."""

    def __init__(self, n_examples: int, seed: int):
        self.n, self.seed, self._perms = n_examples, seed, {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    def take(self, position: int, count: int) -> list[int]:
        return [self._perm(p // self.n)[p % self.n] for p in range(position, position + count)]


def shard(indices: list, rank: int, world_size: int) -> list:
    """This rank's contiguous share of a global batch."""
    per = len(indices) // world_size
    return indices[rank * per:(rank + 1) * per]
