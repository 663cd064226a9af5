"""Stage `rl`: asynchronous online RL, a single controller driving Ray actors.

A learner group (N ranks sharding the MoE policy with FSDP2) trains on batches of scored prompt
groups; rollout workers (vLLM engines) sample and score the groups; after each step the new
weights go from the learner's rank 0 to every worker in memory, through vLLM's weight-transfer
protocol. The parts live in `align.rl` (see its package docstring); the loop is
`align.rl.controller`. This module holds the stage's settings and `run`.

Asynchronous mode (`max_staleness` >= 1): workers keep generating while the learner trains, so a
group may be sampled by weights up to `max_staleness` versions older than the learner's; older
groups are dropped (counted, their prompts go back to the pool) and the rest are corrected with
importance weights (`loss.correction`). Synchronous mode is the same code with `max_staleness:
0`. Every `pool.rescore_every` steps the pool is re-scored with the current policy (pass@k on
the workers) and re-filtered to its difficulty band.

Output under runs/<name>/: `model/` (final checkpoint, vLLM loads it), `checkpoints/step-N/`
(resumable: the learner's sharded state, buffer, pool, counters), `snapshots/step-N/` (weights
at the held-out evaluation points, `eval_every`), `curve.json` (held-out accuracy over steps and
training wall time), `trained.jsonl` (the prompts and policy versions of every step's batch),
`eval/`, `metrics.jsonl`, `tb/`, `log.txt`, `config.yaml`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from align.config import ConfigError, check
from align.data import DataError, load_dataset_file
from align.losses.policy import PolicyLossSettings
from align.modeling import check_checkpoint, is_vision_language
from align.moe import has_experts
from align.rewarding import RewardSpec, check_option_columns, check_reward_checkpoints
from align.rl.controller import Controller
from align.rl.fleet import RayFleet
from align.rl.learner import LearnerSettings
from align.rl.placement import Placement
from align.rl.placement import plan as placement_plan
from align.rl.pool import PoolSettings
from align.rl.rollout import SamplingSettings
from align.runs import Run, RunSettings
from align.settings import EngineSettings
from align.training import refuse_changed_rerun
from align.vision import IMAGES_COLUMN, rows_images
from pipelines import evaluate, frame

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Config(RunSettings):
    """Settings of `align rl`."""

    name: str = "rl"

    # Checkpoint of the policy to train (Hugging Face format, safetensors), e.g. an SFT result.
    model: str
    # Training prompts (RL schema: prompt, answer; task and level columns are used if present).
    data: str
    # Held-out rows to evaluate on before and after training; null skips evaluation.
    heldout: str | None = None
    # Learner steps (policy updates) to run.
    steps: int = 40
    # Prompt groups per learner step (the batch is groups_per_step x sampling.samples). On
    # the embedded model, 16 groups x 8 left held-out accuracy flat or falling at every learning
    # rate tried (3e-5 to 5e-4); 64 x 8 at 1e-4 raised it (docs/recipe-evidence.md, 3b).
    groups_per_step: int = 64
    # Prompts per rollout request (a worker's unit of work).
    groups_per_request: int = 16
    # Most policy versions a trained group may lag the learner. 0 = synchronous: generation
    # and learning alternate. 1 or more = asynchronous: they overlap.
    max_staleness: int = 1
    # Drop groups whose rewards are all equal (zero advantage) and sample more instead (DAPO).
    dynamic_sampling: bool = True
    # Publish the learner's weights to the workers every N steps.
    sync_every: int = 1
    # Rewards of every completion (registered names or 'module:function'), weighted.
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec(name="answer_match")])
    # How rollouts are sampled.
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    # The policy loss, advantage estimator and off-policy correction.
    loss: PolicyLossSettings = field(default_factory=PolicyLossSettings)
    # Learner optimisation.
    learner: LearnerSettings = field(default_factory=LearnerSettings)
    # The prompt pool: difficulty band, re-scoring, curriculum, task mix, system prompts.
    pool: PoolSettings = field(default_factory=PoolSettings)
    # Ray resources of the actors.
    placement: Placement = field(default_factory=Placement)
    # vLLM engine of every rollout worker.
    engine: EngineSettings = field(default_factory=EngineSettings)
    # Keep the weights every N steps for the held-out accuracy curve (0: none); they are
    # evaluated after training, so evaluation never slows the loop or skews its timings.
    eval_every: int = 0
    # Held-out evaluation settings.
    eval: evaluate.EvalSettings = field(default_factory=evaluate.EvalSettings)
    # Write a resumable checkpoint every N steps (and at the end).
    save_every: int = 10
    # A rollout request taking longer than this is a hung worker: it is replaced.
    worker_timeout_s: float = 600.0
    # Replacements of failed or hung workers before the run stops (with a checkpoint).
    max_worker_restarts: int = 3
    # Seed of the prompt order, sampling and learner.
    seed: int = 0
    # Bad dataset rows: "raise" stops with the file, row and field; "skip" drops and counts them.
    on_error: Literal["raise", "skip"] = "raise"

    def validate(self) -> None:
        super().validate()
        check(self.steps >= 1, "steps", f"must be >= 1 (got {self.steps})")
        check(self.groups_per_step >= 1, "groups_per_step", "must be >= 1")
        check(self.groups_per_request >= 1, "groups_per_request", "must be >= 1")
        check(self.max_staleness >= 0, "max_staleness", f"must be >= 0 ({self.max_staleness})")
        check(self.sync_every >= 1, "sync_every", f"must be >= 1 (got {self.sync_every})")
        check(
            self.sync_every <= self.max_staleness + 1,
            "sync_every",
            f"must be <= max_staleness + 1 = {self.max_staleness + 1}: workers holding older"
            " weights would only produce groups too stale to train",
        )
        names = [spec.name for spec in self.rewards]
        check(
            len(set(names)) == len(names),
            "rewards",
            f"lists a reward more than once ({', '.join(names)}); list each reward once",
        )
        check(
            self.sampling.samples >= 2,
            "sampling.samples",
            f"group-relative advantages need >= 2 completions per prompt "
            f"(got {self.sampling.samples})",
        )
        check(
            self.sampling.temperature == 1.0,
            "sampling.temperature",
            f"must be 1.0 in this version (got {self.sampling.temperature}): the learner scores"
            " tokens at temperature 1 and vLLM reports untempered logprobs, so another"
            " temperature would bias the importance weights",
        )
        check(
            self.placement.worker_gpus < 1
            or self.placement.worker_gpus == self.engine.tensor_parallel_size,
            "placement.worker_gpus",
            f"must equal engine.tensor_parallel_size ({self.engine.tensor_parallel_size}): each"
            f" worker's engine runs on the GPUs it reserves (got {self.placement.worker_gpus:g})",
        )
        check(self.eval_every >= 0, "eval_every", f"must be >= 0 (got {self.eval_every})")
        check(self.save_every >= 1, "save_every", f"must be >= 1 (got {self.save_every})")
        check(self.worker_timeout_s > 0, "worker_timeout_s", "must be > 0")
        check(self.max_worker_restarts >= 0, "max_worker_restarts", "must be >= 0")


def run(config: Config) -> dict:
    """Trains `config.model` with online RL; returns the result (also `result.json`)."""
    out = Path(config.runs_dir) / config.name
    # Inputs are checked before anything is written or any actor starts.
    policy = check_checkpoint(config.model, "model", config.engine.max_model_len, vision=True)
    vision = is_vision_language(policy)
    check_reward_checkpoints(config.rewards, "rewards")
    if config.learner.router_aux_loss_coef and not has_experts(policy):
        log.info(
            "%s (model_type %s) has no experts: learner.router_aux_loss_coef and the MoE "
            "metrics do not apply",
            config.model,
            policy.model_type,
        )
    if config.placement.cluster is not None:
        _, problem = placement_plan(config, policy, f"config.json in {config.model}")
        if problem is not None:
            raise ConfigError(f"key 'placement.cluster': {problem}")
    evaluate.check_heldout(config.heldout, config.eval, vision)
    refuse_changed_rerun(out, config)
    dataset, data_report = load_dataset_file(
        config.data,
        "rl",
        config.on_error,
        images=vision,
        max_images=config.engine.max_images_per_prompt,
    )
    check_option_columns(config.rewards, dataset.column_names, "rewards", config.data)
    if not isinstance(dataset[0]["prompt"], list):
        raise DataError(
            "is plain text; the RL stage needs conversational prompts (lists of "
            '{"role", "content"} messages), which the rollout workers render with the chat '
            "template",
            file=config.data,
            row=0,
            field="prompt",
        )

    def train(run_dir: Run) -> dict:
        rows = [dict(row) for row in dataset]
        # The images stay beside the rows: the pool's rows are plain data (fingerprinted and
        # checkpointed); the controller sends each prompt's images with it.
        images = rows_images(rows, config.data) if vision else None
        for row in rows:
            row.pop(IMAGES_COLUMN, None)
        return Controller(config, run_dir, rows, data_report, RayFleet, images).train()

    # Training (resumed from the newest checkpoint), then held-out evaluation scored with the
    # stage's own rewards too, unless eval.rewards names others (pipelines/frame.py).
    settings = replace(config.eval, rewards=config.eval.rewards or config.rewards)
    return frame.run_stage(config, train, settings)
