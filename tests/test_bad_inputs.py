"""The bad-input corpus (tests/data/bad/cases.yaml), run through the `align` command.

Every case must be refused with exit status 2 and a message naming the file, row and field (or
the config key), with no Python traceback and before any work: nothing is written under the
runs directory, so no model is saved and no engine or Ray cluster is started.

Starting `align` costs about 5 s of imports (torch, transformers, TRL), so one process per
case would take minutes. The cases run in `ForkedAlign` instead: one process imports the
command once, then each case runs in a fresh fork of it that calls `align.cli.main` with its
output going to files, and exits with main's status (a traceback on stderr and status 1 if an
exception escapes, as for the console script). `test_a_forked_run_matches_the_align_command`
checks one case against the real command.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from datasets import Dataset, DatasetDict

from align.modeling import build_model, write_checkpoint
from align.tasks import export, make_problems
from align.tokenizer import build_tokenizer
from tests.test_cli import align

CORPUS = Path(__file__).parent / "data" / "bad"
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text(encoding="utf-8"))["cases"]
# Good and bad rows mixed: the skip-mode tests train on it.
SOME_BAD_ROWS = CORPUS / "datasets" / "sft-some-bad-rows.jsonl"
# The valid datasets the cases name as {sft}, {rl}, {dpo}.
SCHEMAS = ("sft", "rl", "dpo")
# A refused input fails in well under a second; an engine start or training takes far longer.
FAST_S = 15.0

SERVER = r"""
import json, os, sys, traceback

from align import cli
import datasets, transformers  # what cli.main imports when it starts
from pipelines import pipeline, stages

print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        status = 1
        try:
            status = cli.main(request["args"])
        except SystemExit as exit:
            status = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
            if isinstance(exit.code, str):
                print(exit.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    _, wait_status = os.waitpid(pid, 0)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(wait_status)}), flush=True)
"""


class ForkedAlign:
    """Runs `align ARGS` in a fork of one process that imported the command once."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.server = subprocess.Popen(
            [sys.executable, "-c", SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        # Imported once here, so no case's time includes the imports.
        assert self._read_line(timeout_s=300.0) == "ready\n"

    def _read_line(self, timeout_s: float) -> str:
        ready, _, _ = select.select([self.server.stdout], [], [], timeout_s)
        if not ready:
            self.close()
            raise TimeoutError(f"no answer from the align process within {timeout_s} s")
        return self.server.stdout.readline()

    def __call__(self, *args: str, timeout_s: float = 300.0) -> subprocess.CompletedProcess:
        out, err = self.scratch / "stdout", self.scratch / "stderr"
        request = {"args": list(args), "stdout": str(out), "stderr": str(err)}
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        returncode = json.loads(self._read_line(timeout_s))["returncode"]
        return subprocess.CompletedProcess(
            ["align", *args], returncode, out.read_text(), err.read_text()
        )

    def close(self) -> None:
        self.server.stdin.close()
        try:
            self.server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.server.kill()


@pytest.fixture(scope="module")
def forked_align(tmp_path_factory):
    runner = ForkedAlign(tmp_path_factory.mktemp("forked-align"))
    yield runner
    runner.close()


class _CreatesAFileWhenUnpickled:
    """Pickled as a call of `open(path, "w")`: loading the pickle leaves a file at `path`."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """The values of the placeholders in cases.yaml (see its header)."""
    root = tmp_path_factory.mktemp("inputs")
    model = write_checkpoint(build_model("student", seed=0), root / "student")
    problems = make_problems(["add"], [1], 4, seed=0)
    values = {
        "model": str(model),
        **{s: write_jsonl(root / f"{s}.jsonl", export(problems, s).to_list()) for s in SCHEMAS},
        "missing": str(root / "missing"),
        "unpickled": str(root / "unpickled"),
    }

    sft_rows = export(problems, "sft").to_list()
    huge = {"prompt": sft_rows[0]["prompt"], "completion": "x" * 100_001}
    values["huge_row"] = write_jsonl(root / "huge-row.jsonl", [sft_rows[0], huge])

    prompt = [{"role": "user", "content": "Compute 1+1."}]
    table = pa.table({"prompt": [prompt], "answer": pa.array([2], pa.int64())})
    pq.write_table(table, root / "int-answer.parquet")
    values["parquet_int_answer"] = str(root / "int-answer.parquet")

    DatasetDict({"train": Dataset.from_list(sft_rows)}).save_to_disk(str(root / "splits"))
    values["splits_dir"] = str(root / "splits")

    bin_only = root / "bin-only"
    bin_only.mkdir()
    for file in model.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, bin_only / file.name)
    trap = _CreatesAFileWhenUnpickled(Path(values["unpickled"]))
    (bin_only / "pytorch_model.bin").write_bytes(pickle.dumps(trap))
    values["bin_only"] = str(bin_only)

    other_tokenizer = root / "other-tokenizer"
    shutil.copytree(model, other_tokenizer)
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<extra-token>"])
    tokenizer.save_pretrained(str(other_tokenizer))
    values["other_tokenizer"] = str(other_tokenizer)

    other_vocab_size = root / "other-vocab-size"
    shutil.copytree(model, other_vocab_size)
    config = json.loads((other_vocab_size / "config.json").read_text())
    config["vocab_size"] += 8
    (other_vocab_size / "config.json").write_text(json.dumps(config))
    values["other_vocab_size"] = str(other_vocab_size)
    return values


def fill(text: str, values: dict[str, str]) -> str:
    """`text` with each {name} in `values` replaced; other braces ({run}) are left as they are."""
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), text)


def case_values(case: dict, inputs: dict[str, str]) -> dict[str, str]:
    return {**inputs, "file": str(CORPUS / case["file"])} if "file" in case else inputs


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_bad_input_is_refused_before_any_work(case, inputs, forked_align, tmp_path):
    values = case_values(case, inputs)
    runs = tmp_path / "runs"
    started = time.perf_counter()
    out = forked_align(*(fill(arg, values) for arg in case["args"]), f"runs_dir={runs}")
    seconds = time.perf_counter() - started
    assert out.returncode == 2, f"exit status {out.returncode}\n{out.stderr}"
    assert "Traceback" not in out.stderr, out.stderr
    for expected in case["expect"]:
        assert fill(expected, values) in out.stderr
    assert not runs.exists(), f"written before failing: {sorted(runs.rglob('*'))}"
    assert not Path(inputs["unpickled"]).exists(), "a pickle-based weight file was loaded"
    assert seconds < FAST_S


def test_every_corpus_file_is_a_documented_case():
    used = {CORPUS / case["file"] for case in CASES if "file" in case} | {SOME_BAD_ROWS}
    on_disk = {path for path in CORPUS.rglob("*") if path.is_file()} - {CORPUS / "cases.yaml"}
    assert on_disk == used
    ids = [case["id"] for case in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    documented = (Path(__file__).parents[1] / "docs" / "reliability.md").read_text()
    undocumented = [
        i for i in ids if f"test_bad_input_is_refused_before_any_work[{i}]" not in documented
    ]
    assert undocumented == [], "add these cases to the corpus table of docs/reliability.md"


def test_a_forked_run_matches_the_align_command(inputs, forked_align, tmp_path):
    case = next(case for case in CASES if case["id"] == "sft-missing-completion")
    values = case_values(case, inputs)
    args = [fill(arg, values) for arg in case["args"]] + [f"runs_dir={tmp_path}"]
    forked, real = forked_align(*args), align(*args)
    assert (forked.returncode, forked.stdout, forked.stderr) == (
        real.returncode,
        real.stdout,
        real.stderr,
    )
    assert real.returncode == 2 and fill(case["expect"][0], values) in real.stderr


@pytest.fixture(scope="module")
def skip_run(inputs, forked_align, tmp_path_factory):
    """`align sft on_error=skip` on 4 good and 2 bad rows: a finished run to compare against."""
    runs = tmp_path_factory.mktemp("skip-runs")
    out = forked_align(
        "sft",
        f"model={inputs['model']}",
        f"data={SOME_BAD_ROWS}",
        "on_error=skip",
        "name=skip",
        "train.batch_size=4",
        f"runs_dir={runs}",
    )
    return out, runs / "skip"


def test_skip_mode_trains_on_the_good_rows_and_counts_the_bad(skip_run):
    out, run = skip_run
    assert out.returncode == 0, out.stderr
    assert f"{SOME_BAD_ROWS}: skipped 2 bad rows of 6" in out.stderr
    result = json.loads((run / "model" / "train_result.json").read_text())
    assert result["steps"] == 1 and (run / "model" / "model.safetensors").is_file()
    data = result["data"]
    assert (data["rows"], data["kept"], data["skipped"]) == (6, 4, 2)
    assert data["errors"] == [
        f"{SOME_BAD_ROWS}: row 2: field 'completion': missing or null",
        f"{SOME_BAD_ROWS}: row 4: invalid JSON (Expecting property name enclosed in double "
        "quotes at column 2)",
    ]


def test_skip_mode_in_the_filter_stage_reports_the_count(forked_align, tmp_path):
    out = forked_align(
        "filter",
        f"data={SOME_BAD_ROWS}",
        "filters=[{name: dedup}]",
        "on_error=skip",
        f"runs_dir={tmp_path}",
    )
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "filter" / "report.json").read_text())
    assert (report["data_report"]["skipped"], report["input_rows"]) == (2, 4)
    assert report["output"]["kept"] == 4


def snapshot(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def test_a_bad_input_leaves_a_finished_run_untouched(skip_run, inputs, forked_align):
    _, run = skip_run
    before = snapshot(run)
    assert "model/model.safetensors" in before and "config.yaml" in before
    same_run = ["name=skip", f"runs_dir={run.parent}"]
    bad_data = CORPUS / "datasets" / "sft-missing-completion.jsonl"
    for args in (
        ["sft", f"model={inputs['model']}", f"data={bad_data}"],
        ["sft", f"model={inputs['bin_only']}", f"data={SOME_BAD_ROWS}", "on_error=skip"],
        ["sft", f"model={inputs['model']}", f"data={inputs['sft']}", f"heldout={bad_data}"],
    ):
        out = forked_align(*args, *same_run)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert snapshot(run) == before, f"align {' '.join(args)} changed the finished run"


def test_filtering_every_row_away_is_an_error(inputs, forked_align, tmp_path):
    out = forked_align(
        "sft",
        f"model={inputs['model']}",
        f"data={inputs['sft']}",
        "filters=[{name: length, options: {unit: chars}, keep: {max: 1}}]",
        "name=nothing-left",
        f"runs_dir={tmp_path}",
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"{inputs['sft']}: filtering kept no rows; loosen the thresholds" in out.stderr
    report = json.loads((tmp_path / "nothing-left" / "filter" / "report.json").read_text())
    assert report["output"] == {"kept": 0, "dropped": 4, "unscored": 0}
    assert not (tmp_path / "nothing-left" / "model").exists()
