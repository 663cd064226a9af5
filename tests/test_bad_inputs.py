"""The bad-input corpus (tests/data/bad/cases.yaml), run through the `align` command.

Every case must be refused with exit status 2 and a message naming the file, row and field (or
the config key), with no Python traceback and before any work: nothing is written under the
runs directory, so no model is saved and no engine or Ray cluster is started.

Starting `align` costs about 5 s of imports (torch, transformers, TRL), so one process per
case would take minutes. The cases run in `ForkedAlign` (tests/conftest.py) instead: one process imports the
command once, then each case runs in a fresh fork of it that calls `align.cli.main` with its
output going to files, and exits with main's status (a traceback on stderr and status 1 if an
exception escapes, as for the console script). `test_a_forked_run_matches_the_align_command`
checks one case against the real command.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
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
from tests.conftest import ForkedAlign
from tests.helpers import align

CORPUS = Path(__file__).parent / "data" / "bad"
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text(encoding="utf-8"))["cases"]
# Good and bad rows mixed: the skip-mode tests train on it.
SOME_BAD_ROWS = CORPUS / "datasets" / "sft-some-bad-rows.jsonl"
# The valid datasets the cases name as {sft}, {rl}, {dpo}.
SCHEMAS = ("sft", "rl", "dpo")
# A refused input fails in well under a second; an engine start or training takes far longer.
FAST_S = 15.0

# Reward plug-ins that fail on import, importable by the forked `align` (its PYTHONPATH).
FAILING_PLUGINS = {
    "raises_at_import": "raise RuntimeError('the reward service is not configured')\n",
    "syntax_error": "def reward(prompts, completions:\n    return []\n",
    "exits_at_import": "import sys\nsys.exit(0)\n",
    "missing_dependency": "import no_such_dependency_of_the_plugin\n",
}


@pytest.fixture(scope="module")
def forked_align(tmp_path_factory):
    plugins = tmp_path_factory.mktemp("plugins")
    for name, source in FAILING_PLUGINS.items():
        (plugins / f"{name}.py").write_text(source, encoding="utf-8")
    runner = ForkedAlign(tmp_path_factory.mktemp("forked-align"), pythonpath=plugins)
    runner.plugins = plugins
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


def skip_run_args(inputs: dict[str, str], runs: Path) -> list[str]:
    """`align sft on_error=skip` on 4 good and 2 bad rows, as the run `skip` in `runs`."""
    return [
        "sft",
        f"model={inputs['model']}",
        f"data={SOME_BAD_ROWS}",
        "on_error=skip",
        "name=skip",
        "train.batch_size=4",
        f"runs_dir={runs}",
    ]


@pytest.fixture(scope="module")
def skip_run(inputs, forked_align, tmp_path_factory):
    """A finished run to compare against (`skip_run_args`)."""
    runs = tmp_path_factory.mktemp("skip-runs")
    return forked_align(*skip_run_args(inputs, runs)), runs / "skip"


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


# --- inputs nobody anticipated: generated here, several variants of each class ------------------
# (id, args, the refusal). Placeholders as in cases.yaml, plus the files `hostile_inputs` builds;
# `runs_dir={runs}` is appended unless the case sets runs_dir itself.
HOSTILE = [
    # special files: refused at once, never read (a FIFO would block, /dev/zero never ends)
    ("fifo-as-data", ["sft", "model={model}", "data={fifo}"], "{fifo}: is not a regular file: a named pipe (FIFO)"),
    ("fifo-as-config", ["eval", "--config", "{fifo_yaml}"], "config file {fifo_yaml} is not a regular file: a named pipe (FIFO)"),
    ("device-as-data", ["sft", "model={model}", "data=/dev/zero"], "/dev/zero: is not a regular file: a character device"),
    ("symlink-loop-as-data", ["sft", "model={model}", "data={loop_jsonl}"], "{loop_jsonl}: is a symlink loop"),
    ("symlink-loop-as-config", ["eval", "--config", "{loop_yaml}"], "config file {loop_yaml} is a symlink loop"),
    ("directory-as-config", ["eval", "--config", "{dir}"], "config file {dir} is not a regular file: a directory"),
    # hostile YAML
    ("alias-bomb-in-a-value", ["sft", "--config", "{bomb_value}", "model={model}", "data={sft}"], "invalid YAML in {bomb_value}, line 6: the document expands to more than 100000 values through aliases"),
    ("alias-bomb-under-an-unknown-key", ["sft", "--config", "{bomb_unknown}", "model={model}", "data={sft}"], "the document expands to more than 100000 values through aliases"),
    ("recursive-alias", ["sft", "--config", "{recursive}", "model={model}", "data={sft}"], "invalid YAML in {recursive}, line 1: an alias refers to a collection that contains it"),
    ("duplicate-top-level-key", ["sft", "--config", "{duplicate_key}", "model={model}", "data={sft}"], "invalid YAML in {duplicate_key}, line 3: key 'train' appears twice"),
    ("duplicate-nested-key", ["sft", "--config", "{duplicate_nested}", "model={model}", "data={sft}"], "invalid YAML in {duplicate_nested}, line 3: key 'epochs' appears twice"),
    ("config-in-latin-1", ["sft", "--config", "{latin1}", "model={model}", "data={sft}"], "config file {latin1} is not UTF-8 text (invalid continuation byte at byte 9)"),
    ("config-in-utf-16", ["sft", "--config", "{utf16}", "model={model}", "data={sft}"], "config file {utf16} is not UTF-8 text"),
    # values the validators missed
    ("epochs-inf", ["sft", "model={model}", "data={sft}", "train.epochs=.inf"], "invalid value for 'train.epochs' in <command line>: must be finite (got float inf)"),
    ("learning-rate-inf", ["sft", "model={model}", "data={sft}", "train.learning_rate=.inf"], "invalid value for 'train.learning_rate' in <command line>: must be finite"),
    ("learning-rate-nan", ["dpo", "model={model}", "data={dpo}", "train.learning_rate=.nan"], "invalid value for 'train.learning_rate' in <command line>: must be finite (got float nan)"),
    ("learning-rate-1e400", ["sft", "model={model}", "data={sft}", "train.learning_rate=1e400"], "invalid value for 'train.learning_rate' in <command line>: must be finite"),
    ("seed-negative", ["sft", "model={model}", "data={sft}", "train.seed=-1"], "invalid value for 'train.seed' in <command line>: a seed must be in [0, 2**32) (got -1)"),
    ("seed-too-large", ["rl", "model={model}", "data={rl}", "seed=4294967296"], "invalid value for 'seed' in <command line>: a seed must be in [0, 2**32)"),
    ("weight-decay-negative", ["sft", "model={model}", "data={sft}", "train.weight_decay=-1"], "invalid value for 'train.weight_decay' in <command line>: must be >= 0 (got -1.0)"),
    ("vision-learning-rate-with-a-frozen-tower", ["sft", "model={model}", "data={sft}", "train.vision_learning_rate=1e-4"], "invalid value for 'train.vision_learning_rate' in <command line>: applies only with train_vision: true (the tower is frozen otherwise)"),
    ("empty-run-name", ["sft", "model={model}", "data={sft}", "name="], "invalid value for 'name' in <command line>: must not be empty"),
    ("run-name-dot-dot", ["sft", "model={model}", "data={sft}", "name=.."], "invalid value for 'name' in <command line>: must be a single directory name"),
    ("run-name-with-a-slash", ["eval", "model={model}", "data={rl}", "name=a/../../b"], "invalid value for 'name' in <command line>: must be a single directory name"),
    ("run-name-with-a-newline", ["eval", "model={model}", "data={rl}", r'name="a\nb"'], "invalid value for 'name' in <command line>: must not hold control characters"),
    ("runs-dir-is-a-file", ["sft", "model={model}", "data={sft}", "runs_dir={sft}"], "invalid value for 'runs_dir' in <command line>: must be a directory"),
    ("pipeline-stage-named-dot-dot", ["run", "{stage_dot_dot}", "--dry-run"], "invalid value for 'stages[0].name' in {stage_dot_dot}: must be a single directory name"),
    ("pipeline-from-an-unknown-stage", ["run", "{pipeline}", "--from", "nosuch"], "--from nosuch: no such stage; stages: data"),
    # damaged state files
    ("save-to-disk-state-cut-short", ["sft", "model={model}", "data={cut_state}"], "{cut_state}: not a readable save_to_disk directory"),
    ("save-to-disk-info-not-json", ["sft", "model={model}", "data={bad_info}"], "{bad_info}: not a readable save_to_disk directory"),
    ("save-to-disk-arrow-missing", ["sft", "model={model}", "data={no_arrow}"], "{no_arrow}: not a readable save_to_disk directory"),
    # broken checkpoints, in every command that reads one
    ("weights-cut-short", ["sft", "model={weights_cut}", "data={sft}"], "key 'model': checkpoint {weights_cut} weights file model.safetensors is damaged or cut short: Error while deserializing header: incomplete metadata"),
    ("weights-garbage", ["eval", "model={weights_garbage}", "data={rl}"], "key 'model': checkpoint {weights_garbage} weights file model.safetensors is damaged or cut short"),
    ("weights-empty", ["rl", "model={weights_empty}", "data={rl}"], "weights file model.safetensors is damaged or cut short: Error while deserializing header: header too small"),
    ("config-json-not-json", ["dpo", "model={config_not_json}", "data={dpo}"], "key 'model': checkpoint {config_not_json} config.json is not JSON (Expecting property name enclosed in double quotes at line 1 column 2)"),
    ("config-json-a-list", ["sft", "model={config_a_list}", "data={sft}"], "config.json does not hold a JSON object"),
    ("config-json-unknown-type", ["eval", "model={config_unknown_type}", "data={rl}"], "config.json names model_type 'no_such_architecture', which transformers"),
    ("config-json-not-causal-lm", ["rl", "model={config_not_causal}", "data={rl}"], "config.json names model_type 'vit', which is not a causal language model"),
    ("config-json-bad-field", ["sft", "model={config_bad_field}", "data={sft}"], "key 'model': checkpoint {config_bad_field} config.json is not a valid"),
    ("tokenizer-missing", ["eval", "model={no_tokenizer}", "data={rl}"], "key 'model': checkpoint {no_tokenizer} has no tokenizer"),
    ("tokenizer-not-json", ["sft", "model={tokenizer_not_json}", "data={sft}"], "key 'model': checkpoint {tokenizer_not_json} tokenizer.json is not JSON"),
    ("teacher-weights-cut-short", ["distill", "student={model}", "teacher.model={weights_cut}", "data={sft}"], "key 'teacher.model': checkpoint {weights_cut} weights file model.safetensors is damaged or cut short"),
    ("checkpoint-symlink-loop", ["sft", "model={loop_yaml}", "data={sft}"], "key 'model': checkpoint {loop_yaml} is a symlink loop"),
    ("checkpoint-is-a-fifo", ["eval", "model={fifo}", "data={rl}"], "key 'model': checkpoint {fifo} is not a regular file: a named pipe (FIFO); a checkpoint is a directory"),
    ("max-model-len-beyond-positions", ["eval", "model={model}", "data={rl}", "engine.max_model_len=100000"], "key 'engine.max_model_len': 100000 exceeds the 512 positions of checkpoint {model}"),
    ("reward-model-config-not-json", ["rl", "model={model}", "data={rl}", "rewards=[{name: reward_model, options: {model: '{config_not_json}'}}]"], "key 'rewards[0].options.model': checkpoint {config_not_json} config.json is not JSON"),
    ("judge-weights-cut-short", ["dpo", "model={model}", "pairs={prompts: '{rl}', rewards: [{name: llm_judge, options: {model: '{weights_cut}'}}]}"], "key 'pairs.rewards[0].options.model': checkpoint {weights_cut} weights file model.safetensors is damaged or cut short"),
    ("filter-reference-without-tokenizer", ["filter", "data={sft}", "filters=[{name: difficulty, options: {model: '{no_tokenizer}'}}]"], "key 'filters[0].options.model': checkpoint {no_tokenizer} has no tokenizer"),
    ("filter-judge-not-causal", ["filter", "data={sft}", "filters=[{name: difficulty_judge, options: {model: '{config_not_causal}'}}]"], "key 'filters[0].options.model': checkpoint {config_not_causal} config.json names model_type 'vit', which is not a causal language model"),
    ("reward-option-named-like-a-column", ["rl", "model={model}", "data={rl}", "rewards=[{name: answer_match, options: {answer: '42'}}]"], "key 'rewards[0].options.answer': {rl} has a column 'answer' too, and a reward function gets options and columns as keyword arguments of one namespace"),
    ("pairs-reward-option-named-like-a-column", ["dpo", "model={model}", "pairs={prompts: '{rl}', rewards: [{name: math_verify, options: {answer: x}}]}"], "key 'pairs.rewards[0].options.answer': {rl} has a column 'answer' too"),
    ("filter-reward-option-named-like-a-column", ["filter", "data={sft}", "filters=[{name: difficulty, options: {model: '{model}', rewards: [{name: math_verify, options: {answer: x}}]}}]"], "key 'filters[0].options.rewards[0].options.answer': {sft} has a column 'answer' too"),
    ("engine-block-size-not-a-multiple-of-16", ["eval", "model={model}", "data={rl}", "engine.block_size=20"], "invalid value for 'engine.block_size' in <command line>: must be a positive multiple of 16 (got 20)"),
    ("rl-max-model-len-beyond-positions", ["rl", "model={model}", "data={rl}", "engine.max_model_len=4096"], "key 'engine.max_model_len': 4096 exceeds the 512 positions"),
    # reward plug-ins that fail on import
    ("plugin-raises-at-import", ["rl", "model={model}", "data={rl}", "rewards=[{name: 'raises_at_import:reward'}]"], "invalid value for 'rewards[0].name' in <command line>: importing module 'raises_at_import' ({plugins}/raises_at_import.py) of reward 'raises_at_import:reward' failed: RuntimeError: the reward service is not configured"),
    ("plugin-syntax-error", ["rl", "model={model}", "data={rl}", "rewards=[{name: 'syntax_error:reward'}]"], "importing module 'syntax_error' ({plugins}/syntax_error.py) of reward 'syntax_error:reward' failed: SyntaxError"),
    ("plugin-exits-at-import", ["rl", "model={model}", "data={rl}", "rewards=[{name: 'exits_at_import:reward'}]"], "of reward 'exits_at_import:reward' failed: SystemExit: 0"),
    ("plugin-missing-dependency", ["rl", "model={model}", "data={rl}", "rewards=[{name: 'missing_dependency:reward'}]"], "failed: ModuleNotFoundError: No module named 'no_such_dependency_of_the_plugin'"),
]  # fmt: skip


def _alias_bomb(levels: int, width: int) -> str:
    """A YAML mapping whose last key expands to width ** levels scalars through aliases."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def hostile_inputs(inputs, forked_align, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hostile")
    values = {**inputs, "plugins": str(forked_align.plugins), "dir": str(root)}

    def file(name: str, content: str | bytes) -> str:
        path = root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        values[name.replace(".", "_").replace("-", "_")] = str(path)
        return str(path)

    os.mkfifo(root / "fifo.jsonl")
    os.mkfifo(root / "fifo.yaml")
    values.update(fifo=str(root / "fifo.jsonl"), fifo_yaml=str(root / "fifo.yaml"))
    for suffix in ("jsonl", "yaml"):
        a, b = root / f"loop-a.{suffix}", root / f"loop.{suffix}"
        a.symlink_to(b)
        b.symlink_to(a)
        values[f"loop_{suffix}"] = str(b)

    # 10 ** 7 scalars once expanded, from 8 lines: under a real key, and under one nobody reads.
    values["bomb_value"] = file(
        "bomb-value.yaml",
        "lora:\n" + "".join(f"  {line}\n" for line in _alias_bomb(7, 10).splitlines()),
    )
    values["bomb_unknown"] = file(
        "bomb-unknown.yaml",
        "no_such_key:\n" + "".join(f"  {line}\n" for line in _alias_bomb(7, 10).splitlines()),
    )
    values["recursive"] = file("recursive.yaml", "train: &a {epochs: *a}\n")
    values["duplicate_key"] = file("duplicate-key.yaml", "train:\n  epochs: 2\ntrain:\n  seed: 3\n")
    values["duplicate_nested"] = file("duplicate-nested.yaml", "train:\n  epochs: 2\n  epochs: 3\n")
    values["latin1"] = file("latin1.yaml", "name: caf\u00e9-run\n".encode("latin-1"))
    values["utf16"] = file("utf16.yaml", "name: run\n".encode("utf-16"))

    values["stage_dot_dot"] = file(
        "stage-dot-dot.yaml",
        yaml.safe_dump({"stages": [{"name": "..", "command": "make-data", "config": {}}]}),
    )
    values["pipeline"] = file(
        "pipeline.yaml",
        yaml.safe_dump(
            {
                "name": "p",
                "runs_dir": str(root / "pipeline-runs"),
                "stages": [{"name": "data", "command": "make-data", "config": {}}],
            }
        ),
    )

    model = Path(inputs["model"])

    def damaged(name: str, change) -> None:
        copy = root / name
        shutil.copytree(model, copy)
        change(copy)
        values[name] = str(copy)

    def rewrite(file: str, content) -> callable:
        def change(copy: Path) -> None:
            path = copy / file
            data = path.read_bytes()
            path.write_bytes(content(data) if callable(content) else content)

        return change

    def edit_config(**fields) -> callable:
        return rewrite("config.json", lambda d: json.dumps({**json.loads(d), **fields}).encode())

    damaged("weights_cut", rewrite("model.safetensors", lambda d: d[: len(d) // 2]))
    damaged("weights_garbage", rewrite("model.safetensors", bytes(range(256)) * 64))
    damaged("weights_empty", rewrite("model.safetensors", b""))
    damaged("config_not_json", rewrite("config.json", b"{model_type: llama4_text"))
    damaged("config_a_list", rewrite("config.json", b"[1, 2]"))
    damaged("config_unknown_type", edit_config(model_type="no_such_architecture"))
    damaged("config_not_causal", edit_config(model_type="vit"))
    damaged("config_bad_field", edit_config(num_local_experts="eight", num_experts_per_tok=None))
    damaged(
        "no_tokenizer",
        lambda c: [(c / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")],
    )
    damaged("tokenizer_not_json", rewrite("tokenizer.json", lambda d: d[: len(d) // 3]))

    rows = Dataset.from_list(export(make_problems(["add"], [1], 4, seed=0), "sft").to_list())
    for name in ("cut_state", "bad_info", "no_arrow"):
        rows.save_to_disk(str(root / name))
        values[name] = str(root / name)
    state = root / "cut_state" / "state.json"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    (root / "bad_info" / "dataset_info.json").write_text("{not json", encoding="utf-8")
    for arrow in (root / "no_arrow").glob("*.arrow"):
        arrow.unlink()
    return values


@pytest.mark.parametrize(("case", "args", "expect"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_input_is_refused_in_one_line_before_any_work(
    case, args, expect, hostile_inputs, forked_align, tmp_path
):
    runs = tmp_path / "runs"
    values = {**hostile_inputs, "runs": str(runs)}
    argv = [fill(arg, values) for arg in args]
    if not any(arg.startswith("runs_dir=") for arg in argv) and argv[0] != "run":
        argv.append(f"runs_dir={runs}")
    started = time.perf_counter()
    out = forked_align(*argv, timeout_s=60.0)
    seconds = time.perf_counter() - started
    assert out.returncode == 2, f"exit status {out.returncode}\n{out.stderr}"
    assert "Traceback" not in out.stderr, out.stderr
    (line,) = out.stderr.strip().splitlines()  # one line, nothing else
    assert fill(expect, values) in line, out.stderr
    assert not runs.exists(), f"written before failing: {sorted(runs.rglob('*'))}"
    assert not (Path(hostile_inputs["dir"]) / "pipeline-runs").exists()
    assert seconds < FAST_S


@pytest.mark.parametrize(
    "case", ["duplicate-top-level-key", "epochs-inf", "plugin-exits-at-import"]
)
def test_a_hostile_input_leaves_a_finished_run_untouched(
    case, skip_run, hostile_inputs, forked_align
):
    _, run = skip_run
    before = snapshot(run)
    _, args, expect = next(c for c in HOSTILE if c[0] == case)
    argv = [*(fill(arg, hostile_inputs) for arg in args), "name=skip", f"runs_dir={run.parent}"]
    out = forked_align(*argv)
    assert out.returncode == 2 and fill(expect, hostile_inputs) in out.stderr, out.stderr
    assert snapshot(run) == before


def test_a_finished_run_is_not_run_again_with_other_settings(skip_run, inputs, forked_align):
    _, run = skip_run
    before = snapshot(run)
    out = forked_align(*skip_run_args(inputs, run.parent), "train.learning_rate=3e-4")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert (
        f"run {run} finished earlier with other settings (train.learning_rate); its model would "
        "be reused as it is" in out.stderr.strip().splitlines()[-1]
    )
    assert snapshot(run) == before
