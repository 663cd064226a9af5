"""Run directories: every command writes its resolved config, log, metrics and checkpoints here.

Layout of `runs/<name>/`: `config.yaml` (resolved), `log.txt`, `metrics.jsonl` (one JSON object
per logged step), `tb/` (TensorBoard events), plus whatever the stage writes (checkpoints in
Hugging Face format, reports).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from align.config import save_config


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


class Run:
    """An open run directory. Use as a context manager so the log and writers are closed."""

    def __init__(self, directory: str | Path, config) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        save_config(config, self.dir / "config.yaml")
        self._log_handler = logging.FileHandler(self.dir / "log.txt")
        self._log_handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        logging.getLogger().addHandler(self._log_handler)
        self._metrics = open(self.dir / "metrics.jsonl", "a", encoding="utf-8")
        self._tb = None

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Appends one step's scalar metrics to metrics.jsonl and TensorBoard."""
        self._metrics.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self._metrics.flush()
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tb"))
        for key, value in metrics.items():
            self._tb.add_scalar(key, value, step)

    def write_json(self, name: str, data: dict) -> Path:
        """Writes `data` to `<run>/<name>` atomically (a crash never leaves half a file)."""
        path = self.dir / name
        write_json_atomic(path, data)
        return path

    def close(self) -> None:
        logging.getLogger().removeHandler(self._log_handler)
        self._log_handler.close()
        self._metrics.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
