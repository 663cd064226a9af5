"""Faults survived by the training stages and the pipeline runner (no vLLM, no Ray).

- A non-finite gradient skips the optimiser step with the weights unchanged; K in a row stop
  the run with a checkpoint (SFT, DPO and distillation share `align.training.NonFiniteGuard`).
- A checkpoint save cut off half-way (the process dies inside it) leaves the previous
  checkpoint usable, and the resumed run ends where an uninterrupted one does.
- A pipeline killed (SIGKILL, the whole process group) between stages or in the middle of one
  resumes at the stage it stopped in, that stage from its newest checkpoint.

The RL stage's faults (killed and hung rollout workers, a killed RL process, a cut save,
non-finite steps) are in tests/test_rl_stage.py, where the Ray runs are.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from align.runs import NonFiniteError
from align.tasks import make_problems, to_dpo, to_sft
from align.training import TrainSettings
from pipelines import dpo, sft
from tests.conftest import write_jsonl
from tests.helpers import ALIGN, align, kill_when, run_driver
from tests.helpers import sft_config as helpers_sft_config

pytestmark = pytest.mark.fault


class PoisonGradients(TrainerCallback):
    """Makes every gradient NaN just before the optimiser steps numbered in `steps` (from 1):
    what a NaN or infinite loss leaves behind."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 in self.steps:
            for parameter in model.parameters():
                if parameter.grad is not None:
                    parameter.grad.fill_(float("nan"))


class KeepWeights(TrainerCallback):
    """Keeps a copy of the weights after every optimiser step, by step number."""

    def __init__(self) -> None:
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after[state.global_step] = {
            name: tensor.detach().clone() for name, tensor in model.state_dict().items()
        }


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def sft_config(tmp_path: Path, model: Path, data: str, name: str, **train) -> sft.Config:
    """tests/helpers.py's SFT config, 2 epochs: 8 steps of 8 rows."""
    return helpers_sft_config(tmp_path, model, data, name, **{"epochs": 2.0, **train})


def logged(run_dir: Path, key: str) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


# ------------------------------------------------------------------------ non-finite steps
def test_a_non_finite_step_is_skipped_with_the_weights_unchanged(tmp_path, student_dir, sft_file):
    weights = KeepWeights()
    result = sft.run(
        sft_config(tmp_path, student_dir, sft_file, "nan-once"),
        callbacks=[PoisonGradients({3}), weights],
    )
    assert result["steps"] == 8  # 32 rows / 8 per step x 2 epochs: the run went on
    assert same(weights.after[3], weights.after[2]), "step 3 changed the weights"
    assert not same(weights.after[4], weights.after[3]), "step 4 did not train"
    assert not same(weights.after[2], weights.after[1])
    assert logged(tmp_path / "runs" / "nan-once", "train/skipped_nonfinite") == {3: 1.0}
    assert "step 3 skipped: non-finite gradients" in (
        tmp_path / "runs" / "nan-once" / "log.txt"
    ).read_text(encoding="utf-8")


def test_k_non_finite_steps_in_a_row_stop_the_run_with_a_checkpoint(
    tmp_path, student_dir, sft_file
):
    weights = KeepWeights()
    config = sft_config(tmp_path, student_dir, sft_file, "nan-thrice", max_nonfinite_steps=3)
    with pytest.raises(NonFiniteError, match="3 consecutive steps had non-finite gradients"):
        sft.run(config, callbacks=[PoisonGradients({3, 4, 5}), weights])
    run = tmp_path / "runs" / "nan-thrice"
    assert not (run / "model").exists()
    # The checkpoint of step 5 is complete and holds the weights of step 2.
    checkpoint = run / "checkpoints" / "checkpoint-5"
    assert (checkpoint / "trainer_state.json").is_file()
    saved = load_file(str(checkpoint / "model.safetensors"))
    assert same(saved, {k: weights.after[2][k] for k in saved})
    # Two poisoned steps in a row (below the limit) do not stop it.
    assert (
        sft.run(
            sft_config(tmp_path, student_dir, sft_file, "nan-twice", max_nonfinite_steps=3),
            callbacks=[PoisonGradients({3, 4})],
        )["steps"]
        == 8
    )


def test_dpo_and_distillation_stop_on_non_finite_steps_too(tmp_path, student_dir):
    from pipelines import distill

    pairs = write_jsonl(
        tmp_path / "dpo.jsonl", to_dpo(make_problems(["add", "sort"], [1], 8, seed=3), seed=0)
    )
    dpo_config = dpo.Config(
        model=str(student_dir),
        data=pairs,
        runs_dir=str(tmp_path / "runs"),
        train=TrainSettings(batch_size=4, epochs=1.0, max_nonfinite_steps=2),
    )
    with pytest.raises(NonFiniteError, match="2 consecutive steps"):
        dpo.run(dpo_config, callbacks=[PoisonGradients({1, 2})])
    assert (
        tmp_path / "runs" / "dpo" / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    ).exists()

    rows = write_jsonl(
        tmp_path / "sft.jsonl", to_sft(make_problems(["add", "sort"], [1], 8, seed=4))
    )
    distill_config = distill.Config(
        student=str(student_dir),
        data=rows,
        teacher=distill.TeacherSettings(model=str(student_dir)),
        runs_dir=str(tmp_path / "runs"),
        train=TrainSettings(batch_size=4, epochs=1.0, max_nonfinite_steps=2),
    )
    with pytest.raises(NonFiniteError, match="2 consecutive steps"):
        distill.run(distill_config, callbacks=[PoisonGradients({1, 2})])
    assert (tmp_path / "runs" / "distill" / "checkpoints" / "checkpoint-2").is_dir()


# ------------------------------------------------------------------------ a save cut off
# Runs `align` with the Trainer's checkpoint save dying (os._exit) after the weights and the
# optimiser state of step CUT_AT are written and before the RNG and trainer state are.
CUT_SAVE = """
import os
import sys

from transformers import Trainer

from align.cli import main

save_rng_state = Trainer._save_rng_state


def cut(self, output_dir):
    if self.state.global_step == int(os.environ["ALIGN_TEST_CUT_AT"]):
        os._exit(9)
    return save_rng_state(self, output_dir)


Trainer._save_rng_state = cut
sys.exit(main(sys.argv[1:]))
"""


def test_a_save_cut_off_half_way_leaves_the_previous_checkpoint_usable(
    tmp_path, student_dir, sft_file
):
    whole = sft.run(sft_config(tmp_path, student_dir, sft_file, "whole"))

    config = sft_config(tmp_path, student_dir, sft_file, "cut")
    config_file = tmp_path / "cut.yaml"
    from align.config import save_config

    save_config(config, config_file)
    out = run_driver(
        tmp_path, CUT_SAVE, ["sft", "--config", str(config_file)], ALIGN_TEST_CUT_AT="4"
    )
    assert out.returncode == 9, out.stderr[-3000:]
    checkpoints = tmp_path / "runs" / "cut" / "checkpoints"
    assert (checkpoints / "checkpoint-4" / "model.safetensors").exists()
    assert not (checkpoints / "checkpoint-4" / "trainer_state.json").exists()

    out = align("sft", "--config", str(config_file))
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = json.loads((tmp_path / "runs" / "cut" / "result.json").read_text())
    log_text = (tmp_path / "runs" / "cut" / "log.txt").read_text(encoding="utf-8")
    assert "checkpoint-4 was not completely written" in log_text
    assert f"resuming from {checkpoints / 'checkpoint-2'}" in log_text
    assert resumed["steps"] == whole["steps"] == 8
    # Steps 3-8 ran again from checkpoint 2 and end where the uninterrupted run ends.
    losses = logged(tmp_path / "runs" / "cut", "train/loss")
    assert losses == logged(tmp_path / "runs" / "whole", "train/loss")
    a = load_file(str(tmp_path / "runs" / "whole" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "runs" / "cut" / "model" / "model.safetensors"))
    assert max_difference(a, b) < 1e-5


# ------------------------------------------------------------------------ a killed pipeline


def test_a_killed_pipeline_resumes_at_the_stage_it_stopped_in(tmp_path):
    def pipeline_file(runs: Path) -> Path:
        config = {
            "name": "p",
            "runs_dir": str(runs),
            "stages": [
                {"name": "student", "command": "make-model", "config": {"preset": "student"}},
                {"name": "data", "command": "make-data", "config": {"per_level": 6}},
                {
                    "name": "sft",
                    "command": "sft",
                    "config": {
                        "model": "{run}/student/model",
                        "data": "{run}/data/train/sft",
                        "train": {
                            "batch_size": 8,
                            "token_budget": 8000,
                            "learning_rate": 3e-3,
                            "logging_steps": 1,
                            "save_steps": 4,
                        },
                    },
                },
            ],
        }
        path = runs.parent / f"{runs.name}.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        return path

    whole = tmp_path / "whole"
    out = subprocess.run(
        [ALIGN, "run", str(pipeline_file(whole))], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]

    runs = tmp_path / "cut"
    path = pipeline_file(runs)
    root = runs / "p"
    # 1. Killed right after the data stage finished, before or as the SFT stage starts.
    kill_when(
        ["run", str(path)],
        lambda: (root / "data" / "stage-done.json").exists(),
        tmp_path / "first.log",
    )
    assert not (root / "sft" / "stage-done.json").exists()
    # 2. Killed in the middle of the SFT stage, once its checkpoint of step 8 is complete.
    done_8 = root / "sft" / "checkpoints" / "checkpoint-8" / "trainer_state.json"
    kill_when(["run", str(path)], done_8.exists, tmp_path / "second.log")
    second = (tmp_path / "second.log").read_text(encoding="utf-8")
    assert "[1/3] student (make-model): finished in an earlier run, skipped" in second
    assert "[2/3] data (make-data): finished in an earlier run, skipped" in second
    assert not (root / "sft" / "stage-done.json").exists()
    # 3. Run to the end: the SFT stage continues from its newest checkpoint.
    out = subprocess.run([ALIGN, "run", str(path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("finished in an earlier run, skipped") == 2
    assert "[3/3] sft (sft): running" in out.stdout
    log_text = (root / "sft" / "log.txt").read_text(encoding="utf-8")
    assert "resuming from" in log_text and "checkpoint-" in log_text
    # The same steps and losses as the uninterrupted pipeline, and the same weights.
    cut_losses = logged(root / "sft", "train/loss")
    whole_losses = logged(whole / "p" / "sft", "train/loss")
    assert sorted(cut_losses) == sorted(whole_losses) and len(whole_losses) > 8
    assert cut_losses == whole_losses
    a = load_file(str(whole / "p" / "sft" / "model" / "model.safetensors"))
    b = load_file(str(root / "sft" / "model" / "model.safetensors"))
    assert max_difference(a, b) < 1e-5
