"""Scoring prompts with a live vLLM engine: pass rates over sampled answers, and choice judges.

Both are components that take a started engine, so the offline difficulty filter and the online
RL stage (re-scoring its prompt pool with the current policy) use the same code.

- `PassRateScorer`: sample k completions per prompt, score them with a `RewardSet`, count the
  ones whose combined reward reaches `pass_threshold`. Difficulty = 1 - pass rate.
- `ChoiceJudge`: fill a prompt template with a row, then read the model's probability of each
  allowed answer ("easy"/"medium"/"hard", "yes"/"no") from its logprobs, which always gives a
  number, unlike parsing free text.
"""

from __future__ import annotations

import math
import string
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from align import engine
from align.pruning import messages_text
from align.rewarding import RewardBatch, RewardSet
from align.tokenizer import encode_prompts

if TYPE_CHECKING:
    from vllm import LLM


def row_prompt(row: dict[str, Any]) -> str | list[dict]:
    """A row's prompt: the `prompt` column, or every message but the last of `messages`."""
    if "prompt" in row:
        return row["prompt"]
    if "messages" in row:
        return row["messages"][:-1]
    raise KeyError("row has neither a 'prompt' nor a 'messages' column")


def reward_columns(rows: list[dict[str, Any]], repeat: int) -> dict[str, list]:
    """The rows' columns (all but the prompt) as reward keyword arguments, each row repeated."""
    names = [c for c in rows[0] if c not in ("prompt", "messages")] if rows else []
    return {c: [row[c] for row in rows for _ in range(repeat)] for c in names}


def sample_and_score(
    llm: LLM,
    tokenizer,
    rows: list[dict[str, Any]],
    rewards: RewardSet,
    *,
    samples: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    progress: bool = False,
    images: list[list] | None = None,
) -> tuple[list[list[engine.Completion]], RewardBatch]:
    """Samples `samples` completions per row and scores each against its row's columns
    (`images`: each row's images, for a vision-language engine).

    Returns:
        The completions per row, and the reward batch over all of them flattened row by row
        (completion j of row i is entry i * samples + j).
    """
    prompts = [row_prompt(row) for row in rows]
    completions = engine.generate(
        llm,
        encode_prompts(tokenizer, prompts),
        n=samples,
        temperature=temperature,
        max_tokens=max_new_tokens,
        seed=seed,
        progress=progress,
        images=images,
    )
    return completions, score_groups(rows, prompts, completions, rewards)


def score_groups(
    rows: list[dict[str, Any]],
    prompts: list,
    completions: list[list[engine.Completion]],
    rewards: RewardSet,
) -> RewardBatch:
    """Scores each row's completions against the row's columns (and `completion_ids`); the
    batch is flattened row by row (completion j of row i is entry i * samples + j)."""
    samples = len(completions[0]) if completions else 0
    flat = [c for per_prompt in completions for c in per_prompt]
    columns = reward_columns(rows, samples)
    columns["completion_ids"] = [c.token_ids for c in flat]
    return rewards([p for p in prompts for _ in range(samples)], [c.text for c in flat], columns)


@dataclass
class PassRate:
    """The outcome of k sampled answers to one prompt."""

    # Completions whose combined reward reached the pass threshold.
    passed: int
    # Completions the rewards could score (the others are unscored: a reward failed or none
    # applied).
    scored: int
    # Completions sampled.
    sampled: int
    # Mean combined reward of the scored completions (None when none was scored).
    mean_reward: float | None

    @property
    def rate(self) -> float | None:
        """passed / scored, or None when no completion could be scored."""
        return self.passed / self.scored if self.scored else None


class PassRateScorer:
    """Estimates each prompt's pass rate under a policy served by a live vLLM engine.

    Args:
        llm: the started engine holding the policy.
        tokenizer: the policy's tokenizer (chat template for conversational prompts).
        rewards: scores the sampled completions against each row's columns.
        samples: completions sampled per prompt (k).
        temperature: sampling temperature.
        max_new_tokens: longest completion.
        pass_threshold: a completion passes when its combined reward is >= this.
        seed: sampling seed; each prompt's samples depend only on it and the prompt.
    """

    def __init__(
        self,
        llm: LLM,
        tokenizer,
        rewards: RewardSet,
        *,
        samples: int = 8,
        temperature: float = 1.0,
        max_new_tokens: int = 32,
        pass_threshold: float = 0.5,
        seed: int = 0,
    ) -> None:
        if samples < 1:
            raise ValueError(f"samples must be >= 1 (got {samples})")
        self.llm = llm
        self.tokenizer = tokenizer
        self.rewards = rewards
        self.samples = samples
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.pass_threshold = pass_threshold
        self.seed = seed
        # Fault counts and per-reward value sums over every call, for `reward_metrics()`.
        self._faults: Counter[str] = Counter()
        self._sums: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()

    def reward_metrics(self) -> dict[str, float]:
        """Over every completion scored so far: each reward's mean (`reward/<name>/mean`, and
        `reward/total/mean`) and the fault counts (`reward/<name>/<kind>`, `reward/unscored`)."""
        means = {
            f"reward/{name}/mean": self._sums[name] / count
            for name, count in self._counts.items()
            if count
        }
        return {**means, **self._faults}

    def score(
        self, rows: list[dict[str, Any]], progress: bool = False, images: list | None = None
    ) -> list[PassRate]:
        """Samples `samples` completions per row and counts those that pass (`images`: each
        row's images, for a vision-language engine)."""
        if not rows:
            return []
        _, batch = sample_and_score(
            self.llm,
            self.tokenizer,
            rows,
            self.rewards,
            samples=self.samples,
            temperature=self.temperature,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
            progress=progress,
            images=images,
        )
        for key, value in batch.metrics.items():
            if not key.endswith(("/mean", "/applicable")):
                self._faults[key] += value
        for name, values in [*batch.values.items(), ("total", batch.totals)]:
            scored = [v for v in values if v is not None]
            self._sums[name] += sum(scored)
            self._counts[name] += len(scored)

        results = []
        for i in range(len(rows)):
            totals = batch.totals[i * self.samples : (i + 1) * self.samples]
            scored = [t for t in totals if t is not None]
            results.append(
                PassRate(
                    passed=sum(t >= self.pass_threshold for t in scored),
                    scored=len(scored),
                    sampled=self.samples,
                    mean_reward=sum(scored) / len(scored) if scored else None,
                )
            )
        return results


def renormalise(logprobs: list[float]) -> list[float]:
    """Probabilities proportional to exp(logprobs), summing to 1 (a softmax over candidates)."""
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    return [w / sum(weights) for w in weights]


def _field_text(value: Any) -> str | None:
    """A column value as template text: scalars as is, chat messages as their contents."""
    if isinstance(value, str | int | float):
        return str(value)
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        return messages_text(value)
    return None


def template_fields(template: str) -> set[str]:
    """The `{placeholder}` names a str.format template uses."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


class ChoiceJudge:
    """Asks a model a templated question and reads its probability of each allowed answer.

    The template is a str.format string over the row's fields: `{prompt}` (the prompt's text),
    `{completion}` (the text being judged, when there is one) and any dataset column, e.g.
    `{answer}`. It is sent as one user turn through the model's chat template; then each choice's
    tokens are scored after the assistant header. The choice probabilities are renormalised over
    the choices, and `expected` weights each choice's value by them.

    Args:
        llm: the started engine holding the judge model.
        tokenizer: the judge model's tokenizer.
        template: the question, with placeholders.
        choices: allowed answers and their values, e.g. {"easy": 0.0, "medium": 0.5, "hard": 1.0}.
    """

    def __init__(self, llm: LLM, tokenizer, template: str, choices: dict[str, float]) -> None:
        if len(choices) < 2:
            raise ValueError(f"a judge needs at least two choices (got {list(choices)})")
        self.llm = llm
        self.tokenizer = tokenizer
        self.template = template
        self.fields = template_fields(template)
        self.choices = dict(choices)
        self.choice_ids = {
            text: tokenizer.encode(text, add_special_tokens=False) for text in self.choices
        }
        empty = [text for text, ids in self.choice_ids.items() if not ids]
        if empty:
            raise ValueError(f"judge choices {empty} encode to no tokens")

    def render(self, row: dict[str, Any]) -> str:
        """The judge's question for one row."""
        values = {k: _field_text(v) for k, v in row.items()}
        values["prompt"] = _field_text(row_prompt(row))
        if "messages" in row:
            values["completion"] = _field_text(row["messages"][-1:])
        values = {k: v for k, v in values.items() if v is not None}
        missing = sorted(self.fields - set(values))
        if missing:
            raise KeyError(
                f"judge template needs {missing}, which the row lacks (it has {sorted(values)})"
            )
        return self.template.format_map(values)

    def probabilities(self, rows: list[dict[str, Any]]) -> list[dict[str, float]]:
        """For each row, the judge's probability of each choice (summing to 1)."""
        questions = encode_prompts(
            self.tokenizer, [[{"role": "user", "content": self.render(row)}] for row in rows]
        )
        texts = list(self.choice_ids)
        sequences = [q + self.choice_ids[t] for q in questions for t in texts]
        logprobs = engine.sequence_logprobs(self.llm, sequences)
        results = []
        for i in range(len(rows)):
            scores = [
                sum(logprobs[i * len(texts) + j][-len(self.choice_ids[text]) :])
                for j, text in enumerate(texts)
            ]
            results.append(dict(zip(texts, renormalise(scores), strict=True)))
        return results

    def expected(self, rows: list[dict[str, Any]]) -> list[float]:
        """For each row, the choice values weighted by the judge's probabilities."""
        return [
            sum(p * self.choices[t] for t, p in probs.items()) for probs in self.probabilities(rows)
        ]


class SequenceClassifier:
    """A transformers sequence-classification checkpoint scoring (prompt, completion) pairs: a
    reward model (one output), a guard or a prompt-attack classifier (one output per label).

    Conversational prompts are rendered through the checkpoint's chat template with the
    completion as the assistant turn; plain-string prompts are concatenated with the completion.
    Scoring runs in batches under `torch.inference_mode`. Weights load from safetensors only and
    remote code is never trusted.

    Args:
        model: checkpoint directory.
        batch_size: texts scored per forward pass.
        max_length: longest text in tokens; longer texts keep their end (the completion, which
            is being judged).
        device: "cpu", "cuda", or "auto" (CUDA when available).
    """

    def __init__(
        self, model: str, batch_size: int = 16, max_length: int = 512, device: str = "auto"
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
        self.tokenizer.truncation_side = "left"
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model, use_safetensors=True, trust_remote_code=False
        ).to(device)
        self.model.eval()
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"the tokenizer of {model} has no pad token")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size
        self.max_length = max_length
        # Label names by output index.
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]

    def text(self, prompt: str | list[dict], completion: str | None = None) -> str:
        """The string the classifier reads for a prompt (and the completion judged, if any)."""
        if isinstance(prompt, str):
            return prompt + (completion or "")
        if completion is None:
            return self.tokenizer.apply_chat_template(prompt, tokenize=False)
        conversation = [*prompt, {"role": "assistant", "content": completion}]
        return self.tokenizer.apply_chat_template(conversation, tokenize=False)

    def logits(self, texts: list[str]) -> list[list[float]]:
        """The classifier's outputs for each text."""
        import torch

        rows: list[list[float]] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[start : start + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    add_special_tokens=False,
                ).to(self.device)
                rows.extend(self.model(**batch).logits.float().tolist())
        return rows

    def probabilities(self, texts: list[str]) -> list[list[float]]:
        """Softmax over the labels of each text's outputs."""
        import torch

        return torch.tensor(self.logits(texts)).softmax(-1).tolist() if texts else []
