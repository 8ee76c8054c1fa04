"""Row files: read every row of a source offline, as plain Python dicts (``read_rows``).

Sources, all read offline:
    "path/to/file.jsonl"     one JSON object per line (blank lines ignored)
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
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from spacejax import storage

TFDS_PREFIX = "tfds:"
_JSON_FIELDS = ("messages", "real", "generated")


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
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        with path.open("rb") as file:
            return pq.read_table(file).to_pylist()
    raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .parquet, a "
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
        if isinstance(value, str):  # a JSON-encoded list of turns
            try:
                row[field] = json.loads(value)
            except json.JSONDecodeError:
                pass  # left as a string: data.tokenize_row reports it as a bad row
        elif isinstance(value, dict) and set(value) == {"role", "content"}:  # Sequence of dicts
            row[field] = [{"role": r, "content": c} for r, c in zip(value["role"], value["content"])]
    return row
