"""Run directories: every command writes its resolved config, log, metrics and checkpoints here.

Layout of `runs/<name>/`: `config.yaml` (resolved), `log.txt`, `metrics.jsonl` (one JSON object
per logged step), `tb/` (TensorBoard events), plus whatever the stage writes (checkpoints in
Hugging Face format, reports). Metrics also go to the trackers a command's `report_to` names
(`wandb/`, trackio's database), under the same names as in metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from align.config import check, save_config, to_dict

# Where metrics can go besides metrics.jsonl, and the package each one needs.
REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def verbose() -> bool:
    """Whether the terminal gets every detail: progress bars of each vLLM batch, the trainers'
    logged dicts, vLLM's INFO logs (`align ... --verbose`; the launched ranks inherit it)."""
    return os.environ.get("ALIGN_VERBOSE") == "1"


class RunStopped(RuntimeError):
    """A run stopped on purpose after writing a checkpoint; the message says why and how to go on.

    The `align` command prints it without a traceback and exits with status 1.
    """


class NonFiniteError(RunStopped):
    """Too many consecutive training steps had a non-finite loss or gradient."""


def write_json_atomic(path: Path, data: dict) -> None:
    """Writes `data` as JSON to `path` atomically: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@contextmanager
def atomic_directory(directory: Path) -> Iterator[Path]:
    """Yields an empty `.partial` sibling of `directory` to write into; when the block ends
    without an error it replaces `directory` in one rename, so a reader (or a resumed run)
    never finds half of it. After an error (or a kill) `directory` is as it was; the partial
    sibling left behind is removed by the next write.
    """
    directory = Path(directory)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    yield partial
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(partial, directory)


@dataclass(kw_only=True)
class RunSettings:
    """Where a command writes, shared by every command's Config."""

    # Run name: everything is written under <runs_dir>/<name>/.
    name: str = "run"
    # Root directory of runs.
    runs_dir: str = "runs"
    # Where metrics go besides metrics.jsonl, under the same names: tensorboard (<run>/tb/),
    # wandb (offline in <run>/wandb/ unless WANDB_MODE=online; project WANDB_PROJECT or
    # moealign), trackio (its local database; project TRACKIO_PROJECT or moealign).
    report_to: list[Literal["tensorboard", "wandb", "trackio"]] = field(
        default_factory=lambda: ["tensorboard"]
    )

    def validate(self) -> None:
        for name in self.report_to:
            check(
                importlib.util.find_spec(REPORTERS[name]) is not None,
                "report_to",
                f"{name} is not installed (pip install {REPORTERS[name]})",
            )


class Run:
    """An open run directory. Use as a context manager so the log and writers are closed."""

    def __init__(self, directory: str | Path, config) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        save_config(config, self.dir / "config.yaml")
        self.config = config
        self._log_handler = logging.FileHandler(self.dir / "log.txt")
        self._log_handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        logging.getLogger().addHandler(self._log_handler)
        self._metrics = open(self.dir / "metrics.jsonl", "a", encoding="utf-8")
        self._reporters: list | None = None

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Appends one step's scalar metrics to metrics.jsonl and the `report_to` trackers."""
        self._metrics.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self._metrics.flush()
        if self._reporters is None:
            names = getattr(self.config, "report_to", ["tensorboard"])
            self._reporters = [_REPORTER_CLASSES[name](self) for name in names]
        for reporter in self._reporters:
            reporter.log(step, metrics)

    def tracker_name(self) -> str:
        """The run's name in a tracker: its directory and the one above (`default/sft`)."""
        return f"{self.dir.parent.name}/{self.dir.name}"

    def tracker_config(self) -> dict:
        """The run's config as plain data, for a tracker."""
        if dataclasses.is_dataclass(self.config) and not isinstance(self.config, type):
            return to_dict(self.config)
        return {}

    def write_json(self, name: str, data: dict) -> Path:
        """Writes `data` to `<run>/<name>` atomically (a crash never leaves half a file)."""
        path = self.dir / name
        write_json_atomic(path, data)
        return path

    def close(self) -> None:
        logging.getLogger().removeHandler(self._log_handler)
        self._log_handler.close()
        self._metrics.close()
        for reporter in self._reporters or []:
            reporter.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- trackers: each started on a run's first logged metrics, closed with the run -------------


class _TensorBoard:
    def __init__(self, run: Run) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run.dir / "tb"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    """One wandb run per run directory: its id is kept in `<run>/wandb-id`, so a resumed run
    (or the rank of a launch that logs the training) continues it."""

    def __init__(self, run: Run) -> None:
        import wandb

        id_file = run.dir / "wandb-id"
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:16], encoding="utf-8")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "moealign"),
            name=run.tracker_name(),
            id=id_file.read_text(encoding="utf-8").strip(),
            resume="allow",
            dir=str(run.dir),
            mode=os.environ.get("WANDB_MODE", "offline"),
            config=run.tracker_config(),
        )
        # The run's own step is the x axis (a resumed run logs steps it logged before).
        self.run.define_metric("*", step_metric="step")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({**metrics, "step": step})

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    def __init__(self, run: Run) -> None:
        import trackio

        self.trackio = trackio
        trackio.init(
            project=os.environ.get("TRACKIO_PROJECT", "moealign"),
            name=run.tracker_name(),
            config=run.tracker_config(),
            resume="allow",
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.trackio.log(metrics, step=step)

    def close(self) -> None:
        self.trackio.finish()


_REPORTER_CLASSES = {"tensorboard": _TensorBoard, "wandb": _Wandb, "trackio": _Trackio}
