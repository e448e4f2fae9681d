"""Shared pieces of the corpus readers: the read report, the parsed record, the checks every
format goes through, and the one function that turns text + character spans into a gold Doc.

A format module only parses its syntax into :class:`Record` objects and reports what it
cannot parse; everything that is common (span validation, counting, Doc building) lives here
so that every corpus is checked and counted the same way.
"""

import codecs
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from spacy.tokens import Doc
from spacy.vocab import Vocab

from .. import DEFAULT_SPANS_KEY
from ..spans import set_spans
from ..tokenizer import char_doc

# Problem reasons form a small fixed vocabulary so that reports can be counted by reason.
EMPTY_SPAN = "empty or reversed span"
OUT_OF_RANGE = "span out of range"
MENTION_MISMATCH = "mention text disagrees with offsets (offsets kept)"
NOT_ON_TOKENS = "span not on token boundaries"
MALFORMED_ENTITY = "malformed entity"
MALFORMED_TAG = "malformed tag (repaired)"
ORPHAN_I = "I- tag without B- (read as B-)"
UNKNOWN_TAG = "unknown tag (read as O)"
MALFORMED_LINE = "malformed line"
BAD_RECORD = "malformed record"
BAD_JSON = "bad JSON"
UNDECODABLE = "undecodable line"


@dataclass(frozen=True)
class Problem:
    """One piece of broken input: where it is, what is wrong, and whether it was kept
    (possibly repaired) or dropped."""

    file: str
    line: int
    reason: str
    kept: bool
    detail: str = ""

    def __str__(self) -> str:
        detail = f": {self.detail}" if self.detail else ""
        return f"{self.file}:{self.line}: {self.reason}{detail} [{'kept' if self.kept else 'dropped'}]"


@dataclass
class ReadReport:
    """What reading one file produced.

    ``documents`` counts source records (sentences, documents) read; ``shards`` the Docs
    produced from them (more than ``documents`` only with sentence sharding); ``entities``
    and ``labels`` count the entities that made it into the Docs.
    """

    file: str
    documents: int = 0
    shards: int = 0
    entities: int = 0
    labels: Counter = field(default_factory=Counter)
    problems: List[Problem] = field(default_factory=list)

    def problem(self, line: int, reason: str, kept: bool, detail: str = "") -> None:
        self.problems.append(Problem(self.file, line, reason, kept, detail))

    @property
    def dropped(self) -> int:
        return sum(1 for p in self.problems if not p.kept)

    def problem_counts(self) -> Counter:
        return Counter(p.reason for p in self.problems)


@dataclass
class Entity:
    """An entity as the source states it: character offsets into the record text (end
    exclusive), the source line, and the mention text when the source repeats it."""

    label: str
    start: int
    end: int
    line: int
    text: Optional[str] = None


@dataclass
class Record:
    """One source unit (sentence or document). ``words`` is None for character-tokenized
    (Chinese) text; otherwise the tokens, which the text joins with single spaces."""

    text: str
    entities: List[Entity]
    line: int
    words: Optional[List[str]] = None
    meta: Dict[str, Any] = field(default_factory=dict)


_EOL = re.compile(rb"\r\n|\r|\n")


def iter_lines(path: Path, report: ReadReport) -> Iterator[Tuple[int, Optional[str]]]:
    """Yield ``(line number, text)`` for each line, accepting CRLF, CR and LF and a UTF-8
    BOM. An undecodable line is reported and yielded as ``None`` so numbering stays true.

    Lines are split on bytes, not with ``str.splitlines``, which would also split on
    characters such as U+2028 that can occur inside Chinese text.
    """
    data = Path(path).read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    for number, raw in enumerate(_EOL.split(data), 1):
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as err:
            report.problem(number, UNDECODABLE, kept=False, detail=f"{err.reason} at byte {err.start}")
            yield number, None


def iter_json_lines(path: Path, report: ReadReport) -> Iterator[Tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line of a JSON-lines file; a line that is
    not JSON is reported and skipped."""
    for number, line in iter_lines(path, report):
        if line is None or not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            report.problem(number, BAD_JSON, kept=False, detail=err.msg)
            continue
        except RecursionError:
            report.problem(number, BAD_JSON, kept=False, detail="nested too deeply to read")
            continue
        yield number, value


def token_offsets(words: Sequence[str], gap: int = 1) -> List[Tuple[int, int]]:
    """Character offsets of ``words`` in the text that joins them with ``gap`` spaces (0 for
    characters, 1 for words)."""
    offsets, pos = [], 0
    for word in words:
        offsets.append((pos, pos + len(word)))
        pos += len(word) + gap
    return offsets


def check_entities(record: Record, report: ReadReport) -> List[Entity]:
    """The checks every format shares: drop (and report) empty, reversed, out-of-range and
    token-misaligned spans; report, but keep, a mention text that disagrees with the offsets
    (the offsets are what the annotation tool stored)."""
    n = len(record.text)
    boundaries = None
    if record.words is not None:
        offsets = token_offsets(record.words)
        boundaries = ({s for s, _ in offsets}, {e for _, e in offsets})
    kept = []
    for ent in record.entities:
        where = f"{ent.label} [{ent.start}, {ent.end})"
        if ent.start >= ent.end:
            report.problem(ent.line, EMPTY_SPAN, kept=False, detail=where)
        elif ent.start < 0 or ent.end > n:
            report.problem(ent.line, OUT_OF_RANGE, kept=False, detail=f"{where}, text length {n}")
        elif boundaries is not None and (ent.start not in boundaries[0] or ent.end not in boundaries[1]):
            report.problem(ent.line, NOT_ON_TOKENS, kept=False, detail=where)
        else:
            if ent.text is not None and record.text[ent.start : ent.end] != ent.text:
                found = record.text[ent.start : ent.end]
                report.problem(
                    ent.line, MENTION_MISMATCH, kept=True, detail=f"{where} is {found!r}, source says {ent.text!r}"
                )
            kept.append(ent)
    return kept


def make_doc(
    vocab: Vocab,
    text: str,
    spans: Iterable[Tuple[str, int, int]],
    *,
    spans_key: str = DEFAULT_SPANS_KEY,
    flat_policy: Optional[str] = "longest",
    words: Optional[Sequence[str]] = None,
) -> Doc:
    """Build a gold Doc: every ``(label, start, end)`` character span goes, nested and with
    its source label, into ``doc.spans[spans_key]``; the flat, non-overlapping view chosen by
    ``flat_policy`` goes into ``doc.ents``.

    Without ``words`` the Doc has one token per character and no trailing whitespace (so a
    space or newline is a token of its own and every character offset is a token boundary:
    :class:`spacy_medllm.tokenizer.CharTokenizer` makes the same tokens at prediction time);
    with ``words`` the tokens are joined by single spaces. A span that is not on token
    boundaries is a caller error (:func:`check_entities` filters them).
    """
    if words is None:
        doc = char_doc(vocab, text)
    else:
        doc = Doc(vocab, words=list(words), spaces=[True] * (len(words) - 1) + [False] * bool(words))
        if doc.text != text:
            raise ValueError(f"words do not join to the text: {doc.text!r} != {text!r}")
    group = []
    for label, start, end in spans:
        span = doc.char_span(start, end, label=label)
        if span is None:
            raise ValueError(f"span {label} [{start}, {end}) is not on token boundaries of {text!r}")
        group.append(span)
    set_spans(doc, group, spans_key, flat_policy=flat_policy)
    return doc
