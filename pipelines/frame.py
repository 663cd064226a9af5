"""The frame of the training stages (`sft`, `dpo`, `distill`, `rl`).

Each of those stages checks its inputs first, before anything is written, then hands over to
`run_stage`, which does the rest the same way for all:

    open runs/<name>/ -> unless model/ is already there: train -> evaluate model/ on the
    held-out rows -> write result.json.

For the stages that train with a TRL trainer, `train_and_evaluate` is the training step: build
the rows (the stage's `prepare`), train them here or on `placement.processes` ranks (the
stage's `fit`, through align.launch; an interrupted run resumes from its newest checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from align import launch
from align.runs import Run
from align.training import finished_result, resume_point
from pipelines import evaluate


def train_and_evaluate(
    config: Any,
    prepare: Callable[[Run], tuple[Any, dict]],
    fit: Callable[..., dict],
    callbacks: list | None = None,
    **fit_arguments,
) -> dict:
    """Runs a trained stage whose inputs are checked; returns its result.

    Args:
        config: the stage's Config (name, runs_dir, heldout, eval, placement).
        prepare: builds the rows to train from the open run directory: (dataset, facts), the
            facts going into the result (`data`, `budget_tokens`, ...). Not called when the
            model is already there.
        fit: the stage's training function (see `align.launch.train`).
        callbacks: extra TrainerCallbacks.
        fit_arguments: more keyword arguments of `fit`.
    """
    checkpoints = Path(config.runs_dir) / config.name / "checkpoints"

    def train(run_dir: Run) -> dict:
        dataset, facts = prepare(run_dir)
        return launch.train(
            fit,
            config,
            dataset,
            run_dir,
            resume_point(checkpoints),
            callbacks,
            facts=facts,
            **fit_arguments,
        )

    return run_stage(config, train)


def run_stage(config: Any, train: Callable[[Run], dict], eval_settings: Any = None) -> dict:
    """Runs a training stage whose inputs are checked; returns its result (also result.json).

    Args:
        config: the stage's Config (name, runs_dir, heldout, eval).
        train: trains in the open run directory and returns the result; not called when the
            stage's model/ is already there (a finished run's result is read back instead).
        eval_settings: how model/ is evaluated on `config.heldout`; default `config.eval`.
    """
    out = Path(config.runs_dir) / config.name
    model_dir = out / "model"
    with Run(out, config) as run_dir:
        result = finished_result(model_dir)
        if result is None:
            result = train(run_dir)
        if config.heldout is not None:
            result["eval"] = evaluate.evaluate_checkpoint(
                eval_settings or config.eval, str(model_dir), config.heldout, config
            )
        run_dir.write_json("result.json", result)
    return result
