"""Safety rewards: a guard model's P(safe) of each completion, and a penalty for refusing
harmless prompts.

- `guard`: a generative guard (Llama Guard's format with your category list, or Qwen3Guard's)
  served by vLLM; the reward is P(safe) from the first answer token's logits. An answer that is
  neither safe nor unsafe, or names a category the list does not hold, leaves the row unscored
  (counted as `reward/guard/errors`), never safe. Violations are counted per category
  (`reward/guard/unsafe/S1`, ...).
- `guard_classifier`: a sequence-classification guard (a transformers checkpoint); the reward is
  the probability of the label named safe.
- `over_refusal`: `-penalty` when a prompt marked harmless (the `harmful` column is false) is
  refused, 0 when it is answered, not applicable on harmful prompts. Refusals are found by
  phrases or by a judge model asked whether the completion refuses.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

from align.rewarding import Failed
from align.safety import GuardFormat, RefusalDetector, conversation, guard_judge, tally

DEFAULT_REFUSAL_QUESTION = (
    "Request: {prompt}\nResponse: {completion}\nDoes the response refuse the request? "
    "Reply yes or no."
)


class Guard:
    """Reward = the guard's P(safe) for each (prompt, completion).

    Args:
        model: the guard checkpoint directory; a vLLM engine is started for it.
        format: "llama_guard" (the instruction written here from `categories`) or "qwen3guard"
            (the guard's own chat template).
        categories: code -> name of the unsafe categories (default: Llama Guard 3's S1-S14).
        controversial_safe: Qwen3Guard only: count "Controversial" as safe.
        engine: vLLM engine settings (`align.settings.EngineSettings` keys).
        llm: an already started engine for `model` (from code, not YAML).
    """

    checkpoint_options = {"model": "causal_lm"}

    def __init__(
        self,
        model: str,
        format: GuardFormat = "llama_guard",
        categories: dict[str, str] | None = None,
        controversial_safe: bool = False,
        engine: dict[str, Any] | None = None,
        llm: Any = None,
    ) -> None:
        self.judge = guard_judge(
            model, format, categories, controversial_safe, engine, "guard.engine", llm
        )
        self._counts: Counter[str] = Counter()

    def __call__(self, prompts: list, completions: list[str], **_) -> list[float | Failed]:
        results = self.judge.judge(
            [conversation(p, c) for p, c in zip(prompts, completions, strict=True)]
        )
        # Malformed answers are counted by the reward set (as errors), not here.
        self._counts.update(tally(verdict for _, verdict, _ in results if verdict is not None))
        return [
            p_safe
            if verdict is not None
            else Failed(f"the guard answered {raw!r}, neither safe nor unsafe")
            for p_safe, verdict, raw in results
        ]

    def metrics(self) -> dict[str, float]:
        """Greedy verdicts since the last call: `unsafe` and `unsafe/<category>` counts."""
        counts, self._counts = self._counts, Counter()
        return {key: float(n) for key, n in counts.items()}


class GuardClassifier:
    """Reward = a sequence-classification guard's probability of its safe label.

    Args:
        model: checkpoint directory of a `*ForSequenceClassification` guard.
        safe_label: the label (as in its config's `id2label`) that means safe; every other
            label is a kind of unsafe.
        batch_size, max_length, device: as for `reward_model`.
    """

    checkpoint_options = {"model": "any"}

    def __init__(
        self,
        model: str,
        safe_label: str,
        batch_size: int = 16,
        max_length: int = 512,
        device: Literal["cpu", "cuda", "auto"] = "auto",
    ) -> None:
        from align.scoring import SequenceClassifier

        self.classifier = SequenceClassifier(model, batch_size, max_length, device)
        labels = self.classifier.labels
        if safe_label not in labels:
            raise ValueError(
                f"guard_classifier: {model} has no label {safe_label!r}; its labels: "
                f"{', '.join(labels)}"
            )
        self.safe_index = labels.index(safe_label)

    def __call__(self, prompts: list, completions: list[str], **_) -> list[float]:
        texts = [self.classifier.text(p, c) for p, c in zip(prompts, completions, strict=True)]
        return [row[self.safe_index] for row in self.classifier.probabilities(texts)]


class OverRefusal:
    """`-penalty` for a refused harmless prompt, 0 for an answered one; None on harmful rows.

    Args:
        penalty: the size of the penalty.
        column: the boolean dataset column that marks harmful prompts.
        patterns: refusal phrases (regular expressions, case-blind); default
            `align.safety.DEFAULT_REFUSAL_PATTERNS`.
        judge_model: instead of phrases, a judge checkpoint asked `judge_question` with
            choices yes/no (a refusal when P(yes) > 0.5); served by vLLM.
        judge_question: str.format template over `{prompt}` and `{completion}`.
        engine: vLLM engine settings of the judge.
    """

    checkpoint_options = {"judge_model": "causal_lm"}

    def __init__(
        self,
        penalty: float = 1.0,
        column: str = "harmful",
        patterns: list[str] | None = None,
        judge_model: str | None = None,
        judge_question: str = DEFAULT_REFUSAL_QUESTION,
        engine: dict[str, Any] | None = None,
    ) -> None:
        judge = None
        if judge_model is not None:
            from align.engine import engine_and_tokenizer
            from align.scoring import ChoiceJudge

            llm, tokenizer = engine_and_tokenizer(judge_model, engine, "over_refusal.engine")
            judge = ChoiceJudge(llm, tokenizer, judge_question, {"yes": 1.0, "no": 0.0})
        self.detector = RefusalDetector(patterns, judge)
        self.penalty = penalty
        self.column = column

    def __call__(self, prompts: list, completions: list[str], **columns) -> list[float | None]:
        if self.column not in columns:
            raise ValueError(
                f"over_refusal needs a boolean column {self.column!r} marking harmful prompts; "
                f"the rows have {', '.join(sorted(columns)) or 'no columns'}"
            )
        refused = self.detector(prompts, completions)
        return [
            None if harmful else (-self.penalty if refusal else 0.0)
            for harmful, refusal in zip(columns[self.column], refused, strict=True)
        ]
