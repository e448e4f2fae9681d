"""Training data for the LLM-CLS filter: is this candidate entity (span + type) right?

Positives are the gold entities. Negatives imitate the errors a generator makes: a
boundary off by one or two characters (``shift``), the right span with a wrong type
(``type``), and, when a generator's predictions on the training set are given, its own
false positives (``mined``). A negative never equals a gold entity (same start, end and
label). Each record holds the *context* it was made in (the sentence, or the sentences
the entity spans; the whole text when the doc has no sentence boundaries) with offsets
relative to it, so the classifier sees what it will see at prediction time.
"""
import json
import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import srsly
from spacy.tokens import Doc, Span
from wasabi import msg

from .. import DEFAULT_SPANS_KEY
from ..spans import span_context

KINDS = ("gold", "shift", "type", "mined")
NEGATIVE_KINDS = ("mined", "shift", "type")  # a candidate made by two kinds keeps the first
SHIFTS = (-2, -1, 1, 2)


@dataclass(frozen=True)
class ClsRecord:
    """One candidate: ``text[start:end]`` as an entity of type ``label``."""

    text: str
    start: int
    end: int
    label: str
    is_correct: bool
    kind: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DocCandidates:
    positives: List[ClsRecord]
    negatives: Dict[str, List[ClsRecord]]


def _is_candidate(text: str, start: int, end: int, lo: int, hi: int) -> bool:
    """Non-empty, inside ``[lo, hi)``, and no whitespace at either edge."""
    if not (lo <= start < end <= hi):
        return False
    piece = text[start:end]
    return piece == piece.strip()


def doc_candidates(
    doc: Doc,
    labels: Sequence[str],
    spans_key: str = DEFAULT_SPANS_KEY,
    predicted: Optional[Iterable[Span]] = None,
    stats: Optional[Counter] = None,
) -> DocCandidates:
    """Positives and negatives (by kind) from the gold spans ``doc.spans[spans_key]`` and,
    optionally, a generator's ``predicted`` spans on the same text."""
    stats = stats if stats is not None else Counter()
    gold_spans = [s for s in doc.spans.get(spans_key, []) if s.end_char > s.start_char]
    stats["empty_gold"] += len(doc.spans.get(spans_key, [])) - len(gold_spans)
    gold: Set[Tuple[int, int, str]] = {(s.start_char, s.end_char, s.label_) for s in gold_spans}
    text = doc.text
    seen: Set[Tuple[int, int, int, str]] = set()
    positives: List[ClsRecord] = []
    negatives: Dict[str, List[ClsRecord]] = {k: [] for k in NEGATIVE_KINDS}

    def add(lo: int, hi: int, start: int, end: int, label: str, kind: str) -> None:
        key = (lo, start, end, label)
        if key in seen:
            return
        seen.add(key)
        record = ClsRecord(text[lo:hi], start - lo, end - lo, label, kind == "gold", kind)
        (positives if kind == "gold" else negatives[kind]).append(record)

    for span in gold_spans:
        lo, hi = span_context(doc, span.start, span.end)
        add(lo, hi, span.start_char, span.end_char, span.label_, "gold")
    for span in predicted or ():
        if span.end_char <= span.start_char:
            continue
        if (span.start_char, span.end_char, span.label_) in gold:
            stats["mined_correct"] += 1
            continue
        lo, hi = span_context(doc, span.start, span.end)
        add(lo, hi, span.start_char, span.end_char, span.label_, "mined")
    for span in gold_spans:
        lo, hi = span_context(doc, span.start, span.end)
        s, e, label = span.start_char, span.end_char, span.label_
        for d in SHIFTS:
            for start, end in ((s + d, e), (s, e + d)):
                if _is_candidate(text, start, end, lo, hi) and (start, end, label) not in gold:
                    add(lo, hi, start, end, label, "shift")
        for other in labels:
            if other != label and (s, e, other) not in gold:
                add(lo, hi, s, e, other, "type")
    return DocCandidates(positives, negatives)


def _quotas(available: Dict[str, int], total: int) -> Dict[str, int]:
    """Split ``total`` as evenly as possible over the kinds, giving what a short kind
    cannot take to the others."""
    quotas: Dict[str, int] = {}
    kinds = sorted((k for k in available if available[k] > 0), key=lambda k: (available[k], k))
    remaining = total
    for i, kind in enumerate(kinds):
        quotas[kind] = min(available[kind], remaining // (len(kinds) - i))
        remaining -= quotas[kind]
    return quotas


def sample_records(
    positives: Sequence[ClsRecord],
    negatives: Dict[str, Sequence[ClsRecord]],
    size: int,
    neg_ratio: float = 1.0,
    seed: int = 0,
) -> List[ClsRecord]:
    """Draw ``size`` records with ``neg_ratio`` negatives per positive (fewer when a pool
    is short, keeping the ratio), negatives spread evenly over their kinds; shuffled."""
    if size < 0 or neg_ratio < 0:
        raise ValueError(f"size and neg_ratio must not be negative (got {size}, {neg_ratio})")
    rng = random.Random(seed)
    n_neg_available = sum(len(v) for v in negatives.values())
    n_pos = min(len(positives), round(size / (1 + neg_ratio)))
    if neg_ratio > 0:
        n_pos = min(n_pos, int(n_neg_available / neg_ratio))
    n_neg = min(n_neg_available, size - n_pos, round(n_pos * neg_ratio))
    chosen = rng.sample(list(positives), n_pos)
    quotas = _quotas({k: len(v) for k, v in negatives.items()}, n_neg)
    for kind in sorted(quotas):
        chosen.extend(rng.sample(list(negatives[kind]), quotas[kind]))
    rng.shuffle(chosen)
    return chosen


def build_cls_data(
    docs: Iterable[Doc],
    labels: Optional[Sequence[str]] = None,
    size: int = 10000,
    neg_ratio: float = 1.0,
    seed: int = 0,
    spans_key: str = DEFAULT_SPANS_KEY,
    predicted_docs: Optional[Iterable[Doc]] = None,
    stats: Optional[Counter] = None,
) -> List[ClsRecord]:
    """Candidates from every doc, then :func:`sample_records`. ``labels`` are the types a
    type change may use (default: every gold label). ``predicted_docs`` are aligned with
    ``docs`` by position; a pair whose texts differ is skipped and counted."""
    stats = stats if stats is not None else Counter()
    docs = list(docs)
    preds: List[Optional[Doc]] = list(predicted_docs) if predicted_docs is not None else []
    if predicted_docs is not None and len(preds) != len(docs):
        stats["mined_doc_count_mismatch"] += abs(len(preds) - len(docs))
    if labels is None:
        labels = sorted({s.label_ for doc in docs for s in doc.spans.get(spans_key, [])})
    positives: List[ClsRecord] = []
    negatives: Dict[str, List[ClsRecord]] = {k: [] for k in NEGATIVE_KINDS}
    for i, doc in enumerate(docs):
        if spans_key not in doc.spans:
            stats["docs_without_spans_key"] += 1
            continue
        predicted = None
        if i < len(preds):
            pred = preds[i]
            if pred.text != doc.text:
                stats["mined_text_mismatch"] += 1
                if stats["mined_text_mismatch"] == 1:
                    msg.warn(f"Predicted doc {i} has another text than the train doc {i}: its spans are not mined")
            else:
                predicted = pred.spans.get(spans_key, [])
        cands = doc_candidates(doc, labels, spans_key, predicted, stats)
        positives.extend(cands.positives)
        for kind, items in cands.negatives.items():
            negatives[kind].extend(items)
    stats["available_gold"] = len(positives)
    for kind, items in negatives.items():
        stats[f"available_{kind}"] = len(items)
    records = sample_records(positives, negatives, size, neg_ratio, seed)
    stats.update(f"sampled_{r.kind}" for r in records)
    return records


def write_cls_records(records: Iterable[ClsRecord], path: Union[str, Path]) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")


_FIELDS = {"text": str, "start": int, "end": int, "label": str, "is_correct": bool, "kind": str}


def read_cls_records(path: Union[str, Path], stats: Optional[Counter] = None) -> List[ClsRecord]:
    """Read a JSONL file of records. A bad line is skipped, counted in ``stats`` and
    reported with its line number; the rest are kept."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"Classifier data file not found: {path}")
    stats = stats if stats is not None else Counter()
    records: List[ClsRecord] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                data = srsly.json_loads(line)
                if not isinstance(data, dict):
                    raise ValueError("not a JSON object")
                kwargs = {}
                for name, typ in _FIELDS.items():
                    value = data.get(name, "gold" if name == "kind" else None)
                    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
                        raise ValueError(f"field {name!r} must be {typ.__name__}, got {value!r}")
                    kwargs[name] = value
                if not 0 <= kwargs["start"] < kwargs["end"] <= len(kwargs["text"]):
                    raise ValueError(f"offsets {kwargs['start']}..{kwargs['end']} outside the text")
                records.append(ClsRecord(**kwargs))
            except ValueError as err:
                stats["bad_lines"] += 1
                if stats["bad_lines"] <= 5:
                    msg.warn(f"{path}:{line_no}: skipped ({err})")
    if stats["bad_lines"]:
        msg.warn(f"{path}: {stats['bad_lines']} bad line(s) skipped, {len(records)} kept")
    return records
