"""The default pipeline end to end (what `make run` runs), and pipeline files checked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.helpers import align

REPO_ROOT = Path(__file__).resolve().parents[1]


def small_default_pipeline(runs: Path) -> Path:
    """pipelines/default.yaml with every budget cut down (same stages, same wiring, same code).

    The student is the dense preset (no experts): the stages it passes through (make-model,
    eval, the reference SFT, the difficulty filter's engine, distillation from the MoE teacher)
    run on a dense model too, with the MoE settings of default.yaml left as they are.
    """
    config = yaml.safe_load((REPO_ROOT / "pipelines" / "default.yaml").read_text())
    config["runs_dir"] = str(runs)
    config["evaluation"]["settings"] = {"samples": 4, "pass_k": 4}
    stages = {s["name"]: s["config"] for s in config["stages"]}
    stages["student"]["preset"] = "dense-student"
    stages["data"]["per_level"] = 12
    stages["data"]["heldout_per_level"] = 2
    stages["reference"]["train"]["token_budget"] = 30000
    stages["filter"]["filters"][1]["options"]["samples"] = 4
    # Enough for the policy to solve some prompts (39 of 80 in the RL pool's band when
    # measured): at 30 k tokens it solved none and RL stopped, every group constant.
    stages["sft"]["train"]["token_budget"] = 120000
    stages["rl"].update(
        steps=3,
        groups_per_step=8,
        groups_per_request=4,
        eval_every=2,
        save_every=2,
        pool={"rescore_every": 2, "rescore_samples": 4, "min_active": 8},
    )
    stages["rl"]["engine"] = {"kv_cache_gib": 0.125}
    stages["dpo"]["pairs"]["samples"] = 4
    stages["dpo"]["pairs"]["max_prompts"] = 40
    stages["distill"]["train"]["token_budget"] = 20000
    # The teacher's cache built by the stage's own vLLM engine (the default builds it with a
    # transformers forward, as tests/test_distill_stage.py does), started and shut down in the
    # stage's process before training.
    stages["distill"]["teacher"]["cache_builder"] = "vllm"
    path = runs.parent / "default-small.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.slow
def test_default_pipeline_runs_every_stage_and_reports(tmp_path):
    runs = tmp_path / "runs"
    pipeline_file = small_default_pipeline(runs)
    out = align("run", str(pipeline_file))
    assert out.returncode == 0, out.stderr[-3000:]
    root = runs / "default"
    names = [s["name"] for s in yaml.safe_load(pipeline_file.read_text())["stages"]]
    for stage in names:
        assert (root / stage / "stage-done.json").is_file(), stage

    # The report: every stage, each training stage evaluated on the same held-out rows.
    report = json.loads((root / "report.json").read_text())
    assert [r["stage"] for r in report["stages"]] == names
    by_stage = {r["stage"]: r for r in report["stages"]}
    heldout = json.loads((root / "eval-teacher" / "eval.json").read_text())
    evaluated = ["eval-teacher", "eval-student", "reference", "sft", "rl", "dpo", "distill"]
    for stage in evaluated:
        h = by_stage[stage]["heldout"]
        # 2 tasks x 4 levels x 2 held-out rows
        assert h["n"] == heldout["n"] == 16, stage
        assert h["samples"] == 4, stage
        # The report carries what the stage's own evaluation measured, level by level.
        own = root / stage / ("eval.json" if stage.startswith("eval-") else "eval/eval.json")
        measured = json.loads(own.read_text())
        assert h["greedy_accuracy"] == measured["greedy_accuracy"], stage
        assert (h["greedy_accuracy"] * 16).is_integer(), stage
        assert h["by_level"] == {
            level: row["greedy_accuracy"] for level, row in measured["by_level"].items()
        }, stage
        assert sorted(h["by_level"]) == ["1", "2", "3", "4"], stage
        assert h["by_task"] == {
            task: row["greedy_accuracy"] for task, row in measured["by_task"].items()
        }, stage
    cache = json.loads((root / "distill" / "teacher_cache" / "manifest.json").read_text())
    assert cache["built_with"] == "vllm" and cache["top_k"] == 32
    for stage in ("sft", "dpo", "distill"):
        budget = json.loads((root / stage / "result.json").read_text())["budget_tokens"]
        assert by_stage[stage]["tokens"] == budget > 0
    assert by_stage["rl"]["tokens"] > 0
    assert by_stage["filter"]["did"].startswith("kept ")
    # DPO's pairs from a draw of 40 of the 80 training prompts (pairs.max_prompts).
    assert "pairs from 40 prompts" in by_stage["dpo"]["did"]
    # The RL line counts groups as groups: generated = trained + dropped (+ any left over).
    rl_result = json.loads((root / "rl" / "result.json").read_text())
    # One compute thread per reserved CPU: the learner and the worker each hold a core.
    assert [r["threads"] for r in rl_result["placement"]["learners"]] == [1]
    buffer = rl_result["buffer"]
    assert buffer["received"] >= 3 * 8 + buffer["dropped_constant"] + buffer["dropped_stale"]
    assert (
        f"of {buffer['received']} groups generated, {buffer['dropped_constant']} dropped as"
        in by_stage["rl"]["did"]
    )
    assert abs(report["total_seconds"] - sum(r["seconds"] for r in report["stages"])) < 1e-6
    for plot in ("accuracy.png", "rl-rl.png", "distill-distill.png"):
        assert (root / plot).stat().st_size > 10_000, plot
        assert f"]({plot})" in (root / "report.md").read_text()
    markdown = (root / "report.md").read_text()
    assert all(f"| {stage} |" in markdown for stage in names)
    # Several tasks: a greedy accuracy column for each.
    assert "| reward | `add_padded` | `sort` | level 1 |" in markdown
    # The terminal ends with the table, one line per stage.
    tail = out.stdout[out.stdout.index("held-out evaluation after every stage") :]
    assert all(f"\n{stage} " in tail for stage in names)

    # Resuming a pipeline (finished stages skipped, the stopped one continued from its newest
    # checkpoint) is proven by tests/test_faults.py::test_a_killed_pipeline_resumes_at_the_stage_it_stopped_in.


def test_a_stage_reading_a_stage_that_does_not_come_before_it_is_refused(tmp_path, quick_align):
    path = tmp_path / "p.yaml"
    path.write_text(
        "stages:\n"
        "  - {name: data, command: make-data}\n"
        "  - {name: sft, command: sft, config: {model: '{run}/teacher/model', data: '{run}/data/train/sft'}}\n"
        "  - {name: teacher, command: make-model}\n"
    )
    out = quick_align("run", str(path), "--dry-run")
    assert out.returncode == 2
    assert "stage 'sft'" in out.stderr and "'{run}/teacher/model'" in out.stderr
    assert (
        "no earlier stage is named 'teacher'" in out.stderr and "earlier stages: data" in out.stderr
    )


def test_the_evaluation_block_is_the_only_source_of_held_out_settings(tmp_path, quick_align):
    head = (
        "evaluation: {heldout: '{run}/data/heldout/rl', settings: {samples: 8}}\n"
        "stages:\n  - {name: data, command: make-data}\n  - {name: student, command: make-model}\n"
    )
    stage = "  - {name: sft, command: sft, config: {model: '{run}/student/model', data: x, %s}}\n"
    for extra, message in (
        ("heldout: other", "'heldout' is set by the pipeline's evaluation block"),
        ("eval: {samples: 2}", "evaluation setting(s) ['samples'] differ"),
    ):
        path = tmp_path / "p.yaml"
        path.write_text(head + stage % extra)
        out = quick_align("run", str(path), "--dry-run")
        assert out.returncode == 2 and message in out.stderr, out.stderr
    path.write_text(head + stage % "eval: {pass_k: 2}")
    from align.config import load_config
    from pipelines import pipeline

    resolved = pipeline.resolve_stages(load_config(pipeline.Config, path), str(path))
    sft = resolved[-1][1]
    assert sft.heldout == "runs/default/data/heldout/rl"
    assert (sft.eval.samples, sft.eval.pass_k) == (8, 2)


def test_the_defaults_block_fills_every_place_of_its_type_and_a_stage_setting_wins(tmp_path):
    """`defaults:` reaches nested sections that are absent (RL's `sampling`, `learner`), present
    ones under their own keys (DPO's `pairs`), evaluation, the difficulty filter's options by
    its keyword arguments (its engine, samples and max_new_tokens, not the length filter's),
    and leaves optional sections that a stage leaves out (DPO's `pairs` when `data` is set)."""
    from align.config import load_config
    from pipelines import pipeline

    path = tmp_path / "p.yaml"
    path.write_text(
        "defaults:\n"
        "  engine: {dtype: bfloat16, tensor_parallel_size: 2}\n"
        "  generation: {samples: 6, max_new_tokens: 99}\n"
        "  optim: {precision: bf16, learning_rate: 0.5}\n"
        "evaluation: {heldout: h, settings: {pass_k: 2}}\n"
        "stages:\n"
        "  - name: filter\n    command: filter\n    config:\n      data: d\n      filters:\n"
        "        - {name: length, options: {max_tokens: 50}}\n"
        "        - {name: difficulty, options: {model: m, samples: 4, engine: {kv_cache_gib: 2}}}\n"
        "  - {name: rl, command: rl, config: {model: m, data: d, engine: {dtype: float16}}}\n"
        "  - {name: dpo, command: dpo, config: {model: m, pairs: {prompts: p, max_new_tokens: 7}}}\n"
        "  - {name: dpo-data, command: dpo, config: {model: m, data: d, train: {epochs: 1.0}}}\n"
    )
    stages = dict(
        (entry.name, config)
        for entry, config in pipeline.resolve_stages(load_config(pipeline.Config, path), str(path))
    )
    length, difficulty = stages["filter"].filters
    assert "engine" not in length.options and "samples" not in length.options
    assert difficulty.options["samples"] == 4 and difficulty.options["max_new_tokens"] == 99
    assert difficulty.options["engine"] == {
        "dtype": "bfloat16",
        "tensor_parallel_size": 2,
        "kv_cache_gib": 2,
    }
    rl = stages["rl"]
    assert (rl.engine.dtype, rl.engine.tensor_parallel_size) == ("float16", 2)
    assert (rl.sampling.samples, rl.sampling.max_new_tokens) == (6, 99)
    assert (rl.learner.precision, rl.learner.learning_rate) == ("bf16", 0.5)
    assert (rl.eval.samples, rl.eval.pass_k, rl.eval.engine.dtype) == (6, 2, "bfloat16")
    dpo = stages["dpo"]
    assert (dpo.pairs.samples, dpo.pairs.max_new_tokens) == (6, 7)
    assert dpo.pairs.engine.tensor_parallel_size == 2 and dpo.train.learning_rate == 0.5
    assert stages["dpo-data"].pairs is None
    # Keys the defaults leave alone keep the stage's own defaults (DPO trains 16 pairs a batch).
    assert stages["dpo-data"].train.batch_size == 16 and stages["dpo-data"].train.epochs == 1.0


@pytest.mark.parametrize(
    ("defaults", "message"),
    [
        ("engine: {dtype: bf16}", "'defaults.engine' in {file}: key 'dtype' must be one of"),
        ("generation: {sample: 3}", "'defaults.generation' in {file}: unknown key 'sample'; did"),
        ("optim: {lr: 3}", "'defaults.optim' in {file}: unknown key 'lr'; valid keys: learn"),
        ("sampling: {samples: 3}", "unknown key 'defaults.sampling' in {file}; valid keys: eng"),
    ],
)
def test_a_bad_defaults_block_is_refused_naming_the_key(tmp_path, defaults, message):
    from align.config import ConfigError, load_config
    from pipelines import pipeline

    path = tmp_path / "p.yaml"
    path.write_text(f"defaults: {{{defaults}}}\nstages:\n  - {{name: data, command: make-data}}\n")
    with pytest.raises(ConfigError, match=re.escape(message.format(file=path))):
        pipeline.resolve_stages(load_config(pipeline.Config, path), str(path))


def test_gpu_pipeline_file_passes_the_dry_run(tmp_path, quick_align):
    """The real-checkpoint recipe cannot run here; its configs and wiring are checked, with
    the checkpoints it names replaced by a directory holding Qwen3-30B-A3B's config.json."""
    from align.config import ConfigError, load_config
    from pipelines import pipeline
    from tests.test_placement import QWEN3_30B_A3B

    path = str(REPO_ROOT / "pipelines" / "qwen3-moe-gpu.yaml")
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_30B_A3B))
    models = [f"stages.{i}.config.{key}={tmp_path}" for i, key in ((1, "model"), (3, "model"))]
    # The distillation student is named too, and does not exist here (what --dry-run checks).
    config = load_config(pipeline.Config, path, models)
    with pytest.raises(ConfigError, match="stage 'distill' in .*: key 'student': "):
        pipeline.check_inputs(config, pipeline.resolve_stages(config, path), path)
    out = quick_align("run", path, "--dry-run", *models, f"stages.6.config.student={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[5/7] rl (rl)" in out.stdout
    assert "learners 16 rank(s) x 1 GPU" in out.stdout and "workers 8 x 2 GPU" in out.stdout
    assert "cluster  4 node(s) x 8 GPUs of 80 GiB: 32 of 32 GPUs used" in out.stdout
    # SFT and DPO: LoRA on the 8 GPUs of one node, each holding the frozen bf16 weights.
    assert "training 8 process(es), ddp, LoRA; one GPU each of 80 GiB on one node" in out.stdout
    assert "trainer  per GPU: 63.7 GiB = frozen weights 56.9 GiB" in out.stdout
    assert "trainer  per GPU: 70.5 GiB = frozen weights 56.9 GiB" in out.stdout
    assert f"model    {tmp_path}" in out.stdout
    # Every engine of the 30 B model is bf16 over 2 GPUs, none left at the CPU defaults.
    engine_lines = [line.strip() for line in out.stdout.splitlines() if "engine   " in line]
    assert "engine   filters[1].options.engine: bfloat16, tensor parallel 2" in "\n".join(
        engine_lines
    )
    assert any(line.startswith("engine   pairs.engine: bfloat16") for line in engine_lines)
    assert any(line.startswith("engine   teacher.engine: bfloat16") for line in engine_lines)
    assert engine_lines and not [line for line in engine_lines if "float32" in line]


@pytest.mark.parametrize(
    "path",
    [
        "default.yaml",
        "multimodal.yaml",
        "safety.yaml",
        "qwen3-moe-gpu.yaml",
        "llama4-scout-gpu.yaml",
        *sorted(p.name for p in (REPO_ROOT / "pipelines" / "experiments").glob("*.yaml")),
    ],
)
def test_shipped_pipeline_files_resolve(path):
    """Every pipeline file in the repo names existing commands with valid stage configs."""
    from align.config import load_config
    from pipelines import pipeline

    file = REPO_ROOT / "pipelines" / path
    if not file.exists():
        file = REPO_ROOT / "pipelines" / "experiments" / path
    config = load_config(pipeline.Config, file)
    assert len(pipeline.resolve_stages(config, str(file))) == len(config.stages)


@pytest.mark.parametrize(
    "path", sorted(p.name for p in (REPO_ROOT / "pipelines" / "experiments" / "rl").glob("*.yaml"))
)
def test_rl_ablations_load_on_top_of_the_default_rl_stage(path):
    """bench/rl.py's `async:FILE.yaml` arms: each file's settings over the default pipeline's
    `rl` stage make a valid stage config that holds them."""
    from align.config import from_dict, to_dict
    from pipelines import rl

    default = yaml.safe_load((REPO_ROOT / "pipelines" / "default.yaml").read_text())
    data = next(s["config"] for s in default["stages"] if s["name"] == "rl")
    ablation = yaml.safe_load((REPO_ROOT / "pipelines" / "experiments" / "rl" / path).read_text())
    for key, value in ablation.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    loaded = to_dict(from_dict(rl.Config, data, source=path))
    for key, value in ablation.items():
        if isinstance(value, dict):
            assert {k: loaded[key][k] for k in value} == value, key
        else:
            assert loaded[key] == value, key


@pytest.mark.parametrize("command", ["filter", "sft", "dpo", "rl", "distill"])
def test_shipped_stage_configs_load(command):
    from align.config import load_config
    from pipelines import stages

    config = load_config(
        stages.COMMANDS[command].Config, REPO_ROOT / "pipelines" / f"{command}.yaml"
    )
    assert config.name == command


def test_a_finished_stage_with_changed_settings_is_refused_until_rerun_from_it(
    tmp_path, quick_align
):
    path = tmp_path / "p.yaml"
    path.write_text(
        f"runs_dir: {tmp_path / 'runs'}\n"
        "stages:\n"
        "  - {name: student, command: make-model, config: {preset: student}}\n"
        "  - {name: data, command: make-data, config: {per_level: 10}}\n"
    )
    assert quick_align("run", str(path)).returncode == 0
    root = tmp_path / "runs" / "default"
    first_rows = (root / "data" / "train" / "problems.jsonl").read_text()

    path.write_text(path.read_text().replace("per_level: 10", "per_level: 12"))
    refused = quick_align("run", str(path))
    assert refused.returncode == 2
    assert "stage 'data' finished earlier with other settings (per_level)" in refused.stderr
    assert "--from data" in refused.stderr
    # Nothing was touched.
    assert (root / "data" / "train" / "problems.jsonl").read_text() == first_rows

    again = quick_align("run", str(path), "--from", "data")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "[1/2] student (make-model): finished in an earlier run, skipped" in again.stdout
    assert "[2/2] data (make-data): running" in again.stdout
    assert len((root / "data" / "train" / "problems.jsonl").read_text().splitlines()) == 2 * 4 * 10
    (kept,) = (root / ".previous").glob("*/data/train/problems.jsonl")
    assert kept.read_text() == first_rows
    assert quick_align("run", str(path), "--from", "nope").returncode == 2


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],  # cut short by a crash or a full disk
        lambda text: "[]",  # JSON, but not a marker
        lambda text: "\udcff",  # not UTF-8 (written with surrogateescape below)
    ],
    ids=["cut-short", "not-a-marker", "not-utf-8"],
)
def test_a_damaged_done_marker_counts_as_not_finished_with_a_warning(tmp_path, damage, caplog):
    from pipelines import report

    stage = tmp_path / "sft"
    stage.mkdir()
    marker = stage / report.DONE_MARKER
    text = json.dumps({"result": {"model": "m"}, "seconds": 1.0, "config": {}})
    marker.write_text(text)
    assert report.read_done_marker(stage)["result"] == {"model": "m"}
    marker.write_bytes(damage(text).encode("utf-8", "surrogateescape"))
    assert report.read_done_marker(stage) is None
    assert f"{marker} is damaged" in caplog.text and "counts as not finished" in caplog.text


def test_the_report_shows_each_evaluation_reward_but_answer_match_in_its_own_column():
    from pipelines import report

    def evaluation(greedy: float, rewards: dict) -> dict:
        summary = {"n": 10, "greedy_accuracy": greedy, "pass@4": 0.5, "sample_accuracy": 0.4}
        return {
            **summary,
            **{f"reward/{name}": value for name, value in rewards.items()},
            "reward/total": 9.0,
            "pass_k": 4,
            "samples": 8,
            "by_level": {"1": summary},
            "by_task": {"add": summary},
        }

    stages = [
        ("sft", {"answer_format": 0.25}),
        ("rl", {"answer_format": 0.5, "answer_match": 0.4}),
        ("eval", {}),
    ]
    run = {
        "stages": [
            {
                "stage": name,
                "command": name,
                "seconds": 1.0,
                "tokens": None,
                "did": "trained",
                "heldout": report.heldout_summary(evaluation(0.3, rewards)),
            }
            for name, rewards in stages
        ],
        "total_seconds": 3.0,
    }
    assert run["stages"][1]["heldout"]["rewards"] == {"answer_format": 0.5, "answer_match": 0.4}
    assert report.rewards_of(run) == ["answer_format"]
    lines = report.markdown(run, "p", []).splitlines()
    assert (
        "| stage | command | wall time | tokens | greedy acc | pass@4 | reward | `answer_format`"
        in ("\n".join(lines))
    )
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ")}
    assert "| 0.250 | 0.30 |" in rows["sft"] and "| 0.500 | 0.30 |" in rows["rl"]
    assert "| - | 0.30 |" in rows["eval"]
    assert "answer_format" in report.table(run) and "answer_match" not in report.table(run)


def test_the_rl_plot_turns_the_pools_running_group_shares_into_shares_per_step():
    from pipelines.report import _per_step_share

    key = "pool/rollout/all_passed"
    pool = [
        {"step": 1, "pool/rescores": 0, "pool/rollout/groups": 100, key: 0.2},  # 20 of 100
        {"step": 2, "pool/rescores": 0, "pool/rollout/groups": 150, key: 0.2},  # 10 of next 50
        {"step": 3, "pool/rescores": 0, "pool/rollout/groups": 150, key: 0.2},  # none new
        {"step": 3, "pool/rescores": 1, "pool/rollout/groups": 150, key: 0.2},  # a re-score
        {"step": 4, "pool/rescores": 1, "pool/rollout/groups": 40, key: 0.5},  # a new window
        {"step": 5, "pool/rescores": 2},  # re-scored again; nothing recorded in the new window
        {"step": 6, "pool/rescores": 2, "pool/rollout/groups": 60, key: 0.25},  # more than 40
    ]
    points = _per_step_share(pool, key)
    assert [step for step, _ in points] == [1, 2, 4, 6]
    assert [share for _, share in points] == pytest.approx([0.2, 0.2, 0.5, 0.25])
    pool[1][key] = 0.3  # 45 of 150: 25 of the 50 that step 2 added
    assert _per_step_share(pool, key)[1][1] == pytest.approx(0.5)
