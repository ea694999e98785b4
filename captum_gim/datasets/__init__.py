r"""
Attribution at dataset scale: :func:`attribute_dataset` explains every row of a
JSON Lines, CSV or Parquet file (or a saved ``datasets`` directory), batched by
length, written chunk by chunk, resumable after a crash, and sharded over the
processes of ``torchrun`` or ``accelerate launch``; :func:`load_results` and
:func:`summarize` read the results back.

One module per question:

* :mod:`~captum_gim.datasets.reading`: the input rows;
* :mod:`~captum_gim.datasets.sharding`: which rows this process explains;
* :mod:`~captum_gim.datasets.batching`: length buckets, token budgets, split on OOM;
* :mod:`~captum_gim.datasets.compute`: a batch's attributions, each equal to ``explain()``;
* :mod:`~captum_gim.datasets.faithfulness`: the per-row metrics;
* :mod:`~captum_gim.datasets.writing` and :mod:`~captum_gim.datasets.resume`: atomic
  chunks and what a rerun skips;
* :mod:`~captum_gim.datasets.summary`: the DataFrame, the figures and the report;
* :mod:`~captum_gim.datasets.run`: the loop;
* :mod:`~captum_gim.datasets.command`: ``captum-gim attribute-dataset`` and ``summarize``.
"""

from captum_gim.datasets.reading import DatasetError, Row, read_rows
from captum_gim.datasets.run import attribute_dataset
from captum_gim.datasets.summary import load_results, summarize

__all__ = ["DatasetError", "Row", "attribute_dataset", "load_results", "read_rows", "summarize"]
