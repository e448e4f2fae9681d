"""Scores for nested and flat entities (the error taxonomy of the CCL 2025 paper, on the same
conventions, is in :mod:`spacy_medllm.error_taxonomy`).

Every comparison uses *character* offsets ``(start_char, end_char, label)``, so a
prediction made on a differently tokenised copy of the text scores exactly as one made on
the gold tokens. Each view is a set: identical duplicate spans in a group count once.

Conventions (stated once here, used everywhere below):

* A ratio whose denominator is zero is 0.0 (no predictions: P = 0; no gold: R = 0;
  P + R = 0: F = 0), as seqeval does with ``zero_division`` at its default.
* Strict: a prediction is correct when a gold span has the same start, end and label.
* Partial (BioNER-LLaMA): a prediction counts as correct for *precision* when it
  overlaps (shares at least one character with) some gold span of the same label; a gold
  span counts as found for *recall* when some prediction of the same label overlaps it.
  The two hit counts can differ; F is the harmonic mean of that P and R.
* Macro: the unweighted mean of the per-label P, R and F over every label that occurs in
  the gold *or* the predictions of the whole corpus, so a label the system invents (and
  never gets right) pulls the mean down instead of being ignored. Macro F is the mean of
  the per-label F, not the F of macro P and R.
* Character BIO (ROCLING): the flat view becomes one BIO tag per character and F1 is
  computed over the chunks of those tags with the conlleval-compatible chunking of
  seqeval's default mode (``mode=None``), not its strict mode.
* A reference doc without annotation for a view (no ``doc.spans[key]``; no ``ENT_IOB``
  annotation on a non-empty doc) is skipped and counted, as spaCy's own scorers do:
  missing annotation is not "no entities".
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Protocol, Sequence, Set, Tuple

from spacy.tokens import Doc, Span
from spacy.training import Example
from spacy.util import registry
from wasabi import table

from . import DEFAULT_SPANS_KEY

# What training with these components optimises (spaCy's ``default_score_weights``): the
# strict F1 of the nested group under the default key.
SCORE_WEIGHTS = {
    f"spans_{DEFAULT_SPANS_KEY}_f": 1.0,
    f"spans_{DEFAULT_SPANS_KEY}_p": 0.0,
    f"spans_{DEFAULT_SPANS_KEY}_r": 0.0,
}


class CharSpan(NamedTuple):
    """A labelled character interval, end exclusive."""

    start: int
    end: int
    label: str


@dataclass
class PRF:
    """The counts behind one P/R/F figure.

    Strict matching has ``pred_hits == gold_hits`` (the true positives). Partial matching
    counts hits on each side separately, because one prediction can overlap several gold
    spans and the other way round.
    """

    n_pred: int = 0
    n_gold: int = 0
    pred_hits: int = 0
    gold_hits: int = 0

    @property
    def p(self) -> float:
        return self.pred_hits / self.n_pred if self.n_pred else 0.0

    @property
    def r(self) -> float:
        return self.gold_hits / self.n_gold if self.n_gold else 0.0

    @property
    def f(self) -> float:
        p, r = self.p, self.r
        return 2 * p * r / (p + r) if p + r else 0.0

    def __iadd__(self, other: "PRF") -> "PRF":
        self.n_pred += other.n_pred
        self.n_gold += other.n_gold
        self.pred_hits += other.pred_hits
        self.gold_hits += other.gold_hits
        return self

    def to_dict(self) -> Dict[str, float]:
        return {"p": self.p, "r": self.r, "f": self.f}


@dataclass
class SpanScores:
    """Strict, partial and macro figures for one view (nested group or flat ents)."""

    strict: PRF = field(default_factory=PRF)
    per_label: Dict[str, PRF] = field(default_factory=dict)
    partial: PRF = field(default_factory=PRF)
    partial_per_label: Dict[str, PRF] = field(default_factory=dict)
    n_docs: int = 0
    n_skipped: int = 0

    @property
    def macro_p(self) -> float:
        return _mean([s.p for s in self.per_label.values()])

    @property
    def macro_r(self) -> float:
        return _mean([s.r for s in self.per_label.values()])

    @property
    def macro_f(self) -> float:
        return _mean([s.f for s in self.per_label.values()])


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def char_spans(spans: Iterable[Span]) -> Set[CharSpan]:
    """The character-offset set of ``spans`` (duplicates collapse)."""
    return {CharSpan(s.start_char, s.end_char, s.label_) for s in spans}


def overlaps(a: CharSpan, b: CharSpan) -> bool:
    """True when the two intervals share at least one character."""
    return a.start < b.end and b.start < a.end


# ---------------------------------------------------------------------------------------
# Views: which spans of a doc are scored
# ---------------------------------------------------------------------------------------

Getter = Callable[[Doc], Iterable[Span]]
HasAnnotation = Callable[[Doc], bool]


def nested_view(spans_key: str) -> Tuple[Getter, HasAnnotation]:
    """The group ``doc.spans[spans_key]``; a predicted doc without it predicts nothing."""
    return (lambda doc: doc.spans.get(spans_key, [])), (lambda doc: spans_key in doc.spans)


def flat_view() -> Tuple[Getter, HasAnnotation]:
    """``doc.ents``; an empty doc counts as annotated (it has nothing to annotate)."""
    return (lambda doc: doc.ents), (lambda doc: len(doc) == 0 or doc.has_annotation("ENT_IOB"))


def _check_texts(i: int, eg: Example) -> None:
    if eg.predicted.text != eg.reference.text:
        raise ValueError(
            f"Example {i}: the predicted text differs from the reference text, so character "
            f"offsets cannot be compared (reference {eg.reference.text[:40]!r}, "
            f"predicted {eg.predicted.text[:40]!r})"
        )


class DocCounts(Protocol):
    """What a report counts documents in (:class:`SpanScores`, the error taxonomy's report)."""

    n_docs: int
    n_skipped: int


def span_pairs(
    examples: Iterable[Example],
    getter: Getter,
    has_annotation: HasAnnotation,
    counts: Optional["DocCounts"] = None,
) -> Iterator[Tuple[int, Example, Set[CharSpan], Set[CharSpan]]]:
    """Yield ``(index, example, gold, pred)`` with character-span sets for each example
    whose reference is annotated; count the docs used and skipped in ``counts``."""
    for i, eg in enumerate(examples):
        _check_texts(i, eg)
        if not has_annotation(eg.reference):
            if counts is not None:
                counts.n_skipped += 1
            continue
        if counts is not None:
            counts.n_docs += 1
        yield i, eg, char_spans(getter(eg.reference)), char_spans(getter(eg.predicted))


# ---------------------------------------------------------------------------------------
# Strict, partial and macro P/R/F
# ---------------------------------------------------------------------------------------


def add_span_sets(scores: SpanScores, gold: Set[CharSpan], pred: Set[CharSpan]) -> None:
    """Add one document's gold and predicted sets to ``scores``."""
    for label in {s.label for s in gold} | {s.label for s in pred}:
        g = {s for s in gold if s.label == label}
        p = {s for s in pred if s.label == label}
        tp = len(g & p)
        strict = PRF(n_pred=len(p), n_gold=len(g), pred_hits=tp, gold_hits=tp)
        partial = PRF(
            n_pred=len(p),
            n_gold=len(g),
            pred_hits=sum(any(overlaps(x, y) for y in g) for x in p),
            gold_hits=sum(any(overlaps(y, x) for x in p) for y in g),
        )
        scores.strict += strict
        scores.partial += partial
        scores.per_label.setdefault(label, PRF())
        scores.per_label[label] += strict
        scores.partial_per_label.setdefault(label, PRF())
        scores.partial_per_label[label] += partial


def _score_view(examples: Iterable[Example], getter: Getter, has_annotation: HasAnnotation) -> SpanScores:
    scores = SpanScores()
    for _, _, gold, pred in span_pairs(examples, getter, has_annotation, scores):
        add_span_sets(scores, gold, pred)
    return scores


def score_spans(examples: Iterable[Example], spans_key: str = DEFAULT_SPANS_KEY) -> SpanScores:
    """Strict, partial and macro scores of the nested group ``doc.spans[spans_key]``."""
    return _score_view(examples, *nested_view(spans_key))


def score_ents(examples: Iterable[Example]) -> SpanScores:
    """Strict, partial and macro scores of the flat ``doc.ents``."""
    return _score_view(examples, *flat_view())


# ---------------------------------------------------------------------------------------
# Character-level BIO F1 (ROCLING), chunked exactly like seqeval's default mode
# ---------------------------------------------------------------------------------------


def _tag_parts(tag: str) -> Tuple[str, str]:
    # seqeval: prefix is the first character, type what follows the first '-' ('_' if
    # none). An empty tag (which seqeval cannot read) is taken as 'O'.
    if not tag:
        return "O", "_"
    return tag[0], tag[1:].split("-", maxsplit=1)[-1] or "_"


def _end_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag not in ("O", ".") and prev_type != type_


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag not in ("O", ".") and prev_type != type_


def conll_chunks(tags: Sequence[str]) -> List[Tuple[str, int, int]]:
    """``(type, start, end)`` chunks (end exclusive) of a tag sequence, as seqeval's
    ``get_entities`` finds them in its default, conlleval-compatible mode: ill-formed
    sequences (``I-`` without ``B-``, ``O-X``, lower-case prefixes) are read the same way."""
    prev_tag, prev_type, begin = "O", "", 0
    chunks = []
    for i, raw in enumerate(list(tags) + ["O"]):
        tag, type_ = _tag_parts(raw)
        if _end_of_chunk(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i))
        if _start_of_chunk(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def score_bio(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> PRF:
    """Micro P/R/F over the chunks of tag sequences, equal to seqeval's default-mode
    ``precision_score``/``recall_score``/``f1_score``. Sequences are joined with an ``O``
    between them, as seqeval joins them."""
    if len(gold) != len(pred) or any(len(g) != len(p) for g, p in zip(gold, pred)):
        raise ValueError("Gold and predicted tag sequences must have the same number and lengths")
    gold_chunks = set(conll_chunks([t for seq in gold for t in list(seq) + ["O"]]))
    pred_chunks = set(conll_chunks([t for seq in pred for t in list(seq) + ["O"]]))
    tp = len(gold_chunks & pred_chunks)
    return PRF(n_pred=len(pred_chunks), n_gold=len(gold_chunks), pred_hits=tp, gold_hits=tp)


def char_bio_tags(n_chars: int, spans: Iterable[CharSpan]) -> List[str]:
    """One BIO tag per character for non-overlapping ``spans``."""
    tags = ["O"] * n_chars
    for span in sorted(spans):
        if any(t != "O" for t in tags[span.start : span.end]):
            raise ValueError(f"Overlapping span {span} cannot be written as BIO tags")
        for i in range(span.start, span.end):
            tags[i] = ("B-" if i == span.start else "I-") + span.label
    return tags


def score_char_bio(examples: Iterable[Example]) -> PRF:
    """ROCLING's character-level BIO F1 of the flat ``doc.ents``."""
    gold_seqs, pred_seqs = [], []
    for _, eg, gold, pred in span_pairs(examples, *flat_view()):
        n = len(eg.reference.text)
        gold_seqs.append(char_bio_tags(n, gold))
        pred_seqs.append(char_bio_tags(n, pred))
    return score_bio(gold_seqs, pred_seqs)


# ---------------------------------------------------------------------------------------
# spaCy-style score dict and the registered scorer
# ---------------------------------------------------------------------------------------


def _view_keys(prefix: str, scores: SpanScores) -> Dict[str, Any]:
    out: Dict[str, Any] = {f"{prefix}_{k}": v for k, v in scores.strict.to_dict().items()}
    out[f"{prefix}_per_type"] = {lab: s.to_dict() for lab, s in sorted(scores.per_label.items())}
    out.update({f"{prefix}_partial_{k}": v for k, v in scores.partial.to_dict().items()})
    out[f"{prefix}_partial_per_type"] = {lab: s.to_dict() for lab, s in sorted(scores.partial_per_label.items())}
    out.update({f"{prefix}_macro_p": scores.macro_p, f"{prefix}_macro_r": scores.macro_r})
    out[f"{prefix}_macro_f"] = scores.macro_f
    return out


def score_examples(examples: Iterable[Example], spans_key: str = DEFAULT_SPANS_KEY) -> Dict[str, Any]:
    """All figures in spaCy's key style.

    Nested group: ``spans_{key}_p/_r/_f/_per_type`` (strict), ``spans_{key}_partial_*``
    and ``spans_{key}_macro_p/_r/_f``. Flat: ``ents_*`` likewise, plus
    ``ents_char_bio_p/_r/_f``. The partial and macro keys are named like a span key of
    their own, so ``spacy evaluate --spans-key {key}_partial`` (or ``{key}_macro``) prints
    them in its SPAN rows.
    """
    examples = list(examples)
    out = _view_keys(f"spans_{spans_key}", score_spans(examples, spans_key))
    out.update(_view_keys("ents", score_ents(examples)))
    out.update({f"ents_char_bio_{k}": v for k, v in score_char_bio(examples).to_dict().items()})
    return out


def render_scores(scores: Dict[str, Any], spans_key: str = DEFAULT_SPANS_KEY) -> str:
    """The main figures of ``score_examples`` as one plain-text table."""
    rows = []
    for name, prefix in (
        (f"spans[{spans_key!r}] strict", f"spans_{spans_key}"),
        (f"spans[{spans_key!r}] partial", f"spans_{spans_key}_partial"),
        (f"spans[{spans_key!r}] macro", f"spans_{spans_key}_macro"),
        ("ents strict", "ents"),
        ("ents partial", "ents_partial"),
        ("ents macro", "ents_macro"),
        ("ents char BIO", "ents_char_bio"),
    ):
        rows.append((name, *(f"{100 * scores[f'{prefix}_{k}']:.2f}" for k in "prf")))
    return table(rows, header=("", "P", "R", "F"), divider=True, aligns=("l", "r", "r", "r"))


def examples_from_docs(gold_docs: Sequence[Doc], pred_docs: Sequence[Doc]) -> List[Example]:
    """Pair gold and predicted docs by position; a clear error when they do not match."""
    if len(gold_docs) != len(pred_docs):
        raise ValueError(f"{len(gold_docs)} gold docs but {len(pred_docs)} predicted docs; they are paired by order")
    for i, (gold, pred) in enumerate(zip(gold_docs, pred_docs)):
        if gold.text != pred.text:
            raise ValueError(
                f"Doc {i}: texts differ (gold {gold.text[:40]!r}, predicted {pred.text[:40]!r}); "
                f"the two files must hold the same documents in the same order"
            )
    return [Example(pred, gold) for gold, pred in zip(gold_docs, pred_docs)]


@registry.scorers("spacy_medllm.span_scorer.v1")
def make_span_scorer(spans_key: str = DEFAULT_SPANS_KEY) -> Callable[..., Dict[str, Any]]:
    """A component scorer reporting all figures of ``score_examples`` for ``spans_key``.

    The key is fixed here (in the component's config) rather than read from the Scorer's
    settings, because ``spacy evaluate --spans-key`` only chooses what is printed.
    """

    def score(examples: Iterable[Example], **kwargs: Any) -> Dict[str, Any]:
        return score_examples(examples, spans_key)

    return score
