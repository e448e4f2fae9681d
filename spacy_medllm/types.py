"""Small typed records shared by readers, strategies and components."""
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union


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

    def to_dict(self) -> Dict[str, Any]:
        """The plain form stored on docs (``doc._.llm_mentions``), which msgpack, DocBin and
        multiprocessing can serialise."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Mention":
        return cls(**{k: data[k] for k in _MENTION_FIELDS if k in data})


def stored_mentions(mentions: Sequence[Mention]) -> List[Dict[str, Any]]:
    """``mentions`` in the plain form docs store."""
    return [m.to_dict() for m in mentions]


def read_mentions(stored: Sequence[Union[Mention, Mapping[str, Any]]]) -> List[Mention]:
    """The typed view of mentions a doc stores (plain dicts; Mentions pass through)."""
    return [m if isinstance(m, Mention) else Mention.from_dict(m) for m in stored]


_MENTION_FIELDS = tuple(f.name for f in fields(Mention))
_OFFSET = re.compile(r"-?[0-9]{1,18}")


def parse_offset(value: Any) -> Optional[int]:
    """A character offset as a corpus file or a model wrote it: an integer, or a string of
    ASCII digits (quoted offsets); anything else (booleans, ``32.7``, ``"²"``, ``"--2"``,
    numbers longer than any text) is None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _OFFSET.fullmatch(value.strip()):
        return int(value.strip())
    return None


@dataclass
class ParseResult:
    """Mentions parsed from one response, plus why anything was discarded."""

    mentions: List[Mention] = field(default_factory=list)
    discarded: Counter = field(default_factory=Counter)

    def discard(self, reason: str, n: int = 1) -> None:
        self.discarded[reason] += n


@dataclass(frozen=True)
class CopyConstraint:
    """The legal answers of a copy-constrained decoder: ``forced_prefix`` + ``source`` with
    ``open``/``close`` inserted (balanced), then EOS. Strategies whose answer is a marked-up
    copy of the source (symbol, mark) make one per prompt; the decoder enforces it.

    ``max_depth`` bounds nesting, ``max_span_chars`` the number of source characters an
    open bracket may enclose (the README's architecture notes say why the default is 64).
    ``forbid_double_open`` disallows ``[[`` and ``forbid_empty``
    ``[]``. Brackets may only be inserted between source characters; a source that itself
    contains ``[`` or ``]`` is copied literally (the automaton keeps both readings).
    ``open_bias`` is added to the logit of every token that starts with ``open``: a
    negative bias makes the decoder open only the brackets it is surer of, a precision /
    recall knob tuned on dev data like a threshold (the log-probabilities reported are
    then those of the biased distribution).

    With ``text_mass`` (the default) a bracket is inserted only when its token is more
    probable than *all* text tokens together (legal or not), not merely more probable
    than the one source token that may come next: a bracket is a decision "mark here or
    not", and a model that copies imperfectly spreads its "not" over many characters,
    so the per-token rule opens brackets almost everywhere.
    """

    source: str
    forced_prefix: str = ""
    open: str = "["
    close: str = "]"
    max_depth: int = 2
    max_span_chars: int = 64
    forbid_double_open: bool = True
    forbid_empty: bool = True
    open_bias: float = 0.0
    text_mass: bool = True

    def __post_init__(self) -> None:
        if not self.open or not self.close or self.open == self.close:
            raise ValueError(f"open/close must be two different non-empty strings, got {self.open!r}/{self.close!r}")
        if self.max_depth < 0 or self.max_span_chars < 1:
            raise ValueError("max_depth must be >= 0 and max_span_chars >= 1")
