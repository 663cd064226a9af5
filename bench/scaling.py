"""RL step time and trained samples/s of `align rl` as the work grows: a scaling curve of this
toolkit alone (no peer, unless `--with-trl` adds TRL's GRPOTrainer on the group-size axis).

From a base setting (the teacher preset, `--groups` prompts x 8 completions per step, 32 new
tokens, one rollout worker), each axis varies one thing alone:
    group_size      completions per prompt (`--group-sizes`);
    max_new_tokens  completion length (`--lengths`);
    model           model size (`--sizes`: the student and teacher presets, and `medium`, a
                    14 M-parameter MoE built here, bench/common.py SIZES);
    workers         rollout workers (`--worker-counts`). The learner holds one CPU and the
                    workers share what is left: on a 2-core machine two workers get 0.5 CPU
                    each, so the machine, not the toolkit, caps this axis.
    learners        learner ranks sharding the policy (`--learner-counts`). They share the
                    learner's CPU (one thread each), so on a 2-core machine this measures the
                    sharding's overhead (collectives, placeholder passes), not a speed-up.
Every run is `align rl` (asynchronous, max_staleness 1, GRPO) for `--steps` steps from a
random-initialised checkpoint with dynamic sampling off, so that every step trains exactly
groups x group size samples whatever the rewards, and a random model's completions run to
max_new_tokens. Per run: the median of `time/step` (metrics.jsonl) over the steps after the
first `--warmup`, and the median of trained samples per second over the same steps.

`--with-trl`: TRL's GRPOTrainer (bench/rl.py's TRL arm: transformers generate, the dense MoE
forward) at the group-size axis's points, its step time from its per-step snapshots.

    python bench/scaling.py --steps 6 --warmup 2

Writes bench/results/scaling-<time>.json and one plot per axis,
bench/results/scaling-<time>-<axis>.png, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

import common

AXES = ("group_size", "max_new_tokens", "model", "workers", "learners")
METRICS = [
    common.Metric("step_s", "step s", "lower", "{:.2f}"),
    common.Metric("learner_step_s", "learner step s", "lower", "{:.2f}"),
    common.Metric("samples_per_s", "samples/s", "higher"),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--axes", default=",".join(AXES))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    p.add_argument("--groups", type=int, default=16, help="prompts per step")
    p.add_argument("--group-size", type=int, default=8, help="base setting")
    p.add_argument("--max-new-tokens", type=int, default=32, help="base setting")
    p.add_argument("--size", default="teacher", help="base setting")
    p.add_argument("--workers", type=int, default=1, help="base setting")
    p.add_argument("--learners", type=int, default=1, help="base setting")
    p.add_argument("--group-sizes", default="4,8,16")
    p.add_argument("--lengths", default="16,32,64")
    p.add_argument("--sizes", default="student,teacher,medium")
    p.add_argument("--worker-counts", default="1,2")
    p.add_argument("--learner-counts", default="1,2")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--repeats", type=int, default=1, help="runs of every point")
    p.add_argument("--with-trl", action="store_true", help="TRL's step time on group_size")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def points(args) -> dict[str, list[dict]]:
    """Per axis, its settings in order: the base with that axis's value changed."""
    base = {
        "group_size": args.group_size,
        "max_new_tokens": args.max_new_tokens,
        "model": args.size,
        "workers": args.workers,
        "learners": args.learners,
    }
    values = {
        "group_size": [int(v) for v in args.group_sizes.split(",")],
        "max_new_tokens": [int(v) for v in args.lengths.split(",")],
        "model": args.sizes.split(","),
        "workers": [int(v) for v in args.worker_counts.split(",")],
        "learners": [int(v) for v in args.learner_counts.split(",")],
    }
    return {axis: [{**base, axis: v} for v in values[axis]] for axis in args.axes.split(",")}


def label(point: dict) -> str:
    return (
        f"{point['model']} g{point['group_size']} t{point['max_new_tokens']} "
        f"w{point['workers']} l{point['learners']}"
    )


def run_ours(args, point: dict, out: Path) -> dict:
    """`align rl` at `point`; the step times from its metrics.jsonl."""
    cpus = os.cpu_count() or 1
    worker_cpus = min(1.0, (cpus - 1) / point["workers"])
    config = {
        "model": str(common.ensure_model(point["model"])),
        "data": str(common.RUNS / "data" / "train" / "rl"),
        "heldout": None,
        "steps": args.steps,
        "groups_per_step": args.groups,
        "groups_per_request": max(1, args.groups // 2),
        "max_staleness": 1,
        "dynamic_sampling": False,
        "sampling": {"samples": point["group_size"], "max_new_tokens": point["max_new_tokens"]},
        "loss": {"kind": "grpo"},
        "learner": {"learning_rate": args.lr, "warmup_steps": 0},
        "placement": {
            "workers": point["workers"],
            "worker_cpus": worker_cpus,
            "learners": point["learners"],
            "learner_cpus": 1 / point["learners"],
        },
        "save_every": 1_000_000,
        "seed": args.seed,
    }
    child = common.run_align("rl", config, out)
    records = [json.loads(line) for line in open(out / "run" / "metrics.jsonl")]
    steps = [r for r in records if "time/step" in r][args.warmup :]
    return {
        "step_s": statistics.median(r["time/step"] for r in steps),
        "learner_step_s": statistics.median(r["time/learner_step"] for r in steps),
        "samples_per_s": statistics.median(r["train/sequences"] / r["time/step"] for r in steps),
        "steps_timed": len(steps),
        # The whole run, start-up included (CPU seconds would miss the Ray actors).
        "wall_s": child.wall_s,
        "worker_cpus": worker_cpus,
    }


def run_trl(args, point: dict, out: Path) -> dict:
    """TRL's GRPOTrainer at `point` (bench/rl.py's TRL arm), snapshots after every step."""
    argv = [sys.executable, str(Path(__file__).with_name("rl.py")), "--trl-arm", str(out)]
    settings = {
        "model": str(common.ensure_model(point["model"])),
        "data": str(common.RUNS / "data" / "train" / "rl"),
        "steps": args.steps,
        "groups": args.groups,
        "group-size": point["group_size"],
        "max-new-tokens": point["max_new_tokens"],
        "lr": args.lr,
        "warmup": 0,
        "eval-every": 1,
        "seed": args.seed,
    }
    for key, value in settings.items():
        argv += [f"--{key}", str(value)]
    child = common.run_child(argv, out / "log.txt")
    snaps = [json.loads((d / "snapshot.json").read_text()) for d in (out / "snapshots").iterdir()]
    seconds = [s["train_seconds"] for s in sorted(snaps, key=lambda s: s["step"])]
    steps = [b - a for a, b in zip(seconds, seconds[1:], strict=False)][args.warmup :]
    samples = args.groups * point["group_size"]
    return {
        "step_s": statistics.median(steps),
        "samples_per_s": statistics.median(samples / s for s in steps),
        "steps_timed": len(steps),
        "wall_s": child.wall_s,
        "cpu_s": child.cpu_s,
    }


def parameters(model: Path) -> int:
    """Parameters in a checkpoint's safetensors files."""
    from safetensors import safe_open

    total = 0
    for file in model.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            total += sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())
    return total


def plot(path: Path, axis: str, xs: list, ours: list[dict], trl: list[dict] | None) -> None:
    """Step time and samples/s against the axis's values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, left = plt.subplots(figsize=(6, 4))
    right = left.twinx()
    positions = range(len(xs))
    left.plot(positions, [m["step_s"] for m in ours], "o-", color="tab:blue", label="step s")
    right.plot(
        positions, [m["samples_per_s"] for m in ours], "s--", color="tab:orange", label="samples/s"
    )
    if trl:
        left.plot(positions, [m["step_s"] for m in trl], "o:", color="tab:gray", label="TRL step s")
    left.set_xticks(list(positions), [str(x) for x in xs])
    left.set_xlabel(axis)
    left.set_ylabel("median step time (s)")
    right.set_ylabel("trained samples / s")
    left.set_ylim(bottom=0)
    right.set_ylim(bottom=0)
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(handles, [h.get_label() for h in handles], loc="upper left")
    left.set_title(f"align rl: {axis} (others at the base setting)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    started = common.stamp()
    machine = common.machine()
    common.ensure_data()
    root = common.RUNS / f"scaling-{started}"
    axes = points(args)
    unique = {label(p): p for pts in axes.values() for p in pts}
    for point in unique.values():
        common.ensure_model(point["model"])
    raw: dict[str, list[dict]] = {}
    trl_points = {label(p): p for p in axes.get("group_size", [])} if args.with_trl else {}
    arms = list(unique) + [f"trl {name}" for name in trl_points]
    for rep, arm in common.alternate(arms, args.repeats):
        print(f"[rep {rep}] {arm} ...", flush=True)
        out = root / f"rep{rep}" / arm.replace(" ", "_")
        if arm.startswith("trl "):
            result = run_trl(args, trl_points[arm[4:]], out)
        else:
            result = run_ours(args, unique[arm], out)
        raw.setdefault(arm, []).append({"rep": rep, **result})

    table = common.medians(raw)
    print()
    common.print_table(
        f"align rl scaling (this toolkit only): {args.groups} prompts per step, {args.steps} steps,"
        f" first {args.warmup} left out; medians of {args.repeats}",
        table,
        METRICS,
    )
    curves = {}
    for axis, pts in axes.items():
        xs = [p[axis] for p in pts]
        if axis == "model":
            sizes = [parameters(common.RUNS / x / "model") for x in xs]
            xs = [f"{x} ({n / 1e6:.1f} M)" for x, n in zip(xs, sizes, strict=True)]
        ours = [table[label(p)] for p in pts]
        trl = None
        if axis == "group_size" and trl_points:
            trl = [table[f"trl {label(p)}"] for p in pts]
        path = common.RESULTS / f"scaling-{started}-{axis}.png"
        common.RESULTS.mkdir(parents=True, exist_ok=True)
        plot(path, axis, xs, ours, trl)
        curves[axis] = {"x": xs, "points": [label(p) for p in pts], "plot": str(path)}
        print(f"wrote {path}")
    path = common.write_results(
        "scaling",
        started,
        sys.argv,
        machine,
        settings=vars(args),
        raw=raw,
        medians=table,
        curves=curves,
        notes="a scaling curve of this toolkit only (trl rows, if any: TRL GRPOTrainer at the"
        " same points); step s: lower is better, samples/s: higher is better",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
