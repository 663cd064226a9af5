"""The prompt pool of continuous online RL: prompts with a difficulty, kept to a band.

Llama 4's online RL alternates training with re-scoring the prompts under the current policy and
keeps only the medium-to-hard ones. Difficulty = 1 - pass rate (pass@k with `rescore_samples`
completions). A prompt nearly always solved teaches little, and under a group-relative
advantage (GRPO) a group that all passes or all fails gives no gradient at all.

The pool keeps every prompt and its state; the *active* set is the part inside the difficulty
band, and only active prompts are taken. Re-scoring covers the whole pool, so a prompt dropped
as too hard comes back once the policy starts to solve it. With `filter_from_rollouts`, the
groups the run samples for training filter too: each is a pass rate of its prompt under the
current policy, free. The controller drives it:

    pool = PromptPool(rows, settings, seed=0)
    batch = pool.take(32)                     # PoolPrompt(id, prompt, row) each
    pool.record(p.id, rewards, passed)        # per scored rollout group (filters, if set)
    pool.give_back([p.id for p in stale])     # taken but never trained: taken again first
    pool.rescore({i: rate, ...}, step)        # every `rescore_every` steps, all prompts

Taking order: first the given-back prompts, in order; then each prompt is drawn from a task
family chosen at random by `task_weights`, and within a family the next of a seeded shuffled
order of its active prompts (one pass = one epoch; a new shuffle when it runs out). All of it is
deterministic given the seed and the state, and `state_dict()` captures that state as JSON.
"""

from __future__ import annotations

import bisect
import collections
import copy
import hashlib
import json
import logging
import math
import numbers
import random
from dataclasses import dataclass, field
from typing import Any

from align.config import ConfigError, check

log = logging.getLogger(__name__)

# Task family of rows without a `task` column.
DEFAULT_TASK = "default"
# Slack of the band comparisons, so float noise such as 1 - 2/3 = 0.33333333333333337 or a
# curriculum edge of 0.25 + 3 * 0.05 = 0.4000000000000001 does not move a prompt out of the band.
_BAND_EPS = 1e-9
_STATE_VERSION = 1


@dataclass
class PoolSettings:
    """Which prompts of the online RL pool are active, and how they are mixed and presented."""

    # Band of difficulty (1 - pass rate) kept active, inclusive. The defaults keep
    # "medium-to-hard": 0.25 drops prompts solved more than 75% of the time (with k = 8: 7 or 8
    # of 8), which are easy and, when always solved, give a group-relative advantage no signal.
    min_difficulty: float = 0.25
    # Upper edge of the band. 0.99 drops only prompts never solved (difficulty 1.0: no signal
    # either) for any k < 100 while keeping those solved once; re-scoring brings them back when
    # the policy starts to solve them. 1.0 keeps them.
    max_difficulty: float = 0.99
    # Re-score the pool every N learner steps (0 = never); read by the controller. A re-score
    # samples `rescore_samples` completions of EVERY prompt (the first one at step 0), which
    # is costly: 640 prompts x 8 with the embedded teacher took 47 s, as long as four steps.
    rescore_every: int = 0
    # Also filter with the groups the run samples anyway: each rollout group is a pass rate
    # of its prompt under the current policy (sampling.samples of them), so a group whose pass rate
    # falls outside the band takes its prompt out of the active set (never below
    # `min_active`) at no extra cost. Re-scoring still brings prompts back.
    filter_from_rollouts: bool = False
    # Completions sampled per prompt when re-scoring (k of the pass@k scorer).
    rescore_samples: int = 8
    # From the second re-score on, raise both band edges by this much per re-score (0 = off);
    # the upper edge stops at 1.0, where it also keeps never-solved prompts.
    curriculum_step: float = 0.0
    # The curriculum stops once the lower edge reaches this: 0.5 = at most half of the answers
    # right; beyond it the pool would shrink to the hardest prompts only.
    curriculum_max_min_difficulty: float = 0.5
    # Never shrink the active pool below this many prompts: when the band holds fewer, the
    # prompts closest to it stay active too (with a warning). 64 covers a couple of rollout
    # batches, so one batch rarely repeats a prompt.
    min_active: int = 64
    # With `filter_from_rollouts`, at the `min_active` floor: a prompt whose group falls outside
    # the band still leaves, and the prompt the rollout filter took out the longest ago comes
    # back in its place, to be judged again by its next group under the policy as it is then.
    # Off, the out-of-band prompt stays, so the active set stops changing once it reaches the
    # floor and every later step trains on the same `min_active` prompts.
    rotate_at_floor: bool = False
    # Share of the taken prompts per task family (column `task`; rows without it are family
    # "default"), renormalised over the families with active prompts; unlisted families are
    # never taken. Empty: proportional to each family's active prompts.
    task_weights: dict[str, float] = field(default_factory=dict)
    # System instructions; with probability `system_prompt_prob`, one of them, drawn uniformly,
    # is prepended to a taken prompt as a system message (not to rows that already start with
    # one: chat templates take a single system message).
    system_prompts: list[str] = field(default_factory=list)
    # Probability of prepending a system prompt to a taken prompt.
    system_prompt_prob: float = 0.0

    def validate(self) -> None:
        for key in ("min_difficulty", "max_difficulty", "system_prompt_prob"):
            value = getattr(self, key)
            check(0.0 <= value <= 1.0, key, f"must be in [0, 1] (got {value})")
        check(
            self.min_difficulty <= self.max_difficulty,
            "min_difficulty",
            f"must be <= max_difficulty (got {self.min_difficulty} > {self.max_difficulty})",
        )
        check(self.rescore_every >= 0, "rescore_every", f"must be >= 0 (got {self.rescore_every})")
        check(
            self.rescore_samples >= 1,
            "rescore_samples",
            f"must be >= 1 (got {self.rescore_samples})",
        )
        check(
            0.0 <= self.curriculum_step <= 1.0,
            "curriculum_step",
            f"must be in [0, 1] (got {self.curriculum_step})",
        )
        cap = self.curriculum_max_min_difficulty
        check(0.0 <= cap <= 1.0, "curriculum_max_min_difficulty", f"must be in [0, 1] (got {cap})")
        check(
            self.curriculum_step == 0 or cap > self.min_difficulty,
            "curriculum_max_min_difficulty",
            f"must be > min_difficulty when curriculum_step > 0, or the band never rises "
            f"(got {cap} <= {self.min_difficulty})",
        )
        check(self.min_active >= 1, "min_active", f"must be >= 1 (got {self.min_active})")
        for task, weight in self.task_weights.items():
            check(
                math.isfinite(weight) and weight >= 0,
                f"task_weights.{task}",
                f"must be a finite number >= 0 (got {weight})",
            )
        check(
            not self.task_weights or sum(self.task_weights.values()) > 0,
            "task_weights",
            "give at least one task a weight > 0 (or leave it empty)",
        )
        for i, text in enumerate(self.system_prompts):
            check(bool(text.strip()), f"system_prompts[{i}]", "must not be empty")
        check(
            self.system_prompt_prob == 0 or bool(self.system_prompts),
            "system_prompt_prob",
            f"is {self.system_prompt_prob} but system_prompts is empty",
        )


@dataclass
class PoolPrompt:
    """One prompt taken from the pool."""

    # Index of the row in the pool (what `record`, `give_back` and `rescore` take).
    id: int
    # Chat messages to generate from: the row's, after a sampled system message when one was
    # drawn. A copy: changing it leaves the pool's rows alone.
    prompt: list[dict]
    # A copy of the dataset row (answer, task, level, ...), for the rewards.
    row: dict


def _fingerprint(rows: list[dict]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(rng: random.Random, state: list) -> None:
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))


class PromptPool:
    """Training prompts with per-prompt difficulty, re-filtered to a difficulty band.

    Before the first `rescore` every prompt is active (its difficulty is unknown). A prompt that
    has never been scored stays active after a re-score as well; one scored before keeps its
    last difficulty when a re-score leaves it out (None) and is judged by the new band with it.

    Args:
        rows: the dataset rows in the RL schema (see `align.tasks.to_rl`): `prompt` (a list of
            chat messages), `answer`, and optionally `task`, `level`, ...
        settings: band, curriculum, mixing and system prompts.
        seed: seed of every random choice (shuffles, task draws, system prompts, tie-breaks).

    Raises:
        ConfigError: impossible settings, or `task_weights` naming a task that no row has.
        ValueError: no rows, or a row whose `prompt` is not a list of chat messages.
    """

    def __init__(self, rows: list[dict], settings: PoolSettings, seed: int) -> None:
        settings.validate()
        rows = list(rows)
        if not rows:
            raise ValueError("the prompt pool needs at least one row")
        for i, row in enumerate(rows):
            prompt = row.get("prompt")
            if not isinstance(prompt, list) or not all(isinstance(m, dict) for m in prompt):
                raise ValueError(
                    f"row {i} of the prompt pool: `prompt` must be a list of chat messages "
                    f"(the RL schema), got {type(prompt).__name__}"
                )
        self.settings = settings
        self.seed = seed
        self._rows = rows
        self._fingerprint = _fingerprint(rows)
        self._task_of = [str(row.get("task", DEFAULT_TASK)) for row in rows]
        self.tasks = sorted(set(self._task_of))
        self._task_ids = {t: [i for i, x in enumerate(self._task_of) if x == t] for t in self.tasks}
        unknown = sorted(set(settings.task_weights) - set(self.tasks))
        if unknown:
            raise ConfigError(
                f"invalid value for 'task_weights': unknown task(s) {unknown}; "
                f"the pool's tasks are {self.tasks}"
            )
        if settings.task_weights:
            unlisted = [t for t in self.tasks if t not in settings.task_weights]
            if unlisted:
                log.warning(
                    "prompt pool: tasks %s have no entry in task_weights and are never taken "
                    "(%d prompts)",
                    unlisted,
                    sum(len(self._task_ids[t]) for t in unlisted),
                )
        if len(rows) <= settings.min_active:
            log.warning(
                "prompt pool: %d prompts <= min_active=%d, so the difficulty band never drops one",
                len(rows),
                settings.min_active,
            )

        n = len(rows)
        # Per prompt: difficulty from the latest re-score that scored it (None: never scored).
        self._difficulty: list[float | None] = [None] * n
        self._active = [True] * n
        self._band = (settings.min_difficulty, settings.max_difficulty)
        self._rescores = 0
        self._last_step: int | None = None
        # Outcome of the latest re-score.
        self._dropped_easy = 0
        self._dropped_hard = 0
        self._kept_by_min_active = 0
        # Prompts the rollout groups took out of the active set (`filter_from_rollouts`), the
        # ids in the order they left (`rotate_at_floor` brings the first one back), and how many
        # came back.
        self._rollout_drops = {"easy": 0, "hard": 0}
        self._left: collections.deque[int] = collections.deque()
        self._readmitted = 0
        # Rollout groups recorded since the latest re-score, and how many of them passed every /
        # no completion.
        self._window = {"groups": 0, "samples": 0, "passed": 0, "all_passed": 0, "none_passed": 0}
        # Per task: this epoch's order of active prompts, the next position in it, the epoch.
        self._queues = {t: {"order": [], "pos": 0, "epoch": -1} for t in self.tasks}
        for task in self.tasks:
            self._new_epoch(task)
        # Prompts given back, to be taken first in this order.
        self._returned: list[int] = []
        self._mix_rng = random.Random(f"{seed}:mix")
        self._system_rng = random.Random(f"{seed}:system")
        self._update_weights()

    # --- taking prompts -------------------------------------------------------------------

    def take(self, n: int) -> list[PoolPrompt]:
        """The next `n` prompts: the given-back ones first, then drawn by task weights.

        Within a task, prompts come in a seeded shuffled order of its active prompts, reshuffled
        when it runs out, so each active prompt is taken once per epoch of its task (a task with
        fewer active prompts than draws repeats them).

        Raises:
            ValueError: `n` < 0.
            RuntimeError: no task with a weight > 0 has active prompts.
        """
        if n < 0:
            raise ValueError(f"take needs n >= 0 (got {n})")
        ids = self._returned[:n]
        del self._returned[:n]
        while len(ids) < n:
            ids.append(self._next_of(self._draw_task()))
        return [self._present(i) for i in ids]

    def give_back(self, ids: list[int]) -> None:
        """Returns prompts that were taken but never trained; `take` hands them out first.

        An id may come back more than once when it was taken more than once (a task with fewer
        active prompts than draws); each copy is taken again.

        Raises:
            ValueError: an id out of range.
        """
        for i in ids:
            self._check_id(i)
        self._returned.extend(int(i) for i in ids)

    def _draw_task(self) -> str:
        if not self._cumulative or self._cumulative[-1] <= 0:
            raise RuntimeError(
                "the prompt pool has nothing to take: no task with a weight > 0 has active "
                f"prompts (active per task: {self._active_counts()}, "
                f"task_weights: {self.settings.task_weights})"
            )
        x = self._mix_rng.random() * self._cumulative[-1]
        index = bisect.bisect_right(self._cumulative, x)
        return self._weighted_tasks[min(index, len(self._weighted_tasks) - 1)]

    def _next_of(self, task: str) -> int:
        queue = self._queues[task]
        while True:
            if queue["pos"] >= len(queue["order"]):
                self._new_epoch(task)
            prompt_id = queue["order"][queue["pos"]]
            queue["pos"] += 1
            # A rollout group may have filtered a prompt out after its epoch began.
            if self._active[prompt_id]:
                return prompt_id

    def _new_epoch(self, task: str) -> None:
        queue = self._queues[task]
        queue["epoch"] += 1
        order = [i for i in self._task_ids[task] if self._active[i]]
        random.Random(f"{self.seed}:{task}:epoch{queue['epoch']}").shuffle(order)
        queue["order"], queue["pos"] = order, 0

    def _present(self, prompt_id: int) -> PoolPrompt:
        row = copy.deepcopy(self._rows[prompt_id])
        messages = copy.deepcopy(self._rows[prompt_id]["prompt"])
        settings = self.settings
        if settings.system_prompt_prob > 0:
            draw = self._system_rng.random() < settings.system_prompt_prob
            text = self._system_rng.choice(settings.system_prompts)
            if draw and not (messages and messages[0].get("role") == "system"):
                messages = [{"role": "system", "content": text}, *messages]
        return PoolPrompt(id=prompt_id, prompt=messages, row=row)

    def _update_weights(self) -> None:
        """Caches the task draw's cumulative weights over the tasks with active prompts."""
        counts = self._active_counts()
        weights = self.settings.task_weights
        pairs = [
            (t, weights.get(t, 0.0) if weights else float(counts[t]))
            for t in self.tasks
            if counts[t] > 0
        ]
        pairs = [(t, w) for t, w in pairs if w > 0]
        self._weighted_tasks = [t for t, _ in pairs]
        self._cumulative = []
        total = 0.0
        for _, w in pairs:
            total += w
            self._cumulative.append(total)
        idle = [t for t in self.tasks if weights.get(t, 0.0) > 0 and counts[t] == 0]
        if idle:
            log.warning(
                "prompt pool: tasks %s have a weight but no active prompts; their share goes to %s",
                idle,
                self._weighted_tasks,
            )

    # --- outcomes and re-scoring ------------------------------------------------------------

    def record(self, prompt_id: int, rewards: list[float], passed: list[bool]) -> None:
        """Adds one trained rollout group of prompt `prompt_id` to its running statistics.

        Args:
            prompt_id: the prompt's id.
            rewards: the group's combined rewards, one per completion.
            passed: whether each completion passed.

        Raises:
            ValueError: bad id, or `rewards` and `passed` empty or of different lengths.
        """
        self._check_id(prompt_id)
        if not passed or len(rewards) != len(passed):
            raise ValueError(
                f"record needs one reward and one pass flag per completion (got "
                f"{len(rewards)} rewards and {len(passed)} flags for prompt {prompt_id})"
            )
        n_passed = sum(bool(p) for p in passed)
        if self.settings.filter_from_rollouts:
            self._filter_by_group(int(prompt_id), 1.0 - n_passed / len(passed))
        window = self._window
        window["groups"] += 1
        window["samples"] += len(passed)
        window["passed"] += n_passed
        window["all_passed"] += n_passed == len(passed)
        window["none_passed"] += n_passed == 0

    def _filter_by_group(self, prompt_id: int, difficulty: float) -> None:
        """Takes the difficulty a rollout group measured; out of the band, the prompt leaves
        the active set (it is not taken again) unless that would leave fewer than `min_active`
        active prompts, where `rotate_at_floor` swaps it for the longest-gone prompt."""
        self._difficulty[prompt_id] = difficulty
        if not self._active[prompt_id] or self._in_band(difficulty):
            return
        if sum(self._active) <= min(self.settings.min_active, len(self._rows)):
            back = self._longest_out() if self.settings.rotate_at_floor else None
            if back is None:
                return
            self._active[back] = True
            self._readmitted += 1
        self._active[prompt_id] = False
        self._left.append(prompt_id)
        self._rollout_drops["easy" if difficulty < self._band[0] else "hard"] += 1
        self._update_weights()

    def _longest_out(self) -> int | None:
        """Removes and returns the prompt the rollout filter took out the longest ago; None when
        there is none."""
        return self._left.popleft() if self._left else None

    def _out_of_the_active_set(self, ids) -> collections.deque[int]:
        """`ids` in their order without the active ones: the rotation's line holds only prompts
        outside the active set (a re-score may make some active again)."""
        return collections.deque(i for i in ids if not self._active[i])

    def rescore(self, pass_rates: dict[int, float | None], step: int) -> dict[str, float]:
        """Sets new difficulties (1 - pass rate) and recomputes the active set by the band.

        The n-th re-score filters with the band raised by (n - 1) * `curriculum_step` (the
        lower edge at most `curriculum_max_min_difficulty`, the upper at most 1.0). Prompts
        inside the band, and prompts never scored, are active. When they are fewer than
        `min_active`, the scored prompts closest to the band (ties in seeded order) stay active
        as well. Each task's current epoch goes on with its still-active prompts, followed by
        newly active ones it has not yet had; given-back prompts no longer active are forgotten.

        Args:
            pass_rates: pass rate in [0, 1] per prompt id; None or absent: keep its previous
                difficulty.
            step: the learner step, for the logs and `pool/last_rescore_step`.

        Returns:
            `metrics()` after the re-score.

        Raises:
            ValueError: an unknown id or a pass rate outside [0, 1].
        """
        for prompt_id, rate in pass_rates.items():
            self._check_id(prompt_id)
            if rate is not None and not (isinstance(rate, numbers.Real) and 0.0 <= rate <= 1.0):
                raise ValueError(f"pass rate of prompt {prompt_id} must be in [0, 1] (got {rate})")
        for prompt_id, rate in pass_rates.items():
            if rate is not None:
                self._difficulty[int(prompt_id)] = 1.0 - float(rate)
        self._rescores += 1
        self._last_step = step
        low, high = self._band = self._curriculum_band()

        below, above, active = [], [], []
        for i, d in enumerate(self._difficulty):
            if d is None or self._in_band(d):
                active.append(i)
            else:
                (below if d < low else above).append(i)
        target = min(self.settings.min_active, len(self._rows))
        kept: list[int] = []
        if len(active) < target:
            outside = below + above
            tiebreak = list(range(len(outside)))
            random.Random(f"{self.seed}:rescore{self._rescores}").shuffle(tiebreak)
            distance = [self._distance(i) for i in outside]
            order = sorted(range(len(outside)), key=lambda j: (distance[j], tiebreak[j]))
            kept = [outside[j] for j in order[: target - len(active)]]
            log.warning(
                "prompt pool: only %d prompts inside the band [%.3f, %.3f] at step %d; keeping "
                "the %d closest outside it active too (min_active=%d, distance up to %.3f)",
                len(active),
                low,
                high,
                step,
                len(kept),
                self.settings.min_active,
                max(self._distance(i) for i in kept),
            )
        kept_set = set(kept)
        self._active = [False] * len(self._rows)
        for i in active + kept:
            self._active[i] = True
        self._dropped_easy = sum(i not in kept_set for i in below)
        self._dropped_hard = sum(i not in kept_set for i in above)
        self._kept_by_min_active = len(kept)
        log.info(
            "prompt pool re-scored at step %d (%d prompts scored): band [%.3f, %.3f], %d of %d "
            "prompts active; dropped %d too easy and %d too hard",
            step,
            sum(r is not None for r in pass_rates.values()),
            low,
            high,
            sum(self._active),
            len(self._rows),
            self._dropped_easy,
            self._dropped_hard,
        )

        for task in self.tasks:
            self._refilter_queue(task)
        # A prompt made active again leaves the rotation's line; it joins at the back when a
        # group takes it out again.
        self._left = self._out_of_the_active_set(self._left)
        stale = [i for i in self._returned if not self._active[i]]
        if stale:
            self._returned = [i for i in self._returned if self._active[i]]
            log.info(
                "prompt pool: forgot %d given-back prompts that are no longer active", len(stale)
            )
        self._update_weights()
        result = self.metrics()
        self._window = dict.fromkeys(self._window, 0)
        return result

    def _curriculum_band(self) -> tuple[float, float]:
        s = self.settings
        shift = 0.0
        if s.curriculum_step > 0:
            raised = (self._rescores - 1) * s.curriculum_step
            shift = min(raised, s.curriculum_max_min_difficulty - s.min_difficulty)
        return s.min_difficulty + shift, min(1.0, s.max_difficulty + shift)

    def _in_band(self, difficulty: float) -> bool:
        low, high = self._band
        return low - _BAND_EPS <= difficulty <= high + _BAND_EPS

    def _distance(self, prompt_id: int) -> float:
        d = self._difficulty[prompt_id]
        assert d is not None
        low, high = self._band
        return max(low - d, d - high, 0.0)

    def _refilter_queue(self, task: str) -> None:
        queue = self._queues[task]
        order, pos = queue["order"], queue["pos"]
        had = set(order)
        rest = [i for i in order[pos:] if self._active[i]]
        new = [i for i in self._task_ids[task] if self._active[i] and i not in had]
        random.Random(f"{self.seed}:{task}:rescore{self._rescores}").shuffle(new)
        queue["order"] = order[:pos] + rest + new

    # --- reporting and state ----------------------------------------------------------------

    def band(self) -> tuple[float, float]:
        """The difficulty band (inclusive) the active set was filtered with last."""
        return self._band

    def metrics(self) -> dict[str, float]:
        """Scalars for logging.

        `pool/total`, `pool/active`, `pool/active/<task>`, `pool/unscored` (never scored),
        `pool/band_low`, `pool/band_high`, `pool/mean_difficulty` (scored active prompts; absent
        when none), from the latest re-score `pool/dropped_easy`, `pool/dropped_hard`,
        `pool/kept_by_min_active`, `pool/rescores`, `pool/last_rescore_step`, `pool/returned`
        (given back, waiting), the prompts rollout groups took out of the band so far
        (`filter_from_rollouts`) `pool/rollout_dropped_easy` and `pool/rollout_dropped_hard`,
        the prompts `rotate_at_floor` brought back so far `pool/readmitted`, and over the groups
        recorded since the latest re-score `pool/rollout/groups`,
        `pool/rollout/pass_rate`, `pool/rollout/all_passed` and `pool/rollout/none_passed`
        (fractions of the groups: no learning signal under a group-relative advantage).
        """
        active = [i for i, a in enumerate(self._active) if a]
        scored = [self._difficulty[i] for i in active if self._difficulty[i] is not None]
        out: dict[str, float] = {
            "pool/total": float(len(self._rows)),
            "pool/active": float(len(active)),
            "pool/unscored": float(sum(d is None for d in self._difficulty)),
            "pool/band_low": self._band[0],
            "pool/band_high": self._band[1],
            "pool/dropped_easy": float(self._dropped_easy),
            "pool/dropped_hard": float(self._dropped_hard),
            "pool/kept_by_min_active": float(self._kept_by_min_active),
            "pool/rescores": float(self._rescores),
            "pool/returned": float(len(self._returned)),
            "pool/rollout_dropped_easy": float(self._rollout_drops["easy"]),
            "pool/rollout_dropped_hard": float(self._rollout_drops["hard"]),
            "pool/readmitted": float(self._readmitted),
        }
        if scored:
            out["pool/mean_difficulty"] = sum(scored) / len(scored)
        if self._last_step is not None:
            out["pool/last_rescore_step"] = float(self._last_step)
        for task, count in self._active_counts().items():
            out[f"pool/active/{task}"] = float(count)
        window = self._window
        if window["groups"]:
            out["pool/rollout/groups"] = float(window["groups"])
            out["pool/rollout/pass_rate"] = window["passed"] / window["samples"]
            out["pool/rollout/all_passed"] = window["all_passed"] / window["groups"]
            out["pool/rollout/none_passed"] = window["none_passed"] / window["groups"]
        return out

    def state_dict(self) -> dict:
        """Everything `take` and `rescore` depend on, as JSON-serialisable data."""
        return {
            "version": _STATE_VERSION,
            "size": len(self._rows),
            "fingerprint": self._fingerprint,
            "seed": self.seed,
            "difficulty": list(self._difficulty),
            "active": list(self._active),
            "band": list(self._band),
            "rescores": self._rescores,
            "last_step": self._last_step,
            "dropped_easy": self._dropped_easy,
            "dropped_hard": self._dropped_hard,
            "kept_by_min_active": self._kept_by_min_active,
            "rollout_drops": dict(self._rollout_drops),
            "left": list(self._left),
            "readmitted": self._readmitted,
            "window": dict(self._window),
            "queues": {
                t: {"order": list(q["order"]), "pos": q["pos"], "epoch": q["epoch"]}
                for t, q in self._queues.items()
            },
            "returned": list(self._returned),
            "mix_rng": _rng_state(self._mix_rng),
            "system_rng": _rng_state(self._system_rng),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores a `state_dict()` (also after a JSON round trip), seed included.

        Raises:
            ValueError: the state comes from a different pool (other size or rows) or another
                format version.
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"prompt pool state has format version {state.get('version')!r}; "
                f"this code reads version {_STATE_VERSION}"
            )
        if state.get("size") != len(self._rows) or state.get("fingerprint") != self._fingerprint:
            raise ValueError(
                f"prompt pool state was built from a different pool: {state.get('size')} "
                f"prompts with fingerprint {state.get('fingerprint')}, but this pool has "
                f"{len(self._rows)} prompts with fingerprint {self._fingerprint} (same rows in "
                "the same order are needed to resume)"
            )
        if state["seed"] != self.seed:
            log.warning(
                "prompt pool: resuming with the state's seed %r instead of %r, so the run goes on "
                "as it would have",
                state["seed"],
                self.seed,
            )
            self.seed = state["seed"]
        self._difficulty = [None if d is None else float(d) for d in state["difficulty"]]
        self._active = [bool(a) for a in state["active"]]
        self._band = (float(state["band"][0]), float(state["band"][1]))
        self._rescores = int(state["rescores"])
        self._last_step = state["last_step"]
        self._dropped_easy = int(state["dropped_easy"])
        self._dropped_hard = int(state["dropped_hard"])
        self._kept_by_min_active = int(state["kept_by_min_active"])
        # Absent from the states of runs started before `filter_from_rollouts` existed.
        drops = state.get("rollout_drops", {"easy": 0, "hard": 0})
        self._rollout_drops = {"easy": int(drops["easy"]), "hard": int(drops["hard"])}
        # Absent from the states of runs started before `rotate_at_floor` existed.
        self._left = self._out_of_the_active_set(int(i) for i in state.get("left", []))
        self._readmitted = int(state.get("readmitted", 0))
        self._window = {k: int(v) for k, v in state["window"].items()}
        self._queues = {
            t: {
                "order": [int(i) for i in q["order"]],
                "pos": int(q["pos"]),
                "epoch": int(q["epoch"]),
            }
            for t, q in state["queues"].items()
        }
        self._returned = [int(i) for i in state["returned"]]
        _set_rng_state(self._mix_rng, state["mix_rng"])
        _set_rng_state(self._system_rng, state["system_rng"])
        self._update_weights()

    # --- helpers ----------------------------------------------------------------------------

    def _active_counts(self) -> dict[str, int]:
        return {t: sum(self._active[i] for i in ids) for t, ids in self._task_ids.items()}

    def _check_id(self, prompt_id: Any) -> None:
        if (
            not isinstance(prompt_id, numbers.Integral)
            or isinstance(prompt_id, bool)
            or not 0 <= prompt_id < len(self._rows)
        ):
            raise ValueError(
                f"unknown prompt id {prompt_id!r}: ids are row indices 0..{len(self._rows) - 1}"
            )
