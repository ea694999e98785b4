r"""
The ``captum-gim`` command: GIM token attributions of a local transformers model.

Two subcommands:

* ``captum-gim explain --model DIR --prompt TEXT [--task TASK] [--target TEXT]
  [--query TEXT] [--score logit|log-prob] [--baseline zero|mask|pad|TOKEN] [--out FILE]``
  explains a Hugging Face model saved in ``DIR``: a causal
  LM's continuation (``--task generate``; by default the greedy next token), a sequence
  classifier's label (``--task classify``; a label name or index, by default the
  predicted one) or a sentence encoder's cosine similarity with ``--query``
  (``--task similarity``). The task is read from the model's ``config.json`` when
  ``--task`` is not given. It prints a table of the prompt tokens and their GIM
  attributions and writes a token heatmap (``.png``, ``.svg``, ``.pdf``), a page of
  coloured text (``.html``) or the scores (``.json``), after the explained value at the
  prompt and at the baseline. A target of several tokens takes one teacher-forced
  forward pass and one backward pass per target token (a progress bar on a terminal);
  the table shows each target token and their sum, the figure the target x prompt
  matrix.
* ``captum-gim demo [--out demo.png]`` does the same for the model bundled with the
  package, offline.

Nothing in a model directory is executed: custom model code is refused unless
``--trust-remote-code`` is given, and only safetensors weights are loaded unless
``--allow-pickle`` is given. A model whose head would be newly initialised is refused.
User errors print one line to stderr and exit with 2, and those that need no gradient
(the output path, the device, the prompt's length, the target, the baseline) are found
before the model computes anything.

Examples::

    $ captum-gim demo --out demo.png
    $ captum-gim explain --model ./my-llama --prompt "The capital of France is" \
          --target " Paris" --out paris.html
    $ captum-gim explain --model ./all-MiniLM-L6-v2 --prompt "A man plays guitar." \
          --query "Someone makes music." --out similarity.html
    $ python -m captum_gim demo
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from captum_gim import __version__
from captum_gim._messages import one_line as _one_line
from captum_gim._quiet import quiet_transformers
from captum_gim.attr.targets import TargetError, check_text_target
from captum_gim.baselines import BASELINES, DEFAULT_BASELINES, resolve_baseline
from captum_gim.explain import Explanation, explain
from captum_gim.forwards import TASKS, detect_task
from captum_gim.inspect_cli import add_inspect_parser, run_inspect
from captum_gim.scores import SCORES
from captum_gim.sites.discovery import UnsupportedModuleError
from captum_gim.text import encode_text, format_table, format_value

# isort: split
from captum_gim.datasets import command as dataset_command  # after the names it imports

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["main"]

PROG = "captum-gim"
USER_ERROR = 2
DEMO_PROMPT = "the movie was charming and the trip was happy ?"
OUTPUT_SUFFIXES = (".png", ".svg", ".pdf", ".html", ".json")
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
)


class UserError(Exception):
    """An error in what the user asked for; printed as one line, without traceback."""


def main(argv: Sequence[str] | None = None) -> int:
    r"""
    Runs the ``captum-gim`` command line.

    Args:
        argv (Sequence[str], optional): The arguments after the program name. None
                    reads ``sys.argv[1:]``.
                    Default: None

    Returns:
        *int*:
        - **status**: 0 on success, 2 for a user error (one line on stderr).

    Examples::

        >>> from captum_gim.cli import main
        >>> main(["demo", "--out", "demo.png"])
        0
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else USER_ERROR
    try:
        if args.command == "demo":
            _run_demo(args)
        elif args.command in dataset_command.COMMANDS:
            dataset_command.run(args)
        elif args.command == "inspect":
            run_inspect(args)
        else:
            _run_explain(args)
    except UserError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return USER_ERROR
    return 0


# --------------------------------------------------------------------------- arguments


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="GIM (Gradient Interaction Modifications) token attributions "
        "for transformers models: generation, classification and sentence similarity.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    explain_ = commands.add_parser(
        "explain",
        help="explain a local Hugging Face model",
        description="Attribute a model's output for a prompt to the prompt's tokens "
        "with GIM, using a model saved in a local directory.",
    )
    explain_.add_argument(
        "--model",
        required=True,
        type=Path,
        metavar="DIR",
        help="directory of a saved Hugging Face model and tokenizer",
    )
    explain_.add_argument("--prompt", required=True, help="the text to explain")
    explain_.add_argument(
        "--task",
        choices=TASKS,
        default=None,
        help="generate: a causal LM's continuation; classify: a sequence classifier's "
        "label; similarity: an encoder's mean-pooled cosine similarity with --query "
        "(default: read from the model's config.json)",
    )
    explain_.add_argument(
        "--query",
        default=None,
        help="for --task similarity: the text whose similarity with the prompt is explained",
    )
    _common_arguments(explain_, default_out=None, demo=False)
    explain_.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow custom model or tokenizer code from DIR "
        "(runs that code; only for directories you trust)",
    )
    explain_.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow pickle (.bin) weights when DIR has no safetensors (unpickling can run code)",
    )
    add_inspect_parser(commands)
    demo = commands.add_parser(
        "demo",
        help="explain a prompt with the bundled model",
        description="Explain a prompt with the small model bundled with captum_gim "
        "(offline) and write a token heatmap.",
    )
    demo.add_argument(
        "--prompt",
        default=DEMO_PROMPT,
        help=f"the prompt text (default: {DEMO_PROMPT!r})",
    )
    _common_arguments(demo, default_out=Path("demo.png"), demo=True)
    dataset_command.add_parsers(commands)
    return parser


EXPLAIN_TARGET_HELP = (
    "generate: the continuation to explain (default: the greedy next token), tokenized "
    "without special tokens, so include its leading space for BPE tokenizers, e.g. "
    "' Paris'; classify: a label name or index (default: the predicted label); not "
    "used with similarity"
)
DEMO_TARGET_HELP = (
    "the word(s) to explain after the prompt, e.g. 'negative' (default: the bundled "
    "model's greedy next token)"
)


def _common_arguments(
    parser: argparse.ArgumentParser, default_out: Path | None, demo: bool = False
) -> None:
    """The options of ``explain`` and ``demo``; ``demo`` only generates, so its help
    leaves out what applies to classifiers and encoders."""
    parser.add_argument(
        "--target", default=None, help=DEMO_TARGET_HELP if demo else EXPLAIN_TARGET_HELP
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=default_out,
        metavar="FILE",
        help="write the heatmap (.png, .svg, .pdf), a page of coloured tokens (.html) or "
        "the scores (.json)" + (f" (default: {default_out})" if default_out else ""),
    )
    parser.add_argument(
        "--score",
        choices=SCORES,
        default=None,
        help="explain the logit (default) or the log-probability of each target token"
        + ("" if demo else " or label (not with --task similarity, whose score is the cosine)"),
    )
    defaults = ", ".join(f"{task}: {name}" for task, name in DEFAULT_BASELINES.items())
    if demo:
        defaults = DEFAULT_BASELINES["generate"]
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="|".join((*BASELINES, "TOKEN")),
        help="what each prompt token is compared with: zero embeddings, the tokenizer's "
        "mask or pad token, or any TOKEN of the vocabulary, at every position but the "
        "special tokens; a positive score means the token raises the explained value "
        f"compared with the baseline (default: {defaults})",
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="float32",
        help="dtype of the model's weights (default: float32)",
    )
    parser.add_argument("--device", default="cpu", help="torch device of the model (default: cpu)")


# --------------------------------------------------------------------------- commands


def _run_demo(args: argparse.Namespace) -> None:
    from captum_gim.models import model_path

    args.model = model_path()
    args.task = "generate"
    args.query = None
    args.trust_remote_code = False
    args.allow_pickle = False
    _run_explain(args)


def _run_explain(args: argparse.Namespace) -> None:
    _check_out(args.out)
    _check_device(args.device)
    _check_model_dir(args.model, args.allow_pickle)
    architectures = _architectures(args.model)
    task = args.task or detect_task(architectures) or "generate"
    _check_task_arguments(args, task, architectures)
    tokenizer = _load_tokenizer(args.model, args.trust_remote_code)
    prompt_ids = _encode(tokenizer, args.prompt, "--prompt")
    query_ids = None if args.query is None else _encode(tokenizer, args.query, "--query")
    target: list[int] | str | None = args.target
    if task == "generate" and args.target is not None:
        target = _encode_target(tokenizer, args.target)
    try:  # checked again by explain(); here before the model is loaded
        resolve_baseline(tokenizer, _baseline_argument(args.baseline), task)
    except ValueError as error:
        raise UserError(f"--baseline: {_one_line(error)}") from error
    model = _load_model(args.model, task, architectures, args)
    try:
        explanation = explain(
            model,
            tokenizer,
            prompt_ids,
            target,
            task=task,
            query_ids=query_ids,
            score=args.score,
            baselines=_baseline_argument(args.baseline),
        )
    except (ValueError, UnsupportedModuleError) as error:
        raise UserError(_one_line(error)) from error
    if task == "similarity":  # the query as the user typed it, not as decoded
        explanation = replace(explanation, target_text=args.query)
    print(_describe(explanation))
    print(_table(explanation))
    if args.out is not None:
        try:
            _write(explanation, args.out, model_name=str(args.model), prompt=args.prompt)
        except OSError as error:
            raise UserError(f"cannot write {str(args.out)!r}: {_one_line(error)}") from error
        print(f"wrote {args.out}")


def _baseline_argument(value: str | None) -> str | int | None:
    """``--baseline``: a name or token; a number is a token id."""
    if value is not None and value.strip().isdigit():
        return int(value)
    return value


# --------------------------------------------------------------------------- checks


def _check_out(out: Path | None) -> None:
    """Refuses, before anything is computed, an output that could not be written."""
    if out is None:
        return
    if out.is_dir():
        raise UserError(f"cannot write {str(out)!r}: it is a directory; give a file name")
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UserError(
            f"cannot write {str(out)!r}: use one of the suffixes {', '.join(OUTPUT_SUFFIXES)}"
        )
    parent = out.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise UserError(f"cannot write {str(out)!r}: {str(parent)!r} {what}")
    if out.exists() and not os.access(out, os.W_OK):
        raise UserError(f"cannot write {str(out)!r}: the file is not writable")
    try:  # the only sure test that a file can be created there
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".captum-gim-"):
            pass
    except OSError as error:
        raise UserError(
            f"cannot write {str(out)!r}: directory {str(parent)!r} is not writable "
            f"({error.strerror or type(error).__name__})"
        ) from error


def _check_device(name: str) -> None:
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise UserError(
            f"--device {name}: not a torch device ({_one_line(error)}); use cpu, cuda or cuda:0"
        ) from error
    if device.type == "meta":
        raise UserError(
            f"--device {name}: meta tensors hold no values, so nothing can be explained; "
            "use --device cpu or cuda"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        build = "built without CUDA" if torch.version.cuda is None else "finds no GPU"
        raise UserError(
            f"--device {name}: CUDA is not available (torch {torch.__version__} {build}); "
            "use --device cpu"
        )
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise UserError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                "device(s); use --device cuda:0"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if device.type not in ("cpu", "cuda", "mps") and not (callable(available) and available()):
        raise UserError(
            f"--device {name}: no {device.type} device is available here; use --device cpu"
        )


def _check_model_dir(path: Path, allow_pickle: bool) -> None:
    if not path.exists():
        raise UserError(f"model directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise UserError(f"{str(path)!r} is not a directory; pass the folder of a saved model")
    if not (path / "config.json").is_file():
        raise UserError(
            f"{str(path)!r} has no config.json; pass the folder written by save_pretrained"
        )
    if not allow_pickle and not any(path.glob("*.safetensors")):
        raise UserError(
            f"{str(path)!r} has no safetensors weights (*.safetensors); captum-gim "
            "loads only safetensors unless you pass --allow-pickle (pickle files can "
            "run code: only for weights you trust)"
        )


def _architectures(path: Path) -> list[str]:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {str(path / 'config.json')!r}: {_one_line(error)}") from error
    architectures = config.get("architectures") if isinstance(config, dict) else None
    return [str(a) for a in architectures] if isinstance(architectures, list) else []


def _check_task_arguments(args: argparse.Namespace, task: str, architectures: list[str]) -> None:
    if task == "similarity" and args.query is None:
        what = f"a {architectures[0]} encoder" if architectures and args.task is None else "it"
        raise UserError(
            f"{str(args.model)!r} is {what}, explained as sentence similarity: pass "
            "--query TEXT (the text to compare the prompt with), or --task generate / "
            "--task classify for a model with that head"
        )
    if task == "similarity" and args.target is not None:
        raise UserError(
            "--target is not used with --task similarity: the explained score is the "
            "cosine similarity of --prompt with --query"
        )
    if task == "similarity" and args.score is not None:
        raise UserError(
            f"--score {args.score} is not used with --task similarity: the explained score "
            "is the cosine similarity of --prompt with --query"
        )
    if task != "similarity" and args.query is not None:
        raise UserError(f"--query is only used with --task similarity, not with --task {task}")


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, what: str) -> list[int]:
    try:
        return encode_text(tokenizer, text, what)
    except ValueError as error:
        raise UserError(str(error)) from error


def _encode_target(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    try:
        return check_text_target(tokenizer, text)
    except TargetError as error:
        raise UserError(str(error).rstrip(".")) from error


# --------------------------------------------------------------------------- loading


def _load_tokenizer(path: Path, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(
            f"{str(path)!r} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); "
            "save the tokenizer next to the model with tokenizer.save_pretrained(DIR)"
        )
    with quiet_transformers():
        try:
            return AutoTokenizer.from_pretrained(
                path, local_files_only=True, trust_remote_code=trust_remote_code
            )
        except Exception as error:  # any failure here is a problem of the directory
            raise UserError(
                f"cannot load a tokenizer from {str(path)!r}: {_one_line(error)}"
            ) from error


def _load_model(
    path: Path, task: str, architectures: list[str], args: argparse.Namespace
) -> PreTrainedModel:
    import transformers

    auto = {
        "generate": transformers.AutoModelForCausalLM,
        "classify": transformers.AutoModelForSequenceClassification,
        "similarity": transformers.AutoModel,
    }[task]
    what = {"generate": "a causal LM", "classify": "a sequence classifier", "similarity": "a model"}
    # attribute-dataset --device-map: accelerate places the layers while loading
    device_map = getattr(args, "device_map", None)
    placement = {} if device_map is None else {"device_map": device_map}
    with quiet_transformers():
        try:
            model, info = auto.from_pretrained(
                path,
                local_files_only=True,
                trust_remote_code=args.trust_remote_code,
                use_safetensors=None if args.allow_pickle else True,
                dtype=DTYPES[args.dtype],
                output_loading_info=True,
                **placement,
            )
        except Exception as error:  # any failure here is a problem of the directory
            raise UserError(
                f"cannot load {what[task]} from {str(path)!r}: {_one_line(error)}"
            ) from error
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        raise UserError(_new_head_message(path, task, architectures, type(model).__name__, missing))
    if device_map is not None:
        return model.eval()
    try:
        model = model.to(args.device)
    except Exception as error:
        raise UserError(f"cannot move the model to {args.device!r}: {_one_line(error)}") from error
    return model.eval()


def _new_head_message(
    path: Path, task: str, architectures: list[str], loaded: str, missing: list[str]
) -> str:
    saved = f"a {architectures[0]} checkpoint" if architectures else "a checkpoint"
    names = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    saved_task = detect_task(architectures)
    kinds = {"generate": "a causal LM", "classify": "a sequence classifier"}
    if saved_task == "similarity":
        fix = "it is an encoder: explain sentence similarity with --task similarity --query TEXT"
    elif saved_task is not None and saved_task != task:
        fix = f"it is {kinds[saved_task]}: use --task {saved_task}"
    else:
        fix = "pass a model saved with a trained head"
    return (
        f"{str(path)!r} is {saved} without weights for the head of {loaded} ({names}); "
        f"transformers would initialise them randomly and the explanation would be "
        f"meaningless; {fix}"
    )


# --------------------------------------------------------------------------- output


def _describe(explanation: Explanation) -> str:
    if explanation.task == "similarity":
        what = f"the cosine similarity with the query {explanation.target_text!r}"
    elif explanation.task == "classify":
        what = (
            f"the {explanation.score} of the label {explanation.target_text!r} "
            f"(index {explanation.target_ids[0]})"
        )
    else:
        what = (
            f"the {explanation.score} of the target {explanation.target_text!r} "
            f"({len(explanation.target_ids)} token(s))"
        )
    lines = [
        f"GIM attributions of {what} to the prompt tokens, against the {explanation.baseline}."
    ]
    if explanation.values:
        value, base = sum(explanation.values), sum(explanation.baseline_values)
        name = "cosine" if explanation.task == "similarity" else explanation.score
        if len(explanation.values) > 1:
            name += " summed over the target tokens"
        lines.append(
            f"{name}: {format_value(value)} at the prompt, {format_value(base)} at the "
            f"baseline (difference {format_value(value - base)}); the attributions sum to "
            f"{format_value(float(explanation.scores.sum()))}."
        )
    return "\n".join(lines)


def _table(explanation: Explanation) -> str:
    columns = list(explanation.target_tokens)
    values = explanation.token_scores.T.tolist()
    if len(columns) > 1:
        columns.append("total")
        values = [[*row, sum(row)] for row in values]
    rows = [
        [i, token, *row] for i, (token, row) in enumerate(zip(explanation.prompt_tokens, values))
    ]
    return format_table(["#", "token", *columns], rows, significant=True)


def _title(explanation: Explanation) -> str:
    if explanation.task == "similarity":
        return f"GIM: cosine similarity with {explanation.target_text!r}"
    return f"GIM: {explanation.score} of {explanation.target_text!r}"


def _write(explanation: Explanation, out: Path, model_name: str, prompt: str) -> None:
    suffix = out.suffix.lower()
    if suffix == ".json":
        out.write_text(json.dumps(_as_json(explanation, model_name, prompt), indent=2) + "\n")
        return
    from captum_gim import visualization

    if suffix == ".html":
        rows = dict(zip(_row_labels(explanation.target_tokens), explanation.token_scores))
        if len(rows) > 1:
            rows["sum"] = explanation.scores
        visualization.write_token_html(
            out, explanation.prompt_tokens, rows, title=_title(explanation)
        )
        return
    if len(explanation.target_tokens) > 1:
        figure = visualization.plot_token_matrix(
            explanation.prompt_tokens,
            explanation.target_tokens,
            explanation.token_scores,
            title=_title(explanation),
        )
    else:
        figure = visualization.plot_token_heatmap(
            explanation.prompt_tokens, explanation.scores, title=_title(explanation)
        )
    visualization.save_figure(figure, out)


def _row_labels(tokens: list[str]) -> list[str]:
    """One distinct label per target token (a token can repeat)."""
    return [f"{k}: {token}" for k, token in enumerate(tokens)] if len(tokens) > 1 else tokens


def _as_json(explanation: Explanation, model_name: str, prompt: str) -> dict[str, Any]:
    return {
        "method": "GIM",
        "task": explanation.task,
        "config": asdict(explanation.config),
        "model": model_name,
        "prompt": prompt,
        "score": explanation.score,
        "baseline": explanation.baseline,
        "values": list(explanation.values),
        "baseline_values": list(explanation.baseline_values),
        "tokens": explanation.prompt_tokens,
        "scores": explanation.scores.tolist(),
        "target": explanation.target_text,
        "target_tokens": explanation.target_tokens,
        "target_ids": explanation.target_ids,
        "token_scores": explanation.token_scores.tolist(),
    }
