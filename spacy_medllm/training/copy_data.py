"""Copy pre-training: records that teach a small model to copy text it has never seen,
before it learns to mark entities, and the dev check that it does.

Why: the copy-constrained decoder forces the answer to be the source, but where a bracket
goes is the model's own choice, made from what it has read so far. A model that cannot
copy does not know where in the source it stands, so it decides every bracket from the
left context alone. Copying unseen text is a skill (induction heads) that a small model
learns from data that cannot be memorised; CMeEE's 15,000 sentences alone are not that.

The records use the strategy's own prompt template with a two-type scheme of its own
(``原文``: copy the text; ``随机``: copy it with brackets at random places, so copying goes
on after a bracket), so the copy skill is learnt in the exact format the NER stage uses.
Four kinds of text, mixed by ``shares``:

- ``real``: unlabelled texts of every corpus given (any format the readers know), cut at
  clause ends into pieces of at most ``max_chars`` characters;
- ``random``: strings of characters drawn from the corpus alphabet by frequency;
- ``shuffled``: clauses of different texts joined in random order;
- ``bracketed``: a real piece answered with random brackets (type ``随机``).
"""
import random
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Sequence, Union

from spacy.util import registry
from wasabi import msg

from ..labels import LabelInfo, LabelScheme
from ..llm.generation import GenerationRequest, HFGenerator
from ..llm.loader import clear_cache
from ..types import Mention
from .evaluate import load_trained
from .sft_data import ChatRecord, GoldText, clauses, read_gold_texts

COPY_SCHEME = LabelScheme(
    name="copy",
    language="zh",
    labels={"copy": LabelInfo("copy", "原文"), "mark": LabelInfo("mark", "随机")},
)
KINDS = ("real", "random", "shuffled", "bracketed")


def pieces(text: str, max_chars: int) -> List[str]:
    """``text`` cut after clause punctuation into pieces of at most ``max_chars``
    characters (a clause longer than that is cut hard); blank pieces are dropped."""
    out: List[str] = []
    current = ""
    for clause in clauses(GoldText(text, (), "")):
        while len(clause.text) > max_chars:
            if current:
                out.append(current)
                current = ""
            out.append(clause.text[:max_chars])
            clause = GoldText(clause.text[max_chars:], (), "")
        if len(current) + len(clause.text) > max_chars:
            out.append(current)
            current = ""
        current += clause.text
    out.append(current)
    return [p for p in out if p.strip()]


def unlabelled_texts(paths: Sequence[Union[str, Path]], max_chars: int) -> List[str]:
    """The texts of every corpus file (gold annotation ignored), cut into pieces."""
    texts: List[str] = []
    for path in paths:
        before = len(texts)
        for gold in read_gold_texts(path):
            texts.extend(pieces(gold.text, max_chars))
        msg.info(f"Copy data: {len(texts) - before} text pieces from {path}")
    return texts


def random_brackets(text: str, rng: random.Random, max_spans: int = 3, max_len: int = 12) -> List[Mention]:
    """Up to ``max_spans`` random non-overlapping spans of ``text`` (type ``mark``)."""
    spans: List[Mention] = []
    taken = set()
    for _ in range(rng.randint(1, max_spans)):
        length = rng.randint(1, min(max_len, len(text)))
        start = rng.randint(0, len(text) - length)
        if taken & set(range(start, start + length)):
            continue
        taken.update(range(start, start + length))
        spans.append(Mention("mark", text[start : start + length], start, start + length))
    return spans


def copy_texts(
    texts: Sequence[str], n: int, shares: Dict[str, float], seed: int = 0, random_alphabet: int = 0
) -> List[GoldText]:
    """``n`` copy examples drawn from ``texts`` by kind (see the module docstring); the
    gold mentions are the random brackets of ``bracketed`` examples (type ``mark``), and
    a text without mentions is answered with the plain copy (type ``copy``).

    ``random_alphabet`` > 0 draws the ``random`` strings uniformly from that many of the
    corpus's most frequent characters instead of from all of them by frequency: the first
    stage of a copy curriculum (benchmarks/copy_learning.py measures when one helps)."""
    unknown = set(shares) - set(KINDS)
    if unknown or not texts or sum(shares.values()) <= 0:
        raise ValueError(f"Copy data: shares must weigh the kinds {KINDS} (got {shares}) over a non-empty corpus.")
    rng = random.Random(seed)
    counts = Counter("".join(texts))
    if random_alphabet > 0:
        alphabet, weights = tuple(ch for ch, _ in counts.most_common(random_alphabet)), None
    else:
        alphabet, weights = zip(*counts.items())
    pool = [c.text for t in texts for c in clauses(GoldText(t, (), "")) if c.text.strip()]
    kinds = rng.choices(list(shares), weights=list(shares.values()), k=n)
    out = []
    for k, kind in enumerate(kinds):
        mentions: List[Mention] = []
        if kind == "random":
            text = "".join(rng.choices(alphabet, weights=weights, k=len(rng.choice(texts))))
        elif kind == "shuffled":
            text = "".join(rng.choice(pool) for _ in range(rng.randint(1, 4)))
        else:
            text = rng.choice(texts)
            if kind == "bracketed":
                mentions = random_brackets(text, rng)
        out.append(GoldText(text, tuple(mentions), f"copy-{kind}#{k}"))
    return out


def copy_records(examples: Sequence[GoldText], strategy: Any) -> List[ChatRecord]:
    """Chat records in ``strategy``'s format: type ``原文`` with the plain copy as the
    answer, or type ``随机`` with the random brackets."""
    records = []
    for gold in examples:
        prompt = strategy.prompt(gold.text, COPY_SCHEME, "mark" if gold.mentions else "copy")
        response = strategy.render_target(gold.text, gold.mentions, prompt)
        messages = tuple((m["role"], m["content"]) for m in prompt.messages(response))
        records.append(ChatRecord(messages, gold.source, len(gold.mentions)))
    return records


@registry.readers("spacy_medllm.CopyRecords.v1")
def make_copy_records(
    paths: List[str],
    strategy: Any,
    n: int = 100000,
    shares: Dict[str, float] = {"real": 0.5, "random": 0.15, "shuffled": 0.2, "bracketed": 0.15},
    max_chars: int = 160,
    seed: int = 0,
    random_alphabet: int = 0,
) -> List[ChatRecord]:
    """``n`` copy pre-training records from the texts of the corpus files ``paths``
    (``random_alphabet``: see :func:`copy_texts`)."""
    return copy_records(copy_texts(unlabelled_texts(paths, max_chars), n, shares, seed, random_alphabet), strategy)


class CopyEvaluator:
    """The share of dev texts that free (unconstrained) greedy generation copies exactly
    from the ``原文`` prompt: the gate a copy-trained model must pass before NER training."""

    def __init__(self, texts: Sequence[str], strategy: Any, batch_size: int = 32) -> None:
        if not texts:
            raise ValueError("The copy evaluation has no texts.")
        self.texts = list(texts)
        self.strategy = strategy
        self.batch_size = batch_size

    def __call__(self, model_dir: Union[str, Path]) -> Dict[str, Any]:
        lm, adapter = load_trained(model_dir)
        try:
            answers = self.generate(HFGenerator(lm, adapter))
        finally:
            clear_cache()
        exact = sum(answer == target for answer, target in answers)
        return {"copy_exact": exact / len(answers), "n": len(answers)}

    def generate(self, generator: HFGenerator) -> List[tuple]:
        """(answer, expected answer) per dev text."""
        requests, targets = [], []
        for text in self.texts:
            prompt = self.strategy.prompt(text, COPY_SCHEME, "copy")
            targets.append(self.strategy.render_target(text, [], prompt))
            requests.append(GenerationRequest(prompt.messages(), max_new_tokens=2 * len(targets[-1]) + 8))
        results = generator.generate(requests, batch_size=self.batch_size)
        return [(r.text, target) for r, target in zip(results, targets)]


@registry.misc("spacy_medllm.CopyEvaluator.v1")
def make_copy_evaluator(
    path: str, strategy: Any, limit: int = 200, max_chars: int = 160, batch_size: int = 32
) -> CopyEvaluator:
    """The copy gate on the first ``limit`` text pieces of a dev corpus."""
    texts = [p for g in read_gold_texts(path, limit=limit) for p in pieces(g.text, max_chars)]
    return CopyEvaluator(texts[: limit or None], strategy, batch_size)


__all__ = ["COPY_SCHEME", "pieces", "unlabelled_texts", "copy_texts", "copy_records", "CopyEvaluator"]
