"""The default pipeline end to end (what `make run` runs), and resuming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_cli import align

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.vllm
@pytest.mark.slow
def test_default_pipeline_runs_and_resumes(tmp_path):
    runs = tmp_path / "runs"
    out = align("run", str(REPO_ROOT / "pipelines" / "default.yaml"), f"runs_dir={runs}")
    assert out.returncode == 0, out.stderr[-3000:]
    root = runs / "default"
    for stage in ("teacher", "student", "data", "eval-teacher", "eval-student"):
        assert (root / stage / "stage-done.json").is_file(), stage
    report = json.loads((root / "eval-teacher" / "eval.json").read_text())
    assert report["n"] == 160  # 2 tasks x 4 levels x 20 held-out problems
    assert sorted(report["by_level"]) == ["1", "2", "3", "4"]
    assert "held-out evaluation" in out.stdout and "eval-student" in out.stdout

    # Interrupted after the data stage: the finished stages are skipped, the rest run again.
    first = json.loads((root / "eval-student" / "eval.json").read_text())
    (root / "eval-student" / "stage-done.json").unlink()
    again = align("run", str(REPO_ROOT / "pipelines" / "default.yaml"), f"runs_dir={runs}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished in an earlier run, skipped") == 4
    assert "[5/5] eval-student (eval): running" in again.stdout
    rerun = json.loads((root / "eval-student" / "eval.json").read_text())
    # Seeded engine and sampling: the re-run stage reproduces its numbers.
    assert rerun["groups"] == first["groups"]


@pytest.mark.parametrize(
    "path",
    [
        "default.yaml",
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


@pytest.mark.parametrize("command", ["filter", "sft", "dpo"])
def test_shipped_stage_configs_load(command):
    from align.config import load_config
    from pipelines import stages

    config = load_config(
        stages.COMMANDS[command].Config, REPO_ROOT / "pipelines" / f"{command}.yaml"
    )
    assert config.name == command
