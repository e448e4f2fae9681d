"""Character BIO files (ROCLING): one ``char TAG`` per line, a whitespace-only line between
sentences (in ROCLING a single space, then CRLF); CRLF, CR and LF line ends are all accepted.

Also home of the BIO decoding shared with HealthNER and CoNLL. Malformed tags are repaired by
one documented rule, and each repair is reported with file and line:

- a lower-case prefix is upper-cased: ``i-CHEM`` → ``I-CHEM``;
- ``O-X`` is read as ``O`` (in ROCLING the one ``O-SYMP`` marks 經 of 經由, "via", not a symptom);
- ``I-X`` that does not continue a ``B-X``/``I-X`` starts a new entity, as ``B-X`` (the
  conlleval / seqeval default reading);
- any other tag is read as ``O``.

A line that is not ``token TAG`` (one field only) is reported and dropped.
"""

import re
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

from spacy.util import registry

from .. import DEFAULT_SPANS_KEY
from .base import (
    MALFORMED_LINE,
    MALFORMED_TAG,
    ORPHAN_I,
    UNKNOWN_TAG,
    Entity,
    ReadReport,
    Record,
    iter_lines,
    token_offsets,
)
from .corpus import MedCorpus

_TAG = re.compile(r"([BIObio])-(\S+)")


def _parse_tag(tag: str, line: int, report: ReadReport) -> Tuple[str, Optional[str]]:
    if tag == "O":
        return "O", None
    match = _TAG.fullmatch(tag)
    if match is None:
        report.problem(line, UNKNOWN_TAG, kept=True, detail=repr(tag))
        return "O", None
    prefix, label = match.group(1).upper(), match.group(2)
    if prefix == "O":
        report.problem(line, MALFORMED_TAG, kept=True, detail=f"{tag!r} read as 'O'")
        return "O", None
    if match.group(1) != prefix:
        report.problem(line, MALFORMED_TAG, kept=True, detail=f"{tag!r} read as '{prefix}-{label}'")
    return prefix, label


def decode_tags(tags: Sequence[Tuple[str, int]], report: ReadReport) -> List[Tuple[str, int, int, int]]:
    """``(label, first token, end token, line)`` for each entity in ``(tag, line)`` pairs,
    applying the repair rules of this module."""
    spans: List[Tuple[str, int, int, int]] = []
    current: Optional[List] = None  # [label, start, line]
    for i, (tag, line) in enumerate(tags):
        prefix, label = _parse_tag(tag, line, report)
        if prefix == "I" and (current is None or current[0] != label):
            report.problem(line, ORPHAN_I, kept=True, detail=repr(tag))
            prefix = "B"
        if prefix != "I" and current is not None:
            spans.append((current[0], current[1], i, current[2]))
            current = None
        if prefix == "B":
            current = [label, i, line]
    if current is not None:
        spans.append((current[0], current[1], len(tags), current[2]))
    return spans


def _split_line(line: str, char_level: bool) -> Tuple[str, Optional[str]]:
    """``(token, tag)``; the tag is None when the line has one field, the token "" when it
    has none before the tag.

    Words: the first and the last tab-separated (else whitespace-separated) field, so middle
    columns are ignored. Characters: split at the last run of spaces or tabs, so that a space
    can itself be the token (``"  O"``).
    """
    body = line.rstrip(" \t")
    if not char_level:
        fields = body.split("\t") if "\t" in body else body.split()
        return fields[0].strip(), (fields[-1].strip() if len(fields) > 1 else None)
    cut = max(body.rfind(" "), body.rfind("\t"))
    if cut < 0:
        return body, None
    head = body[:cut]
    return head.rstrip(" \t") or head[:1], body[cut + 1 :]


def _record(tokens: List[str], tags: List[Tuple[str, int]], char_level: bool, report: ReadReport) -> Record:
    offsets = token_offsets(tokens, gap=0 if char_level else 1)
    text, words = ("".join(tokens), None) if char_level else (" ".join(tokens), list(tokens))
    entities = [
        Entity(label, offsets[s][0], offsets[e - 1][1], line) for label, s, e, line in decode_tags(tags, report)
    ]
    return Record(text, entities, tags[0][1], words)


def read_tagged(path: Path, report: ReadReport, char_level: bool = True) -> Iterator[Record]:
    """Sentences of a ``token TAG`` file. ``char_level`` joins tokens without spaces
    (Chinese characters); otherwise tokens are words joined by spaces and ``-DOCSTART-``
    lines (CoNLL) separate sentences."""
    tokens: List[str] = []
    tags: List[Tuple[str, int]] = []
    for number, line in iter_lines(path, report):
        if line is None:
            continue
        if not line.strip() or (not char_level and line.startswith("-DOCSTART-")):
            if tokens:
                yield _record(tokens, tags, char_level, report)
            tokens, tags = [], []
            continue
        token, tag = _split_line(line, char_level)
        if not token or tag is None:
            report.problem(number, MALFORMED_LINE, kept=False, detail=f"{line!r} is not 'token TAG'")
            continue
        tokens.append(token)
        tags.append((tag, number))
    if tokens:
        yield _record(tokens, tags, char_level, report)


def read(path: Path, report: ReadReport) -> Iterator[Record]:
    """Sentences of a character BIO file."""
    return read_tagged(path, report, char_level=True)


@registry.readers("spacy_medllm.BIOReader.v1")
def bio_reader(
    path: Union[str, Path],
    spans_key: str = DEFAULT_SPANS_KEY,
    flat_policy: Optional[str] = "longest",
    normalize: Optional[str] = None,
    max_chars: Optional[int] = None,
    limit: int = 0,
) -> MedCorpus:
    """Character BIO (ROCLING) as training or evaluation Examples; ``normalize="t2s"``
    converts traditional to simplified characters in place."""
    return MedCorpus(
        path, read, spans_key=spans_key, flat_policy=flat_policy, normalize=normalize, max_chars=max_chars, limit=limit
    )
