"""The single controller of an RL run: owns the prompt pool and the rollout buffer, drives the fleet.

One turn of the loop:
1. keep every idle rollout worker busy with a request, as many prompts as the buffer's staleness
   rule allows for the weights the worker will hold;
2. when the learner is idle and a full batch is buffered, start a learner step;
3. wait for whatever finishes first:
   - a rollout request: its groups go to the buffer (constant ones dropped: dynamic sampling);
   - a learner step: log it; every `sync_every` steps its weights (staged on the learner's
     rank 0) are queued for every worker, which loads them after its current request, and the
     worker's version counts as the new one from then on; snapshot, checkpoint and re-score
     the pool when due;
   - a weight sync: its send and load times go into the next step's metrics.
A worker that fails or hangs (no answer in `worker_timeout_s`) is replaced and its prompts go
back to the pool; a learner rank that dies stops the run (the last checkpoint resumes it).

Asynchronous mode (`max_staleness` >= 1) overlaps generation with learning; synchronous mode
(`max_staleness: 0`) is the same code, in which the staleness rule admits no request while the
learner trains on the weights the workers hold.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from align.data import load_dataset_file
from align.rewarding import FAULT_KINDS
from align.rl.buffer import RolloutBuffer
from align.rl.fleet import Fleet, WorkerFailure
from align.rl.group import ActorFailure
from align.rl.pool import PromptPool
from align.rl.rollout import Rollout, batch_metrics
from align.rl.state import RunState
from align.runs import NonFiniteError, Run, RunStopped, write_json_atomic
from align.vision import rows_images

log = logging.getLogger(__name__)

# With dynamic sampling, the run stops after this many batches' worth of groups in a row had
# constant rewards: the policy solves every prompt or none, and waiting will not change that.
CONSTANT_GROUPS_LIMIT = 10


# The run stops after this many batches' worth of groups in a row came back with no completion
# scored: a reward fails on everything, and going on would train on nothing.
UNSCORED_GROUPS_LIMIT = 2


class RewardsFailed(RunStopped):
    """Every completion of too many groups in a row was left unscored by the rewards."""


class RolloutWorkersFailed(RunStopped):
    """Rollout workers failed or hung more often than `max_worker_restarts` allows."""


class LearnerStopped(RunStopped):
    """A learner rank died; the run stops and resumes from its last checkpoint."""


@dataclass
class Request:
    """A rollout request in flight."""

    worker: int
    prompt_ids: list[int]
    sent: float


class Controller:
    """The loop of one RL run (see the module docstring).

    Args:
        config: the stage's config (`pipelines.rl.Config`).
        run_dir: the open run directory.
        rows: the training rows (RL schema).
        data_report: what loading the data skipped, for the result.
        fleet_factory: builds the actors from the config (`RayFleet`; tests pass a fake).
        images: each row's images (vision-language models; None: text only), sent with its
            prompt to the workers and with its groups to the learner.
    """

    def __init__(
        self,
        config,
        run_dir: Run,
        rows: list[dict],
        data_report: dict,
        fleet_factory,
        images: list[list] | None = None,
    ):
        self.config, self.run_dir = config, run_dir
        self.images = images
        self.out: Path = run_dir.dir
        self.rows, self.data_report = rows, data_report
        self.fleet_factory = fleet_factory
        self.state = RunState(self.out)
        self.pool = PromptPool(rows, config.pool, config.seed)
        self.buffer = RolloutBuffer(
            config.max_staleness, config.groups_per_step, config.dynamic_sampling
        )
        # Saved in checkpoints: learner steps, requests sent (request seeds), worker restarts,
        # training wall time so far (resumed runs add to it), samples trained.
        self.step = self.requests_sent = self.restarts = self.samples_trained = 0
        self.train_seconds = 0.0
        # The learner's policy version (the learner counts; this mirrors its last answer), the
        # version staged and sent to the workers, and the version each worker will hold.
        self.version = self.synced_version = 0
        self.worker_version: list[int] = []
        # Rewards of every completion sampled since the last step, dropped groups included.
        self.sampled_rewards: list[float] = []
        # Groups dropped as constant since the last one with a learning signal, and groups
        # dropped unscored since the last one a reward scored.
        self.constant_in_a_row = 0
        self.unscored_in_a_row = 0
        # Requests and weight syncs in flight, and sync timings not logged yet.
        self.inflight: dict[concurrent.futures.Future, Request] = {}
        self.syncs: dict[concurrent.futures.Future, tuple[int, int]] = {}
        self.sync_metrics: dict[str, float] = {}
        # Replacements of each worker so far: a sync of an earlier incarnation is not its own.
        self.incarnation: list[int] = []

    # ---------------------------------------------------------------- the run
    def train(self) -> dict:
        started = time.perf_counter()
        self.fleet: Fleet = self.fleet_factory(self.config)
        self.worker_version = [0] * self.fleet.workers
        self.incarnation = [0] * self.fleet.workers
        try:
            self.placement = self.fleet.placement()
            log.info("actors placed: %s", self.placement)
            if not self._resume():
                if self.config.eval_every:
                    self._snapshot()
                if self.config.pool.rescore_every:
                    # Filtering the pool is part of the method: it counts as training time.
                    rescore_started = time.perf_counter()
                    self._rescore()
                    self.train_seconds += time.perf_counter() - rescore_started
            self._loop()
            self._save_checkpoint()
            return self._finish(time.perf_counter() - started)
        finally:
            self.fleet.shutdown()

    def _loop(self) -> None:
        config = self.config
        training: concurrent.futures.Future | None = None
        batch: list[Rollout] = []
        progress = tqdm(total=config.steps, initial=self.step, desc="rl", unit="step")
        loop_started, seconds_before = time.perf_counter(), self.train_seconds
        step_started = submitted = time.perf_counter()
        while self.step < config.steps:
            # 1. Keep idle workers busy, within the staleness rule.
            busy = {r.worker for r in self.inflight.values()}
            for worker in range(self.fleet.workers):
                if worker not in busy:
                    self._send(worker, batches_taken=self.step + (training is not None))
            # 2. Start a learner step when it is idle and a full batch is buffered.
            if training is None:
                for stale in self.buffer.drop_stale(self.version):
                    self.pool.give_back([stale.prompt_id])
                batch = self.buffer.take()
                if batch is not None:
                    if self.images is not None:
                        for group in batch:
                            group.images = self.images[group.prompt_id]
                    stage = (self.step + 1) % config.sync_every == 0
                    # Timed from before the submission: the learner may start before it returns.
                    submitted = time.perf_counter()
                    training = self.fleet.train_step(batch, stage)
            # 3. Wait for whatever finishes first.
            waiting = [*self.inflight, *self.syncs] + ([training] if training else [])
            if not waiting:
                raise RuntimeError("the RL loop has nothing in flight; this is a bug")
            done, _ = concurrent.futures.wait(
                waiting, timeout=self._hang_timeout(), return_when="FIRST_COMPLETED"
            )
            if not done:
                self._replace_hung()
                continue
            for future in done:
                if future is training:
                    training = None
                    metrics = self._learner_done(future, batch)
                    now = time.perf_counter()
                    self.train_seconds = seconds_before + (now - loop_started)
                    metrics |= self._step_metrics(batch, now - step_started)
                    # The learner's side of the step: waiting for a full batch (rollouts, and
                    # the previous step's snapshot, checkpoint or re-scoring), then the call
                    # (the learner's own time plus Ray's dispatch and the batch's transfer).
                    metrics["time/learner_wait"] = submitted - step_started
                    metrics["time/learner_call"] = now - submitted
                    step_started = now
                    self.run_dir.log_metrics(self.step, metrics)
                    progress.update(1)
                    progress.set_postfix(
                        reward=f"{metrics.get('reward/sampled_mean', float('nan')):.3f}",
                        step_s=f"{metrics['time/step']:.2f}",
                        stale=f"{metrics['async/staleness_mean']:.2f}",
                    )
                    self._after_step()
                elif future in self.inflight:
                    self._rollouts_done(future)
                elif future in self.syncs:
                    self._sync_done(future)
        progress.close()
        # Requests still in flight are not trained; their prompts stay in the pool.
        for request in self.inflight.values():
            self.pool.give_back(request.prompt_ids)
        self.inflight.clear()

    # ---------------------------------------------------------------- what finished
    def _learner_done(self, future, batch: list[Rollout]) -> dict[str, float]:
        """A learner step ended: its metrics; weights queued for the workers when staged."""
        try:
            metrics = future.result()
        except NonFiniteError as error:
            # The learner skipped this step too (weights unchanged) and counted it.
            self.step += 1
            self.version += 1
            self.state.record_batch(self.step, batch)
            self._save_checkpoint()
            raise NonFiniteError(
                f"{getattr(error, 'cause', error)} at step {self.step}; the run stopped with a "
                f"checkpoint in {self.state.checkpoints}. Lower learner.learning_rate or check "
                "the rewards, then run the same command again to resume."
            ) from None
        except ActorFailure as error:
            latest = self.state.latest()
            where = f"checkpoint {latest[0]}" if latest else "the start (no checkpoint yet)"
            raise LearnerStopped(
                f"{error}. The run stopped; run the same command again to resume from {where}."
            ) from None
        self.step += 1
        self.version = int(metrics.pop("learner/version"))
        self.samples_trained += int(metrics["train/sequences"])
        self.state.record_batch(self.step, batch)
        if "sync/gather_seconds" in metrics:
            self._sync_workers(self.version)
        return metrics | self.sync_metrics

    def _after_step(self) -> None:
        config = self.config
        self.sync_metrics = {}
        if config.eval_every and self.step % config.eval_every == 0:
            self._snapshot()
        if self.step % config.save_every == 0 and self.step < config.steps:
            self._save_checkpoint()
        if config.pool.rescore_every and self.step % config.pool.rescore_every == 0:
            if self.step < config.steps:
                self._rescore()

    def _rollouts_done(self, future) -> None:
        request = self.inflight.pop(future)
        try:
            result = future.result()
        except Exception as error:
            self._replace_worker(request, f"failed: {type(error).__name__}: {error}")
            return
        for warning in result.warnings:
            log.warning("rollout worker %d: %s", request.worker, warning)
        rollouts = [r for r in result.rollouts if r.scored_rewards]
        self.run_dir.log_metrics(
            self.step,
            {**result.metrics, "rollout/unscored_groups": len(result.rollouts) - len(rollouts)},
        )
        self._check_scored(len(rollouts), len(result.rollouts) - len(rollouts), result.metrics)
        for rollout in rollouts:
            scored = rollout.scored_rewards
            self.pool.record(rollout.prompt_id, scored, [r >= 0.5 for r in scored])
            self.sampled_rewards.extend(scored)
        dropped = self.buffer.add(rollouts)
        self._check_signal(len(rollouts) - len(dropped), len(dropped))

    def _sync_done(self, future) -> None:
        worker, incarnation = self.syncs.pop(future)
        try:
            timings = future.result()
        except Exception as error:
            if incarnation == self.incarnation[worker]:
                self._replace_worker(
                    Request(worker, [], time.perf_counter()), f"failed a weight sync: {error}"
                )
            return
        for key, value in timings.items():
            self.sync_metrics[key] = max(self.sync_metrics.get(key, 0.0), value)

    # ---------------------------------------------------------------- workers
    def _send(self, worker: int, batches_taken: int) -> None:
        """Sends `worker` as many prompts as the staleness rule allows (maybe none)."""
        in_flight = sum(len(r.prompt_ids) for r in self.inflight.values())
        size = min(
            self.config.groups_per_request,
            self.buffer.capacity(self.worker_version[worker], batches_taken, in_flight),
        )
        if size == 0:
            return
        prompts = self.pool.take(size)
        seed = self.config.seed * 1_000_003 + self.requests_sent
        self.requests_sent += 1
        payload = self._requests([(p.id, p.prompt, p.row) for p in prompts])
        future = self.fleet.generate(worker, payload, seed)
        self.inflight[future] = Request(worker, [p.id for p in prompts], time.perf_counter())

    def _requests(self, prompts: list[tuple[int, list[dict], dict]]) -> list[dict]:
        """What a worker gets per prompt: its pool index, messages, row and any images."""
        requests = [{"id": i, "prompt": prompt, "row": row} for i, prompt, row in prompts]
        if self.images is not None:
            for request in requests:
                request["images"] = self.images[request["id"]]
        return requests

    def _sync_workers(self, version: int) -> None:
        """Queues staged `version` for every worker (after the calls already queued on it)."""
        for worker in range(self.fleet.workers):
            self.syncs[self.fleet.sync(worker, version)] = (worker, self.incarnation[worker])
            self.worker_version[worker] = version
        self.synced_version = version

    def _hang_timeout(self) -> float | None:
        if not self.inflight:
            return None
        oldest = min(r.sent for r in self.inflight.values())
        return max(0.0, oldest + self.config.worker_timeout_s - time.perf_counter())

    def _replace_hung(self) -> None:
        now = time.perf_counter()
        for future, request in list(self.inflight.items()):
            if now - request.sent >= self.config.worker_timeout_s:
                del self.inflight[future]
                why = f"hung: no answer in {self.config.worker_timeout_s:g} s"
                self._replace_worker(request, why)

    def _replace_worker(self, request: Request, why: str) -> None:
        """Gives the request's prompts back and starts a fresh worker in its place.

        A run stopped here checkpoints the other requests' prompts as in flight, so a resumed
        run samples them again.
        """
        self.pool.give_back(request.prompt_ids)
        worker = request.worker
        self.restarts += 1
        log.warning(
            "rollout worker %d %s; replacing it (%d of %d restarts)",
            worker,
            why,
            self.restarts,
            self.config.max_worker_restarts,
        )
        if self.restarts > self.config.max_worker_restarts:
            self._save_checkpoint()
            raise RolloutWorkersFailed(
                f"rollout workers failed {self.restarts} times (max_worker_restarts="
                f"{self.config.max_worker_restarts}); last: worker {worker} {why}. "
                "The run was checkpointed: run the same command again to resume."
            )
        # Its other requests die with it.
        for future, other in list(self.inflight.items()):
            if other.worker == worker:
                del self.inflight[future]
                self.pool.give_back(other.prompt_ids)
        self.incarnation[worker] += 1
        try:
            self.fleet.replace_worker(worker, self.synced_version)
        except (WorkerFailure, concurrent.futures.TimeoutError, ActorFailure) as error:
            self._save_checkpoint()
            raise RolloutWorkersFailed(
                f"the replacement of rollout worker {worker} did not start: {error}. "
                "The run was checkpointed: run the same command again to resume."
            ) from None
        self.worker_version[worker] = self.synced_version

    def _check_scored(self, scored: int, unscored: int, metrics: dict[str, float]) -> None:
        """Counts the groups no reward scored (the caller drops them); stops the run with a
        checkpoint, naming the failing rewards, when no group has been scored for
        UNSCORED_GROUPS_LIMIT batches' worth of groups."""
        self.unscored_in_a_row = 0 if scored else self.unscored_in_a_row + unscored
        if self.unscored_in_a_row < UNSCORED_GROUPS_LIMIT * self.config.groups_per_step:
            return
        faults = sorted(
            key
            for key, count in metrics.items()
            if count and key.startswith("reward/") and key.rsplit("/", 1)[-1] in FAULT_KINDS
        )
        self._save_checkpoint()
        raise RewardsFailed(
            f"the last {self.unscored_in_a_row} groups had no completion scored by any reward "
            f"(faults in the last batch: {', '.join(faults) or 'none counted'}); the rollout "
            "workers' warnings above say why. Fix the reward and run the same command again "
            "to resume from the checkpoint."
        )

    def _check_signal(self, kept: int, dropped: int) -> None:
        """Stops a run whose groups have had constant rewards for too long (no learning signal)."""
        self.constant_in_a_row = 0 if kept else self.constant_in_a_row + dropped
        if self.constant_in_a_row >= CONSTANT_GROUPS_LIMIT * self.config.groups_per_step:
            raise RuntimeError(
                f"the last {self.constant_in_a_row} groups all had constant rewards (every"
                " completion right, or every one wrong): nothing to learn from. The policy finds"
                " these prompts too easy or too hard; choose other data or a different starting"
                " checkpoint, or set dynamic_sampling: false to train on them anyway."
            )

    # ---------------------------------------------------------------- pool
    def _rescore(self) -> None:
        """Re-scores every pool prompt with the current policy and re-filters the pool."""
        started = time.perf_counter()
        prompts = self._requests([(i, r["prompt"], r) for i, r in enumerate(self.rows)])
        workers = self.fleet.workers
        chunks = [prompts[w::workers] for w in range(workers)]
        samples, seed = self.config.pool.rescore_samples, self.config.seed
        futures = [self.fleet.pass_rates(w, chunks[w], samples, seed) for w in range(workers)]
        rates: dict[int, float | None] = {}
        for chunk, future in zip(chunks, futures, strict=True):
            rates.update({p["id"]: v for p, v in zip(chunk, future.result(), strict=True)})
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
    def _step_metrics(self, batch: list[Rollout], step_seconds: float) -> dict[str, float]:
        metrics = {}
        if self.sampled_rewards:
            metrics["reward/sampled_mean"] = sum(self.sampled_rewards) / len(self.sampled_rewards)
            self.sampled_rewards = []
        return {
            **metrics,
            "time/step": step_seconds,
            "time/train_wall": self.train_seconds,
            "throughput/samples_per_s": self.samples_trained / max(self.train_seconds, 1e-9),
            "faults/worker_restarts": float(self.restarts),
            **batch_metrics(batch, self.version),
            **self.buffer.metrics(),
            **self.pool.metrics(),
        }

    # ---------------------------------------------------------------- checkpoints
    def _snapshot(self) -> None:
        facts = {"train_seconds": self.train_seconds, "samples": self.samples_trained}
        export = self.fleet.export if self.step > 0 else None
        self.state.snapshot(self.step, facts, export, self.config.model)

    def _save_checkpoint(self) -> None:
        loop = {
            "step": self.step,
            "requests_sent": self.requests_sent,
            "restarts": self.restarts,
            "train_seconds": self.train_seconds,
            "samples_trained": self.samples_trained,
            "buffer": self.buffer.state_dict(),
            "pool": self.pool.state_dict(),
            # Prompts of requests in flight: taken again first after a resume.
            "in_flight": [i for r in self.inflight.values() for i in r.prompt_ids],
        }
        self.state.save(self.step, loop, self.fleet.save)

    def _resume(self) -> bool:
        """Restores the newest complete checkpoint, if any; returns whether one was found."""
        found = self.state.latest()
        if found is None:
            return False
        path, loop = found
        self.version = self.fleet.load(str(path / "learner"))
        self.step = loop["step"]
        self.requests_sent = loop["requests_sent"]
        self.restarts = loop["restarts"]
        self.train_seconds = loop["train_seconds"]
        self.samples_trained = loop["samples_trained"]
        self.buffer.load_state_dict(loop["buffer"])
        self.pool.load_state_dict(loop["pool"])
        self.pool.give_back(loop["in_flight"])
        self.state.cut_audit(self.step)
        if self.version > 0:
            # The workers started from the starting checkpoint: they take the resumed weights.
            self.fleet.stage_weights()
            self._sync_workers(self.version)
            for future in concurrent.futures.as_completed(list(self.syncs)):
                self._sync_done(future)
        log.info("resuming from %s (step %d)", path, self.step)
        return True

    # ---------------------------------------------------------------- the result
    def _finish(self, wall_seconds: float) -> dict:
        model_dir = self.state.write_model(self.fleet.export, self.config.model)
        result = {
            "model": str(model_dir),
            "steps": self.step,
            "samples_trained": self.samples_trained,
            "train_seconds": self.train_seconds,
            "wall_seconds": wall_seconds,
            "samples_per_second": self.samples_trained / max(self.train_seconds, 1e-9),
            "buffer": self.buffer.counts,
            "worker_restarts": self.restarts,
            "placement": self.placement,
            "data": self.data_report,
            "curve": self._held_out_curve(),
        }
        write_json_atomic(model_dir / "train_result.json", result)
        return result

    def _held_out_curve(self) -> list[dict]:
        """Held-out accuracy of every snapshot, on worker 0 (after training: timings unaffected)."""
        if self.config.heldout is None:
            return []
        vision = self.images is not None
        heldout, _ = load_dataset_file(
            self.config.heldout, "rl", self.config.on_error, images=vision
        )
        rows = [dict(r) for r in heldout][: self.config.eval.limit or None]
        images = rows_images(rows, self.config.heldout) if vision else None
        settings = self.config.eval

        def score(facts: dict) -> dict:
            self.fleet.load_checkpoint(0, facts["weights"], facts["step"]).result()
            return self.fleet.evaluate(
                0,
                rows,
                pass_k=settings.pass_k,
                samples=settings.samples,
                temperature=settings.temperature,
                max_tokens=settings.max_new_tokens,
                seed=settings.seed,
                images=images,
            ).result()

        return self.state.held_out_curve(score)
