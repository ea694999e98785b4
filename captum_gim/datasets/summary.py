r"""
Reading a results directory back: :func:`load_results` (a pandas DataFrame) and
:func:`summarize` (per-dataset figures in ``summary.json`` and an HTML report with
one coloured line per example, in pages).
"""

from __future__ import annotations

import html
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from captum_gim.datasets.reading import DatasetError
from captum_gim.datasets.resume import chunk_files
from captum_gim.datasets.writing import METRIC_COLUMNS, write_json

__all__ = ["load_results", "summarize"]

#: How many tokens ``top_tokens`` lists.
TOP_TOKENS = 10
#: The fewest occurrences of a token in ``top_tokens``: a mean over fewer says little.
MIN_COUNT = 5


def load_results(out: str | os.PathLike[str]) -> Any:
    r"""
    The results of :func:`attribute_dataset` as one pandas DataFrame.

    Args:
        out (str or PathLike): The output directory of a run.

    Returns:
        *pandas.DataFrame*: One row per prompt (sorted by id), with the columns
        ``id``, ``prompt``, ``tokens``, ``token_ids``, ``target``, ``target_tokens``,
        ``target_ids``, ``scores`` (one list per target token), ``value``, ``error``
        and the metrics asked for.

    Raises:
        DatasetError: When ``out`` holds no results.

    Examples::

        >>> from captum_gim import load_results
        >>> frame = load_results("results")  # doctest: +SKIP
        >>> frame[frame.error.isna()].value.mean()  # doctest: +SKIP
    """
    import pandas as pd

    records = _records(Path(out))
    frame = pd.DataFrame.from_records(records)
    return frame.sort_values("id", key=_id_key).reset_index(drop=True)


def _id_key(ids: Any) -> Any:
    """Numeric ids in numeric order, others as text."""
    return ids.map(lambda i: (0, int(i), "") if str(i).isdigit() else (1, 0, str(i)))


def _records(out: Path) -> list[dict[str, Any]]:
    files = chunk_files(out)
    if not files:
        raise DatasetError(
            f"{str(out)!r} holds no results (part-*.parquet or part-*.jsonl); pass the --out "
            "directory of captum-gim attribute-dataset"
        )
    records: list[dict[str, Any]] = []
    for path in files:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            records.extend(pq.read_table(path).to_pylist())
        else:
            with path.open(encoding="utf-8") as file:
                records.extend(json.loads(line) for line in file if line.strip())
    return records


def summarize(
    out: str | os.PathLike[str], *, page_size: int = 50, min_count: int = MIN_COUNT
) -> dict[str, Any]:
    r"""
    Per-dataset figures of a results directory, written to ``summary.json``, and an
    HTML report: ``report.html`` (the figures and the first page) and
    ``report-2.html``, ... with ``page_size`` examples each, one coloured line per
    example (the attributions summed over the target tokens).

    Args:
        out (str or PathLike): The output directory of a run.
        page_size (int, optional): Examples per page of the report.
                    Default: 50
        min_count (int, optional): The fewest occurrences (over the rows without
                    error) of a token listed in ``top_tokens``, so that a token seen
                    once with a large score does not top the list; 1 lists every
                    token.
                    Default: 5

    Returns:
        *dict*: ``rows``, ``errors``, ``mean_value`` (over the rows without error),
        ``top_tokens`` (the ten tokens with the largest mean attribution over
        their occurrences, among those seen at least ``min_count`` times, with
        their count), ``top_tokens_min_count``, the mean of each metric, throughput figures
        of the processes, and ``report`` (the first page).

    Examples::

        >>> from captum_gim.datasets import summarize
        >>> summarize("results")["errors"]  # doctest: +SKIP
        0
    """
    from captum_gim.visualization import token_lines_html

    if min_count < 1 or page_size < 1:
        raise ValueError(f"min_count and page_size must be >= 1, got {min_count} and {page_size}.")
    out = Path(out)
    records = sorted(_records(out), key=lambda r: _id_key_one(r["id"]))
    good = [r for r in records if r.get("error") is None]
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for record in good:
        for token, value in zip(record["tokens"], _summed(record["scores"])):
            sums[token] += value
            counts[token] += 1
    means = sorted(((sums[t] / counts[t], t) for t in sums if counts[t] >= min_count), reverse=True)
    summary: dict[str, Any] = {
        "rows": len(records),
        "errors": len(records) - len(good),
        "mean_value": _mean([r["value"] for r in good]),
        "top_tokens": [
            {"token": t, "mean_attribution": m, "count": counts[t]} for m, t in means[:TOP_TOKENS]
        ],
        "top_tokens_min_count": min_count,
    }
    for name in METRIC_COLUMNS:
        if any(name in r for r in records):
            summary[f"mean_{name}"] = _mean([r.get(name) for r in good])
    summary["throughput"] = _throughput(out)
    pages = max(1, math.ceil(len(records) / page_size))
    names = ["report.html", *(f"report-{p}.html" for p in range(2, pages + 1))]
    for page, name in enumerate(names):
        chunk = records[page * page_size : (page + 1) * page_size]
        header = (_figures_html(summary) if page == 0 else "") + _pager(names, page)
        examples = [_example(record) for record in chunk if record.get("error") is None]
        errors = [r for r in chunk if r.get("error") is not None]
        if errors:
            header += (
                "<ul>"
                + "".join(
                    f"<li>{html.escape(str(r['id']))}: error: {html.escape(str(r['error']))}</li>"
                    for r in errors
                )
                + "</ul>"
            )
        page_html = token_lines_html(examples, title=f"GIM attributions: {out.name}", header=header)
        (out / name).write_text(page_html, encoding="utf-8")
    summary["report"] = str(out / "report.html")
    write_json(out / "summary.json", summary)
    return summary


def _id_key_one(row_id: Any) -> tuple[int, int, str]:
    text = str(row_id)
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def _summed(scores: list[list[float]]) -> list[float]:
    return [sum(column) for column in zip(*scores)] if scores else []


def _mean(values: list[Any]) -> float | None:
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(finite) / len(finite) if finite else None


def _throughput(out: Path) -> dict[str, Any]:
    ranks = []
    for path in sorted(out.glob("rank-*.json")):
        try:
            ranks.append(json.loads(path.read_text(encoding="utf-8")))
        except ValueError:
            continue
    if not ranks:
        return {}
    seconds = max(r["seconds"] for r in ranks)
    rows = sum(r["rows"] for r in ranks)
    tokens = sum(r["tokens"] for r in ranks)
    return {
        "processes": len(ranks),
        "seconds": seconds,
        "prompts_per_s": rows / seconds if seconds else None,
        "tokens_per_s": tokens / seconds if seconds else None,
    }


def _example(record: dict[str, Any]) -> tuple[str, list[str], list[float]]:
    """One example's coloured line: its label, tokens and summed scores."""
    label = f"{record['id']} → {record.get('target')!s} ({record['value']:+.4g})"
    return label, list(record["tokens"]), _summed(record["scores"])


def _figures_html(summary: dict[str, Any]) -> str:
    lines = [
        f"<li>{html.escape(k)}: {html.escape(str(v))}</li>"
        for k, v in summary.items()
        if k not in ("top_tokens", "throughput")
    ]
    tokens = ", ".join(
        f"{html.escape(repr(t['token']))} ({t['mean_attribution']:+.3g}, n={t['count']})"
        for t in summary["top_tokens"]
    )
    lines.append(
        "<li>tokens with the largest mean attribution (seen at least "
        f"{summary['top_tokens_min_count']} times): {tokens or 'none'}</li>"
    )
    return f"<ul>{''.join(lines)}</ul>"


def _pager(names: list[str], page: int) -> str:
    if len(names) == 1:
        return ""
    links = [
        f"<b>{i + 1}</b>" if i == page else f'<a href="{name}">{i + 1}</a>'
        for i, name in enumerate(names)
    ]
    return f'<p class="legend">pages: {" ".join(links)}</p>'
