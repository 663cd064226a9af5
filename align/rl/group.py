"""The learner group: N learner ranks as Ray actors in one placement group, driven as one learner.

The ranks are placed in one Ray placement group (one bundle each, packed onto as few nodes as
fit). Rank 0 provides the rendezvous address of their `torch.distributed` group; all ranks join
it and load their shards at once. Every call below fans out to every rank (each rank's part of
the batch, the same checkpoint directory) and resolves when all ranks have answered, or at once
when one of them fails: a dead rank never leaves the controller waiting on the others, which
would sit in a collective until `learner.collective_timeout_s`.

Rank 0 also owns the weight channels to the rollout workers; its sends run in the actor's
"transfer" concurrency group, beside the default group that trains, so the group trains its
next step while a worker takes the last one.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any

from align.losses.policy import PolicyLossSettings
from align.rl import transport
from align.rl.learner import LearnerRank, LearnerSettings, split_batch
from align.rl.rollout import Rollout


class ActorFailure(RuntimeError):
    """An actor (a learner rank, a rollout worker) died or failed; the message names it."""


def all_of(
    futures: list[concurrent.futures.Future],
    merge: Callable[[list[Any]], Any],
    names: list[str],
    what: str,
) -> concurrent.futures.Future:
    """A future of `merge(results)` once every future is done, or of the first failure (an
    `ActorFailure` naming `names[i]` of the failed one; a non-finite stop passes unchanged)."""
    combined: concurrent.futures.Future = concurrent.futures.Future()
    remaining = [len(futures)]

    def done(index: int, future: concurrent.futures.Future) -> None:
        if combined.done():
            return
        error = future.exception()
        if error is not None:
            failure = (
                error
                if _is_expected(error)
                else ActorFailure(
                    f"{names[index]} failed in {what}: {type(error).__name__}: {error}"
                )
            )
            if not combined.done():
                combined.set_exception(failure)
            return
        remaining[0] -= 1
        if remaining[0] == 0 and not combined.done():
            combined.set_result(merge([f.result() for f in futures]))

    for index, future in enumerate(futures):
        future.add_done_callback(lambda f, index=index: done(index, f))
    return combined


def _is_expected(error: BaseException) -> bool:
    """Errors a step raises on purpose (the non-finite stop), which pass through unchanged."""
    from align.runs import NonFiniteError

    cause = getattr(error, "cause", None)
    return isinstance(error, NonFiniteError) or isinstance(cause, NonFiniteError)


class LearnerGroup:
    """N `LearnerRank` actors behind one learner's interface (futures of their results).

    Args:
        model_path: checkpoint to start from.
        settings: optimisation settings.
        loss: the policy loss.
        max_completion_tokens: the rollouts' completion limit.
        seed: torch seed.
        engine_dtype: the rollout engines' dtype (weights are sent in it).
        ranks: learner ranks (N).
        actor_options: Ray options of each rank (resources, environment).
        workers: rollout workers that will take weights (sizes rank 0's transfer threads).
        ready_timeout_s: how long to wait for the cluster to have room for every rank.
    """

    def __init__(
        self,
        model_path: str,
        settings: LearnerSettings,
        loss: PolicyLossSettings,
        max_completion_tokens: int,
        seed: int,
        engine_dtype: str,
        ranks: int,
        actor_options: dict,
        workers: int,
        ready_timeout_s: float,
    ) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.settings, self.loss = settings, loss
        options = dict(actor_options)
        bundle = {"CPU": options.pop("num_cpus"), **options.pop("resources", {})}
        if options.get("num_gpus"):
            bundle["GPU"] = options["num_gpus"]
        self.placement = placement_group([bundle] * ranks, strategy="PACK")
        try:
            ray.get(self.placement.ready(), timeout=ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(self.placement)
            raise ActorFailure(
                f"the Ray cluster has no room for {ranks} learner rank(s) of {bundle} each "
                f"(waited {ready_timeout_s:.0f} s); its resources: {ray.cluster_resources()}"
            ) from None
        # Sends to every worker, a replaced worker's new channel, and the lookups run beside
        # the default group (which trains, saves and gathers, one call at a time).
        actor = ray.remote(concurrency_groups={"transfer": 2 * workers + 2})(LearnerRank)
        self.ranks = [
            actor.options(
                **options,
                num_cpus=bundle["CPU"],
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, rank),
            ).remote(
                model_path,
                settings,
                loss,
                max_completion_tokens,
                seed,
                rank,
                ranks,
                engine_dtype,
            )
            for rank in range(ranks)
        ]
        self.names = [f"learner rank {rank}" for rank in range(ranks)]
        address, port = ray.get(self.ranks[0].address.remote())
        self._every("start", address, port).result()
        self.version = 0

    def _every(self, method: str, *args) -> concurrent.futures.Future:
        """`method(*args)` on every rank; resolves to rank 0's result."""
        futures = [getattr(r, method).remote(*args).future() for r in self.ranks]
        return all_of(futures, lambda results: results[0], self.names, method)

    def _transfer(self, method: str, *args):
        """`method(*args)` on rank 0's transfer threads (beside training); a Ray reference."""
        return getattr(self.ranks[0], method).options(concurrency_group="transfer").remote(*args)

    def train_step(self, rollouts: list[Rollout], stage: bool) -> concurrent.futures.Future:
        """One step on the batch; resolves to its metrics (stage: weights ready to send)."""
        parts, batch_metrics = split_batch(
            rollouts, self.loss, len(self.ranks), self.settings.micro_batch_size
        )
        futures = [
            rank.train_step.remote(part, stage).future()
            for rank, part in zip(self.ranks, parts, strict=True)
        ]

        def merge(results: list[dict]) -> dict:
            self.version = int(results[0]["learner/version"])
            return {**batch_metrics, **results[0]}

        return all_of(futures, merge, self.names, "train_step")

    def stage_weights(self) -> float:
        """Gathers and stages the current weights on rank 0; returns seconds."""
        return self._every("stage_weights").result()

    def open_channel(self, worker: int, engine_ranks: int, timeout_s: float):
        """Opens rank 0's channel to `worker`; returns the worker's init info and a reference
        that resolves when rank 0 has joined (the worker must join at the same time)."""
        import ray

        endpoint: transport.Endpoint = ray.get(
            self._transfer("transfer_endpoint", 1 + engine_ranks, timeout_s)
        )
        return endpoint.worker_init_info(), self._transfer("open_channel", worker, endpoint)

    def update_info(self) -> dict:
        import ray

        return ray.get(self._transfer("update_info"))

    def send_weights(self, worker: int, version: int):
        """Sends staged `version` to `worker` (which must receive meanwhile); a reference."""
        return self._transfer("send_weights", worker, version)

    def save(self, directory: str) -> None:
        self._every("save", directory).result()

    def load(self, directory: str) -> int:
        self.version = self._every("load", directory).result()
        return self.version

    def export(self, directory: str) -> float:
        return self._every("export", directory).result()

    def nodes(self) -> list[dict]:
        """Where each rank runs."""
        import ray

        return ray.get([r.node.remote() for r in self.ranks])

    def kill(self) -> None:
        import ray

        for rank in self.ranks:
            ray.kill(rank)
        ray.util.remove_placement_group(self.placement)
