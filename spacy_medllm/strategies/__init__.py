"""Annotation strategies: NER reformulated as text generation (see :mod:`.base`).

Importing this package registers every strategy in spaCy's ``misc`` registry.
"""
from .base import BaseStrategy, Prompt, Strategy, mentions_from_doc, merge_results
from .entity_category import EntityCategoryStrategy
from .html import HtmlStrategy
from .incontext import Demonstration, InContextStrategy, Retriever, TfidfRetriever
from .index import IndexStrategy
from .json_strategy import JsonStrategy
from .mark import MarkStrategy
from ..types import CopyConstraint
from .symbol import SymbolStrategy

# Short names (CLI, docs) → registered names.
STRATEGIES = {
    "symbol": "spacy_medllm.SymbolStrategy.v1",
    "json": "spacy_medllm.JsonStrategy.v1",
    "html": "spacy_medllm.HtmlStrategy.v1",
    "index": "spacy_medllm.IndexStrategy.v1",
    "mark": "spacy_medllm.MarkStrategy.v1",
    "entity_category": "spacy_medllm.EntityCategoryStrategy.v1",
}

__all__ = [
    "BaseStrategy", "Prompt", "Strategy", "merge_results", "mentions_from_doc", "CopyConstraint",
    "SymbolStrategy", "JsonStrategy", "HtmlStrategy", "IndexStrategy", "MarkStrategy", "EntityCategoryStrategy",
    "InContextStrategy", "Demonstration", "Retriever", "TfidfRetriever", "STRATEGIES",
]
