"""DAPO's soft overlong penalty: a length-aware reward that discourages truncated answers."""

from __future__ import annotations


def overlong_penalty(length: int, max_length: int, cache_length: int) -> float:
    """0 up to max_length - cache_length tokens, then linear down to -1 at max_length, -1 beyond.

    Example: max_length 20, cache_length 8: length 12 -> 0; 16 -> (12 - 16) / 8 = -0.5;
    20 -> -1; 25 -> -1.
    """
    free = max_length - cache_length
    if length <= free:
        return 0.0
    if length <= max_length:
        return (free - length) / cache_length
    return -1.0


def soft_overlong(
    prompts: list,
    completions: list[str],
    completion_ids: list[list[int]] | None = None,
    *,
    max_length: int,
    cache_length: int,
    **_,
) -> list[float]:
    """DAPO soft overlong penalty on each completion's token count (see `overlong_penalty`).

    Options: `max_length` (L_max, usually the sampler's max_new_tokens) and `cache_length`
    (L_cache, the width of the linear ramp). Needs the `completion_ids` the sampler passes.
    """
    if completion_ids is None:
        raise ValueError("the overlong reward needs completion_ids (token ids of each completion)")
    if not 0 < cache_length <= max_length:
        raise ValueError(f"need 0 < cache_length <= max_length (got {cache_length}, {max_length})")
    return [overlong_penalty(len(ids), max_length, cache_length) for ids in completion_ids]
