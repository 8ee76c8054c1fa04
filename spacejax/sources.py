"""Row files: read every row of a source offline, as plain Python dicts (``read_rows``).

Sources, all read offline:
    "path/to/file.jsonl"     one JSON object per line (blank lines ignored)
    "path/to/file.json"      one JSON array of objects (SPIN's train.json / synthetic_train.json,
                             written by its reformat.py and convert_data.py before their parquet)
    "path/to/file.parquet"   one row per record
    "path/to/dir"            a ``datasets.Dataset.save_to_disk`` directory, or a ``DatasetDict``
                             one (pick the split with ``split=``; needed when it has several)
    "tfds:NAME"              a TFDS dataset prepared as array_record files, read with
                             ``tfds.data_source(NAME, split=split or "train", data_dir=data_dir)``
                             (the optional ``tfds`` extra; no TensorFlow needed). Chat turns are
                             stored either as a JSON-encoded string feature (``messages``, ``real``,
                             ``generated``) or as ``Sequence({"role": Text, "content": Text})``;
                             both come back as lists of {role, content} dicts.

Files and directories may be local or on gs:// (`spacejax.storage`). Rows are returned as read; spacejax.data validates and tokenizes them (the row shapes are in its
docstring).

A fixed subset of a source's rows (`data.row_ids`; SPIN trains on a fixed 50k of UltraChat) is a
file of row ids (`read_row_ids`): a text file with one id a line (blank lines and lines starting
with `#` ignored), or a .json file holding one list of ids. `select_rows` turns them into row
positions: without an id field each id is a row's position in the source (counting from 0, in
the order `read_rows` returns them); with one (`data.row_id_field`, e.g. UltraChat's `prompt_id`)
it is that field's value, compared as text, and picks every row that has it. An id that picks no
row, or one listed twice, is an error naming the file and its line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from spacejax import storage

TFDS_PREFIX = "tfds:"
_JSON_FIELDS = ("messages", "real", "generated", "prompt", "chosen", "rejected")  # may hold lists of turns


class DataError(ValueError):
    """Bad input data: the message names the file, the row or line, and what to do."""


class Rows(list):
    """The rows of a file in which each row has a line: `line_numbers[i]` is row i's line, counted
    from 1 as an editor counts them (blank lines included)."""

    def __init__(self, rows: list[dict], line_numbers: list[int]):
        super().__init__(rows)
        self.line_numbers = line_numbers


def where(rows, index: int) -> str:
    """Row `index` of `rows` as an error message names it: its line in a .jsonl file, else its
    position (counting from 0: a parquet record, a dataset row)."""
    if isinstance(rows, Rows):
        return f"line {rows.line_numbers[index]}"
    return f"row {index} (counting from 0)"


def read_rows(source: str | os.PathLike, *, split: str | None = None,
              data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Read all rows of ``source`` (see the module docstring) as a list of dicts, offline.

    ``split`` picks a split of a DatasetDict directory or a TFDS dataset (default "train");
    ``data_dir`` is the TFDS data directory. Raises FileNotFoundError for a missing source and
    DataError for a malformed file (a bad JSON line is named by its line number). The rows of a
    .jsonl file come as `Rows`, which keep each row's line for `where`.
    """
    if isinstance(source, str) and source.startswith(TFDS_PREFIX):
        return _read_tfds(source[len(TFDS_PREFIX):], split=split or "train", data_dir=data_dir)
    path = storage.location(source)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such file or directory. Pass a .jsonl or .parquet file, a directory "
            f"written by datasets' save_to_disk, or '{TFDS_PREFIX}NAME' for a prepared TFDS dataset.")
    if path.is_dir():
        with storage.local_copy(path) as local:
            return _read_saved_dataset(Path(local), split)
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".json":
        return _read_json_array(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        with path.open("rb") as file:
            return pq.read_table(file).to_pylist()
    raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json, .parquet, a "
                    f"save_to_disk directory or '{TFDS_PREFIX}NAME'.")


def _read_jsonl(path) -> Rows:
    rows, line_numbers = [], []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {line_number} is not valid JSON ({e.msg}, column "
                                f"{e.colno}); every line of a .jsonl file must be one JSON object.") from None
            line_numbers.append(line_number)
    return Rows(rows, line_numbers)


def _read_json_array(path) -> list:
    """The rows of a .json file: one JSON array (of objects; `data` checks each row)."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno}); a .json source is one "
                        "JSON array of rows (use .jsonl for one object per line).") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: holds a JSON {type(rows).__name__}, not an array of rows; a .json source is one "
                        "JSON array of rows (use .jsonl for one object per line).")
    return rows


def read_row_ids(path) -> list[tuple[str, object]]:
    """The ids of a row-id file (module docstring), in its order, each with where it is ("line N" of a
    text file, "entry N" of a .json list, counting from 1)."""
    path = storage.location(path)
    if not path.exists():
        raise FileNotFoundError(f"data.row_ids: {path} not found; point it at a file of row ids (one a line, or "
                                "a .json list)")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            ids = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"data.row_ids: {path} is not valid JSON ({e.msg}, line {e.lineno}); a .json row-id "
                            "file holds one list of ids") from None
        if not isinstance(ids, list) or not all(isinstance(i, (str, int)) and not isinstance(i, bool) for i in ids):
            raise DataError(f"data.row_ids: {path} must hold one JSON list of ids (strings or integers)")
        entries = [(f"entry {n}", value) for n, value in enumerate(ids, start=1)]
    else:
        entries = [(f"line {n}", line.strip()) for n, line in enumerate(text.splitlines(), start=1)
                   if line.strip() and not line.lstrip().startswith("#")]
    if not entries:
        raise DataError(f"data.row_ids: {path} lists no row ids")
    return entries


def select_rows(rows: list, ids_path, field: str | None, source: str) -> list[int]:
    """The positions in `rows` (read from `source`) of the rows the ids in `ids_path` pick, in
    the file's order (module docstring). A DataError names the file, the line and the id."""
    path = storage.location(ids_path)
    entries = read_row_ids(path)
    if field is None:
        keys = [_position(path, place, value, len(rows), source) for place, value in entries]
    else:
        keys = [str(value) for _, value in entries]
    first: dict = {}
    for (place, _), key in zip(entries, keys):
        if key in first:
            raise DataError(f"data.row_ids: {path}: {place} repeats the id {key!r} of its {first[key]}; list each "
                            "row once")
        first[key] = place
    if field is None:
        return keys
    by_value: dict[str, list[int]] = {}
    for position, row in enumerate(rows):
        if isinstance(row, dict) and row.get(field) is not None:
            by_value.setdefault(str(row[field]), []).append(position)
    if not by_value:
        raise DataError(f"data.row_id_field: no row of {source} has a `{field}` field; name a field the rows have, "
                        "or set data.row_id_field=null to list row positions")
    missing = [(place, key) for (place, _), key in zip(entries, keys) if key not in by_value]
    if missing:
        place, key = missing[0]
        raise DataError(f"data.row_ids: {path}: {place}: no row of {source} has {field} = {key!r} "
                        f"({len(missing)} of {len(entries)} ids missing); fix the id, the source or data.row_id_field")
    return [position for key in keys for position in by_value[key]]


def _position(path, place: str, value, count: int, source: str) -> int:
    """A row id read as a row position: an integer in [0, count)."""
    text = str(value).strip()
    if not text.isdigit():
        raise DataError(f"data.row_ids: {path}: {place}: {text!r} is not a row position (an integer from 0); set "
                        "data.row_id_field to the row field these ids are values of")
    if int(text) >= count:
        raise DataError(f"data.row_ids: {path}: {place}: row {int(text)} is not in {source}, which has {count} rows "
                        "(counted from 0); fix the id or the source")
    return int(text)


def _read_saved_dataset(path: Path, split: str | None) -> list[dict]:
    import datasets

    if (path / "dataset_dict.json").exists():
        dataset_dict = datasets.load_from_disk(str(path))
        splits = sorted(dataset_dict)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in dataset_dict:
            raise DataError(f"{path}: a DatasetDict with splits {splits}; pass split= one of them "
                            f"(got {split!r}).")
        return dataset_dict[split].to_list()
    if (path / "state.json").exists():
        return datasets.load_from_disk(str(path)).to_list()
    raise DataError(f"{path}: a directory, but not one written by datasets' save_to_disk (no "
                    "dataset_dict.json or state.json); pass a .jsonl or .parquet file instead.")


def _read_tfds(name: str, *, split: str, data_dir: str | os.PathLike | None) -> list[dict]:
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ImportError(f"reading '{TFDS_PREFIX}{name}' needs tensorflow-datasets and array_record: "
                          "pip install 'spacejax[tfds]'") from None
    try:
        source = tfds.data_source(name, split=split, data_dir=None if data_dir is None else str(data_dir))
    except tfds.core.DatasetNotFoundError:
        raise FileNotFoundError(
            f"{TFDS_PREFIX}{name}: no prepared TFDS dataset {name!r} in data_dir={data_dir}; prepare "
            "it with builder.download_and_prepare(file_format='array_record') or fix data_dir.") from None
    rows, chunk = [], 1024
    for start in range(0, len(source), chunk):
        keys = list(range(start, min(start + chunk, len(source))))
        rows += [_from_tfds_record(record) for record in source.__getitems__(keys)]
    return rows


def _plain(value: Any) -> Any:
    """numpy / bytes values of a TFDS record -> plain Python (str, int, float, list, dict)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value] if value.dtype.kind in "OSU" else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _from_tfds_record(record: dict) -> dict:
    row = _plain(record)
    for field in _JSON_FIELDS:
        value = row.get(field)
        if isinstance(value, str):  # a JSON-encoded list of turns, or (prompt, chosen, rejected) plain text
            try:
                decoded = json.loads(value)
            except json.JSONDecodeError:
                continue  # text, or a damaged list: data.tokenize_row reads it or reports the row
            if isinstance(decoded, list) and all(isinstance(turn, dict) for turn in decoded):
                row[field] = decoded
        elif isinstance(value, dict) and set(value) == {"role", "content"}:  # Sequence of dicts
            row[field] = [{"role": r, "content": c} for r, c in zip(value["role"], value["content"])]
    return row
