"""Safety filters: a guard model's P(unsafe) of each row, and a prompt-attack classifier's
P(attack) of each prompt.

Both score in [0, 1] (higher = less safe), so `keep: {max: 0.5}` drops the rows the guard or
classifier calls unsafe, and a lower bound is stricter. The filter report counts what was found:
`unsafe/<category>` (guard) or `flagged/<label>` (classifier) over the scored rows, and rows the
guard's answer left unscored (they land in the unscored bucket, never kept as safe).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

from align.pruning import row_text
from align.safety import GuardFormat, conversation, guard_judge, tally
from align.scoring import SequenceClassifier, row_prompt


class GuardFilter:
    """Score = 1 - the guard's P(safe) of each row's response (`judge: response`) or prompt
    (`judge: prompt`). A row whose guard answer is malformed is unscored.

    Args:
        model: the guard checkpoint; served by vLLM.
        judge: "response" (the last assistant turn, with the prompt as context) or "prompt".
        format, categories, controversial_safe: as for the `guard` reward.
        engine: vLLM engine settings (EngineSettings keys).
        llm: an engine already serving `model` (from code, not YAML).
    """

    score_name = "P(unsafe) by the guard"
    checkpoint_options = {"model": "causal_lm"}
    independent_rows = True

    def __init__(
        self,
        model: str,
        judge: Literal["response", "prompt"] = "response",
        format: GuardFormat = "llama_guard",
        categories: dict[str, str] | None = None,
        controversial_safe: bool = False,
        engine: dict[str, Any] | None = None,
        llm: Any = None,
    ) -> None:
        if judge not in ("response", "prompt"):
            raise ValueError(f"judge must be 'response' or 'prompt' (got {judge!r})")
        self.judge = judge
        self.arguments = (model, format, categories, controversial_safe, engine, "guard.engine")
        self.llm = llm
        self.guard = None
        self.counts: Counter[str] = Counter()

    def score(self, rows: list[dict[str, Any]]) -> list[float | None]:
        if not rows:
            return []
        if self.guard is None:  # started only when rows need scoring (cached scores need none)
            self.guard = guard_judge(*self.arguments, llm=self.llm)
        turns = [
            conversation(
                row_prompt(row),
                row_text(row, "completion") if self.judge == "response" else None,
            )
            for row in rows
        ]
        judged = self.guard.judge(turns)
        self.counts.update(tally(verdict for _, verdict, _ in judged))
        return [None if verdict is None else 1.0 - p_safe for p_safe, verdict, _ in judged]

    def metrics(self) -> dict[str, float]:
        """Greedy verdicts over the rows scored here: `unsafe`, `unsafe/<category>`, `unscored`."""
        return {key: float(n) for key, n in sorted(self.counts.items())}


class PromptAttackFilter:
    """Score = a prompt-attack classifier's probability that each prompt is an attack (the sum
    over its attack labels), e.g. Prompt Guard 2 (`LABEL_1`) or Prompt Guard 1 (`INJECTION`,
    `JAILBREAK`).

    Args:
        model: checkpoint directory of a `*ForSequenceClassification` classifier.
        attack_labels: the labels (its config's `id2label`) that mean an attack.
        batch_size, max_length, device: as for `reward_model`.
    """

    score_name = "P(attack) by the prompt classifier"
    checkpoint_options = {"model": "any"}
    independent_rows = True

    def __init__(
        self,
        model: str,
        attack_labels: list[str],
        batch_size: int = 16,
        max_length: int = 512,
        device: Literal["cpu", "cuda", "auto"] = "auto",
    ) -> None:
        self.classifier = SequenceClassifier(model, batch_size, max_length, device)
        unknown = [label for label in attack_labels if label not in self.classifier.labels]
        if unknown or not attack_labels:
            raise ValueError(
                f"prompt_attack: attack_labels {attack_labels} must name labels of {model}; its "
                f"labels: {', '.join(self.classifier.labels)}"
            )
        self.attack = [self.classifier.labels.index(label) for label in attack_labels]
        self.counts: Counter[str] = Counter()

    def score(self, rows: list[dict[str, Any]]) -> list[float | None]:
        texts = [self.classifier.text(row_prompt(row)) for row in rows]
        probabilities = self.classifier.probabilities(texts)
        for row in probabilities:
            top = max(range(len(row)), key=row.__getitem__)
            if top in self.attack:
                self.counts[f"flagged/{self.classifier.labels[top]}"] += 1
        return [sum(row[i] for i in self.attack) for row in probabilities]

    def metrics(self) -> dict[str, float]:
        """Prompts whose most likely label is an attack label, by label: `flagged/<label>`."""
        return {key: float(n) for key, n in sorted(self.counts.items())}
