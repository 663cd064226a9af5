"""The RL controller driven in-process by a small fake fleet: no Ray, no vLLM, sub-second runs.

`FakeFleet` keeps the one property of Ray actors the controller relies on: calls to one actor run
one at a time, in the order they were made (a single-thread executor per actor). Its workers
return groups tagged with the version they hold (a sync changes it when it runs, behind the
requests queued before it); its learner counts versions and returns a loss that depends on the
batch, so two runs that train the same batches log the same losses. It can hang or fail a
request, and raise the learner's errors.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from align.config import from_dict
from align.rl.controller import (
    Controller,
    LearnerStopped,
    RewardsFailed,
    RolloutWorkersFailed,
)
from align.rl.group import ActorFailure
from align.rl.rollout import GenerateResult, Rollout
from align.runs import NonFiniteError, Run
from align.tasks import make_problems, to_rl
from pipelines import rl


class FakeFleet:
    """In-process stand-ins for the learner group and the rollout workers.

    Args:
        config: the stage config.
        hang_on: request numbers (1-based, over all workers) that never answer.
        nonfinite_at: the learner step that raises the non-finite stop.
        learner_dies_at: the learner step at which a rank "dies".
        unscored: prompt ids whose groups come back with no completion scored, as when the
            reward `flaky` raises on them; `unscored_from`: the request from which every group
            does.
        step_seconds: how long each learner step takes (generation takes no time), so that
            generation runs ahead of training whatever the machine's load.
    """

    def __init__(
        self,
        config,
        hang_on=(),
        nonfinite_at=None,
        learner_dies_at=None,
        unscored=(),
        unscored_from=None,
        step_seconds=0.0,
    ) -> None:
        self.step_seconds = step_seconds
        self.config = config
        self.unscored, self.unscored_from = set(unscored), unscored_from
        self.workers = config.placement.workers
        self.hang_on, self.nonfinite_at, self.learner_dies_at = (
            hang_on,
            nonfinite_at,
            learner_dies_at,
        )
        self.requests = 0
        self.lock = threading.Lock()
        self.release = threading.Event()  # set on shutdown: hung requests return then
        self.actors = [ThreadPoolExecutor(1) for _ in range(self.workers)]
        self.held = [0] * self.workers  # the version each worker holds
        self.learner = ThreadPoolExecutor(1)
        self.version = self.staged = 0
        self.synced: list[tuple[int, int]] = []  # (worker, version) of every sync that ran
        self.replaced: list[int] = []

    # --- workers
    def generate(self, worker, prompts, seed):
        with self.lock:
            self.requests += 1
            number = self.requests

        def sample():
            if number in self.hang_on:
                self.release.wait(60)
                raise RuntimeError("released at shutdown")
            size = self.config.sampling.samples
            failing = {
                p["id"]
                for p in prompts
                if p["id"] in self.unscored or number >= (self.unscored_from or number + 1)
            }
            rollouts = [
                Rollout(
                    prompt_id=p["id"],
                    prompt_ids=[5, 6],
                    completion_ids=[[7]] * size,
                    behaviour_logprobs=[[-1.0]] * size,
                    rewards=[
                        None if p["id"] in failing else float((p["id"] + i) % 2)
                        for i in range(size)
                    ],
                    version=self.held[worker],
                )
                for p in prompts
            ]
            metrics = {"rollout/seconds": 0.0}
            warnings = []
            if failing:
                metrics["reward/flaky/errors"] = float(size * len(failing))
                warnings.append(f"reward 'flaky' failed (errors): request {number}")
            return GenerateResult(rollouts, metrics, warnings)

        return self.actors[worker].submit(sample)

    def pass_rates(self, worker, prompts, samples, seed):
        return self.actors[worker].submit(lambda: [0.5 for _ in prompts])

    def sync(self, worker, version):
        def load():
            assert version <= self.staged, "a version was sent before it was staged"
            self.held[worker] = version
            self.synced.append((worker, version))
            return {"sync/send_seconds": 0.001, "sync/load_seconds": 0.002}

        return self.actors[worker].submit(load)

    def replace_worker(self, worker, version):
        self.replaced.append(worker)
        self.actors[worker] = ThreadPoolExecutor(1)
        self.held[worker] = 0
        if version > 0:
            self.sync(worker, version).result()

    def load_checkpoint(self, worker, directory, version):
        return self.actors[worker].submit(lambda: 0.0)

    def evaluate(self, worker, rows, **settings):
        report = {"greedy_accuracy": 0.5, "by_task": {}, "by_level": {}}
        return self.actors[worker].submit(lambda: report)

    # --- learner
    def train_step(self, rollouts, stage):
        def step():
            time.sleep(self.step_seconds)
            self.version += 1
            if self.version == self.learner_dies_at:
                raise ActorFailure("learner rank 1 failed in train_step: ActorDiedError")
            if self.version == self.nonfinite_at:
                raise NonFiniteError("2 consecutive steps had a non-finite loss")
            if stage:
                self.staged = self.version
            loss = sum(g.prompt_id * (i + 1) for i, g in enumerate(rollouts)) / 1000
            metrics = {"train/loss": loss, "train/sequences": float(8 * len(rollouts))}
            metrics |= {"learner/version": float(self.version)}
            if stage:
                metrics["sync/gather_seconds"] = 0.001
            return metrics

        return self.learner.submit(step)

    def stage_weights(self):
        self.staged = self.version

    def save(self, directory):
        Path(directory).mkdir(parents=True)
        (Path(directory) / "learner.json").write_text(json.dumps({"version": self.version}))

    def load(self, directory):
        self.version = json.loads((Path(directory) / "learner.json").read_text())["version"]
        return self.version

    def export(self, directory):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "config.json").write_text("{}")

    def placement(self):
        return {"learners": [{"node_id": "fake"}], "workers": [{"node_id": "fake"}]}

    def shutdown(self):
        self.release.set()
        for executor in [*self.actors, self.learner]:
            executor.shutdown(wait=False)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return list(to_rl(make_problems(["sort"], [1, 2], 48, seed=5)))


def make_config(tmp_path: Path, model: Path, **settings):
    data = {
        "model": str(model),
        "data": "unused.jsonl",
        "runs_dir": str(tmp_path / "runs"),
        "steps": 8,
        "groups_per_step": 4,
        "groups_per_request": 2,
        "max_staleness": 1,
        "dynamic_sampling": False,
        "sampling": {"samples": 4},
        "pool": {"min_active": 4},
        "placement": {"workers": 2},
        "save_every": 2,
        **settings,
    }
    return from_dict(rl.Config, data)


def train(config, rows, fleet: FakeFleet) -> tuple[dict, Path]:
    out = Path(config.runs_dir) / config.name
    with Run(out, config) as run_dir:
        result = Controller(config, run_dir, rows, {}, lambda _: fleet).train()
    return result, out


def audit(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trained.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


@pytest.mark.parametrize("staleness", [0, 1, 2])
def test_groups_train_within_the_staleness_bound_and_no_prompt_twice(
    staleness, tmp_path, student_dir, rows
):
    config = make_config(tmp_path, student_dir, max_staleness=staleness)
    fleet = FakeFleet(config, step_seconds=0.05)
    result, out = train(config, rows, fleet)
    lines = audit(out)
    assert [a["step"] for a in lines] == list(range(1, 9))
    lags = [a["step"] - 1 - v for a in lines for v in a["versions"]]
    assert min(lags) >= 0 and max(lags) <= staleness
    if staleness:
        assert max(lags) == staleness  # the bound is reached: generation ran ahead
    # The admission rule asks for nothing that would go stale.
    assert result["buffer"]["dropped_stale"] == 0
    trained = [p for a in lines for p in a["prompts"]]
    assert len(trained) == 8 * 4 and len(set(trained)) == len(trained)
    # Every step's weights went to both workers (staged first), in order.
    for worker in range(2):
        assert [v for w, v in fleet.synced if w == worker] == list(range(1, 9))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "train/loss" in m]
    assert all("sync/gather_seconds" in m for m in steps)
    assert any("sync/load_seconds" in m for m in steps)


def test_a_hung_worker_is_replaced_and_its_prompts_train_later(tmp_path, student_dir, rows):
    config = make_config(
        tmp_path, student_dir, worker_timeout_s=0.3, max_worker_restarts=2, placement={"workers": 1}
    )
    fleet = FakeFleet(config, hang_on={3})
    hung = []
    generate = fleet.generate

    def remember(worker, prompts, seed):
        if fleet.requests + 1 in fleet.hang_on:
            hung.extend(p["id"] for p in prompts)
        return generate(worker, prompts, seed)

    fleet.generate = remember
    result, out = train(config, rows, fleet)
    assert fleet.replaced == [0]
    assert result["worker_restarts"] == 1 and result["steps"] == 8
    assert "hung: no answer in 0.3 s" in (out / "log.txt").read_text()
    trained = [p for a in audit(out) for p in a["prompts"]]
    assert len(trained) == 8 * 4 and len(set(trained)) == len(trained)
    assert hung and set(hung) <= set(trained)


def test_too_many_failures_stop_with_a_checkpoint_that_resumes(tmp_path, student_dir, rows, caplog):
    caplog.set_level(logging.INFO, logger="align")
    config = make_config(
        tmp_path, student_dir, worker_timeout_s=0.3, max_worker_restarts=1, placement={"workers": 1}
    )
    with pytest.raises(RolloutWorkersFailed, match="failed 2 times"):
        train(config, rows, FakeFleet(config, hang_on={3, 6}))
    out = Path(config.runs_dir) / config.name
    assert list((out / "checkpoints").glob("step-*/state.json"))
    result, _ = train(config, rows, FakeFleet(config))
    assert result["steps"] == 8
    assert "resuming from" in (out / "log.txt").read_text()
    lines = audit(out)
    assert [a["step"] for a in lines] == list(range(1, 9))
    trained = [p for a in lines for p in a["prompts"]]
    assert len(set(trained)) == len(trained) == 8 * 4


def test_a_save_cut_half_way_resumes_from_the_previous_checkpoint(
    tmp_path, student_dir, rows, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="align")
    one_worker = {"max_staleness": 0, "placement": {"workers": 1}}
    whole = make_config(tmp_path / "whole", student_dir, **one_worker)
    _, whole_out = train(whole, rows, FakeFleet(whole))

    config = make_config(tmp_path / "cut", student_dir, **one_worker)
    from align import runs

    replace = runs.os.replace

    def cut(source, destination):
        if Path(source).name == "step-6.partial":
            loop = Path(source) / "state.json"
            loop.write_bytes(loop.read_bytes()[: loop.stat().st_size // 2])
            raise KeyboardInterrupt("killed while saving")
        return replace(source, destination)

    monkeypatch.setattr(runs.os, "replace", cut)
    with pytest.raises(KeyboardInterrupt):
        train(config, rows, FakeFleet(config))
    monkeypatch.setattr(runs.os, "replace", replace)
    out = Path(config.runs_dir) / config.name
    assert (out / "checkpoints" / "step-6.partial").exists()
    train(config, rows, FakeFleet(config))
    assert f"resuming from {out / 'checkpoints' / 'step-4'}" in (out / "log.txt").read_text()
    # One worker sampling synchronously: the resumed run trains the same batches.
    assert audit(out) == audit(whole_out)
    assert losses(out) == losses(whole_out)


def test_a_resumed_run_gives_the_workers_the_resumed_weights_first(tmp_path, student_dir, rows):
    config = make_config(tmp_path, student_dir, steps=4, max_staleness=0)
    train(config, rows, FakeFleet(config))
    more = make_config(tmp_path, student_dir, steps=6, max_staleness=0)
    fleet = FakeFleet(more)
    train(more, rows, fleet)
    # Both workers took version 4 before any request of the resumed run was sampled.
    assert sorted(fleet.synced[:2]) == [(0, 4), (1, 4)]
    assert [a["versions"] for a in audit(Path(more.runs_dir) / more.name)][4] == [4] * 4


def test_the_non_finite_stop_writes_a_checkpoint_of_that_step(tmp_path, student_dir, rows):
    config = make_config(tmp_path, student_dir, max_staleness=0)
    with pytest.raises(NonFiniteError, match="at step 3; the run stopped with a checkpoint"):
        train(config, rows, FakeFleet(config, nonfinite_at=3))
    out = Path(config.runs_dir) / config.name
    loop = json.loads((out / "checkpoints" / "step-3" / "state.json").read_text())
    assert loop["step"] == 3
    assert json.loads(
        (out / "checkpoints" / "step-3" / "learner" / "learner.json").read_text()
    ) == {"version": 3}


def test_a_dead_learner_rank_stops_the_run_naming_it_and_the_checkpoint(
    tmp_path, student_dir, rows
):
    config = make_config(tmp_path, student_dir, max_staleness=0)
    with pytest.raises(LearnerStopped) as stopped:
        train(config, rows, FakeFleet(config, learner_dies_at=4))
    out = Path(config.runs_dir) / config.name
    message = str(stopped.value)
    assert "learner rank 1 failed" in message
    assert f"resume from checkpoint {out / 'checkpoints' / 'step-2'}" in message


def test_groups_no_reward_scored_are_dropped_counted_and_their_warnings_logged(
    tmp_path, student_dir, rows, caplog
):
    caplog.set_level(logging.INFO, logger="align")
    config = make_config(tmp_path, student_dir)
    unscored = set(range(0, len(rows), 5))
    result, out = train(config, rows, FakeFleet(config, unscored=unscored))
    assert result["steps"] == 8
    trained = {p for a in audit(out) for p in a["prompts"]}
    assert trained and not trained & unscored
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    dropped = sum(m.get("rollout/unscored_groups", 0) for m in metrics)
    assert dropped >= 1
    log_text = (out / "log.txt").read_text()
    assert "rollout worker 0: reward 'flaky' failed (errors)" in log_text


def test_a_reward_failing_on_everything_stops_the_run_naming_it(
    tmp_path, student_dir, rows, caplog
):
    caplog.set_level(logging.INFO, logger="align")
    config = make_config(tmp_path, student_dir, placement={"workers": 1})
    with pytest.raises(RewardsFailed, match=r"no completion scored .*reward/flaky/errors"):
        train(config, rows, FakeFleet(config, unscored_from=3))
    out = Path(config.runs_dir) / config.name
    assert list((out / "checkpoints").glob("step-*/state.json"))
    result, _ = train(config, rows, FakeFleet(config))  # the reward fixed: it resumes
    assert result["steps"] == 8
