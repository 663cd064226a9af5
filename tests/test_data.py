"""Loading and validating user datasets: round trips, malformed files, skip mode."""

from __future__ import annotations

import json
import logging

import pytest
from datasets import Dataset, DatasetDict

from align.data import REQUIRED_COLUMNS, DataError, load_dataset_file, validate_row
from align.tasks import export, make_problems

PROBLEMS = make_problems(["add", "sort"], [1, 2], 3, seed=0)
SAMPLES = {schema: export(PROBLEMS, schema).to_list() for schema in ("sft", "rl", "dpo", "chat")}
SAMPLES["text"] = [{"text": f"{r['prompt']} {r['answer']}"} for r in PROBLEMS]
# Plain-text (TRL "standard") variants of the prompt-based schemas.
SAMPLES["sft-plain"] = [{"prompt": r["prompt"], "completion": r["answer"]} for r in PROBLEMS]
SAMPLES["rl-plain"] = [{"prompt": r["prompt"], "answer": r["answer"], "level": 1} for r in PROBLEMS]


def user(text="Compute 1+1."):
    return [{"role": "user", "content": text}]


def assistant(text="<answer>2</answer>"):
    return [{"role": "assistant", "content": text}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write(fmt, tmp_path, rows):
    if fmt == "jsonl":
        return write_jsonl(tmp_path / "data.jsonl", rows)
    if fmt == "parquet":
        Dataset.from_list(rows).to_parquet(tmp_path / "data.parquet")
        return tmp_path / "data.parquet"
    Dataset.from_list(rows).save_to_disk(tmp_path / "data")
    return tmp_path / "data"


def test_a_saved_dataset_directory_is_read_without_writing_into_it(tmp_path):
    """Stages map the rows they load (TRL's tokenising, the filters); a dataset that still
    pointed at the input's Arrow files would write its map caches next to them."""
    path = write("dir", tmp_path, SAMPLES["sft"])
    before = sorted(p.name for p in path.iterdir())
    dataset, _ = load_dataset_file(path, "sft")
    assert dataset.cache_files == []
    dataset.map(lambda row: {"n": len(row["prompt"])})
    dataset.filter(lambda row: True)
    assert sorted(p.name for p in path.iterdir()) == before


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "dir"])
@pytest.mark.parametrize("sample", list(SAMPLES))
def test_round_trip(tmp_path, fmt, sample):
    rows = SAMPLES[sample]
    path = write(fmt, tmp_path, rows)
    dataset, report = load_dataset_file(path, sample.removesuffix("-plain"))
    assert dataset.to_list() == rows
    schema = sample.removesuffix("-plain")
    expected = {"file": str(path), "schema": schema, "rows": 12, "kept": 12, "skipped": 0}
    assert report == {
        **expected,
        "errors": [],
        **({"implicit_prompts": 0} if schema == "dpo" else {}),
    }


GOOD_SFT = {"prompt": user(), "completion": assistant()}
# name: (schema, file lines (bytes or rows), bad row, bad field, words in the message)
MALFORMED = {
    "missing field": ("sft", [GOOD_SFT, {"prompt": user()}], 1, "completion", "missing"),
    "null field": ("rl", [{"prompt": "Compute 1+1.", "answer": None}], 0, "answer", "missing"),
    "wrong type": (
        "sft",
        [GOOD_SFT, GOOD_SFT, {"prompt": "x", "completion": 5}],
        2,
        "completion",
        "expected non-empty string or list of messages, got int",
    ),
    "answer not a string": ("rl", [{"prompt": "x", "answer": 2}], 0, "answer", "got int"),
    "empty string": ("sft", [{"prompt": "  ", "completion": "2"}], 0, "prompt", "blank string"),
    "empty message list": (
        "dpo",
        [{"prompt": [], "chosen": "a", "rejected": "b"}],
        0,
        "prompt",
        "empty list",
    ),
    "messages as string": (
        "chat",
        [{"messages": "hi"}],
        0,
        "messages",
        "list of messages, got str",
    ),
    "bad role": (
        "sft",
        [{"prompt": [{"role": "bot", "content": "hi"}], "completion": assistant()}],
        0,
        "prompt",
        "message 0: role 'bot' is not one of",
    ),
    "empty content": (
        "chat",
        [{"messages": user() + [{"role": "assistant", "content": ""}]}],
        0,
        "messages",
        "message 1: content must be a non-empty string",
    ),
    "message not an object": (
        "chat",
        [{"messages": ["hi"]}],
        0,
        "messages",
        "message 0: expected an object, got str",
    ),
    "assistant-first messages": (
        "chat",
        [{"messages": user() + assistant()}, {"messages": assistant() + user()}],
        1,
        "messages",
        "not start with",
    ),
    "no assistant message": ("chat", [{"messages": user()}], 0, "messages", "contain an assistant"),
    "prompt ends with assistant": (
        "rl",
        [{"prompt": user() + assistant(), "answer": "2"}],
        0,
        "prompt",
        "must not end with an assistant",
    ),
    "completion from user": (
        "sft",
        [{"prompt": user(), "completion": user()}],
        0,
        "completion",
        "start with an assistant",
    ),
    "formats mixed in a row": (
        "dpo",
        [{"prompt": user(), "chosen": assistant(), "rejected": "<answer>3</answer>"}],
        0,
        "rejected",
        "mixed",
    ),
    "formats mixed across rows": (
        "sft",
        [GOOD_SFT, {"prompt": "Compute 1+1.", "completion": "2"}],
        1,
        "prompt",
        "is text but row 0 is conversational",
    ),
    "huge field": (
        "sft",
        [{"prompt": "x" * 100_001, "completion": "2"}],
        0,
        "prompt",
        "100001 characters exceed",
    ),
    "huge message list": (
        "chat",
        [{"messages": user("x" * 60_000) + assistant("y" * 60_000)}],
        0,
        "messages",
        "120000 characters",
    ),
    "invalid UTF-8": (
        "sft",
        [GOOD_SFT, b'{"prompt": "\xff\xfe", "completion": "2"}'],
        1,
        None,
        "invalid UTF-8",
    ),
    "invalid JSON": (
        "sft",
        [GOOD_SFT, b'{"prompt": "x", "completion": }'],
        1,
        None,
        "invalid JSON",
    ),
    "not an object": ("sft", [b"[1, 2]"], 0, None, "expected a JSON object, got list"),
    "blank lines are not rows": ("sft", [b"", GOOD_SFT, b"   ", b"{}"], 1, "prompt", "missing"),
    "empty file": ("sft", [], None, None, "no usable rows"),
}


def write_lines(path, lines):
    data = b"".join(
        (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines
    )
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_rows_are_located(tmp_path, name):
    schema, lines, row, field, words = MALFORMED[name]
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as caught:
        load_dataset_file(path, schema)
    error = caught.value
    assert (error.file, error.row, error.field) == (str(path), row, field)
    message = str(error)
    assert message.startswith(f"{path}: ") and words in message
    assert (f"row {row}: " in message) == (row is not None)
    assert (f"field '{field}': " in message) == (field is not None)


def test_error_message_format():
    error = DataError("expected x, got int", file="data/train.jsonl", row=17, field="completion")
    assert str(error) == "data/train.jsonl: row 17: field 'completion': expected x, got int"
    assert isinstance(error, ValueError) and str(DataError("no rows")) == "no rows"


def test_validate_row_sets_only_the_field():
    validate_row(GOOD_SFT, "sft")
    with pytest.raises(DataError) as caught:
        validate_row({"prompt": "x" * 11, "answer": "1"}, "rl", max_chars_per_field=10)
    assert (caught.value.file, caught.value.row, caught.value.field) == (None, None, "prompt")
    with pytest.raises(ValueError, match="known schemas: sft, rl, prompts, dpo, chat, text"):
        validate_row(GOOD_SFT, "kto")


def test_skip_mode_counts_and_logs(tmp_path, caplog):
    good = SAMPLES["sft"][:4]
    lines = [good[0], {"prompt": user()}, good[1], b"{oops", good[2], b"", good[3], b"\xff"]
    path = write_lines(tmp_path / "mixed.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="align.data"):
        dataset, report = load_dataset_file(path, "sft", on_error="skip")
    assert dataset.to_list() == good
    assert (report["rows"], report["kept"], report["skipped"]) == (7, 4, 3)
    assert [e.split(": ")[1] for e in report["errors"]] == ["row 1", "row 3", "row 6"]
    assert "skipped 3 bad rows of 7" in caplog.text


def test_skip_mode_reports_at_most_20_errors(tmp_path):
    path = write_lines(tmp_path / "many.jsonl", [GOOD_SFT] + [{"prompt": "x"}] * 30)
    _, report = load_dataset_file(path, "sft", on_error="skip")
    assert (report["kept"], report["skipped"], len(report["errors"])) == (1, 30, 20)


def test_skip_mode_with_only_bad_rows_has_no_usable_rows(tmp_path):
    path = write_lines(tmp_path / "allbad.jsonl", [{"prompt": "x"}, b"nope"])
    with pytest.raises(
        DataError, match=r"no usable rows \(0 of 2 valid; first error: .*row 0"
    ) as caught:
        load_dataset_file(path, "sft", on_error="skip")
    assert caught.value.row is None


@pytest.mark.parametrize("fmt", ["parquet", "dir"])
def test_arrow_sources_are_validated_and_skipped(tmp_path, fmt):
    rows = [dict(r) for r in SAMPLES["rl-plain"][:3]]
    rows[1]["answer"] = " "
    path = write(fmt, tmp_path, rows)
    with pytest.raises(DataError) as caught:
        load_dataset_file(path, "rl")
    assert (caught.value.row, caught.value.field) == (1, "answer")
    dataset, report = load_dataset_file(path, "rl", on_error="skip")
    assert dataset.to_list() == [rows[0], rows[2]] and report["skipped"] == 1


def test_a_missing_column_is_reported_on_the_first_row(tmp_path):
    Dataset.from_list([{"prompt": "x"}] * 2).to_parquet(tmp_path / "d.parquet")
    with pytest.raises(DataError) as caught:
        load_dataset_file(tmp_path / "d.parquet", "rl")
    assert (caught.value.row, caught.value.field) == (0, "answer")


def test_extra_columns_are_kept_even_when_only_some_rows_have_them(tmp_path):
    rows = [dict(GOOD_SFT), dict(GOOD_SFT, source="web"), dict(GOOD_SFT, score=0.5)]
    dataset, _ = load_dataset_file(write_jsonl(tmp_path / "x.jsonl", rows), "sft")
    assert dataset.column_names == ["prompt", "completion", "source", "score"]
    assert dataset["source"] == [None, "web", None] and dataset["score"] == [None, None, 0.5]


def test_json_array_files_and_byte_order_marks(tmp_path):
    rows = SAMPLES["rl"][:2]
    array = tmp_path / "a.json"
    array.write_text(json.dumps(rows))
    assert load_dataset_file(array, "rl")[0].to_list() == rows
    array.write_text(json.dumps([rows[0], 3]))
    with pytest.raises(DataError, match="row 1: expected a JSON object, got int"):
        load_dataset_file(array, "rl")
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows[0]).encode() + b"\n")
    assert load_dataset_file(bom, "rl")[0].to_list() == rows[:1]


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: does not exist") as caught:
        load_dataset_file(tmp_path / "nope.jsonl", "sft")
    assert caught.value.row is None
    (tmp_path / "d.csv").write_text("prompt,completion\n")
    with pytest.raises(DataError, match=r"d.csv: unsupported file type '.csv'; supported: .jsonl"):
        load_dataset_file(tmp_path / "d.csv", "sft")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="junk.parquet: cannot read"):
        load_dataset_file(tmp_path / "junk.parquet", "sft")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="empty_dir: not a readable save_to_disk directory"):
        load_dataset_file(tmp_path / "empty_dir", "sft")
    DatasetDict({"train": Dataset.from_list(SAMPLES["sft"])}).save_to_disk(tmp_path / "splits")
    with pytest.raises(DataError, match=r"holds splits \['train'\]"):
        load_dataset_file(tmp_path / "splits", "sft")


def test_unknown_schema_and_on_error(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD_SFT])
    assert set(REQUIRED_COLUMNS) == {"sft", "rl", "prompts", "dpo", "chat", "text"}
    with pytest.raises(
        ValueError, match="unknown schema 'kto'; known schemas: sft, rl, prompts, dpo, chat, text"
    ):
        load_dataset_file(path, "kto")
    with pytest.raises(ValueError, match="on_error"):
        load_dataset_file(path, "sft", on_error="ignore")


def test_extra_columns_of_clashing_types_are_located(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [dict(GOOD_SFT, meta=1), dict(GOOD_SFT, meta=[1])])
    with pytest.raises(
        DataError, match="x.jsonl: row 1: field 'meta': is a list but row 0"
    ) as caught:
        load_dataset_file(path, "sft")
    assert (caught.value.row, caught.value.field) == (1, "meta")


USER = {"role": "user", "content": "Sort: cba"}
ANSWER = {"role": "assistant", "content": "abc"}


# Rows that parse and have every field, but mean nothing (or the wrong thing) to a trainer.
@pytest.mark.parametrize(
    ("schema", "line", "message"),
    [
        (
            "chat",
            json.dumps({"messages": [USER, ANSWER, {"role": "user", "content": "thanks"}]}),
            "row 1: field 'messages': must end with an assistant message, got 'user'",
        ),
        (
            "sft",
            json.dumps({"prompt": [USER], "completion": [ANSWER, USER]}),
            "row 1: field 'completion': must end with an assistant message, got 'user'",
        ),
        (
            "sft",
            json.dumps({"prompt": "p", "completion": "\u200b\u200d\ufeff\u00ad"}),
            "row 1: field 'completion': expected non-empty string or list of messages, got "
            "string of invisible characters only",
        ),
        (
            "sft",
            json.dumps(
                {"prompt": [USER], "completion": [{"role": "assistant", "content": "\u2060"}]}
            ),
            "row 1: field 'completion': message 0: content must be a non-empty string",
        ),
        (
            "dpo",
            json.dumps({"prompt": "p", "chosen": "abc", "rejected": "abc"}),
            "row 1: field 'rejected': is identical to 'chosen'",
        ),
        (
            "sft",
            '{"prompt": "p", "completion": "a\\ud800b"}',
            "row 1: field 'completion': holds a lone surrogate ('\\ud800' at character 1)",
        ),
        (
            "rl",
            '{"prompt": "p", "answer": "1", "source": "\\udfff"}',
            "row 1: field 'source': holds a lone surrogate",
        ),
        (
            "sft",
            json.dumps({"prompt": "p", "completion": "c", "level": "two"}),
            "row 1: field 'level': is a string but row 0 has a number; a column holds one type",
        ),
        (
            "sft",
            json.dumps({"prompt": "p", "completion": "c", "level": [2]}),
            "row 1: field 'level': is a list but row 0 has a number",
        ),
    ],
    ids=[
        "conversation-ends-on-user",
        "completion-ends-on-user",
        "invisible-completion",
        "invisible-message",
        "chosen-equals-rejected",
        "lone-surrogate",
        "lone-surrogate-in-an-extra-column",
        "column-type-changes",
        "column-becomes-a-list",
    ],
)
def test_meaningless_rows_are_located_and_skippable(tmp_path, schema, line, message):
    first = {
        "chat": {"messages": [USER, ANSWER]},
        "sft": {"prompt": "p", "completion": "c", "level": 1},
        "dpo": {"prompt": "p", "chosen": "a", "rejected": "b"},
        "rl": {"prompt": "p", "answer": "1", "source": "s"},
    }[schema]
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(first) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_dataset_file(path, schema)
    assert str(caught.value) == f"{path}: {message}" or str(caught.value).startswith(
        f"{path}: {message}"
    )
    dataset, report = load_dataset_file(path, schema, on_error="skip")
    assert (len(dataset), report["skipped"]) == (1, 1)


def test_a_key_given_twice_in_a_row_is_a_warning_with_the_row(tmp_path, caplog):
    path = tmp_path / "rows.jsonl"
    path.write_text(
        '{"prompt": "p", "completion": "c"}\n'
        '{"prompt": "p", "completion": "first", "completion": "second"}\n'
        '{"prompt": [{"role": "user", "content": "a", "content": "b"}],'
        ' "completion": [{"role": "assistant", "content": "c"}]}\n',
        encoding="utf-8",
    )
    with caplog.at_level(logging.WARNING, logger="align.data"):
        with pytest.raises(
            DataError, match="row 2: field 'prompt': is conversational but row 0 is text"
        ):
            load_dataset_file(path, "sft")
    assert f"{path}: row 1: key 'completion' is given twice; the last value is used" in caplog.text
    assert f"{path}: row 2: key 'content' is given twice" in caplog.text
    path.write_text(path.read_text().splitlines()[1] + "\n", encoding="utf-8")
    dataset, _ = load_dataset_file(path, "sft")
    assert dataset[0] == {"prompt": "p", "completion": "second"}


SFT_FORMATS = ("sft", "chat", "text")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "dir"])
@pytest.mark.parametrize(
    ("sample", "detected"),
    [("sft", "sft"), ("sft-plain", "sft"), ("chat", "chat"), ("text", "text")],
)
def test_the_schema_is_detected_from_the_columns(tmp_path, fmt, sample, detected):
    """TRL users' files (messages; prompt/completion as strings or messages; text) load without
    naming a schema; extra columns (the embedded tasks' answer, task, level) do not confuse it."""
    rows, report = load_dataset_file(write(fmt, tmp_path, SAMPLES[sample]), SFT_FORMATS)
    assert report["schema"] == detected
    assert rows.to_list() == SAMPLES[sample]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"messages": user() + assistant(), "prompt": "Compute 1+1.", "completion": "2"},
            "data.jsonl: its columns (completion, messages, prompt) fit several formats (sft, "
            "chat): set schema= to the one meant, or remove the other columns",
        ),
        (
            {"question": "Compute 1+1.", "response": "2"},
            "data.jsonl: its columns (question, response) fit none of the formats this stage "
            "reads (sft: prompt + completion; chat: messages; text: text)",
        ),
    ],
)
def test_columns_that_fit_several_formats_or_none_are_refused_naming_them(tmp_path, row, message):
    path = write_jsonl(tmp_path / "data.jsonl", [row])
    with pytest.raises(DataError) as error:
        load_dataset_file(path, SFT_FORMATS)
    assert str(error.value) == f"{tmp_path}/{message}"


def test_a_file_whose_first_row_does_not_parse_reports_that_row(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a",\n{"prompt": "b", "completion": "c"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"data.jsonl: row 0: invalid JSON"):
        load_dataset_file(path, SFT_FORMATS)


@pytest.mark.parametrize("fmt", ["jsonl", "dir"])
def test_preference_rows_with_an_implicit_prompt_get_it_split_off(tmp_path, fmt):
    """chosen/rejected that both start with the prompt (TRL's implicit prompt), conversational
    or plain text: the shared start becomes the prompt, as TRL's extract_prompt makes it."""
    rows = [
        {"chosen": user() + assistant(), "rejected": user() + assistant("<answer>3</answer>")},
        {
            "chosen": user("Sort: ba") + assistant("ab"),
            "rejected": user("Sort: ba") + assistant("ba"),
        },
    ]
    loaded, report = load_dataset_file(write(fmt, tmp_path, rows), "dpo")
    assert report["implicit_prompts"] == 2 and report["schema"] == "dpo"
    assert loaded.to_list() == [
        {"chosen": assistant(), "rejected": assistant("<answer>3</answer>"), "prompt": user()},
        {"chosen": assistant("ab"), "rejected": assistant("ba"), "prompt": user("Sort: ba")},
    ]
    plain = write_jsonl(
        tmp_path / "plain.jsonl", [{"chosen": "The sky is blue.", "rejected": "The sky is green."}]
    )
    (row,) = load_dataset_file(plain, "dpo")[0].to_list()
    # TRL leaves the space before the answers with them.
    assert row == {"chosen": " blue.", "rejected": " green.", "prompt": "The sky is"}
    # Nothing in common: no prompt to split off, and the row is refused as having none.
    bare = write_jsonl(tmp_path / "bare.jsonl", [{"chosen": "Yes.", "rejected": "No."}])
    with pytest.raises(DataError, match="bare.jsonl: row 0: field 'prompt': expected non-empty"):
        load_dataset_file(bare, "dpo")
