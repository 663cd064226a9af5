"""Weighted sets of reward functions, each call isolated so a faulty reward never ends a run.

A reward is a plain function `fn(prompts, completions, **columns) -> list[float | None]`:
`prompts[i]` is the i-th prompt (a chat message list or a string), `completions[i]` the text
the model wrote for it, and every other dataset column arrives as a keyword argument holding
one value per completion (`answer=[...]`, `task=[...]`), plus `completion_ids` (the sampled
token ids). A reward returns one value per completion:

- a number: the reward;
- `None`: the reward does not apply to this row (e.g. no gold answer); it adds nothing;
- `Failed("why")`: scoring this row failed (e.g. the code sandbox could not start). The row is
  left unscored and the failure is counted; it is never turned into a silent 0.

Registered rewards are plain functions (called as above, with the YAML `options` added as
keyword arguments) or classes (constructed once with the `options`, then called as above).
A reward class may also define `metrics() -> dict[str, float]`: its own counts since the last
call (the guard's violations per category), logged as `reward/<name>/<key>`.

Isolation: each call runs in its own thread with a timeout. An exception, a `Failed`, a NaN or
infinite value, a non-number, a wrong-length return or a timeout is counted under the reward's
name in the metrics and leaves the affected rows unscored (`None` total). A call that times out
is abandoned: Python cannot kill a thread, so a reward that truly hangs keeps its thread (and
a core) until it returns; use the code sandbox for untrusted code, which kills its processes.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from align.config import ConfigError, check
from align.modeling import check_plugin_checkpoints
from align.registry import Registry, RegistryError

log = logging.getLogger(__name__)

# The built-in rewards (the `rewards` package), imported when first named.
BUILTIN_REWARDS = {
    "answer_match": "rewards.answers:answer_match",
    "math_verify": "rewards.answers:math_equivalence",
    "answer_format": "rewards.answers:answer_format",
    "overlong": "rewards.overlong:soft_overlong",
    "reward_model": "rewards.reward_model:RewardModel",
    "llm_judge": "rewards.judge:LLMJudge",
    "code_tests": "rewards.code:CodeTests",
    "guard": "rewards.guard:Guard",
    "guard_classifier": "rewards.guard:GuardClassifier",
    "over_refusal": "rewards.guard:OverRefusal",
}
REWARDS: Registry[Callable] = Registry("reward", BUILTIN_REWARDS, group="moealign.rewards")

# Keyword arguments every reward receives besides the dataset's columns.
RESERVED_ARGUMENTS = ("prompts", "completions", "completion_ids")


@dataclass(frozen=True)
class Failed:
    """A reward's per-row value meaning "scoring this row failed", with the reason."""

    reason: str


@dataclass
class RewardSpec:
    """One reward of a weighted set, as YAML names it."""

    # A registered reward (README, "Rewards") or 'module:function' for your own function.
    name: str
    # Weight of this reward in the combined reward.
    weight: float = 1.0
    # Keyword options: constructor arguments of a reward class, or keyword arguments passed
    # to a reward function on every call.
    options: dict[str, Any] = field(default_factory=dict)
    # Seconds a call may take before it is abandoned and counted as a timeout.
    timeout_s: float = 120.0

    @staticmethod
    def registry() -> Registry:
        """Where `name` is looked up."""
        return REWARDS

    def validate(self) -> None:
        check(bool(self.name.strip()), "name", "must name a reward")
        check(math.isfinite(self.weight), "weight", f"must be finite (got {self.weight})")
        check(self.timeout_s > 0, "timeout_s", f"must be > 0 (got {self.timeout_s})")
        # The name and options are checked with the config, not when the reward is built: the
        # RL stage builds rewards inside its rollout workers, after Ray and vLLM have started.
        try:
            entry = _lookup(self.name)
        except RegistryError as error:
            check(False, "name", str(error))
        try:
            _check_spec_options(self, entry)
        except RegistryError as error:
            check(False, "options", str(error))


@dataclass
class RewardBatch:
    """The rewards of one batch of completions."""

    # Weighted sum of the applicable rewards per row; None where no reward applied or a reward
    # failed on that row.
    totals: list[float | None]
    # Each reward's own value per row (None: not applicable or failed).
    values: dict[str, list[float | None]]
    # Scalars for logging: `reward/<name>/mean`, fault counts, `reward/total/mean`, ...
    metrics: dict[str, float]
    # Wall time the rewards took on this batch.
    seconds: float = 0.0


def _refuse_duplicates(names: list[str]) -> None:
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RegistryError(
            f"rewards listed more than once: {', '.join(duplicates)}; list each reward once"
        )


def _call_with_timeout(fn: Callable[[], Any], timeout_s: float) -> tuple[str, Any]:
    """Runs `fn()` in a daemon thread; returns ("ok", value), ("error", exc) or ("timeout", None)."""
    outcome: list[tuple[str, Any]] = []

    def target() -> None:
        try:
            outcome.append(("ok", fn()))
        except (Exception, SystemExit) as error:  # a reward's bug must not end the run
            outcome.append(("error", error))

    thread = threading.Thread(target=target, daemon=True, name="reward-call")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return "timeout", None
    return outcome[0]


class RewardFunction:
    """A reward ready to call: the callable, its weight, options and timeout."""

    def __init__(
        self,
        name: str,
        fn: Callable,
        weight: float = 1.0,
        options: dict[str, Any] | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        self.name = name
        self.fn = fn
        self.weight = weight
        self.options = dict(options or {})
        self.timeout_s = timeout_s

    def __call__(self, prompts: list, completions: list[str], **columns) -> list:
        return self.fn(prompts, completions, **{**columns, **self.options})

    def metrics(self) -> dict[str, float]:
        """A reward object's own counts since its last call (e.g. the guard's violations per
        category), when it keeps any: its `metrics()` method."""
        own = getattr(self.fn, "metrics", None)
        return own() if callable(own) else {}


# The kinds of fault a RewardSet counts, as `reward/<name>/<kind>` in its metrics.
FAULT_KINDS = ("errors", "timeouts", "wrong_length", "nonfinite", "bad_values", "not_applicable")


class RewardSet:
    """Several rewards combined by weights, each call isolated and its faults counted.

    Args:
        rewards: the rewards; their names must be distinct.
    """

    def __init__(self, rewards: Sequence[RewardFunction]) -> None:
        _refuse_duplicates([r.name for r in rewards])
        if not rewards:
            raise RegistryError("a reward set needs at least one reward")
        self.rewards = list(rewards)
        # Faults over the life of this set, by "<name>/<kind>".
        self.faults: Counter[str] = Counter()
        self._reported: set[str] = set()
        # The warnings logged since `take_warnings` last ran (a process that scores for another,
        # such as a rollout worker, hands them on).
        self._warnings: list[str] = []

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    def __call__(
        self,
        prompts: list,
        completions: list[str],
        columns: dict[str, list] | None = None,
    ) -> RewardBatch:
        """Scores a batch: `prompts[i]` and `completions[i]` with `columns[c][i]` per column."""
        started = time.perf_counter()
        columns = dict(columns or {})
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} completions")
        for column, values in columns.items():
            if column in ("prompts", "completions"):
                raise ValueError(f"a column may not be named {column!r}; rename it")
            if len(values) != n:
                raise ValueError(f"column {column!r} has {len(values)} values for {n} completions")

        metrics: dict[str, float] = {}
        values: dict[str, list[float | None]] = {}
        failed_rows: set[int] = set()
        for reward in self.rewards:
            faults: Counter[str] = Counter()
            row_values = self._score(reward, prompts, completions, columns, faults, failed_rows)
            values[reward.name] = row_values
            scored = [v for v in row_values if v is not None]
            if scored:
                metrics[f"reward/{reward.name}/mean"] = sum(scored) / len(scored)
            metrics[f"reward/{reward.name}/applicable"] = len(scored) / max(n, 1)
            for kind, count in faults.items():
                metrics[f"reward/{reward.name}/{kind}"] = float(count)
                self.faults[f"{reward.name}/{kind}"] += count
            for key, value in reward.metrics().items():
                metrics[f"reward/{reward.name}/{key}"] = value

        totals: list[float | None] = []
        for i in range(n):
            applicable = [
                (r.weight, values[r.name][i]) for r in self.rewards if values[r.name][i] is not None
            ]
            if i in failed_rows or not applicable:
                totals.append(None)
            else:
                totals.append(sum(w * v for w, v in applicable))
        scored_totals = [t for t in totals if t is not None]
        if scored_totals:
            metrics["reward/total/mean"] = sum(scored_totals) / len(scored_totals)
        metrics["reward/unscored"] = float(n - len(scored_totals))
        return RewardBatch(
            totals=totals, values=values, metrics=metrics, seconds=time.perf_counter() - started
        )

    def _score(
        self,
        reward: RewardFunction,
        prompts: list,
        completions: list[str],
        columns: dict[str, list],
        faults: Counter[str],
        failed_rows: set[int],
    ) -> list[float | None]:
        n = len(completions)
        status, result = _call_with_timeout(
            lambda: reward(list(prompts), list(completions), **columns), reward.timeout_s
        )
        if status == "timeout":
            return self._fail_all(
                reward, "timeouts", f"no answer in {reward.timeout_s:g} s", n, faults, failed_rows
            )
        if status == "error":
            detail = f"{type(result).__name__}: {result}"
            return self._fail_all(reward, "errors", detail, n, faults, failed_rows)
        try:
            result = list(result)
        except TypeError:
            detail = f"returned {type(result).__name__}, not a list"
            return self._fail_all(reward, "wrong_length", detail, n, faults, failed_rows)
        if len(result) != n:
            detail = f"returned {len(result)} values for {n} completions"
            return self._fail_all(reward, "wrong_length", detail, n, faults, failed_rows)

        row_values: list[float | None] = []
        for i, value in enumerate(result):
            kind, detail = None, ""
            if value is None:
                faults["not_applicable"] += 1
            elif isinstance(value, Failed):
                kind, detail = "errors", value.reason
            elif isinstance(value, bool) or not isinstance(value, numbers.Real):
                kind, detail = "bad_values", f"row {i} is {type(value).__name__} {value!r}"
            elif not math.isfinite(float(value)):
                kind, detail = "nonfinite", f"row {i} is {value!r}"
            if kind is not None:
                faults[kind] += 1
                failed_rows.add(i)
                self._report(reward.name, kind, detail)
                row_values.append(None)
            else:
                row_values.append(None if value is None else float(value))
        return row_values

    def _fail_all(
        self,
        reward: RewardFunction,
        kind: str,
        detail: str,
        n: int,
        faults: Counter[str],
        failed_rows: set[int],
    ) -> list[None]:
        faults[kind] += n
        failed_rows.update(range(n))
        self._report(reward.name, kind, detail)
        return [None] * n

    def take_warnings(self) -> list[str]:
        """The fault warnings logged since the last call (each reward's first of each kind)."""
        warnings, self._warnings = self._warnings, []
        return warnings

    def _report(self, name: str, kind: str, detail: str) -> None:
        # The first fault of each kind per reward is a warning; later ones are only counted.
        key = f"{name}/{kind}"
        if key not in self._reported:
            self._reported.add(key)
            message = (
                f"reward {name!r} failed ({kind}): {detail}. Affected rows stay unscored; "
                f"faults are counted as reward/{name}/{kind}."
            )
            log.warning("%s", message)
            self._warnings.append(message)


def _check_options(
    name: str, target: Callable, options: dict[str, Any], skip: int, is_class: bool
) -> None:
    """Raises RegistryError when `options` do not fit the signature of `target`.

    Options must be named parameters: a function's `**columns` catch-all receives dataset
    columns, not options, so it does not make every option name acceptable, and the arguments
    every reward receives (`RESERVED_ARGUMENTS`) are not options. Required options: a class's
    parameters without a default; a function's keyword-only ones without a default (its other
    parameters without a default are dataset columns).
    """
    parameters = list(inspect.signature(target).parameters.values())[skip:]
    named = [
        p
        for p in parameters
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        and p.name not in RESERVED_ARGUMENTS
    ]
    accepted = [p.name for p in named]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise RegistryError(
            f"reward {name!r} has no option(s) {', '.join(unknown)}; "
            f"its options: {', '.join(accepted) or '(none)'}"
        )
    required = [
        p.name
        for p in named
        if p.default is inspect.Parameter.empty
        and (is_class or p.kind is inspect.Parameter.KEYWORD_ONLY)
    ]
    missing = [p for p in required if p not in options]
    if missing:
        raise RegistryError(f"reward {name!r} needs option(s) {', '.join(missing)}")


def _lookup(name: str) -> Callable:
    """The reward function or class `name` refers to (registered, or 'module:function')."""
    return REWARDS.get(name)


def _check_spec_options(spec: RewardSpec, entry: Callable) -> None:
    """Raises RegistryError when `spec.options` do not fit `entry`, the reward it names."""
    if inspect.isclass(entry):
        _check_options(spec.name, entry.__init__, spec.options, skip=1, is_class=True)
    else:
        _check_options(spec.name, entry, spec.options, skip=2, is_class=False)


def check_reward_checkpoints(specs: Sequence[RewardSpec], key: str) -> None:
    """Refuses rewards whose options name an unusable checkpoint (a reward model, a judge);
    `key` is where the specs sit in the config, e.g. "pairs.rewards"."""
    for i, spec in enumerate(specs):
        check_plugin_checkpoints(_lookup(spec.name), spec.options, f"{key}[{i}].options")


def check_option_columns(
    specs: Sequence[RewardSpec], columns: Sequence[str], key: str, source: str
) -> None:
    """Refuses a reward function's option named like a column of the rows it will score.

    A reward function gets its options and the rows' columns as keyword arguments of one
    namespace: such an option would silently replace the column (one value for every
    completion) in every call. A reward class takes its options when it is built, so it has
    no such clash.

    Args:
        specs: the rewards; `key` is where they sit in the config (e.g. "pairs.rewards").
        columns: the dataset's columns; `source` names the dataset in the error.

    Raises:
        ConfigError: naming the option's key, the dataset and the column.
    """
    for i, spec in enumerate(specs):
        if inspect.isclass(_lookup(spec.name)):
            continue
        clash = sorted(set(spec.options) & (set(columns) - {"prompt"}))
        if clash:
            raise ConfigError(
                f"key '{key}[{i}].options.{clash[0]}': {source} has a column '{clash[0]}' "
                "too, and a reward function gets options and columns as keyword arguments of "
                "one namespace, so the option would replace the column in every call; rename "
                "the option or the column"
            )


def build_reward(spec: RewardSpec) -> RewardFunction:
    """Looks up `spec.name` and binds its options; a reward class is constructed here."""
    entry = _lookup(spec.name)
    _check_spec_options(spec, entry)
    if inspect.isclass(entry):
        return RewardFunction(spec.name, entry(**spec.options), spec.weight, None, spec.timeout_s)
    return RewardFunction(spec.name, entry, spec.weight, spec.options, spec.timeout_s)


def build_reward_set(specs: Sequence[RewardSpec]) -> RewardSet:
    """Builds a RewardSet from YAML specs; refuses duplicate and unknown names up front."""
    # Before any reward is built: a reward class may load a model.
    _refuse_duplicates([s.name for s in specs])
    return RewardSet([build_reward(spec) for spec in specs])
