"""The benchmark scripts: each one's --help, and the shared module's arithmetic and files.

No engine, Ray or training runs here; `make bench` runs the scripts themselves.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name != "common.py")


def load_common():
    spec = importlib.util.spec_from_file_location("bench_common", BENCH / "common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


common = load_common()


def test_every_script_is_documented_with_its_results():
    """Each benchmark has its section in docs/benchmarks.md (what it measures, against which
    peer, the command and its numbers): a new script without one fails here."""
    docs = (BENCH.parent / "docs" / "benchmarks.md").read_text()
    assert SCRIPTS, "no benchmark scripts found"
    for script in SCRIPTS:
        assert f"(`bench/{script}`)" in docs, f"docs/benchmarks.md has no section on {script}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_runs_and_describes_the_script(script):
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:") and script in done.stdout
    assert "--" in done.stdout.split("options:")[1], "the options are listed"
    assert done.stderr == ""


def test_alternate_reverses_the_order_on_odd_repetitions():
    assert common.alternate(["a", "b", "c"], 2) == [
        (0, "a"),
        (0, "b"),
        (0, "c"),
        (1, "c"),
        (1, "b"),
        (1, "a"),
    ]
    assert common.alternate(["a"], 0) == []


def test_medians_on_hand_made_numbers():
    raw = {
        # odd count: the middle value; a None is left out; even count: mean of the middle two.
        "ours": [
            {"rep": 0, "speed": 10.0, "time": 4.0},
            {"rep": 1, "speed": 30.0, "time": None},
            {"rep": 2, "speed": 20.0, "time": 6.0},
        ],
        # never measured: None; ints count; the repetition number is not a metric.
        "peer": [{"rep": 0, "speed": 5, "time": None}, {"rep": 1, "speed": 7, "time": None}],
    }
    assert common.medians(raw) == {
        "ours": {"speed": 20.0, "time": 5.0},
        "peer": {"speed": 6.0, "time": None},
    }


def test_ratios_divide_ours_by_the_peer():
    table = {
        "ours": {"speed": 20.0, "time": 5.0, "memory": 300.0},
        "peer": {"speed": 8.0, "time": None, "memory": 0.0},
        "other": {"speed": 40.0, "time": 2.0, "memory": 600.0},
    }
    metrics = [
        common.Metric("speed", "speed", "higher"),
        common.Metric("time", "time", "lower"),
        common.Metric("memory", "memory", "lower"),
    ]
    assert common.ratios(table, [("ours", "peer"), ("ours", "other")], metrics) == {
        # 20 / 8; the peer's time was never measured; a zero denominator gives no ratio.
        "ours / peer": {"speed": 2.5, "time": None, "memory": None},
        # 20 / 40, 5 / 2, 300 / 600.
        "ours / other": {"speed": 0.5, "time": 2.5, "memory": 0.5},
    }


def test_print_table_shows_medians_ratios_and_which_way_is_better(capsys):
    metrics = [
        common.Metric("speed", "tokens/s", "higher"),
        common.Metric("time", "ready s", "lower", "{:.2f}"),
    ]
    table = {"ours": {"speed": 20.0, "time": 5.0}, "peer": {"speed": 8.0, "time": None}}
    text = common.print_table("title", table, metrics, {"ours / peer": {"speed": 2.5}})
    assert capsys.readouterr().out == text + "\n"
    lines = text.splitlines()
    assert lines[0] == "title"
    assert lines[1] == "(higher is better: tokens/s; lower is better: ready s)"
    assert lines[3].split() == ["ours", "20.0", "5.00"]
    assert lines[4].split() == ["peer", "8.0", "-"]
    assert lines[5].split() == ["ratio", "ours", "/", "peer", "2.50x", "-"]


def test_write_results_keeps_everything_and_writes_nan_as_null(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    raw = {"ours": [{"rep": 0, "speed": 1.5}, {"rep": 1, "speed": math.nan}]}
    path = common.write_results(
        "demo",
        "20261202-120000",
        ["bench/demo.py", "--repeats", "2"],
        {"cpu_count": 2},
        raw=raw,
        medians={"ours": {"speed": 1.5}},
        ratios={"ours / peer": {"speed": math.inf}},
    )
    assert path == tmp_path / "demo-20261202-120000.json"
    assert json.loads(path.read_text()) == {
        "benchmark": "demo",
        "started": "20261202-120000",
        "argv": ["bench/demo.py", "--repeats", "2"],
        "machine": {"cpu_count": 2},
        "raw": {"ours": [{"rep": 0, "speed": 1.5}, {"rep": 1, "speed": None}]},
        "medians": {"ours": {"speed": 1.5}},
        "ratios": {"ours / peer": {"speed": None}},
    }


def test_machine_names_the_versions_and_the_cores():
    facts = common.machine()
    assert facts["cpu_count"] >= 1 and 1 <= facts["cpus_usable"] <= facts["cpu_count"]
    assert facts["torch"] and facts["trl"] and facts["transformers"]
    assert len(facts["load_average"]) == 3
    json.dumps(facts)  # serialisable as it is


def test_run_child_measures_the_child_peak_memory_and_names_the_log_of_a_failure(tmp_path):
    # This process holds 300 MiB more than usual while the children run: a child's peak must
    # not include its parent's memory (a forked child's ru_maxrss would).
    held = bytearray(300 * 2**20)
    held[:: 2**12] = b"x" * len(held[:: 2**12])
    big = common.run_child(
        [sys.executable, "-c", "x = bytearray(200 * 2**20)"], tmp_path / "big.log"
    )
    small = common.run_child([sys.executable, "-c", "pass"], tmp_path / "small.log")
    assert 200 <= big.peak_rss_mib < 300
    assert small.peak_rss_mib < 100
    assert big.wall_s > 0 and 0 < big.cpu_s < big.wall_s + 1
    with pytest.raises(RuntimeError, match="exited with 3") as error:
        common.run_child(
            [sys.executable, "-c", "print('boom', flush=True); raise SystemExit(3)"],
            tmp_path / "bad.log",
        )
    assert str(tmp_path / "bad.log") in str(error.value) and "boom" in str(error.value)
    del held


def load_rl():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_rl", BENCH / "rl.py")
        rl = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(rl)
    finally:
        sys.path.remove(str(BENCH))
    return rl


def test_rl_profile_splits_each_step_and_charges_the_workers_per_step(tmp_path):
    rl = load_rl()
    step = {
        "time/step": 10.0,
        "time/learner_wait": 1.0,
        "time/learner_call": 9.0,
        "time/learner_step": 8.0,
        "time/learner_forward_backward": 6.0,
        "time/learner_optimizer": 1.5,
        "time/learner_metrics": 0.5,
        "sync/gather_seconds": 0.5,
        "sync/load_seconds": 0.25,
        "perf/learner_flops_per_s": 2e9,
        "perf/padding_share": 0.25,
    }
    request = {"time/rollout_generate": 2.0, "time/reward": 0.5, "rollout/seconds": 2.5}
    lines = [
        request,
        {**step, "time/step": 14.0},
        request,
        request,
        {**step, "time/learner_wait": 3.0},
        request,
        step,
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    profile = rl.step_profile(tmp_path / "metrics.jsonl")
    assert profile["step"] == 34.0 / 3
    # The first step (waiting for the first batch) is not the running pipeline's.
    assert profile["step, median after the first"] == 10.0
    assert profile["learner: waiting for a batch"] == 5.0 / 3
    assert profile["learner: forward + backward"] == 6.0
    assert profile["learner: Ray call overhead"] == 0.5  # 9 - 8 - 0.5
    # 4 requests over 3 steps.
    assert profile["worker: generation"] == 8.0 / 3 and profile["worker: reward"] == 2.0 / 3
    assert profile["worker: idle"] == pytest.approx(34.0 / 3 - (8.0 + 2.0 + 0.75) / 3)
    assert profile["learner FLOP/s"] == 2e9 and profile["padding share"] == 0.25
    assert rl.spread([30.0, None, 10.0]) == "[10, 30, -]"
    # Samples/s between the first snapshot after the start and the last: 2048 in 8 s.
    points = [
        {"samples": 0, "train_seconds": 0.0},
        {"samples": 1024, "train_seconds": 9.0},
        {"samples": 3072, "train_seconds": 17.0},
    ]
    assert rl.steady_rate(points) == 256.0 and rl.steady_rate(points[:2]) is None


def test_rl_scores_held_out_rows_spread_over_the_file():
    rl = load_rl()
    # A file ordered by task: the first 40 rows would all be 'add'.
    rows = [{"task": "add" if i < 80 else "sort", "i": i} for i in range(160)]
    picked = rl.evenly_spaced(rows, 40)
    assert len(picked) == 40 and len({r["i"] for r in picked}) == 40
    assert sum(r["task"] == "sort" for r in picked) == 20
    assert rl.evenly_spaced(rows[:3], 40) == rows[:3]
