r"""
The ``captum-gim`` command: GIM token attributions of a local causal language model.

Two subcommands:

* ``captum-gim explain --model DIR --prompt TEXT [--target TEXT] [--out FILE]`` explains
  a Hugging Face causal LM saved in ``DIR``: it prints a table of the prompt tokens and
  their GIM attributions to the target (by default the model's greedy next token) and
  writes a token heatmap (``.png``, ``.svg``, ``.pdf``, ``.html``) or the scores as
  ``.json``. A target of several tokens is explained one token at a time, teacher-forced,
  with a progress bar; the table shows each target token and their sum.
* ``captum-gim demo [--out demo.png]`` does the same for the model bundled with the
  package, offline.

Nothing in a model directory is executed: custom model code is refused unless
``--trust-remote-code`` is given, and only safetensors weights are loaded unless
``--allow-pickle`` is given. User errors print one line to stderr and exit with 2.

Examples::

    $ captum-gim demo --out demo.png
    $ captum-gim explain --model ./my-llama --prompt "The capital of France is" \
          --target " Paris" --out paris.html
    $ python -m captum_gim demo
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
from torch import Tensor

from captum_gim.attr.gim import GIMAttribution
from captum_gim.compare import format_table, logits_forward
from captum_gim.config import GIMConfig
from captum_gim.sites.discovery import UnsupportedModuleError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["Explanation", "explain", "main"]

PROG = "captum-gim"
USER_ERROR = 2
DEMO_PROMPT = "the movie was charming and the trip was happy ?"
SCORES = ("logit", "log-prob")
OUTPUT_SUFFIXES = (".png", ".svg", ".pdf", ".html", ".json")
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

_T = TypeVar("_T")


class UserError(Exception):
    """An error in what the user asked for; printed as one line, without traceback."""


@dataclass(frozen=True)
class Explanation:
    r"""
    GIM attributions of each target token to the prompt tokens.

    Attributes:
        prompt_tokens (list[str]): The prompt's tokens.
        target_tokens (list[str]): The explained target tokens.
        target_ids (list[int]): Their ids.
        target_text (str): The target decoded to text.
        token_scores (Tensor): ``len(target_tokens) x len(prompt_tokens)``: the
                    attribution of each target token's score to each prompt token.
        score (str): What was explained: ``"logit"`` or ``"log-prob"``.
        config (GIMConfig): The GIM settings used.
    """

    prompt_tokens: list[str]
    target_tokens: list[str]
    target_ids: list[int]
    target_text: str
    token_scores: Tensor
    score: str
    config: GIMConfig

    @property
    def scores(self) -> Tensor:
        r"""
        Returns:
            *Tensor*: The attribution of the whole target (the sum over target
            tokens) to each prompt token.
        """
        return self.token_scores.sum(dim=0)


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
        "for causal language models.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    explain = commands.add_parser(
        "explain",
        help="explain a local Hugging Face causal LM",
        description="Attribute a target continuation of a prompt to the prompt's "
        "tokens with GIM, using a causal LM saved in a local directory.",
    )
    explain.add_argument(
        "--model",
        required=True,
        type=Path,
        metavar="DIR",
        help="directory of a saved Hugging Face causal LM and tokenizer",
    )
    explain.add_argument("--prompt", required=True, help="the prompt text")
    _common_arguments(explain, default_out=None)
    explain.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow custom model or tokenizer code from DIR "
        "(runs that code; only for directories you trust)",
    )
    explain.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow pickle (.bin) weights when DIR has no safetensors (unpickling can run code)",
    )
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
    _common_arguments(demo, default_out=Path("demo.png"))
    return parser


def _common_arguments(parser: argparse.ArgumentParser, default_out: Path | None) -> None:
    parser.add_argument(
        "--target",
        default=None,
        help="the continuation to explain, token by token (default: the model's greedy "
        "next token); tokenized without special tokens, so include its leading space "
        "for BPE tokenizers, e.g. ' Paris'",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=default_out,
        metavar="FILE",
        help="write the heatmap (.png, .svg, .pdf, .html) or the "
        "scores (.json)" + (f" (default: {default_out})" if default_out else ""),
    )
    parser.add_argument(
        "--score",
        choices=SCORES,
        default="logit",
        help="explain the logit (default) or the log-probability of each target token",
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
    args.trust_remote_code = False
    args.allow_pickle = False
    _run_explain(args)


def _run_explain(args: argparse.Namespace) -> None:
    _check_out(args.out)
    _check_model_dir(args.model, args.allow_pickle)
    tokenizer = _load_tokenizer(args.model, args.trust_remote_code)
    prompt_ids = _encode(tokenizer, args.prompt, "prompt", special_tokens=True)
    target_ids = (
        None
        if args.target is None
        else _encode(tokenizer, args.target, "target", special_tokens=False)
    )
    model = _load_model(args.model, args)
    explanation = explain(model, tokenizer, prompt_ids, target_ids, score=args.score)
    print(_describe(explanation))
    print(_table(explanation))
    if args.out is not None:
        _write(explanation, args.out, model_name=str(args.model), prompt=args.prompt)
        print(f"wrote {args.out}")


def explain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[int],
    target_ids: Sequence[int] | None = None,
    *,
    score: str = "logit",
    config: GIMConfig | None = None,
) -> Explanation:
    r"""
    GIM attributions of a target continuation to the prompt tokens, one target token
    at a time with teacher forcing: target token ``k`` is explained given the prompt
    and target tokens ``0 .. k-1``, and only the prompt tokens are attributed.

    Args:
        model (PreTrainedModel): A causal language model.
        tokenizer (PreTrainedTokenizerBase): Its tokenizer, for the token strings.
        prompt_ids (Sequence[int]): The prompt's token ids.
        target_ids (Sequence[int], optional): The target's token ids. None explains
                    the model's greedy next token.
                    Default: None
        score (str, optional): Explain the ``"logit"`` or the ``"log-prob"``
                    (log-probability) of each target token.
                    Default: ``"logit"``
        config (GIMConfig, optional): The GIM settings; None means the defaults.
                    Default: None

    Returns:
        *Explanation*:
        - **explanation**: The tokens and a ``targets x prompt`` score matrix.

    Examples::

        >>> from captum_gim.cli import explain
        >>> from captum_gim.models import load_model
        >>> model, tokenizer = load_model()
        >>> ids = tokenizer("the good movie ?").input_ids
        >>> explain(model, tokenizer, ids).scores.shape
        torch.Size([5])
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}.")
    device = model.get_input_embeddings().get_parameter("weight").device
    prompt = torch.tensor([list(prompt_ids)], device=device)
    forward = logits_forward(model, log_probs=score == "log-prob")
    if target_ids is None:
        with torch.no_grad():
            target_ids = [int(forward(prompt).argmax(dim=-1))]
    config = GIMConfig() if config is None else config
    gim = GIMAttribution(forward, model, config=config)
    rows = []
    for k in _progress(range(len(target_ids)), total=len(target_ids)):
        prefix = torch.tensor([list(target_ids[:k])], dtype=prompt.dtype, device=device)
        with torch.no_grad():
            embeds = model.get_input_embeddings()(torch.cat([prompt, prefix], dim=1))
        try:
            attributions = gim.attribute(embeds, target=int(target_ids[k]))
        except UnsupportedModuleError as error:
            raise UserError(_first_line(error)) from error
        rows.append(attributions[0, : prompt.shape[1]].sum(dim=-1).detach().float().cpu())
    return Explanation(
        prompt_tokens=list(tokenizer.convert_ids_to_tokens(list(prompt_ids))),
        target_tokens=list(tokenizer.convert_ids_to_tokens(list(target_ids))),
        target_ids=[int(t) for t in target_ids],
        target_text=cast(str, tokenizer.decode(list(target_ids))),
        token_scores=torch.stack(rows),
        score=score,
        config=config,
    )


# --------------------------------------------------------------------------- checks


def _check_out(out: Path | None) -> None:
    if out is None:
        return
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UserError(
            f"cannot write {str(out)!r}: use one of the suffixes {', '.join(OUTPUT_SUFFIXES)}"
        )
    if not out.parent.is_dir():
        raise UserError(f"cannot write {str(out)!r}: directory {str(out.parent)!r} does not exist")


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


def _encode(
    tokenizer: PreTrainedTokenizerBase, text: str, what: str, special_tokens: bool
) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=special_tokens)["input_ids"])
    if not ids:
        raise UserError(f"the {what} {text!r} tokenizes to no tokens; give some text")
    return ids


# --------------------------------------------------------------------------- loading


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silences the warnings and progress bars of transformers while loading."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _load_tokenizer(path: Path, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    with _quiet_transformers():
        try:
            return AutoTokenizer.from_pretrained(
                path, local_files_only=True, trust_remote_code=trust_remote_code
            )
        except Exception as error:  # any failure here is a problem of the directory
            raise UserError(
                f"cannot load a tokenizer from {str(path)!r}: {_first_line(error)}"
            ) from error


def _load_model(path: Path, args: argparse.Namespace) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    with _quiet_transformers():
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path,
                local_files_only=True,
                trust_remote_code=args.trust_remote_code,
                use_safetensors=None if args.allow_pickle else True,
                dtype=DTYPES[args.dtype],
            )
            model = model.to(args.device)
        except Exception as error:  # any failure here is a problem of the directory
            raise UserError(
                f"cannot load a causal LM from {str(path)!r}: {_first_line(error)}"
            ) from error
    return model.eval()


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# --------------------------------------------------------------------------- output


def _progress(items: Iterable[_T], total: int) -> Iterable[_T]:
    """A progress bar on stderr for more than one item: tqdm if installed."""
    if total < 2:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _counter(items, total)
    return tqdm(items, total=total, desc="target tokens", file=sys.stderr, leave=False)


def _counter(items: Iterable[_T], total: int) -> Iterator[_T]:
    for done, item in enumerate(items):
        print(f"\rtarget tokens: {done}/{total}", end="", file=sys.stderr, flush=True)
        yield item
    print(f"\rtarget tokens: {total}/{total}", file=sys.stderr, flush=True)


def _describe(explanation: Explanation) -> str:
    return (
        f"GIM attributions of the {explanation.score} of the target "
        f"{explanation.target_text!r} "
        f"({len(explanation.target_ids)} token(s)) to the prompt tokens:"
    )


def _table(explanation: Explanation) -> str:
    columns = list(explanation.target_tokens)
    values = explanation.token_scores.T.tolist()
    if len(columns) > 1:
        columns.append("total")
        values = [[*row, sum(row)] for row in values]
    rows = [
        [i, token, *row] for i, (token, row) in enumerate(zip(explanation.prompt_tokens, values))
    ]
    return format_table(["#", "token", *columns], rows)


def _write(explanation: Explanation, out: Path, model_name: str, prompt: str) -> None:
    if out.suffix.lower() == ".json":
        out.write_text(json.dumps(_as_json(explanation, model_name, prompt), indent=2) + "\n")
        return
    from captum_gim.visualization import plot_token_heatmap, save_figure

    figure = plot_token_heatmap(
        explanation.prompt_tokens,
        explanation.scores,
        title=f"GIM: {explanation.score} of {explanation.target_text!r}",
    )
    save_figure(figure, out)


def _as_json(explanation: Explanation, model_name: str, prompt: str) -> dict[str, Any]:
    return {
        "method": "GIM",
        "config": asdict(explanation.config),
        "model": model_name,
        "prompt": prompt,
        "score": explanation.score,
        "tokens": explanation.prompt_tokens,
        "scores": explanation.scores.tolist(),
        "target": explanation.target_text,
        "target_tokens": explanation.target_tokens,
        "target_ids": explanation.target_ids,
        "token_scores": explanation.token_scores.tolist(),
    }
