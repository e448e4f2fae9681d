"""Rule resolvers: decide which candidates of a comparison become the final entities.

A resolver is called once per batch with the docs, their comparisons and the exemplars the
component holds, and returns the kept candidates of each doc (agreed ones included). Agreed
candidates are always kept; the rules differ only in the conflict regions.
"""
from dataclasses import dataclass
from typing import Iterable, List, Mapping, Optional, Sequence

from spacy.tokens import Doc
from spacy.util import registry

from .conflicts import Candidate, Comparison, ConflictRegion, candidate_order


class Resolver:
    """Base class. ``needs_exemplars`` tells the component to require exemplars."""

    needs_exemplars = False

    def __call__(
        self, docs: Sequence[Doc], comparisons: Sequence[Comparison], exemplars: Mapping[str, List[str]]
    ) -> List[List[Candidate]]:
        return [self.resolve(comparison) for comparison in comparisons]

    def resolve(self, comparison: Comparison) -> List[Candidate]:
        raise NotImplementedError


def compatible(a: Candidate, b: Candidate, allow_nested: bool) -> bool:
    """Two entities can both be right when they are disjoint or (if allowed) nested; a range
    with two types, or two crossing ranges, cannot."""
    return not a.overlaps(b) or (allow_nested and a.nests_with(b))


def select_compatible(
    candidates: Iterable[Candidate], n_groups: int, fixed: Sequence[Candidate] = (), allow_nested: bool = True
) -> List[Candidate]:
    """Greedily keep candidates by rank (more votes, then higher support, then longer, then
    earlier) when compatible with ``fixed`` and with those kept before them."""
    ranked = sorted(candidates, key=lambda c: (-c.votes, -c.support(n_groups), -c.length, c.start, c.label))
    kept: List[Candidate] = []
    for candidate in ranked:
        if all(compatible(candidate, other, allow_nested) for other in [*fixed, *kept]):
            kept.append(candidate)
    return sorted(kept, key=candidate_order)


def agreed_in(comparison: Comparison, region: ConflictRegion) -> List[Candidate]:
    """The agreed candidates overlapping ``region``: fixed points its decision must respect."""
    return [c for c in comparison.agreed if c.start < region.end and region.start < c.end]


@dataclass
class VoteResolver(Resolver):
    """Hard voting: in each region keep the candidates proposed by at least ``k`` of the
    ``n`` groups (``k=None``: a majority, ``n // 2 + 1``); among those, a range with two
    types or two crossing ranges are resolved by rank (votes, then support = mean score over
    the n groups, then length), and nested pairs are kept unless ``allow_nested`` is off."""

    k: Optional[int] = None
    allow_nested: bool = True

    def threshold(self, n_groups: int) -> int:
        k = n_groups // 2 + 1 if self.k is None else self.k
        if not 1 <= k <= max(n_groups, 1):
            raise ValueError(f"VoteResolver: k must be between 1 and the number of groups ({n_groups}), got {k}")
        return k

    def resolve(self, comparison: Comparison) -> List[Candidate]:
        kept = list(comparison.agreed)
        for region in comparison.regions:
            kept.extend(self.resolve_region(comparison, region))
        return sorted(kept, key=candidate_order)

    def resolve_region(self, comparison: Comparison, region: ConflictRegion) -> List[Candidate]:
        k = self.threshold(comparison.n_groups)
        passing = [c for c in region.candidates if c.votes >= k]
        return select_compatible(passing, comparison.n_groups, agreed_in(comparison, region), self.allow_nested)


class UnionResolver(Resolver):
    """Keep every candidate of every group (the recall ceiling of the ensemble)."""

    def resolve(self, comparison: Comparison) -> List[Candidate]:
        return comparison.candidates


class IntersectionResolver(Resolver):
    """Keep only what all groups agree on (the precision end of voting)."""

    def resolve(self, comparison: Comparison) -> List[Candidate]:
        return list(comparison.agreed)


@registry.misc("spacy_medllm.VoteResolver.v1")
def make_vote_resolver(k: Optional[int] = None, allow_nested: bool = True) -> VoteResolver:
    return VoteResolver(k=k, allow_nested=allow_nested)


@registry.misc("spacy_medllm.UnionResolver.v1")
def make_union_resolver() -> UnionResolver:
    return UnionResolver()


@registry.misc("spacy_medllm.IntersectionResolver.v1")
def make_intersection_resolver() -> IntersectionResolver:
    return IntersectionResolver()
