"""Difficulty filters: pass rate under a reference model, or a judge model's easy/medium/hard.

Both score difficulty in [0, 1] (higher = harder), so one `keep:` selection works for either:
`drop_lowest: 0.5` drops the easiest half; `min: 0.25, max: 0.875` keeps medium-to-hard rows.
The vLLM engine starts only when rows need scoring, so re-tuning thresholds over cached scores
starts nothing.
"""

from __future__ import annotations

from typing import Any

from align.config import from_dict
from align.engine import engine_and_tokenizer
from align.rewarding import RewardSpec, build_reward_set
from align.scoring import ChoiceJudge, PassRateScorer

DEFAULT_JUDGE_TEMPLATE = (
    "How hard is this problem for a student? Reply easy, medium or hard.\nProblem: {prompt}"
)


class PassRateDifficulty:
    """Difficulty = 1 - pass rate of `samples` answers sampled from a reference model.

    A row none of whose samples the rewards could score (no gold answer, a failing reward)
    is unscored and lands in its own bucket.

    Args:
        model: the reference checkpoint that answers the prompts.
        rewards: reward specs (`name`, `weight`, `options`) judging the answers; default
            `answer_match`.
        samples: answers sampled per prompt (k).
        temperature: sampling temperature.
        max_new_tokens: longest answer.
        pass_threshold: an answer passes when its combined reward is >= this.
        seed: sampling seed.
        engine: vLLM engine settings (EngineSettings keys).
        llm: an engine already serving `model` (from code, not YAML).
    """

    score_name = "difficulty (1 - pass rate)"
    # Options naming a checkpoint, checked when a stage starts, before anything is written
    # (`align.modeling.check_plugin_checkpoints`).
    checkpoint_options = {"model": "causal_lm"}
    # A row's score depends on that row alone, so scores are cached per row.
    independent_rows = True

    def __init__(
        self,
        model: str,
        rewards: list[dict[str, Any]] | None = None,
        samples: int = 8,
        temperature: float = 1.0,
        max_new_tokens: int = 32,
        pass_threshold: float = 0.5,
        seed: int = 0,
        engine: dict[str, Any] | None = None,
        llm: Any = None,
    ) -> None:
        specs = [
            from_dict(RewardSpec, spec, source=f"difficulty.rewards[{i}]")
            for i, spec in enumerate(rewards or [{"name": "answer_match"}])
        ]
        self.rewards = build_reward_set(specs)
        if samples < 1:
            raise ValueError(f"difficulty: samples must be >= 1 (got {samples})")
        self.model, self.engine, self.llm = model, engine, llm
        self.settings = dict(
            samples=samples,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            pass_threshold=pass_threshold,
            seed=seed,
        )
        self.scorer: PassRateScorer | None = None

    def score(self, rows: list[dict[str, Any]]) -> list[float | None]:
        if self.scorer is None:
            llm, tokenizer = engine_and_tokenizer(
                self.model, self.engine, "difficulty.engine", self.llm
            )
            self.scorer = PassRateScorer(llm, tokenizer, self.rewards, **self.settings)
        results = self.scorer.score(rows, progress=True)
        return [None if r.rate is None else 1.0 - r.rate for r in results]

    def metrics(self) -> dict[str, float]:
        """Reward means and fault counts over the answers scored so far."""
        return self.scorer.reward_metrics() if self.scorer else {}


class JudgeDifficulty:
    """Difficulty from a judge model's verdict, read as choice probabilities (no parsing).

    Score = sum over choices of P(choice) * value, e.g. P(medium) * 0.5 + P(hard) * 1.0.

    Args:
        model: the judge checkpoint.
        template: the question; `{prompt}`, `{completion}` and dataset columns are filled in.
        choices: verdicts and their difficulty values.
        engine: vLLM engine settings (EngineSettings keys).
        llm: an engine already serving `model` (from code, not YAML).
    """

    score_name = "difficulty (judge's expected verdict)"
    # Options naming a checkpoint, checked when a stage starts, before anything is written
    # (`align.modeling.check_plugin_checkpoints`).
    checkpoint_options = {"model": "causal_lm"}
    independent_rows = True

    def __init__(
        self,
        model: str,
        template: str = DEFAULT_JUDGE_TEMPLATE,
        choices: dict[str, float] | None = None,
        engine: dict[str, Any] | None = None,
        llm: Any = None,
    ) -> None:
        self.model, self.engine, self.llm = model, engine, llm
        self.template = template
        self.choices = choices or {"easy": 0.0, "medium": 0.5, "hard": 1.0}
        self.judge: ChoiceJudge | None = None

    def score(self, rows: list[dict[str, Any]]) -> list[float | None]:
        if self.judge is None:
            llm, tokenizer = engine_and_tokenizer(
                self.model, self.engine, "difficulty_judge.engine", self.llm
            )
            self.judge = ChoiceJudge(llm, tokenizer, self.template, self.choices)
        return list(self.judge.expected(rows))

    def metrics(self) -> dict[str, float]:
        return {}
