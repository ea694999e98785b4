r"""
What an output directory already holds, so that a rerun skips it.

A result file is complete or absent (see :mod:`~captum_gim.datasets.writing`), so
the ids of the existing ``part-*`` files are exactly the rows already explained;
temporary files left by a killed run are removed by the shard that wrote them.
"""

from __future__ import annotations

import json
from pathlib import Path

from captum_gim.datasets.writing import CHUNK

__all__ = ["chunk_files", "next_chunk", "remove_temporary", "written_ids"]


def chunk_files(out: Path) -> list[Path]:
    r"""
    Returns:
        *list[Path]*: The complete result files of ``out``, sorted by name.
    """
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if CHUNK.match(p.name))


def written_ids(out: Path) -> set[str]:
    r"""
    Returns:
        *set[str]*: The ids of every row written to ``out`` (by any shard).
    """
    ids: set[str] = set()
    for path in chunk_files(out):
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            ids.update(str(i) for i in pq.read_table(path, columns=["id"]).column("id").to_pylist())
        else:
            with path.open(encoding="utf-8") as file:
                ids.update(str(json.loads(line)["id"]) for line in file if line.strip())
    return ids


def next_chunk(out: Path, rank: int) -> int:
    r"""
    Returns:
        *int*: The number of the next chunk of shard ``rank``: one after its last.
    """
    numbers = [
        int(match["chunk"])
        for path in chunk_files(out)
        if (match := CHUNK.match(path.name)) and int(match["rank"]) == rank
    ]
    return max(numbers, default=-1) + 1


def remove_temporary(out: Path, rank: int) -> None:
    r"""Removes the temporary files that shard ``rank`` left when it was killed."""
    for path in out.glob(f".part-{rank:05d}-*.tmp"):
        path.unlink(missing_ok=True)
