"""--temperature reaches the sampler, on both of its paths (the built-in model's own loop,
and a transformers model's generate): near 0 every sample is the most likely token; at a
temperature T, a seeded sampler draws what multinomial(softmax(logits / T)) draws. One
new token per prompt, so that the logits of a plain forward are the ones sampled from."""
import pytest
import torch
from training_runs import save_tiny_llama

from tdpo_ext.training import models as M

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
