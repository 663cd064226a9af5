"""Held-out evaluation through vLLM: greedy accuracy and pass@k per task and difficulty level.

Every stage evaluates its checkpoint with `evaluate` on the same held-out rows, so the numbers
of different stages are comparable.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import TYPE_CHECKING

from align import engine
from align.runs import verbose
from align.scoring import score_groups
from align.tasks import TASKS, extract_answer
from align.tokenizer import encode_prompts

if TYPE_CHECKING:
    from vllm import LLM

    from align.rewarding import RewardSet
    from align.safety import SafetyCheck

log = logging.getLogger(__name__)


def is_correct(row: dict, completion: str) -> bool:
    """Checks a completion against the row's answer with its task's verifier.

    Rows of an unknown task (a user's dataset) are checked by exact match of the extracted
    answer after stripping whitespace.
    """
    task = TASKS.get(row.get("task", ""))
    if task is not None:
        return task.check(completion, row["answer"])
    extracted = extract_answer(completion)
    return extracted is not None and extracted == str(row["answer"]).strip()


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate from `n` samples of which `c` are correct (Chen et al. 2021).

    Example: n=4, c=1, k=2 -> 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5.
    """
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(
    llm: LLM,
    tokenizer,
    rows: list[dict],
    *,
    pass_k: int = 4,
    samples: int = 4,
    temperature: float = 1.0,
    max_tokens: int = 32,
    seed: int = 0,
    rewards: RewardSet | None = None,
    safety: SafetyCheck | None = None,
    images: list[list] | None = None,
) -> dict:
    """Scores a model on held-out rows (prompt + answer, optional task and level columns).

    Args:
        llm: engine holding the weights to evaluate.
        tokenizer: the checkpoint's tokenizer (applies the chat template).
        rows: held-out rows; `prompt` is a conversation or a string, `answer` the reference.
        pass_k: k of pass@k.
        samples: completions sampled per prompt for pass@k (>= pass_k).
        temperature: sampling temperature for pass@k (greedy accuracy uses 0).
        max_tokens: longest completion.
        seed: sampling seed.
        rewards: also scores the sampled completions with these (against each row's columns,
            as in training), reported as each reward's mean beside the accuracy.
        safety: rates the greedy completions' safety (unsafe, refusal and over-refusal rates,
            `align.safety.safety_report`), reported under `safety`.
        images: each row's images (`align.vision.rows_images`), for a vision-language engine.

    Returns:
        A report: overall metrics, then `by_task`, `by_level` and `groups` (task x level),
        each with `n`, `greedy_accuracy`, `pass@k`, `sample_accuracy` (share of right sampled
        completions), `mean_completion_tokens` and, with `rewards`, `reward/<name>` (the mean
        over the sampled completions that reward scored; None where it scored none) and
        `reward/total` (the weighted sum's).
    """
    if samples < pass_k:
        raise ValueError(f"samples ({samples}) must be >= pass_k ({pass_k})")
    prompts = encode_prompts(tokenizer, [row["prompt"] for row in rows])
    greedy = engine.generate(
        llm,
        prompts,
        n=1,
        temperature=0.0,
        max_tokens=max_tokens,
        progress=verbose(),
        images=images,
    )
    sampled = engine.generate(
        llm,
        prompts,
        n=samples,
        temperature=temperature,
        max_tokens=max_tokens,
        seed=seed,
        progress=verbose(),
        images=images,
    )
    if any(row.get("task") not in TASKS for row in rows):
        unknown = sum(row.get("task") not in TASKS for row in rows)
        log.info(
            "%d of %d rows have no embedded task; checked by exact answer match", unknown, len(rows)
        )

    # Each reward's values over the sampled completions, row i's at [i * samples, (i+1) * samples).
    scored: dict[str, list[float | None]] = {}
    if rewards is not None:
        batch = score_groups(rows, [row["prompt"] for row in rows], sampled, rewards)
        scored = {f"reward/{name}": values for name, values in batch.values.items()}
        scored["reward/total"] = batch.totals

    per_row = []
    for i, (row, (best,), group) in enumerate(zip(rows, greedy, sampled, strict=True)):
        n_correct = sum(is_correct(row, c.text) for c in group)
        per_row.append(
            {
                "task": row.get("task", "-"),
                "level": row.get("level", 0),
                "greedy": float(is_correct(row, best.text)),
                "pass": pass_at_k(samples, n_correct, pass_k),
                "sampled_correct": n_correct / samples,
                "tokens": len(best.token_ids),
                "rewards": {
                    key: values[i * samples : (i + 1) * samples] for key, values in scored.items()
                },
            }
        )

    def summarise(items: list[dict]) -> dict:
        n = len(items)
        summary = {
            "n": n,
            "greedy_accuracy": sum(i["greedy"] for i in items) / n,
            f"pass@{pass_k}": sum(i["pass"] for i in items) / n,
            # Share of sampled completions that are right: the mean of a 0/1 answer reward.
            "sample_accuracy": sum(i["sampled_correct"] for i in items) / n,
            "mean_completion_tokens": sum(i["tokens"] for i in items) / n,
        }
        for key in scored:
            values = [v for i in items for v in i["rewards"][key] if v is not None]
            summary[key] = sum(values) / len(values) if values else None
        return summary

    by_task, by_level, groups = defaultdict(list), defaultdict(list), defaultdict(list)
    for item in per_row:
        by_task[item["task"]].append(item)
        by_level[item["level"]].append(item)
        groups[(item["task"], item["level"])].append(item)
    report = {
        **summarise(per_row),
        "pass_k": pass_k,
        "samples": samples,
        "by_task": {task: summarise(items) for task, items in sorted(by_task.items())},
        "by_level": {str(level): summarise(items) for level, items in sorted(by_level.items())},
        "groups": [
            {"task": task, "level": level, **summarise(items)}
            for (task, level), items in sorted(groups.items())
        ],
    }
    if safety is not None:
        report["safety"] = safety(rows, [best.text for (best,) in greedy])
    return report


def scalars(report: dict, prefix: str = "eval") -> dict[str, float]:
    """The report's headline numbers as flat scalar metrics (for metrics.jsonl and TensorBoard)."""
    pass_key = f"pass@{report['pass_k']}"
    metrics = {
        f"{prefix}/greedy_accuracy": report["greedy_accuracy"],
        f"{prefix}/{pass_key}": report[pass_key],
        f"{prefix}/sample_accuracy": report["sample_accuracy"],
        **{
            f"{prefix}/{key}": value
            for key, value in report.items()
            if key.startswith("reward/") and value is not None
        },
    }
    for key, value in report.get("safety", {}).items():
        if key.endswith("rate") and value is not None:
            metrics[f"{prefix}/safety/{key}"] = value
    for group, table in (("task", report["by_task"]), ("level", report["by_level"])):
        for name, m in table.items():
            metrics[f"{prefix}/{group}_{name}/greedy_accuracy"] = m["greedy_accuracy"]
            metrics[f"{prefix}/{group}_{name}/{pass_key}"] = m[pass_key]
    return metrics


def format_table(report: dict, title: str = "") -> str:
    """The report as a fixed-width text table: one line per task x level, then totals."""
    key = f"pass@{report['pass_k']}"
    header = (
        f"{'task':<10} {'level':>5} {'n':>5} {'greedy acc':>10} {key:>8} {'sample acc':>10} "
        f"{'tokens':>6}"
    )
    lines = [title] if title else []
    lines += [header, "-" * len(header)]

    def line(task: str, level: str, m: dict) -> str:
        return (
            f"{task:<10} {level:>5} {m['n']:>5} {m['greedy_accuracy']:>10.3f} "
            f"{m[key]:>8.3f} {m['sample_accuracy']:>10.3f} {m['mean_completion_tokens']:>6.1f}"
        )

    lines += [line(g["task"], str(g["level"]), g) for g in report["groups"]]
    lines.append("-" * len(header))
    lines += [line(task, "all", m) for task, m in report["by_task"].items()]
    lines += [line("all", level, m) for level, m in report["by_level"].items()]
    lines.append(line("all", "all", report))
    means = [
        f"{k.removeprefix('reward/')} {v:.3f}"
        for k, v in report.items()
        if k.startswith("reward/") and v is not None
    ]
    if means:
        lines.append("mean reward of the sampled completions: " + ", ".join(means))
    if "safety" in report:
        lines.append(safety_line(report["safety"]))
    return "\n".join(lines)


def safety_line(safety: dict) -> str:
    """The safety rates as one line: each rate +- its standard error, and the counts."""

    def rate(key: str) -> str:
        value = safety.get(key)
        return "-" if value is None else f"{value:.3f} +- {safety[key + '_se']:.3f}"

    line = (
        f"safety of the greedy completions ({safety['harmful']} harmful, {safety['harmless']} "
        f"harmless prompts): refusal {rate('refusal_rate')}, over-refusal "
        f"{rate('over_refusal_rate')}"
    )
    if "unsafe_rate" in safety:
        found = ", ".join(f"{c} {n}" for c, n in safety["categories"].items()) or "none"
        line += (
            f", unsafe (guard) {rate('unsafe_rate')}; categories: {found}; "
            f"unscored {safety['unscored']}"
        )
    return line
