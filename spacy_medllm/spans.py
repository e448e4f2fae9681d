"""Nested span groups, their flat, non-overlapping view in ``doc.ents``, and the sentence
context a span is judged in."""
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from spacy.tokens import Doc, Span, SpanGroup

FLAT_POLICIES = ("longest", "score", "outermost", "first")


def _sort_key(policy: str, scores: Optional[Dict[int, float]]) -> Callable[[tuple], tuple]:
    # items are (index, span); ties go to the higher score, then to document order
    def score(item: tuple) -> float:
        return -(scores or {}).get(item[0], 0.0)

    if policy == "longest":
        return lambda item: (-(item[1].end - item[1].start), item[1].start, score(item), item[0])
    if policy == "score":
        return lambda item: (score(item), -(item[1].end - item[1].start), item[1].start, item[0])
    if policy == "outermost":
        return lambda item: (item[1].start, -(item[1].end - item[1].start), score(item), item[0])
    if policy == "first":
        return lambda item: (item[0],)
    raise ValueError(f"Unknown flat policy {policy!r}; choose one of {FLAT_POLICIES}")


def flat_view(spans: Sequence[Span], policy: str = "longest", scores: Optional[Sequence[float]] = None) -> List[Span]:
    """Pick a non-overlapping subset of ``spans`` greedily in the policy's order.

    ``longest`` prefers longer spans, ``score`` higher scores, ``outermost`` the span
    that starts first (then the longer), ``first`` the order given. Between spans the
    policy cannot tell apart (the same span under several types), the higher score wins.
    """
    score_map = dict(enumerate(scores)) if scores is not None else None
    taken = [False] * (len(spans[0].doc) if spans else 0)
    chosen: List[Span] = []
    for _, span in sorted(enumerate(spans), key=_sort_key(policy, score_map)):
        if span.start == span.end or any(taken[span.start : span.end]):
            continue
        for i in range(span.start, span.end):
            taken[i] = True
        chosen.append(span)
    return sorted(chosen, key=lambda s: (s.start, s.end))


def set_spans(
    doc: Doc,
    spans: Iterable[Span],
    spans_key: str,
    scores: Optional[Sequence[float]] = None,
    flat_policy: Optional[str] = "longest",
) -> SpanGroup:
    """Write ``spans`` as ``doc.spans[spans_key]`` (scores in ``attrs["scores"]``) and,
    unless ``flat_policy`` is None, their flat view as ``doc.ents``."""
    spans = list(spans)
    group = SpanGroup(doc, name=spans_key, spans=spans)
    if scores is not None:
        group.attrs["scores"] = [float(s) for s in scores]
    doc.spans[spans_key] = group
    if flat_policy is not None:
        doc.ents = flat_view(spans, flat_policy, scores)
    return group


def span_context(doc: Doc, start_token: int, end_token: int) -> Tuple[int, int]:
    """Character bounds of the sentences covering tokens ``[start_token, end_token)``."""
    if not doc.has_annotation("SENT_START") or end_token <= start_token:
        return 0, len(doc.text)
    first = doc[start_token].sent
    last = doc[end_token - 1].sent
    return first.start_char, last.end_char
