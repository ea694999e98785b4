"""Tests of the bundled models (captum_gim.models)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

from captum_gim.models import (
    DEFAULT_MODEL,
    Example,
    available_models,
    load_model,
    load_task,
    make_examples,
    model_path,
)
from captum_gim.models.tasks import BLANK_TOKEN, RedundantEvidenceTask


def _answer_logits(model: PreTrainedModel, rows: list[list[int]]) -> torch.Tensor:
    """Last-position logits of equal-length rows of token ids."""
    with torch.no_grad():
        return model(torch.tensor(rows)).logits[:, -1]


def test_available_models_lists_the_default_model() -> None:
    assert DEFAULT_MODEL in available_models()


def test_load_model_unknown_name_lists_available_models() -> None:
    with pytest.raises(ValueError, match=DEFAULT_MODEL):
        load_model("no_such_model")


def test_bundled_files_are_package_data_and_small() -> None:
    # setup.cfg ships ``models/*/*``: every file must sit directly in the folder.
    path = model_path()
    assert path.parent == Path(__file__).resolve().parents[1] / "captum_gim" / "models"
    entries = list(path.iterdir())
    assert all(p.is_file() for p in entries)
    names = {p.name for p in entries}
    assert {"config.json", "model.safetensors", "tokenizer.json", "task.json"} <= names
    assert sum(p.stat().st_size for p in entries) < 5_000_000


def test_load_model_returns_eval_model_and_fast_tokenizer(bundled) -> None:
    model, tokenizer = bundled
    assert isinstance(model, PreTrainedModel)
    assert not model.training
    assert model.config.model_type == "llama"
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert tokenizer.padding_side == "left"
    eager, _ = load_model(attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"


def test_tokenizer_encodes_prompts_like_the_generator(bundled) -> None:
    _, tokenizer = bundled
    auto = AutoTokenizer.from_pretrained(model_path(), local_files_only=True)
    task = load_task()
    assert tokenizer.convert_tokens_to_ids(BLANK_TOKEN) == task.blank_id
    for ex in make_examples(50, seed=1_000_003):
        assert tokenizer(ex.prompt).input_ids == list(ex.input_ids)
        assert auto(ex.prompt).input_ids == list(ex.input_ids)
        assert tokenizer.convert_tokens_to_ids(ex.answer) == ex.answer_id


def test_make_examples_is_reproducible_and_marks_evidence_words() -> None:
    task = load_task()
    assert make_examples(20, seed=7) == make_examples(20, seed=7)
    assert make_examples(20, seed=7) != make_examples(20, seed=8)
    evidence = {
        "positive": set(task.positive_words),
        "negative": set(task.negative_words),
    }
    for k in range(4):
        for ex in make_examples(30, seed=1_000_004 + k, num_evidence=k):
            assert isinstance(ex, Example)
            tokens = ["<bos>", *ex.prompt.split(" ")]
            assert len(tokens) == len(ex.input_ids)
            assert ex.num_evidence == k
            assert (ex.answer == "neutral") == (k == 0)
            assert 0 not in ex.evidence_positions
            assert len(tokens) - 1 not in ex.evidence_positions
            words = evidence.get(ex.answer, set())
            marked = {tokens[p] for p in ex.evidence_positions}
            assert marked <= words
            unmarked = set(tokens) - marked
            assert not unmarked & (set(task.positive_words) | set(task.negative_words))


def test_task_round_trips_through_json(tmp_path: Path) -> None:
    task = RedundantEvidenceTask()
    task.save(tmp_path / "task.json")
    assert RedundantEvidenceTask.load(tmp_path / "task.json") == task
    assert load_task() == task


def test_heldout_accuracy_above_95_percent(bundled) -> None:
    model, tokenizer = bundled
    examples = make_examples(400, seed=1_000_000)
    enc = tokenizer([e.prompt for e in examples], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**enc).logits[:, -1]
    answer_ids = torch.tensor(sorted(load_task().answer_ids.values()))
    pred = answer_ids[logits[:, answer_ids].argmax(-1)]
    target = torch.tensor([e.answer_id for e in examples])
    accuracy = (pred == target).float().mean().item()
    overall = (logits.argmax(-1) == target).float().mean().item()
    print(f"held-out accuracy {accuracy:.4f} (overall argmax {overall:.4f})")
    assert accuracy > 0.95
    assert overall > 0.95


def test_model_self_repairs_when_one_of_two_evidence_words_is_removed(bundled) -> None:
    model, _ = bundled
    blank = load_task().blank_id
    ratios = []
    single_drops, double_drops = [], []
    for ex in make_examples(200, seed=1_000_001, num_evidence=2):
        rows = [list(ex.input_ids) for _ in range(4)]
        a, b = ex.evidence_positions
        rows[1][a] = blank
        rows[2][b] = blank
        rows[3][a] = rows[3][b] = blank
        logit = _answer_logits(model, rows)[:, ex.answer_id]
        drops = logit[0] - logit[1:]
        single_drops += drops[:2].tolist()
        double_drops.append(drops[2].item())
        ratios += (drops[:2] / drops[2]).tolist()
    ratio = sum(ratios) / len(ratios)
    print(
        f"self-repair: mean single/double drop ratio {ratio:.4f} "
        f"(mean single drop {sum(single_drops) / len(single_drops):.3f}, "
        f"mean double drop {sum(double_drops) / len(double_drops):.3f})"
    )
    assert min(double_drops) > 1.0  # removing both evidence words matters
    assert ratio < 0.5


def test_load_model_shows_no_progress_bar_and_restores_logging(capfd) -> None:
    from transformers.utils import logging

    logging.enable_progress_bar()
    verbosity = logging.get_verbosity()
    capfd.readouterr()
    load_model()
    captured = capfd.readouterr()
    assert "Loading" not in captured.err and "%|" not in captured.err, captured.err
    assert logging.is_progress_bar_enabled() and logging.get_verbosity() == verbosity
