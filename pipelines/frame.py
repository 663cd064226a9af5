"""The frame of the stages that train with a TRL trainer (`sft`, `dpo`, `distill`).

Each of those stages checks its inputs first, before anything is written, then hands over to
`train_and_evaluate`, which does the rest the same way for all three:

    open runs/<name>/ -> unless model/ is already there: build the training rows (the stage's
    `prepare`), train them here or on `placement.processes` ranks (the stage's `fit`, through
    align.launch; an interrupted run resumes from its newest checkpoint) -> evaluate model/ on
    the held-out rows -> write result.json.
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
    out = Path(config.runs_dir) / config.name
    model_dir = out / "model"
    with Run(out, config) as run_dir:
        result = finished_result(model_dir)
        if result is None:
            dataset, facts = prepare(run_dir)
            result = launch.train(
                fit,
                config,
                dataset,
                run_dir,
                resume_point(out / "checkpoints"),
                callbacks,
                facts=facts,
                **fit_arguments,
            )
        if config.heldout is not None:
            result["eval"] = evaluate.evaluate_checkpoint(
                config.eval, str(model_dir), config.heldout, config
            )
        run_dir.write_json("result.json", result)
    return result
