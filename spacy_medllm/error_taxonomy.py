"""The error taxonomy of the CCL 2025 paper on the nested view with strict matching: false
positives by their relation to the gold spans, false negatives by whether a prediction
overlaps them. Conventions as in :mod:`spacy_medllm.scoring`."""
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

from spacy.training import Example
from wasabi import table

from . import DEFAULT_SPANS_KEY
from .scoring import PRF, CharSpan, nested_view, overlaps, span_pairs

FP_CATEGORIES = {
    "same_span_wrong_type": "(1) same span, wrong type",
    "overlap_right_type": "(2) overlapping span, right type",
    "overlap_wrong_type": "(3) overlapping span, wrong type",
    "no_overlap": "(4) no overlap with any gold span",
}
FN_CATEGORIES = {
    "overlapped": "a prediction overlaps it",
    "missed": "missed entirely",
}


@dataclass
class ErrorCase:
    """One false positive or false negative. ``other`` is the span that decided its
    category (the gold span for a false positive, the prediction for a false negative),
    None for categories (4) and "missed"."""

    doc: int
    start: int
    end: int
    label: str
    text: str
    category: str
    other: Optional[CharSpan] = None


@dataclass
class ErrorReport:
    """False positives by category, false negatives by kind, and the boundary length
    differences (pred length - gold length, characters) of category (2)."""

    spans_key: str
    n_gold: int = 0
    n_pred: int = 0
    tp: int = 0
    n_docs: int = 0
    n_skipped: int = 0
    fp: Counter = field(default_factory=Counter)
    fn: Counter = field(default_factory=Counter)
    fp_per_label: Dict[str, Counter] = field(default_factory=dict)
    fn_per_label: Dict[str, Counter] = field(default_factory=dict)
    boundary_diffs: Counter = field(default_factory=Counter)
    false_positives: List[ErrorCase] = field(default_factory=list)
    false_negatives: List[ErrorCase] = field(default_factory=list)

    @property
    def strict(self) -> PRF:
        return PRF(n_pred=self.n_pred, n_gold=self.n_gold, pred_hits=self.tp, gold_hits=self.tp)

    def to_dict(self) -> Dict[str, Any]:
        def case(c: ErrorCase) -> Dict[str, Any]:
            other = None if c.other is None else {"start": c.other.start, "end": c.other.end, "label": c.other.label}
            return {"doc": c.doc, "start": c.start, "end": c.end, "label": c.label, "text": c.text,
                    "category": c.category, "other": other}

        return {
            "spans_key": self.spans_key,
            "n_docs": self.n_docs,
            "n_skipped": self.n_skipped,
            "n_gold": self.n_gold,
            "n_pred": self.n_pred,
            "tp": self.tp,
            **self.strict.to_dict(),
            "fp": {k: self.fp[k] for k in FP_CATEGORIES},
            "fn": {k: self.fn[k] for k in FN_CATEGORIES},
            "fp_per_label": {lab: {k: c[k] for k in FP_CATEGORIES} for lab, c in sorted(self.fp_per_label.items())},
            "fn_per_label": {lab: {k: c[k] for k in FN_CATEGORIES} for lab, c in sorted(self.fn_per_label.items())},
            "boundary_diffs": {str(d): n for d, n in sorted(self.boundary_diffs.items())},
            "false_positives": [case(c) for c in self.false_positives],
            "false_negatives": [case(c) for c in self.false_negatives],
        }


def _best_overlap(span: CharSpan, candidates: Iterable[CharSpan]) -> CharSpan:
    # most shared characters, then the closest length, then document order
    return min(
        candidates,
        key=lambda c: (
            -(min(span.end, c.end) - max(span.start, c.start)),
            abs((c.end - c.start) - (span.end - span.start)),
            c,
        ),
    )


def classify_false_positive(pred: CharSpan, gold: Set[CharSpan]) -> Tuple[str, Optional[CharSpan]]:
    """The category of a prediction that is not in ``gold``, and the gold span behind it.

    Precedence when several apply: (1) > (2) > (3) > (4), i.e. identical boundaries are the
    most specific relation, and among overlaps the right type is the nearer miss.
    """
    same_span = [g for g in gold if (g.start, g.end) == (pred.start, pred.end)]
    if same_span:
        return "same_span_wrong_type", min(same_span)
    overlapping = [g for g in gold if overlaps(g, pred)]
    same_type = [g for g in overlapping if g.label == pred.label]
    if same_type:
        return "overlap_right_type", _best_overlap(pred, same_type)
    if overlapping:
        return "overlap_wrong_type", _best_overlap(pred, overlapping)
    return "no_overlap", None


def error_taxonomy(examples: Iterable[Example], spans_key: str = DEFAULT_SPANS_KEY) -> ErrorReport:
    """Split the strict errors of the nested group ``doc.spans[spans_key]``.

    Every false positive falls into exactly one category of ``FP_CATEGORIES`` (see
    ``classify_false_positive``). A false negative is "overlapped" when some prediction
    (of any label) overlaps it, else "missed". For category (2) the histogram records
    pred length - gold length against the best-overlapping gold span of the same type
    (most shared characters, then closest length, then document order).
    """
    report = ErrorReport(spans_key=spans_key)
    for i, eg, gold, pred in span_pairs(examples, *nested_view(spans_key), report):
        text = eg.reference.text
        report.n_gold += len(gold)
        report.n_pred += len(pred)
        report.tp += len(gold & pred)
        for span in sorted(pred - gold):
            category, other = classify_false_positive(span, gold)
            if category == "overlap_right_type":
                report.boundary_diffs[(span.end - span.start) - (other.end - other.start)] += 1
            report.fp[category] += 1
            report.fp_per_label.setdefault(span.label, Counter())[category] += 1
            report.false_positives.append(ErrorCase(i, *span, text[span.start : span.end], category, other))
        for span in sorted(gold - pred):
            overlapping = [p for p in pred if overlaps(p, span)]
            other = _best_overlap(span, overlapping) if overlapping else None
            category = "overlapped" if overlapping else "missed"
            report.fn[category] += 1
            report.fn_per_label.setdefault(span.label, Counter())[category] += 1
            report.false_negatives.append(ErrorCase(i, *span, text[span.start : span.end], category, other))
    return report


def render_error_report(report: ErrorReport) -> str:
    """The taxonomy as plain-text tables."""

    def share(n: int, total: int) -> str:
        return f"{100 * n / total:.1f}%" if total else "-"

    n_fp, n_fn = sum(report.fp.values()), sum(report.fn.values())
    parts = [
        f"Error taxonomy of doc.spans[{report.spans_key!r}] (strict): {report.n_docs} docs, "
        f"{report.n_gold} gold, {report.n_pred} predicted, {report.tp} correct",
        "",
        "False positives",
        table(
            [(name, report.fp[k], share(report.fp[k], n_fp)) for k, name in FP_CATEGORIES.items()],
            header=("category", "count", "share"),
            footer=("total", n_fp, ""),
            divider=True,
            aligns=("l", "r", "r"),
            max_col=40,
        ),
        "False negatives",
        table(
            [(name, report.fn[k], share(report.fn[k], n_fn)) for k, name in FN_CATEGORIES.items()],
            header=("kind", "count", "share"),
            footer=("total", n_fn, ""),
            divider=True,
            aligns=("l", "r", "r"),
            max_col=40,
        ),
        "Boundary length difference, category (2): pred - gold (characters)",
    ]
    if report.boundary_diffs:
        rows = [(f"{d:+d}", n) for d, n in sorted(report.boundary_diffs.items())]
        parts.append(table(rows, header=("diff", "count"), divider=True, aligns=("r", "r")))
    else:
        parts.append("(none)\n")
    return "\n".join(parts)
