"""Property-based tests of the input layer: arbitrary bytes and structures never give a traceback
or a hang, only a located refusal or a valid load.

Each property runs a bounded number of generated examples (a few seconds in all) with a
per-example deadline, through the functions every command uses: `align.data.load_dataset_file`
(JSON lines, JSON arrays, Parquet) and `align.config.load_config` (YAML files and
`dotted.key=value` overrides).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from align.config import ConfigError, load_config
from align.data import REQUIRED_COLUMNS, DataError, load_dataset_file, validate_row
from pipelines import sft

FUZZ = settings(
    max_examples=120,
    deadline=2000,  # ms per example: a loader that blocks or loops fails here
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,  # the same examples every run: a failure reproduces
)
SCHEMAS = sorted(REQUIRED_COLUMNS)
# Any text, lone surrogates and invisible characters included.
TEXT = st.text(st.characters(codec=None), max_size=12)
KEYS = st.sampled_from(["prompt", "completion", "answer", "chosen", "rejected", "messages",
                        "text", "role", "content", "level", "task"]) | TEXT  # fmt: skip
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | TEXT
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)
ROWS = st.lists(st.dictionaries(KEYS, JSON_VALUES, max_size=5), min_size=1, max_size=4)


def _write(name: str, data: bytes) -> Path:
    path = Path(tempfile.mkdtemp(prefix="fuzz-")) / name
    path.write_bytes(data)
    return path


def _load_or_refuse(path: Path, schema: str, on_error: str = "raise") -> None:
    """Loads `path`; a valid load holds only rows that pass the schema's checks."""
    try:
        dataset, report = load_dataset_file(path, schema, on_error=on_error)
    except DataError as error:
        assert str(error).startswith(str(path)), f"a refusal that does not name the file: {error}"
        return
    assert len(dataset) == report["kept"] >= 1
    for row in dataset:
        validate_row(row, schema)


@FUZZ
@given(data=st.binary(max_size=400), schema=st.sampled_from(SCHEMAS), suffix=st.sampled_from(
    [".jsonl", ".json", ".parquet"]))  # fmt: skip
def test_arbitrary_bytes_in_a_data_file_load_or_are_refused(data, schema, suffix):
    _load_or_refuse(_write(f"rows{suffix}", data), schema)


@FUZZ
@given(rows=ROWS, schema=st.sampled_from(SCHEMAS), skip=st.booleans())
def test_arbitrary_json_rows_load_or_are_refused(rows, schema, skip):
    lines = "".join(json.dumps(row) + "\n" for row in rows)  # NaN and lone surrogates included
    _load_or_refuse(_write("rows.jsonl", lines.encode()), schema, "skip" if skip else "raise")


@FUZZ
@given(rows=ROWS, schema=st.sampled_from(SCHEMAS))
def test_arbitrary_parquet_tables_load_or_are_refused(rows, schema):
    try:
        table = pa.Table.from_pylist(rows)
        path = Path(tempfile.mkdtemp(prefix="fuzz-")) / "rows.parquet"
        pq.write_table(table, path)
    except (pa.ArrowException, TypeError, ValueError, OverflowError, UnicodeEncodeError):
        return  # not a table Arrow can write: nothing a user could hand over either
    _load_or_refuse(path, schema)


# YAML documents shaped like configs: known keys at the top and under `train`, any values.
CONFIG_DOCS = st.dictionaries(
    st.sampled_from(["model", "data", "name", "runs_dir", "schema", "train", "lora", "eval"])
    | TEXT,
    st.dictionaries(st.sampled_from(["epochs", "learning_rate", "seed", "batch_size"]) | TEXT,
                    JSON_VALUES, max_size=3) | JSON_VALUES,
    max_size=5,
)  # fmt: skip


def _config_or_refuse(path: Path | None, overrides: list[str]) -> None:
    try:
        config = load_config(sft.Config, path, overrides)
    except ConfigError as error:
        assert str(error), "an empty refusal"
        return
    for value in (config.train.learning_rate, config.train.epochs, config.train.weight_decay):
        assert math.isfinite(value)


@FUZZ
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_as_a_config_file_load_or_are_refused(data):
    _config_or_refuse(_write("config.yaml", data), ["model=m", "data=d"])


@FUZZ
@given(document=CONFIG_DOCS)
def test_arbitrary_config_documents_load_or_are_refused(document):
    text = yaml.safe_dump(document, allow_unicode=False)
    _config_or_refuse(_write("config.yaml", text.encode()), [])


@FUZZ
@given(
    overrides=st.lists(
        st.one_of(
            TEXT,
            st.builds(lambda k, v: f"{k}={v}", st.sampled_from(
                ["train.epochs", "train.seed", "name", "lora", "train", "filters.0.keep.max",
                 "eval.samples", "model", "x.y"]), TEXT),
        ),
        max_size=4,
    )
)  # fmt: skip
def test_arbitrary_overrides_load_or_are_refused(overrides):
    _config_or_refuse(None, ["model=m", "data=d", *overrides])
