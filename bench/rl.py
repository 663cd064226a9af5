"""RL speed, side by side in one run: this toolkit (async and sync) vs TRL's GRPOTrainer.

All arms start from the same checkpoint and train on the same prompts with the same group size,
batch (groups x group size), learning rate and warmup, loss (GRPO, no KL), completion length and
MoE router loss. Two TRL arms: `trl` is GRPOTrainer on the model as transformers runs it (Llama
4's MoE layers run every token through every expert); `trl-routed` is GRPOTrainer on the model
as this toolkit loads it (`align.modeling.load_model`: only the chosen experts run), which
separates the sparse routing's share of the speed-up from the rest. Each arm runs in its own process, one after another, alternating across
repetitions. Every `eval_every` steps an arm keeps its weights with the training wall time so
far (time spent keeping them excluded); after all arms have run, one vLLM engine scores every
snapshot on the same held-out rows, so evaluation never touches the timings. The accuracy is
sample accuracy (`--eval-samples` completions per row at temperature 1, the quantity RL
maximises, with the same sampling seed for every snapshot); greedy accuracy is kept as well.

Reported per arm (medians over repetitions): trained samples per second of training wall time;
generated completions per second of the same time (this toolkit's dynamic sampling generates
groups whose rewards are all equal and drops them, so it generates more than it trains; TRL
trains every completion it generates, zero-advantage groups included); and the wall time to reach the target accuracy: the lowest of the arms' best accuracies, so
every arm reaches it. Ratios are ours / peer: above 1 is better for samples/s (faster), below 1
for the time to the target (sooner).

    python bench/rl.py --model runs/sft-teacher/model --data runs/default/data/train/rl \
        --heldout runs/default/data/heldout/rl --steps 30 --repeats 1

Writes bench/results/rl-<time>.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import common

ARMS = ("async", "sync", "trl", "trl-routed")
METRICS = [
    common.Metric("samples_per_s", "samples/s", "higher"),
    common.Metric("generated_per_s", "generated/s", "higher"),
    common.Metric("time_to_target_s", "time to target s", "lower"),
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
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--groups", type=int, default=64, help="prompts per step")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=10, help="linear warmup steps")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument(
        "--eval-limit", type=int, default=160, help="held-out rows, spread evenly over the file"
    )
    p.add_argument("--eval-samples", type=int, default=8, help="completions per held-out row")
    p.add_argument("--seed", type=int, default=0)
    # Internal: run one TRL arm in this process.
    p.add_argument("--trl-arm", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--routed", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------- arms
def run_ours(args, mode: str, out: Path) -> tuple[Path, int]:
    """`align rl` with the toolkit's defaults plus the shared settings; async or sync.

    Returns the run's snapshot directory and the completions it generated, kept or dropped.
    """
    config = {
        "model": args.model,
        "data": args.data,
        "steps": args.steps,
        "groups_per_step": args.groups,
        "groups_per_request": max(1, args.groups // 2),
        "max_staleness": 1 if mode == "async" else 0,
        "sampling": {"group_size": args.group_size, "max_new_tokens": args.max_new_tokens},
        "loss": {"kind": "grpo"},
        "learner": {"learning_rate": args.lr, "warmup_steps": args.warmup},
        "eval_every": args.eval_every,
        "save_every": 10_000,
        "seed": args.seed,
    }
    common.run_align("rl", config, out)
    buffer = json.loads((out / "run" / "result.json").read_text())["buffer"]
    return out / "run" / "snapshots", buffer["received"] * args.group_size


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
    )
    # transformers' own MoE forward (dense over all experts), as TRL users run it, or routed.
    model = load_model(args.model) if args.routed else common.transformers_model(args.model)
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


def run_trl(args, out: Path, routed: bool) -> tuple[Path, int]:
    """A TRL arm in a process of its own (`trl_arm`). Returns its snapshot directory and the
    completions it generated: every one of them is trained."""
    out.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, __file__, "--trl-arm", str(out)] + (["--routed"] if routed else [])
    for key, value in vars(args).items():
        if key not in ("trl_arm", "arms", "repeats", "out", "routed"):
            argv += [f"--{key.replace('_', '-')}", str(value)]
    common.run_child(argv, out / "trl.log")
    return out / "snapshots", args.steps * args.groups * args.group_size


# ------------------------------------------------------------------------------- evaluation
def evaluate_snapshots(args, directories: list[Path]) -> dict[str, list[dict]]:
    """Greedy held-out accuracy of every snapshot, with one engine (weights synced in turn)."""
    from transformers import AutoTokenizer

    from align import engine
    from align.data import load_dataset_file
    from align.evaluate import evaluate

    rows = evenly_spaced(
        [dict(r) for r in load_dataset_file(args.heldout, "rl")[0]], args.eval_limit
    )
    llm = engine.start_engine(args.model, engine.EngineConfig())
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    curves = {}
    for directory in directories:
        points = []
        for snap in sorted(directory.glob("step-*"), key=lambda p: int(p.name[5:])):
            facts = json.loads((snap / "snapshot.json").read_text())
            engine.sync_weights(llm, facts["weights"])
            report = evaluate(
                llm,
                tokenizer,
                rows,
                pass_k=1,
                samples=args.eval_samples,
                max_tokens=args.max_new_tokens,
            )
            points.append(
                {
                    **facts,
                    "accuracy": report["sample_accuracy"],
                    "greedy_accuracy": report["greedy_accuracy"],
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
    root = Path(args.out) / started
    # (arm, repetition, snapshot directory, completions generated)
    runs: list[tuple[str, int, Path, int]] = []
    for rep, arm in common.alternate(arms, args.repeats):
        out = root / f"rep{rep}" / arm
        out.mkdir(parents=True, exist_ok=True)
        print(f"[rep {rep}] {arm} ...", flush=True)
        if arm.startswith("trl"):
            runs.append((arm, rep, *run_trl(args, out, routed=arm == "trl-routed")))
        else:
            runs.append((arm, rep, *run_ours(args, arm, out)))
    curves = evaluate_snapshots(args, [d for _, _, d, _ in runs])

    # The target: the lowest of the arms' best accuracies (each arm's best repetition), so
    # that every arm reaches it.
    best = {arm: [] for arm in arms}
    for arm, _, d, _ in runs:
        best[arm].append(max(p["accuracy"] for p in curves[str(d)]))
    target = min(max(v) for v in best.values())
    raw: dict[str, list[dict]] = {}
    for arm, rep, d, generated in runs:
        points = curves[str(d)]
        raw.setdefault(arm, []).append(
            {
                "rep": rep,
                "samples_per_s": points[-1]["samples"] / points[-1]["train_seconds"],
                "generated_per_s": generated / points[-1]["train_seconds"],
                "time_to_target_s": time_to(points, target),
                "start_accuracy": points[0]["accuracy"],
                "best_accuracy": max(p["accuracy"] for p in points),
                "final_accuracy": points[-1]["accuracy"],
                "final_greedy_accuracy": points[-1]["greedy_accuracy"],
                "train_seconds": points[-1]["train_seconds"],
            }
        )
    table = common.medians(raw)
    for arm in arms:
        table[arm]["reached"] = sum(r["time_to_target_s"] is not None for r in raw[arm])
    pairs = [
        (a, p) for p in ("trl", "trl-routed") for a in ("async", "sync") if {a, p} <= set(arms)
    ]
    if {"async", "sync"} <= set(arms):
        pairs.append(("async", "sync"))
    ratio_rows = common.ratios(table, pairs, METRICS[:3])

    print(f"\ntarget held-out sample accuracy: {target:.3f} (lowest of the arms' best)")
    common.print_table(
        f"RL: {args.steps} steps of {args.groups} x {args.group_size}; medians of {args.repeats}"
        " (time to target: '-' where an arm never reached it)",
        table,
        METRICS,
        ratio_rows,
    )
    path = common.write_results(
        "rl",
        started,
        sys.argv,
        machine,
        settings=vars(args),
        target=target,
        raw=raw,
        arms=table,
        ratios=ratio_rows,
        curves=curves,
        notes="ratio = ours / peer; samples/s and generated/s: above 1 is better; time to"
        " target: below 1 is better",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
