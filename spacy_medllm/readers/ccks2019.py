"""CCKS 2019 Task 1 (Yidu-S4K): JSON lines, UTF-8 BOM,
``{"originalText", "entities": [{"label_type", "start_pos", "end_pos", "overlap"}]}``.

``end_pos`` is EXCLUSIVE. Records are whole clinical documents (up to ~1,700 characters);
``max_chars`` on the reader shards them at sentence ends without cutting an entity.
"""

from pathlib import Path
from typing import Iterator, Optional, Union

from spacy.util import registry

from .. import DEFAULT_SPANS_KEY
from .base import BAD_RECORD, MALFORMED_ENTITY, Entity, ReadReport, Record, iter_json_lines
from .corpus import MedCorpus


def read(path: Path, report: ReadReport) -> Iterator[Record]:
    """Records of a CCKS 2019 file, one per non-blank line."""
    for line, value in iter_json_lines(path, report):
        if (
            not isinstance(value, dict)
            or not isinstance(value.get("originalText"), str)
            or not isinstance(value.get("entities", []), list)
        ):
            report.problem(line, BAD_RECORD, kept=False, detail="expected {'originalText': str, 'entities': list}")
            continue
        entities = []
        for raw in value.get("entities", []):
            try:
                label = raw["label_type"]
                if not isinstance(label, str) or not label:
                    raise ValueError("no label_type")
                entities.append(Entity(label, int(raw["start_pos"]), int(raw["end_pos"]), line))
            except (KeyError, TypeError, ValueError) as err:
                report.problem(line, MALFORMED_ENTITY, kept=False, detail=f"{raw!r} ({err!r})")
        yield Record(value["originalText"], entities, line)


@registry.readers("spacy_medllm.CCKS2019Reader.v1")
def ccks2019_reader(
    path: Union[str, Path],
    spans_key: str = DEFAULT_SPANS_KEY,
    flat_policy: Optional[str] = "longest",
    normalize: Optional[str] = None,
    max_chars: Optional[int] = None,
    limit: int = 0,
) -> MedCorpus:
    """CCKS 2019 JSON lines as training or evaluation Examples (``max_chars`` shards documents)."""
    return MedCorpus(
        path, read, spans_key=spans_key, flat_policy=flat_policy, normalize=normalize, max_chars=max_chars, limit=limit
    )
