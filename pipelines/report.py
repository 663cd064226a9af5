"""The report of a pipeline run: `report.json`, `report.md` and plots in `runs/<pipeline>/`.

Built from what the stages left on disk (`stage-done.json`, `metrics.jsonl`), so a resumed
pipeline reports every stage, including those finished in an earlier run.

Per stage: what it did in one line, wall time, tokens processed and, for every stage that
was evaluated, the held-out figures: greedy accuracy overall and per level, pass@k, and the
mean reward (the share of right answers among completions sampled at the evaluation
temperature: the mean 0/1 `answer_match` reward).

Plots: `accuracy.png` (held-out accuracy per stage and level), `<stage>-rl.png` (training
reward, pool difficulty and the held-out curve of an RL stage) and `<stage>-distill.png` (soft
and hard loss, alpha and teacher KL of a distillation stage).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from align.runs import write_json_atomic

log = logging.getLogger(__name__)

# File a finished stage leaves in its directory, written last and atomically (see
# pipelines.pipeline): the stage is skipped in later runs of the pipeline while it is there.
DONE_MARKER = "stage-done.json"


def read_done_marker(stage_dir: Path) -> dict | None:
    """The stage's done-marker (`result`, `seconds`, `config`), or None when the stage has not
    finished. A marker that cannot be read as one (cut short, edited, not JSON) counts as not
    finished, with a warning: the stage runs again rather than the pipeline stopping."""
    path = stage_dir / DONE_MARKER
    if not path.exists():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(marker, dict) and isinstance(marker.get("result"), dict):
            return marker
        reason = "not a done-marker"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = str(error)
    log.warning("%s is damaged (%s); the stage counts as not finished", path, reason)
    return None


def collect(stages: list[tuple[str, str, bool]], run_dir: Path) -> dict:
    """The report's data: one record per finished stage, in pipeline order.

    Args:
        stages: (name, command, evaluated) of every stage of the pipeline; a stage the
            pipeline's evaluation leaves alone (a guard, a reward model) is not in the table,
            its own held-out score goes into what it did.
        run_dir: the pipeline's run directory.
    """
    records = []
    for name, command, evaluated in stages:
        finished = read_done_marker(run_dir / name)
        if finished is None:
            continue
        result = finished["result"]
        evaluation = result if command == "eval" else result.get("eval")
        did = describe(command, result)
        if evaluation and not evaluated:
            did += (
                f"; on its own {evaluation['n']} held-out rows: greedy accuracy "
                f"{evaluation['greedy_accuracy']:.3f}"
            )
            evaluation = None
        records.append(
            {
                "stage": name,
                "command": command,
                "did": did,
                "seconds": finished["seconds"],
                "tokens": tokens_processed(command, result, run_dir / name),
                "model": result.get("model") or result.get("checkpoint"),
                "heldout": heldout_summary(evaluation) if evaluation else None,
            }
        )
    return {
        "run_dir": str(run_dir),
        "total_seconds": sum(r["seconds"] for r in records),
        "stages": records,
    }


def heldout_summary(report: dict) -> dict:
    """The evaluation figures the report shows, from an `align eval` report."""
    pass_key = f"pass@{report['pass_k']}"
    return {
        "n": report["n"],
        "greedy_accuracy": report["greedy_accuracy"],
        "pass_k": report["pass_k"],
        "pass@k": report[pass_key],
        "mean_reward": report["sample_accuracy"],
        "samples": report["samples"],
        "by_level": {lv: m["greedy_accuracy"] for lv, m in report["by_level"].items()},
        "by_task": {task: m["greedy_accuracy"] for task, m in report["by_task"].items()},
        # The evaluation's own rewards (`eval.rewards`), each the mean over the samples.
        "rewards": {
            key.removeprefix("reward/"): value
            for key, value in report.items()
            if key.startswith("reward/") and key != "reward/total"
        },
        "safety": report.get("safety"),
    }


# The safety rates the report shows when a stage's evaluation has them: (key, column title).
SAFETY_COLUMNS = (
    ("unsafe_rate", "unsafe"),
    ("refusal_rate", "refusal"),
    ("over_refusal_rate", "over-refusal"),
)


def has_safety(report: dict) -> bool:
    """Whether any stage's evaluation reports safety rates."""
    return any(r["heldout"] and r["heldout"].get("safety") for r in report["stages"])


def safety_cells(heldout: dict | None) -> list[str]:
    """A stage's safety rates as table cells ('-' where it has none)."""
    safety = (heldout or {}).get("safety") or {}
    return ["-" if safety.get(key) is None else f"{safety[key]:.3f}" for key, _ in SAFETY_COLUMNS]


def tokens_processed(command: str, result: dict, stage_dir: Path) -> int | None:
    """Tokens a training stage processed: its training tokens (prompt + completion) for SFT,
    DPO and distillation; the completion tokens the rollout workers generated for RL."""
    if command in ("sft", "dpo", "distill"):
        return int(result["budget_tokens"])
    if command == "rl":
        return int(sum(m.get("rollout/tokens", 0) for m in read_metrics(stage_dir)))
    return None


def describe(command: str, result: dict) -> str:
    """One line saying what a stage did, from its result."""
    if command == "make-model":
        p = result["parameters"]
        return (
            f"built the {result['preset']} preset: {p['total'] / 1e6:.2f} M parameters, "
            f"{p['active'] / 1e6:.2f} M active per token"
        )
    if command == "make-data":
        rows = result["rows"]
        return f"generated {rows['train']} training and {rows['heldout']} held-out problems"
    if command == "eval":
        return f"scored {Path(result['model']).parent.name} on {result['n']} held-out rows"
    if command == "filter":
        out, steps = result["output"], result["filters"]
        chain = ", ".join(
            f"{f['name']} dropped {f['dropped']}"
            + (
                " (" + ", ".join(f"{k} {v:g}" for k, v in f["metrics"].items()) + ")"
                if f.get("metrics")
                else ""
            )
            for f in steps
        )
        return (
            f"kept {out['kept']} of {result['input_rows']} rows ({chain}; "
            f"{out['unscored']} unscored)"
        )
    if command == "sft":
        return (
            f"{result['steps']} steps on {result['data']['rows_after_filters']} rows, "
            f"{result['budget_tokens'] / 1e3:.0f} k tokens, final training loss "
            f"{result['train_loss']:.3f}"
        )
    if command == "rl":
        buffer = result["buffer"]
        return (
            f"{result['steps']} steps, {result['samples_trained']} samples trained "
            f"({result['samples_per_second']:.0f}/s); of {buffer['received']} groups generated, "
            f"{buffer['dropped_constant']} dropped as zero-advantage and "
            f"{buffer['dropped_stale']} as stale; "
            f"{result['worker_restarts']} worker restarts"
        )
    if command == "dpo":
        data = result["data"]
        pairs = f"{data['pairs']} pairs from {data['prompts']} prompts" if "pairs" in data else ""
        return f"{result['steps']} steps on {pairs or 'the preference rows'}"
    if command == "redteam":
        by_turn = ", ".join(f"{rate:.2f}" for rate in result["success_by_turn"])
        return (
            f"attack success rate {result['attack_success_rate']:.3f} +- "
            f"{result['attack_success_rate_se']:.3f} over {result['goals']} goals in up to "
            f"{result['turns']} turns (cumulative by turn: {by_turn}; attacker: "
            f"{result['attacker']})"
        )
    if command == "distill":
        line = f"{result['steps']} steps from teacher {Path(result['teacher']).parent.name}"
        before, after = result.get("heldout_before"), result.get("heldout_after")
        if before and after:
            line += (
                f"; held-out CE {before['ce']:.3f} -> {after['ce']:.3f}, teacher KL "
                f"{before['teacher_kl']:.3f} -> {after['teacher_kl']:.3f}"
            )
        return line
    return ""


def read_metrics(stage_dir: Path) -> list[dict]:
    """A stage's metrics.jsonl records (none if it wrote none)."""
    path = stage_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def levels_of(report: dict) -> list[str]:
    """The difficulty levels any evaluated stage has, in order."""
    found = {lv for r in report["stages"] if r["heldout"] for lv in r["heldout"]["by_level"]}
    return sorted(found, key=lambda lv: (len(lv), lv))


def tasks_of(report: dict) -> list[str]:
    """The tasks of the held-out rows, in order, when there are several (one column each)."""
    found = {t for r in report["stages"] if r["heldout"] for t in r["heldout"]["by_task"]}
    return sorted(found) if len(found) > 1 else []


def rewards_of(report: dict) -> list[str]:
    """The rewards any stage's evaluation scored besides accuracy (one column each);
    `answer_match` is the `reward` column already."""
    found = {k for r in report["stages"] if r["heldout"] for k in r["heldout"].get("rewards", {})}
    return sorted(found - {"answer_match"})


def reward_of(heldout: dict, name: str) -> float | None:
    """A stage's mean of evaluation reward `name` (None where it has none)."""
    return heldout.get("rewards", {}).get(name)


def reward_cells(heldout: dict, names: list[str]) -> list[str]:
    """A stage's evaluation rewards as table cells ('-' where it has none)."""
    values = [reward_of(heldout, name) for name in names]
    return ["-" if value is None else f"{value:.3f}" for value in values]


def table(report: dict) -> str:
    """The terminal table: one line per stage."""
    levels, tasks, rewards = levels_of(report), tasks_of(report), rewards_of(report)
    pass_k = next((r["heldout"]["pass_k"] for r in report["stages"] if r["heldout"]), 4)
    header = (
        f"{'stage':<14} {'command':<10} {'time':>7} {'tokens':>8} {'greedy':>7} "
        f"{f'pass@{pass_k}':>7} {'reward':>7}"
        + "".join(f" {task[:7]:>7}" for task in tasks)
        + "".join(f" {name[:13]:>13}" for name in rewards)
        + "".join(f" {'L' + lv:>5}" for lv in levels)
    )
    safety = has_safety(report)
    if safety:
        header += "".join(f" {title:>12}" for _, title in SAFETY_COLUMNS)
    lines = [header, "-" * len(header)]
    for r in report["stages"]:
        line = (
            f"{r['stage']:<14} {r['command']:<10} {_seconds(r['seconds']):>7} "
            f"{_tokens(r['tokens']):>8}"
        )
        h = r["heldout"]
        if h:
            line += f" {h['greedy_accuracy']:>7.3f} {h['pass@k']:>7.3f} {h['mean_reward']:>7.3f}"
            line += "".join(f" {h['by_task'].get(t, math.nan):>7.3f}" for t in tasks)
            line += "".join(f" {cell:>13}" for cell in reward_cells(h, rewards))
            line += "".join(f" {h['by_level'].get(lv, math.nan):>5.2f}" for lv in levels)
            if safety:
                line += "".join(f" {cell:>12}" for cell in safety_cells(h))
        lines.append(line)
    lines.append("-" * len(header))
    lines.append(f"total wall time {_seconds(report['total_seconds'])}")
    return "\n".join(lines)


def markdown(report: dict, name: str, plots: list[str]) -> str:
    """report.md: the table, what each stage did, and the plots."""
    levels, tasks, rewards = levels_of(report), tasks_of(report), rewards_of(report)
    pass_k = next((r["heldout"]["pass_k"] for r in report["stages"] if r["heldout"]), 4)
    n = next((r["heldout"]["n"] for r in report["stages"] if r["heldout"]), 0)
    head = ["stage", "command", "wall time", "tokens", "greedy acc", f"pass@{pass_k}", "reward"]
    head += [f"`{task}`" for task in tasks] + [f"`{name}`" for name in rewards]
    head += [f"level {lv}" for lv in levels]
    safety = has_safety(report)
    if safety:
        head += [title for _, title in SAFETY_COLUMNS]
    out = [
        f"# Pipeline `{name}`",
        "",
        f"Held-out evaluation of every stage's model on the same {n} rows. greedy acc: greedy "
        f"decoding; pass@{pass_k}: unbiased, from the sampled completions; reward: mean "
        "`answer_match` reward of the sampled completions (the share that is right); "
        + ("`task`: greedy accuracy on that task's rows; " if tasks else "")
        + ("`reward name`: that evaluation reward's mean over the samples; " if rewards else "")
        + "level N: greedy accuracy on the rows of difficulty level N.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in report["stages"]:
        cells = [r["stage"], r["command"], _seconds(r["seconds"]), _tokens(r["tokens"])]
        h = r["heldout"]
        if h:
            cells += [
                f"{h['greedy_accuracy']:.3f}",
                f"{h['pass@k']:.3f}",
                f"{h['mean_reward']:.3f}",
            ]
            cells += [f"{h['by_task'].get(t, math.nan):.3f}" for t in tasks]
            cells += reward_cells(h, rewards)
            cells += [f"{h['by_level'].get(lv, math.nan):.2f}" for lv in levels]
            cells += safety_cells(h) if safety else []
        else:
            blank = 3 + len(tasks) + len(rewards) + len(levels)
            blank += len(SAFETY_COLUMNS) if safety else 0
            cells += [""] * blank
        out.append("| " + " | ".join(cells) + " |")
    if safety:
        out += [
            "",
            "Safety, of the greedy completions: unsafe = share of the harmful prompts' "
            "completions the guard calls unsafe; refusal = share of harmful prompts refused; "
            "over-refusal = share of harmless prompts refused (standard errors in each stage's "
            "eval.txt).",
        ]
    out += [
        "",
        f"Total wall time: {_seconds(report['total_seconds'])}.",
        "",
        "## What each stage did",
        "",
    ]
    out += [f"- **{r['stage']}** ({r['command']}): {r['did']}" for r in report["stages"]]
    out += ["", "## Plots", ""]
    out += [f"![{p}]({p})" for p in plots]
    return "\n".join(out) + "\n"


def write(stages: list[tuple[str, str, bool]], run_dir: Path, name: str) -> dict:
    """Writes report.json, report.md and the plots; returns the report."""
    report = collect(stages, run_dir)
    plots = plot_accuracy(report, run_dir / "accuracy.png")
    plots += plot_safety(report, run_dir / "safety.png")
    for record in report["stages"]:
        stage_dir = run_dir / record["stage"]
        if record["command"] == "rl":
            plots += plot_rl(stage_dir, run_dir / f"{record['stage']}-rl.png")
        elif record["command"] == "distill":
            plots += plot_distill(stage_dir, run_dir / f"{record['stage']}-distill.png")
    report["plots"] = plots
    write_json_atomic(run_dir / "report.json", report)
    (run_dir / "report.md").write_text(markdown(report, name, plots), encoding="utf-8")
    return report


def plot_safety(report: dict, path: Path) -> list[str]:
    """The safety rates per evaluated stage, with one standard error as whiskers."""
    if not has_safety(report):
        return []
    evaluated = [r for r in report["stages"] if r["heldout"] and r["heldout"].get("safety")]
    plt = pyplot()
    fig, axis = plt.subplots(figsize=(8, 4))
    series = [
        (
            title,
            [r["heldout"]["safety"].get(key) or 0.0 for r in evaluated],
            [r["heldout"]["safety"].get(f"{key}_se") or 0.0 for r in evaluated],
        )
        for key, title in SAFETY_COLUMNS
    ]
    grouped_bars(
        axis,
        [r["stage"] for r in evaluated],
        series,
        "safety of the greedy completions per stage (+- 1 standard error)",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path.name]


def grouped_bars(axis, names: list[str], series: list[tuple], title: str) -> None:
    """One group of bars per name, one bar per series `(label, values)` or `(label, values,
    errors)` (one standard error as whiskers); the y axis is a share, 0 to 1."""
    xs = range(len(names))
    width = 0.8 / max(len(series), 1)
    for i, (label, values, *errors) in enumerate(series):
        axis.bar(
            [x - 0.4 + width * (i + 0.5) for x in xs],
            values,
            width,
            yerr=errors[0] if errors else None,
            capsize=3,
            label=label,
        )
    axis.set_xticks(list(xs), names, rotation=30, ha="right")
    axis.set_ylim(0, 1)
    axis.set_title(title)
    axis.legend()


def plot_accuracy(report: dict, path: Path) -> list[str]:
    """Held-out greedy accuracy and mean reward per evaluated stage, and per level."""
    evaluated = [r for r in report["stages"] if r["heldout"]]
    if not evaluated:
        return []
    plt = pyplot()
    levels = levels_of(report)
    names = [r["stage"] for r in evaluated]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    grouped_bars(
        left,
        names,
        [
            ("greedy accuracy", [r["heldout"]["greedy_accuracy"] for r in evaluated]),
            ("mean reward (sampled)", [r["heldout"]["mean_reward"] for r in evaluated]),
        ],
        "held-out accuracy per stage",
    )
    grouped_bars(
        right,
        names,
        [
            (f"level {lv}", [r["heldout"]["by_level"].get(lv, 0.0) for r in evaluated])
            for lv in levels
        ],
        "held-out greedy accuracy per difficulty level",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path.name]


def plot_rl(stage_dir: Path, path: Path) -> list[str]:
    """Training reward, the prompt pool and its rollout groups, and the held-out curve over RL
    steps."""
    metrics = read_metrics(stage_dir)
    trained = [m for m in metrics if "train/reward_mean" in m]
    pool = [m for m in metrics if "pool/active" in m]
    result = (read_done_marker(stage_dir) or {"result": {}})["result"]
    curve = result.get("curve") or []
    if not trained:
        return []
    plt = pyplot()
    fig, (reward, groups, heldout) = plt.subplots(1, 3, figsize=(15, 4))
    reward.plot([m["step"] for m in trained], [m["train/reward_mean"] for m in trained])
    reward.set_title("training reward (mean over the step's samples)")
    reward.set_xlabel("step")
    steps = [m["step"] for m in pool]
    groups.plot(
        steps,
        [m["pool/active"] / max(m["pool/total"], 1) for m in pool],
        label="share of prompts active",
    )
    scored = [m for m in pool if "pool/mean_difficulty" in m]
    if scored:
        groups.plot(
            [m["step"] for m in scored],
            [m["pool/mean_difficulty"] for m in scored],
            label="mean difficulty of active prompts",
        )
    for key, label in (
        ("pool/rollout/all_passed", "groups all right (no signal)"),
        ("pool/rollout/none_passed", "groups all wrong (no signal)"),
    ):
        points = _per_step_share(pool, key)
        groups.plot([p[0] for p in points], [p[1] for p in points], label=label)
    groups.set_ylim(0, 1.05)
    groups.set_title("prompt pool and the groups generated per step")
    groups.set_xlabel("step")
    groups.legend()
    if curve:
        steps = [c["step"] for c in curve]
        heldout.plot(
            steps, [c["greedy_accuracy"] for c in curve], marker="o", label="greedy accuracy"
        )
        heldout.plot(
            steps, [c["sample_accuracy"] for c in curve], marker="o", label="mean reward (sampled)"
        )
        heldout.legend()
    heldout.set_title("held-out accuracy during RL")
    heldout.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path.name]


def _per_step_share(pool: list[dict], key: str) -> list[tuple[int, float]]:
    """Per step, the share of the groups recorded during that step that `key` counts: the pool
    reports shares over the groups since its latest re-score, so consecutive rows are
    differenced. A re-score logs its own row (its `pool/rescores` one higher, the old window's
    groups) and then starts a new window, whose first row is taken as it is."""
    points, before, rescores = [], None, None
    for m in pool:
        groups = m.get("pool/rollout/groups")
        if groups is not None and key in m:
            count = m[key] * groups
            if before is None:
                points.append((m["step"], m[key]))
            elif groups > before[0]:
                points.append((m["step"], (count - before[1]) / (groups - before[0])))
            before = (groups, count)
        if rescores is not None and m.get("pool/rescores") != rescores:
            before = None
        rescores = m.get("pool/rescores")
    return points


def plot_distill(stage_dir: Path, path: Path) -> list[str]:
    """Soft (teacher) and hard (label) loss, alpha and teacher KL over distillation steps."""
    logged = [m for m in read_metrics(stage_dir) if "train/soft_loss" in m]
    if not logged:
        return []
    plt = pyplot()
    steps = [m["step"] for m in logged]
    fig, (losses, weights) = plt.subplots(1, 2, figsize=(12, 4))
    losses.plot(steps, [m["train/soft_loss"] for m in logged], label="soft loss (teacher)")
    losses.plot(steps, [m["train/hard_loss"] for m in logged], label="hard loss (labels)")
    losses.plot(steps, [m["train/teacher_kl"] for m in logged], label="KL(teacher || student)")
    losses.set_yscale("log")
    losses.set_xlabel("step")
    losses.set_title("distillation losses")
    losses.legend()
    weights.plot(steps, [m["train/alpha"] for m in logged], label="alpha (scheduled)")
    weights.plot(steps, [m["train/effective_alpha"] for m in logged], label="effective alpha")
    weights.set_ylim(0, 1.05)
    weights.set_xlabel("step")
    weights.set_title("weight of the soft targets")
    weights.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path.name]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)}m{seconds % 60:02.0f}s"


def _tokens(n: int | None) -> str:
    if n is None:
        return ""
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.0f} k"
