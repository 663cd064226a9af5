"""What an RL run keeps on disk, and how it resumes from it.

Under runs/<name>/:
- `checkpoints/step-N/`: `learner/` (the learner group's sharded state, written by every rank
  with torch.distributed.checkpoint, plus `learner.json`) and `state.json` (the loop: counters,
  rollout buffer, prompt pool, prompts in flight). A checkpoint is written as
  `step-N.partial/` and renamed complete, so a save cut half-way leaves the previous one as
  the newest complete checkpoint; the two newest are kept. Across machines, the run directory
  must be on storage every learner rank can write.
- `snapshots/step-N/`: the weights at the held-out evaluation points (Hugging Face checkpoints;
  step 0 points at the starting checkpoint) with `snapshot.json`.
- `trained.jsonl`: the data audit, one line per learner step with its prompts and the policy
  versions that sampled them. A resumed run drops the lines of steps after its checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from align.rl.rollout import Rollout
from align.runs import atomic_directory, write_json_atomic

log = logging.getLogger(__name__)

# Complete checkpoints kept (the newest ones).
KEEP_CHECKPOINTS = 2


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1].split(".")[0])


class RunState:
    """Checkpoints, snapshots and the data audit of one RL run directory."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.checkpoints = out / "checkpoints"
        self.snapshots = out / "snapshots"
        self.audit = out / "trained.jsonl"

    # --- checkpoints ---------------------------------------------------------------------------

    def save(self, step: int, loop: dict[str, Any], save_learner: Callable[[str], None]) -> Path:
        """Writes checkpoint `step` (once): the learner's state, then the loop's."""
        final = self.checkpoints / f"step-{step}"
        if final.exists():
            return final
        with atomic_directory(final) as partial:
            save_learner(str(partial / "learner"))
            (partial / "state.json").write_text(json.dumps(loop), encoding="utf-8")
        for old in self._complete()[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old)
        log.info("checkpoint written: %s", final)
        return final

    def _complete(self) -> list[Path]:
        found = (p for p in self.checkpoints.glob("step-*") if not p.name.endswith(".partial"))
        return sorted(found, key=_step_of)

    def latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest complete checkpoint and its loop state, or None."""
        complete = self._complete()
        if not complete:
            return None
        latest = complete[-1]
        return latest, json.loads((latest / "state.json").read_text(encoding="utf-8"))

    # --- the data audit ------------------------------------------------------------------------

    def record_batch(self, step: int, batch: list[Rollout]) -> None:
        """Appends a step's prompts and the versions that sampled them to trained.jsonl."""
        line = {
            "step": step,
            "prompts": [g.prompt_id for g in batch],
            "versions": [g.version for g in batch],
        }
        with open(self.audit, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def cut_audit(self, step: int) -> None:
        """Drops the audit lines of steps after `step` (not kept by the checkpoint resumed)."""
        if self.audit.exists():
            kept = [
                line
                for line in self.audit.read_text(encoding="utf-8").splitlines()
                if json.loads(line)["step"] <= step
            ]
            self.audit.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    # --- snapshots -----------------------------------------------------------------------------

    def snapshot(
        self, step: int, facts: dict[str, Any], export: Callable[[str], None] | None, start: str
    ) -> None:
        """Keeps the weights of `step` for the held-out curve (evaluated after training).

        Args:
            step: the learner step.
            facts: what the curve reports beside accuracy (training seconds, samples).
            export: writes the current weights into a directory; None at step 0, whose
                weights are the starting checkpoint `start`.
            start: the starting checkpoint.
        """
        directory = self.snapshots / f"step-{step}"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        if export is not None:
            export(str(directory))
        weights = str(directory) if export is not None else start
        write_json_atomic(directory / "snapshot.json", {"step": step, **facts, "weights": weights})

    def held_out_curve(self, score: Callable[[dict[str, Any]], dict]) -> list[dict[str, Any]]:
        """Scores every snapshot (`score(facts)` returns an evaluation report) and writes
        curve.json: per snapshot its facts, its report's numbers, by task and by level."""
        found = sorted(self.snapshots.glob("step-*"), key=_step_of)
        curve = []
        for directory in tqdm(found, desc="held-out curve", unit="snapshot"):
            facts = json.loads((directory / "snapshot.json").read_text(encoding="utf-8"))
            report = score(facts)
            numbers = {k: v for k, v in report.items() if isinstance(v, int | float)}
            by = {"by_task": report["by_task"], "by_level": report["by_level"]}
            curve.append({**facts, **numbers, **by})
        if curve:
            write_json_atomic(self.out / "curve.json", {"points": curve})
        return curve

    def write_model(self, export: Callable[[str], None], tokenizer_from: str) -> Path:
        """The final model: `export` writes the weights, the starting checkpoint's tokenizer
        (a vision-language model's processor: tokenizer and image settings) is added, and
        `model/` replaces any earlier one in one rename."""
        from transformers import AutoTokenizer

        from align.modeling import is_vision_language, read_config
        from align.vision import load_processor

        vision = is_vision_language(read_config(tokenizer_from))
        model_dir = self.out / "model"
        with atomic_directory(model_dir) as partial:
            export(str(partial))
            load = load_processor if vision else AutoTokenizer.from_pretrained
            load(tokenizer_from).save_pretrained(str(partial))
        return model_dir
