"""The online RL prompt pool: band filtering, curriculum, task mixing, epochs, give-back,
system prompts, determinism and resuming from a JSON state."""

from __future__ import annotations

import copy
import json
import logging
from collections import Counter

import pytest

from align.config import ConfigError, from_dict
from align.rl.pool import PoolSettings, PromptPool


def make_rows(counts: dict[str | None, int]) -> list[dict]:
    """RL-schema rows, `counts[task]` per task (None: rows without a `task` column)."""
    rows = []
    for task, n in counts.items():
        for i in range(n):
            row = {"prompt": [{"role": "user", "content": f"{task} {i}?"}], "answer": str(i)}
            if task is not None:
                row["task"] = task
            rows.append(row)
    return rows


def active_ids(pool: PromptPool) -> list[int]:
    return [i for i, a in enumerate(pool.state_dict()["active"]) if a]


def rates(difficulties: list[float | None]) -> dict[int, float | None]:
    """Pass rates giving these difficulties, by prompt id."""
    return {i: None if d is None else 1.0 - d for i, d in enumerate(difficulties)}


def shares(prompts, key=lambda p: p.row["task"]) -> dict[str, float]:
    counts = Counter(key(p) for p in prompts)
    return {k: v / len(prompts) for k, v in counts.items()}


# --- band filtering -------------------------------------------------------------------------


def test_before_any_rescore_every_prompt_is_active_and_rows_without_task_are_default():
    pool = PromptPool(make_rows({None: 5}), PoolSettings(), seed=0)
    assert active_ids(pool) == [0, 1, 2, 3, 4]
    assert pool.band() == (0.25, 0.99)
    metrics = pool.metrics()
    assert metrics["pool/active"] == 5 and metrics["pool/active/default"] == 5
    assert metrics["pool/unscored"] == 5 and "pool/mean_difficulty" not in metrics


def test_band_keeps_exactly_the_inclusive_band_and_counts_each_side(caplog):
    settings = PoolSettings(min_difficulty=0.25, max_difficulty=0.75, min_active=1)
    pool = PromptPool(make_rows({"add": 10}), settings, seed=0)
    # Prompts 8 and 9 are not scored: unknown difficulty keeps them active.
    difficulties = [0.0, 0.125, 0.25, 0.5, 0.75, 0.875, 1.0, 0.24]
    with caplog.at_level(logging.INFO, logger="align.rl.pool"):
        metrics = pool.rescore(rates(difficulties), step=10)
    assert active_ids(pool) == [2, 3, 4, 8, 9]  # both edges inclusive
    assert metrics["pool/dropped_easy"] == 3  # 0.0, 0.125, 0.24
    assert metrics["pool/dropped_hard"] == 2  # 0.875, 1.0
    assert metrics["pool/active"] == 5 and metrics["pool/active/add"] == 5
    assert metrics["pool/unscored"] == 2 and metrics["pool/last_rescore_step"] == 10
    assert metrics["pool/mean_difficulty"] == pytest.approx((0.25 + 0.5 + 0.75) / 3)
    assert "dropped 3 too easy and 2 too hard" in caplog.text
    # Only active prompts are taken.
    assert {p.id for p in pool.take(50)} == {2, 3, 4, 8, 9}

    # None keeps the previous difficulty; a new one moves the prompt.
    pool.rescore({3: None, 0: 0.5, 4: 0.0}, step=20)
    assert active_ids(pool) == [0, 2, 3, 8, 9]
    state = pool.state_dict()
    assert state["difficulty"][3] == 0.5 and state["difficulty"][4] == 1.0


def test_band_edges_tolerate_float_noise():
    # 1 - 0.9 = 0.09999999999999998 and 1 - 0.7 = 0.30000000000000004: still on the edges.
    settings = PoolSettings(min_difficulty=0.1, max_difficulty=0.3, min_active=1)
    pool = PromptPool(make_rows({"add": 4}), settings, seed=0)
    pool.rescore({0: 0.9, 1: 0.7, 2: 0.95, 3: 0.65}, step=1)
    assert active_ids(pool) == [0, 1]


def test_min_active_keeps_the_closest_prompts_and_warns(caplog):
    settings = PoolSettings(min_difficulty=0.4, max_difficulty=0.6, min_active=4)
    pool = PromptPool(make_rows({"add": 7}), settings, seed=0)
    difficulties = [0.0, 0.2, 0.35, 0.5, 0.7, 0.9, 1.0]  # distances .4 .2 .05 0 .1 .3 .4
    with caplog.at_level(logging.WARNING, logger="align.rl.pool"):
        metrics = pool.rescore(rates(difficulties), step=5)
    assert active_ids(pool) == [1, 2, 3, 4]
    assert metrics["pool/kept_by_min_active"] == 3
    assert metrics["pool/dropped_easy"] == 1 and metrics["pool/dropped_hard"] == 2
    assert "only 1 prompts inside the band" in caplog.text
    assert "keeping the 3 closest" in caplog.text

    # Ties at the same distance are broken by the seed, reproducibly.
    def kept(seed):
        tied = PromptPool(make_rows({"add": 20}), PoolSettings(min_active=3), seed=seed)
        tied.rescore(rates([1.0] * 20), step=1)
        return active_ids(tied)

    assert len(kept(0)) == 3 and kept(0) == kept(0)
    assert len({tuple(kept(s)) for s in range(5)}) > 1


def test_a_pool_no_larger_than_min_active_keeps_everything(caplog):
    with caplog.at_level(logging.WARNING, logger="align.rl.pool"):
        pool = PromptPool(make_rows({"add": 3}), PoolSettings(min_active=8), seed=0)
        pool.rescore(rates([0.0, 0.0, 1.0]), step=1)
    assert active_ids(pool) == [0, 1, 2]
    assert "never drops one" in caplog.text


# --- curriculum -----------------------------------------------------------------------------


def test_curriculum_raises_the_band_per_rescore_and_stops_at_the_cap():
    settings = PoolSettings(
        min_difficulty=0.2,
        max_difficulty=0.6,
        curriculum_step=0.1,
        curriculum_max_min_difficulty=0.4,
        min_active=1,
    )
    pool = PromptPool(make_rows({"add": 3}), settings, seed=0)
    difficulties = rates([0.25, 0.5, 0.75])
    assert pool.band() == (0.2, 0.6)
    expected = [(0.2, 0.6), (0.3, 0.7), (0.4, 0.8), (0.4, 0.8), (0.4, 0.8)]
    actives = []
    for n, (low, high) in enumerate(expected):
        metrics = pool.rescore(difficulties, step=n)
        assert pool.band() == pytest.approx((low, high))
        assert (metrics["pool/band_low"], metrics["pool/band_high"]) == pytest.approx((low, high))
        actives.append(active_ids(pool))
    assert actives == [[0, 1], [1], [1, 2], [1, 2], [1, 2]]

    # The upper edge stops at 1.0.
    pool = PromptPool(
        make_rows({"add": 1}),
        PoolSettings(min_difficulty=0.2, max_difficulty=0.95, curriculum_step=0.1),
        seed=0,
    )
    for n, band in enumerate([(0.2, 0.95), (0.3, 1.0), (0.4, 1.0)]):
        pool.rescore({}, step=n)
        assert pool.band() == pytest.approx(band)


# --- task mixing ----------------------------------------------------------------------------

# The draws are seeded, so these checks are deterministic; the tolerances are ~4 standard
# deviations of a binomial share over the draws, so any seed passes.
DRAWS = 4000
TOLERANCE = 0.03


def test_tasks_are_mixed_by_their_weights():
    rows = make_rows({"add": 30, "sort": 30})
    pool = PromptPool(rows, PoolSettings(task_weights={"add": 3.0, "sort": 1.0}), seed=0)
    got = shares(pool.take(DRAWS))
    assert got["add"] == pytest.approx(0.75, abs=TOLERANCE)
    assert got["sort"] == pytest.approx(0.25, abs=TOLERANCE)


def test_without_weights_tasks_are_mixed_by_their_active_prompts():
    pool = PromptPool(make_rows({"add": 60, "sort": 20}), PoolSettings(min_active=1), seed=0)
    assert shares(pool.take(DRAWS))["add"] == pytest.approx(0.75, abs=TOLERANCE)
    # After a re-score leaves 20 add and 20 sort prompts active, the mix follows: 50/50.
    pool.rescore(rates([0.5] * 20 + [0.0] * 40 + [0.5] * 20), step=1)
    assert shares(pool.take(DRAWS))["add"] == pytest.approx(0.5, abs=TOLERANCE)


def test_the_share_of_a_task_without_active_prompts_goes_to_the_others(caplog):
    rows = make_rows({"add": 30, "sort": 30, "mul": 30})
    settings = PoolSettings(task_weights={"add": 2.0, "sort": 1.0, "mul": 1.0}, min_active=1)
    pool = PromptPool(rows, settings, seed=0)
    with caplog.at_level(logging.WARNING, logger="align.rl.pool"):
        pool.rescore(rates([0.5] * 60 + [0.0] * 30), step=1)  # every mul prompt too easy
    assert "['mul'] have a weight but no active prompts" in caplog.text
    got = shares(pool.take(DRAWS))
    assert "mul" not in got
    assert got["add"] == pytest.approx(2 / 3, abs=TOLERANCE)
    assert got["sort"] == pytest.approx(1 / 3, abs=TOLERANCE)


def test_unlisted_tasks_are_never_taken_and_unknown_ones_are_refused(caplog):
    rows = make_rows({"add": 10, "sort": 10})
    with caplog.at_level(logging.WARNING, logger="align.rl.pool"):
        pool = PromptPool(rows, PoolSettings(task_weights={"add": 1.0}), seed=0)
    assert "['sort'] have no entry in task_weights" in caplog.text
    assert shares(pool.take(200)) == {"add": 1.0}
    with pytest.raises(ConfigError, match=r"task_weights.*\['mull'\].*\['add', 'sort'\]"):
        PromptPool(rows, PoolSettings(task_weights={"add": 1.0, "mull": 1.0}), seed=0)

    # Nothing left to take: a clear error instead of an endless loop.
    pool = PromptPool(rows, PoolSettings(task_weights={"add": 1.0}, min_active=1), seed=0)
    pool.rescore(rates([0.0] * 10 + [0.5] * 10), step=1)
    with pytest.raises(RuntimeError, match="no task with a weight > 0 has active prompts"):
        pool.take(1)


# --- epochs and give-back -------------------------------------------------------------------


def test_given_back_prompts_come_first_in_order():
    pool = PromptPool(make_rows({"add": 10, "sort": 10}), PoolSettings(), seed=0)
    first = [p.id for p in pool.take(5)]
    pool.give_back([first[3], first[1]])
    assert pool.metrics()["pool/returned"] == 2
    again = [p.id for p in pool.take(4)]
    assert again[:2] == [first[3], first[1]]
    assert not set(again[2:]) & set(first)  # then the epoch goes on
    # A prompt taken twice (a task with fewer active prompts than draws) comes back twice.
    pool.give_back([first[0], first[0]])
    assert [p.id for p in pool.take(3)][:2] == [first[0], first[0]]
    with pytest.raises(ValueError, match="unknown prompt id 20"):
        pool.give_back([20])


def test_every_active_prompt_is_trained_once_per_epoch_across_give_backs():
    pool = PromptPool(make_rows({"add": 20}), PoolSettings(), seed=0)
    first_order = pool.state_dict()["queues"]["add"]["order"]
    trained: list[int] = []
    # 25 taken, of which 3 are re-takes of given-back prompts: 22 fresh draws, i.e. epoch 1 and
    # the first two of epoch 2, which the last take gives back.
    for n, back in [(7, [2, 5]), (6, [0]), (9, []), (3, [1, 2])]:
        taken = [p.id for p in pool.take(n)]
        pool.give_back([taken[j] for j in back])
        trained += [i for j, i in enumerate(taken) if j not in back]
    assert sorted(trained) == list(range(20))
    second = [p.id for p in pool.take(20)]
    assert sorted(second) == list(range(20))
    second_order = pool.state_dict()["queues"]["add"]["order"]
    assert second_order[:2] == second[:2]  # the given-back ones, first
    assert sorted(second_order) == sorted(first_order) and second_order != first_order


def test_a_rescore_mid_epoch_goes_on_with_the_prompts_still_active(caplog):
    pool = PromptPool(make_rows({"add": 20}), PoolSettings(min_active=1), seed=0)
    taken = [p.id for p in pool.take(8)]
    pool.give_back(taken[:2])
    untaken = sorted(set(range(20)) - set(taken))
    # Drop one given-back prompt and two untaken ones.
    dropped = {taken[0], untaken[0], untaken[1]}
    with caplog.at_level(logging.INFO, logger="align.rl.pool"):
        pool.rescore(rates([0.0 if i in dropped else 0.5 for i in range(20)]), step=1)
    assert "forgot 1 given-back prompts" in caplog.text
    rest = [p.id for p in pool.take(1 + 12 - 2)]
    assert rest[0] == taken[1]
    assert sorted(rest[1:]) == sorted(set(untaken) - dropped)  # the epoch's remainder
    assert sorted(p.id for p in pool.take(17)) == sorted(set(range(20)) - dropped)


# --- system prompts -------------------------------------------------------------------------


def test_system_prompts_are_sampled_with_their_probability_and_rows_stay_unchanged():
    rows = make_rows({"add": 50})
    rows[0]["prompt"] = [{"role": "system", "content": "own"}, *rows[0]["prompt"]]
    original = copy.deepcopy(rows)
    settings = PoolSettings(system_prompts=["A", "B"], system_prompt_prob=0.3)
    pool = PromptPool(rows, settings, seed=0)
    taken = pool.take(DRAWS)
    with_system = []
    for p in taken:
        messages = original[p.id]["prompt"]
        assert p.row == original[p.id]
        if p.id == 0:  # already has a system message: not stacked
            assert p.prompt == messages
        elif len(p.prompt) == len(messages) + 1:
            assert p.prompt[0]["role"] == "system" and p.prompt[1:] == messages
            with_system.append(p.prompt[0]["content"])
        else:
            assert p.prompt == messages
        # The controller may change what it gets; the pool's rows stay as they were.
        p.prompt[-1]["content"] = "changed"
        p.prompt.append({"role": "assistant", "content": "x"})
        p.row["prompt"][0]["content"] = "changed"
    eligible = sum(p.id != 0 for p in taken)
    assert len(with_system) / eligible == pytest.approx(0.3, abs=TOLERANCE)
    assert Counter(with_system)["A"] / len(with_system) == pytest.approx(0.5, abs=0.06)
    assert rows == original
    assert all(p.prompt[-1] == original[p.id]["prompt"][-1] for p in pool.take(50))

    always = PromptPool(rows, PoolSettings(system_prompts=["S"], system_prompt_prob=1.0), 0)
    assert all(p.prompt[0]["content"] == ("own" if p.id == 0 else "S") for p in always.take(50))
    never = PromptPool(rows, PoolSettings(system_prompts=["S"]), seed=0)
    assert all(p.prompt == original[p.id]["prompt"] for p in never.take(20))


# --- determinism and state ------------------------------------------------------------------

SETTINGS = PoolSettings(
    min_active=2,
    task_weights={"add": 2.0, "sort": 1.0},
    system_prompts=["A", "B", "C"],
    system_prompt_prob=0.5,
    curriculum_step=0.05,
)


def draws(pool: PromptPool, n: int) -> list[tuple[int, list[dict]]]:
    return [(p.id, p.prompt) for p in pool.take(n)]


def exercise(pool: PromptPool) -> None:
    """Takes, gives back, records and re-scores: every part of the state is non-trivial."""
    taken = pool.take(13)
    pool.give_back([taken[4].id, taken[9].id])
    for p in taken[:4]:
        pool.record(p.id, [1.0, 0.0, 0.5], [True, False, True])
    pool.rescore({i: (i % 9) / 8 for i in range(0, 40, 2)}, step=8)
    taken = pool.take(7)
    pool.give_back([taken[-1].id])


def test_the_same_seed_gives_the_same_sequence():
    rows = make_rows({"add": 20, "sort": 20})
    a, b = PromptPool(rows, SETTINGS, seed=3), PromptPool(rows, SETTINGS, seed=3)
    assert draws(a, 100) == draws(b, 100)
    exercise(a)
    exercise(b)
    assert draws(a, 100) == draws(b, 100)
    assert a.state_dict() == b.state_dict()
    other = PromptPool(rows, SETTINGS, seed=4)
    assert draws(other, 100) != draws(PromptPool(rows, SETTINGS, seed=3), 100)


def test_a_pool_restored_from_json_continues_exactly():
    rows = make_rows({"add": 20, "sort": 20})
    original = PromptPool(rows, SETTINGS, seed=3)
    exercise(original)
    state = json.loads(json.dumps(original.state_dict()))
    restored = PromptPool(rows, SETTINGS, seed=7)  # the state's seed wins
    restored.load_state_dict(state)
    assert restored.state_dict() == original.state_dict()
    assert restored.metrics() == original.metrics()
    assert draws(restored, 60) == draws(original, 60)
    difficulty = {i: (i % 5) / 4 for i in range(40)}
    assert restored.rescore(difficulty, step=16) == original.rescore(difficulty, step=16)
    assert draws(restored, 60) == draws(original, 60)


def test_load_state_dict_refuses_another_pool():
    rows = make_rows({"add": 20, "sort": 20})
    state = PromptPool(rows, SETTINGS, seed=0).state_dict()
    with pytest.raises(ValueError, match="different pool: 40 prompts .* this pool has 39"):
        PromptPool(rows[:-1], SETTINGS, seed=0).load_state_dict(state)
    changed = copy.deepcopy(rows)
    changed[5]["answer"] = "wrong"
    with pytest.raises(ValueError, match="different pool: 40 prompts with fingerprint"):
        PromptPool(changed, SETTINGS, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="format version"):
        PromptPool(rows, SETTINGS, seed=0).load_state_dict({**state, "version": 99})


# --- records and bad input ------------------------------------------------------------------


def test_record_keeps_the_rollout_statistics_of_the_window():
    pool = PromptPool(make_rows({"add": 3}), PoolSettings(), seed=0)
    pool.record(1, [1.0, 0.0], [True, False])
    pool.record(1, [1.0, 1.0], [True, True])
    pool.record(2, [0.0, 0.0], [False, False])
    metrics = pool.metrics()
    assert metrics["pool/rollout/groups"] == 3
    assert metrics["pool/rollout/pass_rate"] == pytest.approx(3 / 6)
    assert metrics["pool/rollout/all_passed"] == pytest.approx(1 / 3)
    assert metrics["pool/rollout/none_passed"] == pytest.approx(1 / 3)
    assert pool.rescore({}, step=1)["pool/rollout/groups"] == 3  # then a new window
    assert "pool/rollout/groups" not in pool.metrics()
    with pytest.raises(ValueError, match="one reward and one pass flag"):
        pool.record(0, [1.0], [True, False])
    with pytest.raises(ValueError, match="unknown prompt id 3"):
        pool.record(3, [1.0], [True])


def test_rollout_groups_filter_the_pool_at_once_and_a_rescore_brings_prompts_back():
    settings = PoolSettings(min_active=2, filter_from_rollouts=True)
    pool = PromptPool(make_rows({"add": 4, "sort": 2}), settings, seed=0)
    pool.take(3)  # mid-epoch: the filtered prompts still in the epoch's order are skipped
    pool.record(0, [1.0] * 8, [True] * 8)  # 8 of 8: too easy
    pool.record(1, [0.0] * 8, [False] * 8)  # 0 of 8: too hard
    pool.record(2, [1.0] * 7 + [0.0], [True] * 7 + [False])  # 7 of 8: 0.125 < 0.25, too easy
    pool.record(3, [1.0] * 2 + [0.0] * 6, [True] * 2 + [False] * 6)  # 2 of 8: in the band
    # min_active = 2 keeps a fourth prompt from leaving: 6 - 3 = 3 active, then one more may go.
    pool.record(4, [0.0] * 8, [False] * 8)
    pool.record(5, [0.0] * 8, [False] * 8)
    assert active_ids(pool) == [3, 5]
    metrics = pool.metrics()
    assert metrics["pool/rollout_dropped_easy"] == 2 and metrics["pool/rollout_dropped_hard"] == 2
    assert metrics["pool/active/add"] == 1 and metrics["pool/active/sort"] == 1
    assert {p.id for p in pool.take(8)} == {3, 5}
    # A re-score measures every prompt again: prompt 1 is now solved half of the time.
    pool.rescore({0: 1.0, 1: 0.5, 2: 1.0, 3: 0.25, 4: 0.0, 5: 0.0}, step=3)
    assert active_ids(pool) == [1, 3]
    # Without the setting, groups only feed the window's statistics.
    plain = PromptPool(make_rows({"add": 4}), PoolSettings(min_active=1), seed=0)
    plain.record(0, [1.0] * 8, [True] * 8)
    assert active_ids(plain) == [0, 1, 2, 3] and plain.metrics()["pool/rollout_dropped_easy"] == 0


def test_at_the_floor_rotate_swaps_an_out_of_band_prompt_for_the_longest_gone_one():
    settings = PoolSettings(min_active=2, filter_from_rollouts=True, rotate_at_floor=True)
    pool = PromptPool(make_rows({"add": 4}), settings, seed=0)
    easy, hard, middle = [True] * 8, [False] * 8, [True] * 4 + [False] * 4
    pool.record(0, [1.0] * 8, easy)
    pool.record(1, [0.0] * 8, hard)
    assert active_ids(pool) == [2, 3]  # at the floor
    pool.record(2, [1.0] * 8, easy)  # out of the band: 2 leaves, 0 (gone first) comes back
    assert active_ids(pool) == [0, 3]
    pool.record(3, [0.0] * 4 + [1.0] * 4, middle)  # in the band: nothing moves
    pool.record(0, [1.0] * 8, easy)  # still too easy: swapped for 1
    assert active_ids(pool) == [1, 3]
    metrics = pool.metrics()
    assert metrics["pool/readmitted"] == 2 and metrics["pool/active"] == 2
    assert metrics["pool/rollout_dropped_easy"] == 3 and metrics["pool/rollout_dropped_hard"] == 1
    # A readmitted prompt is taken again, and the rotation survives a save and resume.
    assert {p.id for p in pool.take(8)} == {1, 3}
    resumed = PromptPool(make_rows({"add": 4}), settings, seed=0)
    resumed.load_state_dict(json.loads(json.dumps(pool.state_dict())))
    for each in (pool, resumed):
        each.record(1, [0.0] * 8, hard)  # swapped for 2, the longest gone now
    assert active_ids(pool) == active_ids(resumed) == [2, 3]
    # A prompt a re-score made active again leaves the line: 0 was next in it.
    pool.rescore({0: 0.5}, step=5)  # 0 in the band; 2 stays out by its last group (8 of 8)
    assert active_ids(pool) == [0, 3]
    pool.record(3, [1.0] * 8, easy)
    assert active_ids(pool) == [0, 1]


def test_a_prompt_a_rescore_made_active_rejoins_the_rotation_at_the_back():
    settings = PoolSettings(min_active=2, filter_from_rollouts=True, rotate_at_floor=True)
    pool = PromptPool(make_rows({"add": 4}), settings, seed=0)
    easy, hard = [True] * 8, [False] * 8
    pool.record(0, [1.0] * 8, easy)  # 0 leaves first
    pool.rescore({0: 0.5}, step=1)  # and is active again
    pool.record(1, [0.0] * 8, hard)  # 1 leaves
    pool.record(0, [1.0] * 8, easy)  # 0 leaves again, after 1: at the floor now
    assert active_ids(pool) == [2, 3]
    pool.record(2, [1.0] * 8, easy)  # 1 has been gone the longest
    assert active_ids(pool) == [1, 3]
    pool.record(3, [1.0] * 8, easy)
    assert active_ids(pool) == [0, 1]
    assert pool.state_dict()["left"] == [2, 3]


def test_rescore_refuses_bad_pass_rates():
    pool = PromptPool(make_rows({"add": 3}), PoolSettings(), seed=0)
    with pytest.raises(ValueError, match=r"pass rate of prompt 1 must be in \[0, 1\]"):
        pool.rescore({1: 1.5}, step=1)
    with pytest.raises(ValueError, match="unknown prompt id -1"):
        pool.rescore({-1: 0.5}, step=1)
    assert pool.metrics()["pool/rescores"] == 0  # nothing applied


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"min_difficulty": 0.8, "max_difficulty": 0.2}, "'min_difficulty'.*must be <= max"),
        ({"min_difficulty": -0.1}, r"'min_difficulty'.*\[0, 1\]"),
        ({"max_difficulty": 1.5}, r"'max_difficulty'.*\[0, 1\]"),
        ({"task_weights": {"add": -1.0}}, "'task_weights.add'.*>= 0"),
        ({"task_weights": {"add": 0.0}}, "'task_weights'.*at least one"),
        ({"system_prompts": ["A"], "system_prompt_prob": 1.5}, "'system_prompt_prob'"),
        ({"system_prompt_prob": 0.5}, "'system_prompt_prob'.*system_prompts is empty"),
        ({"system_prompts": [" "]}, r"'system_prompts\[0\]'"),
        ({"rescore_samples": 0}, "'rescore_samples'"),
        ({"rescore_every": -1}, "'rescore_every'"),
        ({"min_active": 0}, "'min_active'"),
        ({"curriculum_step": -0.1}, "'curriculum_step'"),
        (
            {"curriculum_step": 0.1, "curriculum_max_min_difficulty": 0.25},
            "'curriculum_max_min_difficulty'.*never rises",
        ),
    ],
)
def test_impossible_settings_are_refused(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(PoolSettings, data, source="pool")


def test_defaults_are_valid_and_the_pool_validates_its_settings():
    from_dict(PoolSettings, {}, source="pool")
    with pytest.raises(ConfigError, match="'max_difficulty'"):
        PromptPool(make_rows({"add": 2}), PoolSettings(max_difficulty=2.0), seed=0)
    with pytest.raises(ValueError, match="at least one row"):
        PromptPool([], PoolSettings(), seed=0)
    with pytest.raises(ValueError, match="row 0 .* list of chat messages"):
        PromptPool([{"prompt": "text", "answer": "1"}], PoolSettings(), seed=0)


def test_rows_exported_for_rl_work_as_they_are():
    from align.tasks import make_problems, to_rl

    rows = list(to_rl(make_problems(["add", "sort"], [1], n_per_level=10, seed=0)))
    pool = PromptPool(rows, PoolSettings(), seed=0)
    assert pool.tasks == ["add", "sort"]
    taken = pool.take(20)
    assert sorted(p.id for p in taken) == list(range(20))
    assert all(p.prompt == rows[p.id]["prompt"] and "answer" in p.row for p in taken)
