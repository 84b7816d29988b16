"""Training-loop pieces without a training run: JSONL loading, the reference code's
tokenization and truncation, padding, the data order, fused vs reference loss in the loop,
the policy's entropy on pairs, and the embedded task's VADER port."""
import json
import random

import pytest
import torch

from tdpo_ext.training import data as D
from tdpo_ext.training import losses
from tdpo_ext.training import models as M
from tdpo_ext.training import tasks as T
from tdpo_ext.training import train
from tdpo_ext.training.config import Config


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_jsonl_loads_and_skips_blank_lines(tmp_path):
    p = write(tmp_path / "d.jsonl", [json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}),
                                      "", json.dumps({"prompt": "d", "chosen": "e",
                                                      "rejected": "f", "extra": 1})])
    rows = D.load_jsonl(p)
    assert [r["prompt"] for r in rows] == ["a", "d"]
    assert rows[1]["source"] == f"{p}:3"


@pytest.mark.parametrize("bad,why", [
    ('{"prompt": "a", "chosen": "b"', "not valid JSON"),
    ('["a", "b", "c"]', "expected a JSON object"),
    ('{"prompt": "a", "chosen": "b"}', "missing key(s) ['rejected']"),
    ('{"prompt": "a", "chosen": "b", "rejected": 3}', "must be strings"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad, why):
    good = json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"})
    p = write(tmp_path / "bad.jsonl", [good, good, bad, good])
    with pytest.raises(D.DataError) as e:
        D.load_jsonl(p)
    assert f"{p}:3:" in str(e.value) and why in str(e.value)


def test_malformed_line_fails_the_cli(tmp_path, capsys):
    good = json.dumps({"prompt": "the movie", "chosen": "was good .", "rejected": "was bad ."})
    p = write(tmp_path / "bad.jsonl", [good, "{oops", good])
    rc = train.main(["--data", p, "--steps", "1", "--batch-size", "2", "--out",
                     str(tmp_path / "run"), "--no-plots"])
    assert rc == 1
    assert f"{p}:2: not valid JSON" in capsys.readouterr().err


def test_bytes_that_are_not_utf8_name_file_and_line(tmp_path):
    good = json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}).encode()
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(good + b"\n" + good.replace(b'"b"', b'"caf\xe9"') + b"\n")
    with pytest.raises(D.DataError, match=f"{p}:2: not UTF-8 text"):
        D.load_jsonl(str(p))


def test_tokenization_matches_reference_code():
    tok = M.builtin_tokenizer()
    enc, eos = tok.encode, tok.eos_token_id
    prompt, chosen, rejected = "the movie was", "very good .", "bad ."
    out = D.tokenize_pair(prompt, chosen, rejected, tok, max_length=64, max_prompt_length=16)
    p, c, r = enc(prompt), enc(chosen) + [eos], enc(rejected) + [eos]
    assert out["chosen_input_ids"] == p + c and out["rejected_input_ids"] == p + r
    assert out["chosen_labels"] == [-100] * len(p) + c
    assert out["rejected_labels"] == [-100] * len(p) + r


def test_truncation_cuts_the_prompt_first_then_the_responses():
    tok = M.builtin_tokenizer()
    enc, eos = tok.encode, tok.eos_token_id
    prompt = "the movie was good and the acting was great and the music"  # 12 words
    chosen, rejected = "was very good .", "was bad ."  # 5 and 3 tokens with EOS
    # prompt + longer response = 17 > 12: prompt cut to its last 6 tokens (keep_end); 6 + 5
    # fits, so the responses stay whole.
    out = D.tokenize_pair(prompt, chosen, rejected, tok, max_length=12, max_prompt_length=6)
    assert out["prompt_input_ids"] == enc(prompt)[-6:]
    assert out["chosen_input_ids"] == enc(prompt)[-6:] + enc(chosen) + [eos]
    # keep_start keeps the beginning instead
    out = D.tokenize_pair(prompt, chosen, rejected, tok, max_length=12, max_prompt_length=6,
                          truncation_mode="keep_start")
    assert out["prompt_input_ids"] == enc(prompt)[:6]
    # still too long after the prompt cut: responses cut to max_length - max_prompt_length
    out = D.tokenize_pair(prompt, chosen, rejected, tok, max_length=9, max_prompt_length=6)
    assert out["chosen_input_ids"] == enc(prompt)[-6:] + (enc(chosen) + [eos])[:3]
    assert out["rejected_input_ids"] == enc(prompt)[-6:] + (enc(rejected) + [eos])[:3]
    assert out["chosen_labels"][:6] == [-100] * 6
    # short enough: nothing is cut, even a prompt longer than max_prompt_length
    out = D.tokenize_pair(prompt, chosen, rejected, tok, max_length=64, max_prompt_length=6)
    assert out["prompt_input_ids"] == enc(prompt)


def test_eos_inside_text_is_an_error():
    tok = M.builtin_tokenizer()
    with pytest.raises(D.DataError, match="f.jsonl:4: chosen contains the EOS token"):
        D.tokenize_pair("the movie", "was <eos> good", "bad", tok, max_length=32,
                        max_prompt_length=8, source="f.jsonl:4")


def test_collate_concatenates_chosen_then_rejected():
    items = [{"chosen_input_ids": [5, 6, 7], "chosen_labels": [-100, 6, 7],
              "rejected_input_ids": [5, 8], "rejected_labels": [-100, 8]},
             {"chosen_input_ids": [9], "chosen_labels": [9],
              "rejected_input_ids": [9, 10, 11, 12], "rejected_labels": [-100, 10, 11, 12]}]
    b = D.collate(items, pad_token_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 0], [9, 0, 0, 0], [5, 8, 0, 0], [9, 10, 11, 12]]
    assert b["labels"][2].tolist() == [-100, 8, -100, -100]
    assert b["attention_mask"][1].tolist() == [1, 0, 0, 0]


def test_example_stream_is_a_sequence_of_permutations():
    s = D.ExampleStream(5, seed=3)
    first, second = s.take(0, 5), s.take(5, 5)
    assert sorted(first) == sorted(second) == list(range(5)) and first != second
    assert s.take(3, 4) == first[3:] + second[:2]  # a batch may span epochs
    assert D.shard(list(range(8)), 1, 2) == [4, 5, 6, 7]


@pytest.mark.parametrize("loss", ["tdpo1", "tdpo2", "dpo"])
def test_fused_and_reference_loss_impl_agree_in_the_loop(loss):
    tok = M.builtin_tokenizer()
    policy, _ = M.load_model("tiny", seed=1)
    ref, _ = M.load_model("tiny", seed=2)
    rows = [("the movie", "was good .", "was bad ."), ("i would", "recommend it .", "not ."),
            ("the acting was", "great .", "awful and dull .")]
    items = [D.tokenize_pair(*r, tok, max_length=32, max_prompt_length=8) for r in rows]
    batch = D.collate(items, tok.pad_token_id)
    results = {}
    for impl in ("fused", "reference"):
        cfg = Config(loss=loss, loss_impl=impl, beta=0.3, alpha=0.5)
        policy.zero_grad()
        value, metrics = losses.batch_loss(policy, ref, batch, cfg, "train")
        value.backward()
        results[impl] = (value.detach(), metrics,
                         [p.grad.clone() for p in policy.parameters()])
    (lf, mf, gf), (lr, mr, gr) = results["fused"], results["reference"]
    torch.testing.assert_close(lf, lr, rtol=1e-5, atol=1e-6)
    # The reference code's pass computes no entropy; the fused ops' does (next test).
    assert mf.keys() - mr.keys() == {"entropy_train/chosen", "entropy_train/rejected"}
    for k in mr:
        torch.testing.assert_close(mf[k], mr[k], rtol=1e-4, atol=1e-5)
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", ["tdpo2", "sft"])
def test_pair_entropy_is_the_token_weighted_mean_over_response_tokens(loss):
    """entropy_<split>/{chosen,rejected} after the Meter: the policy's entropy (torch's,
    float64) summed over the response tokens of every chosen (rejected) row of two
    micro-batches, over their number: responses of 1 to 4 tokens, so a mean over pairs
    would differ. Bound: tests/test_sampling.py's per token, summed over tokens."""
    from test_sampling import entropy_and_bound
    tok = M.builtin_tokenizer()
    policy, _ = M.load_model("tiny", seed=1)
    rows = [("the movie", "was good .", "was bad ."), ("i would", "recommend it .", "not ."),
            ("the acting was", "great .", "awful and dull ."), ("the plot", ".", "was weak .")]
    items = [D.tokenize_pair(*r, tok, max_length=32, max_prompt_length=8) for r in rows]
    cfg, ref = Config(loss=loss), M.frozen_copy(policy)
    sides = ("chosen",) if loss == "sft" else ("chosen", "rejected")
    meter, sums = losses.Meter(), {side: [0.0, 0.0, 0] for side in sides}
    for part in (items[:1], items[1:]):
        batch = D.collate(part, tok.pad_token_id, chosen_only=loss == "sft")
        with torch.no_grad():
            meter.add(losses.batch_loss(policy, ref, batch, cfg, "eval")[1])
            logits = M.forward_logits(policy, batch["input_ids"], batch["attention_mask"])
        h, bound = entropy_and_bound(logits[:, :-1])
        response = batch["labels"][:, 1:] != D.IGNORE_INDEX
        parts = len(sides)
        for side, side_h, side_bound, side_mask in zip(sides, h.chunk(parts),
                                                       bound.chunk(parts), response.chunk(parts)):
            sums[side][0] += (side_h * side_mask).sum().item()
            sums[side][1] += (side_bound * side_mask).sum().item()
            sums[side][2] += side_mask.sum().item()
    means = meter.means("eval")
    assert {k for k in means if k.startswith("entropy_")} == {f"entropy_eval/{side}"
                                                              for side in sums}
    for side, (total, bound, tokens) in sums.items():
        assert abs(means[f"entropy_eval/{side}"] - total / tokens) <= bound / tokens, side


def test_tiny_gpt_cache_and_padding_match_a_plain_forward():
    model, tok = M.load_model("tiny", seed=0)
    ids = torch.tensor([[0, 0, 5, 6, 7], [4, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    full, _ = model(ids, mask)
    plain, _ = model(ids[:1, 2:])
    torch.testing.assert_close(full[0, 2:], plain[0], rtol=1e-5, atol=1e-5)
    head, past = model(ids[:, :3], mask[:, :3])
    tail, _ = model(ids[:, 3:], mask, past)
    torch.testing.assert_close(torch.cat([head, tail], 1)[:, 2:], full[:, 2:], rtol=1e-5,
                               atol=1e-5)


def test_vader_port_matches_vadersentiment():
    vs = pytest.importorskip("vaderSentiment.vaderSentiment")
    analyzer = vs.SentimentIntensityAnalyzer()
    task = T.SentimentTask()
    rng = random.Random(0)
    # the vocabulary, plus rule words that are not lexicon entries (the subset lexicon only
    # covers the vocabulary)
    extra = [w for w in ("least", "at", "kind", "of", "never", "without", "doubt", "this", "!",
                         "?") if w not in analyzer.lexicon]
    words = M.builtin_tokenizer().words[3:] + extra
    texts = task.reviews[:300] + [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))
                                  for _ in range(700)]
    for text in texts:
        assert T.vader_compound(text, task.lexicon) == analyzer.polarity_scores(text)["compound"], text


def test_sentiment_reward_orders_reviews():
    task = T.SentimentTask()
    good, bad, meh = task.reward(["the movie was"] * 3, ["very good .", "awful .", "long ."])
    assert good > meh == 0 > bad
