"""`align filter` end to end: drop the easiest half, cached re-tuning, buckets and errors."""

from __future__ import annotations

import json
import statistics

import pytest
import yaml
from datasets import load_from_disk

from align.tasks import make_problems, to_sft
from tests.helpers import align

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, partially_trained):
    """SFT rows of both tasks, levels 1-4 (6 per task x level; one exact duplicate added)."""
    rows = list(to_sft(make_problems(["add", "sort"], [1, 2, 3, 4], 6, seed=3)))
    rows.append(dict(rows[5]))
    path = tmp_path_factory.mktemp("filter_data") / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def write_config(tmp_path, data, model, keep, name="prune") -> str:
    config = {
        "name": name,
        "runs_dir": str(tmp_path / "runs"),
        "data": str(data),
        "filters": [
            {"name": "dedup", "options": {"mode": "exact"}, "keep": {"max": 0.0}},
            {
                "name": "difficulty",
                "options": {"model": str(model), "samples": 4, "max_new_tokens": 16},
                "keep": keep,
            },
        ],
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def outcomes(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "scores.jsonl").read_text().splitlines()]


def test_drop_the_easiest_half_then_retune_from_cache(tmp_path, sft_data, partially_trained):
    data, rows = sft_data
    model = partially_trained["checkpoint"]
    config = write_config(tmp_path, data, model, {"drop_lowest": 0.5})
    out = align("filter", "--config", config)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "runs" / "prune"

    kept, dropped = load_from_disk(str(run_dir / "kept")), load_from_disk(str(run_dir / "dropped"))
    assert len(kept) == 24 and len(dropped) == 25  # 49 rows - 1 duplicate = 48, half of it kept
    assert list(dropped["filtered_by"]).count("0:dedup") == 1
    assert sorted(list(kept["id"]) + list(dropped["id"])) == sorted(r["id"] for r in rows)

    lines = outcomes(run_dir)
    assert lines[-1]["outcome"] == "dropped by 0:dedup" and lines[-1]["scores"]["0:dedup"] == 1.0
    scored = [line for line in lines if "1:difficulty" in line["scores"]]
    kept_scores = [x["scores"]["1:difficulty"] for x in scored if x["outcome"] == "kept"]
    dropped_scores = [x["scores"]["1:difficulty"] for x in scored if x["outcome"] != "kept"]
    assert min(kept_scores) >= max(dropped_scores)
    assert statistics.fmean(kept_scores) > statistics.fmean(dropped_scores)
    # The partially trained model never learnt `add`: every add row is as hard as it gets.
    add_scores = [
        x["scores"]["1:difficulty"]
        for x, r in zip(lines, rows, strict=True)
        if r["task"] == "add" and "1:difficulty" in x["scores"]
    ]
    assert set(add_scores) == {1.0}

    report = json.loads((run_dir / "report.json").read_text())
    assert report["output"] == {"kept": 24, "dropped": 25, "unscored": 0}
    assert report["filters"][1]["computed"] == 48
    assert (run_dir / "histogram-1-difficulty.png").stat().st_size > 1000
    assert "kept 24, dropped 25, unscored 0" in out.stdout

    # Re-tune: keep only rows at least 3/4 hard. Scores come from the cache; no engine starts.
    out = align(
        "filter", "--config", config, "filters.1.keep.drop_lowest=null", "filters.1.keep.min=0.75"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["filters"][1]["computed"] == 0
    assert "vLLM engine" not in (run_dir / "log.txt").read_text().split("filter 2/2")[-1]
    expected = sum(
        x["scores"]["1:difficulty"] >= 0.75
        for x in outcomes(run_dir)
        if "1:difficulty" in x["scores"]
    )
    assert report["output"]["kept"] == expected == len(load_from_disk(str(run_dir / "kept")))


def test_plugin_reward_from_yaml_and_the_unscored_bucket(tmp_path, sft_data, partially_trained):
    """A reward in a module outside the repo, named in YAML, scores `sort` rows only: the rows
    it does not apply to (None) and the rows without an answer land in `unscored/`."""
    data, rows = sft_data
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "sort_only.py").write_text(
        "def sorted_letters(prompts, completions, task=None, answer=None, **columns):\n"
        "    return [None if t != 'sort' or a is None else float(f'<answer>{a}</answer>' in c)\n"
        "            for c, t, a in zip(completions, task, answer)]\n"
    )
    mixed = [{**r, "answer": None} if i % 4 == 0 else r for i, r in enumerate(rows[:48])]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in mixed))
    config = write_config(tmp_path, path, partially_trained["checkpoint"], {"max": 1.0})
    out = align(
        "filter",
        "--config",
        config,
        "filters.1.options.rewards=[{name: 'sort_only:sorted_letters'}]",
        env={"PYTHONPATH": str(plugins)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "runs" / "prune"
    unscored = load_from_disk(str(run_dir / "unscored"))
    expected = [r["id"] for r in mixed if r["task"] == "add" or r["answer"] is None]
    assert sorted(list(unscored["id"])) == sorted(expected)
    assert set(list(unscored["filtered_by"])) == {"1:difficulty"}
    assert f"could not score {len(expected)} rows" in out.stderr
    kept = load_from_disk(str(run_dir / "kept"))
    assert set(list(kept["task"])) == {"sort"} and len(kept) == 48 - len(expected)
    metrics = json.loads((run_dir / "report.json").read_text())["filters"][1]["metrics"]
    assert metrics["reward/sort_only:sorted_letters/not_applicable"] == 4 * len(expected)


def test_filtering_everything_away_is_an_error(tmp_path, sft_data, quick_align):
    # Whatever the filter (the stage's check, not the score): rows longer than 10^6 characters.
    data, _ = sft_data
    filters = "filters=[{name: length, options: {unit: chars}, keep: {min: 1000000}}]"
    out = quick_align("filter", f"data={data}", f"runs_dir={tmp_path}", filters)
    assert out.returncode == 2
    assert "filtering kept no rows; loosen the thresholds" in out.stderr


def test_unknown_filter_is_refused_before_any_work(tmp_path, sft_data, quick_align):
    data, _ = sft_data
    out = quick_align(
        "filter", f"data={data}", f"runs_dir={tmp_path}", "filters=[{name: difficulity}]"
    )
    assert out.returncode == 2
    assert "filters[0].name" in out.stderr and "Did you mean 'difficulty'" in out.stderr
    assert not any(tmp_path.iterdir())
