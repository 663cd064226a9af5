"""Training stages on several processes (`placement.processes`, align/launch.py): real torchrun
ranks over gloo, compared with one process accumulating the same micro-batches."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from align.config import ConfigError, load_config
from align.launch import TrainPlacement
from align.modeling import build_model, load_model, write_checkpoint
from align.runs import RunStopped
from align.tasks import make_problems, to_dpo
from align.training import LoraSettings, TrainSettings, lora_config, with_weights
from pipelines import distill, dpo, sft
from pipelines.pipeline import stage_dry_run
from tests.conftest import write_jsonl
from tests.helpers import kill_when, logged


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model" / "model.safetensors")


def assert_same_training(one, two, steps: int) -> None:
    """The first `steps` logged losses within 1e-5 and the exported weights within 1e-5."""
    losses_one, losses_two = logged(one, "train/loss")[:steps], logged(two, "train/loss")[:steps]
    assert len(losses_one) == len(losses_two) == steps
    assert losses_two == pytest.approx(losses_one, abs=1e-5)
    assert weights(one).keys() == weights(two).keys()
    for name, tensor in weights(one).items():
        torch.testing.assert_close(weights(two)[name], tensor, atol=1e-5, rtol=0, msg=name)
    # The loss moved: a run that did not train would also pass the comparisons above.
    assert losses_one[-1] < losses_one[0]


# 8 epochs of 32 rows in micro-batches of 4 on 2 ranks: 32 steps, long enough to be killed
# half-way on a busy machine.
TRAIN = dict(batch_size=4, epochs=8.0, learning_rate=3e-3, logging_steps=1, save_steps=2)


def train_settings(**overrides) -> TrainSettings:
    return TrainSettings(**{**TRAIN, **overrides})


def sft_run(tmp_path, model, data, name, processes, **train) -> sft.Config:
    return sft.Config(
        model=str(model),
        data=data,
        name=name,
        runs_dir=str(tmp_path / "runs"),
        train=train_settings(**train),
        placement=TrainPlacement(processes=processes),
    )


@pytest.mark.fault
def test_sft_on_two_processes_equals_one_accumulating_and_resumes(tmp_path, student_dir, sft_file):
    """2 ranks x 4 rows == 1 process x 4 rows x 2 accumulation steps; a killed 2-rank run
    resumed from its checkpoint ends where the uninterrupted one did."""
    runs = tmp_path / "runs"
    one = sft.run(sft_run(tmp_path, student_dir, sft_file, "one", 1, grad_accum=2))
    two = sft.run(sft_run(tmp_path, student_dir, sft_file, "two", 2))
    assert one["steps"] == two["steps"] == 32
    assert_same_training(runs / "one", runs / "two", steps=3)
    # The expert load counted by both ranks, summed: the same as one process counted.
    load_one = json.loads((runs / "one" / "expert_load.json").read_text())["share_per_expert"]
    load_two = json.loads((runs / "two" / "expert_load.json").read_text())["share_per_expert"]
    assert load_two.keys() == load_one.keys()
    for layer, shares in load_one.items():
        assert load_two[layer] == pytest.approx(shares)

    # Killed (the stage process, torchrun and both ranks) once step 2's checkpoint is complete.
    args = [
        "sft",
        f"model={student_dir}",
        f"data={sft_file}",
        "name=killed",
        f"runs_dir={runs}",
        *(f"train.{key}={value}" for key, value in TRAIN.items()),
        "placement.processes=2",
    ]
    state = runs / "killed" / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    kill_when(args, state.exists, tmp_path / "killed.log")
    assert not (runs / "killed" / "model").exists()
    resumed = sft.run(load_config(sft.Config, None, args[1:]))
    assert resumed["steps"] == 32
    job = json.loads((runs / "killed" / "ranks" / "job.json").read_text())
    step = int(job["resume"].rsplit("-", 1)[1])
    assert job["resume"].startswith(str(state.parent.parent)) and 2 <= step < 32
    # The steps after the checkpoint were trained after the resume, from its weights, optimiser
    # and data position.
    assert logged(runs / "killed", "train/loss")[-(32 - step) :] == pytest.approx(
        logged(runs / "two", "train/loss")[step:], abs=1e-6
    )
    for name, tensor in weights(runs / "two").items():
        torch.testing.assert_close(weights(runs / "killed")[name], tensor, atol=1e-6, rtol=0)
    assert _no_rank_left(runs / "killed")


def _no_rank_left(run_dir) -> bool:
    """Whether no process still runs a rank of the run in `run_dir` (killing the group must
    take the ranks with it)."""
    found = subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True, text=True)
    return not [pid for pid in found.stdout.split() if int(pid) != os.getpid()]


def test_dpo_on_two_processes_equals_one_accumulating(tmp_path, student_dir):
    rows = to_dpo(make_problems(["add", "sort"], [1, 2], 8, seed=1)).select(range(16))
    data = write_jsonl(
        tmp_path / "pairs.jsonl", rows.select_columns(["prompt", "chosen", "rejected"])
    )

    def config(name, processes, **train):
        return dpo.Config(
            model=str(student_dir),
            data=data,
            name=name,
            runs_dir=str(tmp_path / "runs"),
            train=train_settings(batch_size=2, learning_rate=1e-3, **train),
            placement=TrainPlacement(processes=processes),
        )

    dpo.run(config("one", 1, grad_accum=2))
    dpo.run(config("two", 2))
    assert_same_training(tmp_path / "runs" / "one", tmp_path / "runs" / "two", steps=4)


def test_distillation_on_two_processes_equals_one_accumulating(tmp_path, student_dir, sft_file):
    teacher = write_checkpoint(build_model("student", seed=1), tmp_path / "teacher")

    def config(name, processes, **train):
        return distill.Config(
            student=str(student_dir),
            data=sft_file,
            teacher=distill.TeacherSettings(model=str(teacher), mode="offline", top_k=8),
            heldout_sft=sft_file,
            name=name,
            runs_dir=str(tmp_path / "runs"),
            train=train_settings(**train),
            placement=TrainPlacement(processes=processes),
        )

    one = distill.run(config("one", 1, grad_accum=2))
    two = distill.run(config("two", 2))
    assert_same_training(tmp_path / "runs" / "one", tmp_path / "runs" / "two", steps=4)
    # The held-out scores sum both ranks' shares of the rows.
    assert two["heldout_after"]["tokens"] == one["heldout_after"]["tokens"]
    assert two["heldout_after"]["ce"] == pytest.approx(one["heldout_after"]["ce"], abs=1e-5)


def test_a_stop_on_the_ranks_stops_the_stage_with_their_message(tmp_path, student_dir, sft_file):
    # A learning rate that sends the weights to 1e30 (after the warmup step at 0): every later
    # gradient is not finite.
    config = sft_run(
        tmp_path, student_dir, sft_file, "nan", 2, learning_rate=1e30, max_nonfinite_steps=2
    )
    with pytest.raises(RunStopped, match="2 consecutive steps had non-finite gradients"):
        sft.run(config)
    run = tmp_path / "runs" / "nan"
    assert logged(run, "train/skipped_nonfinite") == [1.0, 2.0]
    assert (run / "checkpoints" / "checkpoint-4" / "trainer_state.json").exists()
    assert not (run / "model").exists()


def test_the_plan_shows_the_processes(tmp_path, student_dir, sft_file):
    config = sft_run(tmp_path, student_dir, sft_file, "plan", 2)
    plan = stage_dry_run("sft", config, "<test>")
    assert "training 2 process(es), fsdp, full-parameter" in plan
    assert "trainer  per GPU:" in plan
    assert not (tmp_path / "runs").exists()


def test_lora_merged_from_gathered_fsdp_weights_equals_peft_merge(student_dir):
    """The export of LoRA trained on FSDP ranks: the gathered state dict, put into a copy built
    on the meta device, merges into the weights peft merges from the live model."""
    from peft import get_peft_model

    model = get_peft_model(load_model(student_dir), lora_config(LoraSettings(enabled=True, r=4)))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # trained adapters: B is zero at initialisation
            torch.nn.init.normal_(parameter, std=0.1)
    gathered = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    merged = with_weights(model, gathered).merge_and_unload().state_dict()
    expected = model.merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    changed = 0
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=0, msg=name)
        changed += not torch.equal(tensor, load_model(student_dir).state_dict()[name])
    assert changed > 0  # the adapters were merged into some weights


def test_on_policy_distillation_on_several_ranks_is_refused():
    with pytest.raises(ConfigError, match="on_policy.ratio"):
        load_config(
            distill.Config,
            None,
            [
                "student=s",
                "data=d",
                "teacher.model=t",
                "on_policy.ratio=0.5",
                "placement.processes=2",
            ],
        )
