"""A corpus on disk, in blocks: reading inputs, writing output shards, resuming a run.

Inputs are ``.spacy`` DocBins, JSONL files with a ``text`` field (the other fields travel as
metadata) and plain text files (one document a line), alone or as a folder or glob. Each
input file is cut into blocks of ``block_size`` lines (a ``.spacy`` file: documents), named
after the file and the block's index, so the same input always gives the same blocks
whichever engine runs them. Each block becomes one shard: ``NAME.spacy`` (a DocBin) and
``NAME.jsonl`` (one line of entities per document), each written under a temporary name and
moved into place, so a crashed run leaves only whole shards and a rerun skips them.

A bad line (not UTF-8, invalid JSON, no ``text``, a text that is not a string) never stops
a run: it is logged with its ``file:line`` and counted in the :class:`InputReport`.
"""
import glob
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from spacy.language import Language
from spacy.tokens import Doc, DocBin
from spacy.vocab import Vocab

from . import DEFAULT_SPANS_KEY
from .errors import CorpusError

logger = logging.getLogger("spacy_medllm")

SUFFIXES = (".spacy", ".jsonl", ".txt")  # what a folder or glob contributes
MANIFEST = "corpus.json"  # the settings that fix a shard folder's blocks
BAD_LINES = {
    "not_a_docbin": "not a DocBin (the whole file)",
    "not_utf8": "not UTF-8",
    "invalid_json": "invalid JSON",
    "not_an_object": "not a JSON object",
    "no_text": "no \"text\" field",
    "text_not_string": "\"text\" is not a string",
}


@dataclass
class Record:
    """One input document: its text, where it came from (``file:line``) and its metadata."""

    text: str
    origin: str
    meta: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Block:
    """The unit of work and of output: one shard is written per block."""

    name: str
    records: List[Record]


@dataclass
class InputReport:
    """What reading skipped: blank lines, and bad lines by reason with their ``file:line``."""

    blank: int = 0
    bad: Counter = field(default_factory=Counter)
    where: List[str] = field(default_factory=list)

    def reject(self, origin: str, reason: str) -> None:
        self.bad[reason] += 1
        self.where.append(f"{origin} {BAD_LINES[reason]}")
        logger.warning("%s: %s, line skipped", origin, BAD_LINES[reason])


Stats = Dict[str, Counter]



@dataclass
class RunSummary:
    """The counts a run ends with, whichever engine ran it."""

    documents: int = 0
    blocks_written: int = 0
    blocks_skipped: int = 0
    stats: Stats = field(default_factory=dict)
    input: InputReport = field(default_factory=InputReport)

    def add_stats(self, stats: Stats) -> None:
        for name, counts in stats.items():
            self.stats.setdefault(name, Counter()).update(counts)


# -- inputs ------------------------------------------------------------------------------
def input_files(spec: str) -> List[Tuple[Path, str]]:
    """The files of ``spec`` (a file, a folder searched recursively, or a glob), in name
    order, each with the prefix of its shards' names: its path relative to the folder (or
    the glob's common folder), with ``/`` as ``__``."""
    path = Path(spec)
    if path.is_file():
        return [(path, path.name)]
    if path.is_dir():
        root, found = path, [p for p in path.rglob("*") if p.is_file()]
    else:
        found = [Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()]
        root = Path(os.path.commonpath([str(p.parent) for p in found])) if found else path
    files = sorted(p for p in found if p.suffix in SUFFIXES and not p.name.startswith("."))
    if not files:
        raise CorpusError(f"No input files ({', '.join(SUFFIXES)}) at {spec}")
    return [(p, p.relative_to(root).as_posix().replace("/", "__")) for p in files]


def _read_lines(path: Path, report: InputReport) -> Iterator[Tuple[int, Optional[str]]]:
    """``(line number, text)`` of a text file; the text is None for a line that is not UTF-8."""
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                yield number, raw.decode("utf8").rstrip("\r\n")
            except UnicodeDecodeError:
                report.reject(f"{path}:{number}", "not_utf8")
                yield number, None


def _parse_jsonl(line: str, origin: str, report: InputReport) -> Optional[Record]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return report.reject(origin, "invalid_json")
    if not isinstance(value, dict):
        return report.reject(origin, "not_an_object")
    if "text" not in value:
        return report.reject(origin, "no_text")
    text = value.pop("text")
    if not isinstance(text, str):
        return report.reject(origin, "text_not_string")
    return Record(text, origin, value)


def read_records(path: Path, report: InputReport) -> Iterator[Tuple[int, Optional[Record]]]:
    """``(line number, record)`` for each line of ``path`` (of a ``.spacy`` file: each
    document, numbered from 1); the record is None where the line was blank or bad."""
    if path.suffix == ".spacy":
        try:
            docs = DocBin().from_disk(path).get_docs(Vocab())
        except (ValueError, KeyError):
            report.reject(f"{path}:0", "not_a_docbin")
            return
        for number, doc in enumerate(docs, start=1):
            meta = {"title": doc.user_data["title"]} if "title" in doc.user_data else {}
            yield number, Record(doc.text, f"{path}:{number}", meta)
        return
    for number, line in _read_lines(path, report):
        record = None
        if line is not None and not line.strip():
            report.blank += 1
        elif line is not None:
            origin = f"{path}:{number}"
            record = _parse_jsonl(line, origin, report) if path.suffix == ".jsonl" else Record(line, origin)
        yield number, record


def read_blocks(spec: str, block_size: int, report: InputReport, limit: int = 0) -> Iterator[Block]:
    """The blocks of the input ``spec``, file after file: block ``i`` of a file holds the
    good records of its lines ``i * block_size + 1`` to ``(i + 1) * block_size``, and every
    block is yielded, even one left empty by bad lines, so that it too gets its shard.
    ``limit`` > 0 stops after that many records."""
    if block_size < 1:
        raise CorpusError(f"block_size must be at least 1, not {block_size}")
    taken = 0
    for path, prefix in input_files(spec):
        index, records = 0, []
        for number, record in read_records(path, report):
            if (number - 1) // block_size > index:
                yield Block(block_name(prefix, index), records)
                index, records = (number - 1) // block_size, []
            if record is not None:
                records.append(record)
                taken += 1
            if limit and taken >= limit:
                yield Block(block_name(prefix, index), records)
                return
        yield Block(block_name(prefix, index), records)


def block_name(prefix: str, index: int) -> str:
    return f"{prefix}.{index:05d}"


# -- annotation --------------------------------------------------------------------------
@dataclass
class Shard:
    """A block's output, as bytes: what an engine hands to :func:`write_shard`."""

    name: str
    docbin: bytes
    jsonl: bytes
    documents: int


def annotate(nlp: Language, records: Sequence[Record], batch_size: Optional[int] = None) -> Iterator[Doc]:
    """The predicted docs of ``records``. Only the texts reach the pipeline; origin and
    metadata are put back on each doc's ``user_data``."""
    for record, doc in zip(records, nlp.pipe((r.text for r in records), batch_size=batch_size)):
        doc.user_data["origin"] = record.origin
        if record.meta:
            doc.user_data["meta"] = record.meta
        if "title" in record.meta:  # what `visualize` and displaCy show
            doc.user_data["title"] = record.meta["title"]
        yield doc


def make_shard(name: str, records: Sequence[Record], docs: Sequence[Doc]) -> Shard:
    """The shard of a block, from its records and their docs in block order. Both engines
    annotate a whole block in one ``nlp.pipe`` call, so they batch (and pad) the same
    prompts and their shards are the same bytes."""
    lines = "".join(entities_line(doc, record) + "\n" for record, doc in zip(records, docs))
    docbin = DocBin(docs=docs, store_user_data=True).to_bytes()
    return Shard(name, docbin, lines.encode("utf8"), len(docs))


def entities_line(doc: Doc, record: Record) -> str:
    group = doc.spans.get(DEFAULT_SPANS_KEY, [])
    scores = group.attrs.get("scores", [None] * len(group)) if len(group) else []
    spans = [
        {"start": span.start_char, "end": span.end_char, "label": span.label_, "score": score}
        for span, score in zip(group, scores)
    ]
    return json.dumps({"origin": record.origin, "text": doc.text, "spans": spans, "meta": record.meta}, ensure_ascii=False)


def pipeline_stats(nlp: Language) -> Stats:
    """A copy of the components' counters (``component.stats``), by component name."""
    return {name: Counter(component.stats) for name, component in nlp.pipeline if isinstance(getattr(component, "stats", None), Counter)}


def stats_since(before: Stats, after: Stats) -> Stats:
    return {name: after[name] - before.get(name, Counter()) for name in after}


# -- output ------------------------------------------------------------------------------
def open_output(folder: Path, settings: Dict[str, Any], *, replace: bool = False) -> None:
    """Make ``folder`` ready for shards written with ``settings`` (what fixes the blocks):
    new, or resumable because it was written with the same settings. A folder written with
    other settings is an error, or cleared when ``replace``. Temporary files a crashed run
    left behind are removed."""
    manifest = folder / MANIFEST
    if manifest.exists():
        found = json.loads(manifest.read_text(encoding="utf8"))
        if found != settings:
            if not replace:
                raise CorpusError(
                    f"{folder} holds shards written with {found}, not {settings}: "
                    "rerun with the same settings to resume, or write to a new folder."
                )
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stray in folder.glob(".*.tmp"):
        stray.unlink()
    if not manifest.exists():
        _write_atomic(manifest, json.dumps(settings).encode("utf8"))


def shard_done(folder: Path, name: str) -> bool:
    return (folder / f"{name}.jsonl").exists() and (folder / f"{name}.spacy").exists()


def write_shard(folder: Path, shard: Shard) -> None:
    """Write a shard's two files; the DocBin last, so that a shard whose two files are both
    there is whole."""
    _write_atomic(folder / f"{shard.name}.jsonl", shard.jsonl)
    _write_atomic(folder / f"{shard.name}.spacy", shard.docbin)


def merge_shards(folder: Path, names: Sequence[str], output: Path) -> int:
    """Concatenate the DocBin shards ``names`` into the single file ``output``; the
    number of documents."""
    merged = DocBin(store_user_data=True)
    for name in names:
        merged.merge(DocBin(store_user_data=True).from_disk(folder / f"{name}.spacy"))
    output.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(output, merged.to_bytes())
    return len(merged)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path`` and move it into place: readers (and a
    resumed run) see the old file or the whole new one, never a part."""
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise
