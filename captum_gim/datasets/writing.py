r"""
Writing results: one file per shard and chunk, each written atomically (to a
temporary name in the same directory, flushed to disk, then renamed with
``os.replace``), so a file is complete or absent, also after ``kill -9``.

Parquet (with pyarrow, the ``captum_gim[datasets]`` extra) or JSON Lines, one row
per prompt with the columns of :data:`COLUMNS`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["COLUMNS", "OUTPUT_FORMATS", "chunk_name", "has_pyarrow", "write_chunk", "write_json"]

#: The output formats.
OUTPUT_FORMATS = ("parquet", "jsonl")
#: The columns of every result file (and their pyarrow types).
COLUMNS = {
    "id": "string",
    "prompt": "string",
    "tokens": "list<string>",
    "token_ids": "list<int64>",
    "target": "string",
    "target_tokens": "list<string>",
    "target_ids": "list<int64>",
    "scores": "list<list<float32>>",
    "value": "float64",
    "error": "string",
}
#: The columns of the faithfulness metrics, when asked for.
METRIC_COLUMNS = ("comprehensiveness", "sufficiency")
CHUNK = re.compile(r"^part-(?P<rank>\d{5})-(?P<chunk>\d{6})\.(?P<format>parquet|jsonl)$")


def has_pyarrow() -> bool:
    """Whether pyarrow can be imported (Parquet output)."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def chunk_name(rank: int, chunk: int, format: str) -> str:
    r"""
    Returns:
        *str*: The file name of chunk ``chunk`` of shard ``rank``, e.g.
        ``part-00001-000003.parquet``.
    """
    return f"part-{rank:05d}-{chunk:06d}.{format}"


def write_chunk(
    path: Path, records: Sequence[Mapping[str, Any]], metrics: Sequence[str] = ()
) -> None:
    r"""
    Writes result records to ``path`` atomically (Parquet or JSON Lines, by suffix).

    Args:
        path (Path): The file to write.
        records (Sequence[Mapping]): One mapping per row with the keys of
                    :data:`COLUMNS` (and of ``metrics``).
        metrics (Sequence[str], optional): The metric columns to write.
                    Default: ()
    """
    temporary = path.with_name(f".{path.name}.tmp")
    columns = [*COLUMNS, *metrics]
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        types = {
            "string": pa.string(),
            "float64": pa.float64(),
            "list<string>": pa.list_(pa.string()),
            "list<int64>": pa.list_(pa.int64()),
            "list<list<float32>>": pa.list_(pa.list_(pa.float32())),
        }
        schema = pa.schema([(name, types[COLUMNS.get(name, "float64")]) for name in columns])
        table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in records], schema)
        with temporary.open("wb") as file:
            pq.write_table(table, file)
            file.flush()
            os.fsync(file.fileno())
    else:
        with temporary.open("w", encoding="utf-8") as file:
            for record in records:
                file.write(json.dumps({c: record.get(c) for c in columns}) + "\n")
            file.flush()
            os.fsync(file.fileno())
    os.replace(temporary, path)


def write_json(path: Path, content: Mapping[str, Any]) -> None:
    r"""Writes ``content`` as indented JSON to ``path`` atomically."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(content, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(temporary, path)
