"""Stage runner for `align run PIPELINE.yaml`: the stages a pipeline file lists, in order.

Every stage's config is checked before the first stage starts, so a typo in the last stage
does not cost the time of the first ones. Each stage writes to `runs/<pipeline>/<stage>/`; the
string `{run}` in a stage's config stands for `runs/<pipeline>`, which is how a stage names an
earlier stage's output (`model: "{run}/teacher/model"`). A finished stage leaves
`stage-done.json` there and is skipped when the pipeline is run again, so an interrupted
pipeline resumes at the stage it stopped in.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.config import ConfigError, check, from_dict
from align.runs import write_json_atomic
from pipelines import stages

log = logging.getLogger(__name__)

# File a finished stage leaves in its directory; the stage is skipped when it exists.
DONE_MARKER = "stage-done.json"


@dataclass
class StageEntry:
    """One stage of a pipeline."""

    # Stage name, unique in the pipeline; its outputs go to runs/<pipeline>/<name>/.
    name: str
    # The command the stage runs: the same as the `align` subcommand (make-model, eval, ...).
    command: str
    # The command's config (the same keys as its --config file). `{run}` is replaced by the
    # pipeline's run directory.
    config: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        check(
            self.command in stages.COMMANDS,
            "command",
            f"unknown command {self.command!r}; known: {', '.join(stages.COMMANDS)}",
        )
        check(self.command != "run", "command", "a pipeline cannot run another pipeline")
        check(
            bool(self.name) and "/" not in self.name,
            "name",
            f"must be a non-empty name without '/' (got {self.name!r})",
        )


@dataclass
class Config:
    """A pipeline file."""

    # Pipeline name: everything is written under <runs_dir>/<name>/.
    name: str = "default"
    # Root directory of runs.
    runs_dir: str = "runs"
    # The stages, run in order.
    stages: list[StageEntry] = field(default_factory=list)

    def validate(self) -> None:
        check(bool(self.stages), "stages", "a pipeline needs at least one stage")
        names = [s.name for s in self.stages]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        check(not duplicates, "stages", f"stage names must be unique; repeated: {duplicates}")


def resolve_stages(config: Config, source: str = "<pipeline>") -> list[tuple[StageEntry, Any]]:
    """Builds and validates every stage's typed config. Raises ConfigError on the first bad one."""
    run_dir = str(Path(config.runs_dir) / config.name)
    resolved = []
    for index, entry in enumerate(config.stages):
        command = stages.COMMANDS[entry.command]
        data = _substitute(entry.config, run_dir)
        if "name" in data or "runs_dir" in data:
            raise ConfigError(
                f"stage {entry.name!r} in {source}: 'name' and 'runs_dir' are set by the "
                f"pipeline (outputs go to {run_dir}/{entry.name})"
            )
        data = {**data, "name": entry.name, "runs_dir": run_dir}
        stage_config = from_dict(
            command.Config, data, source=f"{source}: stages[{index}] ({entry.name})"
        )
        resolved.append((entry, stage_config))
    return resolved


def run(config: Config, resolved: list[tuple[StageEntry, Any]]) -> dict:
    """Runs the pipeline's stages in order, skipping those already finished.

    Args:
        config: the pipeline.
        resolved: its stages with their typed configs, from `resolve_stages`.
    """
    run_dir = Path(config.runs_dir) / config.name
    run_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for number, (entry, stage_config) in enumerate(resolved, start=1):
        done = run_dir / entry.name / DONE_MARKER
        prefix = f"[{number}/{len(resolved)}] {entry.name} ({entry.command})"
        if done.exists():
            print(f"{prefix}: finished in an earlier run, skipped", flush=True)
            results[entry.name] = json.loads(done.read_text(encoding="utf-8"))["result"]
            continue
        print(f"{prefix}: running", flush=True)
        started = time.perf_counter()
        result = stages.COMMANDS[entry.command].run(stage_config)
        seconds = time.perf_counter() - started
        # Written last and atomically: its presence means the stage's outputs are complete.
        write_json_atomic(done, {"result": result, "seconds": seconds})
        results[entry.name] = result
        print(f"{prefix}: finished in {seconds:.1f} s", flush=True)
    summary = summary_table(config, results)
    (run_dir / "summary.txt").write_text(summary + "\n", encoding="utf-8")
    print(summary, flush=True)
    return results


def summary_table(config: Config, results: dict[str, dict]) -> str:
    """One line per evaluation stage: the model it scored and its held-out figures."""
    header = f"{'stage':<16} {'model':<40} {'greedy acc':>10} {'pass@k':>8} {'k':>3}"
    lines = [f"pipeline {config.name}: held-out evaluation", header, "-" * len(header)]
    for entry in config.stages:
        report = results.get(entry.name)
        if entry.command != "eval" or report is None:
            continue
        pass_key = f"pass@{report['pass_k']}"
        lines.append(
            f"{entry.name:<16} {report['model'][-40:]:<40} {report['greedy_accuracy']:>10.3f} "
            f"{report[pass_key]:>8.3f} {report['pass_k']:>3}"
        )
    return "\n".join(lines)


def _substitute(value: Any, run_dir: str) -> Any:
    if isinstance(value, str):
        return value.replace("{run}", run_dir)
    if isinstance(value, dict):
        return {k: _substitute(v, run_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, run_dir) for v in value]
    return value
