"""The fleet: every actor of an RL run, behind the calls the controller makes.

`Fleet` is what the controller drives: rollout requests, learner steps, weight syncs, checkpoints
and exports, as `concurrent.futures.Future`s it can wait on together. `RayFleet` runs them for
real: Ray (a local cluster or the one at `placement.ray_address`), the learner group
(`align.rl.group`) and one Ray actor per rollout worker (`align.rl.worker`), each with its
weight channel to the learner's rank 0. Tests drive the controller with a small in-process fleet
instead (tests/test_rl_controller.py).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import time
from typing import Any, Protocol

from align.rl.group import LearnerGroup, all_of
from align.rl.rollout import Rollout
from align.rl.worker import RolloutWorker

log = logging.getLogger(__name__)

Future = concurrent.futures.Future


class WorkerFailure(RuntimeError):
    """A rollout worker could not be started or replaced."""


class Fleet(Protocol):
    """The actors of a run, as the controller sees them."""

    workers: int

    def generate(self, worker: int, prompts: list[dict], seed: int) -> Future:
        """A rollout request; resolves to a `GenerateResult`."""

    def pass_rates(self, worker: int, prompts: list[dict], samples: int, seed: int) -> Future:
        """Pass rates of prompts under the worker's weights; resolves to a list."""

    def train_step(self, rollouts: list[Rollout], stage: bool) -> Future:
        """One learner step; resolves to its metrics (`learner/version` the new version)."""

    def sync(self, worker: int, version: int) -> Future:
        """Sends the staged `version` to `worker` after its queued calls; resolves to timings."""

    def replace_worker(self, worker: int, version: int) -> None:
        """Kills `worker` and starts a fresh one holding `version` (0: the start checkpoint)."""

    def stage_weights(self) -> None:
        """Stages the learner's current weights for syncs (after a resume)."""

    def save(self, directory: str) -> None:
        """Writes the learner's sharded state under `directory`."""

    def load(self, directory: str) -> int:
        """Restores the learner's state; returns the policy version."""

    def export(self, directory: str) -> None:
        """Writes the learner's weights as a Hugging Face checkpoint."""

    def load_checkpoint(self, worker: int, directory: str, version: int) -> Future:
        """Loads a checkpoint directory into `worker` (held-out evaluation of snapshots)."""

    def evaluate(self, worker: int, rows: list[dict], **settings) -> Future:
        """Held-out evaluation on `worker`; resolves to the report."""

    def placement(self) -> dict[str, Any]:
        """Where the actors run."""

    def shutdown(self) -> None:
        """Stops every actor."""


def actor_options(
    cpus: float, gpus: float, resources: dict | None = None, threads: int = 0, **env: str
) -> dict:
    """Ray options of an actor holding `cpus` CPUs and `gpus` GPUs, with `env` set in it.

    The actor gets `threads` compute threads (0: floor(cpus), at least 1) through
    OMP_NUM_THREADS in the environment its process starts with.

    Ray sets OMP_NUM_THREADS inside the worker only after the process has started. A driver
    that has already run an in-process vLLM engine (a pipeline's evaluation, say) has put
    torch's libgomp in LD_PRELOAD, which every actor inherits; the preloaded OpenMP reads its
    thread count at process start, sees none, and takes every core. Two actors on two cores
    then run four spinning threads, and a learner step took 5x longer. Set here, the count is
    in the environment the process starts with.
    """
    threads = threads or max(1, math.floor(cpus))
    options = {
        "num_cpus": cpus,
        "num_gpus": gpus,
        "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads), **env}},
    }
    if resources:
        options["resources"] = dict(resources)
    return options


class RayFleet:
    """The real actors: a learner group and rollout workers on a Ray cluster.

    Args:
        config: the RL stage's config (`pipelines.rl.Config`).
    """

    def __init__(self, config) -> None:
        import ray

        started = time.perf_counter()
        self.config = config
        placement = config.placement
        if not ray.is_initialized():
            if placement.ray_address:
                ray.init(address=placement.ray_address, log_to_driver=False)
            else:
                # "local": a new Ray of this process, never a cluster already running here.
                ray.init(address="local", include_dashboard=False, log_to_driver=False)
        self.workers = placement.workers
        # A send waits for the worker to finish its current request: allow the longest one.
        self.channel_timeout_s = config.worker_timeout_s + 60.0
        self._update_info: dict | None = None
        # The engines start while the learner ranks load: both take a while.
        self._actors: list[Any] = [self._new_worker() for _ in range(placement.workers)]
        self.learner: LearnerGroup | None = None
        try:
            self._start_learner()
            log.info(
                "%d learner rank(s) up in %.1f s", placement.learners, time.perf_counter() - started
            )
            for worker in range(placement.workers):
                self._connect_worker(worker)
        except BaseException:
            self.shutdown()
            raise
        log.info(
            "%d rollout worker(s) up and connected in %.1f s",
            placement.workers,
            time.perf_counter() - started,
        )

    def _start_learner(self) -> None:
        config, placement = self.config, self.config.placement
        # A warmup given as a share of the run becomes steps: the learner counts steps.
        warmup = config.learner.warmup_for(config.steps)
        self.learner = LearnerGroup(
            config.model,
            dataclasses.replace(config.learner, warmup_steps=warmup),
            config.loss,
            config.sampling.max_new_tokens,
            config.seed,
            config.engine.dtype,
            placement.learners,
            actor_options(
                placement.learner_cpus,
                placement.learner_gpus,
                placement.learner_resources,
                threads=placement.learner_threads,
            ),
            placement.workers,
            ready_timeout_s=config.worker_timeout_s,
        )

    # --- workers -----------------------------------------------------------------------------

    def _new_worker(self):
        """A rollout worker actor (its engine starts in the background)."""
        import ray

        placement = self.config.placement
        return (
            ray.remote(RolloutWorker)
            .options(
                # vLLM reads its logging level when the engine starts in the actor.
                **actor_options(
                    placement.worker_cpus,
                    placement.worker_gpus,
                    placement.worker_resources,
                    VLLM_LOGGING_LEVEL="WARNING",
                )
            )
            .remote(
                self.config.model, self.config.engine, self.config.rewards, self.config.sampling
            )
        )

    def _connect_worker(self, worker: int) -> None:
        """Waits for worker `worker`'s engine, then opens its weight channel with rank 0."""
        import ray

        actor = self._actors[worker]
        try:
            # The engine takes a while to start: a slow start is not a hang.
            ray.get(actor.__ray_ready__.remote(), timeout=self.config.worker_timeout_s)
            init_info, opened = self.learner.open_channel(
                worker, self.config.engine.tensor_parallel_size, self.channel_timeout_s
            )
            ray.get(
                [actor.init_weight_transfer.remote(init_info), opened],
                timeout=self.config.worker_timeout_s,
            )
        except ray.exceptions.RayError as error:
            raise WorkerFailure(
                f"rollout worker {worker} did not start: {type(error).__name__}: {error}"
            ) from None

    def replace_worker(self, worker: int, version: int) -> None:
        import ray

        ray.kill(self._actors[worker])
        self._actors[worker] = self._new_worker()
        self._connect_worker(worker)
        if version > 0:
            self.sync(worker, version).result(timeout=self.channel_timeout_s)

    def generate(self, worker: int, prompts: list[dict], seed: int) -> Future:
        return self._actors[worker].generate.remote(prompts, seed).future()

    def pass_rates(self, worker: int, prompts: list[dict], samples: int, seed: int) -> Future:
        return self._actors[worker].pass_rates.remote(prompts, samples, seed).future()

    def load_checkpoint(self, worker: int, directory: str, version: int) -> Future:
        return self._actors[worker].load_checkpoint.remote(directory, version).future()

    def evaluate(self, worker: int, rows: list[dict], **settings) -> Future:
        return self._actors[worker].evaluate.remote(rows, **settings).future()

    # --- learner -----------------------------------------------------------------------------

    def train_step(self, rollouts: list[Rollout], stage: bool) -> Future:
        return self.learner.train_step(rollouts, stage)

    def stage_weights(self) -> None:
        self.learner.stage_weights()

    def sync(self, worker: int, version: int) -> Future:
        """The worker loads (after the calls already queued on it) while rank 0 sends."""
        if self._update_info is None:
            self._update_info = self.learner.update_info()
        load = self._actors[worker].receive_weights.remote(self._update_info, version).future()
        send = self.learner.send_weights(worker, version).future()

        def merge(results: list[float]) -> dict[str, float]:
            load_seconds, send_seconds = results
            return {"sync/send_seconds": send_seconds, "sync/load_seconds": load_seconds}

        names = [f"rollout worker {worker}", "learner rank 0"]
        return all_of([load, send], merge, names, f"the weight sync of worker {worker}")

    def save(self, directory: str) -> None:
        self.learner.save(directory)

    def load(self, directory: str) -> int:
        return self.learner.load(directory)

    def export(self, directory: str) -> None:
        self.learner.export(directory)

    def placement(self) -> dict[str, Any]:
        import ray

        def node(actor) -> str:
            return ray.get_runtime_context().get_node_id()

        workers = ray.get([a.__ray_call__.remote(node) for a in self._actors])
        return {"learners": self.learner.nodes(), "workers": [{"node_id": n} for n in workers]}

    def shutdown(self) -> None:
        import ray

        for actor in self._actors:
            ray.kill(actor)
        if self.learner is not None:
            self.learner.kill()
