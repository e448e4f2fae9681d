"""Chinese HealthNER (Lee & Lu 2021): JSON lines with ``id, genre, sentence, word, word_label,
character, character_label``; ``character_label`` is BIO per character.

The text is the concatenation of ``character`` (the labels index it); a ``sentence`` that
disagrees is reported. BIO repairs follow :mod:`spacy_medllm.readers.bio`.
"""

from pathlib import Path
from typing import Iterator, Optional, Union

from spacy.util import registry

from .. import DEFAULT_SPANS_KEY
from .base import BAD_RECORD, Entity, ReadReport, Record, iter_json_lines, token_offsets
from .bio import decode_tags
from .corpus import MedCorpus

SENTENCE_MISMATCH = "sentence disagrees with characters (characters kept)"


def _str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def read(path: Path, report: ReadReport) -> Iterator[Record]:
    """Records of a HealthNER file, one per non-blank line; ``id`` and ``genre`` go to meta."""
    for line, value in iter_json_lines(path, report):
        chars = value.get("character") if isinstance(value, dict) else None
        labels = value.get("character_label") if isinstance(value, dict) else None
        if not _str_list(chars) or not _str_list(labels) or len(chars) != len(labels):
            report.problem(
                line, BAD_RECORD, kept=False, detail="expected equally long 'character' and 'character_label' lists"
            )
            continue
        text = "".join(chars)
        if value.get("sentence", text) != text:
            report.problem(line, SENTENCE_MISMATCH, kept=True)
        offsets = token_offsets(chars, gap=0)
        entities = [
            Entity(label, offsets[s][0], offsets[e - 1][1], line)
            for label, s, e, _ in decode_tags([(t, line) for t in labels], report)
        ]
        meta = {key: value[key] for key in ("id", "genre") if key in value}
        yield Record(text, entities, line, meta=meta)


@registry.readers("spacy_medllm.HealthNERReader.v1")
def healthner_reader(
    path: Union[str, Path],
    spans_key: str = DEFAULT_SPANS_KEY,
    flat_policy: Optional[str] = "longest",
    normalize: Optional[str] = None,
    max_chars: Optional[int] = None,
    limit: int = 0,
) -> MedCorpus:
    """HealthNER JSON lines as training or evaluation Examples (``normalize="t2s"`` for
    simplified characters)."""
    return MedCorpus(
        path, read, spans_key=spans_key, flat_policy=flat_policy, normalize=normalize, max_chars=max_chars, limit=limit
    )
