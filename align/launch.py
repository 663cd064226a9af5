"""Training stages on several processes: `placement.processes` ranks, launched by `align` itself.

`align sft|dpo|distill ... placement.processes=N` (or `placement:` in a pipeline stage) runs the
stage's training on N ranks of one machine. The stage process checks the inputs and prepares the
data as it does for one process, saves the prepared rows, and starts the ranks with torchrun
(`python -m torch.distributed.run --standalone`); the user writes no accelerate config and calls
no launcher. Each rank runs the stage's `fit` function under TRL's trainer, which runs under
accelerate:

- `sharding: fsdp` shards parameters, gradients and optimiser state with FSDP2 (accelerate's FSDP
  plugin, `fsdp_version` 2, sharded checkpoints). accelerate offers FSDP only on accelerators
  (its CPU mode, MULTI_CPU, has no FSDP), so on a machine without GPUs the ranks run DDP over
  gloo instead, and the log says so.
- `sharding: ddp` keeps the whole model on every rank and averages gradients.

With LoRA, fsdp shards the frozen base as well (a model too large for one GPU can still get
adapters) and rank 0 gathers the weights to merge the adapters for the export.

A step over N ranks equals the step one process takes accumulating the same N micro-batches:
the trainers normalise the loss by the token count of all ranks (tested with DDP over gloo,
where the two agree to the bit; the FSDP2 path has not run on GPUs in this project's tests).
Rank 0 writes the logs, metrics, checkpoints' shared files and the exported model; every rank
writes its own shard of a sharded checkpoint, and a rerun of the same command resumes from the
newest one. `plan` is the stage's memory per GPU for `--dry-run` and the cluster check.

    result = launch.train(fit, config, dataset, run_dir, resume)   # in the stage process
    def fit(config, dataset, run: Run | None, resume, callbacks, **extra) -> dict  # each rank
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from align.config import ConfigError, check, load_config
from align.rl.placement import GIB, USABLE, Cluster, ModelShape, learner_memory
from align.runs import Run, RunStopped, verbose

log = logging.getLogger(__name__)

# Written by rank 0 when the run stopped on purpose (RunStopped): the message, for the stage
# process to raise again.
STOPPED_FILE = "stopped.txt"


@dataclass
class TrainPlacement:
    """The processes a training stage (SFT, DPO, distillation) runs on."""

    # Training processes (ranks) on this machine, one per GPU where there are GPUs. Each takes
    # train.batch_size rows per micro-batch: an optimiser step sees batch_size x grad_accum x
    # processes rows.
    processes: int = 1
    # fsdp: FSDP2 through accelerate (parameters, gradients and optimiser state sharded over the
    # ranks; accelerate offers it on GPUs only, so on CPU the ranks run ddp over gloo);
    # ddp: every rank holds the whole model and the gradients are averaged.
    sharding: Literal["fsdp", "ddp"] = "fsdp"
    # The GPUs the processes run on (one process per GPU, all on one machine): `--dry-run` and
    # the stage refuse a placement whose memory per GPU does not fit; null: not checked.
    cluster: Cluster | None = None

    def validate(self) -> None:
        check(self.processes >= 1, "processes", f"must be >= 1 (got {self.processes})")
        if self.cluster is not None:
            check(
                self.processes <= self.cluster.gpus_per_node,
                "cluster",
                f"{self.processes} processes, one per GPU, do not fit a node of "
                f"{self.cluster.gpus_per_node} GPUs (a training stage runs on one machine)",
            )


def plan(
    placement: TrainPlacement,
    train,
    lora: bool,
    shape: ModelShape | None,
    sequences_per_row: int = 1,
    teacher: ModelShape | None = None,
) -> tuple[list[str], str | None]:
    """The placement report of a training stage for `--dry-run`, and why it cannot fit its
    cluster (None if it can or none is declared).

    Memory per GPU, on GPUs (bf16 compute unless train.precision is fp32), for `shape` (the
    model trained; None: its config.json is not there yet):
    - state: full-parameter, 16 bytes per parameter (fp32 weights and gradients, AdamW's two
      moments); LoRA, the frozen weights (2 bytes per parameter in bf16), the adapters' state
      not counted (well under 1%); divided over the processes with fsdp;
    - with fsdp, two decoder layers and the root unit unsharded in bf16, with their gradients
      when full-parameter;
    - the logits and activations of a micro-batch of train.batch_size x `sequences_per_row`
      sequences of train.max_length tokens, as for the RL learner (align/rl/placement.py);
    - `teacher`: an online teacher's frozen weights.

    Args:
        train: the stage's `TrainSettings`.
        lora: whether the stage trains LoRA adapters.
    """
    kind = "LoRA" if lora else "full-parameter"
    lines = [f"training {placement.processes} process(es), {placement.sharding}, {kind}"]
    cluster = placement.cluster
    if cluster is not None:
        lines[0] += f"; one GPU each of {cluster.gpu_memory_gib:g} GiB on one node"
    if shape is None:
        lines.append("memory   not computed: the model's config.json is not there yet")
        return lines, None
    frozen_bytes = 4 if train.precision == "fp32" else 2
    fsdp = placement.sharding == "fsdp"
    shards = placement.processes if fsdp else 1
    memory = learner_memory(
        shape,
        shards,
        train.batch_size * sequences_per_row,
        train.max_length,
        False,
        train.gradient_checkpointing,
        False,
        lora,
    )
    if lora:  # the frozen weights are loaded in bf16 here (fp32 in the RL learner)
        memory.sharded = frozen_bytes * shape.parameters / shards
    if not fsdp:
        memory.in_flight = 0.0
    teacher_bytes = frozen_bytes * teacher.parameters if teacher is not None else 0.0
    total = memory.total + teacher_bytes
    lines.append(
        f"trainer  per GPU: {_gib(total)} = {'frozen weights' if lora else 'state'} "
        f"{_gib(memory.sharded)} + layers in flight {_gib(memory.in_flight)} + logits "
        f"{_gib(memory.logits)} + activations {_gib(memory.activations)}"
        + (f" + teacher {_gib(teacher_bytes)}" if teacher is not None else "")
        + f" (micro-batch {train.batch_size * sequences_per_row} x {train.max_length} tokens)"
    )
    if cluster is None or total <= USABLE * cluster.gpu_memory_gib * GIB:
        return lines, None
    return lines, (
        f"the training needs about {_gib(total)} per GPU, over {USABLE:.0%} of "
        f"{cluster.gpu_memory_gib:g} GiB: add processes (with sharding fsdp), train LoRA "
        "adapters, set train.gradient_checkpointing or lower train.batch_size"
    )


def _gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB"


def world_size() -> int:
    """Ranks of the launch this process belongs to (1 outside a launch)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this process writes the run's files: rank 0 of a launch, or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """A copy of `values` summed over the ranks of the current launch (of `values` alone outside
    one). Every rank must call it, in the same order."""
    import torch.distributed as dist

    if world_size() == 1 or not dist.is_initialized():
        return values.clone()
    # NCCL reduces only GPU tensors.
    on_gpu = dist.get_backend() == "nccl"
    total = values.to(f"cuda:{torch.cuda.current_device()}") if on_gpu else values.clone()
    dist.all_reduce(total)
    return total.to(values.device)


def sharding_arguments(placement: TrainPlacement) -> dict:
    """TrainingArguments that make the trainer join the ranks of the current launch and shard
    the model as `placement` says (none outside a launch)."""
    if world_size() == 1:
        return {}
    if not torch.cuda.is_available():
        # Without use_cpu accelerate finds no distributed setup on a CPU machine and every rank
        # would train alone on all the data.
        if placement.sharding == "fsdp" and is_main_process():
            log.info(
                "placement.sharding fsdp: accelerate offers FSDP only on GPUs; the %d ranks on "
                "this CPU machine run DDP over gloo (each holds the whole model)",
                world_size(),
            )
        return {"use_cpu": True}
    if placement.sharding == "ddp":
        return {}
    return {
        "fsdp": "full_shard",
        "fsdp_config": {
            "version": 2,
            "reshard_after_forward": True,
            # Each rank writes its own shard: no rank gathers the whole model to checkpoint.
            "state_dict_type": "SHARDED_STATE_DICT",
        },
    }


def check_joined(trainer) -> None:
    """Fails unless `trainer` trains on all the ranks of the current launch (accelerate falls
    back to one process per rank, each on all the data, when it finds no distributed setup)."""
    if trainer.accelerator.num_processes != world_size():
        raise RuntimeError(
            f"the trainer runs on {trainer.accelerator.num_processes} process(es), the launch "
            f"has {world_size()} ranks ({trainer.accelerator.distributed_type})"
        )


def train(
    fit,
    config,
    dataset,
    run_dir: Run,
    resume: str | None,
    callbacks: list | None = None,
    **extra,
) -> dict:
    """Runs `fit(config, dataset, run, resume, callbacks, **extra)` here, or on the ranks of
    `config.placement`; returns the result `fit` returned (rank 0's).

    With several ranks the rows are saved under `<run>/ranks/` and each rank reads them back;
    `extra` must then be JSON and `callbacks` (TrainerCallbacks, objects of this process) empty.
    `config` is read back from `<run>/config.yaml`, which `Run` wrote.

    Raises:
        ConfigError: more processes than this machine has GPUs (on a GPU machine).
        RunStopped: the ranks stopped the run on purpose (the message says why and how to go on).
        RuntimeError: a rank failed (its traceback is in the output above).
    """
    processes = config.placement.processes
    if processes == 1:
        return fit(config, dataset, run_dir, resume, callbacks, **extra)
    if callbacks:
        raise ValueError("callbacks run in this process; launched ranks cannot take them")
    if torch.cuda.is_available() and processes > torch.cuda.device_count():
        raise ConfigError(
            f"key 'placement.processes': {processes} processes, one per GPU, but this machine "
            f"has {torch.cuda.device_count()} GPU(s)"
        )
    out = run_dir.dir
    work = out / "ranks"
    for name in (STOPPED_FILE, "result.json"):  # an earlier launch's
        (work / name).unlink(missing_ok=True)
    # Fresh each launch: the trainers cache what they derive from the rows (tokens, DPO's
    # reference log-probabilities) next to them, where every rank finds it.
    shutil.rmtree(work / "data", ignore_errors=True)
    dataset.save_to_disk(str(work / "data"))
    job = {
        "config": str(out / "config.yaml"),
        "data": str(work / "data"),
        "resume": resume,
        "result": str(work / "result.json"),
        "stopped": str(work / STOPPED_FILE),
        "extra": extra,
    }
    job_path = work / "job.json"
    job_path.write_text(json.dumps(job, indent=2), encoding="utf-8")
    target = f"{fit.__module__}:{fit.__name__}"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "-m",
        "align.launch",
        target,
        str(job_path),
    ]
    env = dict(os.environ)
    # torchrun sets one thread per rank when OMP_NUM_THREADS is unset; share the cores instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    log.info("training on %d ranks (%s): %s", processes, config.placement.sharding, target)
    returncode = subprocess.run(
        command, env=env, check=False, preexec_fn=die_with_parent
    ).returncode
    if (work / STOPPED_FILE).exists():
        raise RunStopped((work / STOPPED_FILE).read_text(encoding="utf-8"))
    if returncode != 0:
        raise RuntimeError(
            f"training on {processes} ranks failed (torchrun exit status {returncode}); the "
            "failing rank's traceback is in the output above"
        )
    return json.loads((work / "result.json").read_text(encoding="utf-8"))


def die_with_parent() -> None:
    """Makes the kernel kill this process when its parent dies (Linux; elsewhere nothing).

    torchrun starts each rank in a session of its own, so killing the stage's process group
    (Ctrl-C aside: a SIGKILL, an out-of-memory kill) would leave the ranks training on and
    writing checkpoints under a run that has stopped. The launcher and every rank set this.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the call
        os.kill(os.getpid(), signal.SIGKILL)


def _rank_main(target: str, job_path: str) -> int:
    """One rank of `train`: reads the job, runs the stage's `fit`, rank 0 keeps the result."""
    die_with_parent()
    from datasets import load_from_disk

    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    module_name, function_name = target.split(":")
    module = importlib.import_module(module_name)
    fit = getattr(module, function_name)
    main = is_main_process()
    if not verbose():  # as the `align` command keeps its own terminal
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(
        level=logging.INFO if main else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    config = load_config(module.Config, job["config"])
    # Backed by the saved files, so that what rank 0 caches next to them the others read.
    dataset = load_from_disk(job["data"])
    run_dir = Run(Path(config.runs_dir) / config.name, config) if main else None
    try:
        result = fit(config, dataset, run_dir, job["resume"], None, **job["extra"])
    except RunStopped as error:
        if main:
            Path(job["stopped"]).write_text(str(error), encoding="utf-8")
        return 1
    finally:
        if run_dir is not None:
            run_dir.close()
        _leave_group()
    if main:
        Path(job["result"]).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


def _leave_group() -> None:
    """Shuts the rank's process group down before the interpreter exits: left to the exit, the
    gloo backend's threads were sometimes destroyed while joinable and the rank aborted
    ("terminate called without an active exception", exit -6) after its work was done."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(_rank_main(*sys.argv[1:]))
