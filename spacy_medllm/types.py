"""Small typed records shared by readers, strategies and components."""
from collections import Counter
from dataclasses import dataclass, field
from typing import List, Optional


@dataclass(frozen=True)
class Mention:
    """An entity as an LLM (or a reader) stated it.

    ``start``/``end`` are character offsets into the text the prompt was built from
    (end exclusive), or ``None`` when the strategy gives no offsets (the aligner finds
    them). ``hint`` is an approximate character position used to choose among several
    occurrences. ``score`` is a probability-like confidence when the model gives one.
    """

    label: str
    text: str
    start: Optional[int] = None
    end: Optional[int] = None
    score: Optional[float] = None
    hint: Optional[int] = None

    @property
    def has_offsets(self) -> bool:
        return self.start is not None and self.end is not None


@dataclass
class ParseResult:
    """Mentions parsed from one response, plus why anything was discarded."""

    mentions: List[Mention] = field(default_factory=list)
    discarded: Counter = field(default_factory=Counter)

    def discard(self, reason: str, n: int = 1) -> None:
        self.discarded[reason] += n
