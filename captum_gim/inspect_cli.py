"""``captum-gim inspect --model DIR``: print what GIM does to a saved model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from captum_gim._quiet import quiet_transformers

DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog."


def add_inspect_parser(commands: Any) -> None:
    r"""
    Adds the ``inspect`` subcommand to the ``captum-gim`` parser.

    Args:
        commands: The parser's subparsers (``parser.add_subparsers()``).
    """
    inspect = commands.add_parser(
        "inspect",
        help="print what GIM does to a local Hugging Face model",
        description="Print every rule site of a saved model (module, rule, form), every "
        "product or softmax kept exact by design and why, and every refused part, from "
        "one audited forward pass on a short text.",
    )
    inspect.add_argument(
        "--model", type=Path, required=True, help="folder written by save_pretrained"
    )
    inspect.add_argument(
        "--text", default=DEFAULT_TEXT, help="the text of the audited forward pass"
    )
    inspect.add_argument(
        "--trust-remote-code", action="store_true", help="allow the model's own code"
    )
    inspect.add_argument(
        "--allow-pickle", action="store_true", help="also load non-safetensors weights"
    )


def run_inspect(args: argparse.Namespace) -> None:
    r"""
    Runs ``captum-gim inspect``: loads the model and its tokenizer, and prints
    :func:`captum_gim.describe` of one forward pass on ``--text``.

    Args:
        args (argparse.Namespace): The parsed arguments.
    """
    import transformers

    from captum_gim.cli import UserError, _check_model_dir, _load_tokenizer, _one_line
    from captum_gim.describe import describe

    _check_model_dir(args.model, args.allow_pickle)
    tokenizer = _load_tokenizer(args.model, args.trust_remote_code)
    config = transformers.AutoConfig.from_pretrained(
        args.model, local_files_only=True, trust_remote_code=args.trust_remote_code
    )
    causal = any(a.endswith("ForCausalLM") for a in config.architectures or [])
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    with quiet_transformers():
        try:
            model = auto.from_pretrained(
                args.model,
                local_files_only=True,
                trust_remote_code=args.trust_remote_code,
                use_safetensors=None if args.allow_pickle else True,
            )
        except Exception as error:
            raise UserError(
                f"cannot load a model from {str(args.model)!r}: {_one_line(error)}"
            ) from error
    model.eval()
    inputs = tokenizer(args.text, return_tensors="pt")
    print(f"GIM on {type(model).__name__} from {args.model} (audited on {args.text!r})")
    print(describe(model, dict(inputs)))
