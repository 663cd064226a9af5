"""Rollout workers of the online RL stage: a vLLM engine that samples and scores groups.

A `RolloutWorker` owns one vLLM engine holding some version of the policy. It samples a group of
completions per prompt, scores them with the stage's rewards (so scoring happens off the
learner's critical path), and returns `Rollout`s that carry the token ids, vLLM's logprobs of
the sampled tokens (the behaviour policy) and the policy version that produced them. New
weights arrive from the learner's rank 0 over a process group (`init_weight_transfer`, then
`receive_weights` per update: `align.rl.transport`); a checkpoint directory loads with
`load_checkpoint` (held-out evaluation of snapshots).

The class is plain Python: the RL fleet runs it as a Ray actor, tests can also call it directly.
"""

from __future__ import annotations

import math
import time
from typing import Any

from align import engine
from align.rewarding import RewardSpec, build_reward_set
from align.rl.rollout import GenerateResult, Rollout, SamplingSettings
from align.scoring import PassRateScorer, sample_and_score
from align.settings import EngineSettings
from align.tokenizer import VISION_TOKENS, encode_prompts


class RolloutWorker:
    """A vLLM engine that samples scored groups and takes new weights from the learner.

    Args:
        model_path: checkpoint the engine starts from (weights of policy version 0).
        engine_config: engine settings.
        rewards: the rewards every completion is scored with.
        sampling: group size, temperature, completion length.
    """

    def __init__(
        self,
        model_path: str,
        engine_config: EngineSettings,
        rewards: list[RewardSpec],
        sampling: SamplingSettings,
    ) -> None:
        from transformers import AutoTokenizer

        self.sampling = sampling
        self.llm = engine.start_engine(model_path, engine_config)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
        # A vision-language tokenizer's image and video placeholders: a completion that writes
        # one cannot be scored by the learner as text (its model reads a placeholder as an
        # image's patch), so it is left unscored.
        vocabulary = self.tokenizer.get_vocab()
        self.placeholders = {vocabulary[t] for t in VISION_TOKENS if t in vocabulary}
        self.rewards = build_reward_set(rewards)
        self.version = 0

    def generate(self, prompts: list[dict[str, Any]], seed: int) -> GenerateResult:
        """Samples and scores a group for each prompt.

        Args:
            prompts: dicts with `id` (pool index), `prompt` (messages, system message included),
                `row` (the dataset row whose columns the rewards read) and, for a
                vision-language model, `images` (the prompt's images).
            seed: sampling seed of this request; the same seed and weights give the same groups.
        """
        started = time.perf_counter()
        rows = [{**p["row"], "prompt": p["prompt"]} for p in prompts]
        completions, batch = sample_and_score(
            self.llm,
            self.tokenizer,
            rows,
            self.rewards,
            samples=self.sampling.samples,
            temperature=self.sampling.temperature,
            max_new_tokens=self.sampling.max_new_tokens,
            seed=seed,
            images=_images(prompts),
        )
        prompt_ids = encode_prompts(self.tokenizer, [row["prompt"] for row in rows])
        g = self.sampling.samples
        totals = list(batch.totals)
        placeholders = 0
        for k, completion in enumerate(c for group in completions for c in group):
            if self.placeholders.intersection(completion.token_ids):
                totals[k], placeholders = None, placeholders + 1
        rollouts = [
            Rollout(
                prompt_id=p["id"],
                prompt_ids=prompt_ids[i],
                completion_ids=[c.token_ids for c in group],
                behaviour_logprobs=[c.logprobs for c in group],
                rewards=totals[i * g : (i + 1) * g],
                version=self.version,
                task=str(p["row"].get("task", "default")),
            )
            for i, (p, group) in enumerate(zip(prompts, completions, strict=True))
        ]
        tokens = sum(len(c.token_ids) for group in completions for c in group)
        seconds = time.perf_counter() - started
        metrics = {
            **{k: v for k, v in batch.metrics.items() if math.isfinite(v)},
            "rollout/seconds": seconds,
            "rollout/tokens": float(tokens),
            "time/reward": batch.seconds,
            **({"rollout/placeholder_completions": float(placeholders)} if placeholders else {}),
            # The rest of the request: sampling in vLLM and tokenising.
            "time/rollout_generate": seconds - batch.seconds,
        }
        return GenerateResult(rollouts, metrics, self.rewards.take_warnings())

    def init_weight_transfer(self, init_info: dict[str, Any]) -> None:
        """Joins the learner's rank 0 for weight updates (it joins at the same time)."""
        engine.init_weight_transfer(self.llm, init_info)

    def receive_weights(self, update_info: dict[str, Any], version: int) -> float:
        """Loads policy `version`, which the learner's rank 0 sends meanwhile; returns seconds."""
        seconds = engine.receive_weights(self.llm, update_info)
        self.version = version
        return seconds

    def load_checkpoint(self, directory: str, version: int) -> float:
        """Loads the checkpoint in `directory` as policy `version`; returns seconds."""
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
        return [result.rate for result in scorer.score(rows, images=_images(prompts))]

    def evaluate(self, rows: list[dict[str, Any]], **settings) -> dict:
        """Held-out evaluation of the current weights (see `align.evaluate.evaluate`), the
        sampled completions also scored with the stage's rewards."""
        from align.evaluate import evaluate

        return evaluate(self.llm, self.tokenizer, rows, rewards=self.rewards, **settings)


def _images(prompts: list[dict[str, Any]]) -> list[list] | None:
    """The prompts' images, for a vision-language engine (None: the prompts carry none)."""
    return [p["images"] for p in prompts] if prompts and "images" in prompts[0] else None
