r"""
Small causal language models bundled with the package, loadable offline.

Each bundled model lives in its own folder next to this file
(``captum_gim/models/<name>/``) with a ``config.json``, a
``model.safetensors``, the tokenizer files and a ``task.json`` that describes
the synthetic task it was trained on (see :mod:`captum_gim.models.tasks`).
The models are trained by ``benchmarks/train_bundled_model.py`` (``redundant_evidence_llama``),
``benchmarks/train_induction_model.py`` (``induction_llama``) and
``benchmarks/train_circuit_models.py`` (``ioi_llama`` and ``planted_circuit_llama``, whose
prompts and planted circuit are in :mod:`captum_gim.models.circuit_tasks`).

Examples::

    >>> import torch
    >>> from captum_gim.models import load_model, make_examples
    >>> model, tokenizer = load_model()
    >>> ex = make_examples(1, seed=1_000_000)[0]
    >>> with torch.no_grad():
    ...     logits = model(torch.tensor([ex.input_ids])).logits
    >>> int(logits[0, -1].argmax()) == ex.answer_id
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from captum_gim.models.tasks import Example, RedundantEvidenceTask

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

__all__ = [
    "DEFAULT_MODEL",
    "Example",
    "RedundantEvidenceTask",
    "available_models",
    "load_model",
    "load_task",
    "make_examples",
    "model_path",
]

DEFAULT_MODEL = "redundant_evidence_llama"

_MODELS_DIR = Path(__file__).resolve().parent


def available_models() -> list[str]:
    r"""
    Lists the bundled models.

    Returns:
        list[str]: Sorted names accepted by :func:`load_model`.

    Examples::

        >>> from captum_gim.models import available_models
        >>> "redundant_evidence_llama" in available_models()
        True
    """
    return sorted(
        p.name for p in _MODELS_DIR.iterdir() if p.is_dir() and (p / "config.json").is_file()
    )


def model_path(name: str = DEFAULT_MODEL) -> Path:
    r"""
    Folder of a bundled model, usable with ``from_pretrained``.

    Args:
        name (str, optional): Name of the bundled model.
                    Default: ``"redundant_evidence_llama"``

    Returns:
        Path: The folder.

    Raises:
        ValueError: If no bundled model has this name; the message lists the
                    available ones.
    """
    names = available_models()
    if name not in names:
        raise ValueError(
            f"unknown bundled model {name!r}; available models: "
            f"{', '.join(names) if names else '(none)'}"
        )
    return _MODELS_DIR / name


def load_model(
    name: str = DEFAULT_MODEL, attn_implementation: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    r"""
    Loads a bundled model and its tokenizer from the package data, offline.

    Args:
        name (str, optional): Name of the bundled model, one of
                    :func:`available_models`.
                    Default: ``"redundant_evidence_llama"``
        attn_implementation (str, optional): Attention implementation passed
                    to ``from_pretrained`` (``"eager"``, ``"sdpa"``, ...);
                    ``None`` keeps the transformers default.
                    Default: None

    Returns:
        tuple[PreTrainedModel, PreTrainedTokenizerFast]:
        - **model** (*PreTrainedModel*): The causal LM in eval mode, float32,
          on the CPU.
        - **tokenizer** (*PreTrainedTokenizerFast*): Its tokenizer; it
          prepends ``<bos>`` and pads on the left.

    Raises:
        ValueError: If no bundled model has this name; the message lists the
                    available ones.

    Examples::

        >>> from captum_gim.models import load_model
        >>> model, tokenizer = load_model("redundant_evidence_llama")
        >>> enc = tokenizer("the good movie ?", return_tensors="pt")
        >>> logits = model(**enc).logits
        >>> tokenizer.decode(logits[0, -1].argmax())
        'positive'
    """
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from captum_gim._quiet import quiet_transformers

    path = model_path(name)
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    with quiet_transformers():  # no weight-loading progress bar for a 1 MB model
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    model.eval()
    return model, tokenizer


def load_task(name: str = DEFAULT_MODEL) -> RedundantEvidenceTask:
    r"""
    The synthetic task a bundled model was trained on.

    Args:
        name (str, optional): Name of the bundled model.
                    Default: ``"redundant_evidence_llama"``

    Returns:
        RedundantEvidenceTask: The task, read from the model's ``task.json``.
    """
    return RedundantEvidenceTask.load(model_path(name) / "task.json")


def make_examples(
    n: int,
    seed: int = 1_000_000,
    num_evidence: int | None = None,
    name: str = DEFAULT_MODEL,
) -> list[Example]:
    r"""
    Generates held-out prompts of a bundled model's task with known evidence.

    Args:
        n (int): Number of prompts.
        seed (int, optional): Seed of the generator. Training used seeds below
                    ``1_000_000``, so the default and any larger seed give
                    held-out data.
                    Default: 1_000_000
        num_evidence (int, optional): Exact number of evidence words of every
                    prompt (0 to 3 in training); ``None`` draws it from the
                    training distribution.
                    Default: None
        name (str, optional): Name of the bundled model whose task is used.
                    Default: ``"redundant_evidence_llama"``

    Returns:
        list[Example]: Prompts with ``prompt`` text, ``input_ids`` (as the
        model's tokenizer encodes ``prompt``), ``answer``, ``answer_id`` and
        ``evidence_positions`` (indices into ``input_ids``).

    Examples::

        >>> from captum_gim.models import make_examples
        >>> ex = make_examples(1, seed=1_000_000, num_evidence=2)[0]
        >>> [ex.prompt.split()[p - 1] for p in ex.evidence_positions]  # doctest: +SKIP
        ['awful', 'dreadful']
    """
    return load_task(name).make_examples(n, seed=seed, num_evidence=num_evidence)
