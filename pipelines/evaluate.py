"""Stage `eval`: score a checkpoint on held-out prompts with vLLM and print the table.

Output: `runs/<name>/eval.json` (overall, per task, per level, per task x level) and the
table on the terminal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from transformers import AutoTokenizer

from align import engine
from align.config import ConfigError, check
from align.data import load_dataset_file
from align.evaluate import evaluate, format_table, scalars
from align.modeling import check_checkpoint, is_vision_language
from align.rewarding import (
    RewardSpec,
    build_reward_set,
    check_option_columns,
    check_reward_checkpoints,
)
from align.runs import Run, RunSettings
from align.safety import (
    GUARD_FORMATS,
    GuardFormat,
    RefusalDetector,
    SafetyCheck,
    guard_judge,
    harmful_flags,
)
from align.settings import EngineSettings, GenerationSettings
from align.vision import rows_images

log = logging.getLogger(__name__)


@dataclass
class SafetySettings:
    """Safety evaluation on rows with a boolean `harmful` column: of each prompt's greedy
    completion, whether it refuses (on harmful prompts: the refusal rate; on harmless ones: the
    over-refusal rate) and, with a guard, whether the guard calls it unsafe (the unsafe rate)."""

    # Guard checkpoint judging each greedy completion (null: refusals only).
    guard: str | None = None
    # "llama_guard" (instruction written from `categories`) or "qwen3guard".
    format: GuardFormat = "llama_guard"
    # Unsafe categories, code -> name (null: Llama Guard 3's S1-S14).
    categories: dict[str, str] | None = None
    # Qwen3Guard only: count "Controversial" as safe.
    controversial_safe: bool = False
    # Refusal phrases, regular expressions matched case-blind (null: the built-in English ones).
    refusal_patterns: list[str] | None = None
    # The boolean column marking harmful prompts.
    column: str = "harmful"
    # vLLM engine settings of the guard (Llama Guard's instruction is ~600 tokens long).
    engine: EngineSettings = field(default_factory=lambda: EngineSettings(max_model_len=2048))

    def validate(self) -> None:
        check(
            self.format in GUARD_FORMATS,
            "format",
            f"must be one of {', '.join(GUARD_FORMATS)} (got {self.format!r})",
        )

    def check_inputs(self, dataset, source: str) -> None:
        """Refuses, before anything runs, a guard that is not a usable checkpoint and rows
        without a true/false `column` (naming the file, row and column)."""
        if self.guard is not None:
            check_checkpoint(
                self.guard,
                "safety.guard",
                self.engine.max_model_len,
                length_key="safety.engine.max_model_len",
            )
        if self.column not in dataset.column_names:
            raise ConfigError(
                f"key 'safety': {source} has no column {self.column!r} marking harmful "
                "prompts; add it or remove the safety section"
            )
        harmful_flags(list(dataset), self.column, source)

    def build(self, llm=None) -> SafetyCheck:
        """The check: the guard's engine started (when there is a guard; `llm` if it already
        runs) and the refusal detector."""
        guard = None
        if self.guard is not None:
            guard = guard_judge(
                self.guard,
                self.format,
                self.categories,
                self.controversial_safe,
                llm=llm or engine.start_engine(self.guard, self.engine),
            )
        return SafetyCheck(guard, RefusalDetector(self.refusal_patterns), self.column)


@dataclass
class EvalSettings(GenerationSettings):
    """How held-out rows are scored; `align eval` and every training stage share these. Greedy
    accuracy is always decoded at temperature 0; `samples` completions at `temperature` give
    pass@k and the sample accuracy."""

    samples: int = 4

    # Evaluate only the first N rows (None: all).
    limit: int | None = None
    # k of pass@k.
    pass_k: int = 4
    # Sampling seed.
    seed: int = 0
    # vLLM engine settings.
    engine: EngineSettings = field(default_factory=EngineSettings)
    # Rewards scored on the sampled completions, each reported as its mean beside the accuracy
    # (a custom or partial-credit reward is otherwise invisible in evaluation). Empty: accuracy
    # only, except in `align rl`, whose evaluation then scores with the stage's own rewards.
    rewards: list[RewardSpec] = field(default_factory=list)
    # Safety rates of the greedy completions on rows with a `harmful` column (null: none).
    safety: SafetySettings | None = None

    def validate(self) -> None:
        super().validate()
        check(self.pass_k >= 1, "pass_k", f"must be >= 1 (got {self.pass_k})")
        check(
            self.samples >= self.pass_k,
            "samples",
            f"must be >= pass_k ({self.pass_k}), got {self.samples}",
        )
        check(
            self.temperature > 0,
            "temperature",
            f"must be > 0 for pass@k sampling (got {self.temperature})",
        )
        check(
            self.limit is None or self.limit >= 1,
            "limit",
            f"must be >= 1 or null (got {self.limit})",
        )


@dataclass(kw_only=True)
class Config(EvalSettings, RunSettings):
    """Settings of `align eval`."""

    name: str = "eval"

    # Checkpoint directory to evaluate (Hugging Face format, safetensors).
    model: str
    # Held-out prompts with answers: JSONL, Parquet or a `datasets` directory (columns
    # prompt, answer; optional task, level).
    data: str
    # Bad dataset rows: "raise" stops with the file, row and field; "skip" drops and counts them.
    on_error: Literal["raise", "skip"] = "raise"

    def validate(self) -> None:
        EvalSettings.validate(self)
        RunSettings.validate(self)


def evaluate_checkpoint(settings: EvalSettings, model: str, data: str, stage: RunSettings) -> dict:
    """Runs `align eval` on a training stage's output with the stage's evaluation settings,
    into the stage's `eval/` and to its trackers."""
    shared = {f.name: getattr(settings, f.name) for f in fields(EvalSettings)}
    name, runs_dir, report_to = f"{stage.name}/eval", stage.runs_dir, stage.report_to
    return run(
        Config(model=model, data=data, name=name, runs_dir=runs_dir, report_to=report_to, **shared)
    )


def check_heldout(path: str | None, settings: EvalSettings, vision: bool = False) -> None:
    """Reads the held-out rows a training stage evaluates on when it ends, before it starts,
    with what its evaluation settings need of them (the safety section's guard and column;
    with `vision`, for a vision-language model, each row's images).

    So a bad held-out file is refused before any training rather than after it.

    Raises:
        DataError: naming the file, row and field, as `align eval` would at the end.
        ConfigError: naming the key, for a bad guard checkpoint or a missing column.
    """
    if path is not None:
        dataset, _ = load_dataset_file(
            path, "rl", images=vision, max_images=settings.engine.max_images_per_prompt
        )
        if settings.safety is not None:
            settings.safety.check_inputs(dataset, path)


def run(config: Config, llm=None) -> dict:
    """Evaluates `config.model`; pass a started engine as `llm` to reuse it."""
    # Inputs are checked before anything is written.
    model_config = check_checkpoint(config.model, "model", config.engine.max_model_len, vision=True)
    vision = is_vision_language(model_config)
    dataset, data_report = load_dataset_file(
        config.data,
        "rl",
        on_error=config.on_error,
        images=vision,
        max_images=config.engine.max_images_per_prompt,
    )
    if config.safety is not None:
        config.safety.check_inputs(dataset, config.data)
    rewards = None
    if config.rewards:
        check_reward_checkpoints(config.rewards, "rewards")
        check_option_columns(config.rewards, dataset.column_names, "rewards", config.data)
        rewards = build_reward_set(config.rewards)
    with Run(Path(config.runs_dir) / config.name, config) as run_dir:
        rows = list(dataset)[: config.limit]
        images = rows_images(rows, config.data) if vision else None
        tokenizer = AutoTokenizer.from_pretrained(config.model)
        llm = llm or engine.start_engine(config.model, config.engine)
        report = evaluate(
            llm,
            tokenizer,
            rows,
            pass_k=config.pass_k,
            samples=config.samples,
            temperature=config.temperature,
            max_tokens=config.max_new_tokens,
            seed=config.seed,
            rewards=rewards,
            safety=None if config.safety is None else config.safety.build(),
            images=images,
        )
        report["model"] = config.model
        report["data"] = {**data_report, "evaluated": len(rows)}
        run_dir.write_json("eval.json", report)
        run_dir.log_metrics(0, scalars(report))
        table = format_table(report, title=f"held-out evaluation of {config.model}")
        (run_dir.dir / "eval.txt").write_text(table + "\n", encoding="utf-8")
        print(table)
    return report
