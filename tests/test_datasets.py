"""attribute_dataset and captum-gim attribute-dataset / summarize (captum_gim.datasets):
every row equals explain() of it alone, malformed rows get their error, out-of-memory
batches are split, a killed run resumes, two torchrun processes share the rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from captum_gim import attribute_dataset, load_results, metrics
from captum_gim.cli import main
from captum_gim.datasets import summarize
from captum_gim.datasets.batching import length_batches
from captum_gim.datasets.reading import DatasetError, read_rows
from captum_gim.datasets.sharding import Shard
from captum_gim.datasets.writing import write_chunk
from captum_gim.explain import explain
from captum_gim.forwards import logits_forward
from captum_gim.models import make_examples, model_path

ROOT = Path(__file__).resolve().parents[1]
ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(autouse=True)
def _one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests run as one process, whatever launched pytest."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def _rows(n: int = 12, seed: int = 1_000_000) -> list[dict]:
    """Prompts of the bundled task: targets of one or two tokens, or none (predicted)."""
    rows = []
    for i, example in enumerate(make_examples(n, seed=seed)):
        target = [example.answer, f"{example.answer} neutral", None][i % 3]
        rows.append({"id": f"r{i}", "prompt": example.prompt, "target": target})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _explain_row(model, tokenizer, row: dict, task: str, score: str = "logit", baselines=None):
    ids = tokenizer(row["prompt"]).input_ids
    target = row.get("target")
    if task == "generate" and target is not None:
        target = tokenizer(target, add_special_tokens=False).input_ids
    query = tokenizer(row["query"]).input_ids if task == "similarity" else None
    return explain(
        model, tokenizer, ids, target, task=task, query_ids=query, score=score, baselines=baselines
    )


def _assert_rows_equal_explain(
    model, tokenizer, rows, out, task, score="logit", baselines=None
) -> None:
    """Each of ``rows`` in ``out`` equals explain() of it alone."""
    frame = load_results(out).set_index("id")
    for row in rows:
        got = frame.loc[row["id"]]
        assert got.error is None or got.error != got.error  # None or NaN
        want = _explain_row(model, tokenizer, row, task, score, baselines)
        assert list(got.tokens) == want.prompt_tokens
        assert list(got.target_ids) == want.target_ids
        assert list(got.target_tokens) == want.target_tokens
        scores = torch.tensor([list(r) for r in got.scores])
        torch.testing.assert_close(scores, want.token_scores, atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------- equal to explain()


@pytest.mark.parametrize("score", ["logit", "log-prob"])
def test_every_generated_row_equals_explain_of_it_alone(bundled, tmp_path: Path, score) -> None:
    model, tokenizer = bundled
    rows = _rows(12)
    rows.append({"id": "short", "prompt": "good ?", "target": "positive neutral negative"})
    out = attribute_dataset(
        model, tokenizer, rows, tmp_path / "out", score=score, max_tokens_per_batch=64
    )
    _assert_rows_equal_explain(model, tokenizer, rows, out, "generate", score)
    frame = load_results(out).set_index("id")
    with torch.no_grad():  # value: the explained score itself, teacher-forced
        ids = tokenizer(rows[0]["prompt"], return_tensors="pt").input_ids
        logits = logits_forward(model, score=score)(ids)
        answer = tokenizer.convert_tokens_to_ids(rows[0]["target"])
    assert frame.loc["r0"].value == pytest.approx(float(logits[0, answer]), rel=1e-5)


def _tiny_bert(cls, **kwargs):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=229,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
        initializer_range=0.2,
        **kwargs,
    )
    return cls(config).eval()


def _tiny_classifier(kind: str, labels: dict[int, str]):
    if kind == "bert":
        return _tiny_bert(BertForSequenceClassification, num_labels=3, id2label=labels)
    # a decoder classifier reads each row's last real token
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=229,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        num_labels=3,
        id2label=labels,
        initializer_range=0.2,
    )
    return LlamaForSequenceClassification(config).eval()


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_classified_rows_equal_explain(bundled, tmp_path: Path, kind: str) -> None:
    _, tokenizer = bundled
    labels = {0: "no", 1: "yes", 2: "maybe"}
    model = _tiny_classifier(kind, labels)
    rows = [
        {"id": str(i), "prompt": r["prompt"], "target": ["yes", "2", None][i % 3]}
        for i, r in enumerate(_rows(9))
    ]
    out = attribute_dataset(model, tokenizer, rows, tmp_path / "out", task="classify")
    _assert_rows_equal_explain(model, tokenizer, rows, out, "classify")


def test_similarity_rows_with_their_own_queries_equal_explain(bundled, tmp_path: Path) -> None:
    _, tokenizer = bundled
    model = _tiny_bert(BertModel)
    rows = [
        {"id": str(i), "prompt": r["prompt"], "query": q}
        for i, (r, q) in enumerate(zip(_rows(6), ["good", "the bad film", "dull ?"] * 2))
    ]
    out = attribute_dataset(model, tokenizer, rows, tmp_path / "out", task="similarity")
    _assert_rows_equal_explain(model, tokenizer, rows, out, "similarity")


# --------------------------------------------------------------------------- baselines


@pytest.mark.parametrize("baseline", ["zero", "<blank>", "pad"])
def test_generated_rows_with_a_baseline_equal_explain_with_it(
    bundled, tmp_path: Path, baseline: str
) -> None:
    model, tokenizer = bundled
    rows = _rows(6)
    out = attribute_dataset(
        model, tokenizer, rows, tmp_path / "out", baselines=baseline, max_tokens_per_batch=64
    )
    _assert_rows_equal_explain(model, tokenizer, rows, out, "generate", baselines=baseline)
    described = _explain_row(model, tokenizer, rows[0], "generate", baselines=baseline).baseline
    assert json.loads((out / "metadata.json").read_text())["baseline"] == described


@pytest.mark.parametrize(
    ("kind", "baseline"), [("bert", "zero"), ("bert", "<blank>"), ("llama", "<blank>")]
)
def test_classified_rows_with_a_baseline_equal_explain_with_it(
    bundled, tmp_path: Path, kind: str, baseline: str
) -> None:
    _, tokenizer = bundled
    model = _tiny_classifier(kind, {0: "no", 1: "yes", 2: "maybe"})
    rows = [
        {"id": str(i), "prompt": r["prompt"], "target": ["yes", None][i % 2]}
        for i, r in enumerate(_rows(6))
    ]
    out = attribute_dataset(
        model, tokenizer, rows, tmp_path / "out", task="classify", baselines=baseline
    )
    _assert_rows_equal_explain(model, tokenizer, rows, out, "classify", baselines=baseline)


def test_similarity_rows_with_a_token_baseline_equal_explain_with_it(
    bundled, tmp_path: Path
) -> None:
    _, tokenizer = bundled
    model = _tiny_bert(BertModel)
    rows = [
        {"id": str(i), "prompt": r["prompt"], "query": q}
        for i, (r, q) in enumerate(zip(_rows(4), ["good", "the bad film"] * 2))
    ]
    out = attribute_dataset(
        model, tokenizer, rows, tmp_path / "out", task="similarity", baselines="pad"
    )
    _assert_rows_equal_explain(model, tokenizer, rows, out, "similarity", baselines="pad")


def test_an_out_written_with_another_baseline_is_refused(bundled, tmp_path: Path) -> None:
    model, tokenizer = bundled
    rows = _rows(3)
    out = attribute_dataset(model, tokenizer, rows, tmp_path / "out")  # the default: zero
    with pytest.raises(DatasetError, match=r"other baseline .*'zero baseline'"):
        attribute_dataset(model, tokenizer, rows, out, baselines="<blank>")
    files = sorted(out.glob("part-*"))
    attribute_dataset(model, tokenizer, rows, out, baselines="zero")  # the same baseline
    assert sorted(out.glob("part-*")) == files
    other = attribute_dataset(model, tokenizer, rows, tmp_path / "blank", baselines="<blank>")
    with pytest.raises(DatasetError, match="other baseline"):
        attribute_dataset(model, tokenizer, rows, other, baselines="pad")
    attribute_dataset(
        model, tokenizer, rows, other, baselines=tokenizer.convert_tokens_to_ids("<blank>")
    )


def test_a_baseline_the_tokenizer_lacks_is_a_one_line_error_before_anything_runs(
    bundled, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, tokenizer = bundled
    with pytest.raises(ValueError, match="no mask token"):
        attribute_dataset(model, tokenizer, _rows(2), tmp_path / "out", baselines="mask")
    assert not (tmp_path / "out").exists()
    data = _write_jsonl(tmp_path / "rows.jsonl", _rows(2))
    argv = ["attribute-dataset", "--model", str(model_path()), "--data", str(data)]
    status = main([*argv, "--out", str(tmp_path / "cli"), "--baseline", "good movie"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert "--baseline: baseline 'good movie' is not one token" in err
    assert not (tmp_path / "cli").exists()


# --------------------------------------------------------------------------- device_map


def test_a_model_dispatched_with_a_device_map_gives_the_undispatched_rows(
    bundled, tmp_path: Path
) -> None:
    model, tokenizer = bundled
    rows = _rows(6)
    plain = load_results(
        attribute_dataset(
            model, tokenizer, rows, tmp_path / "plain", baselines="pad", metrics=["sufficiency"]
        )
    )
    # accelerate's hooks load the embeddings, layer 1 and the head from disk for each
    # forward pass (their weights are on the meta device)
    layers = {
        f"model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(len(model.model.layers))
    }
    device_map = {"model.embed_tokens": "disk", **layers, "model.norm": "cpu", "lm_head": "disk"}
    dispatched = AutoModelForCausalLM.from_pretrained(
        model_path(), device_map=device_map, offload_folder=str(tmp_path / "offload")
    ).eval()
    assert hasattr(dispatched.model.layers[1], "_hf_hook")
    assert dispatched.model.embed_tokens.weight.device.type == "meta"
    out = attribute_dataset(
        dispatched, tokenizer, rows, tmp_path / "out", baselines="pad", metrics=["sufficiency"]
    )
    got = load_results(out)
    assert list(got.id) == list(plain.id)
    for a, b in zip(got.itertuples(), plain.itertuples()):
        assert list(a.tokens) == list(b.tokens) and list(a.target_ids) == list(b.target_ids)
        torch.testing.assert_close(
            torch.tensor([list(r) for r in a.scores]),
            torch.tensor([list(r) for r in b.scores]),
            atol=ATOL,
            rtol=RTOL,
        )
        assert a.sufficiency == pytest.approx(b.sufficiency, rel=1e-5)
    assert json.loads((out / "metadata.json").read_text())["device_map"]["model.layers.1"] == "disk"
    # the same model on one device: resumed, not refused
    attribute_dataset(model, tokenizer, rows, out, baselines="pad", metrics=["sufficiency"])


def test_a_classifier_dispatched_with_a_device_map_gives_the_undispatched_rows(
    bundled, tmp_path: Path
) -> None:
    _, tokenizer = bundled
    model = _tiny_classifier("bert", {0: "no", 1: "yes", 2: "maybe"})
    model.save_pretrained(tmp_path / "bert")
    rows = [{"id": str(i), "prompt": r["prompt"]} for i, r in enumerate(_rows(4))]
    plain = load_results(
        attribute_dataset(model, tokenizer, rows, tmp_path / "plain", task="classify")
    )
    device_map = {
        "bert.embeddings": "disk",
        "bert.encoder.layer.0": "disk",
        "bert.encoder.layer.1": "cpu",
        "bert.pooler": "cpu",
        "classifier": "cpu",
    }
    dispatched = BertForSequenceClassification.from_pretrained(
        tmp_path / "bert", device_map=device_map, offload_folder=str(tmp_path / "offload")
    ).eval()
    out = attribute_dataset(dispatched, tokenizer, rows, tmp_path / "out", task="classify")
    got = load_results(out)
    assert list(got.target_ids) == list(plain.target_ids)
    for a, b in zip(got.scores, plain.scores):
        torch.testing.assert_close(
            torch.tensor([list(r) for r in a]),
            torch.tensor([list(r) for r in b]),
            atol=ATOL,
            rtol=RTOL,
        )


def test_cli_device_map_auto_loads_through_accelerate_in_one_process(
    bundled, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model, tokenizer = bundled
    rows = _rows(4)
    data = _write_jsonl(tmp_path / "rows.jsonl", rows)
    argv = ["attribute-dataset", "--model", str(model_path()), "--data", str(data)]
    assert main([*argv, "--out", str(tmp_path / "out"), "--device-map", "auto"]) == 0
    _assert_rows_equal_explain(model, tokenizer, rows, tmp_path / "out", "generate")
    both = [*argv, "--out", str(tmp_path / "both"), "--device-map", "auto", "--device", "cpu"]
    assert main(both) == 2
    assert "not allowed with argument" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*argv, "--out", str(tmp_path / "two"), "--device-map", "auto"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "runs in one process, not 2" in err
    assert not (tmp_path / "two").exists()


# --------------------------------------------------------------------------- errors of rows


def test_malformed_rows_get_their_error_and_the_others_finish(bundled, tmp_path: Path) -> None:
    model, tokenizer = bundled
    good = _rows(4)
    bad = [
        {"id": "no-prompt", "target": "positive"},
        {"id": "unknown-word", "prompt": "the good movie ?", "target": "zzqx"},
        {"id": "too-long", "prompt": " ".join(["good"] * 80)},
    ]
    out = attribute_dataset(model, tokenizer, good + bad, tmp_path / "out")
    frame = load_results(out).set_index("id")
    errors = frame.error.to_dict()
    assert "no prompt" in errors["no-prompt"]
    assert "'zzqx'" in errors["unknown-word"] and "does not know" in errors["unknown-word"]
    assert "at most 64" in errors["too-long"]
    assert all("\n" not in errors[r["id"]] for r in bad)
    assert frame.loc[[r["id"] for r in good]].error.isna().all()
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["rows"], summary["errors"]) == (7, 3)


def test_out_of_memory_batches_are_split_and_a_row_too_large_alone_gets_its_error(
    bundled, tmp_path: Path
) -> None:
    model, tokenizer = bundled
    rows = _rows(9)
    rows.append({"id": "huge", "prompt": " ".join(["good"] * 40) + " ?"})
    seen: list[int] = []

    def limit(_module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        seen.append(ids.shape[0])
        if ids.shape[0] > 2 or ids.shape[1] > 30:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    handle = model.register_forward_pre_hook(limit, with_kwargs=True)
    try:
        out = attribute_dataset(
            model, tokenizer, rows, tmp_path / "out", max_tokens_per_batch=10**6
        )
    finally:
        handle.remove()
    assert max(seen) > 2  # the first batch was too large
    frame = load_results(out).set_index("id")
    assert frame.loc["huge"].error.startswith("out of memory: CUDA out of memory")
    _assert_rows_equal_explain(model, tokenizer, rows[:-1], out, "generate")


# --------------------------------------------------------------------------- resume


KILLED_RUN = """
import sys, time
import torch
from captum_gim import attribute_dataset
from captum_gim.models import load_model
torch.set_num_threads(1)
model, tokenizer = load_model()
model.register_forward_pre_hook(lambda *_: time.sleep(0.05))  # slow enough to be killed
attribute_dataset(model, tokenizer, sys.argv[1], sys.argv[2], chunk_size=3,
                  max_tokens_per_batch=40)
"""


@pytest.mark.slow
def test_a_run_killed_mid_way_resumes_with_each_id_once_and_the_same_scores(
    bundled, tmp_path: Path
) -> None:
    model, tokenizer = bundled
    rows = _rows(40)
    data = _write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, str(data), str(out)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 120
    while len(list(out.glob("part-*"))) < 3 and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    written = len(load_results(out))
    assert 0 < written < len(rows), "the run was not interrupted mid-way"
    attribute_dataset(model, tokenizer, data, out, chunk_size=3, max_tokens_per_batch=40)
    frame = load_results(out)
    assert sorted(frame.id) == sorted(r["id"] for r in rows)  # each id exactly once
    assert not list(out.glob(".*.tmp"))
    whole = load_results(attribute_dataset(model, tokenizer, data, tmp_path / "whole"))
    for got, want in zip(frame.itertuples(), whole.itertuples()):
        assert got.id == want.id
        torch.testing.assert_close(
            torch.tensor([list(s) for s in got.scores]),
            torch.tensor([list(s) for s in want.scores]),
            atol=ATOL,
            rtol=RTOL,
        )


def test_resume_refuses_other_settings_and_no_resume_refuses_results(
    bundled, tmp_path: Path
) -> None:
    model, tokenizer = bundled
    rows = _rows(3)
    out = attribute_dataset(model, tokenizer, rows, tmp_path / "out")
    with pytest.raises(DatasetError, match="other score"):
        attribute_dataset(model, tokenizer, rows, out, score="log-prob")
    with pytest.raises(DatasetError, match="already holds results"):
        attribute_dataset(model, tokenizer, rows, out, resume=False)
    files = sorted(out.glob("part-*"))
    attribute_dataset(model, tokenizer, rows, out)  # nothing left to do
    assert sorted(out.glob("part-*")) == files


# --------------------------------------------------------------------------- processes


@pytest.mark.slow
def test_two_torchrun_processes_share_the_rows_and_rank_0_summarizes(
    bundled, tmp_path: Path
) -> None:
    model, tokenizer = bundled
    rows = _rows(16)
    data = _write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    completed = subprocess.run(
        [
            sys.executable,  # torchrun, as the interpreter running the tests has it
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "captum_gim",
            "attribute-dataset",
            "--model",
            str(model_path()),
            "--data",
            str(data),
            "--out",
            str(out),
            "--chunk-size",
            "4",
        ],
        cwd=ROOT,
        env={**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    ranks = {p.name.split("-")[1] for p in out.glob("part-*.parquet")}
    assert ranks == {"00000", "00001"}
    assert sorted(load_results(out).id) == sorted(r["id"] for r in rows)
    for rank in (0, 1):  # each process wrote its own shard, by id
        for part in out.glob(f"part-{rank:05d}-*.parquet"):
            ids = pq.read_table(part, columns=["id"]).column("id").to_pylist()
            assert all(Shard(rank, 2).owns(i) for i in ids)
    assert json.loads((out / "metadata.json").read_text())["world_size"] == 2
    assert json.loads((out / "summary.json").read_text())["rows"] == len(rows)
    _assert_rows_equal_explain(model, tokenizer, rows, out, "generate")


def test_shards_partition_the_ids_deterministically() -> None:
    ids = [f"row-{i}" for i in range(200)]
    owners = [[Shard(r, 3).owns(i) for r in range(3)] for i in ids]
    assert all(sum(o) == 1 for o in owners)
    assert min(sum(o[r] for o in owners) for r in range(3)) > 40
    env = {"RANK": "1", "WORLD_SIZE": "3", "LOCAL_RANK": "0"}
    assert Shard.from_environment(env) == Shard(1, 3, 0)
    with pytest.raises(ValueError, match="not within"):
        Shard.from_environment({"RANK": "3", "WORLD_SIZE": "3"})


def test_batches_stay_within_the_token_budget_longest_first() -> None:
    lengths = [5, 30, 7, 12, 12, 3, 50]
    batches = length_batches(list(range(7)), lengths, max_tokens_per_batch=36, batch_size=2)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert batches[0] == [6]  # longer than the budget: alone
    for batch in batches:
        assert len(batch) <= 2
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 36
    assert [lengths[b[0]] for b in batches] == sorted(
        (lengths[b[0]] for b in batches), reverse=True
    )


# --------------------------------------------------------------------------- inputs


def test_jsonl_csv_parquet_and_a_saved_dataset_give_the_same_rows(tmp_path: Path) -> None:
    import datasets
    import pandas as pd

    records = [
        {"key": "a", "text": "the good movie ?", "label": "positive"},
        {"key": "b", "text": "a dull film ?", "label": None},
    ]
    frame = pd.DataFrame(records)
    _write_jsonl(tmp_path / "rows.jsonl", records)
    (tmp_path / "rows.json").write_text(json.dumps(records))  # a JSON array
    frame.to_csv(tmp_path / "rows.csv", index=False)
    frame.to_parquet(tmp_path / "rows.parquet")
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    columns = {"prompt_column": "text", "target_column": "label", "id_column": "key"}
    expected = read_rows(tmp_path / "rows.jsonl", **columns)
    assert [(r.id, r.prompt, r.target) for r in expected] == [
        ("a", "the good movie ?", "positive"),
        ("b", "a dull film ?", None),
    ]
    for name in ("rows.json", "rows.csv", "rows.parquet", "saved"):
        assert read_rows(tmp_path / name, **columns) == expected
    assert [r.id for r in read_rows(tmp_path / "rows.jsonl", prompt_column="text")] == ["0", "1"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ('{"prompt": "a"}\nnot json\n', "line 2 is not JSON"),
        ('{"text": "a"}\n', "no column 'prompt'"),
        ('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', "same id '1'"),
    ],
)
def test_an_unreadable_input_file_is_a_one_line_error_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    data = tmp_path / "rows.jsonl"
    if content is not None:
        data.write_text(content)
    missing_model = tmp_path / "no-model"  # the data is read first
    status = main(
        [
            "attribute-dataset",
            "--model",
            str(missing_model),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and message in err and "no-model" not in err


# --------------------------------------------------------------------------- results


def test_cli_metrics_jsonl_summarize_and_report(bundled, tmp_path: Path, capsys) -> None:
    model, tokenizer = bundled
    rows = _rows(6)
    for row in rows:
        row["target"] = row["target"] and row["target"].split()[0]
    data = _write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out"
    status = main(
        [
            "attribute-dataset",
            "--model",
            str(model_path()),
            "--data",
            str(data),
            "--out",
            str(out),
            "--format",
            "jsonl",
            "--metrics",
            "comprehensiveness,sufficiency",
            "--metrics-token",
            "<blank>",
            "--temperature",
            "3",
            "--chunk-size",
            "4",
        ]
    )
    assert status == 0
    assert sorted(p.name for p in out.glob("part-*")) == [
        "part-00000-000000.jsonl",
        "part-00000-000001.jsonl",
    ]
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["gim"]["temperature"] == 3.0 and metadata["versions"]["torch"]
    frame = load_results(out).set_index("id")
    # comprehensiveness of a one-token target: captum_gim.metrics on the same scores
    row = rows[0]
    ids = torch.tensor([tokenizer(row["prompt"]).input_ids])
    expected = metrics.comprehensiveness(
        logits_forward(model),
        ids,
        torch.tensor([frame.loc["r0"].scores[0]]),
        tokenizer.convert_tokens_to_ids("<blank>"),
        target=tokenizer.convert_tokens_to_ids(row["target"]),
    )
    assert frame.loc["r0"].comprehensiveness == pytest.approx(float(expected.aopc[0]), rel=1e-5)
    assert main(["summarize", str(out), "--page-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "mean_comprehensiveness" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == 6 and summary["errors"] == 0
    assert summary["mean_value"] == pytest.approx(frame.value.mean())
    page = (out / "report.html").read_text()
    assert page.count('<div class="row">') == 4 and 'href="report-2.html"' in page
    assert (out / "report-2.html").read_text().count('<div class="row">') == 2


def test_top_tokens_need_a_minimum_count(tmp_path: Path, capsys) -> None:
    common = {"tokens": ["the", "film", "?"], "target": "x", "value": 1.0, "error": None}
    records = [
        {**common, "id": str(i), "scores": [[0.1 * i, 1.0, 0.0]], "token_ids": [1, 2, 3]}
        for i in range(6)
    ]
    records.append({**common, "id": "once", "tokens": ["rare"], "scores": [[50.0]]})
    for record in records:
        record.update(prompt="p", token_ids=[1] * len(record["tokens"]))
        record.update(target_tokens=["x"], target_ids=[9])
    write_chunk(tmp_path / "part-00000-000000.jsonl", records)
    top = summarize(tmp_path)["top_tokens"]  # default: seen at least 5 times
    assert [t["token"] for t in top] == ["film", "the", "?"]
    assert top[0] == {"token": "film", "mean_attribution": 1.0, "count": 6}
    assert top[1]["mean_attribution"] == pytest.approx(0.25)
    assert summarize(tmp_path, min_count=1)["top_tokens"][0]["token"] == "rare"
    assert summarize(tmp_path, min_count=7)["top_tokens"] == []
    assert main(["summarize", str(tmp_path), "--min-count", "1"]) == 0
    assert "rare" in capsys.readouterr().out
    assert json.loads((tmp_path / "summary.json").read_text())["top_tokens_min_count"] == 1


def test_summarize_an_empty_directory_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    assert main(["summarize", str(tmp_path)]) == 2
    assert "holds no results" in capsys.readouterr().err


def test_a_log_line_per_chunk_and_a_bar_only_when_asked(
    bundled, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    model, tokenizer = bundled
    rows = _rows(5)
    with caplog.at_level("INFO", logger="captum_gim.datasets"):
        attribute_dataset(model, tokenizer, rows, tmp_path / "quiet", chunk_size=2)
    assert capsys.readouterr().err == ""  # stderr is not a terminal: no bar
    chunks = [r.getMessage() for r in caplog.records if "wrote part-" in r.getMessage()]
    assert len(chunks) == 3 and "prompts/s" in chunks[0] and "tokens/s" in chunks[0]
    attribute_dataset(model, tokenizer, rows, tmp_path / "bar", progress=True)
    assert "rank 0: 100%" in capsys.readouterr().err


def test_an_interrupted_run_writes_the_rows_it_finished(bundled, tmp_path: Path) -> None:
    model, tokenizer = bundled
    rows = [{**row, "target": "positive"} for row in _rows(6)]  # one forward pass per batch
    calls = []

    def interrupt_second_batch(*_):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    handle = model.register_forward_pre_hook(interrupt_second_batch)
    try:
        with pytest.raises(KeyboardInterrupt):
            attribute_dataset(model, tokenizer, rows, tmp_path / "out", batch_size=3)
    finally:
        handle.remove()
    assert len(load_results(tmp_path / "out")) == 3  # the first batch, in a partial chunk
