"""The rollout buffer of the online RL stage: scored groups waiting for the learner.

One staleness rule governs it: a group sampled by policy version v may be trained by the learner
at version v + max_staleness at the latest (the learner at version k trains batch k + 1, so the
group must land in batch v + max_staleness + 1 or earlier). The rule is applied on both sides:
- before sampling (`capacity`): a worker holding version v is asked for no more groups than fit
  into those batches, counting every group already taken, buffered or in flight (AReaL's
  admission rule), so nothing is generated only to be dropped;
- before training (`drop_stale`): a group that missed its batch anyway (a worker replaced, a
  resumed run) is dropped and its prompt goes back to the pool.
Groups whose rewards are all equal have zero advantage; with `drop_constant` they are dropped
on arrival (DAPO's dynamic sampling: the batch is refilled with new groups).
"""

from __future__ import annotations

import logging
from typing import Any

from align.rl.rollout import Rollout

log = logging.getLogger(__name__)


class RolloutBuffer:
    """Scored groups, oldest first, with the staleness rule and the drop counts.

    Args:
        max_staleness: most versions a trained group may lag the learner (0: synchronous).
        groups_per_step: groups in one learner batch.
        drop_constant: drop zero-advantage groups on arrival.
    """

    def __init__(self, max_staleness: int, groups_per_step: int, drop_constant: bool) -> None:
        self.max_staleness = max_staleness
        self.groups_per_step = groups_per_step
        self.drop_constant = drop_constant
        self.groups: list[Rollout] = []
        # Totals over the run: groups received, dropped as constant, dropped as stale.
        self.counts = {"received": 0, "dropped_constant": 0, "dropped_stale": 0}

    def __len__(self) -> int:
        return len(self.groups)

    def capacity(self, worker_version: int, batches_taken: int, in_flight: int) -> int:
        """Groups a worker holding `worker_version` may still be asked for.

        Args:
            worker_version: the policy version the worker samples with.
            batches_taken: batches handed to the learner so far (the one training included).
            in_flight: groups requested from workers and not yet returned.
        """
        last_batch = worker_version + self.max_staleness + 1
        admitted = batches_taken * self.groups_per_step + len(self.groups) + in_flight
        return max(0, last_batch * self.groups_per_step - admitted)

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
        stale, kept = [], []
        for group in self.groups:
            (stale if learner_version - group.version > self.max_staleness else kept).append(group)
        if stale:
            self.groups = kept
            self.counts["dropped_stale"] += len(stale)
            log.info(
                "dropped %d groups older than %d versions (learner at %d)",
                len(stale),
                self.max_staleness,
                learner_version,
            )
        return stale

    def take(self) -> list[Rollout] | None:
        """The oldest full batch, removed from the buffer; None while fewer groups wait."""
        if len(self.groups) < self.groups_per_step:
            return None
        batch = self.groups[: self.groups_per_step]
        self.groups = self.groups[self.groups_per_step :]
        return batch

    def metrics(self) -> dict[str, float]:
        """Groups waiting, and the run's drops so far."""
        return {
            "async/buffered_groups": float(len(self.groups)),
            "dynamic/dropped_constant": float(self.counts["dropped_constant"]),
            "dynamic/dropped_stale": float(self.counts["dropped_stale"]),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"groups": [g.to_dict() for g in self.groups], "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.groups = [Rollout(**g) for g in state["groups"]]
        self.counts = dict(state["counts"])
