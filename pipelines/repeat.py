"""`align run FILE --seeds K`: a pipeline repeated with K seeds, and what the repetitions say.

Repetition k is the pipeline with every seed of every stage offset by `seed + k` (the file's
`seed` key, pipelines/pipeline.py), written to `runs/<name>/seed-<seed + k>/` with its own
stages and report. Finished stages are skipped as in any pipeline run, so a run cut short
resumes and `--seeds 5` after `--seeds 3` runs the two new seeds only.

Then `runs/<name>/seeds.json`, `seeds.md` and `seeds.png`: for every evaluated stage, each
held-out figure's mean over the seeds with a 95% confidence interval (Student's t over the
seeds), and the standard error of one evaluation (binomial, over the held-out rows: how much
of the spread the held-out set alone explains); for each compared pair of stages [a, b] the
paired difference b - a, seed by seed, with its interval, and whether the interval excludes 0.
When the held-out rows hold several tasks, the same for each task's greedy accuracy (a table
and `seeds-tasks.png`): a mixture's mean can hide a task that gains and one that loses.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

from align.runs import write_json_atomic
from pipelines import pipeline, report

# Two-sided 95% quantiles of Student's t for 1 to 30 degrees of freedom.
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
# The held-out figures summarised: report.heldout_summary's keys, and how the report names them.
FIGURES = {"greedy_accuracy": "greedy acc", "mean_reward": "sample acc", "pass@k": "pass@k"}


def t95(df: int) -> float:
    """The two-sided 95% quantile of Student's t with `df` degrees of freedom."""
    if df <= len(_T95):
        return _T95[df - 1]
    z = 1.959964  # Cornish-Fisher: within 0.001 of the exact quantile above 30 df
    return z + (z**3 + z) / (4 * df)


def interval(values: list[float]) -> dict:
    """Mean and 95% confidence half-width of `values` (nan with one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "ci95": math.nan, "n": len(values), "values": values}
    half = t95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "ci95": half, "n": len(values), "values": values}


def seed_configs(config: pipeline.Config, seeds: int) -> list[pipeline.Config]:
    """The pipeline's K repetitions: `runs/<name>/seed-<s>/`, seeds offset by s."""
    root = str(Path(config.runs_dir) / config.name)
    return [
        dataclasses.replace(config, runs_dir=root, name=f"seed-{seed}", seed=seed)
        for seed in range(config.seed, config.seed + seeds)
    ]


def run(
    config: pipeline.Config,
    repetitions: list[tuple[pipeline.Config, list]],
    source: str,
    rerun_from: str | None = None,
) -> dict:
    """Runs the repetitions (`seed_configs` with their stages resolved; every one's inputs
    checked before the first runs) and writes the summary; returns it."""
    seeds = len(repetitions)
    for repetition, resolved in repetitions:
        pipeline.check_inputs(repetition, resolved, source=source)
    for number, (repetition, resolved) in enumerate(repetitions, start=1):
        print(f"\n=== {repetition.name} ({number} of {seeds}) ===", flush=True)
        pipeline.run(repetition, resolved, rerun_from=rerun_from)
    summary = write(config, [c for c, _ in repetitions])
    print(f"\npipeline {config.name}: {seeds} seeds", flush=True)
    print(markdown_tables(summary), flush=True)
    print(f"report: {Path(config.runs_dir) / config.name / 'seeds.md'}", flush=True)
    return summary


def comparisons(config: pipeline.Config) -> list[tuple[str, str]]:
    """The pairs of stages compared: the file's `compare`, or each stage that trains a model
    against the stage evaluating the model it starts from (`sft` from `{run}/teacher/model`
    against the `eval` stage of that checkpoint; `rl` from `{run}/sft/model` against `sft`)."""
    if config.compare:
        return [(a, b) for a, b in config.compare]
    commands = {entry.name: entry.command for entry in config.stages}
    evaluators = {
        entry.config.get("model"): entry.name for entry in config.stages if entry.command == "eval"
    }
    pairs = []
    for entry in config.stages:
        if entry.command not in ("sft", "rl", "dpo", "distill"):
            continue
        start = entry.config.get("student" if entry.command == "distill" else "model")
        parts = start.split("/") if isinstance(start, str) else []
        if len(parts) != 3 or parts[0] != "{run}" or parts[2] != "model":
            continue
        before = parts[1]
        if commands.get(before) in ("sft", "rl", "dpo", "distill"):
            pairs.append((before, entry.name))
        elif start in evaluators:
            pairs.append((evaluators[start], entry.name))
    return pairs


def summarize(config: pipeline.Config, reports: dict[int, dict]) -> dict:
    """The summary of the repetitions' reports (seed -> report.json): per stage and pair."""
    seeds = sorted(reports)
    by_seed = {
        seed: {r["stage"]: r["heldout"] for r in reports[seed]["stages"] if r["heldout"]}
        for seed in seeds
    }
    # The evaluations' own rewards (report.rewards_of), summarised like the figures.
    rewards = report.rewards_of({"stages": [r for s in seeds for r in reports[s]["stages"]]})
    # Reports written before evaluations counted tasks have no by_task: no per-task figures.
    tasks = sorted(
        {t for runs in by_seed.values() for r in runs.values() for t in r.get("by_task", {})}
    )
    tasks = tasks if len(tasks) > 1 else []
    stages = []
    for entry in config.stages:
        runs = [by_seed[seed][entry.name] for seed in seeds if entry.name in by_seed[seed]]
        if not runs:
            continue
        greedy = statistics.fmean(r["greedy_accuracy"] for r in runs)
        stages.append(
            {
                "stage": entry.name,
                "command": entry.command,
                "rows": runs[0]["n"],
                "heldout_se": math.sqrt(greedy * (1 - greedy) / runs[0]["n"]),
                **{key: interval([r[key] for r in runs]) for key in FIGURES},
                **{
                    f"reward/{name}": interval(values)
                    for name in rewards
                    if (values := _reward_values(runs, name))
                },
                "by_task": {
                    task: interval(values)
                    for task in tasks
                    if (
                        values := [r["by_task"][task] for r in runs if task in r.get("by_task", {})]
                    )
                },
            }
        )
    pairs = []
    for a, b in comparisons(config):
        both = [seed for seed in seeds if {a, b} <= set(by_seed[seed])]
        if not both:
            continue
        pairs.append(
            {
                "a": a,
                "b": b,
                **{
                    key: interval([by_seed[s][b][key] - by_seed[s][a][key] for s in both])
                    for key in FIGURES
                },
                **{
                    f"reward/{name}": interval([after - before for before, after in values])
                    for name in rewards
                    if (values := _paired_rewards([by_seed[s] for s in both], a, b, name))
                },
                "by_task": {
                    task: interval(values)
                    for task in tasks
                    if (values := _paired_task([by_seed[s] for s in both], a, b, task))
                },
            }
        )
    pass_k = next((r["pass_k"] for runs in by_seed.values() for r in runs.values()), 4)
    return {
        "name": config.name,
        "seeds": seeds,
        "pass_k": pass_k,
        "rewards": rewards,
        "tasks": tasks,
        "stages": stages,
        "pairs": pairs,
    }


def _reward_values(runs: list[dict], name: str) -> list[float]:
    """One stage's mean of evaluation reward `name` per seed (seeds without it left out)."""
    values = [report.reward_of(r, name) for r in runs]
    return [v for v in values if v is not None]


def _paired_rewards(seeds: list[dict], a: str, b: str, name: str) -> list[tuple[float, float]]:
    """(a's, b's) mean of evaluation reward `name` per seed where both stages have it."""
    pairs = [(report.reward_of(s[a], name), report.reward_of(s[b], name)) for s in seeds]
    return [(x, y) for x, y in pairs if x is not None and y is not None]


def _paired_task(seeds: list[dict], a: str, b: str, task: str) -> list[float]:
    """b's greedy accuracy on `task` minus a's, per seed where both stages have the task."""
    return [
        s[b]["by_task"][task] - s[a]["by_task"][task]
        for s in seeds
        if task in s[a].get("by_task", {}) and task in s[b].get("by_task", {})
    ]


def write(config: pipeline.Config, repetitions: list[pipeline.Config]) -> dict:
    """Reads every finished repetition's report.json, writes seeds.json, seeds.md, seeds.png."""
    reports = {}
    for repetition in repetitions:
        path = Path(repetition.runs_dir) / repetition.name / "report.json"
        if path.exists():
            reports[repetition.seed] = json.loads(path.read_text(encoding="utf-8"))
    summary = summarize(config, reports)
    root = Path(config.runs_dir) / config.name
    plots = plot(summary, root / "seeds.png") + plot_tasks(summary, root / "seeds-tasks.png")
    write_json_atomic(root / "seeds.json", summary)
    (root / "seeds.md").write_text(markdown(summary, plots), encoding="utf-8")
    return summary


def _cell(figure: dict, signed: bool = False) -> str:
    sign = "+" if signed else ""
    if math.isnan(figure["ci95"]):
        return f"{figure['mean']:{sign}.3f}"
    return f"{figure['mean']:{sign}.3f} ± {figure['ci95']:.3f}"


def _verdict(difference: dict) -> str:
    low = difference["mean"] - difference["ci95"]
    high = difference["mean"] + difference["ci95"]
    if math.isnan(difference["ci95"]):
        return "one seed: no interval"
    if low > 0:
        return "b higher"
    if high < 0:
        return "b lower"
    return "no difference shown"


def markdown_tables(summary: dict) -> str:
    """The two tables: stages (mean ± 95% half-width) and paired differences."""
    names = {**FIGURES, "pass@k": f"pass@{summary['pass_k']}"}
    names.update({f"reward/{name}": f"`{name}`" for name in summary.get("rewards", [])})
    head = ["stage", *names.values(), "1 SE (held-out)", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary["stages"]:
        cells = [s["stage"], *(_cell(s[k]) if k in s else "-" for k in names)]
        cells.append(f"{s['heldout_se']:.3f}")
        lines.append("| " + " | ".join([*cells, str(s[next(iter(FIGURES))]["n"])]) + " |")
    if summary["pairs"]:
        head = ["b - a", *(f"Δ {name}" for name in names.values()), "b vs a"]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for p in summary["pairs"]:
            cells = [f"{p['b']} - {p['a']}"]
            cells += [_cell(p[k], signed=True) if k in p else "-" for k in names]
            shown = {key: name for key, name in names.items() if key in p}
            lines.append("| " + " | ".join([*cells, _verdicts(p, shown)]) + " |")
    if summary.get("tasks"):
        lines += ["", *_task_table(summary)]
    return "\n".join(lines)


def _task_table(summary: dict) -> list[str]:
    """Greedy accuracy per task: a table of the stages, one of the compared pairs."""
    tasks = summary["tasks"]
    head = ["stage", *(f"greedy acc `{task}`" for task in tasks)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary["stages"]:
        cells = [_cell(s["by_task"][t]) if t in s["by_task"] else "-" for t in tasks]
        lines.append("| " + " | ".join([s["stage"], *cells]) + " |")
    if summary["pairs"]:
        head = ["b - a", *(f"Δ `{task}`" for task in tasks), "b vs a"]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in summary["pairs"]:
        shown = {task: f"`{task}`" for task in tasks if task in p["by_task"]}
        cells = [_cell(p["by_task"][t], signed=True) if t in shown else "-" for t in tasks]
        verdict = _verdicts(p["by_task"], shown) if shown else "-"
        lines.append("| " + " | ".join([f"{p['b']} - {p['a']}", *cells, verdict]) + " |")
    return lines


def _verdicts(pair: dict, names: dict[str, str]) -> str:
    """The figures whose paired interval excludes 0, by direction: "b higher: greedy acc,
    `answer_format`"; "no difference shown" when none does."""
    by_verdict: dict[str, list[str]] = {}
    for key, name in names.items():
        by_verdict.setdefault(_verdict(pair[key]), []).append(name)
    shown = [f"{v}: {', '.join(by_verdict[v])}" for v in ("b higher", "b lower") if v in by_verdict]
    if shown:
        return "; ".join(shown)
    return next(iter(by_verdict))  # "one seed: no interval" or "no difference shown"


def markdown(summary: dict, plots: list[str]) -> str:
    """seeds.md: what the numbers are, the tables, the plot."""
    seeds = summary["seeds"]
    out = [
        f"# Pipeline `{summary['name']}` over {len(seeds)} seeds ({', '.join(map(str, seeds))})",
        "",
        "Every figure is the mean over the seeds ± the half-width of its 95% confidence "
        "interval (Student's t, seeds as the samples). greedy acc: greedy decoding; sample "
        "acc: the share of sampled completions that are right; 1 SE (held-out): the binomial "
        "standard error of one greedy evaluation on the held-out rows, the part of the spread "
        "the held-out set alone explains. Differences are paired by seed (b - a on the same "
        "seed's data and models); 'b higher: X' means the interval of X's difference is above 0.",
        "",
        markdown_tables(summary),
        "",
    ]
    out += [f"![{p}]({p})" for p in plots]
    return "\n".join(out) + "\n"


def plot(summary: dict, path: Path) -> list[str]:
    """Greedy and sample accuracy per stage, and each reward the evaluation names (e.g. a
    format reward), mean with 95% interval bars and each seed's value as a dot."""
    labels = {key: FIGURES[key] for key in ("greedy_accuracy", "mean_reward")}
    labels.update({f"reward/{name}": name for name in summary.get("rewards", [])})
    ylabel = "held-out accuracy" + (" / reward" if len(labels) > 2 else "")
    series = {
        label: [(j, s[key]) for j, s in enumerate(summary["stages"]) if key in s]
        for key, label in labels.items()
    }
    title = f"{summary['name']}: mean over {len(summary['seeds'])} seeds, 95% intervals"
    return _bars(summary["stages"], series, ylabel, title, path)


def plot_tasks(summary: dict, path: Path) -> list[str]:
    """Greedy accuracy per stage and task (held-out rows of several tasks only), drawn as
    `plot` draws the overall figures."""
    if not summary.get("tasks"):
        return []
    series = {
        task: [
            (j, s["by_task"][task]) for j, s in enumerate(summary["stages"]) if task in s["by_task"]
        ]
        for task in summary["tasks"]
    }
    title = f"{summary['name']}: greedy accuracy per task, {len(summary['seeds'])} seeds"
    return _bars(summary["stages"], series, "held-out greedy accuracy", title, path)


def _bars(
    stages: list[dict], series: dict[str, list], ylabel: str, title: str, path: Path
) -> list[str]:
    """Grouped bars, one group per stage and one bar per series ((stage index, interval)
    pairs): the mean, its 95% interval, each seed's value as a dot."""
    if not stages:
        return []
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(series) * len(stages) + 2), 4))
    width = 0.8 / len(series)
    for i, (label, shown) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j, _ in shown]
        means = [figure["mean"] for _, figure in shown]
        errors = [0 if math.isnan(figure["ci95"]) else figure["ci95"] for _, figure in shown]
        ax.bar(xs, means, width, yerr=errors, capsize=3, label=label)
        for x, (_, figure) in zip(xs, shown, strict=True):
            ax.scatter([x] * len(figure["values"]), figure["values"], s=8, color="black")
    ax.set_xticks(range(len(stages)), [s["stage"] for s in stages], rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path.name]
