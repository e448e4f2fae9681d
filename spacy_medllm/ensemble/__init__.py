"""Ensembles of generators: conflict detection between span groups and the resolvers that
decide the conflicts (rules and a decision LLM)."""
from .conflicts import Candidate, Comparison, ConflictRegion, compare, doc_groups
from .resolvers import IntersectionResolver, Resolver, UnionResolver, VoteResolver

__all__ = [
    "Candidate",
    "Comparison",
    "ConflictRegion",
    "compare",
    "doc_groups",
    "Resolver",
    "VoteResolver",
    "UnionResolver",
    "IntersectionResolver",
]
