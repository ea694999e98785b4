r"""Trains the small induction (repeated-token copying) model shipped as
``captum_gim/models/induction_llama``.

A prompt is ``<bos> x1 .. x8 x1 .. x7`` of random symbols; the model predicts
``x8``, which it can only do by an induction circuit (a previous-token head in
layer 0 and an induction head in layer 1 that attends to the token after the
earlier copy of ``x7``). Two layers, four heads, trained in about a minute on one
CPU core.

Usage::

    python benchmarks/train_induction_model.py            # writes the bundled folder
    python benchmarks/train_induction_model.py --out /tmp/induction
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
from word_models import two_layer_llama, word_tokenizer

SEED = 0
SYMBOLS = 32
HALF = 8
SPECIALS = ("<pad>", "<bos>", "<unk>")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "captum_gim" / "models" / "induction_llama"


def vocab() -> dict[str, int]:
    r"""Token to id: the three special tokens, then ``s0`` .. ``s31``."""
    words = [*SPECIALS, *(f"s{i}" for i in range(SYMBOLS))]
    return {word: i for i, word in enumerate(words)}


def sample(batch: int, generator: torch.Generator) -> torch.Tensor:
    r"""``batch`` prompts ``<bos> x1..x8 x1..x8`` as ids (the last is the answer)."""
    first = len(SPECIALS)
    half = torch.stack(
        [torch.randperm(SYMBOLS, generator=generator)[:HALF] + first for _ in range(batch)]
    )
    bos = torch.full((batch, 1), vocab()["<bos>"])
    return torch.cat([bos, half, half], dim=1)


def build_tokenizer() -> PreTrainedTokenizerFast:
    r"""Whitespace word-level tokenizer that prepends ``<bos>`` and pads on the left."""
    return word_tokenizer(vocab())


def build_model() -> LlamaForCausalLM:
    r"""A freshly initialised two-layer Llama (seeded)."""
    return two_layer_llama(vocab(), SEED)


def accuracy(model: LlamaForCausalLM, n: int = 1000, seed: int = 1_000_000) -> float:
    r"""Share of held-out prompts whose last copied token is predicted."""
    ids = sample(n, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits[:, -1]
    return float((logits.argmax(-1) == ids[:, -1]).float().mean())


def train(steps: int, batch: int, lr: float) -> LlamaForCausalLM:
    r"""Trains on the second half of every prompt (the copied tokens)."""
    model = build_model().train()
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    for step in range(steps):
        ids = sample(batch, generator)
        logits = model(ids[:, :-1]).logits[:, HALF + 1 :]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, HALF + 2 :].reshape(-1)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 200 == 0:
            print(f"step {step:5d}  loss {loss.item():.4f}", flush=True)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    model = train(args.steps, args.batch_size, args.lr)
    print(f"trained in {time.perf_counter() - start:.1f}s; held-out accuracy {accuracy(model):.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    build_tokenizer().save_pretrained(args.out)
    task = {"task": "induction", "symbols": SYMBOLS, "half": HALF, "specials": list(SPECIALS)}
    (args.out / "task.json").write_text(json.dumps(task, indent=1) + "\n")
    for p in args.out.iterdir():
        p.chmod(0o644)
    size = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    print(f"wrote {args.out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
