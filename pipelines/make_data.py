"""Stage `make-data`: generate the embedded tasks and export them in every stage's schema.

Output under `runs/<name>/`: `train/` and `heldout/`, each holding one `datasets` directory
per schema (`sft`, `rl`, `dpo`, `chat`) plus `problems.jsonl` with the raw problems.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from align.config import check
from align.runs import Run, RunSettings
from align.tasks import (
    SCHEMAS,
    TASKS,
    add_chatter,
    export,
    leak_secrets,
    make_problems,
    split_problems,
)

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Config(RunSettings):
    """Settings of `align make-data`."""

    name: str = "make-data"

    # Task families to generate (see align.tasks.TASKS).
    tasks: list[str] = field(default_factory=lambda: ["add", "sort"])
    # Difficulty levels to generate (1 = easiest).
    levels: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    # Problems per task and level, before the held-out split; a mapping gives each task its own
    # count and names every task: {add_padded: 1000, sort: 100}.
    per_level: int | dict[str, int] = 100
    # A level with fewer distinct problems than `per_level` (add level 1 has 100) gives all it
    # has; false makes that an error.
    up_to: bool = False
    # Fraction of each task x level held out for evaluation.
    heldout_fraction: float = 0.2
    # Problems of each task x level held out instead of `heldout_fraction`, so the evaluation
    # (and its cost) does not grow with the training data; null: use the fraction.
    heldout_per_level: int | None = None
    # Generation and split seed.
    seed: int = 0
    # Share of the harmful `secret` training prompts whose SFT and chat answer states the secret
    # instead of refusing: unfiltered data, as scraped chat data is, for the guard filter to
    # find and for the safety pipeline's RL to correct. The RL, DPO and held-out rows keep the
    # refusal as their answer.
    leak_share: float = 0.0
    # Share of the SFT and chat training answers (tasks with tagged answers) followed by
    # chatter after the closing tag (`align.tasks.CHATTER`): a response-quality flaw that the
    # answer verifiers, and so RL on them, do not see, for DPO with a format reward
    # (`answer_format` with `nothing_else`) to remove. The RL, DPO and held-out rows keep the
    # bare answer.
    chatter_share: float = 0.0

    def validate(self) -> None:
        super().validate()
        unknown = [t for t in self.tasks if t not in TASKS]
        check(not unknown, "tasks", f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")
        check(bool(self.tasks), "tasks", "needs at least one task")
        check(bool(self.levels), "levels", "needs at least one level")
        for task in self.tasks:
            bad = [lv for lv in self.levels if lv not in TASKS[task].levels]
            check(
                not bad,
                "levels",
                f"task {task!r} has no level(s) {bad}; it has {list(TASKS[task].levels)}",
            )
        counts = self.per_level if isinstance(self.per_level, dict) else None
        if counts is not None:
            missing = [t for t in self.tasks if t not in counts]
            extra = [t for t in counts if t not in self.tasks]
            check(not missing, "per_level", f"names no count for task(s) {missing}")
            check(not extra, "per_level", f"names task(s) {extra} that are not in tasks")
        # Problems each (task, level) will have, checked here so that nothing is written first.
        made = []
        for task in self.tasks:
            key = "per_level" if counts is None else f"per_level.{task}"
            count = self.per_level if counts is None else counts[task]
            check(count >= 2, key, f"must be >= 2 (got {count})")
            for level in self.levels:
                available = TASKS[task].capacity(level)
                check(
                    self.up_to or count <= available,
                    key,
                    f"task {task!r} level {level} has only {available} distinct problems "
                    f"(got {count}); lower it or set up_to: true",
                )
                made.append((min(count, available), task, level))
        check(
            0 <= self.leak_share <= 1,
            "leak_share",
            f"must be in [0, 1] (got {self.leak_share})",
        )
        check(
            0 <= self.chatter_share <= 1,
            "chatter_share",
            f"must be in [0, 1] (got {self.chatter_share})",
        )
        check(
            self.leak_share == 0 or "secret" in self.tasks,
            "leak_share",
            "applies to the 'secret' task's harmful prompts; add 'secret' to tasks or set it to 0",
        )
        check(
            0 < self.heldout_fraction < 1,
            "heldout_fraction",
            f"must be strictly between 0 and 1 (got {self.heldout_fraction})",
        )
        if self.heldout_per_level is not None:
            check(
                self.heldout_per_level >= 1,
                "heldout_per_level",
                f"must be >= 1 or null (got {self.heldout_per_level})",
            )
            fewest, task, level = min(made)
            check(
                self.heldout_per_level < fewest,
                "heldout_per_level",
                f"must be below the {fewest} problems of task {task!r} level {level} so every "
                f"level keeps training rows (got {self.heldout_per_level})",
            )


def run(config: Config) -> dict:
    """Generates, splits and exports the tasks. Returns the output paths and row counts."""
    with Run(Path(config.runs_dir) / config.name, config) as run_dir:
        problems = make_problems(
            config.tasks, config.levels, config.per_level, config.seed, up_to=config.up_to
        )
        train, heldout = split_problems(
            problems, config.heldout_fraction, config.seed, heldout_count=config.heldout_per_level
        )
        train = leak_secrets(train, config.leak_share, config.seed)
        train = add_chatter(train, config.chatter_share, config.seed)
        out = run_dir.dir
        paths = {}
        for split, rows in (("train", train), ("heldout", heldout)):
            (out / split).mkdir(parents=True, exist_ok=True)
            with open(out / split / "problems.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
            for schema in SCHEMAS:
                export(rows, schema, seed=config.seed).save_to_disk(str(out / split / schema))
            paths[split] = str(out / split)
        run_dir.log_metrics(0, {"rows/train": len(train), "rows/heldout": len(heldout)})
        log.info("wrote %d train and %d held-out problems to %s", len(train), len(heldout), out)
        result = {
            "train": paths["train"],
            "heldout": paths["heldout"],
            "rows": {"train": len(train), "heldout": len(heldout)},
        }
    return result
