"""Selections on scores: bounds, drop-the-lowest fraction, ties and the unscored bucket."""

from __future__ import annotations

import pytest

from align.config import ConfigError, from_dict
from align.pruning import Selection, build_filter, row_text, select

SCORES = [0.0, 0.25, None, 0.5, 0.75, 1.0, None, 0.5]


def test_bounds_are_inclusive_and_none_goes_to_its_own_bucket():
    buckets = select(SCORES, Selection(min=0.25, max=0.75))
    assert buckets.kept == [1, 3, 4, 7]
    assert buckets.dropped == [0, 5]
    assert buckets.unscored == [2, 6]
    assert select(SCORES, Selection()).kept == [0, 1, 3, 4, 5, 7]


def test_drop_lowest_drops_exactly_that_fraction_of_the_lowest():
    scores = [0.9, 0.1, 0.5, 0.3, 0.7, 0.2]
    buckets = select(scores, Selection(drop_lowest=0.5))
    assert buckets.dropped == [1, 3, 5]  # 0.1, 0.3, 0.2
    assert buckets.kept == [0, 2, 4]
    # The fraction applies after the bounds: max 0.8 drops row 0 first, then half of 5 -> 2.
    buckets = select(scores, Selection(max=0.8, drop_lowest=0.5))
    assert buckets.dropped == [0, 1, 5]
    assert buckets.kept == [2, 3, 4]


def test_drop_lowest_within_groups_keeps_each_groups_hardest_part():
    # Group "a" is hard everywhere, group "b" easy everywhere: a global cut would keep only "a".
    scores = [0.9, 0.8, 1.0, 0.95, 0.1, 0.3, 0.2, 0.4]
    groups = ["a", "a", "a", "a", "b", "b", "b", "b"]
    assert select(scores, Selection(drop_lowest=0.5)).kept == [0, 1, 2, 3]
    by_group = select(scores, Selection(drop_lowest=0.5, group_by="task"), groups=groups)
    assert by_group.kept == [2, 3, 5, 7]  # a: 1.0, 0.95; b: 0.3, 0.4
    assert by_group.dropped == [0, 1, 4, 6]


def test_drop_lowest_per_group_takes_each_groups_own_fraction():
    scores = [0.9, 0.8, 1.0, 0.95, 0.1, 0.3, 0.2, 0.4]
    groups = ["a", "a", "a", "a", "b", "b", "b", "b"]
    keep = from_dict(Selection, {"drop_lowest": {"a": 0.5, "b": 0.0}, "group_by": "task"})
    buckets = select(scores, keep, groups=groups)
    assert buckets.kept == [2, 3, 4, 5, 6, 7]  # a: its hardest half; b: every row
    assert buckets.dropped == [0, 1]
    keep = Selection(drop_lowest={"a": 0.25, "b": 0.75}, group_by="task")
    assert select(scores, keep, groups=groups).kept == [0, 2, 3, 7]
    # Group values that are not strings (levels) are looked up by their text, as YAML keys are.
    levels = [1, 1, 1, 1, 2, 2, 2, 2]
    keep = from_dict(Selection, {"drop_lowest": {"1": 0.0, "2": 0.5}, "group_by": "level"})
    assert select(scores, keep, groups=levels).kept == [0, 1, 2, 3, 5, 7]
    assert keep.unnamed_groups(levels) == ([], [])
    assert keep.unnamed_groups([1, 2, 3]) == (["3"], [])
    assert Selection(drop_lowest={"1": 0.5, "4": 0.5}, group_by="level").unnamed_groups(levels) == (
        ["2"],
        ["4"],
    )


def test_ties_are_broken_by_the_seed_reproducibly():
    scores = [1.0] * 10
    first = select(scores, Selection(drop_lowest=0.5), seed=0)
    assert len(first.kept) == len(first.dropped) == 5
    assert select(scores, Selection(drop_lowest=0.5), seed=0) == first
    others = {tuple(select(scores, Selection(drop_lowest=0.5), seed=s).kept) for s in range(5)}
    assert len(others) > 1
    assert first.tied_at_cut == 10
    # Ties never reorder distinct scores: the lowest distinct score always goes first.
    mixed = [1.0, 1.0, 0.0, 1.0]
    for seed in range(5):
        buckets = select(mixed, Selection(drop_lowest=0.25), seed=seed)
        assert buckets.dropped == [2] and buckets.tied_at_cut == 0
    # Dropping half of [0, 1, 1, 1] cuts through the three rows scoring 1.
    assert select(mixed, Selection(drop_lowest=0.5)).tied_at_cut == 3


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"min": 0.8, "max": 0.2}, "'min'.*must be <= max"),
        ({"drop_lowest": 1.0}, "'drop_lowest'.*must be in \\[0, 1\\)"),
        ({"drop_lowest": -0.1}, "'drop_lowest'"),
        ({"max": ".nan"}, "'max'"),
        ({"drop_lowest": {"a": 0.5}}, "'drop_lowest'.*needs group_by"),
        ({"drop_lowest": {}, "group_by": "task"}, "'drop_lowest'.*at least one group"),
        ({"drop_lowest": {"a": 1.0}, "group_by": "task"}, "'drop_lowest.a'.*\\[0, 1\\)"),
        ({"drop_lowest": {"a": "half"}, "group_by": "task"}, "drop_lowest"),
        ({"maximum": 0.5}, "did you mean 'max'"),
    ],
)
def test_bad_selections_are_refused(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Selection, data, source="keep")


def test_row_text_reads_every_schema():
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert row_text({"prompt": messages[:1], "completion": messages[1:]}, "all") == "Q\nA"
    assert row_text({"prompt": "Q", "chosen": messages[1:], "rejected": []}, "completion") == "A"
    assert row_text({"messages": messages}, "prompt") == "Q"
    assert row_text({"text": "T"}, "all") == "T"
    assert row_text({"prompt": "Q", "answer": "4"}, "completion") == ""


def test_build_filter_names_the_step_in_errors():
    with pytest.raises(ConfigError, match="unknown filter 'lenght'.*Did you mean 'length'"):
        build_filter("lenght", {})
    with pytest.raises(ConfigError, match=r"filters\[1\] \(length\):"):
        build_filter("length", {"unit": "tokens"}, "filters[1]")
    with pytest.raises(ConfigError, match=r"filters\[0\] \(dedup\):.*unexpected keyword"):
        build_filter("dedup", {"threshold": 0.8}, "filters[0]")
