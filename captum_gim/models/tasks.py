r"""
The synthetic task of the bundled models: sentiment from redundant evidence words.

A prompt is a short "sentence" of neutral filler words with zero to three
evidence words of one polarity inserted at random positions, followed by the
question marker ``?``. The answer, the next token after the prompt, is
``positive`` or ``negative`` when the evidence words are positive or negative
and ``neutral`` when there is no evidence word. Every evidence word is enough
for the answer on its own, so a prompt with two evidence words has two
*redundant* pieces of evidence: removing one of them barely changes the
model's output (self-repair through the attention softmax), removing both
changes the answer. The evidence positions are known exactly, which makes the
task a ground truth for token attributions.

The word lists and the sampling distribution are stored with every bundled
model (``task.json``), so held-out prompts always match the model's
vocabulary.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
UNK_TOKEN = "<unk>"
BLANK_TOKEN = "<blank>"
QUESTION_TOKEN = "?"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, UNK_TOKEN)

POSITIVE_WORDS = (
    "good", "great", "happy", "excellent", "wonderful", "lovely", "superb",
    "brilliant", "delightful", "pleasant", "fantastic", "joyful", "charming",
    "splendid", "marvelous", "cheerful", "glorious", "terrific", "admirable",
    "enjoyable", "beautiful", "perfect", "graceful", "awesome",
)  # fmt: skip

NEGATIVE_WORDS = (
    "bad", "awful", "terrible", "sad", "horrible", "dreadful", "poor",
    "nasty", "miserable", "boring", "ugly", "painful", "annoying", "gloomy",
    "disgusting", "tragic", "lousy", "grim", "hateful", "dismal", "rotten",
    "tedious", "clumsy", "worthless",
)  # fmt: skip

FILLER_WORDS = (
    "the", "a", "an", "this", "that", "these", "those", "some", "every",
    "one", "two", "three", "many", "few", "my", "your", "his", "her", "our",
    "their", "its", "and", "or", "but", "so", "then", "when", "while", "after",
    "before", "with", "without", "from", "into", "onto", "over", "under",
    "near", "at", "in", "on", "of", "for", "to", "by", "about", "around",
    "movie", "film", "book", "story", "song", "album", "show", "play",
    "dinner", "lunch", "meal", "cafe", "hotel", "room", "trip", "train",
    "bus", "car", "road", "city", "town", "village", "park", "garden",
    "house", "kitchen", "table", "chair", "window", "door", "street",
    "river", "lake", "sea", "hill", "forest", "tree", "flower", "cat", "dog",
    "bird", "horse", "friend", "teacher", "doctor", "actor", "singer",
    "writer", "waiter", "driver", "child", "family", "neighbor", "team",
    "game", "match", "class", "lesson", "office", "meeting", "weekend",
    "morning", "evening", "night", "day", "week", "year", "summer", "winter",
    "was", "is", "were", "are", "seemed", "felt", "looked", "became", "stayed",
    "went", "came", "saw", "watched", "read", "heard", "ate", "drank",
    "visited", "walked", "talked", "said", "thought", "made", "took", "gave",
    "found", "left", "arrived", "opened", "closed", "started", "ended",
    "very", "quite", "really", "rather", "also", "still", "just", "again",
    "today", "yesterday", "there", "here", "long", "short", "old", "new",
    "big", "small", "red", "blue", "green", "quiet", "loud", "late", "early",
)  # fmt: skip

ANSWER_WORDS = {"positive": "positive", "negative": "negative", "neutral": "neutral"}


@dataclass(frozen=True)
class Example:
    r"""
    One prompt of the redundant-evidence task with its ground truth.

    Args:
        prompt (str): Prompt text, words separated by single spaces, without
                    the ``<bos>`` token (the tokenizer prepends it).
        input_ids (tuple[int, ...]): Token ids of the prompt as the bundled
                    tokenizer encodes ``prompt``: ``<bos>`` first, ``?`` last.
        answer (str): The correct answer word, ``"positive"``,
                    ``"negative"`` or ``"neutral"``.
        answer_id (int): Token id of ``answer``.
        evidence_positions (tuple[int, ...]): Indices into ``input_ids`` of
                    the evidence words, sorted. Empty for neutral prompts.
                    Position 0 (``<bos>``) and the last position (``?``) are
                    never evidence.
    """

    prompt: str
    input_ids: tuple[int, ...]
    answer: str
    answer_id: int
    evidence_positions: tuple[int, ...]

    @property
    def num_evidence(self) -> int:
        r"""Number of evidence words in the prompt."""
        return len(self.evidence_positions)


@dataclass(frozen=True)
class RedundantEvidenceTask:
    r"""
    Vocabulary and sampling distribution of the redundant-evidence task.

    Args:
        positive_words (tuple[str, ...]): Words that each make the answer
                    ``positive``.
        negative_words (tuple[str, ...]): Words that each make the answer
                    ``negative``.
        filler_words (tuple[str, ...]): Neutral words that fill the prompt.
        answer_words (dict[str, str]): Answer token of each class, keys
                    ``"positive"``, ``"negative"`` and ``"neutral"``.
        min_words (int): Fewest words in a prompt, evidence included, the
                    question marker excluded.
        max_words (int): Most words in a prompt.
        evidence_probs (tuple[float, ...]): Probability of exactly 0, 1, 2,
                    ... evidence words in a prompt.
        blank_prob (float): Probability that a prompt has some of its filler
                    words replaced by the baseline token ``<blank>`` (a random
                    fraction of them, up to all), so that the model treats the
                    baseline token as neutral filler.

    Examples::

        >>> from captum_gim.models.tasks import RedundantEvidenceTask
        >>> task = RedundantEvidenceTask()
        >>> ex = task.make_examples(1, seed=0, num_evidence=2)[0]
        >>> len(ex.evidence_positions)
        2
    """

    positive_words: tuple[str, ...] = POSITIVE_WORDS
    negative_words: tuple[str, ...] = NEGATIVE_WORDS
    filler_words: tuple[str, ...] = FILLER_WORDS
    answer_words: dict[str, str] = field(default_factory=lambda: dict(ANSWER_WORDS))
    min_words: int = 6
    max_words: int = 16
    evidence_probs: tuple[float, ...] = (0.2, 0.25, 0.4, 0.15)
    blank_prob: float = 0.3

    def __post_init__(self) -> None:
        words = (
            list(self.positive_words)
            + list(self.negative_words)
            + list(self.filler_words)
            + list(self.answer_words.values())
        )
        reserved = set(SPECIAL_TOKENS) | {BLANK_TOKEN, QUESTION_TOKEN}
        if len(set(words)) != len(words) or reserved & set(words):
            raise ValueError("task words must be distinct and not reserved tokens")
        if set(self.answer_words) != {"positive", "negative", "neutral"}:
            raise ValueError("answer_words needs keys positive, negative, neutral")
        if len(self.evidence_probs) - 1 > self.min_words:
            raise ValueError("min_words must allow the largest evidence count")

    @property
    def vocab(self) -> list[str]:
        r"""
        The vocabulary in id order: special tokens, ``<blank>``, ``?``, the
        answer words, the evidence words, then the filler words.
        """
        return (
            list(SPECIAL_TOKENS)
            + [BLANK_TOKEN, QUESTION_TOKEN]
            + [self.answer_words[k] for k in ("positive", "negative", "neutral")]
            + list(self.positive_words)
            + list(self.negative_words)
            + list(self.filler_words)
        )

    @property
    def token_to_id(self) -> dict[str, int]:
        r"""Map from every vocabulary word to its token id."""
        return {w: i for i, w in enumerate(self.vocab)}

    @property
    def answer_ids(self) -> dict[str, int]:
        r"""Token id of the answer word of each class."""
        ids = self.token_to_id
        return {k: ids[w] for k, w in self.answer_words.items()}

    @property
    def blank_id(self) -> int:
        r"""Token id of the baseline token ``<blank>``."""
        return self.token_to_id[BLANK_TOKEN]

    def sample(self, rng: random.Random, num_evidence: int | None = None) -> Example:
        r"""
        Draws one prompt.

        Args:
            rng (random.Random): Source of randomness.
            num_evidence (int, optional): Exact number of evidence words;
                        ``None`` draws it from ``evidence_probs``.
                        Default: None

        Returns:
            Example: The prompt with its answer and evidence positions.
        """
        if num_evidence is None:
            num_evidence = rng.choices(
                range(len(self.evidence_probs)), weights=self.evidence_probs
            )[0]
        if not 0 <= num_evidence <= self.min_words:
            raise ValueError(f"num_evidence must be in [0, {self.min_words}]")
        n_words = rng.randint(self.min_words, self.max_words)
        words = [rng.choice(self.filler_words) for _ in range(n_words)]
        if rng.random() < self.blank_prob:
            frac = rng.random()
            words = [BLANK_TOKEN if rng.random() < frac else w for w in words]
        if num_evidence == 0:
            label = "neutral"
            slots: list[int] = []
        else:
            label = rng.choice(("positive", "negative"))
            pool = self.positive_words if label == "positive" else self.negative_words
            slots = sorted(rng.sample(range(n_words), num_evidence))
            for s in slots:
                words[s] = rng.choice(pool)
        prompt = " ".join([*words, QUESTION_TOKEN])
        ids = self.token_to_id
        input_ids = (ids[BOS_TOKEN], *(ids[w] for w in prompt.split(" ")))
        answer = self.answer_words[label]
        return Example(
            prompt=prompt,
            input_ids=input_ids,
            answer=answer,
            answer_id=ids[answer],
            evidence_positions=tuple(s + 1 for s in slots),
        )

    def make_examples(self, n: int, seed: int, num_evidence: int | None = None) -> list[Example]:
        r"""
        Draws ``n`` prompts reproducibly.

        Args:
            n (int): Number of prompts.
            seed (int): Seed of the generator. The bundled models were trained
                        on seeds below ``1_000_000``; use a larger seed for
                        held-out data.
            num_evidence (int, optional): Exact number of evidence words of
                        every prompt; ``None`` draws it per prompt.
                        Default: None

        Returns:
            list[Example]: The prompts.
        """
        rng = random.Random(seed)
        return [self.sample(rng, num_evidence) for _ in range(n)]

    def to_dict(self) -> dict[str, Any]:
        r"""Returns the task as a JSON-serialisable dictionary."""
        d = asdict(self)
        d.update(
            blank_token=BLANK_TOKEN,
            question_token=QUESTION_TOKEN,
            special_tokens=list(SPECIAL_TOKENS),
            vocab=self.vocab,
        )
        return d

    def save(self, path: str | Path) -> None:
        r"""
        Writes the task to a JSON file.

        Args:
            path (str or Path): Output file, e.g. ``.../task.json``.
        """
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RedundantEvidenceTask:
        r"""
        Reads a task written by :meth:`save`.

        Args:
            path (str or Path): The JSON file.

        Returns:
            RedundantEvidenceTask: The task; its vocabulary is checked
            against the stored one.
        """
        d = json.loads(Path(path).read_text())
        task = cls(
            positive_words=tuple(d["positive_words"]),
            negative_words=tuple(d["negative_words"]),
            filler_words=tuple(d["filler_words"]),
            answer_words=dict(d["answer_words"]),
            min_words=int(d["min_words"]),
            max_words=int(d["max_words"]),
            evidence_probs=tuple(float(p) for p in d["evidence_probs"]),
            blank_prob=float(d["blank_prob"]),
        )
        if "vocab" in d and d["vocab"] != task.vocab:
            raise ValueError(f"vocabulary stored in {path} does not match the task")
        return task
