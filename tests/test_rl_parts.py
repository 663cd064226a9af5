"""The RL stage's data parts without Ray, vLLM or a process group: rollout buffer (one staleness
rule), the learner step's split across ranks, and micro-batch collation."""

from __future__ import annotations

import pytest
import torch

from align.losses.policy import PolicyLossSettings, advantages
from align.rl.buffer import RolloutBuffer
from align.rl.learner import Row, collate, split_batch
from align.rl.rollout import Rollout, batch_metrics


def rollout(prompt_id: int, rewards: list, version: int = 0, prompt=(5, 6, 7)) -> Rollout:
    n = len(rewards)
    return Rollout(
        prompt_id=prompt_id,
        prompt_ids=list(prompt),
        completion_ids=[[10 + i, 20 + i] for i in range(n)],
        behaviour_logprobs=[[-1.0 - i, -2.0 - i] for i in range(n)],
        rewards=list(rewards),
        version=version,
    )


def test_dynamic_sampling_drops_exactly_the_constant_groups():
    buffer = RolloutBuffer(max_staleness=1, groups_per_step=2, drop_constant=True)
    groups = [
        rollout(0, [1.0, 1.0, 1.0]),  # all right: constant
        rollout(1, [0.0, 1.0, 0.0]),
        rollout(2, [0.0, 0.0, 0.0]),  # all wrong: constant
        rollout(3, [0.5, None, 0.5]),  # the scored ones are equal: constant
        rollout(4, [None, 1.0, 0.0]),
        rollout(5, [None, None, 1.0]),  # one scored completion: no group to compare with
    ]
    dropped = buffer.add(groups)
    assert [g.prompt_id for g in dropped] == [0, 2, 3, 5]
    assert [g.prompt_id for g in buffer.groups] == [1, 4]
    assert buffer.counts == {"received": 6, "dropped_constant": 4, "dropped_stale": 0}

    keep_all = RolloutBuffer(max_staleness=1, groups_per_step=2, drop_constant=False)
    assert keep_all.add(groups) == [] and len(keep_all) == 6


def test_staleness_rule_drops_groups_older_than_max_staleness():
    buffer = RolloutBuffer(max_staleness=2, groups_per_step=2, drop_constant=False)
    buffer.add([rollout(i, [0.0, 1.0], version=v) for i, v in enumerate([0, 1, 2, 3, 4])])
    stale = buffer.drop_stale(learner_version=4)
    assert [g.version for g in stale] == [0, 1]
    assert [g.version for g in buffer.groups] == [2, 3, 4]
    assert buffer.counts["dropped_stale"] == 2
    assert buffer.drop_stale(learner_version=4) == []
    assert [g.prompt_id for g in buffer.take()] == [2, 3]
    assert buffer.take() is None  # one group left, the batch is two
    state = buffer.state_dict()
    restored = RolloutBuffer(max_staleness=2, groups_per_step=2, drop_constant=False)
    restored.load_state_dict(state)
    assert restored.groups == buffer.groups and restored.counts == buffer.counts


@pytest.mark.parametrize("staleness", [0, 1, 2])
def test_capacity_admits_exactly_the_groups_that_train_within_the_staleness_rule(staleness):
    """Worker at version v: its groups go to batches up to v + staleness + 1, batches are taken
    oldest first, so the capacity is what fills those batches and nothing more."""
    buffer = RolloutBuffer(max_staleness=staleness, groups_per_step=4, drop_constant=False)
    # Nothing taken, nothing waiting: a worker at version 0 may fill staleness + 1 batches.
    assert buffer.capacity(0, batches_taken=0, in_flight=0) == 4 * (staleness + 1)
    # What is in flight or buffered counts against it.
    buffer.add([rollout(i, [0.0, 1.0]) for i in range(3)])
    assert buffer.capacity(0, batches_taken=0, in_flight=2) == max(0, 4 * (staleness + 1) - 5)
    # Two batches taken (the learner at version 1 or 2): a worker still at 0 may add only what
    # batch staleness + 1 still has room for; one at version 2 gets two more batches.
    assert buffer.capacity(0, batches_taken=2, in_flight=0) == max(0, 4 * (staleness - 1) - 3)
    assert buffer.capacity(2, batches_taken=2, in_flight=0) == 4 * (staleness + 1) - 3


def test_split_batch_computes_advantages_and_totals_on_the_whole_batch():
    """Rank r gets the r-th slice of every global micro-batch; the normalisers and advantages
    are the whole batch's, whatever the split."""
    loss = PolicyLossSettings(kind="grpo", advantage="batch")
    groups = [rollout(0, [1.0, None, 0.0]), rollout(1, [0.5, 0.0, 1.0]), rollout(2, [1.0, 1.0])]
    parts, metrics = split_batch(groups, loss, ranks=2, micro_batch_size=2)
    # 7 scored rows; global micro-batches of 2 x 2 = 4 rows: [4 rows, 3 rows].
    assert [p.micro_rows for p in parts] == [[4, 3], [4, 3]]
    assert [[len(m) for m in p.micro_batches] for p in parts] == [[2, 1], [2, 2]]
    assert all(p.total_sequences == 7 and p.total_tokens == 14 for p in parts)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    expected = advantages(rewards, torch.tensor([0, 0, 1, 1, 1, 2, 2]), loss).float().tolist()
    # Reassembled in order (micro-batch by micro-batch, rank by rank), the rows are the batch's.
    rows = [row for k in range(2) for p in parts for row in p.micro_batches[k]]
    assert [r.advantage for r in rows] == expected
    assert metrics["train/sequences"] == 7 and metrics["train/reward_mean"] == pytest.approx(
        4.5 / 7
    )
    # One rank: the same rows, micro-batches of 2.
    (single,), _ = split_batch(groups, loss, ranks=1, micro_batch_size=2)
    assert [len(m) for m in single.micro_batches] == [2, 2, 2, 1]
    assert [r.advantage for m in single.micro_batches for r in m] == expected
    # More ranks than rows in the last micro-batch: some ranks get none there (a placeholder).
    parts, _ = split_batch(groups[:1], loss, ranks=4, micro_batch_size=1)
    assert [len(p.micro_batches[0]) for p in parts] == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="no scored completion"):
        split_batch([rollout(0, [None, None])], loss, ranks=2, micro_batch_size=2)


def test_split_batch_sorts_rows_by_length_so_micro_batches_pad_less():
    """Micro-batches of rows of similar length: fewer padded positions than in batch order;
    equal lengths keep the batch's order, and each row keeps its own advantage."""
    sizes = (6, 1, 4, 2)
    groups = [
        Rollout(
            prompt_id=g,
            prompt_ids=[5] * (2 + 3 * g),
            completion_ids=[[7] * n for n in sizes],
            behaviour_logprobs=[[-1.0] * n for n in sizes],
            rewards=[1.0, 0.0, 1.0, 0.0],
            version=0,
        )
        for g in range(3)
    ]
    (part,), _ = split_batch(groups, PolicyLossSettings(), ranks=1, micro_batch_size=4)
    lengths = [[len(r.prompt_ids) + len(r.completion_ids) for r in m] for m in part.micro_batches]
    # Batch order would be [8, 3, 6, 4], [11, 6, 9, 7], [14, 9, 12, 10]: 4 x (8 + 11 + 14) = 132
    # padded positions for 99 real ones; sorted, 4 x (6 + 9 + 14) = 116.
    assert lengths == [[3, 4, 6, 6], [7, 8, 9, 9], [10, 11, 12, 14]]
    assert sum(len(m) * max(m) for m in lengths) == 116
    first_six = [r for r in part.micro_batches[0] if len(r.prompt_ids) + len(r.completion_ids) == 6]
    assert [len(r.prompt_ids) for r in first_six] == [2, 5]  # group 0's row, then group 1's
    for micro in part.micro_batches:
        for row in micro:
            assert (row.advantage > 0) == (len(row.completion_ids) in (6, 4))


def test_collate_places_completion_tokens_and_behaviour_logprobs():
    rows = [
        Row([5, 6, 7], [10, 20], [-1.0, -2.0], 0.5),
        Row([8, 9], [11, 21], [-2.0, -3.0], -0.5),
    ]
    batch = collate(rows, pad_id=0)
    assert batch.input_ids_bt.tolist() == [[5, 6, 7, 10, 20], [8, 9, 11, 21, 0]]
    assert batch.attention_mask_bt.tolist() == [[1] * 5, [1, 1, 1, 1, 0]]
    # Position t scores token t + 1: completion tokens sit at 3..4 (row 0) and 2..3 (row 1).
    assert batch.mask_bt.tolist() == [[0, 0, 1, 1], [0, 1, 1, 0]]
    assert batch.behaviour_bt.tolist() == [[0, 0, -1, -2], [0, -2, -3, 0]]
    assert batch.advantages_b.tolist() == [0.5, -0.5]
    assert batch.real_bt.tolist() == batch.attention_mask_bt.float().tolist()
    # No rows: one attended placeholder row that scores nothing and routes nothing.
    empty = collate([], pad_id=0)
    assert empty.rows == 0 and empty.mask_bt.sum() == 0 and empty.real_bt.sum() == 0
    assert empty.attention_mask_bt.tolist() == [[1, 1]]


def test_batch_metrics_measure_staleness_against_the_weights_before_the_step():
    batch = [rollout(0, [1.0, 0.0], version=3), rollout(1, [1.0, 1.0], version=2)]
    batch[1].task = "sort"
    # The learner now at version 4 trained this batch from version 3's weights.
    metrics = batch_metrics(batch, learner_version=4)
    assert metrics["async/staleness_mean"] == 0.5 and metrics["async/staleness_max"] == 1.0
    assert metrics["reward/task/default"] == 0.5 and metrics["reward/task/sort"] == 1.0
