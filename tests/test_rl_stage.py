"""`align rl` end to end through Ray and vLLM, on students trained a little on `sort`.

Each run starts a local Ray, a learner actor and a rollout worker with its own vLLM engine
(about 20 s), so the runs are few and short and each checks several things.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from align.tasks import make_problems, to_rl
from tests.test_cli import align
from tests.test_faults import kill_when, plugin_env, run_driver

pytestmark = [pytest.mark.vllm, pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def sort_prompts(tmp_path_factory, partially_trained) -> Path:
    """Unseen level 1-2 `sort` prompts: the partially trained student solves about 2 in 3."""
    path = tmp_path_factory.mktemp("rl-data") / "prompts.jsonl"
    rows = list(to_rl(make_problems(["sort"], [1, 2], 96, seed=5)))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_config(tmp_path: Path, model: Path, data: Path, **settings) -> Path:
    config = {
        "name": "rl",
        "runs_dir": str(tmp_path / "runs"),
        "model": str(model),
        "data": str(data),
        "steps": 8,
        "groups_per_step": 8,
        "groups_per_request": 4,
        "sampling": {"group_size": 8, "max_new_tokens": 16},
        "learner": {"learning_rate": 1e-4},
        "pool": {"min_active": 8},
        "engine": {"kv_cache_gib": 0.125},
        **settings,
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "rl.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def steps_of(run: Path) -> dict[int, dict]:
    """The learner steps' metrics by step (a resumed step's last record wins)."""
    steps = {}
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            steps[record["step"]] = record
    return steps


@pytest.fixture(scope="module")
def briefly_trained(tmp_path_factory) -> Path:
    """A student trained a little on `sort`: right about half the time on levels 2-3, and
    still unsure (sampled answers vary), so RL has something to sharpen. About 12 s."""
    from align.modeling import build_model, write_checkpoint
    from align.tasks import split_problems
    from align.tokenizer import build_tokenizer
    from tests.conftest import memorize

    train, _ = split_problems(make_problems(["sort"], [1, 2, 3, 4], 60, seed=0), 0.25, 0)
    model = build_model("student", seed=0)
    memorize(model, build_tokenizer(), list(to_rl(train)), steps=100, lr=3e-3)
    return write_checkpoint(model, tmp_path_factory.mktemp("brief") / "model")


@pytest.fixture(scope="module")
def easy_prompts(tmp_path_factory) -> Path:
    """16 unseen level 2-3 `sort` prompts."""
    path = tmp_path_factory.mktemp("rl-easy") / "prompts.jsonl"
    rows = list(to_rl(make_problems(["sort"], [2, 3], 8, seed=5)))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_async_run_keeps_within_the_staleness_bound(tmp_path, briefly_trained, easy_prompts):
    config = write_config(
        tmp_path,
        briefly_trained,
        easy_prompts,
        steps=10,
        max_staleness=1,
        dynamic_sampling=False,
        learner={"learning_rate": 3e-4},
        eval_every=5,
        heldout=str(easy_prompts),
        eval={"samples": 8, "pass_k": 4},
    )
    out = align("rl", "--config", str(config))
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "rl"
    steps = steps_of(run)
    assert sorted(steps) == list(range(1, 11))

    # Step 1 trains on groups sampled by the starting weights, which the learner also holds:
    # vLLM's logprobs equal the learner's recomputed ones.
    assert steps[1]["async/staleness_max"] == 0
    assert steps[1]["policy/behaviour_gap"] < 1e-4
    # Asynchronous: later batches were sampled while the learner trained (staleness 1), and
    # never more than max_staleness versions behind.
    assert all(s["async/staleness_max"] <= 1 for s in steps.values())
    assert any(s["async/staleness_max"] == 1 for s in steps.values())
    # The audit agrees: every trained group's version is within 1 of the step's learner.
    for line in (run / "trained.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        assert all(record["step"] - 1 - v in (0, 1) for v in record["versions"])
    # Weight sync is measured every step; MoE statistics are logged.
    assert all("sync/export_seconds" in s and "moe/routing_entropy" in s for s in steps.values())

    result = json.loads((run / "result.json").read_text(encoding="utf-8"))
    assert result["steps"] == 10 and result["samples_trained"] > 0
    # The held-out curve: the starting weights (step 0), steps 5 and 10.
    assert [p["step"] for p in result["curve"]] == [0, 5, 10]
    assert result["eval"]["greedy_accuracy"] == pytest.approx(
        result["curve"][-1]["greedy_accuracy"]
    )


def test_sync_run_raises_the_reward_and_resumes_to_the_same_steps(
    tmp_path, briefly_trained, easy_prompts
):
    # Every prompt in every step (16 groups): each step's reward is measured on the same
    # prompts, so it shows learning.
    # Steps 4-10 run after the step-3 checkpoint: seconds of margin for the interruption to
    # land before the run could finish.
    settings = dict(
        steps=10,
        groups_per_step=16,
        groups_per_request=8,
        max_staleness=0,
        dynamic_sampling=False,
        learner={"learning_rate": 3e-4},
        save_every=3,
    )
    whole = tmp_path / "whole"
    config = write_config(whole, briefly_trained, easy_prompts, **settings)
    out = align("rl", "--config", str(config))
    assert out.returncode == 0, out.stderr[-3000:]
    expected = steps_of(whole / "runs" / "rl")
    assert all(s["async/staleness_max"] == 0 for s in expected.values())
    # The reward of what the policy samples rises (synchronous sampling is seeded: this run
    # is reproducible, it gave 0.41 -> 0.55 over 8 steps when measured).
    first = (expected[1]["reward/sampled_mean"] + expected[2]["reward/sampled_mean"]) / 2
    last = (expected[5]["reward/sampled_mean"] + expected[6]["reward/sampled_mean"]) / 2
    assert last > first + 0.05, (first, last)

    def same_steps_after_resume(run: Path) -> None:
        """The resumed run has every step, and steps 4-10 equal the uninterrupted run's."""
        assert "resuming from" in (run / "log.txt").read_text(encoding="utf-8")
        resumed = steps_of(run)
        assert sorted(resumed) == list(range(1, 11))
        for step in range(4, 11):
            for key in ("train/loss", "train/reward_mean", "train/grad_norm", "train/sequences"):
                assert resumed[step][key] == expected[step][key], (step, key)
        audit = [json.loads(x) for x in (run / "trained.jsonl").read_text().splitlines()]
        assert [a["step"] for a in audit] == list(range(1, 11))
        assert audit == [
            json.loads(x)
            for x in (whole / "runs" / "rl" / "trained.jsonl").read_text().splitlines()
        ]

    # The same run, its whole process group killed (SIGKILL: no clean-up runs) once the
    # step-3 checkpoint is written, then run again.
    killed = tmp_path / "killed"
    config = write_config(killed, briefly_trained, easy_prompts, **settings)
    run = killed / "runs" / "rl"
    kill_when(
        ["rl", "--config", str(config)],
        (run / "checkpoints" / "step-3").exists,
        killed / "first.log",
    )
    assert not (run / "model" / "train_result.json").exists(), "the run was not interrupted"
    out = align("rl", "--config", str(config))
    assert out.returncode == 0, out.stderr[-3000:]
    same_steps_after_resume(run)

    # The same run dying half-way through writing its step-6 checkpoint: the learner's state
    # is written, the loop state half of it. The resumed run starts from step 3.
    cut = tmp_path / "cut"
    config = write_config(cut, briefly_trained, easy_prompts, **settings)
    out = run_driver(cut, CUT_RL_SAVE, ["rl", "--config", str(config)])
    run = cut / "runs" / "rl"
    assert out.returncode == 9, out.stderr[-3000:]
    assert (run / "checkpoints" / "step-6.partial" / "learner" / "model.safetensors").exists()
    out = align("rl", "--config", str(config))
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resuming from {run / 'checkpoints' / 'step-3'}" in (run / "log.txt").read_text()
    same_steps_after_resume(run)


# Runs `align` with the RL controller dying while it writes its step-6 checkpoint: after the
# learner's state and half of the loop state (state.json cut in the middle) are written, before
# the checkpoint is moved into place.
CUT_RL_SAVE = """
import os
import sys
from pathlib import Path

from align.cli import main
from pipelines import rl

replace = os.replace


def cut(source, destination):
    source = Path(source)
    if source.name == "step-6.partial":
        state = source / "state.json"
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
        os._exit(9)
    return replace(source, destination)


rl.os.replace = cut
sys.exit(main(sys.argv[1:]))
"""


KILL_ONCE = '''
import json
import os
import time

import ray

from rewards.answers import answer_match


def kill_once(prompts, completions, **columns):
    """`ray.kill`s the rollout worker it runs in, in the middle of its first request."""
    mark = os.environ["ALIGN_TEST_KILL_MARK"]
    if not os.path.exists(mark):
        with open(mark, "w") as f:
            json.dump([p[-1]["content"] for p in prompts], f)
        ray.kill(ray.get_runtime_context().current_actor)
        time.sleep(60)
    return answer_match(prompts, completions, **columns)
'''


@pytest.mark.fault
def test_a_killed_rollout_worker_is_replaced_and_no_prompt_is_lost(
    tmp_path, partially_trained, sort_prompts
):
    env = plugin_env(tmp_path, "killer", KILL_ONCE)
    mark = tmp_path / "killed.json"
    config = write_config(
        tmp_path,
        partially_trained["checkpoint"],
        sort_prompts,
        steps=4,
        max_staleness=1,
        dynamic_sampling=False,
        rewards=[{"name": "killer:kill_once"}],
    )
    env["ALIGN_TEST_KILL_MARK"] = str(mark)
    out = align("rl", "--config", str(config), env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "rl"
    assert "rollout worker 0 failed" in (run / "log.txt").read_text(encoding="utf-8")
    result = json.loads((run / "result.json").read_text(encoding="utf-8"))
    assert result["worker_restarts"] == 1 and result["steps"] == 4

    # The killed request's prompts were given back and trained later; no prompt twice.
    rows = [json.loads(line) for line in sort_prompts.read_text().splitlines()]
    id_of = {row["prompt"][-1]["content"]: i for i, row in enumerate(rows)}
    killed = {id_of[text] for text in json.loads(mark.read_text())}
    trained = [
        i
        for line in (run / "trained.jsonl").read_text().splitlines()
        for i in json.loads(line)["prompts"]
    ]
    assert len(trained) == 4 * 8 and len(set(trained)) == len(trained)
    assert killed <= set(trained), killed - set(trained)


HANG_ON_CALLS = '''
import json
import os
import time
from pathlib import Path

from rewards.answers import answer_match


def hang_on_calls(prompts, completions, **columns):
    """Hangs (an hour) on the calls numbered in ALIGN_TEST_HANG_CALLS, counted across workers."""
    folder = Path(os.environ["ALIGN_TEST_HANG_DIR"])
    with open(folder / "calls", "a") as f:
        f.write("call\\n")
    number = len((folder / "calls").read_text().splitlines())
    if str(number) in os.environ["ALIGN_TEST_HANG_CALLS"].split(","):
        (folder / f"hung-{number}.json").write_text(json.dumps([p[-1]["content"] for p in prompts]))
        time.sleep(3600)
    return answer_match(prompts, completions, **columns)
'''


@pytest.mark.fault
def test_hung_workers_are_replaced_until_the_limit_stops_the_run_with_a_checkpoint(
    tmp_path, partially_trained, sort_prompts
):
    env = plugin_env(tmp_path, "hanger", HANG_ON_CALLS)
    config = write_config(
        tmp_path,
        partially_trained["checkpoint"],
        sort_prompts,
        steps=6,
        max_staleness=1,
        dynamic_sampling=False,
        save_every=2,
        worker_timeout_s=20,
        max_worker_restarts=1,
        # The reward's own time limit is longer than the worker's, so the worker hangs.
        rewards=[{"name": "hanger:hang_on_calls", "timeout_s": 3600}],
    )
    env |= {"ALIGN_TEST_HANG_DIR": str(tmp_path), "ALIGN_TEST_HANG_CALLS": "3,5"}
    # Request 3 hangs: its worker is replaced. Request 5 hangs too: one replacement is all
    # max_worker_restarts allows, so the run stops with a checkpoint and a clear error.
    out = align("rl", "--config", str(config), env=env)
    run = tmp_path / "runs" / "rl"
    assert out.returncode == 1, out.stderr[-3000:]
    assert "stopped: rollout workers failed 2 times (max_worker_restarts=1)" in out.stderr
    assert "Traceback" not in out.stderr
    log_text = (run / "log.txt").read_text(encoding="utf-8")
    assert log_text.count("hung: no answer in 20 s") == 2
    assert list((run / "checkpoints").glob("step-*/state.json"))

    # Run again without hangs: it resumes from the checkpoint and finishes.
    out = align("rl", "--config", str(config), env={**env, "ALIGN_TEST_HANG_CALLS": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming from" in (run / "log.txt").read_text(encoding="utf-8")
    assert json.loads((run / "result.json").read_text())["steps"] == 6
    # Every step trained once; no prompt twice; the hung requests' prompts trained later.
    rows = [json.loads(line) for line in sort_prompts.read_text().splitlines()]
    id_of = {row["prompt"][-1]["content"]: i for i, row in enumerate(rows)}
    hung = {
        id_of[text]
        for n in (3, 5)
        for text in json.loads((tmp_path / f"hung-{n}.json").read_text())
    }
    audit = [json.loads(line) for line in (run / "trained.jsonl").read_text().splitlines()]
    assert [a["step"] for a in audit] == list(range(1, 7))
    trained = [i for a in audit for i in a["prompts"]]
    assert len(trained) == 6 * 8 and len(set(trained)) == len(trained)
    assert hung <= set(trained), hung - set(trained)


# Runs `align` with a learner whose every gradient is NaN (a hook on each parameter): what a
# NaN or infinite loss leaves behind. The subclass is defined here, in __main__, so Ray ships
# its code to the learner actor.
NAN_GRADIENTS = """
import sys

import torch

from align.cli import main
from align.learner import Learner
from pipelines import rl


class NanGradients(Learner):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for parameter in self.unwrapped.parameters():
            parameter.register_hook(lambda grad: torch.full_like(grad, float("nan")))


rl.Learner = NanGradients
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.fault
def test_non_finite_steps_in_a_row_stop_the_run_with_a_checkpoint_and_the_weights_unchanged(
    tmp_path, briefly_trained, easy_prompts
):
    from safetensors.torch import load_file

    from align.modeling import load_model

    config = write_config(
        tmp_path,
        briefly_trained,
        easy_prompts,
        steps=6,
        max_staleness=0,
        dynamic_sampling=False,
        learner={"learning_rate": 1e-4, "max_nonfinite_steps": 2},
    )
    out = run_driver(tmp_path, NAN_GRADIENTS, ["rl", "--config", str(config)])
    assert out.returncode == 1, out.stderr[-3000:]
    assert "stopped: 2 consecutive steps had a non-finite loss or gradient norm" in out.stderr
    assert "at step 2; the run stopped with a checkpoint" in out.stderr
    assert "Traceback" not in out.stderr
    run = tmp_path / "runs" / "rl"
    steps = steps_of(run)
    assert sorted(steps) == [1] and steps[1]["train/skipped"] == 1.0
    # The checkpoint of step 2 holds the starting weights: no skipped step changed them.
    saved = load_file(str(run / "checkpoints" / "step-2" / "learner" / "model.safetensors"))
    start = load_model(str(briefly_trained)).state_dict()
    assert saved and all(torch.equal(saved[k], start[k]) for k in saved)
    state = json.loads((run / "checkpoints" / "step-2" / "state.json").read_text())
    assert state["step"] == state["version"] == 2
