r"""
:func:`attribute_dataset`: GIM attributions of every row of a dataset, batched by
length, written chunk by chunk, resumable, and sharded over the processes of
``torchrun`` or ``accelerate launch``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from captum_gim._messages import one_line
from captum_gim._quiet import quiet_transformers
from captum_gim.baselines import TokenBaseline, resolve_baseline
from captum_gim.config import GIMConfig
from captum_gim.datasets.batching import length_batches, run_splitting
from captum_gim.datasets.compute import Encoded, Explained, encode, explain_batch
from captum_gim.datasets.faithfulness import METRICS, baseline_token, row_metrics
from captum_gim.datasets.reading import DatasetError, Row, read_rows, rows_from_records
from captum_gim.datasets.resume import chunk_files, next_chunk, remove_temporary, written_ids
from captum_gim.datasets.sharding import Shard
from captum_gim.datasets.writing import (
    OUTPUT_FORMATS,
    chunk_name,
    has_pyarrow,
    write_chunk,
    write_json,
)
from captum_gim.explain import SCORES
from captum_gim.forwards import TASKS

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["attribute_dataset"]

LOG = logging.getLogger("captum_gim.datasets")
METADATA = "metadata.json"
#: The metadata entries that must match for a rerun to resume a directory.
#: (A directory written before baselines were recorded has the zero baseline, None.)
IDENTITY = (
    "model_config_sha256",
    "task",
    "score",
    "baseline_token_id",
    "gim",
    "metrics",
    "metrics_token",
)


def attribute_dataset(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: str | os.PathLike[str] | Iterable[Row | Mapping[str, Any]],
    out: str | os.PathLike[str],
    *,
    task: str = "generate",
    batch_size: int | None = None,
    max_tokens_per_batch: int = 4096,
    config: GIMConfig | None = None,
    score: str = "logit",
    baselines: str | int | None = None,
    resume: bool = True,
    metrics: Sequence[str] = (),
    metrics_token: str | None = None,
    format: str | None = None,
    chunk_size: int = 256,
    progress: bool | None = None,
    model_path: str | None = None,
    summary_wait: float = 600.0,
) -> Path:
    r"""
    GIM token attributions of every row of a dataset, written to ``out`` as a
    Parquet (or JSON Lines) dataset, one row per prompt.

    Each row equals :func:`captum_gim.explain.explain` of that prompt alone: rows
    are sorted into batches of similar length (padded on the right with an
    attention mask) within ``max_tokens_per_batch`` padded tokens; a batch that
    runs out of memory is split in halves and retried, down to single rows. A row
    that cannot be explained (no prompt, a target word the tokenizer does not
    know, a prompt longer than the model reads, an unknown label) gets its
    one-line ``error`` and the run goes on.

    Results are written every ``chunk_size`` rows, one file per process and chunk,
    each written atomically; ``metadata.json`` records the model, the settings and
    the versions. Running again with the same ``out`` skips the ids already
    written, also after a crash or ``kill -9``: nothing is lost or duplicated.

    Under ``torchrun`` or ``accelerate launch`` (the ``RANK`` and ``WORLD_SIZE``
    environment variables) every process explains the rows whose
    ``crc32(id) % WORLD_SIZE`` is its rank, with its own model replica; no process
    group is needed. Rank 0 writes the metadata and, once every row is written,
    ``summary.json`` and the HTML report (:func:`summarize`). A model too large for
    one device can be passed dispatched over several (loaded with
    ``device_map="auto"``): the inputs go where accelerate runs its input embeddings.

    Args:
        model (PreTrainedModel): A causal LM (``"generate"``), a sequence classifier
                    (``"classify"``) or an encoder (``"similarity"``), on its device
                    or dispatched over several with ``device_map``.
        tokenizer (PreTrainedTokenizerBase): Its tokenizer.
        rows (str, PathLike or Iterable): A ``.jsonl``, ``.csv`` or ``.parquet``
                    file or a saved ``datasets`` directory (columns ``id``,
                    ``prompt``, ``target``, ``query``; see :func:`read_rows`), or
                    the rows themselves (:class:`Row` objects or mappings with
                    those keys).
        out (str or PathLike): The output directory (created if needed).
        task (str, optional): ``"generate"``, ``"classify"`` or ``"similarity"``.
                    Default: ``"generate"``
        batch_size (int, optional): Largest number of rows per batch; None leaves
                    it to the token budget.
                    Default: None
        max_tokens_per_batch (int, optional): Largest ``rows x longest row`` of a
                    batch.
                    Default: 4096
        config (GIMConfig, optional): The GIM settings; None means the defaults.
                    Default: None
        score (str, optional): ``"logit"`` or ``"log-prob"`` of each target token or
                    label (not used for ``"similarity"``).
                    Default: ``"logit"``
        baselines (str or int, optional): What each prompt token is compared with,
                    as in :func:`~captum_gim.explain.explain`: ``"zero"``,
                    ``"mask"``, ``"pad"``, a token of the vocabulary or a token id;
                    None is the task's default
                    (:data:`captum_gim.baselines.DEFAULT_BASELINES`, ``"zero"``).
                    Recorded in ``metadata.json``; an ``out`` written with another
                    baseline is refused.
                    Default: None
        resume (bool, optional): Skip the ids already in ``out``; with False an
                    ``out`` holding results is refused.
                    Default: True
        metrics (Sequence[str], optional): ``"comprehensiveness"`` and/or
                    ``"sufficiency"`` of every row (:mod:`captum_gim.metrics`).
                    Default: ()
        metrics_token (str, optional): The token that replaces removed
                    tokens in the metrics; None means the tokenizer's mask, pad or
                    unknown token.
                    Default: None
        format (str, optional): ``"parquet"`` or ``"jsonl"``; None means Parquet
                    when pyarrow is installed, else JSON Lines.
                    Default: None
        chunk_size (int, optional): Rows per written file.
                    Default: 256
        progress (bool, optional): Show a progress bar; None shows one when
                    stderr is a terminal.
                    Default: None
        model_path (str, optional): The model's directory, for the metadata;
                    None means ``model.name_or_path``.
                    Default: None
        summary_wait (float, optional): How long rank 0 waits for a new file of
                    the other processes before it gives up on the summary.
                    Default: 600.0

    Returns:
        *Path*:
        - **out**: The output directory; read it with :func:`load_results`.

    Raises:
        DatasetError: With one line, before anything is computed, for an
                    unreadable input, an output directory holding the results of
                    other settings, or results with ``resume=False``.
        ValueError: With one line, before anything is computed, for an unknown
                    task, score, metric or format, or a baseline the tokenizer
                    does not have.

    Examples::

        >>> from captum_gim import attribute_dataset, load_results
        >>> from captum_gim.models import load_model
        >>> model, tokenizer = load_model()
        >>> rows = [{"prompt": "the good movie ?"}, {"prompt": "a dull film ?"}]
        >>> out = attribute_dataset(model, tokenizer, rows, "results")
        >>> load_results(out)[["id", "value", "error"]]  # doctest: +SKIP
    """
    settings = _Settings(
        task=task,
        score=score,
        config=config or GIMConfig(),
        metrics=tuple(metrics),
        metrics_token=metrics_token,
        format=_check_options(task, score, metrics, format, chunk_size, max_tokens_per_batch),
        chunk_size=chunk_size,
        batch_size=batch_size,
        max_tokens_per_batch=max_tokens_per_batch,
        baseline=resolve_baseline(tokenizer, baselines, task),
    )
    table = _rows(rows)
    shard = Shard.from_environment()
    baseline_id = baseline_token(tokenizer, metrics_token) if metrics else 0
    out = Path(out)
    _prepare_out(out, _metadata(model, settings, model_path, shard), resume, shard)
    done = written_ids(out)
    mine = [row for row in table if shard.owns(row.id) and row.id not in done]
    LOG.info(
        "rank %d/%d: %d rows to explain (%d of this shard already written)",
        shard.rank,
        shard.world_size,
        len(mine),
        sum(1 for r in table if shard.owns(r.id) and r.id in done),
    )
    worker = _Worker(model, tokenizer, out, shard, settings, baseline_id)
    worker.start(len(mine), progress)
    encoded: list[Encoded] = []
    with quiet_transformers():  # one block: the tokenizer's length warnings are checked here
        for row in mine:
            try:
                encoded.append(encode(row, tokenizer, model, task))
            except ValueError as error:
                worker.add([_failed(row, one_line(error), metrics)])
    lengths = [e.length for e in encoded]
    try:
        for batch in length_batches(encoded, lengths, max_tokens_per_batch, batch_size):
            worker.add(run_splitting(batch, worker.compute, worker.failed))
    finally:  # Ctrl-C or a model-wide error: the finished rows are written all the same
        worker.finish()
    if shard.rank == 0:
        _summarize_when_complete(out, {row.id for row in table}, summary_wait)
    return out


@dataclass(frozen=True)
class _Settings:
    """What a run computes and how it writes it."""

    task: str
    score: str
    config: GIMConfig
    metrics: tuple[str, ...]
    metrics_token: str | None
    format: str
    chunk_size: int
    batch_size: int | None
    max_tokens_per_batch: int
    baseline: TokenBaseline


class _Worker:
    """Explains batches, writes them in chunks, and reports progress."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        out: Path,
        shard: Shard,
        settings: _Settings,
        baseline_id: int,
    ) -> None:
        self.model, self.tokenizer, self.out, self.shard = model, tokenizer, out, shard
        self.settings, self.baseline_id = settings, baseline_id
        self.chunk = next_chunk(out, shard.rank)
        self.pending: list[dict[str, Any]] = []
        self.rows = self.errors = self.tokens = 0
        self.began = time.perf_counter()
        self.bar: Any = None

    def start(self, total: int, progress: bool | None) -> None:
        """Starts the clock and, on a terminal (or when asked), a progress bar."""
        self.began = time.perf_counter()
        if sys.stderr.isatty() if progress is None else progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total,
                desc=f"rank {self.shard.rank}",
                unit="row",
                position=self.shard.rank,
                file=sys.stderr,
                dynamic_ncols=True,
            )

    def compute(self, batch: Sequence[Encoded]) -> list[dict[str, Any]]:
        """The records of a batch (raises for the whole batch)."""
        s = self.settings
        explained = explain_batch(
            self.model,
            self.tokenizer,
            batch,
            task=s.task,
            score=s.score,
            config=s.config,
            baseline=s.baseline,
        )
        return [self._record(e) for e in explained]

    def failed(self, encoded: Encoded, message: str) -> dict[str, Any]:
        """The record of a row that failed alone."""
        return _failed(encoded.row, message, self.settings.metrics)

    def _record(self, explained: Explained) -> dict[str, Any]:
        e, encoded = explained.explanation, explained.encoded
        record: dict[str, Any] = {
            "id": encoded.row.id,
            "prompt": encoded.row.prompt,
            "tokens": e.prompt_tokens,
            "token_ids": encoded.prompt_ids,
            "target": e.target_text,
            "target_tokens": e.target_tokens,
            "target_ids": e.target_ids,
            "scores": e.token_scores.tolist(),
            "value": explained.value,
            "error": None,
        }
        names = self.settings.metrics
        if names:
            try:
                record.update(
                    row_metrics(self.model, explained, names, self.baseline_id, self.settings.score)
                )
            except (ValueError, RuntimeError) as error:
                LOG.warning("row %s: metrics not computed: %s", encoded.row.id, one_line(error))
                record.update({name: math.nan for name in names})
        self.tokens += encoded.length
        return record

    def add(self, records: list[dict[str, Any]]) -> None:
        """Counts finished records and writes every full chunk."""
        self.pending.extend(records)
        self.rows += len(records)
        self.errors += sum(r["error"] is not None for r in records)
        if self.bar is not None:
            self.bar.update(len(records))
            self.bar.set_postfix(tokens_per_s=f"{self.tokens / self._seconds():.0f}")
        size = self.settings.chunk_size
        while len(self.pending) >= size:
            self._write(self.pending[:size])
            self.pending = self.pending[size:]

    def _seconds(self) -> float:
        return max(time.perf_counter() - self.began, 1e-9)

    def _write(self, records: list[dict[str, Any]]) -> None:
        path = self.out / chunk_name(self.shard.rank, self.chunk, self.settings.format)
        write_chunk(path, records, self.settings.metrics)
        self.chunk += 1
        LOG.info(
            "rank %d: wrote %s (%d rows, %d errors); %d rows done, %.1f prompts/s, %.0f tokens/s",
            self.shard.rank,
            path.name,
            len(records),
            sum(r["error"] is not None for r in records),
            self.rows,
            self.rows / self._seconds(),
            self.tokens / self._seconds(),
        )

    def finish(self) -> None:
        """Writes the last chunk and this process's figures (``rank-NNNNN.json``)."""
        if self.pending:
            self._write(self.pending)
            self.pending = []
        if self.bar is not None:
            self.bar.close()
        seconds = self._seconds()
        figures = {
            "rank": self.shard.rank,
            "world_size": self.shard.world_size,
            "rows": self.rows,
            "errors": self.errors,
            "tokens": self.tokens,
            "seconds": seconds,
            "prompts_per_s": self.rows / seconds,
            "tokens_per_s": self.tokens / seconds,
        }
        write_json(self.out / f"rank-{self.shard.rank:05d}.json", figures)


def _failed(row: Row, message: str, metrics: Sequence[str]) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": row.id,
        "prompt": row.prompt,
        "tokens": [],
        "token_ids": [],
        "target": None if row.target is None else str(row.target),
        "target_tokens": [],
        "target_ids": [],
        "scores": [],
        "value": None,
        "error": message,
    }
    record.update({name: None for name in metrics})
    return record


def _check_options(
    task: str,
    score: str,
    metrics: Sequence[str],
    format: str | None,
    chunk_size: int,
    max_tokens_per_batch: int,
) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}.")
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; the metrics are {', '.join(METRICS)}.")
    if chunk_size < 1 or max_tokens_per_batch < 1:
        raise ValueError("chunk_size and max_tokens_per_batch must be >= 1.")
    if format is None:
        format = "parquet" if has_pyarrow() else "jsonl"
    if format not in OUTPUT_FORMATS:
        raise ValueError(f"format must be one of {OUTPUT_FORMATS}, got {format!r}.")
    if format == "parquet" and not has_pyarrow():
        raise DatasetError(
            "Parquet output needs pyarrow: pip install 'captum_gim[datasets]', "
            "or use --format jsonl"
        )
    return format


def _rows(rows: Any) -> list[Row]:
    if isinstance(rows, (str, os.PathLike)):
        return read_rows(rows)
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # a pandas DataFrame
        rows = rows.to_dict("records")
    rows = list(rows)
    if all(isinstance(r, Row) for r in rows):
        return rows
    return rows_from_records(rows)


def _metadata(
    model: PreTrainedModel, settings: _Settings, model_path: str | None, shard: Shard
) -> dict[str, Any]:
    import captum
    import transformers

    import captum_gim

    fields = model.config.to_dict() if hasattr(model, "config") else {}
    # where the model was loaded from, and by which version, is not what it computes
    fields = {k: v for k, v in fields.items() if not k.startswith("_")}
    fields.pop("transformers_version", None)
    model_config = json.dumps(fields, sort_keys=True, default=str)
    return {
        "model": model_path or str(getattr(model, "name_or_path", type(model).__name__)),
        "model_class": type(model).__name__,
        "model_config_sha256": hashlib.sha256(model_config.encode("utf-8")).hexdigest(),
        "task": settings.task,
        "score": "cosine similarity" if settings.task == "similarity" else settings.score,
        "baseline": settings.baseline.describe(),
        "baseline_token_id": settings.baseline.token_id,
        "gim": asdict(settings.config),
        "metrics": list(settings.metrics),
        "metrics_token": settings.metrics_token,
        "format": settings.format,
        "world_size": shard.world_size,
        "max_tokens_per_batch": settings.max_tokens_per_batch,
        "batch_size": settings.batch_size,
        "device_map": _device_map(model),
        "versions": {
            "captum_gim": captum_gim.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "captum": captum.__version__,
            "python": sys.version.split()[0],
        },
        "command": sys.argv,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _device_map(model: PreTrainedModel) -> dict[str, str] | None:
    """The modules' devices of a model dispatched with ``device_map``, else None."""
    device_map = getattr(model, "hf_device_map", None)
    return {str(k): str(v) for k, v in device_map.items()} if device_map else None


def _prepare_out(out: Path, metadata: dict[str, Any], resume: bool, shard: Shard) -> None:
    if out.exists() and not out.is_dir():
        raise DatasetError(f"--out {str(out)!r} is a file; pass a directory")
    if not resume and chunk_files(out):
        raise DatasetError(
            f"{str(out)!r} already holds results; rerun with resume to continue, or use a new --out"
        )
    path = out / METADATA
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise DatasetError(f"cannot read {str(path)!r}: {one_line(error)}") from error
        changed = [key for key in IDENTITY if old.get(key) != metadata.get(key)]
        # the baseline by its description: "mask" and "[MASK]" are the same token
        shown = {"baseline_token_id": ("baseline", old.get("baseline", "zero baseline"))}
        named = [shown.get(key, (key, old.get(key))) for key in changed]
        if changed:
            raise DatasetError(
                f"{str(out)!r} holds results with other {', '.join(k for k, _ in named)} "
                f"({', '.join(f'{k}={v!r}' for k, v in named)}); use a new --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    if shard.rank == 0 and not path.is_file():
        write_json(path, metadata)
    remove_temporary(out, shard.rank)


def _summarize_when_complete(out: Path, ids: set[str], wait: float) -> None:
    from captum_gim.datasets.summary import summarize

    last_files, last_change = len(chunk_files(out)), time.monotonic()
    while not ids <= written_ids(out):
        files = len(chunk_files(out))
        if files != last_files:
            last_files, last_change = files, time.monotonic()
        if time.monotonic() - last_change > wait:
            LOG.warning(
                "rank 0: %d rows of other processes are not written after %.0f s without a "
                "new file; no summary (run `captum-gim summarize %s` when they are)",
                len(ids - written_ids(out)),
                wait,
                out,
            )
            return
        time.sleep(0.5)
    summary = summarize(out)
    LOG.info(
        "rank 0: %d rows, %d errors; wrote %s",
        summary["rows"],
        summary["errors"],
        out / "summary.json",
    )
