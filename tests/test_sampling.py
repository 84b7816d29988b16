"""The sampler and the diversity of its samples, on both of its paths (the built-in
model's own loop, and a transformers model's generate). --temperature reaches the sampler:
near 0 every sample is the most likely token; at a temperature T, a seeded sampler draws
what multinomial(softmax(logits / T)) draws (one new token per prompt, so that the logits
of a plain forward are the ones sampled from). The evaluation's sample entropy is the
policy's entropy over the sampled tokens; distinct-n counts n-grams within samples."""
import math

import pytest
import torch
from error_bounds import EPS32, ULPS
from training_runs import save_tiny_llama

from tdpo_ext.training import models as M
from tdpo_ext.training import sampling
from tdpo_ext.training.config import Config
from tdpo_ext.training.tasks import get_task

SEED = 3


@pytest.fixture(scope="module", params=["tiny", "transformers"])
def model(request, tmp_path_factory):
    if request.param == "tiny":
        return M.load_model("tiny", seed=0)
    return M.load_model(save_tiny_llama(tmp_path_factory.mktemp("sampling") / "llama"))


def prompts(vocab_size):
    """16 prompts of 4 tokens (one length: no padding, which a plain forward would not
    position as generate does), none of them pad or EOS."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab_size, (16, 4), generator=g)


def last_logits(model, ids):
    with torch.no_grad():
        if isinstance(model, M.TinyGPT):
            return model(ids)[0][:, -1].float()
        return model(input_ids=ids).logits[:, -1].float()


def sample(model, tok, ids, temperature):
    rows = M.generate(model, tok, ids.tolist(), max_new_tokens=1, temperature=temperature,
                      seed=SEED)
    return torch.tensor([r[0] for r in rows])


def seeded_multinomial(model, probs):
    """What the sampler draws from `probs` with its generator seeded by SEED: the tiny
    model's loop draws from that generator; transformers' generate from torch's global
    generator, which generate() seeds from that one."""
    gen = torch.Generator().manual_seed(SEED)
    if isinstance(model, M.TinyGPT):
        return torch.multinomial(probs, 1, generator=gen).squeeze(1)
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
        return torch.multinomial(probs, 1).squeeze(1)


def test_near_zero_temperature_samples_the_most_likely_token(model):
    model, tok = model
    ids = prompts(len(tok))
    logits, temperature = last_logits(model, ids), 1e-5
    top2 = logits.topk(2).values
    assert (top2[:, 0] - top2[:, 1]).min() > 20 * temperature  # no near ties
    got, expected = sample(model, tok, ids, temperature), logits.argmax(-1)
    assert torch.equal(got, expected), (got, expected)


def test_samples_at_a_temperature_are_drawn_from_softmax_of_logits_over_it(model):
    model, tok = model
    ids = prompts(len(tok))
    logits, temperature = last_logits(model, ids), 0.5
    expected = seeded_multinomial(model, (logits / temperature).softmax(-1))
    got = sample(model, tok, ids, temperature)
    assert torch.equal(got, expected), (got, expected)
    # ... which is not what the same draws give at temperature 1
    assert not torch.equal(expected, seeded_multinomial(model, logits.softmax(-1)))


def test_distinct_n_counts_the_n_grams_within_each_sample():
    samples = [[1, 2, 3, 1, 2], [1, 2]]
    # unigrams 1 2 3 1 2 1 2: 3 distinct of 7; bigrams (1 2) (2 3) (3 1) (1 2) | (1 2):
    # 3 distinct of 5 (the (2 1) across the two samples is not one)
    assert sampling.distinct_n(samples, 1) == 3 / 7
    assert sampling.distinct_n(samples, 2) == 3 / 5
    assert sampling.distinct_n([[4, 4, 4, 4]], 2) == 1 / 3
    assert sampling.distinct_n([[7], []], 2) == sampling.distinct_n([], 1) == 0.0


def entropy_and_bound(logits):
    """Each position's entropy, float64, from torch's Categorical, and how far the op's
    float32 value may be from it: ULPS * EPS32 times the terms the op sums (tests/error_bounds.py's
    rule), |lse - max| + sum p |x - max| in the row maximum's frame (csrc/tdpo_math.h),
    plus |max| for rounding x - max."""
    x = logits.double()
    m = x.max(-1, keepdim=True).values
    p = x.softmax(-1)
    terms = ((x.logsumexp(-1, keepdim=True) - m).abs() + (p * (x - m).abs()).sum(-1, True)
             + m.abs()).squeeze(-1)
    return torch.distributions.Categorical(logits=x).entropy(), ULPS * EPS32 * terms


def test_sample_entropy_is_the_policys_entropy_over_the_sampled_tokens(model, monkeypatch):
    """sample_eval's per-sample entropy against torch's entropy of the logits it scored,
    at the positions that predict each sampled token (found from the prompts and samples,
    not from the labels sample_eval builds); each within the bound on its tokens' mean."""
    model, tok = model
    task = get_task("sentiment")
    generated, scored = [], []

    def generate(*args, **kwargs):
        generated.append((args[2], real_generate(*args, **kwargs)))
        return generated[-1][1]

    def sequence_stats(policy_logits, *args, **kwargs):
        scored.append(policy_logits.detach().clone())
        return real_stats(policy_logits, *args, **kwargs)

    real_generate, real_stats = M.generate, sampling.sequence_stats
    monkeypatch.setattr(sampling.M, "generate", generate)
    monkeypatch.setattr(sampling, "sequence_stats", sequence_stats)
    s = sampling.sample_eval(model, model, tok, task, task.prompts("eval", 6),
                             Config(max_new_tokens=8), seed=SEED)
    monkeypatch.undo()
    (prompt_ids, samples), = generated
    rows = [row for logits in scored for row in logits]
    assert len(rows) == len(samples) == len(s["sample_entropies"]) == 6
    for row, prompt, sample, got in zip(rows, prompt_ids, samples, s["sample_entropies"]):
        assert sample  # a sample has a token at least (EOS)
        h, bound = entropy_and_bound(row[len(prompt) - 1:len(prompt) - 1 + len(sample)])
        assert abs(got - h.mean().item()) <= bound.mean().item(), (got, h.mean())
        assert 0 <= got <= math.log(row.shape[-1]) + bound.mean().item()
    assert s["sample_entropy"] == pytest.approx(sum(s["sample_entropies"]) / 6, rel=1e-12)
    assert s["distinct_1"] == sampling.distinct_n(samples, 1)
    assert s["distinct_2"] == sampling.distinct_n(samples, 2)
