"""Tasks with a reward function: where preference pairs come from and how samples are scored.

- "sentiment" (the embedded default): a miniature of the TDPO paper's controlled-sentiment
  experiment (IMDb prefixes, GPT-2, a sentiment classifier as reward). Here: a corpus of
  short synthetic movie reviews (tdpo_ext/training/assets/reviews.txt), prompts that are
  their first words, the tiny built-in GPT, and as reward the VADER compound score of
  prompt + response (VADER's own lexicon values,
  tdpo_ext/training/assets/vader_lexicon_subset.tsv, scored by a port of VADER's rules:
  equal to vaderSentiment's compound on lower-case text without emoji; tests/test_train_data.py
  checks it against the package when it is installed).
- "movie-reviews": SmolLM2-135M-Instruct asked for short movie reviews, its responses
  scored by the VADER compound score of the vadersentiment package.

`python -m tdpo_ext.training.tasks write-data` regenerates the embedded data files
(deterministic).
"""
from __future__ import annotations

import math
import os
import random
import string
import sys

from . import ASSETS_DIR


# ---------------------------------------------------------------------------------------
# VADER's compound score (Hutto & Gilbert, 2014; MIT licence), ported from vaderSentiment
# 3.3.2 for lower-case text without emoji, quirks included so that scores agree exactly.

B_INCR, B_DECR, N_SCALAR = 0.293, -0.293, -0.74
NEGATE = {
    "aint", "arent", "cannot", "cant", "couldnt", "darent", "didnt", "doesnt", "ain't",
    "aren't", "can't", "couldn't", "daren't", "didn't", "doesn't", "dont", "hadnt", "hasnt",
    "havent", "isnt", "mightnt", "mustnt", "neither", "don't", "hadn't", "hasn't", "haven't",
    "isn't", "mightn't", "mustn't", "neednt", "needn't", "never", "none", "nope", "nor", "not",
    "nothing", "nowhere", "oughtnt", "shant", "shouldnt", "uhuh", "wasnt", "werent",
    "oughtn't", "shan't", "shouldn't", "uh-uh", "wasn't", "weren't", "without", "wont",
    "wouldnt", "won't", "wouldn't", "rarely", "seldom", "despite"}
BOOSTER_DICT = {w: B_INCR for w in (
    "absolutely amazingly awfully completely considerable considerably decidedly deeply "
    "effing enormous enormously entirely especially exceptional exceptionally extreme "
    "extremely fabulously flipping flippin frackin fracking fricking frickin frigging "
    "friggin fully fuckin fucking fuggin fugging greatly hella highly hugely incredible "
    "incredibly intensely major majorly more most particularly purely quite really "
    "remarkably so substantially thoroughly total totally tremendous tremendously uber "
    "unbelievably unusually utter utterly very").split()}
BOOSTER_DICT.update({w: B_DECR for w in (
    "almost barely hardly kinda kindof kind-of less little marginal marginally occasional "
    "occasionally partly scarce scarcely slight slightly somewhat sorta sortof sort-of").split()})
BOOSTER_DICT.update({"just enough": B_DECR, "kind of": B_DECR, "sort of": B_DECR})
SPECIAL_CASES = {"the shit": 3, "the bomb": 3, "bad ass": 1.5, "badass": 1.5, "bus stop": 0.0,
                 "yeah right": -2, "kiss of death": -1.5, "to die for": 3, "beating heart": 3.5}


def load_lexicon(path: str | None = None) -> dict[str, float]:
    path = path or os.path.join(ASSETS_DIR, "vader_lexicon_subset.tsv")
    lexicon = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                word, value = line.rstrip("\n").split("\t")[:2]
                lexicon[word] = float(value)
    return lexicon


def _negated(word: str) -> bool:
    return word in NEGATE or "n't" in word


def _strip_punc(token: str) -> str:
    stripped = token.strip(string.punctuation)
    return token if len(stripped) <= 2 else stripped


def vader_compound(text: str, lexicon: dict[str, float]) -> float:
    """VADER's compound score in [-1, 1] of lower-case text (see the module docstring)."""
    w = [_strip_punc(t).lower() for t in text.strip().split()]
    sentiments = []
    for i, item in enumerate(w):
        if item in BOOSTER_DICT or (item == "kind" and i < len(w) - 1 and w[i + 1] == "of"):
            sentiments.append(0)
            continue
        valence = 0
        if item in lexicon:
            valence = lexicon[item]
            if item == "no" and i != len(w) - 1 and w[i + 1] in lexicon:
                valence = 0.0
            if (i > 0 and w[i - 1] == "no") or (i > 1 and w[i - 2] == "no") or \
                    (i > 2 and w[i - 3] == "no" and w[i - 1] in ("or", "nor")):
                valence = lexicon[item] * N_SCALAR
            for start in range(3):
                prev = w[i - (start + 1)] if i > start else None
                if prev is None or prev in lexicon:
                    continue
                s = BOOSTER_DICT.get(prev, 0.0) * (-1 if valence < 0 else 1)
                s = s * (1.0, 0.95, 0.9)[start] if s != 0 else s
                valence += s
                valence = _negation_check(valence, w, start, i)
                if start == 2:
                    valence = _special_idioms_check(valence, w, i)
            if i > 1 and w[i - 1] not in lexicon and w[i - 1] == "least":
                if w[i - 2] not in ("at", "very"):
                    valence *= N_SCALAR
            elif i > 0 and w[i - 1] not in lexicon and w[i - 1] == "least":
                valence *= N_SCALAR
        sentiments.append(valence)
    if "but" in w:  # VADER's contrastive 'but' (its list-index quirk kept)
        bi = w.index("but")
        for sentiment in sentiments:
            si = sentiments.index(sentiment)
            if si < bi:
                sentiments.pop(si)
                sentiments.insert(si, sentiment * 0.5)
            elif si > bi:
                sentiments.pop(si)
                sentiments.insert(si, sentiment * 1.5)
    if not sentiments:
        return 0.0
    total = float(sum(sentiments))
    qm = text.count("?")
    emphasis = min(text.count("!"), 4) * 0.292 + (0 if qm <= 1 else qm * 0.18 if qm <= 3 else 0.96)
    total = total + emphasis if total > 0 else total - emphasis if total < 0 else total
    return round(max(-1.0, min(1.0, total / math.sqrt(total * total + 15))), 4)


def _negation_check(valence, w, start, i):
    if start == 0:
        if _negated(w[i - 1]):
            valence *= N_SCALAR
    elif start == 1:
        if w[i - 2] == "never" and w[i - 1] in ("so", "this"):
            valence *= 1.25
        elif w[i - 2] == "without" and w[i - 1] == "doubt":
            pass
        elif _negated(w[i - 2]):
            valence *= N_SCALAR
    else:
        if (w[i - 3] == "never" and w[i - 2] in ("so", "this")) or w[i - 1] in ("so", "this"):
            valence *= 1.25
        elif w[i - 3] == "without" and (w[i - 2] == "doubt" or w[i - 1] == "doubt"):
            pass
        elif _negated(w[i - 3]):
            valence *= N_SCALAR
    return valence


def _special_idioms_check(valence, w, i):
    onezero, twoonezero = f"{w[i - 1]} {w[i]}", f"{w[i - 2]} {w[i - 1]} {w[i]}"
    twoone, threetwoone = f"{w[i - 2]} {w[i - 1]}", f"{w[i - 3]} {w[i - 2]} {w[i - 1]}"
    threetwo = f"{w[i - 3]} {w[i - 2]}"
    for seq in (onezero, twoonezero, twoone, threetwoone, threetwo):
        if seq in SPECIAL_CASES:
            valence = SPECIAL_CASES[seq]
            break
    if len(w) - 1 > i and f"{w[i]} {w[i + 1]}" in SPECIAL_CASES:
        valence = SPECIAL_CASES[f"{w[i]} {w[i + 1]}"]
    if len(w) - 1 > i + 1 and f"{w[i]} {w[i + 1]} {w[i + 2]}" in SPECIAL_CASES:
        valence = SPECIAL_CASES[f"{w[i]} {w[i + 1]} {w[i + 2]}"]
    for n_gram in (threetwoone, threetwo, twoone):
        if n_gram in BOOSTER_DICT:
            valence += BOOSTER_DICT[n_gram]
    return valence


# ---------------------------------------------------------------------------------------
# The embedded review corpus: a small grammar of movie-review sentences

SUBJECTS = ("the movie", "the film", "this movie", "this film", "the story", "the plot",
            "the acting", "the cast", "the script", "the ending", "the music",
            "the soundtrack", "the dialogue", "the characters", "the direction", "the pacing",
            "the cinematography", "the effects", "the lead actor", "the score",
            "the first half", "the second half", "the final act")
COPULAS = ("was", "is", "felt", "seemed")
BOOSTERS = ("very", "really", "quite", "so", "extremely", "totally", "incredibly",
            "somewhat", "slightly")
POSITIVE = ("good", "great", "excellent", "wonderful", "brilliant", "beautiful", "charming",
            "clever", "fun", "funny", "interesting", "perfect", "fresh", "original", "strong",
            "nice", "amazing", "superb", "lovely", "enjoyable", "entertaining", "impressive",
            "powerful", "sweet", "smart", "engaging", "hilarious", "fantastic")
NEGATIVE = ("bad", "awful", "terrible", "horrible", "boring", "dull", "lame", "stupid",
            "weak", "poor", "annoying", "painful", "ugly", "disappointing", "awkward", "messy",
            "confusing", "lazy", "pathetic", "weird", "strange")
NEUTRAL = ("long", "short", "loud", "quiet", "simple", "dark", "familiar", "typical", "slow",
           "predictable", "serious", "different")
NOUNS = ("film", "movie", "story", "experience", "effort", "watch", "ride", "thriller",
         "comedy", "drama")
OBJECTS = ("it", "every minute", "the whole thing", "this movie", "this film",
           "the characters", "the ending", "the story")
VERBS_POS, VERBS_NEG = ("loved", "liked", "enjoyed", "admired"), ("hated", "disliked")
WHO = ("anyone", "everyone", "my family", "fans of the genre", "nobody")


def _adj(rng, pol):
    word = rng.choice(POSITIVE if pol > 0 else NEGATIVE if pol < 0 else NEUTRAL)
    return f"{rng.choice(BOOSTERS)} {word}" if rng.random() < 0.3 else word


def _clause(rng):
    pol = rng.choices((1, -1, 0), (0.42, 0.42, 0.16))[0]
    kind = rng.random()
    if kind < 0.45:
        neg = "not " if rng.random() < 0.15 else ""
        tail = f" and {_adj(rng, pol)}" if rng.random() < 0.3 else ""
        return f"{rng.choice(SUBJECTS)} {rng.choice(COPULAS)} {neg}{_adj(rng, pol)}{tail}"
    if kind < 0.6:
        if pol == 0:
            return f"i watched {rng.choice(OBJECTS)} {rng.choice(('twice', 'again', 'at home'))}"
        if rng.random() < 0.2:
            return f"i did not enjoy {rng.choice(OBJECTS)}"
        return f"i {rng.choice(VERBS_POS if pol > 0 else VERBS_NEG)} {rng.choice(OBJECTS)}"
    if kind < 0.8:
        article = "an" if (adj := _adj(rng, pol))[0] in "aeiou" else "a"
        return f"{rng.choice(('it was', 'overall', 'what'))} {article} {adj} {rng.choice(NOUNS)}"
    if kind < 0.9:
        return f"i would {'' if pol > 0 else 'not '}recommend it to {rng.choice(WHO)}"
    return f"{rng.choice(SUBJECTS)} {rng.choice(COPULAS)} {_adj(rng, pol)} but " \
           f"{rng.choice(SUBJECTS)} {rng.choice(COPULAS)} {_adj(rng, rng.choice((1, -1, 0)))}"


def make_review(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.choices((1, 2, 3), (0.3, 0.5, 0.2))[0]):
        s = _clause(rng)
        if " but " not in s and rng.random() < 0.35:
            s += f" {rng.choice(('and', 'but'))} {_clause(rng)}"
        sentences.append(s + " .")
    return " ".join(sentences)


def write_data(n_reviews: int = 4000, seed: int = 1234) -> None:
    rng = random.Random(seed)
    reviews = [make_review(rng) for _ in range(n_reviews)]
    with open(os.path.join(ASSETS_DIR, "reviews.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(reviews) + "\n")
    words = sorted({w for r in reviews for w in r.split()})
    with open(os.path.join(ASSETS_DIR, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(["<pad>", "<eos>", "<unk>"] + words) + "\n")
    from vaderSentiment import vaderSentiment as vs  # the lexicon's source
    full = load_lexicon(os.path.join(os.path.dirname(vs.__file__), "vader_lexicon.txt"))
    with open(os.path.join(ASSETS_DIR, "vader_lexicon_subset.tsv"), "w", encoding="utf-8") as f:
        f.write("# The entries of VADER's vader_lexicon.txt (vaderSentiment 3.3.2, MIT licence,\n"
                "# C.J. Hutto) for the words of vocab.txt: word <tab> mean valence.\n")
        f.writelines(f"{w}\t{full[w]}\n" for w in words if w in full)
    print(f"wrote {len(reviews)} reviews, {len(words)} words, "
          f"{sum(w in full for w in words)} lexicon entries to {ASSETS_DIR}")


# ---------------------------------------------------------------------------------------
# Tasks

class SentimentTask:
    """The embedded miniature of the paper's controlled-sentiment (IMDb) experiment."""
    name = "sentiment"
    # Settings that differ from tdpo-train's defaults (config.Config) for this task.
    preset = dict(lr=3e-4, steps=150, max_length=64, max_prompt_length=16, eval_every=50,
                  pair_prompts=2048, eval_prompts=128, max_new_tokens=28, eval_data_size=128)

    def __init__(self):
        self.lexicon = load_lexicon()
        with open(os.path.join(ASSETS_DIR, "reviews.txt"), encoding="utf-8") as f:
            self.reviews = [line.strip() for line in f if line.strip()]
        n_eval = len(self.reviews) // 10
        self.eval_reviews, self.train_reviews = self.reviews[:n_eval], self.reviews[n_eval:]

    def sft_texts(self) -> list[str]:
        return self.train_reviews

    @staticmethod
    def _prefix(review: str, i: int) -> str:
        return " ".join(review.split()[:2 + i % 3])  # 2 to 4 words, as IMDb prefixes

    def prompts(self, split: str, n: int) -> list[str]:
        pool = self.train_reviews if split == "train" else self.eval_reviews
        return [self._prefix(pool[i % len(pool)], i) for i in range(n)]

    def reward(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [vader_compound(f"{p} {r}", self.lexicon) for p, r in zip(prompts, responses)]


class MovieReviewTask:
    """SmolLM2 writes short movie reviews; reward: VADER compound (vadersentiment)."""
    name = "movie-reviews"
    # The recorded run's settings (docs/TRAINING.md): about half an hour on 2 CPU cores.
    preset = dict(model="smollm2", lr=2e-5, steps=12, batch_size=4, max_length=160,
                  max_prompt_length=96, eval_every=6, warmup_steps=2, pair_prompts=64,
                  eval_prompts=24, max_new_tokens=40, eval_data_size=8)
    GENRES = ("horror", "romantic comedy", "science fiction", "animated", "crime", "war",
              "western", "musical", "superhero", "documentary", "fantasy", "spy", "sports",
              "disaster", "mystery", "family")
    TEMPLATES = ("Write a short review of {a} {g} movie you watched recently.",
                 "In two sentences, review the last {g} film you saw.",
                 "Give your honest opinion of a new {g} movie in a few sentences.",
                 "Write a brief review of {a} {g} film for a newspaper.")

    def __init__(self):
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as e:
            raise RuntimeError("--task movie-reviews needs vadersentiment "
                               "(pip install vadersentiment)") from e
        self.analyzer = SentimentIntensityAnalyzer()
        all_prompts = [t.format(g=g, a="an" if g[0] in "aeiou" else "a")
                       for g in self.GENRES for t in self.TEMPLATES]
        random.Random(0).shuffle(all_prompts)
        self.eval_pool, self.train_pool = all_prompts[:16], all_prompts[16:]

    def prompts(self, split: str, n: int) -> list[str]:
        pool = self.train_pool if split == "train" else self.eval_pool
        return [pool[i % len(pool)] for i in range(n)]

    def reward(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [self.analyzer.polarity_scores(r)["compound"] for r in responses]


TASKS = {"sentiment": SentimentTask, "movie-reviews": MovieReviewTask}


def get_task(name: str):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name]()


if __name__ == "__main__":
    if sys.argv[1:] == ["write-data"]:
        write_data()
    else:
        print("usage: python -m tdpo_ext.training.tasks write-data")
