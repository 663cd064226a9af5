"""Loading and validating user datasets in the schemas the stages use (TRL's column conventions).

A dataset file is JSON lines (`.jsonl`/`.json`), Parquet (`.parquet`) or a directory written by
`datasets.Dataset.save_to_disk`. Every row is validated; a bad row raises `DataError` naming the
file, the row and the field, or is skipped and counted with `on_error="skip"`.

Rules, per schema column (see `REQUIRED_COLUMNS`):
- `prompt`, `completion`, `chosen`, `rejected`: a non-empty string, or a non-empty list of
  messages. A row uses one format for all of them, and every row uses the same format.
- `messages`: a non-empty list of messages.
- `answer`, `text`: a non-empty string.
- A message is an object with `role` in `ROLES` and a non-empty string `content`. A prompt must
  not end with an assistant message; a completion, chosen or rejected list starts with one; a
  conversation has an assistant message and does not start with one.
- A field may hold at most `max_chars_per_field` characters (all message contents together).
Extra columns are kept as they are.

A stage that reads several schemas detects a file's from its columns, as TRL does (`messages`: a
conversation; `prompt` + `completion`; `text`): `load_dataset_file(path, ("sft", "chat", "text"))`.
Columns that fit none, or more than one, are refused naming the columns found. A preference row
may leave its prompt implicit, as TRL allows: `chosen` and `rejected` without `prompt`, both
starting with the same prompt; TRL's `extract_prompt` splits it off.
"""

from __future__ import annotations

import codecs
import json
import logging
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, load_from_disk

from align.config import UnreadableFile, check_input_file, read_input_file
from align.vision import IMAGES_COLUMN, ImageError, has_images, image_folder, load_images

log = logging.getLogger(__name__)

REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "sft": ("prompt", "completion"),
    "rl": ("prompt", "answer"),
    # Prompts alone: red-teaming goals.
    "prompts": ("prompt",),
    "dpo": ("prompt", "chosen", "rejected"),
    "chat": ("messages",),
    "text": ("text",),
}
ROLES = ("system", "user", "assistant")
# Columns that may be a plain string or a list of messages.
_EITHER_FORMAT = ("prompt", "completion", "chosen", "rejected")
_EXPECTED = {
    **dict.fromkeys(_EITHER_FORMAT, "non-empty string or list of messages"),
    "messages": "non-empty list of messages",
}
_MAX_REPORTED_ERRORS = 20
# Set by the JSON reader on an object that gave a key twice: the keys, for the row's warning.
_DUPLICATE_KEYS = "\0duplicate keys"
SUPPORTED_FORMATS = ".jsonl, .json (JSON lines), .parquet, or a Dataset.save_to_disk directory"


class DataError(ValueError):
    """A dataset problem, located by file, 0-based row and field where known.

    `str(error)` reads like `data/train.jsonl: row 17: field 'completion': expected ...`.
    """

    def __init__(
        self,
        reason: str,
        *,
        file: str | None = None,
        row: int | None = None,
        field: str | None = None,
    ):
        super().__init__(reason)
        self.reason, self.file, self.row, self.field = reason, file, row, field

    def __str__(self) -> str:
        parts = [] if self.file is None else [str(self.file)]
        if self.row is not None:
            parts.append(f"row {self.row}")
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        return ": ".join([*parts, self.reason])


def _required_columns(schema: str) -> tuple[str, ...]:
    if schema not in REQUIRED_COLUMNS:
        raise ValueError(f"unknown schema {schema!r}; known schemas: {', '.join(REQUIRED_COLUMNS)}")
    return REQUIRED_COLUMNS[schema]


def _is_blank(text: str) -> bool:
    """Whether `text` shows nothing: whitespace and invisible characters (zero-width spaces
    and joiners, byte-order marks, soft hyphens: Unicode's format and control categories)."""
    return all(c.isspace() or unicodedata.category(c) in ("Cf", "Cc") for c in text)


def _check_text(value: Any, field: str) -> None:
    """Refuses strings that are not text: a lone UTF-16 surrogate (JSON's `\\ud800`) cannot be
    encoded, so it would fail later, far from its row."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise DataError(
                f"holds a lone surrogate ({value[error.start]!r} at character {error.start}), "
                "which is not text",
                field=field,
            ) from None
    elif isinstance(value, list):
        for item in value:
            _check_text(item, field)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, field)
            _check_text(item, field)


def _check_messages(messages: list, field: str, content_items: bool = False) -> None:
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(
                f"message {i}: expected an object, got {type(message).__name__}", field=field
            )
        if message.get("role") not in ROLES:
            raise DataError(
                f"message {i}: role {message.get('role')!r} is not one of {', '.join(ROLES)}",
                field=field,
            )
        content = message.get("content")
        if isinstance(content, list) and content and content_items:
            _check_content_items(content, i, message["role"], field)
        elif isinstance(content, list) and content:
            raise DataError(
                f"message {i}: content is a list of content items (images and text), which "
                "only a vision-language model's stage reads; write text content as a string",
                field=field,
            )
        elif not isinstance(content, str) or _is_blank(content):
            raise DataError(
                f"message {i}: content must be a non-empty string or list of content items",
                field=field,
            )
    roles = [message["role"] for message in messages]
    if field == "prompt" and roles[-1] == "assistant":
        raise DataError("a prompt must not end with an assistant message", field=field)
    if field in ("completion", "chosen", "rejected") and roles[0] != "assistant":
        raise DataError(f"must start with an assistant message, got {roles[0]!r}", field=field)
    if field == "messages" and (roles[0] == "assistant" or "assistant" not in roles):
        raise DataError(
            "a conversation must contain an assistant message and not start with one", field=field
        )
    if field in ("completion", "chosen", "rejected", "messages") and roles[-1] != "assistant":
        # Training would teach the model to write the user's (or system's) turn.
        raise DataError(
            f"must end with an assistant message, got {roles[-1]!r}: the model learns the "
            "turns it is given",
            field=field,
        )


def _check_content_items(items: list, i: int, role: str, field: str) -> None:
    """TRL's content items: `{"type": "text", "text": ...}` and, in user turns, `{"type":
    "image"}` (the row's `images` column holds the images, in order)."""
    for j, item in enumerate(items):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text":
            text = item.get("text")
            if not isinstance(text, str) or _is_blank(text):
                raise DataError(
                    f"message {i}: content item {j}: text must be a non-empty string", field=field
                )
        elif kind == "image":
            if role != "user":
                raise DataError(
                    f"message {i}: content item {j}: images belong in user messages, "
                    f"not {role!r} ones",
                    field=field,
                )
        else:
            raise DataError(
                f"message {i}: content item {j}: expected {{'type': 'text', 'text': ...}} or "
                f"{{'type': 'image'}}, got {_describe(item) if kind is None else repr(kind)}",
                field=field,
            )


def content_text(content: str | list) -> str:
    """A message's text: its content, or its text items joined."""
    if isinstance(content, str):
        return content
    return "".join(item["text"] for item in content if item.get("type") == "text")


def _describe(value: Any) -> str:
    if isinstance(value, str) and _is_blank(value):
        return "blank string" if not value.strip() else "string of invisible characters only"
    return "empty list" if value == [] else type(value).__name__


def validate_row(
    row: dict, schema: str, *, max_chars_per_field: int = 100_000, content_items: bool = False
) -> None:
    """Checks one row against a schema's rules (see the module docstring).

    Args:
        row: The row, column name -> value.
        schema: A key of `REQUIRED_COLUMNS`.
        max_chars_per_field: Most characters a required field may hold.
        content_items: whether message content may be a list of content items (text and
            images: rows for a vision-language model).

    Raises:
        DataError: With `field` set to the offending column (`file` and `row` left to the caller).
        ValueError: For an unknown schema.
    """
    columns = _required_columns(schema)
    for field, value in row.items():
        _check_text(value, field)
    for field in columns:
        value = row.get(field)
        if value is None:
            raise DataError("missing or null", field=field)
        if isinstance(value, list) and value and field in _EXPECTED:
            _check_messages(value, field, content_items)
            size = sum(len(content_text(message["content"])) for message in value)
        elif isinstance(value, str) and not _is_blank(value) and field != "messages":
            size = len(value)
        else:
            expected = _EXPECTED.get(field, "non-empty string")
            raise DataError(f"expected {expected}, got {_describe(value)}", field=field)
        if size > max_chars_per_field:
            raise DataError(
                f"{size} characters exceed max_chars_per_field={max_chars_per_field}", field=field
            )
    either = [field for field in columns if field in _EITHER_FORMAT]
    mixed = [f for f in either if isinstance(row[f], list) != isinstance(row[either[0]], list)]
    if mixed:
        raise DataError(
            f"plain text and lists of messages mixed; use one format for {', '.join(either)}",
            field=mixed[0],
        )
    if schema == "dpo" and row["chosen"] == row["rejected"]:
        raise DataError(
            "is identical to 'chosen': a pair needs two different answers", field="rejected"
        )


def _row_format(row: dict, schema: str) -> str:
    return "conversational" if isinstance(row[_required_columns(schema)[0]], list) else "text"


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object; a key given twice is legal JSON (the last value wins) but rarely meant,
    so it is noted for the caller to warn about with the row."""
    value = dict(pairs)
    if len(value) < len(pairs):
        seen: set[str] = set()
        twice = sorted({k for k, _ in pairs if k in seen or seen.add(k)})
        value[_DUPLICATE_KEYS] = twice
    return value


def _parse_object(line: bytes) -> dict | DataError:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        return DataError(f"invalid UTF-8 ({error.reason} at byte {error.start})")
    try:
        value = json.loads(text, object_pairs_hook=_object_without_duplicates)
    except json.JSONDecodeError as error:
        return DataError(f"invalid JSON ({error.msg} at column {error.colno})")
    if not isinstance(value, dict):
        return DataError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _read_json(path: Path, data: bytes) -> list[dict | DataError]:
    """JSON lines, or one JSON array of objects when a `.json` file starts with `[`."""
    data = data.removeprefix(codecs.BOM_UTF8)
    if path.suffix == ".json" and data.lstrip()[:1] == b"[":
        try:
            values = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"invalid JSON array ({error})", file=str(path)) from None
        return [
            value
            if isinstance(value, dict)
            else DataError(f"expected a JSON object, got {type(value).__name__}")
            for value in values
        ]
    rows = [_parse_object(line) for line in data.splitlines() if line.strip()]
    for index, row in enumerate(rows):
        _warn_duplicate_keys(row, path, index)
    return rows


def _load_saved(path: Path) -> Dataset:
    """A `save_to_disk` directory; what `datasets` raises on a damaged one becomes a DataError.

    Read into memory (the rows are read as Python objects anyway): a dataset still backed by
    the directory's Arrow files would make every later `map` or `filter` (TRL's tokenising, the
    filters) write its cache files into the input directory.
    """
    try:
        dataset = load_from_disk(str(path), keep_in_memory=True)
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as error:
        # json.JSONDecodeError (a cut state.json or dataset_info.json) is a ValueError.
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(
            f"not a readable save_to_disk directory: {reason}", file=str(path)
        ) from None
    if not isinstance(dataset, Dataset):
        raise DataError(
            f"holds splits {list(dataset)}; point to one split's directory", file=str(path)
        )
    return dataset


def _read(path: Path) -> tuple[list[dict | DataError], Dataset | None]:
    """Returns the rows (or a row's parse error) and, for Arrow-backed sources, the dataset."""
    try:
        if path.is_dir():
            dataset = _load_saved(path)
            return dataset.to_list(), dataset
        check_input_file(path)
        if path.suffix not in (".parquet", ".jsonl", ".json"):
            raise DataError(
                f"unsupported file type {path.suffix!r}; supported: {SUPPORTED_FORMATS}",
                file=str(path),
            )
        data = read_input_file(path)
    except UnreadableFile as error:
        raise DataError(str(error), file=str(path)) from None
    if path.suffix != ".parquet":
        return _read_json(path, data), None
    try:
        dataset = Dataset(pq.read_table(pa.BufferReader(data)))
    except (OSError, pa.ArrowException) as error:
        raise DataError(f"cannot read: {error}", file=str(path)) from None
    return dataset.to_list(), dataset


def detect_schema(columns: Sequence[str], candidates: Sequence[str], path: Path) -> str:
    """The one schema of `candidates` whose columns a file has (a preference file's prompt may
    be implicit), or else the one schema some of whose columns it has.

    Raises:
        DataError: naming the file and the columns found, when none or several fit.
    """
    found = set(columns)
    fits = [
        schema
        for schema in candidates
        if set(_required_columns(schema)) <= found
        or (schema == "dpo" and {"chosen", "rejected"} <= found)
    ]
    if not fits:
        # One format some of whose columns are there: its rows lack the others, and the rows
        # are refused naming the missing field (a prompt/completion file missing completions).
        # Several such formats are as good as none: the file is refused as fitting none.
        partial = [s for s in candidates if set(_required_columns(s)) & found]
        fits = partial if len(partial) == 1 else []
    if len(fits) == 1:
        return fits[0]
    listed = ", ".join(sorted(found)) or "none"
    if not fits:
        wanted = "; ".join(f"{s}: {' + '.join(_required_columns(s))}" for s in candidates)
        raise DataError(
            f"its columns ({listed}) fit none of the formats this stage reads ({wanted})",
            file=str(path),
        )
    raise DataError(
        f"its columns ({listed}) fit several formats ({', '.join(fits)}): set schema= to the "
        "one meant, or remove the other columns",
        file=str(path),
    )


def _with_implicit_prompt(row: dict) -> dict:
    """A preference row without `prompt`: the prompt that `chosen` and `rejected` share split off
    by TRL's `extract_prompt` (rows it cannot apply to are left for the validation to refuse)."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if "prompt" in row or type(chosen) is not type(rejected) or not isinstance(chosen, str | list):
        return row
    from trl.data_utils import extract_prompt

    return {**row, **extract_prompt({"chosen": chosen, "rejected": rejected})}


def load_dataset_file(
    path: str | Path,
    schema: str | Sequence[str],
    on_error: Literal["raise", "skip"] = "raise",
    max_chars_per_field: int = 100_000,
    images: bool = False,
    max_images: int = 4,
) -> tuple[Dataset, dict[str, Any]]:
    """Loads a dataset file and validates every row against `schema`.

    Rows are numbered from 0 in file order; in JSON lines, blank lines are not rows.

    Args:
        path: A `.jsonl`/`.json` file, a `.parquet` file or a `save_to_disk` directory.
        schema: A key of `REQUIRED_COLUMNS`, or several: the file's is detected from its
            columns (`detect_schema`).
        on_error: "raise" stops at the first bad row; "skip" drops bad rows and logs their count.
        max_chars_per_field: Most characters a required field may hold.
        images: whether the caller takes rows with images (TRL's `images` column and image
            content items; `align.vision`): each image is then read and checked; otherwise
            such a row is refused.
        max_images: most images a row may hold.

    Returns:
        The dataset of valid rows (extra columns kept) and a report
        `{"file", "schema", "rows", "kept", "skipped", "errors"}` with the first 20 error
        messages, and for dpo `implicit_prompts` (rows whose prompt was split off).

    Raises:
        DataError: For an unreadable file, a bad row (with "raise"), no usable rows, or columns
            that fit none or several of the schemas given.
        ValueError: For an unknown schema or `on_error` value.
    """
    for name in [schema] if isinstance(schema, str) else schema:
        _required_columns(name)
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    rows, source = _read(path)
    if not isinstance(schema, str):
        parsed = [row for row in rows if isinstance(row, dict)]
        if source is None and not parsed and rows:
            # Not one row parsed: its reason is the error, not the columns.
            error = rows[0]
            error.file, error.row = str(path), 0
            raise error
        # Every column any row has (what an Arrow table of the rows would have), so that a bad
        # row missing one is reported as a bad row, not as another format.
        columns = (
            source.column_names
            if source is not None
            else list(dict.fromkeys(key for row in parsed for key in row))
        )
        # An empty file has no columns; it is refused below as having no usable rows.
        schema = detect_schema(columns, schema, path) if rows else schema[0]
    implicit = 0
    if schema == "dpo":
        rewritten = [_with_implicit_prompt(r) if isinstance(r, dict) else r for r in rows]
        implicit = sum(new is not old for new, old in zip(rewritten, rows, strict=True))
        if implicit:
            # Built from the rewritten rows, not from the Arrow source.
            rows, source = rewritten, None
    kept: list[int] = []
    errors: list[str] = []
    first_format = ""
    # Per column of a JSON file: the kind of value of the first row that had one, and that row.
    kinds: dict[str, tuple[str, int]] = {}
    for i, row in enumerate(rows):
        try:
            if isinstance(row, DataError):
                raise row
            validate_row(row, schema, max_chars_per_field=max_chars_per_field, content_items=images)
            row_format = _row_format(row, schema)
            if kept and row_format != first_format:
                raise DataError(
                    f"is {row_format} but row {kept[0]} is {first_format}; "
                    "all rows must use one format",
                    field=REQUIRED_COLUMNS[schema][0],
                )
            if has_images(row):
                _check_images(row, path, images, max_images)
            if source is None:
                _check_kinds(row, kinds, i)
        except DataError as error:
            error.file, error.row = str(path), i
            if on_error == "raise":
                raise
            if len(errors) < _MAX_REPORTED_ERRORS:
                errors.append(str(error))
            continue
        first_format = first_format or row_format
        kept.append(i)
        if source is None:
            for key, value in row.items():
                if value is not None:
                    kinds.setdefault(key, (_kind(value), i))
    report = {
        "file": str(path),
        "schema": schema,
        "rows": len(rows),
        "kept": len(kept),
        "skipped": len(rows) - len(kept),
        "errors": errors,
    }
    if schema == "dpo":
        report["implicit_prompts"] = implicit
    if not kept:
        detail = f"; first error: {errors[0]}" if errors else ""
        raise DataError(f"no usable rows (0 of {len(rows)} valid{detail})", file=str(path))
    if report["skipped"]:
        log.warning("%s: skipped %d bad rows of %d", path, report["skipped"], len(rows))
    return _build(path, rows, kept, source), report


def _check_images(row: dict, path: Path, wanted: bool, max_images: int) -> None:
    if not wanted:
        raise DataError(
            "rows with images are read only where a vision-language model reads them (this "
            "stage's model or plug-in reads none; docs/multimodal.md)",
            field=IMAGES_COLUMN,
        )
    try:
        load_images(row, image_folder(path), max_images)
    except ImageError as error:
        raise DataError(str(error), field=IMAGES_COLUMN) from None


def _warn_duplicate_keys(value: Any, path: Path, index: int) -> None:
    """Removes the reader's notes of keys given twice (in the row or nested in it), warning."""
    if isinstance(value, dict):
        for key in value.pop(_DUPLICATE_KEYS, ()):
            log.warning(
                "%s: row %d: key %r is given twice; the last value is used", path, index, key
            )
        items = value.values()
    elif isinstance(value, list):
        items = value
    else:
        return
    for item in items:
        _warn_duplicate_keys(item, path, index)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "object"


def _check_kinds(row: dict, kinds: dict[str, tuple[str, int]], index: int) -> None:
    """A column of a table holds one kind of value; JSON rows may not agree."""
    for key, value in row.items():
        if value is None or key not in kinds:
            continue
        kind, first = kinds[key]
        if _kind(value) != kind:
            raise DataError(
                f"is a {_kind(value)} but row {first} has a {kind}; a column holds one type",
                field=key,
            )


def _build(path: Path, rows: list, kept: list[int], source: Dataset | None) -> Dataset:
    if source is not None:
        return source if len(kept) == len(rows) else source.select(kept, keep_in_memory=True)
    columns = dict.fromkeys(key for i in kept for key in rows[i])
    try:
        return Dataset.from_dict({key: [rows[i].get(key) for i in kept] for key in columns})
    except (pa.ArrowException, TypeError, ValueError) as error:
        raise DataError(f"rows do not form one table: {error}", file=str(path)) from None
