"""Stage `rl`: asynchronous online RL, a single controller driving Ray actors.

The controller (this module) owns the prompt pool and the rollout buffer and drives:
- rollout workers (`align.rollout.RolloutWorker`), each a vLLM engine that samples a group of
  completions per prompt, scores them with the rewards and tags them with its policy version;
- one learner (`align.learner.Learner`) that takes a batch of groups, updates the MoE policy and
  publishes the new weights, which every worker loads before its next request.

Asynchronous mode (`max_staleness` >= 1): workers keep generating while the learner trains, so a
group may be sampled by weights up to `max_staleness` versions older than the learner's; older
groups are dropped (counted, their prompts go back to the pool) and the rest are corrected with
importance weights (`loss.correction`). Synchronous mode is the same code with `max_staleness:
0`: no request is sent while the learner trains.

One step of the loop: keep idle workers busy (within the staleness bound) -> wait for whichever
actor finishes first -> a finished request puts its groups in the buffer (zero-advantage groups
dropped: dynamic sampling) -> a finished learner step publishes weights to the workers, logs,
checkpoints -> when the learner is idle and a batch is ready, start the next step. Every
`pool.rescore_every` steps the pool is re-scored with the current policy (pass@k on the workers)
and re-filtered to its difficulty band.

Output under runs/<name>/: `model/` (final checkpoint, vLLM loads it), `checkpoints/step-N/`
(resumable: learner weights and optimiser, buffer, pool, counters), `snapshots/step-N/`
(weights at the held-out evaluation points, `eval_every`), `curve.json` (held-out accuracy over
steps and training wall time), `trained.jsonl` (the prompts and policy versions of every
step's batch), `eval/`, `metrics.jsonl`, `tb/`, `log.txt`, `config.yaml`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from align import engine
from align.config import check
from align.data import DataError, load_dataset_file
from align.learner import Learner, LearnerSettings
from align.losses.policy import PolicyLossSettings
from align.modeling import check_checkpoint
from align.prompt_pool import PoolSettings, PromptPool
from align.rewarding import RewardSpec
from align.rollout import RolloutBuffer, RolloutWorker, SamplingSettings
from align.runs import NonFiniteError, Run, RunStopped, write_json_atomic
from align.training import finished_result
from pipelines import evaluate

log = logging.getLogger(__name__)

# With dynamic sampling, the run stops after this many batches' worth of groups in a row had
# constant rewards: the policy solves every prompt or none, and waiting will not change that.
CONSTANT_GROUPS_LIMIT = 10


@dataclass
class Placement:
    """Where the actors run (Ray resources). Colocated: give workers and learner fractions of
    the same GPU (e.g. 0.5 each); separate: whole GPUs each."""

    # Rollout workers, each one vLLM engine.
    workers: int = 1
    # CPUs and GPUs reserved per rollout worker.
    worker_cpus: float = 1.0
    worker_gpus: float = 0.0
    # CPUs and GPUs reserved for the learner.
    learner_cpus: float = 1.0
    learner_gpus: float = 0.0
    # Address of a running Ray cluster to join (e.g. "auto" or "ray://head:10001"); null starts
    # a local Ray with the resources of this machine.
    ray_address: str | None = None

    def validate(self) -> None:
        check(self.workers >= 1, "workers", f"must be >= 1 (got {self.workers})")
        for key in ("worker_cpus", "worker_gpus", "learner_cpus", "learner_gpus"):
            check(getattr(self, key) >= 0, key, f"must be >= 0 (got {getattr(self, key)})")


@dataclass
class Config:
    """Settings of `align rl`."""

    # Checkpoint of the policy to train (Hugging Face format, safetensors), e.g. an SFT result.
    model: str
    # Training prompts (RL schema: prompt, answer; task and level columns are used if present).
    data: str
    # Held-out rows to evaluate on before and after training; null skips evaluation.
    heldout: str | None = None
    # Run name: everything is written under <runs_dir>/<name>/.
    name: str = "rl"
    # Root directory of runs.
    runs_dir: str = "runs"
    # Learner steps (policy updates) to run.
    steps: int = 40
    # Prompt groups per learner step (the batch is groups_per_step x sampling.group_size). On
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
    engine: engine.EngineConfig = field(default_factory=engine.EngineConfig)
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
            self.sampling.group_size >= 2,
            "sampling.group_size",
            f"group-relative advantages need >= 2 completions per prompt "
            f"(got {self.sampling.group_size})",
        )
        check(
            self.sampling.temperature == 1.0,
            "sampling.temperature",
            f"must be 1.0 in this version (got {self.sampling.temperature}): the learner scores"
            " tokens at temperature 1 and vLLM reports untempered logprobs, so another"
            " temperature would bias the importance weights",
        )
        check(self.eval_every >= 0, "eval_every", f"must be >= 0 (got {self.eval_every})")
        check(self.save_every >= 1, "save_every", f"must be >= 1 (got {self.save_every})")
        check(self.worker_timeout_s > 0, "worker_timeout_s", "must be > 0")
        check(self.max_worker_restarts >= 0, "max_worker_restarts", "must be >= 0")


@dataclass
class Request:
    """A rollout request in flight."""

    worker: int
    prompt_ids: list[int]
    sent: float


class WorkerFailure(RunStopped):
    """Rollout workers failed or hung more often than `max_worker_restarts` allows."""


def run(config: Config) -> dict:
    """Trains `config.model` with online RL; returns the result (also `result.json`)."""
    out = Path(config.runs_dir) / config.name
    # Inputs are checked before anything is written or any actor starts.
    check_checkpoint(config.model, "model")
    evaluate.check_heldout(config.heldout)
    dataset, data_report = load_dataset_file(config.data, "rl", config.on_error)
    if not isinstance(dataset[0]["prompt"], list):
        raise DataError(
            "is plain text; the RL stage needs conversational prompts (lists of "
            '{"role", "content"} messages), which the rollout workers render with the chat '
            "template",
            file=config.data,
            row=0,
            field="prompt",
        )
    with Run(out, config) as run_dir:
        model_dir = out / "model"
        result = finished_result(model_dir)
        if result is None:
            rows = [dict(row) for row in dataset]
            result = Controller(config, run_dir, rows, data_report).train()
        if config.heldout is not None:
            result["eval"] = evaluate.evaluate_checkpoint(
                config.eval, str(model_dir), config.heldout, f"{config.name}/eval", config.runs_dir
            )
        run_dir.write_json("result.json", result)
    return result


class Controller:
    """The single controller of one RL run: owns the pool and buffer, drives the actors."""

    def __init__(self, config: Config, run_dir: Run, rows: list[dict], data_report: dict) -> None:
        self.config, self.run_dir = config, run_dir
        self.out = run_dir.dir
        self.rows, self.data_report = rows, data_report
        self.pool = PromptPool(self.rows, config.pool, config.seed)
        self.buffer = RolloutBuffer(config.max_staleness, config.dynamic_sampling)
        # Counters saved in checkpoints: learner steps, requests sent (request seeds), worker
        # restarts, training wall time so far (resumed runs add to it), samples trained.
        self.step = 0
        self.requests_sent = 0
        self.restarts = 0
        self.version = 0
        self.train_seconds = 0.0
        self.samples_trained = 0
        # Rewards of every completion sampled since the last step, dropped groups included:
        # what the policy scores now (the trained batch is biased by dynamic sampling).
        self.sampled_rewards: list[float] = []
        # Groups dropped as constant since the last one with a learning signal.
        self.constant_in_a_row = 0
        # Weight loads sent to workers and not yet finished, with the version each reads.
        self.pending_loads: list = []
        # Weights published to the workers live in RAM-backed storage when there is some.
        shm = Path("/dev/shm")
        self.publish_root = Path(
            tempfile.mkdtemp(prefix="align-weights-", dir=shm if shm.is_dir() else None)
        )

    # ---------------------------------------------------------------- setup and teardown
    def _start_actors(self) -> None:
        import ray

        if not ray.is_initialized():
            if self.config.placement.ray_address:
                ray.init(address=self.config.placement.ray_address, log_to_driver=False)
            else:
                ray.init(include_dashboard=False, log_to_driver=False)
        placement = self.config.placement
        self.learner = (
            ray.remote(Learner)
            .options(**actor_options(placement.learner_cpus, placement.learner_gpus))
            .remote(
                self.config.model,
                self.config.learner,
                self.config.loss,
                self.config.sampling.max_new_tokens,
                self.config.seed,
            )
        )
        self.workers = [self._start_worker(i) for i in range(placement.workers)]
        # The version each worker holds (updated when a sync is sent: actor calls run in order).
        self.worker_version = [0] * placement.workers
        # Engines take a while to start; the loop's timings begin once every actor is up.
        ray.get([actor.__ray_ready__.remote() for actor in [self.learner, *self.workers]])

    def _start_worker(self, index: int):
        import ray

        placement = self.config.placement
        return (
            ray.remote(RolloutWorker)
            .options(
                # vLLM reads its logging level when the engine starts in the actor.
                **actor_options(
                    placement.worker_cpus, placement.worker_gpus, VLLM_LOGGING_LEVEL="WARNING"
                )
            )
            .remote(
                self.config.model,
                self.config.engine,
                self.config.rewards,
                self.config.sampling,
                index,
            )
        )

    def _shutdown(self) -> None:
        import ray

        for actor in [*getattr(self, "workers", []), getattr(self, "learner", None)]:
            if actor is not None:
                ray.kill(actor)
        shutil.rmtree(self.publish_root, ignore_errors=True)

    # ---------------------------------------------------------------- the loop
    def train(self) -> dict:
        started = time.perf_counter()
        self._start_actors()
        try:
            resumed = self._resume()
            if resumed:
                self._publish(wait=True)
            else:
                if self.config.eval_every:
                    self._snapshot(initial=True)
                if self.config.pool.rescore_every:
                    # Filtering the pool is part of the method: it counts as training time.
                    rescore_started = time.perf_counter()
                    self._rescore()
                    self.train_seconds += time.perf_counter() - rescore_started
            self._loop()
            self._publish(wait=True)
            self._save_checkpoint()
            result = self._finish(time.perf_counter() - started)
        finally:
            self._shutdown()
        return result

    def _loop(self) -> None:
        import ray

        config = self.config
        inflight: dict = {}  # ObjectRef -> Request
        train_ref, train_batch = None, []
        progress = tqdm(total=config.steps, initial=self.step, desc="rl", unit="step")
        loop_started = time.perf_counter()
        seconds_before = self.train_seconds
        step_started = time.perf_counter()
        while self.step < config.steps:
            # 1. Keep idle workers busy, within the staleness bound.
            busy = {r.worker for r in inflight.values()}
            for w in range(len(self.workers)):
                size = 0 if w in busy else self._request_size(w, inflight, train_ref is not None)
                if size:
                    ref, request = self._send(w, size)
                    inflight[ref] = request

            # 2. Start a learner step when it is idle and a full batch is buffered.
            if train_ref is None:
                for stale in self.buffer.drop_stale(self.version):
                    self.pool.give_back([stale.prompt_id])
                if len(self.buffer) >= config.groups_per_step:
                    train_batch = self.buffer.take(config.groups_per_step)
                    train_ref = self.learner.train_step.remote(train_batch)

            # 3. Wait for whichever actor finishes first.
            waiting = list(inflight) + ([train_ref] if train_ref is not None else [])
            if not waiting:
                raise RuntimeError("the RL loop has nothing in flight; this is a bug")
            ready, _ = ray.wait(waiting, num_returns=1, timeout=self._wait_timeout(inflight))
            if not ready:
                self._replace_hung(inflight)
                continue
            ref = ready[0]

            if ref is train_ref:
                # 4a. A learner step finished: publish weights, log, checkpoint.
                try:
                    metrics = ray.get(train_ref)
                except NonFiniteError as error:
                    # The learner skipped this step too (weights unchanged) and counted it.
                    self.step += 1
                    self.version += 1
                    self._record_batch(train_batch)
                    self._save_checkpoint(inflight)
                    raise NonFiniteError(
                        f"{error.cause} at step "
                        f"{self.step}; the run stopped with a checkpoint in "
                        f"{self.out / 'checkpoints'}. Lower learner.learning_rate or check "
                        "the rewards, then run the same command again to resume."
                    ) from None
                train_ref = None
                self.step += 1
                self.version += 1
                self.samples_trained += int(metrics["train/sequences"])
                if self.step % config.sync_every == 0:
                    metrics.update(self._publish(wait=False))
                now = time.perf_counter()
                self.train_seconds = seconds_before + (now - loop_started)
                metrics.update(self._step_metrics(train_batch, now - step_started))
                self._record_batch(train_batch)
                step_started = now
                self.run_dir.log_metrics(self.step, metrics)
                progress.update(1)
                progress.set_postfix(
                    reward=f"{metrics.get('reward/sampled_mean', float('nan')):.3f}",
                    step_s=f"{metrics['time/step']:.2f}",
                    stale=f"{metrics['async/staleness_mean']:.2f}",
                )
                if config.eval_every and self.step % config.eval_every == 0:
                    self._snapshot()
                if self.step % config.save_every == 0 and self.step < config.steps:
                    self._save_checkpoint(inflight)
                if (
                    config.pool.rescore_every
                    and self.step % config.pool.rescore_every == 0
                    and self.step < config.steps
                ):
                    self._rescore()
            else:
                # 4b. A rollout request finished: buffer its groups.
                request = inflight.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as error:
                    self._replace_worker(request, f"failed: {error}", inflight)
                    continue
                for rollout in result.rollouts:
                    scored = rollout.scored_rewards
                    self.pool.record(rollout.prompt_id, scored, [r >= 0.5 for r in scored])
                    self.sampled_rewards.extend(scored)
                dropped = self.buffer.add(result.rollouts)
                self._check_signal(len(result.rollouts) - len(dropped), len(dropped))
                self.run_dir.log_metrics(self.step, result.metrics)
        progress.close()
        # Requests still in flight are not trained; their prompts stay in the pool.
        for request in inflight.values():
            self.pool.give_back(request.prompt_ids)

    def _check_signal(self, kept: int, dropped: int) -> None:
        """Stops a run whose groups have had constant rewards for too long (no learning signal)."""
        self.constant_in_a_row = 0 if kept else self.constant_in_a_row + dropped
        limit = CONSTANT_GROUPS_LIMIT * self.config.groups_per_step
        if self.constant_in_a_row >= limit:
            raise RuntimeError(
                f"the last {self.constant_in_a_row} groups all had constant rewards (every"
                " completion right, or every one wrong): nothing to learn from. The policy finds"
                " these prompts too easy or too hard; choose other data or a different starting"
                " checkpoint, or set dynamic_sampling: false to train on them anyway."
            )

    def _request_size(self, worker: int, inflight: dict, training: bool) -> int:
        """How many prompts `worker` may be sent now (0: none) without over-generating.

        AReaL's staleness rule: groups sampled by weights of version v may number at most
        (v + max_staleness + 1) batches in all, counting every group admitted to the buffer
        so far (trained, in training or waiting) and every prompt in flight. Batches are taken
        oldest first, so every group is then trained by the learner at most max_staleness
        versions after v, and none is generated only to be dropped as stale.
        """
        config = self.config
        limit = (self.worker_version[worker] + config.max_staleness + 1) * config.groups_per_step
        admitted = (self.step + training) * config.groups_per_step + len(self.buffer)
        in_flight = sum(len(r.prompt_ids) for r in inflight.values())
        return max(0, min(config.groups_per_request, limit - admitted - in_flight))

    def _send(self, worker: int, size: int):
        prompts = self.pool.take(size)
        seed = self.config.seed * 1_000_003 + self.requests_sent
        self.requests_sent += 1
        payload = [{"id": p.id, "prompt": p.prompt, "row": p.row} for p in prompts]
        ref = self.workers[worker].generate.remote(payload, seed)
        return ref, Request(worker, [p.id for p in prompts], time.perf_counter())

    def _wait_timeout(self, inflight: dict) -> float | None:
        if not inflight:
            return None
        oldest = min(r.sent for r in inflight.values())
        return max(0.1, oldest + self.config.worker_timeout_s - time.perf_counter())

    # ---------------------------------------------------------------- faults
    def _replace_hung(self, inflight: dict) -> None:
        now = time.perf_counter()
        for ref, request in list(inflight.items()):
            if now - request.sent >= self.config.worker_timeout_s:
                del inflight[ref]
                self._replace_worker(
                    request, f"hung: no answer in {self.config.worker_timeout_s:.0f} s", inflight
                )

    def _replace_worker(self, request: Request, why: str, inflight: dict) -> None:
        """Gives the request's prompts back to the pool and starts a fresh worker in its place.

        `inflight` holds the other workers' requests: a run stopped here checkpoints their
        prompts as in flight, so a resumed run samples them again.
        """
        import ray

        self.pool.give_back(request.prompt_ids)
        self.restarts += 1
        log.warning(
            "rollout worker %d %s; replacing it (%d of %d restarts)",
            request.worker,
            why,
            self.restarts,
            self.config.max_worker_restarts,
        )
        if self.restarts > self.config.max_worker_restarts:
            self._save_checkpoint(inflight)
            raise WorkerFailure(
                f"rollout workers failed {self.restarts} times (max_worker_restarts="
                f"{self.config.max_worker_restarts}); last: worker {request.worker} {why}. "
                f"The run was checkpointed: run the same command again to resume."
            )
        ray.kill(self.workers[request.worker])
        self.workers[request.worker] = self._start_worker(request.worker)
        # Wait for its engine: the clock of the worker's first request starts when it is up,
        # or a slow engine start would count as a hang.
        try:
            ready = self.workers[request.worker].__ray_ready__.remote()
            ray.get(ready, timeout=self.config.worker_timeout_s)
        except ray.exceptions.RayError as error:
            self._save_checkpoint(inflight)
            raise WorkerFailure(
                f"the replacement of rollout worker {request.worker} did not start: {error}. "
                "The run was checkpointed: run the same command again to resume."
            ) from None
        self.worker_version[request.worker] = 0
        if self.version > 0:
            directory = self._latest_published()
            self.workers[request.worker].sync.remote(str(directory), self.version)
            self.worker_version[request.worker] = self.version

    # ---------------------------------------------------------------- weights
    def _latest_published(self) -> Path:
        return self.publish_root / f"v{self.version}"

    def _publish(self, wait: bool) -> dict[str, float]:
        """The learner writes its weights; every worker loads them before its next request."""
        import ray

        directory = self._latest_published()
        export_s = ray.get(self.learner.publish.remote(str(directory)))
        loads = [w.sync.remote(str(directory), self.version) for w in self.workers]
        self.worker_version = [self.version] * len(self.workers)
        self.pending_loads += [(ref, self.version) for ref in loads]
        if wait:
            ray.wait(loads, num_returns=len(loads))
        done, _ = ray.wait(
            [ref for ref, _ in self.pending_loads], num_returns=len(self.pending_loads), timeout=0
        )
        seconds = []
        for ref in done:
            try:
                seconds.append(ray.get(ref))
            except ray.exceptions.RayError:
                pass  # the worker died; its replacement loads the newest weights
        finished = set(done)
        self.pending_loads = [(ref, v) for ref, v in self.pending_loads if ref not in finished]
        metrics = {"sync/export_seconds": export_s}
        if seconds:
            metrics["sync/load_seconds"] = max(seconds)
        # Versions that no pending load reads any more are deleted.
        oldest_read = min([v for _, v in self.pending_loads] + [self.version])
        for link in self.publish_root.glob("v*"):
            if int(link.name[1:]) < oldest_read:
                target = link.resolve()
                link.unlink()
                shutil.rmtree(target, ignore_errors=True)
        return metrics

    # ---------------------------------------------------------------- pool
    def _rescore(self) -> None:
        """Re-scores every pool prompt with the current policy and re-filters the pool."""
        import ray

        started = time.perf_counter()
        prompts = [
            {"id": i, "prompt": row["prompt"], "row": row} for i, row in enumerate(self.rows)
        ]
        chunks = [prompts[w :: len(self.workers)] for w in range(len(self.workers))]
        refs = [
            worker.pass_rates.remote(chunk, self.config.pool.rescore_samples, self.config.seed)
            for worker, chunk in zip(self.workers, chunks, strict=True)
        ]
        rates: dict[int, float | None] = {}
        for chunk, values in zip(chunks, ray.get(refs), strict=True):
            rates.update({p["id"]: v for p, v in zip(chunk, values, strict=True)})
        metrics = self.pool.rescore(rates, self.step)
        metrics["time/rescore"] = time.perf_counter() - started
        self.run_dir.log_metrics(self.step, metrics)
        log.info(
            "pool re-scored at step %d in %.1f s: %d of %d prompts in band [%.2f, %.2f]",
            self.step,
            metrics["time/rescore"],
            metrics["pool/active"],
            metrics["pool/total"],
            *self.pool.band(),
        )

    # ---------------------------------------------------------------- metrics
    def _step_metrics(self, batch: list, step_seconds: float) -> dict[str, float]:
        staleness = [self.version - 1 - g.version for g in batch]
        metrics = {}
        if self.sampled_rewards:
            metrics["reward/sampled_mean"] = sum(self.sampled_rewards) / len(self.sampled_rewards)
            self.sampled_rewards = []
        metrics |= {
            "time/step": step_seconds,
            "time/train_wall": self.train_seconds,
            "async/staleness_mean": sum(staleness) / len(staleness),
            "async/staleness_max": float(max(staleness)),
            "async/buffered_groups": float(len(self.buffer)),
            "throughput/samples_per_s": self.samples_trained / max(self.train_seconds, 1e-9),
            "dynamic/dropped_constant": float(self.buffer.counts["dropped_constant"]),
            "dynamic/dropped_stale": float(self.buffer.counts["dropped_stale"]),
            "faults/worker_restarts": float(self.restarts),
            **self.pool.metrics(),
        }
        by_task: dict[str, list[float]] = {}
        for group in batch:
            by_task.setdefault(group.task, []).extend(group.scored_rewards)
        for task, values in by_task.items():
            metrics[f"reward/task/{task}"] = sum(values) / len(values)
        return metrics

    def _record_batch(self, batch: list) -> None:
        """Appends the step's prompts and their versions to trained.jsonl (the data audit)."""
        line = {
            "step": self.step,
            "prompts": [g.prompt_id for g in batch],
            "versions": [g.version for g in batch],
        }
        with open(self.out / "trained.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    # ---------------------------------------------------------------- checkpoints
    def _snapshot(self, initial: bool = False) -> None:
        """Keeps the current weights for the held-out curve, evaluated after training."""
        import ray

        directory = self.out / "snapshots" / f"step-{self.step}"
        shutil.rmtree(directory, ignore_errors=True)
        if initial:
            directory.mkdir(parents=True)
        else:
            ray.get(self.learner.publish.remote(str(directory)))
        write_json_atomic(
            directory / "snapshot.json",
            {
                "step": self.step,
                "train_seconds": self.train_seconds,
                "samples": self.samples_trained,
                # Step 0 is the starting checkpoint itself.
                "weights": self.config.model if initial else str(directory),
            },
        )

    def _save_checkpoint(self, inflight: dict | None = None) -> None:
        """Writes the whole loop state; a save cut half-way leaves the previous one usable."""
        import ray

        root = self.out / "checkpoints"
        final = root / f"step-{self.step}"
        if final.exists():
            return
        partial = root / f"step-{self.step}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        ray.get(self.learner.save.remote(str(partial / "learner")))
        state = {
            "step": self.step,
            "version": self.version,
            "requests_sent": self.requests_sent,
            "restarts": self.restarts,
            "train_seconds": self.train_seconds,
            "samples_trained": self.samples_trained,
            "buffer": self.buffer.state_dict(),
            "pool": self.pool.state_dict(),
            # Prompts of requests in flight: taken again first after a resume.
            "in_flight": [i for r in (inflight or {}).values() for i in r.prompt_ids],
        }
        (partial / "state.json").write_text(json.dumps(state), encoding="utf-8")
        os.replace(partial, final)
        for old in sorted(root.glob("step-*"), key=_step_of)[:-2]:
            if not old.name.endswith(".partial"):
                shutil.rmtree(old)
        log.info("checkpoint written: %s", final)

    def _resume(self) -> bool:
        """Restores the newest complete checkpoint, if any; returns whether one was found."""
        import ray

        root = self.out / "checkpoints"
        found = sorted(
            (p for p in root.glob("step-*") if not p.name.endswith(".partial")), key=_step_of
        )
        if not found:
            return False
        latest = found[-1]
        state = json.loads((latest / "state.json").read_text(encoding="utf-8"))
        self.version = ray.get(self.learner.load.remote(str(latest / "learner")))
        self.step = state["step"]
        self.requests_sent = state["requests_sent"]
        self.restarts = state["restarts"]
        self.train_seconds = state["train_seconds"]
        self.samples_trained = state["samples_trained"]
        self.buffer.load_state_dict(state["buffer"])
        self.pool.load_state_dict(state["pool"])
        self.pool.give_back(state["in_flight"])
        # Steps after the checkpoint were not kept: they leave the data audit too.
        audit = self.out / "trained.jsonl"
        if audit.exists():
            kept = [
                line
                for line in audit.read_text(encoding="utf-8").splitlines()
                if json.loads(line)["step"] <= self.step
            ]
            audit.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        log.info("resuming from %s (step %d)", latest, self.step)
        return True

    # ---------------------------------------------------------------- the result
    def _finish(self, wall_seconds: float) -> dict:
        from transformers import AutoTokenizer

        model_dir = self.out / "model"
        tmp = model_dir.with_name("model.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(self._latest_published(), tmp)
        AutoTokenizer.from_pretrained(self.config.model).save_pretrained(str(tmp))
        shutil.rmtree(model_dir, ignore_errors=True)
        os.replace(tmp, model_dir)
        curve = self._evaluate_snapshots()
        result = {
            "model": str(model_dir),
            "steps": self.step,
            "samples_trained": self.samples_trained,
            "train_seconds": self.train_seconds,
            "wall_seconds": wall_seconds,
            "samples_per_second": self.samples_trained / max(self.train_seconds, 1e-9),
            "buffer": self.buffer.counts,
            "worker_restarts": self.restarts,
            "data": self.data_report,
            "curve": curve,
        }
        write_json_atomic(model_dir / "train_result.json", result)
        return result

    def _evaluate_snapshots(self) -> list[dict]:
        """Held-out accuracy of every snapshot, on worker 0 (after training: timings unaffected)."""
        import ray

        snapshots = sorted((self.out / "snapshots").glob("step-*"), key=_step_of)
        if not snapshots or self.config.heldout is None:
            return []
        heldout, _ = load_dataset_file(self.config.heldout, "rl", self.config.on_error)
        rows = [dict(r) for r in heldout]
        if self.config.eval.limit:
            rows = rows[: self.config.eval.limit]
        curve = []
        worker = self.workers[0]
        for directory in tqdm(snapshots, desc="held-out curve", unit="snapshot"):
            facts = json.loads((directory / "snapshot.json").read_text(encoding="utf-8"))
            ray.get(worker.sync.remote(facts["weights"], facts["step"]))
            report = ray.get(
                worker.evaluate.remote(
                    rows,
                    pass_k=self.config.eval.pass_k,
                    samples=self.config.eval.samples,
                    temperature=self.config.eval.temperature,
                    max_tokens=self.config.eval.max_new_tokens,
                    seed=self.config.eval.seed,
                )
            )
            curve.append(
                {
                    **facts,
                    **{k: v for k, v in report.items() if isinstance(v, int | float)},
                    "by_task": report["by_task"],
                    "by_level": report["by_level"],
                }
            )
        write_json_atomic(self.out / "curve.json", {"points": curve})
        return curve


def actor_options(cpus: float, gpus: float, **env: str) -> dict:
    """Ray options of an actor holding `cpus` CPUs and `gpus` GPUs, with `env` set in it.

    The actor gets floor(cpus) (at least 1) compute threads through OMP_NUM_THREADS in the
    environment its process starts with.

    Ray sets OMP_NUM_THREADS inside the worker only after the process has started. A driver
    that has already run an in-process vLLM engine (a pipeline's evaluation, say) has put
    torch's libgomp in LD_PRELOAD, which every actor inherits; the preloaded OpenMP reads its
    thread count at process start, sees none, and takes every core. Two actors on two cores
    then run four spinning threads, and a learner step took 5x longer. Set here, the count is
    in the environment the process starts with.
    """
    threads = str(max(1, math.floor(cpus)))
    return {
        "num_cpus": cpus,
        "num_gpus": gpus,
        "runtime_env": {"env_vars": {"OMP_NUM_THREADS": threads, **env}},
    }


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1].split(".")[0])
