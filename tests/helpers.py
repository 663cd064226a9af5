"""Helpers several test modules share: running `align` (as a command, killed, or through a
driver that patches in a fault), a reward plug-in on the path, SFT configs, training crashes,
logged metrics and on-policy RL groups. Fixtures live in conftest.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from align.rl.learner import token_logprobs
from align.rl.rollout import Rollout
from align.training import TrainSettings

ALIGN = str(Path(sys.executable).parent / "align")


# --- the `align` command --------------------------------------------------------------------
def align(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Runs the `align` command; `env` adds variables to the current environment."""
    return subprocess.run(
        [ALIGN, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def kill_when(args: list[str], ready, log: Path, timeout: float = 300) -> None:
    """Runs `align ARGS` in its own process group and kills the whole group with SIGKILL as
    soon as `ready()` holds. Fails if the command ends first."""
    with open(log, "w", encoding="utf-8") as output:
        process = subprocess.Popen(
            [ALIGN, *args], stdout=output, stderr=output, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while not ready():
            assert process.poll() is None, log.read_text(encoding="utf-8")[-3000:]
            assert time.monotonic() < deadline, f"not ready in {timeout} s"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)


def run_driver(tmp_path: Path, source: str, args: list[str], **env: str):
    """Runs `align ARGS` through a Python file holding `source` (which patches in a fault and
    then calls align.cli.main)."""
    driver = tmp_path / "fault_driver.py"
    driver.write_text(source, encoding="utf-8")
    return subprocess.run(
        [sys.executable, str(driver), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,
    )


def plugin_env(tmp_path: Path, module: str, source: str) -> dict[str, str]:
    """Writes a reward plug-in module and returns the environment that makes it importable."""
    folder = tmp_path / "plugin"
    folder.mkdir(exist_ok=True)
    (folder / f"{module}.py").write_text(source, encoding="utf-8")
    return {"PYTHONPATH": f"{folder}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


# --- training stages ------------------------------------------------------------------------
class Crash(Exception):
    """Stands for the process dying right after a checkpoint was written."""


class CrashAfterSave(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Crash(f"stopped after the checkpoint of step {self.step}")


def sft_config(tmp_path, model, data, name, **train):
    """An `align sft` config of a short run on `data` (3 epochs of 8-row batches)."""
    from pipelines import sft

    settings = dict(batch_size=8, epochs=3.0, learning_rate=3e-3, logging_steps=1, save_steps=2)
    return sft.Config(
        model=str(model),
        data=data,
        name=name,
        runs_dir=str(tmp_path / "runs"),
        train=TrainSettings(**{**settings, **train}),
    )


def logged(run_dir, key: str) -> list[float]:
    """Every value of metric `key` in a run's metrics.jsonl, in order."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)[key] for line in lines if key in json.loads(line)]


# --- RL ---------------------------------------------------------------------------------------
def image_and_text_groups(path) -> list[Rollout]:
    """Two groups of a one-image prompt and two of a longer text prompt for the vision-language
    checkpoint at `path`, 4 completions of 3 tokens each (fixed logprobs and rewards): sorted
    by length, the 8 image rows come first."""
    from PIL import Image
    from transformers import AutoTokenizer

    from align.tokenizer import encode_prompts
    from align.vision import IMAGE_ITEM

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    generator = torch.Generator().manual_seed(0)
    rollouts = []
    for g in range(4):
        text = {"type": "text", "text": "Count." if g < 2 else "Sort these letters: qwertyuiopasd"}
        content = [IMAGE_ITEM, text] if g < 2 else [text]
        (prompt,) = encode_prompts(tokenizer, [[{"role": "user", "content": content}]])
        completions = torch.randint(5, 60, (4, 3), generator=generator).tolist()
        rollouts.append(
            Rollout(
                prompt_id=g,
                prompt_ids=prompt,
                completion_ids=completions,
                behaviour_logprobs=[[-3.0] * 3 for _ in completions],
                rewards=[1.0, 0.0, 1.0, 0.0],
                version=0,
                images=[Image.new("RGB", (64, 48), (60 * g, 200, 30))] if g < 2 else None,
            )
        )
    return rollouts


def on_policy_groups(model, groups: int = 4, size: int = 4, seed: int = 0) -> list[Rollout]:
    """Groups sampled from `model` itself with their exact logprobs, rewarded on token parity;
    the last group has one unscored completion (the batch then splits unevenly)."""
    generator = torch.Generator().manual_seed(seed)
    rollouts = []
    for g in range(groups):
        prompt = torch.randint(5, 60, (4,), generator=generator).tolist()
        completions, logprobs = [], []
        for _ in range(size):
            ids = list(prompt)
            with torch.no_grad():
                for _ in range(3):
                    logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
                    probs = torch.softmax(logits.float(), -1)
                    ids.append(int(torch.multinomial(probs, 1, generator=generator)))
                logp = token_logprobs(model, torch.tensor([ids]), torch.ones(1, len(ids)))
            completions.append(ids[4:])
            logprobs.append(logp[0, 3:].tolist())
        rewards = [float(c[0] % 2 == 0) for c in completions]
        rewards[0], rewards[1] = 1.0, 0.0  # every group has both outcomes
        if g == groups - 1:
            rewards[-1] = None
        rollouts.append(Rollout(g, prompt, completions, logprobs, rewards, version=0))
    return rollouts
