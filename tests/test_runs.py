"""Run directories: metrics reach every tracker `report_to` names, under metrics.jsonl's names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from align.config import ConfigError, from_dict
from align.runs import RunSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
# A custom reward's metric name holds '.' and ':' (rewards named 'module:function').
METRICS = [
    {"train/loss": 1.0 / (step + 1), "reward/my.mod:fn/mean": 0.25 * step} for step in range(3)
]

# Logs METRICS through a Run reporting to every tracker, twice (a resumed run appends to the
# same trackers' runs), and prints what trackio stored. In a child process: wandb and trackio
# start services and keep module-level state.
SCRIPT = """
import json, sys
from align.runs import Run, RunSettings
directory, metrics = sys.argv[1], json.loads(sys.argv[2])
config = RunSettings(name="sft", report_to=["tensorboard", "wandb", "trackio"])
for first, last in ((0, 2), (2, len(metrics))):
    with Run(directory, config) as run:
        for step in range(first, last):
            run.log_metrics(step, metrics[step])
from trackio.sqlite_storage import SQLiteStorage
print(json.dumps(SQLiteStorage.get_logs("moealign", "p/sft")))
"""


def test_every_tracker_gets_each_step_under_the_names_of_metrics_jsonl(tmp_path):
    directory = tmp_path / "p" / "sft"
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "WANDB_MODE": "offline"}
    for name in ("WANDB_PROJECT", "TRACKIO_PROJECT"):
        env.pop(name, None)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(directory), json.dumps(METRICS)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    logged = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    assert [
        {k: v for k, v in row.items() if k not in ("step", "time")} for row in logged
    ] == METRICS

    trackio = json.loads(out.stdout.strip().splitlines()[-1])
    assert [row["step"] for row in trackio] == [0, 1, 2]
    assert [{k: row[k] for k in METRICS[0]} for row in trackio] == METRICS

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for events in sorted((directory / "tb").glob("events.out.tfevents.*")):
        assert events.stat().st_size > 0
    board = EventAccumulator(str(directory / "tb"))
    board.Reload()
    for name in METRICS[0]:
        scalars = board.Scalars(name)
        assert [s.step for s in scalars] == [0, 1, 2]
        assert [s.value for s in scalars] == pytest.approx([m[name] for m in METRICS])

    # wandb (offline): both sessions continue the one run of this directory, and its record
    # files hold every metric of every step (wandb 0.31 ships no reader for them).
    runs = sorted((directory / "wandb").glob("offline-run-*"))
    run_id = (directory / "wandb-id").read_text().strip()
    assert len(runs) == 2 and all(f"-{run_id}" in r.name for r in runs)
    records = b"".join(f.read_bytes() for r in runs for f in r.glob("run-*.wandb"))
    for name in METRICS[0]:
        assert records.count(name.encode()) >= len(METRICS)


def test_a_tracker_that_is_not_installed_is_refused_with_the_install_command(monkeypatch):
    from align import runs

    assert from_dict(RunSettings, {"report_to": ["tensorboard", "wandb"]}).report_to
    monkeypatch.setitem(runs.REPORTERS, "wandb", "wandb_is_not_here")
    with pytest.raises(ConfigError, match=r"'report_to'.*wandb is not installed \(pip install"):
        from_dict(RunSettings, {"report_to": ["wandb"]})
    with pytest.raises(ConfigError, match="must be one of 'tensorboard', 'wandb', 'trackio'"):
        from_dict(RunSettings, {"report_to": ["mlflow"]})


def test_a_pipelines_report_to_is_every_stages_unless_the_stage_sets_its_own(tmp_path):
    from align.config import load_config
    from pipelines import pipeline

    path = tmp_path / "p.yaml"
    path.write_text(
        "report_to: [tensorboard, trackio]\n"
        "stages:\n"
        "  - {name: data, command: make-data}\n"
        "  - {name: student, command: make-model, config: {report_to: [wandb]}}\n"
    )
    resolved = pipeline.resolve_stages(load_config(pipeline.Config, path), str(path))
    assert [config.report_to for _, config in resolved] == [["tensorboard", "trackio"], ["wandb"]]
