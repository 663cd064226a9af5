"""Stage runner for `align run PIPELINE.yaml`: the stages a pipeline file lists, in order.

Every stage's config is checked before the first stage starts, so a typo in the last stage
does not cost the time of the first ones. Each stage writes to `runs/<pipeline>/<stage>/`; the
string `{run}` in a stage's config stands for `runs/<pipeline>`, which is how a stage names an
earlier stage's output (`model: "{run}/teacher/model"`). A finished stage leaves
`stage-done.json` there and is skipped when the pipeline is run again, so an interrupted
pipeline resumes at the stage it stopped in (and that stage resumes from its own checkpoint).

A `defaults:` block states settings once for every stage (align/settings.py): `engine` for every
vLLM engine any stage starts, `generation` for everything that samples, `optim` for every
trained stage's optimiser; what a stage sets itself wins. An `evaluation:` block makes every
stage that produces a model score it on the same held-out rows with the same settings; the run
ends with `report.md`, `report.json` and plots (see pipelines/report.py) and prints the
report's table.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from align.config import ConfigError, changed_settings, check, from_dict, name_problem, to_dict
from align.launch import TrainPlacement
from align.launch import plan as train_plan
from align.rl.placement import ModelShape, Placement
from align.rl.placement import plan as placement_plan
from align.runs import RunSettings, write_json_atomic
from align.settings import (
    SHARED,
    EngineSettings,
    offset_seeds,
    parameters_of,
    plugin,
    with_defaults,
)
from pipelines import report, stages

log = logging.getLogger(__name__)

DONE_MARKER = report.DONE_MARKER
# Directories stages write that later stages read (`{run}/<stage>/model`, ...).
STAGE_OUTPUTS = ("model", "kept", "train", "heldout")
# Keys of stage configs that name inputs on disk. Those outside the pipeline's run directory
# must exist before the first stage runs (a dry run checks them too).
INPUT_KEYS = (
    "model",
    "student",
    "data",
    "heldout",
    "teacher.model",
    "pairs.prompts",
    "goals",
    "attacker",
    "judge.guard",
)


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
    # false: the stage trains a helper model on other tasks (a guard, a reward model); the
    # pipeline's evaluation block leaves it alone (its own held-out rows and settings, if any).
    evaluate: bool = True

    def validate(self) -> None:
        check(
            self.command in stages.COMMANDS,
            "command",
            f"unknown command {self.command!r}; known: {', '.join(stages.COMMANDS)}",
        )
        problem = name_problem(self.name)
        check(problem is None, "name", f"{problem} (got {self.name!r})")


@dataclass
class Evaluation:
    """How every stage's model is evaluated (the same rows and settings for all)."""

    # Held-out rows (prompt, answer); `{run}` allowed. Every training stage gets it as its
    # `heldout`, every `eval` stage as its `data`. null: each stage's own settings.
    heldout: str | None = None
    # Evaluation settings (the keys of `align eval`: samples, pass_k, temperature, ...), given
    # to every stage.
    settings: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        from pipelines.evaluate import EvalSettings

        known = {f.name for f in fields(EvalSettings)}
        unknown = sorted(set(self.settings) - known)
        check(not unknown, "settings", f"unknown key(s) {unknown}; known: {sorted(known)}")


@dataclass
class Defaults:
    """Settings every stage starts from (align/settings.py); what a stage sets wins."""

    # vLLM engine settings (dtype, tensor_parallel_size, max_model_len, kv_cache_gib, ...) of
    # every engine any stage starts: the filter's, RL's workers, DPO's pairs, the teacher
    # cache's, evaluation's.
    engine: dict[str, Any] = field(default_factory=dict)
    # Sampling settings (samples, temperature, max_new_tokens) of everything that samples:
    # RL's `sampling`, DPO's `pairs`, evaluation, the difficulty filter's options.
    generation: dict[str, Any] = field(default_factory=dict)
    # Optimiser settings (learning_rate, precision, router_aux_loss_coef, ...) of every
    # trained stage: SFT, DPO and distillation's `train`, RL's `learner`.
    optim: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        for section, kind in SHARED.items():
            try:
                from_dict(kind, getattr(self, section))
            except ConfigError as error:
                check(False, section, str(error).replace(" in <config>", ""))

    def sections(self) -> dict[str, dict]:
        """The sections that set something."""
        return {name: getattr(self, name) for name in SHARED if getattr(self, name)}


@dataclass(kw_only=True)
class Config(RunSettings):
    """A pipeline file. Its `report_to` is every stage's unless a stage sets its own."""

    # Pipeline name: everything is written under <runs_dir>/<name>/.
    name: str = "default"

    # The stages, run in order.
    stages: list[StageEntry] = field(default_factory=list)
    # Settings merged into every stage, under the stage's own.
    defaults: Defaults = field(default_factory=Defaults)
    # Added to every seed of every stage (data, initialisation, data order, sampling, engines):
    # one pipeline file run with seeds 0, 1, 2 is three independent repetitions of it. `align
    # run FILE --seeds K` runs seeds seed .. seed + K - 1 and reports mean and interval.
    seed: int = 0
    # Pairs of stages [a, b] whose held-out figures `--seeds` compares seed by seed (b - a);
    # empty: each stage against the stage whose model it starts from.
    compare: list[list[str]] = field(default_factory=list)
    # Evaluation shared by every stage.
    evaluation: Evaluation = field(default_factory=Evaluation)

    def validate(self) -> None:
        super().validate()
        check(bool(self.stages), "stages", "a pipeline needs at least one stage")
        names = [s.name for s in self.stages]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        check(not duplicates, "stages", f"stage names must be unique; repeated: {duplicates}")
        for i, pair in enumerate(self.compare):
            unknown = [name for name in pair if name not in names]
            check(
                len(pair) == 2 and not unknown,
                f"compare[{i}]",
                f"must name two stages of the pipeline (got {pair}; stages: {', '.join(names)})",
            )


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
        data = {"report_to": config.report_to, **data, "name": entry.name, "runs_dir": run_dir}
        data = _with_evaluation(data, entry, command, config.evaluation, run_dir, source)
        data = with_defaults(command.Config, data, config.defaults.sections())
        if config.seed:
            data = offset_seeds(command.Config, data, config.seed)
        earlier = [e.name for e in config.stages[:index]]
        all_names = {e.name for e in config.stages}
        for path in _run_paths(entry.config):
            produced_by, _, rest = path.partition("/")
            # A stage's output is read from an earlier stage; other directories under {run}
            # (a shared cache, say) are fine unless they look like a stage's output.
            names_a_stage = produced_by in all_names
            looks_like_output = rest.split("/")[0] in STAGE_OUTPUTS
            if produced_by not in earlier and (names_a_stage or looks_like_output):
                raise ConfigError(
                    f"stage {entry.name!r} in {source}: reads '{{run}}/{path}', but no earlier "
                    f"stage is named {produced_by!r} (earlier stages: {', '.join(earlier) or 'none'})"
                )
        stage_config = from_dict(
            command.Config, data, source=f"{source}: stages[{index}] ({entry.name})"
        )
        resolved.append((entry, stage_config))
        _, problem = placement_check(entry.command, stage_config, resolved)
        if problem is not None:
            raise ConfigError(
                f"stage {entry.name!r} in {source}: key 'placement.cluster': {problem}"
            )
    return resolved


def run(
    config: Config, resolved: list[tuple[StageEntry, Any]], rerun_from: str | None = None
) -> dict:
    """Runs the pipeline's stages in order, skipping those already finished.

    Args:
        config: the pipeline.
        resolved: its stages with their typed configs, from `resolve_stages`.
        rerun_from: run this stage and every later one again; their earlier outputs are moved
            to `<run>/.previous/<time>/`, not deleted.

    Raises:
        ConfigError: a finished stage's config differs from the file's (it would be skipped
            and its old outputs used): rerun from that stage, or restore its settings.
    """
    run_dir = Path(config.runs_dir) / config.name
    check_inputs(config, resolved)
    names = [e.name for e, _ in resolved]
    if rerun_from is not None and rerun_from not in names:
        raise ConfigError(f"--from {rerun_from}: no such stage; stages: {', '.join(names)}")
    # Checked before anything is written; the stages from `rerun_from` on are set aside.
    kept = names.index(rerun_from) if rerun_from is not None else len(names)
    _check_finished_stages_unchanged(run_dir, resolved[:kept])
    run_dir.mkdir(parents=True, exist_ok=True)
    if rerun_from is not None:
        _set_aside(run_dir, names, rerun_from)
    results = {}
    for number, (entry, stage_config) in enumerate(resolved, start=1):
        done = run_dir / entry.name / DONE_MARKER
        prefix = f"[{number}/{len(resolved)}] {entry.name} ({entry.command})"
        finished = report.read_done_marker(run_dir / entry.name)
        if finished is not None:
            print(f"{prefix}: finished in an earlier run, skipped", flush=True)
            results[entry.name] = finished["result"]
            continue
        print(f"{prefix}: running", flush=True)
        started = time.perf_counter()
        result = stages.COMMANDS[entry.command].run(stage_config)
        seconds = time.perf_counter() - started
        # Written last and atomically: its presence means the stage's outputs are complete.
        write_json_atomic(
            done, {"result": result, "seconds": seconds, "config": to_dict(stage_config)}
        )
        results[entry.name] = result
        print(f"{prefix}: finished in {seconds:.1f} s", flush=True)
    listed = [(e.name, e.command, e.evaluate) for e in config.stages]
    written = report.write(listed, run_dir, config.name)
    print(f"\npipeline {config.name}: held-out evaluation after every stage", flush=True)
    print(report.table(written), flush=True)
    print(f"report: {run_dir / 'report.md'}", flush=True)
    return results


def _check_finished_stages_unchanged(run_dir: Path, resolved: list[tuple[StageEntry, Any]]) -> None:
    for entry, stage_config in resolved:
        finished = report.read_done_marker(run_dir / entry.name)
        if finished is None:
            continue
        before = finished.get("config")
        changed = [] if before is None else changed_settings(before, stage_config)
        if not changed:
            continue
        raise ConfigError(
            f"stage {entry.name!r} finished earlier with other settings ({', '.join(changed)}); "
            f"its outputs would be reused as they are. Run again from it with "
            f"`--from {entry.name}` (earlier outputs are kept in {run_dir}/.previous/), or "
            "restore its settings"
        )


def _set_aside(run_dir: Path, names: list[str], rerun_from: str) -> None:
    later = names[names.index(rerun_from) :]
    previous = run_dir / ".previous" / time.strftime("%Y%m%d-%H%M%S")
    for name in later:
        if (run_dir / name).exists():
            previous.mkdir(parents=True, exist_ok=True)
            os.replace(run_dir / name, previous / name)
            print(f"{name}: earlier outputs moved to {previous / name}", flush=True)


def _with_evaluation(
    data: dict, entry: StageEntry, command, evaluation: Evaluation, run_dir: str, source: str
) -> dict:
    """The stage's config with the pipeline's held-out rows and evaluation settings."""
    if evaluation.heldout is None or not entry.evaluate:
        return data
    names = {f.name for f in fields(command.Config)}
    heldout = _substitute(evaluation.heldout, run_dir)
    settings = _substitute(evaluation.settings, run_dir)
    if entry.command == "eval":
        where, own = "data", data
    elif {"heldout", "eval"} <= names:
        where, own = "heldout", data.get("eval", {})
    else:
        return data
    if data.get(where, heldout) != heldout:
        raise ConfigError(
            f"stage {entry.name!r} in {source}: '{where}' is set by the pipeline's evaluation "
            f"block ({heldout}); remove it from the stage"
        )
    clashes = sorted(k for k, v in settings.items() if k in own and own[k] != v)
    if clashes:
        raise ConfigError(
            f"stage {entry.name!r} in {source}: evaluation setting(s) {clashes} differ from the "
            "pipeline's evaluation block; every stage is evaluated the same way"
        )
    if entry.command == "eval":
        return {**data, **settings, "data": heldout}
    return {**data, "heldout": heldout, "eval": {**own, **settings}}


def plan(config: Config, resolved: list[tuple[StageEntry, Any]]) -> str:
    """What `align run FILE --dry-run` prints: each stage, what it reads and where it writes."""
    run_dir = Path(config.runs_dir) / config.name
    lines = [f"pipeline {config.name}: {len(resolved)} stages, outputs under {run_dir}/"]
    for number, (entry, stage_config) in enumerate(resolved, start=1):
        done = report.read_done_marker(run_dir / entry.name) is not None
        lines.append(
            f"[{number}/{len(resolved)}] {entry.name} ({entry.command})"
            + (": finished, will be skipped" if done else "")
        )
        lines += _stage_lines(entry.command, stage_config, resolved[:number])
    return "\n".join(lines)


def _stage_lines(
    command: str, stage_config: Any, resolved: list[tuple[StageEntry, Any]]
) -> list[str]:
    """What a stage reads (checkpoints, data, teacher) and its placement, for a plan."""
    lines = []
    for key in ("model", "student", "data", "heldout"):
        value = getattr(stage_config, key, None)
        if isinstance(value, str):
            lines.append(f"      {key:<8} {value}")
    teacher = getattr(stage_config, "teacher", None)
    if teacher is not None:
        lines.append(f"      teacher  {teacher.model} ({teacher.mode})")
    for key, settings in engines(stage_config):
        lines.append(
            f"      engine   {key}: {settings.dtype}, tensor parallel "
            f"{settings.tensor_parallel_size}, max_model_len {settings.max_model_len}, "
            f"KV cache {settings.kv_cache_gib:g} GiB"
        )
    stage_lines, _ = placement_report(command, stage_config, resolved)
    lines += [f"      {line}" for line in stage_lines]
    return lines


def placement_report(
    command: str, stage_config: Any, resolved: list[tuple[StageEntry, Any]]
) -> tuple[list[str], str | None]:
    """A stage's placement and memory per GPU, for a plan, and why it cannot fit its declared
    cluster (None if it can, or if it declares none); no lines for a stage without placement."""
    placement = getattr(stage_config, "placement", None)
    if isinstance(placement, Placement):
        policy = policy_config(stage_config.model, resolved)
        return placement_plan(stage_config, *(policy or (None, "")))
    if not isinstance(placement, TrainPlacement):
        return [], None
    model = stage_config.student if command == "distill" else stage_config.model
    teacher = None
    if command == "distill" and stage_config.teacher.mode == "online":
        teacher = _shape(policy_config(stage_config.teacher.model, resolved))
    return train_plan(
        placement,
        stage_config.train,
        stage_config.lora.enabled,
        _shape(policy_config(model, resolved)),
        # DPO's micro-batch holds each pair's chosen and rejected sequences.
        sequences_per_row=2 if command == "dpo" else 1,
        teacher=teacher,
    )


def placement_check(
    command: str, stage_config: Any, resolved: list[tuple[StageEntry, Any]]
) -> tuple[list[str], str | None]:
    """`placement_report` where the stage declares a cluster (nothing to check otherwise)."""
    if getattr(getattr(stage_config, "placement", None), "cluster", None) is None:
        return [], None
    return placement_report(command, stage_config, resolved)


def _shape(policy: tuple[Any, str] | None) -> ModelShape | None:
    return None if policy is None else ModelShape.from_config(policy[0])


def engines(config: Any, prefix: str = "") -> list[tuple[str, EngineSettings]]:
    """Every vLLM engine a stage's config sets up, with its key: the typed ones (`engine`,
    `pairs.engine`, `teacher.engine`, `eval.engine`, ...; a settings class whose
    `uses_engine()` is false is left out) and the `options.engine` of a filter or reward whose
    plug-in serves a model with vLLM (its defaults where the options set none)."""
    found = []
    for item in fields(config):
        value = getattr(config, item.name)
        key = f"{prefix}{item.name}"
        if isinstance(value, EngineSettings):
            found.append((key, value))
        elif is_dataclass(value) and getattr(value, "uses_engine", lambda: True)():
            found += engines(value, f"{key}.")
        elif isinstance(value, list):
            for i, entry in enumerate(value):
                if _starts_engine(entry):
                    settings = from_dict(
                        EngineSettings, entry.options.get("engine") or {}, source=key
                    )
                    found.append((f"{key}[{i}].options.engine", settings))
    return found


def _starts_engine(entry: Any) -> bool:
    """Whether a filter or reward entry's plug-in starts a vLLM engine: it takes an `engine`
    option (it serves a model with vLLM: the difficulty filters, the LLM judge) and the
    checkpoint it serves is set (`over_refusal` serves its optional `judge_model` only)."""
    options = getattr(entry, "options", None)
    if not isinstance(options, dict):
        return False
    found = plugin(type(entry), getattr(entry, "name", None))
    parameters = parameters_of(found)
    if "engine" not in parameters:
        return False
    served = [
        option
        for option, kind in getattr(found, "checkpoint_options", {}).items()
        if kind == "causal_lm" and option in parameters
    ]
    return not served or any(
        options.get(option) is not None or parameters[option].default is inspect.Parameter.empty
        for option in served
    )


def check_stage_placement(command: str, stage_config: Any, source: str) -> None:
    """Refuses a stage run alone (`align COMMAND`) whose placement does not fit its declared
    cluster, as `align run` refuses a pipeline's stage.

    Raises:
        ConfigError: naming the key and the numbers.
    """
    resolved = [(StageEntry(name=stage_config.name, command=command), stage_config)]
    _, problem = placement_check(command, stage_config, resolved)
    if problem is not None:
        raise ConfigError(f"key 'placement.cluster' in {source}: {problem}")


def stage_dry_run(command: str, stage_config: Any, source: str) -> str:
    """`align COMMAND --dry-run`: the checks `align run --dry-run` makes of each stage, made of
    this one (config built and validated, plug-ins imported; the files it reads exist; its
    placement fits the declared cluster), and what it would read and where it would write.

    Raises:
        ConfigError: naming the key, as the run would before starting.
    """
    entry = StageEntry(name=stage_config.name, command=command)
    resolved = [(entry, stage_config)]
    check_stage_placement(command, stage_config, source)
    single = Config(name=stage_config.name, runs_dir=stage_config.runs_dir, stages=[entry])
    check_inputs(single, resolved, source)
    out = Path(stage_config.runs_dir) / stage_config.name
    return "\n".join(
        [f"align {command}: outputs under {out}/", *_stage_lines(command, stage_config, resolved)]
    )


def policy_config(model: str, resolved: list[tuple[StageEntry, Any]]) -> tuple[Any, str] | None:
    """The transformers config of checkpoint `model` before any stage has run, and where it
    comes from: `model`'s config.json if it exists, else the config of the checkpoint the
    earlier stage that writes it starts from (followed back through the stages; a make-model
    stage's preset gives its config). None when there is none."""
    from align.modeling import model_config, read_config

    if (Path(model) / "config.json").is_file():
        return read_config(model), f"config.json in {model}"
    for entry, earlier in resolved:
        if Path(earlier.runs_dir) / earlier.name / "model" != Path(model):
            continue
        if entry.command == "make-model":
            return model_config(
                earlier.preset
            ), f"preset {earlier.preset} of stage {earlier.name!r}"
        source = getattr(earlier, "model", None) or getattr(earlier, "student", None)
        if isinstance(source, str):
            return policy_config(source, resolved)
    return None


def check_inputs(
    config: Config, resolved: list[tuple[StageEntry, Any]], source: str = "<pipeline>"
) -> None:
    """Refuses a pipeline whose stages read a file or directory that does not exist outside
    its run directory (what earlier stages write there is checked by `resolve_stages`), so a
    run fails before its first stage and a dry run says what the run would say.

    Raises:
        ConfigError: naming the stage, the key and the path.
    """
    run_dir = Path(config.runs_dir) / config.name
    for entry, stage_config in resolved:
        for key in INPUT_KEYS:
            value: Any = stage_config
            for part in key.split("."):
                value = getattr(value, part, None)
            if not isinstance(value, str) or Path(value).is_relative_to(run_dir):
                continue
            if not Path(value).exists():
                reason = "is a symlink loop" if Path(value).is_symlink() else "does not exist"
                raise ConfigError(
                    f"stage {entry.name!r} in {source}: key '{key}': {value} {reason}"
                )


def _run_paths(value: Any) -> list[str]:
    """The parts after `{run}/` of every string in a stage's (unsubstituted) config."""
    if isinstance(value, str):
        return [part.split()[0] for part in value.split("{run}/")[1:] if part.strip()]
    if isinstance(value, dict):
        return [p for v in value.values() for p in _run_paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in _run_paths(v)]
    return []


def _substitute(value: Any, run_dir: str) -> Any:
    if isinstance(value, str):
        return value.replace("{run}", run_dir)
    if isinstance(value, dict):
        return {k: _substitute(v, run_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, run_dir) for v in value]
    return value
