"""Pass-rate scoring and choice judges on live vLLM engines; difficulty ranks the task levels."""

from __future__ import annotations

import statistics
from collections import defaultdict

import pytest

from align import engine
from align.rewarding import RewardSpec, build_reward_set
from align.scoring import ChoiceJudge, PassRateScorer
from align.tasks import to_rl, to_sft
from align.tokenizer import build_tokenizer, encode_prompts
from filters.difficulty import JudgeDifficulty, PassRateDifficulty
from tests.conftest import shared_engine

pytestmark = pytest.mark.vllm


def test_pass_rates_equal_an_independent_count(memorized):
    """The scorer's counts equal a recount over the same seeded samples with the verifiers."""
    from align.evaluate import is_correct

    llm = shared_engine(memorized["checkpoint"])
    tokenizer = build_tokenizer()
    rows = memorized["seen"][:4] + memorized["unseen"][:4]
    rewards = build_reward_set([RewardSpec(name="answer_match")])
    scorer = PassRateScorer(llm, tokenizer, rewards, samples=6, max_new_tokens=16, seed=5)
    results = scorer.score(rows)

    samples = engine.generate(
        llm,
        encode_prompts(tokenizer, [r["prompt"] for r in rows]),
        n=6,
        temperature=1.0,
        max_tokens=16,
        seed=5,
    )
    for row, result, completions in zip(rows, results, samples, strict=True):
        assert result.sampled == result.scored == 6
        assert result.passed == sum(is_correct(row, c.text) for c in completions)
        assert result.mean_reward == pytest.approx(result.passed / 6)
    overall = sum(r.passed for r in results) / 48
    assert scorer.reward_metrics() == pytest.approx(
        {
            "reward/answer_match/mean": overall,
            "reward/total/mean": overall,
            "reward/unscored": 0.0,
        }
    )
    # The memorised rows are answered far more often than the unseen ones.
    seen_rate = statistics.fmean(r.rate for r in results[:4])
    unseen_rate = statistics.fmean(r.rate for r in results[4:])
    assert seen_rate >= 0.8 and seen_rate > unseen_rate + 0.5


def test_rows_without_a_gold_answer_are_unscored(memorized):
    llm = shared_engine(memorized["checkpoint"])
    rows = [{**memorized["seen"][0], "answer": None}, memorized["seen"][1]]
    rewards = build_reward_set([RewardSpec(name="answer_match")])
    results = PassRateScorer(llm, build_tokenizer(), rewards, samples=2).score(rows)
    assert (results[0].scored, results[0].rate) == (0, None)
    assert results[1].scored == 2


def test_a_failing_reward_leaves_prompts_unscored_and_is_counted(memorized):
    from align.rewarding import RewardFunction, RewardSet

    def broken(prompts, completions, **_):
        raise RuntimeError("reward bug")

    llm = shared_engine(memorized["checkpoint"])
    rewards = RewardSet([RewardFunction("broken", broken)])
    scorer = PassRateScorer(llm, build_tokenizer(), rewards, samples=2)
    results = scorer.score(memorized["seen"][:2])
    assert [r.rate for r in results] == [None, None]
    assert scorer.reward_metrics()["reward/broken/errors"] == 4
    assert scorer.reward_metrics()["reward/unscored"] == 4


def test_difficulty_ranks_the_levels_in_order(partially_trained):
    """Held-out rows: mean difficulty (1 - pass rate over 8 samples) rises with the level, on
    the whole: levels 3-4 harder than levels 1-2, level 4 much harder than level 1 (15 rows
    per level: two neighbouring levels can swap places)."""
    llm = shared_engine(partially_trained["checkpoint"])
    rows = list(to_sft(partially_trained["heldout"]))
    difficulty = PassRateDifficulty(str(partially_trained["checkpoint"]), samples=8, llm=llm)
    scores = difficulty.score(rows)
    by_level = defaultdict(list)
    for row, score in zip(rows, scores, strict=True):
        by_level[row["level"]].append(score)
    means = [statistics.fmean(by_level[level]) for level in sorted(by_level)]
    assert len(means) == 4 and len(set(means)) == 4, means
    harder, easier = statistics.fmean(means[2:]), statistics.fmean(means[:2])
    assert harder >= easier + 0.1, means
    assert means[-1] - means[0] >= 0.25, means


def test_choice_judge_probabilities(partially_trained):
    llm = shared_engine(partially_trained["checkpoint"])
    rows = list(to_sft(partially_trained["heldout"][:3]))
    judge = ChoiceJudge(
        llm,
        build_tokenizer(),
        "Rate: {prompt} -> {completion}",
        {"easy": 0.0, "medium": 0.5, "hard": 1.0},
    )
    assert judge.render(rows[0]) == (
        f"Rate: {rows[0]['prompt'][0]['content']} -> {rows[0]['completion'][0]['content']}"
    )
    probabilities = judge.probabilities(rows)
    for probs in probabilities:
        assert set(probs) == {"easy", "medium", "hard"}
        assert sum(probs.values()) == pytest.approx(1.0)
    filter_scores = JudgeDifficulty(
        str(partially_trained["checkpoint"]), template="Rate: {prompt} -> {completion}", llm=llm
    ).score(rows)
    assert filter_scores == pytest.approx(
        [p["medium"] * 0.5 + p["hard"] for p in probabilities], abs=1e-9
    )
    with pytest.raises(KeyError, match=r"needs \['solution'\]"):
        ChoiceJudge(llm, build_tokenizer(), "{solution}", {"a": 0, "b": 1}).render(rows[0])
    with pytest.raises(ValueError, match="at least two choices"):
        ChoiceJudge(llm, build_tokenizer(), "{prompt}", {"a": 0})


def test_rl_rows_score_like_sft_rows(partially_trained):
    """The scorer reads the prompt column of either schema; the answers come from `answer`."""
    llm = shared_engine(partially_trained["checkpoint"])
    problems = partially_trained["heldout"][:5]
    difficulty = PassRateDifficulty(str(partially_trained["checkpoint"]), samples=4, llm=llm)
    assert difficulty.score(list(to_rl(problems))) == difficulty.score(list(to_sft(problems)))
