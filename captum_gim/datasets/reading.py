r"""
Reading the rows of a dataset to explain: JSON Lines, CSV or Parquet files, or a
local Hugging Face ``datasets`` directory (written by ``save_to_disk``).

Every problem with the file itself (missing, unreadable, no prompt column, the same
id twice) raises :class:`DatasetError` with one line naming the fix, before any
model is loaded; a problem of one row (no prompt) is left for that row's ``error``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captum_gim._messages import one_line

__all__ = ["FORMATS", "DatasetError", "Row", "read_rows", "rows_from_records"]

#: The input formats, by the suffix that selects them.
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}


class DatasetError(ValueError):
    """A problem with the input file or the output directory, on one line."""


@dataclass(frozen=True)
class Row:
    r"""
    One row to explain.

    Attributes:
        id (str): The row's id (its row number when the data has no id column).
        prompt (str or None): The text to explain; None when the row has none.
        target (Any): A word or continuation, a label (name or index), a list of
                    token ids, or None for the model's own prediction.
        query (str or None): The query text, for ``task="similarity"``.
    """

    id: str
    prompt: str | None
    target: Any = None
    query: str | None = None


def read_rows(
    path: str | os.PathLike[str],
    *,
    prompt_column: str = "prompt",
    target_column: str = "target",
    id_column: str = "id",
    query_column: str = "query",
    split: str | None = None,
) -> list[Row]:
    r"""
    Reads the rows of a dataset file or directory.

    Args:
        path (str or Path): A ``.jsonl`` / ``.json`` (one object per line, or a
                    ``.json`` array of objects), ``.csv``
                    or ``.parquet`` file, or a directory saved by
                    ``datasets.Dataset.save_to_disk``.
        prompt_column (str, optional): The column of the prompts (required).
                    Default: ``"prompt"``
        target_column (str, optional): The column of the targets; a missing column
                    or an empty cell means the model's own prediction.
                    Default: ``"target"``
        id_column (str, optional): The column of the ids; without it the row
                    number is the id.
                    Default: ``"id"``
        query_column (str, optional): The column of the queries (similarity).
                    Default: ``"query"``
        split (str, optional): The split of a ``DatasetDict`` directory; needed
                    when it has several.
                    Default: None

    Returns:
        *list[Row]*: The rows, in file order.

    Raises:
        DatasetError: For a missing or unreadable file, an unknown format, no
                    prompt column, or an id that appears twice.

    Examples::

        >>> from captum_gim.datasets.reading import read_rows
        >>> rows = read_rows("prompts.jsonl")  # doctest: +SKIP
    """
    path = Path(path)
    records: list[dict[str, Any]]
    columns: list[str] | None
    if not path.exists():
        raise DatasetError(
            f"input {str(path)!r} does not exist; pass a .jsonl, .csv or .parquet file"
        )
    if path.is_dir():
        records, columns = _read_hf_directory(path, split)
    else:
        kind = FORMATS.get(path.suffix.lower())
        if kind is None:
            raise DatasetError(
                f"cannot read {str(path)!r}: unknown suffix {path.suffix!r}; use one of "
                f"{', '.join(FORMATS)} or a directory saved with datasets' save_to_disk"
            )
        try:
            records, columns = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}[
                kind
            ](path)
        except DatasetError:
            raise
        except Exception as error:  # any failure here is a problem of the file
            raise DatasetError(f"cannot read {str(path)!r}: {one_line(error)}") from error
    return rows_from_records(
        records,
        columns,
        source=str(path),
        prompt_column=prompt_column,
        target_column=target_column,
        id_column=id_column,
        query_column=query_column,
    )


def rows_from_records(
    records: Iterable[Mapping[str, Any]],
    columns: Iterable[str] | None = None,
    *,
    source: str = "the rows",
    prompt_column: str = "prompt",
    target_column: str = "target",
    id_column: str = "id",
    query_column: str = "query",
) -> list[Row]:
    r"""
    Rows from mappings (dicts, a pandas DataFrame's records, a ``datasets.Dataset``),
    with the columns and the checks of :func:`read_rows`.

    Returns:
        *list[Row]*: The rows, in order.
    """
    records = list(records)
    names = set(columns) if columns is not None else {k for r in records for k in r}
    if records and prompt_column not in names:
        raise DatasetError(
            f"{source} has no column {prompt_column!r} (columns: {', '.join(sorted(names))}); "
            "name the prompt column with --prompt-column"
        )
    rows = []
    seen: dict[str, int] = {}
    for number, record in enumerate(records):
        raw_id = record.get(id_column) if id_column in names else None
        row_id = str(number) if _missing(raw_id) else str(raw_id)
        if row_id in seen:
            raise DatasetError(
                f"{source}: rows {seen[row_id]} and {number} have the same id {row_id!r}; "
                "ids must be unique (or drop the id column to use row numbers)"
            )
        seen[row_id] = number
        prompt = record.get(prompt_column)
        target = record.get(target_column)
        query = record.get(query_column)
        rows.append(
            Row(
                id=row_id,
                prompt=None if _missing(prompt) else str(prompt),
                target=None if _missing(target) else _plain(target),
                query=None if _missing(query) else str(query),
            )
        )
    return rows


def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and value != value:  # NaN from pandas or pyarrow
        return True
    return isinstance(value, str) and value == ""


def _plain(value: Any) -> Any:
    """Numpy scalars and arrays as Python values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], None]:
    records = []
    if path.suffix.lower() == ".json" and path.read_text(encoding="utf-8").lstrip()[:1] == "[":
        rows = json.loads(path.read_text(encoding="utf-8"))  # one JSON array of objects
        if not all(isinstance(r, dict) for r in rows):
            raise DatasetError(f"{str(path)!r} is a JSON array of other things than objects")
        return rows, None
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise DatasetError(
                    f"{str(path)!r} line {number} is not JSON ({one_line(error)}); "
                    "write one JSON object per line"
                ) from error
            if not isinstance(record, dict):
                raise DatasetError(
                    f"{str(path)!r} line {number} is a {type(record).__name__}, not an "
                    'object; write one object per line, e.g. {"prompt": "..."}'
                )
            records.append(record)
    return records, None


def _read_csv(path: Path) -> tuple[list[dict[str, Any]], list[str] | None]:
    with path.open(encoding="utf-8", newline="") as file:
        reader = csv.DictReader(file)
        records = list(reader)
        return records, list(reader.fieldnames or [])


def _read_parquet(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as error:
        raise DatasetError(
            f"reading {str(path)!r} needs pyarrow: pip install 'captum_gim[datasets]'"
        ) from error
    table = pq.read_table(path)
    return table.to_pylist(), list(table.column_names)


def _read_hf_directory(path: Path, split: str | None) -> tuple[list[dict[str, Any]], list[str]]:
    try:
        import datasets
    except ImportError as error:
        raise DatasetError(
            f"{str(path)!r} is a directory: reading a saved Hugging Face dataset needs "
            "the datasets package (pip install datasets), or pass a .jsonl/.csv/.parquet file"
        ) from error
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # not a saved dataset, or damaged
        raise DatasetError(
            f"cannot read {str(path)!r} as a saved Hugging Face dataset: {one_line(error)}"
        ) from error
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in loaded:
            raise DatasetError(
                f"{str(path)!r} has the splits {', '.join(splits)}; choose one with --split"
            )
        loaded = loaded[split]
    return loaded.to_list(), list(loaded.column_names)
