"""The length and dedup filters: hand-checked scores, selection of duplicates, option errors."""

from __future__ import annotations

import random
import string

import numpy as np
import pytest

from align.config import ConfigError
from align.pruning import FILTERS, Selection, select
from align.registry import RegistryError
from align.tasks import make_problems, to_sft
from align.tokenizer import build_tokenizer
from filters.dedup import DedupFilter, normalize_text
from filters.length import LengthFilter

# Prompt "Compute 1+2." is 12 characters, 12 tokens (one per character); the completion
# "<answer>3</answer>" is 18 characters but 3 tokens (each answer tag is one token);
# "all" joins them with a newline: 12 + 1 + 18 = 31 characters, 12 + 1 + 3 = 16 tokens.
SFT_ROW = {
    "prompt": [{"role": "user", "content": "Compute 1+2."}],
    "completion": [{"role": "assistant", "content": "<answer>3</answer>"}],
}
# A `text` row is all completion: 11 characters, an empty prompt, no joining newline.
TEXT_ROW = {"text": "hello world"}
# `messages`: the last message is the completion; "ab" + "\n" + "cd" = 5 characters.
CHAT_ROW = {"messages": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"}]}
ROWS = [SFT_ROW, TEXT_ROW, CHAT_ROW]

# 44 words, 231 characters; NEAR_COPY changes "quick" to "slow" in the middle.
SENTENCE = (
    "the committee met on a rainy tuesday to discuss the budget for the coming year and after "
    "a long debate about roads schools and the quick repair of the old bridge they agreed to "
    "meet again next month with a revised plan for everyone"
)
NEAR_COPY = SENTENCE.replace("quick", "slow")
UNRELATED = (
    "photosynthesis converts light energy into chemical energy stored in glucose molecules "
    "inside the chloroplasts of green plant cells"
)
# MinHash with 64 hashes: the estimate of a Jaccard similarity J has standard deviation
# sqrt(J (1 - J) / 64), at most 0.0625; allow a bit over 2 of them for any single pair and
# 0.06 for the mean error over many pairs. Measured with seed 0: near copy 0.891 vs exact 0.925;
# the 30 pairs of test_minhash_estimate_matches_exact_jaccard (J 0.58-0.95): max error 0.12,
# mean 0.04.
TOLERANCE = 0.15
MEAN_TOLERANCE = 0.06


def shingles(text: str, n: int = 5) -> set[str]:
    return {text[i : i + n] for i in range(len(text) - n + 1)}


def jaccard(a: str, b: str) -> float:
    """Exact Jaccard similarity of the two texts' 5-character shingle sets, by brute force."""
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer().save_pretrained(path)
    return str(path)


# --- registry -----------------------------------------------------------------------------


def test_filters_are_registered():
    assert FILTERS.get("length") is LengthFilter
    assert FILTERS.get("dedup") is DedupFilter


def test_unknown_filter_lists_known_names():
    with pytest.raises(RegistryError, match="unknown filter 'lenght'") as error:
        FILTERS.get("lenght")
    message = str(error.value)
    assert "Did you mean 'length'?" in message
    assert "dedup" in message and "length" in message


# --- length -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("part", "expected"),
    [("prompt", [12, 0, 2]), ("completion", [18, 11, 2]), ("all", [31, 11, 5])],
)
def test_length_in_chars(part, expected):
    assert LengthFilter(part=part, unit="chars").score(ROWS) == expected


@pytest.mark.parametrize(
    ("part", "expected"),
    [("prompt", [12, 0, 2]), ("completion", [3, 11, 2]), ("all", [16, 11, 5])],
)
def test_length_in_tokens(tokenizer_dir, part, expected):
    length = LengthFilter(part=part, unit="tokens", tokenizer=tokenizer_dir)
    assert length.score(ROWS) == expected
    assert length.score([]) == []


def test_length_of_task_rows_selects_by_bound():
    # "Compute a+b." with one-digit a, b (level 1) is 12 characters; level 2 has two digits.
    rows = list(to_sft(make_problems(["add"], [1, 2], 5, seed=0)))
    scores = LengthFilter(part="prompt", unit="chars").score(rows)
    assert scores == [12.0] * 5 + [14.0] * 5
    assert select(scores, Selection(max=12)).kept == [0, 1, 2, 3, 4]


def test_length_option_errors(tmp_path):
    with pytest.raises(ConfigError, match="'tokenizer'.*needs a tokenizer"):
        LengthFilter(unit="tokens")
    with pytest.raises(ConfigError, match="'tokenizer'.*only used with unit 'tokens'"):
        LengthFilter(unit="chars", tokenizer=str(tmp_path))
    with pytest.raises(ConfigError, match="'tokenizer'.*not a directory"):
        LengthFilter(unit="tokens", tokenizer=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="'unit'.*tokens, chars.*'words'"):
        LengthFilter(unit="words")
    with pytest.raises(ConfigError, match="'part'.*prompt, completion, all"):
        LengthFilter(part="answer", unit="chars")


# --- exact dedup --------------------------------------------------------------------------


def test_exact_dedup_keeps_first_of_each_group():
    texts = ["Hello World", "hello   world", "Other text", " HELLO WORLD\n", "other\ttext", "third"]
    scores = DedupFilter(mode="exact").score([{"text": t} for t in texts])
    assert scores == [0.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    buckets = select(scores, Selection(max=0.0))
    assert buckets.kept == [0, 2, 5]
    assert buckets.dropped == [1, 3, 4]
    assert buckets.unscored == []


def test_exact_dedup_compares_the_chosen_part():
    rows = [
        {"prompt": "Sort: cab", "completion": "abc"},
        {"prompt": "sort:  CAB", "completion": "acb"},
    ]
    assert DedupFilter(mode="exact", part="prompt").score(rows) == [0.0, 1.0]
    assert DedupFilter(mode="exact", part="all").score(rows) == [0.0, 0.0]


def test_exact_dedup_on_task_rows():
    rows = list(to_sft(make_problems(["add", "sort"], [1, 2], 20, seed=0)))
    copies = [
        {**row, "prompt": [{"role": "user", "content": row["prompt"][0]["content"].upper()}]}
        for row in rows[:10]
    ]
    scores = DedupFilter(mode="exact").score(rows + copies)
    assert select(scores, Selection(max=0.0)).kept == list(range(len(rows)))


def test_normalize_text():
    assert normalize_text("  A\tB \n\nc  ") == "a b c"


# --- near dedup ---------------------------------------------------------------------------


def test_near_copy_scores_high_and_unrelated_zero():
    texts = [SENTENCE, UNRELATED, NEAR_COPY]
    scores = DedupFilter(mode="near").score([{"text": t} for t in texts])
    exact = jaccard(SENTENCE, NEAR_COPY)
    assert 0.9 < exact < 0.95  # one word of 44 changed: 9 and 8 of 219 shingles differ
    assert scores[0] == 0.0
    # 0.0 exactly means LSH found no candidate: any candidate shares a band, 4 of 64 hashes.
    assert scores[1] == 0.0
    assert abs(scores[2] - exact) <= TOLERANCE
    buckets = select(scores, Selection(max=0.8))
    assert buckets.kept == [0, 1]
    assert buckets.dropped == [2]


def test_near_dedup_scores_exact_copies_one():
    texts = [SENTENCE, SENTENCE.upper(), "  " + SENTENCE.replace(" ", "\n")]
    assert DedupFilter(mode="near").score([{"text": t} for t in texts]) == [0.0, 1.0, 1.0]


def test_near_dedup_takes_the_most_similar_earlier_row():
    # The third row differs from the second in 1 word and from the first in 5.
    words = SENTENCE.split()
    four = words.copy()
    four[5], four[12], four[20], four[30] = "sunny", "plan", "parks", "new"
    five = four.copy()
    five[38] = "draft"
    texts = [SENTENCE, " ".join(four), " ".join(five)]
    filt = DedupFilter(mode="near")
    scores = filt.score([{"text": t} for t in texts])
    to_second = float(np.mean(filt.signature(texts[2]) == filt.signature(texts[1])))
    to_first = float(np.mean(filt.signature(texts[2]) == filt.signature(texts[0])))
    assert jaccard(texts[2], texts[1]) > jaccard(texts[2], texts[0])
    assert to_second > to_first > 0.5  # both well above the LSH threshold; the score is the max
    assert scores[2] == to_second


def test_minhash_estimate_matches_exact_jaccard():
    rng = random.Random(0)
    vocabulary = [
        "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(500)
    ]
    filt = DedupFilter(mode="near")
    errors = []
    for _ in range(30):
        words = rng.choices(vocabulary, k=40)
        edited = words.copy()
        for _ in range(rng.randint(1, 8)):
            edited[rng.randrange(len(edited))] = rng.choice(vocabulary)
        a, b = " ".join(words), " ".join(edited)
        estimate = float(np.mean(filt.signature(a) == filt.signature(b)))
        errors.append(abs(estimate - jaccard(a, b)))
    assert max(errors) <= TOLERANCE
    assert float(np.mean(errors)) <= MEAN_TOLERANCE


def test_near_dedup_is_deterministic_and_seeded():
    rows = [{"text": t} for t in (SENTENCE, UNRELATED, NEAR_COPY)]
    assert DedupFilter(mode="near").score(rows) == DedupFilter(mode="near").score(rows)
    first, other = DedupFilter(mode="near", seed=0), DedupFilter(mode="near", seed=1)
    assert not np.array_equal(first.signature(SENTENCE), other.signature(SENTENCE))


def test_near_dedup_short_and_empty_texts():
    # Texts shorter than the n-gram are one shingle each: equal texts match, others do not.
    scores = DedupFilter(mode="near").score([{"text": t} for t in ("", "ab", "AB", "cd", "")])
    assert scores == [0.0, 0.0, 1.0, 0.0, 1.0]


def test_dedup_option_errors():
    with pytest.raises(ConfigError, match="'mode'.*exact, near.*'fuzzy'"):
        DedupFilter(mode="fuzzy")
    with pytest.raises(ConfigError, match="'part'"):
        DedupFilter(part="answer")
    with pytest.raises(ConfigError, match="'ngram'.*>= 1"):
        DedupFilter(mode="near", ngram=0)
    with pytest.raises(ConfigError, match="'num_perm'.*multiple of 4.*30"):
        DedupFilter(mode="near", num_perm=30)
    with pytest.raises(ConfigError, match="'num_perm'"):
        DedupFilter(mode="near", num_perm=0)
    with pytest.raises(ConfigError, match="'seed'"):
        DedupFilter(mode="near", seed=-1)
