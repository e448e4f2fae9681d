"""From a format's records to checked, normalised, sharded gold Docs and training Examples.

Every format goes through the same steps, in this order: parse (the format module), check the
spans against the original text (:func:`check_entities`), normalise the script, shard, count,
build the Doc. Counting happens on the records, so the counts can be had without building Docs.
"""

import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Union

from spacy.language import Language
from spacy.tokens import Doc
from spacy.training import Example
from spacy.vocab import Vocab

from .. import DEFAULT_SPANS_KEY
from ..sharding import shard_text
from .base import ReadReport, Record, check_entities, make_doc, token_offsets
from .normalize import get_converter

logger = logging.getLogger("spacy_medllm")

ReadFn = Callable[[Path, ReadReport], Iterator[Record]]


def iter_files(path: Union[str, Path]) -> List[Path]:
    """The file itself, or the visible files of a directory in name order."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not path.exists():
        raise FileNotFoundError(f"Corpus path not found: {path}")
    return [path]


def _shard(record: Record, max_chars: int) -> Iterator[Record]:
    ranges = shard_text(record.text, max_chars, [(e.start, e.end) for e in record.entities])
    if len(ranges) == 1:
        yield record
        return
    for start, end in ranges:
        ents = [
            replace(e, start=e.start - start, end=e.end - start)
            for e in record.entities
            if start <= e.start and e.end <= end
        ]
        yield replace(record, text=record.text[start:end], entities=ents, meta={**record.meta, "shard": (start, end)})


def read_records(
    path: Union[str, Path],
    read_fn: ReadFn,
    *,
    normalize: Optional[str] = None,
    max_chars: Optional[int] = None,
    limit: int = 0,
    reports: Optional[List[ReadReport]] = None,
) -> Iterator[Record]:
    """Checked records of every file under ``path``, one :class:`ReadReport` per file appended
    to ``reports``. ``normalize`` names an OpenCC configuration (``"t2s"``); ``max_chars``
    shards long texts; ``limit`` > 0 stops after that many records (shards)."""
    convert = get_converter(normalize) if normalize else None
    reports = [] if reports is None else reports
    produced = 0
    for file in iter_files(path):
        report = ReadReport(str(file))
        reports.append(report)
        for record in read_fn(file, report):
            record.entities = check_entities(record, report)
            if convert is not None:
                record.text = convert(record.text)
                if record.words is not None:  # same offsets, so the words are slices of the new text
                    record.words = [record.text[s:e] for s, e in token_offsets(record.words)]
            if max_chars and record.words is not None:
                raise ValueError(f"{file}: max_chars shards character-tokenized corpora; this one has word tokens")
            report.documents += 1
            record.meta["source"] = f"{file.name}:{record.line}"
            for shard in _shard(record, max_chars) if max_chars else [record]:
                report.shards += 1
                report.entities += len(shard.entities)
                report.labels.update(e.label for e in shard.entities)
                yield shard
                produced += 1
                if limit and produced >= limit:
                    return


def record_to_doc(
    record: Record, vocab: Vocab, spans_key: str = DEFAULT_SPANS_KEY, flat_policy: Optional[str] = "longest"
) -> Doc:
    """The gold Doc of a record; ``user_data`` keeps the record's metadata: ``source``
    (``file:line``), ``shard`` offsets into the source text, HealthNER ``id``/``genre``."""
    spans = [(e.label, e.start, e.end) for e in record.entities]
    doc = make_doc(vocab, record.text, spans, spans_key=spans_key, flat_policy=flat_policy, words=record.words)
    doc.user_data.update(record.meta)
    return doc


def read_docs(
    path: Union[str, Path],
    read_fn: ReadFn,
    vocab: Vocab,
    *,
    spans_key: str = DEFAULT_SPANS_KEY,
    flat_policy: Optional[str] = "longest",
    normalize: Optional[str] = None,
    max_chars: Optional[int] = None,
    limit: int = 0,
    reports: Optional[List[ReadReport]] = None,
) -> Iterator[Doc]:
    """Gold Docs of every file under ``path`` (see :func:`read_records`)."""
    for record in read_records(path, read_fn, normalize=normalize, max_chars=max_chars, limit=limit, reports=reports):
        yield record_to_doc(record, vocab, spans_key, flat_policy)


class MedCorpus:
    """A spaCy corpus reader over a source-format file or directory, like ``spacy.Corpus``:
    calling it with ``nlp`` yields Examples whose predicted Doc is ``nlp.make_doc(text)`` and
    whose reference is the gold Doc. Problems in the input are logged once, as a warning."""

    def __init__(
        self,
        path: Union[str, Path],
        read_fn: ReadFn,
        *,
        spans_key: str = DEFAULT_SPANS_KEY,
        flat_policy: Optional[str] = "longest",
        normalize: Optional[str] = None,
        max_chars: Optional[int] = None,
        limit: int = 0,
    ) -> None:
        self.path = Path(path)
        self.read_fn = read_fn
        self.spans_key = spans_key
        self.flat_policy = flat_policy
        self.normalize = normalize
        self.max_chars = max_chars
        self.limit = limit
        self.reports: List[ReadReport] = []
        self._warned = False

    def __call__(self, nlp: Language) -> Iterator[Example]:
        self.reports = []
        docs = read_docs(
            self.path,
            self.read_fn,
            nlp.vocab,
            spans_key=self.spans_key,
            flat_policy=self.flat_policy,
            normalize=self.normalize,
            max_chars=self.max_chars,
            limit=self.limit,
            reports=self.reports,
        )
        for reference in docs:
            yield Example(nlp.make_doc(reference.text), reference)
        if not self._warned:
            self._warned = True
            for report in self.reports:
                if report.problems:
                    first = "; ".join(str(p) for p in report.problems[:3])
                    logger.warning(
                        "%s: %d input problems (%d dropped), e.g. %s",
                        report.file,
                        len(report.problems),
                        report.dropped,
                        first,
                    )
