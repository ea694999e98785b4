r"""
Trains the bundled model ``redundant_evidence_llama`` and writes it to
``captum_gim/models/redundant_evidence_llama/``.

The model is a small Llama (RMSNorm, rotary embeddings, SwiGLU, grouped-query
attention) trained on the redundant-evidence sentiment task of
:mod:`captum_gim.models.tasks`: it reads a sentence of filler words with zero
to three evidence words of one polarity and predicts ``positive``,
``negative`` or ``neutral`` after the final ``?``. Only the answer at the last
position is trained. Any single evidence word is enough, so on prompts with
two evidence words the model self-repairs: removing one barely moves the
answer logit, removing both moves it a lot.

Deterministic (fixed seeds, one CPU thread); takes about one minute.

Usage::

    python benchmarks/train_bundled_model.py [--out DIR] [--steps N]
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from tokenizers.processors import TemplateProcessing
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from captum_gim.models.tasks import (
    BOS_TOKEN,
    PAD_TOKEN,
    UNK_TOKEN,
    Example,
    RedundantEvidenceTask,
)

NAME = "redundant_evidence_llama"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "captum_gim" / "models" / NAME
SEED = 0
HELDOUT_SEED = 1_000_000


def build_tokenizer(task: RedundantEvidenceTask) -> PreTrainedTokenizerFast:
    r"""
    Word-level tokenizer of the task: splits on whitespace, prepends ``<bos>``,
    pads on the left.

    Args:
        task (RedundantEvidenceTask): The task whose vocabulary is used.

    Returns:
        PreTrainedTokenizerFast: The tokenizer.
    """
    vocab = task.token_to_id
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.post_processor = TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        model_max_length=64,
    )


def build_model(task: RedundantEvidenceTask) -> LlamaForCausalLM:
    r"""
    A freshly initialised small Llama for the task (seeded).

    Args:
        task (RedundantEvidenceTask): The task whose vocabulary is used.

    Returns:
        LlamaForCausalLM: The model.
    """
    ids = task.token_to_id
    config = LlamaConfig(
        vocab_size=len(task.vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=ids[BOS_TOKEN],
        pad_token_id=ids[PAD_TOKEN],
        eos_token_id=None,
    )
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config)


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Right-pads a batch; returns ``(input_ids, last_index)``."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
    last = torch.tensor([len(e.input_ids) - 1 for e in examples])
    return ids, last


def last_logits(model: LlamaForCausalLM, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    r"""Logits at each prompt's last position (right padding needs no mask)."""
    hidden = model.model(input_ids=ids).last_hidden_state
    return model.lm_head(hidden[torch.arange(len(ids)), last])


@torch.no_grad()
def evaluate(
    model: LlamaForCausalLM, task: RedundantEvidenceTask, n: int = 1000
) -> dict[str, float]:
    r"""
    Held-out accuracy and self-repair ratio.

    The self-repair ratio is the mean, over prompts with exactly two evidence
    words and over which of the two is removed, of the drop of the answer
    logit when one evidence word is replaced by ``<blank>`` divided by the
    drop when both are.
    """
    model.eval()
    pad = task.token_to_id[PAD_TOKEN]
    examples = task.make_examples(n, seed=HELDOUT_SEED)
    ids, last = collate(examples, pad)
    pred = last_logits(model, ids, last).argmax(-1)
    acc = (pred == torch.tensor([e.answer_id for e in examples])).float().mean().item()

    pairs = task.make_examples(n // 2, seed=HELDOUT_SEED + 1, num_evidence=2)
    variants: list[Example] = []
    for e in pairs:
        for removed in ((0,), (1,), (0, 1)):
            new = list(e.input_ids)
            for r in removed:
                new[e.evidence_positions[r]] = task.blank_id
            variants.append(replace(e, input_ids=tuple(new), evidence_positions=()))
    ids, last = collate(list(pairs) + variants, pad)
    logits = last_logits(model, ids, last)
    ans = torch.tensor([e.answer_id for e in pairs])
    base = logits[: len(pairs)].gather(1, ans[:, None])[:, 0]
    var = (
        logits[len(pairs) :]
        .view(len(pairs), 3, -1)
        .gather(2, ans[:, None, None].expand(-1, 3, 1))[..., 0]
    )
    drops = base[:, None] - var
    ratio = (drops[:, :2] / drops[:, 2:]).mean().item()
    model.train()
    return {
        "accuracy": acc,
        "self_repair_ratio": ratio,
        "single_drop": drops[:, :2].mean().item(),
        "double_drop": drops[:, 2].mean().item(),
    }


def train(
    steps: int, batch_size: int = 64, lr: float = 3e-3, label_smoothing: float = 0.0
) -> tuple[LlamaForCausalLM, RedundantEvidenceTask]:
    r"""Trains the model; returns it with its task."""
    task = RedundantEvidenceTask()
    model = build_model(task)
    model.train()
    pad = task.token_to_id[PAD_TOKEN]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    rng = random.Random(SEED)
    start = time.perf_counter()
    for step in range(steps):
        batch = [task.sample(rng) for _ in range(batch_size)]
        ids, last = collate(batch, pad)
        target = torch.tensor([e.answer_id for e in batch])
        loss = F.cross_entropy(
            last_logits(model, ids, last), target, label_smoothing=label_smoothing
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            msg = f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f}s"
            if step % 1000 == 0 or step == steps - 1:
                m = evaluate(model, task, n=400)
                msg += "  " + "  ".join(f"{k} {v:.3f}" for k, v in m.items())
            print(msg, flush=True)
    model.eval()
    return model, task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    random.seed(SEED)
    torch.manual_seed(SEED)

    start = time.perf_counter()
    model, task = train(args.steps, args.batch_size, args.lr, args.label_smoothing)
    elapsed = time.perf_counter() - start
    metrics = evaluate(model, task, n=2000)
    print(
        f"trained in {elapsed:.1f}s; held-out: "
        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    )

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    build_tokenizer(task).save_pretrained(args.out)
    task.save(args.out / "task.json")
    for p in args.out.iterdir():
        p.chmod(0o644)  # save_pretrained writes the weights as 0o600
    size = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    print(f"wrote {args.out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
