"""Data pruning: filters score rows, a selection on the scores decides what is kept.

Every filter (difficulty, judge, length, duplicates, or the user's own) follows one interface:
a class constructed from its YAML `options` whose `score(rows)` returns one number per row, or
None for a row it cannot score. Scoring is the expensive part (sampling with vLLM), so it is
kept apart from the thresholds: `select` turns scores into kept / dropped / unscored buckets,
and re-tuning the thresholds re-uses cached scores.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from align.config import ConfigError, check
from align.registry import Registry

# The built-in filters (the `filters` package), imported when first named.
BUILTIN_FILTERS = {
    "difficulty": "filters.difficulty:PassRateDifficulty",
    "difficulty_judge": "filters.difficulty:JudgeDifficulty",
    "length": "filters.length:LengthFilter",
    "dedup": "filters.dedup:DedupFilter",
    "guard": "filters.safety:GuardFilter",
    "prompt_attack": "filters.safety:PromptAttackFilter",
}
FILTERS: Registry[type] = Registry("filter", BUILTIN_FILTERS, group="moealign.filters")


class Filter(Protocol):
    """What a registered filter class provides once constructed with its options."""

    # What the score measures, for reports and plots, e.g. "difficulty (1 - pass rate)".
    score_name: str
    # True when a row's score depends on that row alone (difficulty, length), so scores can be
    # cached per row; False when it depends on the other rows too (duplicates).
    independent_rows: bool

    def score(self, rows: list[dict[str, Any]]) -> list[float | None]:
        """One score per row, or None for a row this filter cannot score."""
        ...

    def metrics(self) -> dict[str, float]:
        """Counts worth reporting from the scoring so far (e.g. reward faults); may be empty."""
        ...


def messages_text(messages: list[dict]) -> str:
    """The contents of chat messages, one message per line."""
    return "\n".join(str(m.get("content", "")) for m in messages)


def _as_text(value: Any) -> str:
    return messages_text(value) if isinstance(value, list) else str(value)


def row_text(row: dict[str, Any], part: Literal["prompt", "completion", "all"]) -> str:
    """The text of a row's prompt, its completion, or both, in any of the stage schemas.

    Chat message lists are flattened to their contents, one message per line. Schemas: `prompt`
    (+ `completion` or `chosen`) columns, `messages` (last message = completion), or `text`
    (all of it is the completion; the prompt is empty).
    """
    if "messages" in row:
        messages = row["messages"]
        prompt, completion = messages_text(messages[:-1]), messages_text(messages[-1:])
    elif "text" in row and "prompt" not in row:
        prompt, completion = "", str(row["text"])
    else:
        prompt = _as_text(row.get("prompt", ""))
        answer = row.get("completion", row.get("chosen", ""))
        completion = _as_text(answer) if answer is not None else ""
    if part == "prompt":
        return prompt
    if part == "completion":
        return completion
    return f"{prompt}\n{completion}" if prompt else completion


@dataclass
class Selection:
    """Which scores to keep. Bounds are inclusive; all given conditions must hold."""

    # Keep rows whose score is >= min (None: no lower bound).
    min: float | None = None
    # Keep rows whose score is <= max (None: no upper bound).
    max: float | None = None
    # Then drop this fraction of the scored rows with the lowest scores, e.g. 0.5 with a
    # difficulty score = "drop the easiest 50%". Ties are broken by a seeded shuffle. With
    # `group_by`, a mapping gives every group its own fraction, e.g. {add: 0.5, sort: 0.0}
    # prunes the plentiful task and keeps the scarce one whole; every group must be named.
    drop_lowest: float | dict[str, float] | None = None
    # Apply drop_lowest within each group of rows sharing this column's value (e.g. "task"), so
    # every group keeps its hardest part instead of a hard group crowding out an easier one.
    group_by: str | None = None

    def validate(self) -> None:
        for key in ("min", "max"):
            value = getattr(self, key)
            check(value is None or math.isfinite(value), key, f"must be finite (got {value})")
        check(
            self.min is None or self.max is None or self.min <= self.max,
            "min",
            f"must be <= max (got min {self.min}, max {self.max})",
        )
        if isinstance(self.drop_lowest, dict):
            check(bool(self.drop_lowest), "drop_lowest", "name at least one group")
            check(
                self.group_by is not None,
                "drop_lowest",
                "a fraction per group needs group_by (the column the groups are named by)",
            )
            fractions = self.drop_lowest.items()
        else:
            fractions = [] if self.drop_lowest is None else [(None, self.drop_lowest)]
        for group, fraction in fractions:
            key = "drop_lowest" if group is None else f"drop_lowest.{group}"
            check(0.0 <= fraction < 1.0, key, f"must be in [0, 1) (got {fraction})")

    def fraction(self, group: Any) -> float:
        """The share of `group`'s rows that `drop_lowest` drops (0.0 without drop_lowest).

        Raises:
            KeyError: a per-group mapping that does not name `group`.
        """
        if isinstance(self.drop_lowest, dict):
            return self.drop_lowest[str(group)]
        return self.drop_lowest or 0.0

    def unnamed_groups(self, groups: list) -> tuple[list[str], list[str]]:
        """(groups in the data that a per-group `drop_lowest` does not name, names it gives
        that no group in the data has); both empty for a single fraction."""
        if not isinstance(self.drop_lowest, dict):
            return [], []
        present = sorted({str(g) for g in groups})
        return (
            [g for g in present if g not in self.drop_lowest],
            [g for g in self.drop_lowest if g not in present],
        )


@dataclass
class Buckets:
    """Row indices by outcome, each in dataset order."""

    kept: list[int]
    dropped: list[int]
    unscored: list[int]
    # Rows whose score equals the score at the `drop_lowest` cut when the cut splits them, so
    # which of them were kept was decided by the seeded tie-break (0: the cut split no tie).
    tied_at_cut: int = 0


def select(
    scores: list[float | None],
    selection: Selection,
    seed: int = 0,
    groups: list | None = None,
) -> Buckets:
    """Splits row indices into kept, dropped (by the selection) and unscored (score None).

    `drop_lowest` applies to the rows that pass the bounds and drops round(fraction * count)
    of them, lowest scores first; rows with equal scores are ordered by a shuffle seeded with
    `seed`, so the same inputs always drop the same rows. With `groups` (one label per row), it
    applies within each group separately, with the group's own fraction if
    `selection.drop_lowest` is a mapping (`Selection.fraction`).
    """
    unscored = [i for i, s in enumerate(scores) if s is None]
    inside, dropped = [], []
    for i, s in enumerate(scores):
        if s is None:
            continue
        low_ok = selection.min is None or s >= selection.min
        high_ok = selection.max is None or s <= selection.max
        (inside if low_ok and high_ok else dropped).append(i)
    tied = 0
    if selection.drop_lowest:
        members: dict = {}
        for i in inside:
            members.setdefault(None if groups is None else groups[i], []).append(i)
        lowest: set[int] = set()
        for group, group_rows in members.items():
            group_lowest, group_tied = _lowest(group_rows, scores, selection.fraction(group), seed)
            lowest |= group_lowest
            tied += group_tied
        dropped = sorted(dropped + list(lowest))
        inside = [i for i in inside if i not in lowest]
    return Buckets(kept=inside, dropped=dropped, unscored=unscored, tied_at_cut=tied)


def _lowest(
    rows: list[int], scores: list[float | None], fraction: float, seed: int
) -> tuple[set[int], int]:
    """The round(fraction * len) rows with the lowest scores, and how many tie at the cut."""
    tiebreak = list(range(len(rows)))
    random.Random(seed).shuffle(tiebreak)
    order = sorted(range(len(rows)), key=lambda j: (scores[rows[j]], tiebreak[j]))
    n_drop = round(fraction * len(rows))
    tied = 0
    if 0 < n_drop < len(rows):
        cut = scores[rows[order[n_drop - 1]]]
        if scores[rows[order[n_drop]]] == cut:
            tied = sum(scores[i] == cut for i in rows)
    return {rows[j] for j in order[:n_drop]}, tied


def build_filter(name: str, options: dict[str, Any], where: str = "filter") -> Filter:
    """Constructs the filter `name` (registered or 'module:Class') with its options.

    Raises:
        ConfigError: unknown name, options the filter refuses (the message starts with
            `where`, e.g. "filters[1]"), or an unusable checkpoint in its `checkpoint_options`
            (`key 'filters[1].options.model': ...`).
    """
    from align.modeling import check_plugin_checkpoints

    cls = FILTERS.get(name)
    check_plugin_checkpoints(cls, options, f"{where}.options")
    try:
        return cls(**options)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where} ({name}): {error}") from error
