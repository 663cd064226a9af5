"""Distillation speed: `align distill` with the teacher online vs from the offline top-k cache.

The peer here is the online arm, the usual way to distil: the teacher runs forward on every
batch. The offline arm reads the teacher's top-k logits from a cache built once before
training (pipelines/distill.py, `teacher.mode: offline`). Both arms train the same student on
the same rows (`--steps` x `--batch` rows of the embedded tasks' SFT data in whole seeded
passes, trained in one epoch) with the same loss, learning rate, max_length and seed,
held-out evaluation off, each in a process of its own, alternating across repetitions.

Before the repetitions, one offline run builds the cache that every offline repetition then
reuses; its manifest gives the one-time build time (the teacher's forward passes over the
distinct rows and the writing). Reported per arm (medians over repetitions): training tokens/s
(prompt + completion tokens over the Trainer's `train_runtime`), ready s (launch to the end of
training) and peak RSS (the process's ru_maxrss, bench/common.py `run_child`); and for the
cache: the build time, its bytes on disk and bytes per cached completion token. Ratios are
offline / online: above 1 is better for tokens/s, below 1 for ready s and memory.

Student: the `student` preset (0.4 M parameters); teacher: the `teacher` preset (3.6 M), both
random-initialised (the speed does not depend on what the weights have learnt).

Part `cache`: building the offline cache with each `teacher.cache_builder`, vLLM (an engine
serving the teacher, its prompt logprobs) against a transformers forward in the training
process, for `--cache-teacher` (default the `large` size, 75 M) over `--cache-rows` rows, each
build in an `align distill` process of its own (one training step after it), alternating.
Reported per builder (medians): rows/s of the build (the manifest's `build_seconds`: the
teacher's passes over the rows and the writing; loading the teacher or starting the engine
excluded), the process's wall s (everything, engine start included) and peak RSS; and how the
two caches agree (share of positions with the same top-k ids in the same order, largest
logprob difference there, fp16 as stored).

    python bench/distill.py --steps 60 --repeats 3

Writes bench/results/distill-<time>.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import common

ARMS = ["offline", "online"]
METRICS = common.TRAINING_METRICS
# Part cache: ours (the default builder) first, the peer second.
CACHE_BUILDERS = ("vllm", "transformers")
CACHE_METRICS = [
    common.Metric("rows_per_s", "rows/s", "higher"),
    common.Metric("wall_s", "wall s", "lower"),
    common.Metric("peak_rss_mib", "peak RSS MiB", "lower", "{:.0f}"),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--student", help="student checkpoint (default: the student preset)")
    p.add_argument("--teacher", help="teacher checkpoint (default: the teacher preset)")
    p.add_argument("--steps", type=int, default=60, help="optimiser steps per arm")
    p.add_argument("--batch", type=int, default=32, help="rows per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--top-k", type=int, default=32, help="teacher entries cached per position")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", default="training,cache", help="comma-separated: training, cache")
    p.add_argument(
        "--cache-teacher", default="large", help="teacher of part cache: a size or a checkpoint"
    )
    p.add_argument("--cache-rows", type=int, default=256, help="rows of part cache")
    return p.parse_args(argv)


def run_distill(args, mode: str, data: Path, cache: Path, out: Path, **teacher) -> dict:
    """`align distill` in `mode` on `data`; the training time and end from its metrics.jsonl.
    `teacher` holds further teacher settings (model, cache_builder)."""
    teacher = {"model": args.teacher, "mode": mode, **teacher}
    if mode == "offline":
        teacher |= {"top_k": args.top_k, "cache_dir": str(cache)}
    config = {
        "student": args.student,
        "data": str(data),
        "teacher": teacher,
        "heldout": None,
        "heldout_sft": None,
        "train": {
            "learning_rate": args.lr,
            "batch_size": args.batch,
            "epochs": 1.0,
            "max_length": args.max_length,
            "save_steps": 1_000_000,
            "seed": args.seed,
        },
    }
    return common.align_training("distill", config, out)


def cache_part(args, root: Path) -> dict:
    """Part `cache`: the offline cache built by vLLM and by a transformers forward, alternating;
    rows/s, wall s and peak RSS per builder, and how the two caches agree."""
    teacher = args.cache_teacher
    if not Path(teacher).is_dir():
        teacher = str(common.ensure_model(teacher))
    data = root / "cache-rows.jsonl"
    common.training_rows("sft", args.cache_rows, args.seed, args.student, data)
    raw: dict[str, list[dict]] = {}
    caches: dict[str, Path] = {}
    for rep, builder in common.alternate(list(CACHE_BUILDERS), args.repeats):
        print(f"[cache rep {rep}] {builder} ...", flush=True)
        cache = root / f"cache-rep{rep}" / builder / "teacher_cache"
        caches.setdefault(builder, cache)
        settings = argparse.Namespace(**{**vars(args), "batch": args.cache_rows})
        result = run_distill(
            settings,
            "offline",
            data,
            cache,
            cache.parent,
            model=teacher,
            cache_builder=builder,
        )
        manifest = json.loads((cache / "manifest.json").read_text())
        raw.setdefault(builder, []).append(
            {
                "rep": rep,
                "rows_per_s": manifest["rows"] / manifest["build_seconds"],
                "build_s": manifest["build_seconds"],
                "wall_s": result["wall_s"],
                "peak_rss_mib": result["peak_rss_mib"],
            }
        )
    table = common.medians(raw)
    ratio_rows = common.ratios(table, [CACHE_BUILDERS], CACHE_METRICS)
    print()
    common.print_table(
        f"teacher cache build: {args.cache_rows} rows, top-{args.top_k}, teacher {teacher};"
        f" medians of {args.repeats} (the peer is the transformers forward)",
        table,
        CACHE_METRICS,
        ratio_rows,
    )
    agreement = cache_agreement(*(caches[b] for b in CACHE_BUILDERS))
    print(
        f"caches agree: {agreement['same_ids_share']:.4f} of {agreement['positions']} positions"
        f" have the same top-{args.top_k} ids in the same order; largest logprob difference"
        f" there {agreement['max_logprob_diff']:.2e} (fp16 as stored)"
    )
    return {"raw": raw, "medians": table, "ratios": ratio_rows, "agreement": agreement}


def cache_agreement(a: Path, b: Path) -> dict:
    """Share of positions whose top-k ids are equal (same order) in two caches of the same rows,
    and the largest logprob difference at those positions."""
    import torch
    from safetensors.torch import load_file

    first, second = load_file(str(a / "topk.safetensors")), load_file(str(b / "topk.safetensors"))
    assert torch.equal(first["keys"], second["keys"]), "the caches hold different rows"
    same = (first["ids"] == second["ids"]).all(-1)
    diff = (first["logprobs"].float() - second["logprobs"].float()).abs()[same]
    return {
        "positions": len(same),
        "same_ids_share": same.float().mean().item(),
        "max_logprob_diff": diff.max().item() if len(diff) else None,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    started = common.stamp()
    machine = common.machine()
    args.student = str(args.student or common.ensure_model("student"))
    args.teacher = str(args.teacher or common.ensure_model("teacher"))
    root = common.RUNS / f"distill-{started}"
    root.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    results = {}
    if "training" in parts:
        results |= training_part(args, root)
    if "cache" in parts:
        results["cache_build"] = cache_part(args, root)
    path = common.write_results(
        "distill",
        started,
        sys.argv,
        machine,
        settings=vars(args),
        **results,
        notes="the peer is the online arm; ratio = offline / online; training tokens/s: above 1"
        " is better; ready s and peak RSS: below 1 is better. cache_build: the peer is the"
        " transformers builder; ratio = vllm / transformers",
    )
    print(f"wrote {path}")


def training_part(args, root: Path) -> dict:
    """Part `training`: offline (cache built once, then reused) against online training."""
    data = root / "sft.jsonl"
    tokens = common.training_rows("sft", args.steps * args.batch, args.seed, args.student, data)
    cache = root / "teacher_cache"

    print("offline run building the cache ...", flush=True)
    build_run = run_distill(args, "offline", data, cache, root / "build")
    manifest = json.loads((cache / "manifest.json").read_text())
    cache_bytes = sum(f.stat().st_size for f in cache.iterdir())
    cache_facts = {
        "build_seconds": manifest["build_seconds"],
        "rows": manifest["rows"],
        "positions": manifest["positions"],
        "top_k": manifest["top_k"],
        "bytes": cache_bytes,
        "bytes_per_token": cache_bytes / manifest["positions"],
        "build_run": build_run,
    }

    raw: dict[str, list[dict]] = {}
    for rep, arm in common.alternate(ARMS, args.repeats):
        print(f"[rep {rep}] {arm} ...", flush=True)
        result = run_distill(args, arm, data, cache, root / f"rep{rep}" / arm)
        result["train_tokens_per_s"] = tokens / result["train_s"]
        result["tokens"] = tokens
        raw.setdefault(arm, []).append({"rep": rep, **result})

    table = common.medians(raw)
    ratio_rows = common.ratios(table, [("offline", "online")], METRICS)
    print()
    common.print_table(
        f"distill: {args.steps} steps x {args.batch} rows, {args.student} from {args.teacher};"
        f" medians of {args.repeats} (the peer is the online arm)",
        table,
        METRICS,
        ratio_rows,
    )
    print(
        f"offline cache (top-{args.top_k}): built once in {cache_facts['build_seconds']:.1f} s for"
        f" {cache_facts['rows']} rows; {cache_bytes / 2**20:.2f} MiB on disk,"
        f" {cache_facts['bytes_per_token']:.0f} bytes per cached completion token"
    )
    return {"raw": raw, "medians": table, "ratios": ratio_rows, "cache": cache_facts}


if __name__ == "__main__":
    main()
