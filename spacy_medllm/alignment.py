"""Mentions → token-aligned spans, shared by ``medllm_align``, the spacy-llm task and the
trainer's dev evaluation.

Mentions with offsets map through ``doc.char_span`` with an alignment mode (character tokens
always align; word-level tokenizers such as English or jieba need ``contract`` or
``expand``). Mentions without offsets (entity-category strategy, or offsets that disagreed
with the stated text) are searched in the text with an occurrence policy. The result is a
nested ``SpanGroup`` in ``doc.spans[spans_key]`` (scores in ``attrs["scores"]``) and a flat
``doc.ents``. Whatever cannot be aligned is counted in ``stats`` and logged, never dropped
silently.
"""
import logging
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

from spacy.tokens import Doc, Span

from .extensions import LLM_MENTIONS, LLM_SEARCH_TEXT
from .spans import FLAT_POLICIES, set_spans
from .types import Mention, read_mentions

logger = logging.getLogger("spacy_medllm")

SEARCH_POLICIES = ("all", "first", "unique", "nearest")
ALIGNMENT_MODES = ("strict", "contract", "expand")


class MentionAligner:
    """Places every generator's mentions on a doc's tokens and writes the spans.

    ``sources``: the generators whose mentions to align (None: all of them); ``search``: how
    offset-less mentions are placed (:func:`place_mention`); ``alignment_mode``: spaCy's
    ``char_span`` mode; ``flat_policy``: how ``doc.ents`` is chosen (null leaves it alone);
    ``name``: what the log calls it.
    """

    def __init__(
        self,
        name: str,
        *,
        sources: Optional[Sequence[str]],
        spans_key: str,
        search: str,
        alignment_mode: str,
        flat_policy: Optional[str],
    ) -> None:
        if search not in SEARCH_POLICIES:
            raise ValueError(f"search={search!r}: choose one of {SEARCH_POLICIES}")
        if alignment_mode not in ALIGNMENT_MODES:
            raise ValueError(f"alignment_mode={alignment_mode!r}: choose one of {ALIGNMENT_MODES}")
        if flat_policy is not None and flat_policy not in FLAT_POLICIES:
            raise ValueError(f"flat_policy={flat_policy!r}: choose one of {FLAT_POLICIES} or null")
        self.name = name
        self.sources = list(sources) if sources is not None else None
        self.spans_key = spans_key
        self.search = search
        self.alignment_mode = alignment_mode
        self.flat_policy = flat_policy
        self.stats: Counter = Counter()

    def align(self, doc: Doc) -> Doc:
        by_source = {name: read_mentions(stored) for name, stored in (getattr(doc._, LLM_MENTIONS) or {}).items()}
        search_texts: Dict[str, str] = getattr(doc._, LLM_SEARCH_TEXT) or {}
        missing = [s for s in (self.sources or []) if s not in by_source]
        if missing:
            self.stats["missing_source"] += len(missing)
            logger.warning("%s: no mentions from %s on a doc (is the generator before me?)", self.name, missing)
        chosen: Dict[Tuple[int, int, str], Tuple[Span, float]] = {}
        for source, mentions in by_source.items():
            if self.sources is not None and source not in self.sources:
                continue
            haystack = search_texts.get(source, doc.text)
            for mention in mentions:
                for start, end in place_mention(mention, haystack, self.search, self.stats):
                    span = doc.char_span(start, end, label=mention.label, alignment_mode=self.alignment_mode)
                    if span is None or len(span) == 0:
                        self.stats["unaligned"] += 1
                        continue
                    key = (span.start, span.end, mention.label)
                    score = mention.score if mention.score is not None else 1.0
                    if key in chosen:
                        self.stats["duplicate"] += 1
                        score = max(score, chosen[key][1])
                    chosen[key] = (span, score)
                    self.stats["aligned"] += 1
        items = sorted(chosen.values(), key=lambda item: (item[0].start, -item[0].end, item[0].label_))
        set_spans(doc, [s for s, _ in items], self.spans_key, [sc for _, sc in items], self.flat_policy)
        return doc


def place_mention(mention: Mention, haystack: str, search: str, problems: Counter) -> List[Tuple[int, int]]:
    """Character ranges for a mention: its offsets, or where its text occurs in
    ``haystack`` under the ``search`` policy (every occurrence, the first, only a ``unique``
    one, or the one ``nearest`` to the mention's hint); what cannot be placed is counted in
    ``problems``."""
    if mention.has_offsets:
        if not (0 <= mention.start < mention.end <= len(haystack)):
            problems["out_of_range"] += 1
            return []
        return [(mention.start, mention.end)]
    found = _occurrences(haystack, mention.text)
    if not found:
        problems["not_found"] += 1
        return []
    if search == "all":
        return found
    if search == "unique":
        if len(found) > 1:
            problems["ambiguous"] += 1
            return []
        return found
    if search == "nearest" and mention.hint is not None:
        return [min(found, key=lambda se: (abs(se[0] - mention.hint), se[0]))]
    return found[:1]


def _occurrences(text: str, needle: str) -> List[Tuple[int, int]]:
    """Every (possibly overlapping) occurrence of ``needle`` in ``text``."""
    if not needle:
        return []
    places, i = [], text.find(needle)
    while i >= 0:
        places.append((i, i + len(needle)))
        i = text.find(needle, i + 1)
    return places
