"""Rollout workers of the online RL stage: a vLLM engine that samples and scores groups.

A `RolloutWorker` owns one vLLM engine holding some version of the policy. It samples a group of
completions per prompt, scores them with the stage's rewards (so scoring happens off the
learner's critical path), and returns `Rollout`s that carry the token ids, vLLM's logprobs of
the sampled tokens (the behaviour policy) and the policy version that produced them. The
learner publishes new weights as a checkpoint directory; `sync` loads them into the engine.

The class is plain Python: the RL controller runs it as a Ray actor
(`ray.remote(RolloutWorker)`), tests can also call it directly.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from align import engine
from align.rewarding import RewardSpec, build_reward_set
from align.scoring import PassRateScorer, sample_and_score
from align.tokenizer import encode_prompts

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One prompt's group of sampled completions, scored, tagged with the policy version."""

    # Index of the prompt in the prompt pool.
    prompt_id: int
    # Token ids of the prompt (chat template applied).
    prompt_ids: list[int]
    # Per completion: sampled token ids, vLLM's logprob of each, decoded text, finish reason.
    completion_ids: list[list[int]]
    behaviour_logprobs: list[list[float]]
    texts: list[str]
    finish_reasons: list[str | None]
    # Combined reward per completion (None: unscored, a reward failed or none applied).
    rewards: list[float | None]
    # Policy version (learner steps) of the weights that sampled the group.
    version: int
    # Task family of the prompt ("default" when the rows have none), for per-task metrics.
    task: str = "default"
    # Per completion token: the experts vLLM routed it to, per MoE layer (routing replay).
    routed_experts: list[list[list[list[int]]]] | None = None

    @property
    def scored_rewards(self) -> list[float]:
        return [r for r in self.rewards if r is not None]

    def is_constant(self) -> bool:
        """Whether every scored reward is equal: zero advantage, nothing to learn."""
        scored = self.scored_rewards
        return len(scored) < 2 or max(scored) - min(scored) < 1e-9

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SamplingSettings:
    """How rollouts are sampled."""

    # Completions per prompt (the group of GRPO-style advantages).
    group_size: int = 8
    # Sampling temperature of rollouts. The RL stage needs 1.0: its learner scores tokens at
    # temperature 1, the distribution vLLM then samples from.
    temperature: float = 1.0
    # Longest completion in tokens.
    max_new_tokens: int = 32


@dataclass
class GenerateResult:
    """What one `generate` call returns to the controller."""

    rollouts: list[Rollout]
    # Seconds spent sampling and scoring, tokens generated, and reward metrics.
    metrics: dict[str, float] = field(default_factory=dict)


class RolloutWorker:
    """A vLLM engine that samples scored groups and takes new weights from the learner.

    Args:
        model_path: checkpoint the engine starts from (weights of policy version 0).
        engine_config: engine settings.
        rewards: the rewards every completion is scored with.
        sampling: group size, temperature, completion length.
        worker_id: index of this worker, for logs.
    """

    def __init__(
        self,
        model_path: str,
        engine_config: engine.EngineConfig,
        rewards: list[RewardSpec],
        sampling: SamplingSettings,
        worker_id: int = 0,
    ) -> None:
        from transformers import AutoTokenizer

        self.worker_id = worker_id
        self.sampling = sampling
        self.llm = engine.start_engine(model_path, engine_config)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
        self.rewards = build_reward_set(rewards)
        self.version = 0

    def ping(self) -> int:
        """The policy version this worker holds (also a liveness probe)."""
        return self.version

    def generate(self, prompts: list[dict[str, Any]], seed: int) -> GenerateResult:
        """Samples and scores a group for each prompt.

        Args:
            prompts: dicts with `id` (pool index), `prompt` (messages, system message included)
                and `row` (the dataset row whose columns the rewards read).
            seed: sampling seed of this request; the same seed and weights give the same groups.
        """
        started = time.perf_counter()
        rows = [{**p["row"], "prompt": p["prompt"]} for p in prompts]
        completions, batch = sample_and_score(
            self.llm,
            self.tokenizer,
            rows,
            self.rewards,
            samples=self.sampling.group_size,
            temperature=self.sampling.temperature,
            max_new_tokens=self.sampling.max_new_tokens,
            seed=seed,
        )
        prompt_ids = encode_prompts(self.tokenizer, [row["prompt"] for row in rows])
        g = self.sampling.group_size
        rollouts = []
        for i, (p, group) in enumerate(zip(prompts, completions, strict=True)):
            rollouts.append(
                Rollout(
                    prompt_id=p["id"],
                    prompt_ids=prompt_ids[i],
                    completion_ids=[c.token_ids for c in group],
                    behaviour_logprobs=[c.logprobs for c in group],
                    texts=[c.text for c in group],
                    finish_reasons=[c.finish_reason for c in group],
                    rewards=batch.totals[i * g : (i + 1) * g],
                    version=self.version,
                    task=str(p["row"].get("task", "default")),
                )
            )
        tokens = sum(len(c.token_ids) for group in completions for c in group)
        metrics = {
            **{k: v for k, v in batch.metrics.items() if math.isfinite(v)},
            "rollout/seconds": time.perf_counter() - started,
            "rollout/tokens": float(tokens),
        }
        return GenerateResult(rollouts, metrics)

    def sync(self, directory: str, version: int) -> float:
        """Loads the learner's weights written to `directory`; returns the seconds it took."""
        seconds = engine.sync_weights(self.llm, directory)
        self.version = version
        return seconds

    def pass_rates(
        self, prompts: list[dict[str, Any]], samples: int, seed: int
    ) -> list[float | None]:
        """Pass rate of each prompt under the current weights (k samples each), for the pool."""
        scorer = PassRateScorer(
            self.llm,
            self.tokenizer,
            self.rewards,
            samples=samples,
            temperature=self.sampling.temperature,
            max_new_tokens=self.sampling.max_new_tokens,
            seed=seed,
        )
        rows = [{**p["row"], "prompt": p["prompt"]} for p in prompts]
        return [result.rate for result in scorer.score(rows)]

    def evaluate(self, rows: list[dict[str, Any]], **settings) -> dict:
        """Held-out evaluation of the current weights (see `align.evaluate.evaluate`)."""
        from align.evaluate import evaluate

        return evaluate(self.llm, self.tokenizer, rows, **settings)


class RolloutBuffer:
    """Scored groups waiting for the learner, oldest first, with the off-policy bookkeeping.

    Groups whose rewards are all equal have zero advantage and are dropped on arrival when
    `drop_constant` (DAPO's dynamic sampling: the batch is refilled with new groups). A group
    whose policy version is more than `max_staleness` versions behind the learner when it would
    be trained is dropped too; its prompt goes back to the pool so it is trained later.

    Args:
        max_staleness: most versions a trained group may lag the learner (0: synchronous).
        drop_constant: drop zero-advantage groups on arrival.
    """

    def __init__(self, max_staleness: int, drop_constant: bool) -> None:
        self.max_staleness = max_staleness
        self.drop_constant = drop_constant
        self.groups: list[Rollout] = []
        # Totals over the run: groups received, dropped as constant, dropped as stale.
        self.counts = {"received": 0, "dropped_constant": 0, "dropped_stale": 0}

    def __len__(self) -> int:
        return len(self.groups)

    def add(self, rollouts: list[Rollout]) -> list[Rollout]:
        """Adds new groups; returns those dropped as constant."""
        dropped = []
        for rollout in rollouts:
            self.counts["received"] += 1
            if self.drop_constant and rollout.is_constant():
                self.counts["dropped_constant"] += 1
                dropped.append(rollout)
            else:
                self.groups.append(rollout)
        return dropped

    def drop_stale(self, learner_version: int) -> list[Rollout]:
        """Removes the groups too old to train at `learner_version`; returns them."""
        stale = [g for g in self.groups if learner_version - g.version > self.max_staleness]
        if stale:
            self.groups = [
                g for g in self.groups if learner_version - g.version <= self.max_staleness
            ]
            self.counts["dropped_stale"] += len(stale)
            log.info(
                "dropped %d groups older than %d versions (learner at %d)",
                len(stale),
                self.max_staleness,
                learner_version,
            )
        return stale

    def take(self, n: int) -> list[Rollout]:
        """The `n` oldest groups, removed from the buffer."""
        batch, self.groups = self.groups[:n], self.groups[n:]
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"groups": [g.to_dict() for g in self.groups], "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.groups = [Rollout(**g) for g in state["groups"]]
        self.counts = dict(state["counts"])
