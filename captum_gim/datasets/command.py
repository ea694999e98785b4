r"""
``captum-gim attribute-dataset`` and ``captum-gim summarize``: the command line of
:func:`~captum_gim.datasets.attribute_dataset` and
:func:`~captum_gim.datasets.summarize`.

Examples::

    $ captum-gim attribute-dataset --model ./my-llama --data prompts.jsonl --out results
    $ torchrun --nproc_per_node 2 -m captum_gim attribute-dataset \
          --model ./my-llama --data prompts.jsonl --out results --device cuda
    $ captum-gim attribute-dataset --model ./my-70b --data prompts.jsonl \
          --out results --device-map auto --dtype bfloat16 --baseline mask
    $ captum-gim summarize results
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

from captum_gim._messages import one_line
from captum_gim.baselines import BASELINES, resolve_baseline
from captum_gim.config import GIMConfig
from captum_gim.datasets.faithfulness import METRICS
from captum_gim.datasets.reading import DatasetError
from captum_gim.datasets.sharding import Shard
from captum_gim.datasets.summary import MIN_COUNT
from captum_gim.datasets.writing import OUTPUT_FORMATS
from captum_gim.explain import SCORES
from captum_gim.forwards import TASKS

__all__ = ["COMMANDS", "add_parsers", "run"]

#: The subcommands of this module.
COMMANDS = ("attribute-dataset", "summarize")


def add_parsers(commands: Any) -> None:
    r"""
    Adds ``attribute-dataset`` and ``summarize`` to the subparsers of ``captum-gim``.

    Args:
        commands (argparse._SubParsersAction): What ``add_subparsers`` returned.
    """
    run_ = commands.add_parser(
        "attribute-dataset",
        help="explain every row of a dataset (resumable, sharded under torchrun)",
        description="GIM attributions of every row of a JSON Lines, CSV or Parquet file "
        "(or a saved datasets directory), batched by length, written in chunks to --out; "
        "rerunning skips the rows already written. Under torchrun or accelerate launch "
        "every process explains its share of the rows.",
    )
    run_.add_argument(
        "--model",
        required=True,
        type=Path,
        metavar="DIR",
        help="directory of a saved Hugging Face model and tokenizer",
    )
    run_.add_argument(
        "--data",
        required=True,
        type=Path,
        metavar="FILE",
        help="a .jsonl, .csv or .parquet file, or a directory saved by datasets",
    )
    run_.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="output directory (created; an existing one is resumed)",
    )
    run_.add_argument("--prompt-column", metavar="COLUMN", default="prompt", help="default: prompt")
    run_.add_argument(
        "--target-column",
        metavar="COLUMN",
        default="target",
        help="a word or continuation (generate) or a label (classify); empty: "
        "the model's own prediction (default: target)",
    )
    run_.add_argument(
        "--id-column", metavar="COLUMN", default="id", help="default: id (row numbers if absent)"
    )
    run_.add_argument(
        "--query-column",
        metavar="COLUMN",
        default="query",
        help="the text to compare with, for --task similarity (default: query)",
    )
    run_.add_argument("--split", default=None, help="the split of a saved DatasetDict")
    run_.add_argument(
        "--task", choices=TASKS, default=None, help="default: read from the model's config.json"
    )
    run_.add_argument(
        "--score",
        choices=SCORES,
        default="logit",
        help="explain the logit (default) or the log-probability",
    )
    run_.add_argument(
        "--baseline",
        default=None,
        metavar="|".join((*BASELINES, "TOKEN")),
        help="what each prompt token is compared with, as for explain: zero embeddings, "
        "the tokenizer's mask or pad token, or any TOKEN of the vocabulary (a number is a "
        "token id), at every position but the special tokens (default: zero)",
    )
    run_.add_argument(
        "--batch-size",
        type=_positive,
        default=None,
        metavar="N",
        help="largest number of rows per batch (default: the token budget decides)",
    )
    run_.add_argument(
        "--max-tokens-per-batch",
        type=_positive,
        default=4096,
        metavar="N",
        help="largest rows x longest row of a batch (default: 4096)",
    )
    run_.add_argument(
        "--chunk-size",
        type=_positive,
        default=256,
        metavar="N",
        help="rows per written file (default: 256)",
    )
    run_.add_argument(
        "--format",
        choices=OUTPUT_FORMATS,
        default=None,
        help="default: parquet if pyarrow is installed, else jsonl",
    )
    run_.add_argument(
        "--metrics",
        type=_metrics,
        default=(),
        metavar="LIST",
        help="comma-separated: comprehensiveness,sufficiency per row",
    )
    run_.add_argument(
        "--metrics-token",
        default=None,
        metavar="TOKEN",
        help="the token replacing removed tokens in the metrics (default: the "
        "tokenizer's mask, pad or unknown token)",
    )
    run_.add_argument(
        "--no-resume", action="store_true", help="refuse an --out that already holds results"
    )
    where = run_.add_mutually_exclusive_group()
    where.add_argument(
        "--device",
        default=None,  # cpu; None lets argparse see --device cpu next to --device-map
        help="torch device (default: cpu); 'cuda' under torchrun means cuda:LOCAL_RANK",
    )
    where.add_argument(
        "--device-map",
        default=None,
        metavar="auto|balanced|sequential",
        help="spread a model too large for one device over every GPU (and the CPU) with "
        "accelerate, in one process; instead of --device",
    )
    run_.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    run_.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow custom model or tokenizer code from DIR",
    )
    run_.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow pickle (.bin) weights when DIR has no safetensors",
    )
    run_.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress bar per process (default: when stderr is a terminal)",
    )
    gim_arguments(run_)
    summary = commands.add_parser(
        "summarize",
        help="figures and an HTML report of an attribute-dataset directory",
        description="Per-dataset figures (rows, errors, mean explained value, the tokens "
        "with the largest mean attribution, metrics) in DIR/summary.json, and an HTML "
        "report with one coloured line per example in DIR/report.html.",
    )
    summary.add_argument("dir", type=Path, metavar="DIR", help="the --out of attribute-dataset")
    summary.add_argument(
        "--page-size",
        type=_positive,
        default=50,
        metavar="N",
        help="examples per page of the report (default: 50)",
    )
    summary.add_argument(
        "--min-count",
        type=_positive,
        default=MIN_COUNT,
        metavar="N",
        help="list among the tokens with the largest mean attribution only those seen at "
        f"least N times (default: {MIN_COUNT}; 1 lists every token)",
    )


def gim_arguments(parser: argparse.ArgumentParser) -> None:
    r"""Adds the seven GIM settings (``--temperature``, ``--freeze-norm``, ...)."""
    defaults = GIMConfig()
    group = parser.add_argument_group("GIM settings (defaults: the paper's)")
    for field in fields(GIMConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if field.name == "freeze_norm":
            group.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=f"freeze the norms' statistics (default: {default})",
            )
        else:
            group.add_argument(
                flag, type=float, default=default, metavar="X", help=f"default: {default}"
            )


def run(args: argparse.Namespace) -> None:
    r"""
    Runs ``attribute-dataset`` or ``summarize``.

    Raises:
        captum_gim.cli.UserError: With one line, for a bad input file, model directory
                    or setting.
    """
    from captum_gim import cli

    try:
        if args.command == "summarize":
            _summarize(args)
        else:
            with _log_to_stderr():
                _attribute(args)
    except (DatasetError, ValueError) as error:
        raise cli.UserError(one_line(error)) from error


def _attribute(args: argparse.Namespace) -> None:
    from captum_gim import cli
    from captum_gim.datasets.reading import read_rows
    from captum_gim.datasets.run import attribute_dataset
    from captum_gim.forwards import detect_task

    try:
        config = GIMConfig(**{f.name: getattr(args, f.name) for f in fields(GIMConfig)})
    except (TypeError, ValueError) as error:
        raise cli.UserError(one_line(error)) from error
    rows = read_rows(
        args.data,
        prompt_column=args.prompt_column,
        target_column=args.target_column,
        id_column=args.id_column,
        query_column=args.query_column,
        split=args.split,
    )
    shard = Shard.from_environment()
    args.device = args.device or "cpu"
    if args.device_map is not None and shard.world_size > 1:
        raise cli.UserError(
            f"--device-map {args.device_map} spreads one model over every device, so it runs "
            f"in one process, not {shard.world_size}; drop torchrun, or use --device cuda"
        )
    if args.device == "cuda" and shard.world_size > 1:
        args.device = f"cuda:{shard.local_rank}"
    cli._check_device(args.device)
    baselines = cli._baseline_argument(args.baseline)
    cli._check_model_dir(args.model, args.allow_pickle)
    architectures = cli._architectures(args.model)
    task = args.task or detect_task(architectures) or "generate"
    tokenizer = cli._load_tokenizer(args.model, args.trust_remote_code)
    try:  # checked again by attribute_dataset(); here before the model is loaded
        resolve_baseline(tokenizer, baselines, task)
    except ValueError as error:
        raise cli.UserError(f"--baseline: {one_line(error)}") from error
    model = cli._load_model(args.model, task, architectures, args)
    attribute_dataset(
        model,
        tokenizer,
        rows,
        args.out,
        task=task,
        batch_size=args.batch_size,
        max_tokens_per_batch=args.max_tokens_per_batch,
        config=config,
        score=args.score,
        baselines=baselines,
        resume=not args.no_resume,
        metrics=args.metrics,
        metrics_token=args.metrics_token,
        format=args.format,
        chunk_size=args.chunk_size,
        progress=args.progress,
        model_path=str(args.model),
    )


def _summarize(args: argparse.Namespace) -> None:
    from captum_gim.datasets.summary import summarize
    from captum_gim.text import format_table

    summary = summarize(args.dir, page_size=args.page_size, min_count=args.min_count)
    figures = [
        [k, v if isinstance(v, (int, float)) else str(v)]
        for k, v in summary.items()
        if k not in ("top_tokens", "throughput") and v is not None
    ]
    print(format_table(["figure", "value"], figures))
    if summary["top_tokens"]:
        print()
        print(
            format_table(
                ["token", "mean attribution", "count"],
                [[t["token"], t["mean_attribution"], t["count"]] for t in summary["top_tokens"]],
            )
        )
    print(f"wrote {Path(args.dir) / 'summary.json'} and {summary['report']}")


@contextlib.contextmanager
def _log_to_stderr() -> Iterator[None]:
    """The run's log lines on stderr, for the command's duration only."""
    logger = logging.getLogger("captum_gim.datasets")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("captum-gim: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _metrics(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown metric(s) {', '.join(unknown) or repr(text)}; use {','.join(METRICS)}"
        )
    return names
