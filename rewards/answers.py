"""Answer-checking rewards: the embedded tasks' verifiers, math equivalence, and answer format.

Each returns 1.0 (right / well formed) or 0.0, and None for a row without a gold answer.
"""

from __future__ import annotations

import logging

from align.tasks import ANSWER_CLOSE, ANSWER_OPEN, TASKS, extract_answer


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def answer_match(
    prompts: list,
    completions: list[str],
    answer: list | None = None,
    task: list | None = None,
    **_,
) -> list[float | None]:
    """1.0 when the tagged answer equals the gold `answer` column, else 0.0.

    Rows of an embedded task (`task` column: "add", "sort") use that task's verifier; other rows
    compare the text inside `<answer>...</answer>` to the gold answer after lower-casing and
    collapsing whitespace. A completion without a well-formed answer tag scores 0.0; a row
    whose `answer` is missing or None scores None (not applicable).

    Example: completion "<answer> 46</answer>", answer "46", task "add" -> 1.0.
    """
    if answer is None:
        return [None] * len(completions)
    tasks = task if task is not None else [None] * len(completions)
    scores: list[float | None] = []
    for completion, gold, name in zip(completions, answer, tasks, strict=True):
        if gold is None:
            scores.append(None)
        elif name in TASKS:
            scores.append(float(TASKS[name].check(completion, str(gold))))
        else:
            extracted = extract_answer(completion)
            correct = extracted is not None and _normalise(extracted) == _normalise(str(gold))
            scores.append(float(correct))
    return scores


def math_equivalence(
    prompts: list,
    completions: list[str],
    answer: list | None = None,
    **_,
) -> list[float | None]:
    """1.0 when the answer is mathematically equal to the gold `answer` (HF `math-verify`).

    The tagged answer is parsed when the completion has one, else the whole completion (so
    `\\boxed{...}` answers work). "1/2" matches "0.5"; "\\frac{1}{2}" matches "1/2".
    A row whose `answer` is missing scores None.
    """
    import math_verify

    if answer is None:
        return [None] * len(completions)
    # math-verify's own timeouts use SIGALRM, which only works in the main thread; the reward
    # set's timeout bounds the call instead, so its warning that they are off is noise.
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).setLevel(logging.ERROR)
    scores: list[float | None] = []
    for completion, gold in zip(completions, answer, strict=True):
        if gold is None:
            scores.append(None)
            continue
        candidate = extract_answer(completion)
        parsed_gold = math_verify.parse(_as_math(str(gold)), parsing_timeout=None)
        parsed = math_verify.parse(
            _as_math(candidate) if candidate is not None else completion, parsing_timeout=None
        )
        equal = (
            bool(parsed_gold)
            and bool(parsed)
            and math_verify.verify(parsed_gold, parsed, timeout_seconds=None)
        )
        scores.append(float(equal))
    return scores


def _as_math(text: str) -> str:
    # math-verify finds a bare answer reliably when it is written as inline LaTeX.
    return text if "$" in text or "\\" in text else f"${text}$"


def answer_format(
    prompts: list, completions: list[str], *, nothing_else: bool = False, **_
) -> list[float]:
    """1.0 when the completion holds exactly one `<answer>...</answer>` pair, in that order,
    with a non-blank answer inside; else 0.0. Option `nothing_else`: also 0.0 when anything but
    whitespace comes before or after the pair (chatter around the answer).

    Examples: "<answer>46</answer>" -> 1.0; "<answer></answer>" -> 0.0;
    "<answer>4</answer><answer>6</answer>" -> 0.0; "46</answer>" -> 0.0;
    "<answer>46</answer> Hope this helps!" -> 1.0, or 0.0 with `nothing_else`.
    """
    scores = []
    for completion in completions:
        opens, closes = completion.count(ANSWER_OPEN), completion.count(ANSWER_CLOSE)
        start, end = completion.find(ANSWER_OPEN), completion.find(ANSWER_CLOSE)
        body = completion[start + len(ANSWER_OPEN) : end]
        ok = opens == closes == 1 and start < end and bool(body.strip())
        if nothing_else:
            stripped = completion.strip()
            ok = ok and stripped.startswith(ANSWER_OPEN) and stripped.endswith(ANSWER_CLOSE)
        scores.append(float(ok))
    return scores
