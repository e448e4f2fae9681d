"""CMeEE / CBLUE JSON: ``[{"text", "entities": [{"start_idx", "end_idx", "type", "entity"}]}]``.

``end_idx`` is INCLUSIVE. Entities nest. The CHIP-2020 train file holds two empty entities
(``start_idx > end_idx``); they are reported and dropped. JSON lines with the same records
are read too (some CBLUE copies ship that way). The list is parsed record by record, so a
broken record is reported with its line and the records after it are still read.
"""

import codecs
import json
import re
from bisect import bisect_right
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple, Union

from spacy.util import registry

from .. import DEFAULT_SPANS_KEY
from ..types import parse_offset
from .base import BAD_JSON, BAD_RECORD, MALFORMED_ENTITY, Entity, ReadReport, Record, iter_json_lines, iter_lines
from .corpus import MedCorpus

_NEXT_RECORD = re.compile(r"\n[ \t]*\{")
# Only a key is a string followed by a colon (quotes inside a string would be escaped).
_START_KEY = re.compile(r'"start_idx"\s*:')


def _json_list(text: str, bad_lines: set, report: ReadReport) -> Iterator[Tuple[int, Any, List[int]]]:
    """``(line, value, entity lines)`` for each element of a top-level JSON array, where
    entity lines are the lines of the element's ``"start_idx"`` keys (the released files are
    pretty-printed, so an entity has a line of its own). Resynchronises at the next line that
    opens an object when an element does not parse."""
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
    line_of = lambda pos: bisect_right(line_starts, pos)  # noqa: E731
    decoder = json.JSONDecoder()
    ws = re.compile(r"[ \t\r\n]*")
    pos = ws.match(text, text.index("[") + 1).end()
    while pos < len(text) and text[pos] != "]":
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            if bad_lines.isdisjoint(range(line_of(pos), line_of(err.pos) + 1)):  # else reported already
                report.problem(line_of(pos), BAD_JSON, kept=False, detail=f"{err.msg} at line {line_of(err.pos)}")
            resync = _NEXT_RECORD.search(text, err.pos)
            if resync is None:
                return
            pos = resync.end() - 1
            continue
        except RecursionError:
            report.problem(line_of(pos), BAD_JSON, kept=False, detail="nested too deeply to read")
            resync = _NEXT_RECORD.search(text, pos + 1)
            if resync is None:
                return
            pos = resync.end() - 1
            continue
        yield line_of(pos), value, [line_of(m.start()) for m in _START_KEY.finditer(text, pos, end)]
        pos = ws.match(text, end).end()
        if pos < len(text) and text[pos] == ",":
            pos = ws.match(text, pos + 1).end()


def _values(path: Path, report: ReadReport) -> Iterator[Tuple[int, Any, List[int]]]:
    if Path(path).read_bytes().lstrip(codecs.BOM_UTF8 + b" \t\r\n").startswith(b"["):
        lines = list(iter_lines(path, report))
        bad = {number for number, line in lines if line is None}
        yield from _json_list("\n".join(line or "" for _, line in lines), bad, report)
    else:
        for line, value in iter_json_lines(path, report):
            yield line, value, []


def _offset(value: Any) -> int:
    offset = parse_offset(value)
    if offset is None:
        raise ValueError(f"offset {value!r} is not an integer")
    return offset


def _entity(raw: Any, line: int, report: ReadReport) -> Optional[Entity]:
    try:
        start, end = _offset(raw["start_idx"]), _offset(raw["end_idx"]) + 1
        label = raw["type"]
        if not isinstance(label, str) or not label:
            raise ValueError("no type")
    except (KeyError, TypeError, ValueError) as err:
        report.problem(line, MALFORMED_ENTITY, kept=False, detail=f"{raw!r} ({err!r})")
        return None
    mention = raw.get("entity")
    return Entity(label, start, end, line, mention if isinstance(mention, str) else None)


def read(path: Path, report: ReadReport) -> Iterator[Record]:
    """Records of a CMeEE file; a record without ``entities`` (a test set) has none."""
    for line, value, entity_lines in _values(path, report):
        if (
            not isinstance(value, dict)
            or not isinstance(value.get("text"), str)
            or not isinstance(value.get("entities", []), list)
        ):
            report.problem(line, BAD_RECORD, kept=False, detail="expected {'text': str, 'entities': list}")
            continue
        raws = value.get("entities", [])
        lines = entity_lines if len(entity_lines) == len(raws) else [line] * len(raws)
        entities = [_entity(raw, entity_line, report) for raw, entity_line in zip(raws, lines)]
        yield Record(value["text"], [e for e in entities if e is not None], line)


@registry.readers("spacy_medllm.CMeEEReader.v1")
def cmeee_reader(
    path: Union[str, Path],
    spans_key: str = DEFAULT_SPANS_KEY,
    flat_policy: Optional[str] = "longest",
    normalize: Optional[str] = None,
    max_chars: Optional[int] = None,
    limit: int = 0,
) -> MedCorpus:
    """CMeEE / CBLUE JSON as training or evaluation Examples."""
    return MedCorpus(
        path, read, spans_key=spans_key, flat_policy=flat_policy, normalize=normalize, max_chars=max_chars, limit=limit
    )
