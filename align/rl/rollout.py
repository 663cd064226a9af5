"""The data of the online RL stage: sampling settings and scored rollout groups.

A rollout worker returns `Rollout`s; the controller buffers them and hands batches of them to
the learner group. They cross Ray and go into checkpoints (the buffer's groups), so they hold
only what the learner and the bookkeeping read: token ids, vLLM's logprobs of the sampled
tokens, rewards, and the policy version that sampled them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from align.settings import GenerationSettings


@dataclass
class SamplingSettings(GenerationSettings):
    """How rollouts are sampled (`align.settings.GenerationSettings`): `samples` completions of
    each prompt form its group. The temperature must stay 1.0: the learner scores tokens at
    temperature 1, the distribution vLLM then samples from."""


@dataclass
class Rollout:
    """One prompt's group of sampled completions, scored, tagged with the policy version."""

    # Index of the prompt in the prompt pool.
    prompt_id: int
    # Token ids of the prompt (chat template applied).
    prompt_ids: list[int]
    # Per completion: sampled token ids, and vLLM's logprob of each (the behaviour policy).
    completion_ids: list[list[int]]
    behaviour_logprobs: list[list[float]]
    # Combined reward per completion (None: unscored, a reward failed or none applied).
    rewards: list[float | None]
    # Policy version (learner steps) of the weights that sampled the group.
    version: int
    # Task family of the prompt ("default" when the rows have none), for per-task metrics.
    task: str = "default"
    # The prompt's images (vision-language models), attached by the controller from its rows
    # before a learner step; not kept in checkpoints (the rows hold them).
    images: list | None = None

    @property
    def scored_rewards(self) -> list[float]:
        return [r for r in self.rewards if r is not None]

    def is_constant(self) -> bool:
        """Whether every scored reward is equal: zero advantage, nothing to learn."""
        scored = self.scored_rewards
        return len(scored) < 2 or max(scored) - min(scored) < 1e-9

    def to_dict(self) -> dict[str, Any]:
        state = asdict(replace(self, images=None))
        del state["images"]
        return state


@dataclass
class GenerateResult:
    """What one rollout request returns to the controller."""

    rollouts: list[Rollout]
    # Seconds spent sampling and scoring, tokens generated, and reward metrics.
    metrics: dict[str, float] = field(default_factory=dict)
    # The rewards' fault warnings the worker logged meanwhile, for the driver's log.
    warnings: list[str] = field(default_factory=list)


def batch_metrics(batch: list[Rollout], learner_version: int) -> dict[str, float]:
    """A trained batch's staleness (versions between the sampling weights and the learner's
    weights before the step, `learner_version - 1`) and mean reward per task."""
    staleness = [learner_version - 1 - group.version for group in batch]
    metrics = {
        "async/staleness_mean": sum(staleness) / len(staleness),
        "async/staleness_max": float(max(staleness)),
    }
    by_task: dict[str, list[float]] = {}
    for group in batch:
        by_task.setdefault(group.task, []).extend(group.scored_rewards)
    for task, values in by_task.items():
        metrics[f"reward/task/{task}"] = sum(values) / len(values)
    return metrics
