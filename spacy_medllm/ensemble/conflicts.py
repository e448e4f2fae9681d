"""Compare the span groups of several generators: what they all agree on, and where they
conflict.

Pure functions on small records, so the rules can be pinned on hand-made cases. A
*candidate* is one (start_char, end_char, label) with the groups (sources) that proposed it;
candidates proposed by every group are *agreed*; the others are merged into *conflict
regions*: maximal character ranges covered by transitively overlapping candidates (of any
label), which are the units a resolver decides on.
"""
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from spacy.tokens import Doc

# (start_char, end_char, label, score); score None means "stated with full confidence"
RawSpan = Tuple[int, int, str, Optional[float]]


@dataclass(frozen=True)
class Candidate:
    """One proposed entity and who proposed it.

    ``sources`` are span keys in the order the groups were given; ``scores`` align with them.
    """

    start: int
    end: int
    label: str
    sources: Tuple[str, ...]
    scores: Tuple[float, ...]

    @property
    def votes(self) -> int:
        return len(self.sources)

    @property
    def length(self) -> int:
        return self.end - self.start

    def support(self, n_groups: int) -> float:
        """Mean score over all ``n_groups`` groups, a group that did not propose the
        candidate counting 0: the ensemble's confidence, comparable across resolvers."""
        return sum(self.scores) / n_groups if n_groups else 0.0

    def overlaps(self, other: "Candidate") -> bool:
        return self.start < other.end and other.start < self.end

    def nests_with(self, other: "Candidate") -> bool:
        """One contains the other (a valid nested pair), and they are not the same range."""
        if (self.start, self.end) == (other.start, other.end):
            return False
        return (self.start <= other.start and other.end <= self.end) or (
            other.start <= self.start and self.end <= other.end
        )


@dataclass(frozen=True)
class ConflictRegion:
    """A character range ``[start, end)`` and the non-agreed candidates inside it."""

    start: int
    end: int
    candidates: Tuple[Candidate, ...]


@dataclass(frozen=True)
class Comparison:
    """The outcome of comparing the groups of one doc."""

    sources: Tuple[str, ...]
    agreed: Tuple[Candidate, ...]
    regions: Tuple[ConflictRegion, ...]

    @property
    def n_groups(self) -> int:
        return len(self.sources)

    @property
    def candidates(self) -> List[Candidate]:
        """Every candidate, agreed or not, in document order."""
        conflicting = [c for region in self.regions for c in region.candidates]
        return sorted([*self.agreed, *conflicting], key=candidate_order)


def candidate_order(candidate: Candidate) -> Tuple[int, int, str]:
    return (candidate.start, candidate.end, candidate.label)


def collect_candidates(groups: Mapping[str, Iterable[RawSpan]]) -> List[Candidate]:
    """Pool the spans of all groups into candidates (document order).

    A group that states the same (start, end, label) twice counts once, with its higher
    score; a missing score counts as 1.0.
    """
    pooled: Dict[Tuple[int, int, str], Dict[str, float]] = {}
    for source, spans in groups.items():
        for start, end, label, score in spans:
            by_source = pooled.setdefault((start, end, label), {})
            value = 1.0 if score is None else float(score)
            by_source[source] = max(value, by_source.get(source, value))
    order = {source: i for i, source in enumerate(groups)}
    candidates = []
    for (start, end, label), by_source in pooled.items():
        sources = tuple(sorted(by_source, key=order.__getitem__))
        candidates.append(Candidate(start, end, label, sources, tuple(by_source[s] for s in sources)))
    return sorted(candidates, key=candidate_order)


def merge_regions(candidates: Sequence[Candidate]) -> List[ConflictRegion]:
    """Merge overlapping candidates transitively into regions (a sweep over start order:
    a candidate joins the current region when it starts before the region's end)."""
    regions: List[ConflictRegion] = []
    current: List[Candidate] = []
    end = -1
    for candidate in sorted(candidates, key=candidate_order):
        if current and candidate.start >= end:
            regions.append(ConflictRegion(current[0].start, end, tuple(current)))
            current = []
        end = max(end, candidate.end) if current else candidate.end
        current.append(candidate)
    if current:
        regions.append(ConflictRegion(current[0].start, end, tuple(current)))
    return regions


def compare(groups: Mapping[str, Iterable[RawSpan]]) -> Comparison:
    """Split the pooled candidates of ``groups`` (span key -> spans) into the agreed ones
    and the conflict regions. With one group (or none) everything is agreed."""
    sources = tuple(groups)
    candidates = collect_candidates(groups)
    agreed = [c for c in candidates if c.votes == len(sources)]
    disputed = [c for c in candidates if c.votes < len(sources)]
    return Comparison(sources, tuple(agreed), tuple(merge_regions(disputed)))


def doc_groups(doc: Doc, span_keys: Sequence[str]) -> Dict[str, List[RawSpan]]:
    """Read the groups ``span_keys`` of ``doc`` as raw character spans with their scores
    (``group.attrs["scores"]``, the spancat convention; None where a group has none)."""
    groups: Dict[str, List[RawSpan]] = {}
    for key in span_keys:
        if key not in doc.spans:
            raise ValueError(
                f"medllm_ensemble expects doc.spans[{key!r}], but the doc has only "
                f"{sorted(doc.spans)}: a generator writing spans_key {key!r} must run before it."
            )
        group = doc.spans[key]
        scores = group.attrs.get("scores")
        if scores is not None and len(scores) != len(group):
            raise ValueError(f"doc.spans[{key!r}] has {len(group)} spans but {len(scores)} scores")
        groups[key] = [
            (span.start_char, span.end_char, span.label_, None if scores is None else float(scores[i]))
            for i, span in enumerate(group)
        ]
    return groups
