"""SFT and DPO speed and memory, side by side in one run: `align sft`/`align dpo` vs plain TRL.

Per stage, both arms train the same checkpoint on the same rows (`--steps` x batch rows of the
embedded tasks in whole seeded passes, written once to a JSONL file, trained in one epoch)
with the same batch, learning rate, schedule (cosine, 5% warmup), max_length, seed, MoE router
loss (0.001) and number of steps, with held-out evaluation off:

    align   `align sft` / `align dpo` with the toolkit's defaults otherwise: the model loaded
            by align.modeling.load_model (each token runs only its routed experts), MoE
            statistics logged, and for DPO the reference log-probabilities computed once
            before the training loop, the format tokens masked and the NLL term (0.2);
    trl     a plain TRL script: SFTTrainer / DPOTrainer on the model as transformers runs it
            (every token through every expert; bench/common.py `transformers_model`), TRL's
            defaults otherwise (DPO: the reference model runs inside the loop); for the same
            objective its DPO loss is sigmoid + 0.2 x NLL too.

Each arm is a process of its own, one after another, alternating across repetitions. Reported
per arm (medians over repetitions):
- training tokens/s: prompt + completion tokens (chosen + rejected for DPO, as `align dpo`'s
  budget counts them) over the Trainer's own `train_runtime`, the training loop only;
- ready s: from launching the process to the end of training (imports, loading, tokenising,
  DPO's reference pass, training; saving the model excluded). For DPO this is the fair speed
  comparison, since `align dpo`'s reference pass is outside its training loop;
- peak RSS: the process's peak resident memory (ru_maxrss, bench/common.py `run_child`).
Ratios are align / trl: above 1 is better for tokens/s, below 1 for ready s and memory.

    python bench/train_stages.py --stages sft,dpo --steps 30 --repeats 3

Writes bench/results/train_stages-<time>.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import common

STAGES = ("sft", "dpo")
METRICS = common.TRAINING_METRICS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="checkpoint to train (default: the teacher preset)")
    p.add_argument("--stages", default="sft,dpo")
    p.add_argument("--steps", type=int, default=30, help="optimiser steps per arm")
    p.add_argument("--sft-batch", type=int, default=32, help="SFT rows per step")
    p.add_argument("--dpo-batch", type=int, default=16, help="DPO pairs per step")
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--dpo-lr", type=float, default=3e-5)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    # Internal: run the TRL arm of one stage in this process.
    p.add_argument("--trl-arm", choices=STAGES, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def settings(args, stage: str) -> tuple[int, float]:
    """The stage's batch size and learning rate."""
    if stage == "sft":
        return args.sft_batch, args.sft_lr
    return args.dpo_batch, args.dpo_lr


# ------------------------------------------------------------------------------- arms
def run_align(args, stage: str, data: Path, out: Path) -> dict:
    """`align sft|dpo` on `data`; the training time and end come from its metrics.jsonl."""
    batch, lr = settings(args, stage)
    config = {
        "model": args.model,
        "data": str(data),
        "heldout": None,
        "train": {
            "learning_rate": lr,
            "batch_size": batch,
            "epochs": 1.0,
            "max_length": args.max_length,
            "save_steps": 1_000_000,
            "seed": args.seed,
        },
    }
    return common.align_training(stage, config, out)


def run_trl(args, stage: str, data: Path, out: Path) -> dict:
    """This script's TRL arm in a process of its own."""
    argv = [sys.executable, __file__, "--trl-arm", stage, "--data", str(data), "--out", str(out)]
    for key in ("model", "steps", "sft_batch", "dpo_batch", "sft_lr", "dpo_lr", "max_length"):
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    argv += ["--seed", str(args.seed)]
    child = common.run_child(argv, out / "log.txt")
    result = json.loads((out / "result.json").read_text())
    return child.training_result(result["train_runtime"], result["train_end"], result["steps"])


def trl_arm(args) -> None:
    """A plain TRL training script: the model as transformers runs it, TRL's defaults."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    out = Path(args.out)
    batch, lr = settings(args, args.trl_arm)
    dataset = Dataset.from_json(args.data)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = common.transformers_model(args.model)
    shared = dict(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=batch,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        num_train_epochs=1.0,
        max_length=args.max_length,
        router_aux_loss_coef=0.001,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        # TRL defaults to bf16, which a CPU refuses; fp32 as the toolkit trains on CPU.
        bf16=False,
    )
    if args.trl_arm == "sft":
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(**shared, completion_only_loss=True),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    else:
        config = DPOConfig(**shared, beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1, 0.2])
        # The reference model passed in, loaded the same way: TRL's own load of it would lack
        # the fixes `transformers_model` applies.
        trainer = DPOTrainer(
            model=model,
            ref_model=common.transformers_model(args.model),
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    output = trainer.train()
    result = {
        "train_runtime": output.metrics["train_runtime"],
        "train_end": time.time(),
        "steps": trainer.state.global_step,
    }
    (out / "result.json").write_text(json.dumps(result))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.trl_arm:
        trl_arm(args)
        return
    started = common.stamp()
    machine = common.machine()
    common.ensure_data()
    args.model = str(args.model or common.ensure_model("teacher"))
    root = common.RUNS / f"train_stages-{started}"
    root.mkdir(parents=True, exist_ok=True)
    raw: dict[str, list[dict]] = {}
    stages = args.stages.split(",")
    for stage in stages:
        data = root / f"{stage}.jsonl"
        batch, _ = settings(args, stage)
        tokens = common.training_rows(stage, args.steps * batch, args.seed, args.model, data)
        arms = [f"align {stage}", f"trl {stage}"]
        for rep, arm in common.alternate(arms, args.repeats):
            out = root / stage / f"rep{rep}" / arm.split()[0]
            print(f"[rep {rep}] {arm} ...", flush=True)
            run = run_align if arm.startswith("align") else run_trl
            result = run(args, stage, data, out)
            result["train_tokens_per_s"] = tokens / result["train_s"]
            result["tokens"] = tokens
            raw.setdefault(arm, []).append({"rep": rep, **result})
        steps = {arm: {r["steps"] for r in raw[arm]} for arm in arms}
        if len(set.union(*steps.values())) != 1:
            print(f"WARNING: {stage}: the arms trained different numbers of steps: {steps}")

    table = common.medians(raw)
    ratio_rows = common.ratios(table, [(f"align {s}", f"trl {s}") for s in stages], METRICS)
    print()
    common.print_table(
        f"SFT and DPO: {args.steps} steps from {args.model}; medians of {args.repeats}",
        table,
        METRICS,
        ratio_rows,
    )
    if "dpo" in stages:
        print(
            "DPO: align dpo computes the reference log-probs before its training loop (outside"
            " training tokens/s); TRL runs the reference model in the loop. Compare ready s."
        )
    path = common.write_results(
        "train_stages",
        started,
        sys.argv,
        machine,
        settings=vars(args),
        raw=raw,
        medians=table,
        ratios=ratio_rows,
        notes="ratio = align / trl; training tokens/s: above 1 is better; ready s and peak "
        "RSS: below 1 is better. Peak RSS: ru_maxrss of each arm's process, read by a launcher"
        " process (getrusage RUSAGE_CHILDREN).",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
