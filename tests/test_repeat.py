"""`align run FILE --seeds K`: seeds offset everywhere, intervals and paired differences."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import yaml

from align.config import load_config
from pipelines import pipeline, repeat

REPO_ROOT = Path(__file__).resolve().parents[1]


def resolved(path: Path, seed: int) -> dict:
    config = load_config(pipeline.Config, path, [f"seed={seed}"])
    return {e.name: c for e, c in pipeline.resolve_stages(config, str(path))}


def test_a_seed_offset_reaches_every_seed_of_every_stage():
    """Seed 3 of the default pipeline: every seed in every stage (set or left at its default,
    in nested sections, engines and a filter's options) is seed 1's plus 2."""
    path = REPO_ROOT / "pipelines" / "default.yaml"
    base, offset = resolved(path, 1), resolved(path, 3)

    def seeds(value, where=""):
        if isinstance(value, dict):
            for key, item in value.items():
                yield from seeds(item, f"{where}.{key}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                yield from seeds(item, f"{where}[{i}]")
        elif where.endswith(".seed"):
            yield where, value

    from align.config import to_dict

    found = 0
    for name in base:
        before, after = to_dict(base[name]), to_dict(offset[name])
        pairs = dict(seeds(before)), dict(seeds(after))
        assert pairs[0].keys() == pairs[1].keys(), name
        assert all(pairs[1][k] == pairs[0][k] + 2 for k in pairs[0]), (name, pairs)
        found += len(pairs[0])
    assert found >= 20
    # The difficulty filter's sampling seed is an option of its plug-in.
    assert offset["filter"].filters[1].options["seed"] == 3
    assert offset["rl"].engine.seed == 3 and offset["rl"].eval.engine.seed == 3


def test_the_default_comparisons_pair_each_trained_stage_with_where_it_started():
    config = load_config(pipeline.Config, REPO_ROOT / "pipelines" / "default.yaml")
    assert repeat.comparisons(config) == [
        ("eval-student", "reference"),
        ("eval-teacher", "sft"),
        ("sft", "rl"),
        ("rl", "dpo"),
        ("eval-student", "distill"),
    ]


def _report(
    greedy: dict[str, float], reward: dict[str, float], rewards: dict | None = None
) -> dict:
    return {
        "stages": [
            {
                "stage": stage,
                "heldout": {
                    "n": 100,
                    "greedy_accuracy": greedy[stage],
                    "mean_reward": reward[stage],
                    "pass@k": reward[stage] + 0.1,
                    "pass_k": 4,
                    "rewards": (rewards or {}).get(stage, {}),
                },
            }
            for stage in greedy
        ]
    }


def _compared(command: str) -> pipeline.Config:
    """Stage a (an evaluation) and stage b (`command`), compared."""
    return pipeline.Config(
        stages=[
            pipeline.StageEntry("a", "eval", {"model": "x"}),
            pipeline.StageEntry("b", command, {"model": "x"}),
        ],
        compare=[["a", "b"]],
    )


def test_intervals_and_paired_differences_from_the_seeds_reports():
    config = _compared("sft")
    a, b = [0.30, 0.34, 0.32], [0.40, 0.41, 0.45]
    reports = {s: _report({"a": a[s], "b": b[s]}, {"a": 0.2, "b": 0.2}) for s in range(3)}
    summary = repeat.summarize(config, reports)
    first = summary["stages"][0]
    assert first["greedy_accuracy"]["mean"] == pytest.approx(0.32)
    assert first["greedy_accuracy"]["ci95"] == pytest.approx(4.303 * 0.02 / math.sqrt(3))
    assert first["heldout_se"] == pytest.approx(math.sqrt(0.32 * 0.68 / 100))
    (pair,) = summary["pairs"]
    differences = [y - x for x, y in zip(a, b, strict=True)]  # paired: 0.10, 0.07, 0.13
    assert pair["greedy_accuracy"]["mean"] == pytest.approx(0.1)
    assert pair["greedy_accuracy"]["ci95"] == pytest.approx(
        4.303 * statistics.stdev(differences) / math.sqrt(3)
    )
    assert repeat._verdict(pair["greedy_accuracy"]) == "b higher"
    # Equal sample accuracy on every seed: a difference of 0 with no spread is not "higher".
    assert repeat._verdict(pair["mean_reward"]) == "no difference shown"
    table = repeat.markdown_tables(summary)
    assert "| b - a | +0.100 ± 0.075 | +0.000 ± 0.000 |" in table
    assert table.splitlines()[-1].endswith(" | b higher: greedy acc |")


def test_evaluation_rewards_get_intervals_and_paired_differences_too():
    config = _compared("dpo")
    fmt_a, fmt_b = [0.50, 0.40, 0.45], [0.90, 0.95, 0.70]
    reports = {
        s: _report(
            {"a": 0.3, "b": 0.3},
            {"a": 0.2, "b": 0.2},
            {
                "a": {"answer_format": fmt_a[s], "answer_match": 0.2},
                "b": {"answer_format": fmt_b[s]},
            },
        )
        for s in range(3)
    }
    summary = repeat.summarize(config, reports)
    # answer_match is the sample accuracy column already.
    assert summary["rewards"] == ["answer_format"]
    first, second = summary["stages"]
    assert first["reward/answer_format"]["mean"] == pytest.approx(0.45)
    assert second["reward/answer_format"]["values"] == fmt_b
    (pair,) = summary["pairs"]
    differences = [y - x for x, y in zip(fmt_a, fmt_b, strict=True)]  # 0.40, 0.55, 0.25
    assert pair["reward/answer_format"]["mean"] == pytest.approx(0.4)
    assert pair["reward/answer_format"]["ci95"] == pytest.approx(
        4.303 * statistics.stdev(differences) / math.sqrt(3)
    )
    table = repeat.markdown_tables(summary)
    assert "`answer_format`" in table and "| 0.450 ± " in table and "+0.400 ± 0.373" in table
    # Equal accuracies, a higher format reward: the verdict names the reward, not "no difference".
    assert table.splitlines()[-1].endswith(" | b higher: `answer_format` |")


def test_the_plot_draws_each_evaluation_reward_beside_the_accuracies(tmp_path, monkeypatch):
    from pipelines import report

    config = _compared("dpo")
    rewards = {"a": {"answer_format": 0.5}, "b": {}}  # stage b's evaluation lacks the reward
    reports = {s: _report({"a": 0.3, "b": 0.4}, {"a": 0.2, "b": 0.25}, rewards) for s in range(3)}
    summary = repeat.summarize(config, reports)
    plt = report.pyplot()
    monkeypatch.setattr(plt, "close", lambda fig: None)
    assert repeat.plot(summary, tmp_path / "seeds.png") == ["seeds.png"]
    ax = plt.gcf().axes[0]
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend == ["greedy acc", "sample acc", "answer_format"]
    # Two stages x two accuracies, and the reward's bar for stage a only.
    heights = sorted(round(bar.get_height(), 3) for bar in ax.patches)
    assert heights == [0.2, 0.25, 0.3, 0.4, 0.5]
    plt.close("all")


def test_each_task_gets_intervals_and_paired_differences_when_the_rows_mix_tasks(
    tmp_path, monkeypatch
):
    """A mixture's mean can hide a task that gains and one that loses: here b is level with a
    overall, `sort` higher in every seed, `add` lower in two."""
    from pipelines import report

    config = _compared("sft")
    sort_a, sort_b = [0.50, 0.45, 0.60], [0.70, 0.65, 0.80]
    add_a, add_b = [0.95, 0.90, 0.95], [0.40, 0.90, 0.90]
    reports = {}
    for s in range(3):
        reports[s] = _report({"a": 0.7, "b": 0.7}, {"a": 0.5, "b": 0.5})
        for stage, by_task in zip(
            reports[s]["stages"],
            (
                {"add": add_a[s], "sort": sort_a[s]},
                {"add": add_b[s], "sort": sort_b[s]},
            ),
            strict=True,
        ):
            stage["heldout"]["by_task"] = by_task
    summary = repeat.summarize(config, reports)
    assert summary["tasks"] == ["add", "sort"]
    assert summary["stages"][1]["by_task"]["sort"]["values"] == sort_b
    (pair,) = summary["pairs"]
    assert pair["by_task"]["sort"]["mean"] == pytest.approx(0.2)
    assert pair["by_task"]["sort"]["ci95"] == pytest.approx(0.0, abs=1e-12)
    assert repeat._verdict(pair["by_task"]["sort"]) == "b higher"
    assert pair["by_task"]["add"]["values"] == pytest.approx([-0.55, 0.0, -0.05])
    table = repeat.markdown_tables(summary)
    assert "| stage | greedy acc `add` | greedy acc `sort` |" in table
    assert "| a | 0.933 ± 0.072 | 0.517 ± 0.190 |" in table
    assert table.splitlines()[-1] == (
        "| b - a | -0.200 ± 0.756 | +0.200 ± 0.000 | b higher: `sort` |"
    )
    plt = report.pyplot()
    monkeypatch.setattr(plt, "close", lambda fig: None)
    assert repeat.plot_tasks(summary, tmp_path / "seeds-tasks.png") == ["seeds-tasks.png"]
    ax = plt.gcf().axes[0]
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["add", "sort"]
    heights = sorted(round(bar.get_height(), 3) for bar in ax.patches)
    assert heights == [0.517, 0.717, 0.733, 0.933]
    plt.close("all")
    # One task only: no per-task figures, no second plot.
    for r in reports.values():
        for stage in r["stages"]:
            stage["heldout"]["by_task"] = {"sort": 0.5}
    single = repeat.summarize(config, reports)
    assert single["tasks"] == [] and "greedy acc `" not in repeat.markdown_tables(single)
    assert repeat.plot_tasks(single, tmp_path / "none.png") == []


def test_t_quantiles():
    assert repeat.t95(2) == 4.303 and repeat.t95(30) == 2.042
    assert repeat.t95(60) == pytest.approx(2.000, abs=2e-3)
    assert repeat.t95(10_000) == pytest.approx(1.960, abs=1e-3)


def test_seeds_run_every_repetition_into_its_own_directory(tmp_path, quick_align):
    path = tmp_path / "p.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "p",
                "runs_dir": str(tmp_path / "runs"),
                "stages": [
                    {
                        "name": "data",
                        "command": "make-data",
                        "config": {"tasks": ["add"], "levels": [1], "per_level": 6},
                    }
                ],
            }
        )
    )
    out = quick_align("run", str(path), "--seeds", "2")
    assert out.returncode == 0, out.stderr[-2000:]
    root = tmp_path / "runs" / "p"
    rows = [(root / f"seed-{s}" / "data" / "train" / "problems.jsonl").read_text() for s in (0, 1)]
    assert rows[0] != rows[1]
    assert (root / "seeds.md").is_file()
    assert json.loads((root / "seeds.json").read_text())["seeds"] == [0, 1]
    out = quick_align("run", str(path), "--seeds", "0")
    assert out.returncode == 2 and "--seeds must be >= 1" in out.stderr
