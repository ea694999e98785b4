"""Tests for captum_gim.compare: GIM and Captum methods on the same inputs and target."""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from captum.attr import (
    InputXGradient,
    IntegratedGradients,
    LayerGradientXActivation,
    LayerIntegratedGradients,
    NeuronGradient,
    NoiseTunnel,
    Saliency,
)
from matplotlib.figure import Figure
from tiny_models import FAMILY_BY_NAME, sample_ids

from captum_gim import GIMAttribution, GIMConfig
from captum_gim.compare import ComparisonResult, compare, logits_forward
from captum_gim.models import load_model

TARGET = 5


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.set_num_threads(1)
    return FAMILY_BY_NAME["llama"].build("sdpa")


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return sample_ids(batch=2, length=6)


@pytest.fixture(scope="module")
def result(model: torch.nn.Module, ids: torch.Tensor) -> ComparisonResult:
    return compare(
        model,
        None,
        ids,
        target=TARGET,
        methods={"Saliency": Saliency, "InputXGradient": InputXGradient},
    )


def _embeds(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model.get_input_embeddings()(ids).detach()


def test_result_has_gim_first_then_the_methods_in_order(result: ComparisonResult) -> None:
    assert result.methods == ["GIM", "Saliency", "InputXGradient"]
    assert list(result.seconds) == result.methods
    assert all(seconds > 0 for seconds in result.seconds.values())


def test_scores_are_attributions_summed_over_the_hidden_dimension(
    result: ComparisonResult,
) -> None:
    for method in result.methods:
        attributions = result.attributions[method]
        assert attributions.shape == (2, 6, 32)
        torch.testing.assert_close(result.scores[method], attributions.sum(-1))


def test_gim_row_equals_gim_attribution(
    model: torch.nn.Module, ids: torch.Tensor, result: ComparisonResult
) -> None:
    gim = GIMAttribution(logits_forward(model), model)
    want = gim.attribute(_embeds(model, ids), target=TARGET)
    torch.testing.assert_close(result.attributions["GIM"], want)


def test_gim_with_all_rules_off_equals_input_x_gradient(
    model: torch.nn.Module, ids: torch.Tensor
) -> None:
    off = compare(model, None, ids, TARGET, [InputXGradient], gim=GIMConfig.all_rules_off())
    torch.testing.assert_close(off.scores["GIM"], off.scores["InputXGradient"])


def test_gim_false_runs_only_the_given_methods(model: torch.nn.Module, ids: torch.Tensor) -> None:
    assert compare(model, None, ids, TARGET, [Saliency], gim=False).methods == ["Saliency"]
    custom = {"GIM": GIMAttribution(logits_forward(model), model, temperature=1.5)}
    assert compare(model, None, ids, TARGET, custom, gim=False).methods == ["GIM"]


def test_class_and_instance_on_logits_forward_agree(
    model: torch.nn.Module, ids: torch.Tensor, result: ComparisonResult
) -> None:
    instance = Saliency(logits_forward(model))
    again = compare(model, None, ids, TARGET, {"Saliency": instance}, gim=False)
    torch.testing.assert_close(again.scores["Saliency"], result.scores["Saliency"])


def test_layer_methods_get_token_ids_and_match_their_embedding_twins(
    model: torch.nn.Module, ids: torch.Tensor, result: ComparisonResult
) -> None:
    layered = compare(model, None, ids, TARGET, [LayerGradientXActivation], gim=False)
    torch.testing.assert_close(
        layered.scores["LayerGradientXActivation"], result.scores["InputXGradient"]
    )


def test_default_methods_and_attribute_kwargs(model: torch.nn.Module, ids: torch.Tensor) -> None:
    default = compare(
        model, None, ids, TARGET, attribute_kwargs={"IntegratedGradients": {"n_steps": 4}}
    )
    assert default.methods == ["GIM", "Saliency", "InputXGradient", "IntegratedGradients"]
    ig = IntegratedGradients(logits_forward(model))
    want = ig.attribute(_embeds(model, ids), target=TARGET, n_steps=4)
    torch.testing.assert_close(default.attributions["IntegratedGradients"], want)


def test_wrapped_instance_such_as_noise_tunnel_runs(
    model: torch.nn.Module, ids: torch.Tensor
) -> None:
    tunnel = NoiseTunnel(Saliency(logits_forward(model)))
    smooth = compare(
        model,
        None,
        ids,
        TARGET,
        {"SmoothGrad": tunnel},
        attribute_kwargs={"SmoothGrad": {"nt_samples": 3, "stdevs": 0.01}},
    )
    assert smooth.scores["SmoothGrad"].shape == (2, 6)
    assert torch.isfinite(smooth.scores["SmoothGrad"]).all()


def test_default_target_is_the_greedy_next_token_of_each_example(
    model: torch.nn.Module, ids: torch.Tensor
) -> None:
    greedy = compare(model, None, ids, methods=[Saliency])
    with torch.no_grad():
        want = model(ids).logits[:, -1].argmax(-1).tolist()
    assert greedy.target == want
    per_example = compare(model, None, ids, target=torch.tensor(want), methods=[Saliency])
    torch.testing.assert_close(per_example.scores["GIM"], greedy.scores["GIM"])


def test_log_prob_score_explains_the_log_probability(
    model: torch.nn.Module, ids: torch.Tensor
) -> None:
    def log_prob(embeds: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(model(inputs_embeds=embeds).logits[:, -1], dim=-1)

    got = compare(model, None, ids, TARGET, [], score="log-prob")
    want = GIMAttribution(log_prob, model).attribute(_embeds(model, ids), target=TARGET)
    torch.testing.assert_close(got.attributions["GIM"], want)
    with pytest.warns(DeprecationWarning, match="log_probs=True is deprecated.*'log-prob'"):
        old = compare(model, None, ids, TARGET, [], log_probs=True)
    torch.testing.assert_close(old.attributions["GIM"], want)
    with pytest.warns(DeprecationWarning, match="logits_forward: log_probs=True"):
        forward = logits_forward(model, log_probs=True)
    torch.testing.assert_close(forward(_embeds(model, ids)), log_prob(_embeds(model, ids)))


def test_baselines_reach_gim_and_the_methods_that_take_them() -> None:
    model, tokenizer = load_model()
    ids = tokenizer("the movie was great ?", return_tensors="pt").input_ids
    got = compare(model, tokenizer, ids, 5, [IntegratedGradients, Saliency], baselines="<blank>")
    blank = tokenizer.convert_tokens_to_ids("<blank>")
    base_ids = torch.cat([ids[:, :1], torch.full_like(ids[:, 1:], blank)], dim=1)  # <bos> kept
    x, xb = _embeds(model, ids), _embeds(model, base_ids)
    forward = logits_forward(model)
    want = GIMAttribution(forward, model).attribute(x, target=5, baselines=xb)
    torch.testing.assert_close(got.attributions["GIM"], want)
    ig = IntegratedGradients(forward).attribute(x.requires_grad_(), target=5, baselines=xb)
    torch.testing.assert_close(got.attributions["IntegratedGradients"], ig.detach())
    with pytest.raises(TypeError, match="needs the tokenizer"):
        compare(model, None, ids, 5, [], baselines="mask")


def test_logits_forward_takes_ids_or_embeddings_and_reads_the_last_real_token(
    model: torch.nn.Module,
) -> None:
    forward = logits_forward(model)
    ids = sample_ids(batch=1, length=4)
    with torch.no_grad():
        alone = forward(ids)
        torch.testing.assert_close(forward(_embeds(model, ids)), alone)
        padded = torch.cat([ids, torch.zeros(1, 2, dtype=ids.dtype)], dim=1)
        mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
        torch.testing.assert_close(forward(padded, mask), alone, atol=1e-5, rtol=1e-5)


def test_padded_positions_are_left_out_of_records_table_and_plot(
    model: torch.nn.Module,
) -> None:
    ids = sample_ids(batch=2, length=5)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    padded = compare(model, None, ids, TARGET, [Saliency], attention_mask=mask)
    records = padded.to_records()
    assert {(r["example"], r["position"]) for r in records if r["method"] == "GIM"} == {
        (0, 2),
        (0, 3),
        (0, 4),
        *((1, p) for p in range(5)),
    }
    assert len(padded.table(example=0).splitlines()) == 2 + 3 + 1
    boxes = [p for ax in padded.plot(example=0).axes for p in ax.patches]
    assert len(boxes) == 2 * 3


def test_to_records_is_a_tidy_table(result: ComparisonResult, ids: torch.Tensor) -> None:
    records = result.to_records()
    assert len(records) == 3 * ids.numel()
    first = records[0]
    assert set(first) == {"method", "example", "position", "token", "score", "target", "seconds"}
    assert first["token"] == str(int(ids[0, 0]))
    assert first["score"] == pytest.approx(float(result.scores["GIM"][0, 0]))
    assert first["target"] == TARGET


def test_to_pandas_without_pandas_says_how_to_install_it(
    result: ComparisonResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pip install pandas"):
        result.to_pandas()


def test_to_pandas_has_one_row_per_record(result: ComparisonResult) -> None:
    pytest.importorskip("pandas")
    table = result.to_pandas()
    assert len(table) == len(result.to_records())
    assert list(table.columns)[:3] == ["method", "example", "position"]


def test_table_and_plot_of_the_bundled_model_name_every_method_and_token() -> None:
    model, tokenizer = load_model()
    ids = tokenizer("the movie was charming ?", return_tensors="pt").input_ids
    named = compare(
        model,
        tokenizer,
        ids,
        methods=[Saliency, LayerIntegratedGradients],
        attribute_kwargs={"LayerIntegratedGradients": {"n_steps": 4}},
    )
    assert tokenizer.convert_ids_to_tokens(named.target) == ["positive"]
    lines = named.table().splitlines()
    assert lines[0].split() == ["#", "token", "GIM", "Saliency", "LayerIntegratedGradients"]
    assert [line.split()[1] for line in lines[2:-1]] == [
        "<bos>",
        "the",
        "movie",
        "was",
        "charming",
        "?",
    ]
    assert lines[-1].split()[0] == "seconds"
    figure = named.plot(title="GIM vs Captum")
    assert isinstance(figure, Figure)
    row_titles = [ax.get_title(loc="left") for ax in figure.axes]
    assert row_titles[:3] == ["GIM", "Saliency", "LayerIntegratedGradients"]


def test_tokens_may_be_given_as_strings(model: torch.nn.Module) -> None:
    ids = sample_ids(batch=1, length=3)
    labelled = compare(model, ["a", "b", "c"], ids[0], TARGET, [])
    assert labelled.tokens == [["a", "b", "c"]]
    with pytest.raises(ValueError, match="one token string per id"):
        compare(model, ["a", "b"], ids, TARGET, [])


@pytest.mark.parametrize(
    ("methods", "kwargs", "error", "match"),
    [
        ({"GIM": Saliency}, {}, ValueError, "reserved"),
        ([Saliency, Saliency], {}, ValueError, "dict"),
        ({"Saliency": Saliency}, {"attribute_kwargs": {"IG": {}}}, ValueError, "IG"),
        ({"f": print}, {}, TypeError, "Captum attribution class"),
        ({"Neuron": NeuronGradient}, {}, TypeError, "neuron attribution"),
        ({"Tunnel": NoiseTunnel}, {}, TypeError, "Build it yourself"),
    ],
)
def test_bad_methods_raise_clear_errors(
    model: torch.nn.Module, methods, kwargs, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        compare(model, None, sample_ids(1, 3), TARGET, methods, **kwargs)


def test_float_input_ids_are_refused(model: torch.nn.Module) -> None:
    with pytest.raises(TypeError, match="token ids"):
        compare(model, None, torch.zeros(1, 3), TARGET)
