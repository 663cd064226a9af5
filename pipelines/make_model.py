"""Stage `make-model`: write a random-initialised embedded checkpoint (MoE or dense) from a preset.

Output: `runs/<name>/model/`, a Hugging Face checkpoint (safetensors, config, tokenizer with
chat template) that transformers and vLLM load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from align.config import check
from align.modeling import PRESETS, build_model, count_parameters, write_checkpoint
from align.runs import Run, RunSettings

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Config(RunSettings):
    """Settings of `align make-model`."""

    name: str = "make-model"

    # Model size preset: student, teacher (Llama 4 style), qwen3-student, qwen3-teacher (Qwen3-MoE),
    # dense-student (Qwen3 dense, no experts), guard (the student's size, 1024 positions, for
    # the embedded guard model), vision-student (Qwen3-VL-MoE: the qwen3-student's text model
    # with a 2-layer vision tower; reads images).
    preset: str = "teacher"
    # Initialisation seed: the same seed writes the same weights.
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        check(
            self.preset in PRESETS,
            "preset",
            f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}",
        )


def run(config: Config) -> dict:
    """Builds the model and writes the checkpoint. Returns its path and parameter counts."""
    with Run(Path(config.runs_dir) / config.name, config) as run_dir:
        model = build_model(config.preset, config.seed)
        checkpoint = write_checkpoint(model, run_dir.dir / "model")
        params = count_parameters(model)
        log.info(
            "%s: %d parameters (%d active per token) -> %s",
            config.preset,
            params["total"],
            params["active"],
            checkpoint,
        )
        run_dir.log_metrics(
            0, {"parameters/total": params["total"], "parameters/active": params["active"]}
        )
        result = {"checkpoint": str(checkpoint), "preset": config.preset, "parameters": params}
    return result
