"""Corpus readers: one module per source format, each parsing into :class:`Record` objects
that the shared code in :mod:`.corpus` checks, normalises, shards, counts and turns into gold
Docs (nested entities in ``doc.spans[spans_key]``, a flat view in ``doc.ents``).

``CONVERTERS`` maps the names used by ``python -m spacy medllm convert --converter`` to the
format parsers; :func:`guess_converter` picks one from a file's content.
"""

import json
import re
from pathlib import Path
from typing import Dict, Union

from . import bio, ccks2019, cmeee, conll, healthner
from .base import Entity, Problem, ReadReport, Record, make_doc
from .corpus import MedCorpus, ReadFn, iter_files, read_docs, read_records
from .normalize import normalize_text

CONVERTERS: Dict[str, ReadFn] = {
    "cmeee": cmeee.read,
    "ccks2019": ccks2019.read,
    "bio": bio.read,
    "healthner": healthner.read,
    "conll": conll.read,
}

_TAG_FIELD = re.compile(r"O|[A-Za-z]-\S+")


def guess_converter(path: Union[str, Path]) -> str:
    """The converter name for a file (or the first file of a directory), from its content:
    a JSON list is CBLUE/CMeEE; JSON lines are told apart by their keys; ``token TAG`` lines
    are character BIO when (nearly) every token is one character, CoNLL otherwise."""
    file = iter_files(path)[0]
    with file.open("rb") as f:
        head = f.read(1 << 16)
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    if text.startswith("["):
        return "cmeee"
    if text.startswith("{"):
        with file.open("rb") as f:
            first = f.readline().decode("utf-8", errors="replace").lstrip("\ufeff")
        try:
            keys = set(json.loads(first))
        except (json.JSONDecodeError, TypeError):
            keys = set()
        for name, needed in (
            ("ccks2019", {"originalText"}),
            ("healthner", {"character", "character_label"}),
            ("cmeee", {"text"}),
        ):
            if needed <= keys:
                return name
        raise ValueError(f"{file}: JSON lines with keys {sorted(keys)} match no converter; pass --converter")
    lines = re.split(r"\r\n|\r|\n", text)
    lines = [line for line in lines[: -1 if len(head) == 1 << 16 else None][:500] if line.strip()]  # last may be cut
    pairs = [line.rstrip().rsplit(None, 1) for line in lines]
    tagged = [p for p in pairs if len(p) == 2 and _TAG_FIELD.fullmatch(p[1])]
    if lines and len(tagged) >= 0.6 * len(lines):  # malformed lines are allowed
        single = sum(1 for token, _ in tagged if len(token.strip()) <= 1)
        return "bio" if single >= 0.95 * len(tagged) else "conll"
    raise ValueError(
        f"{file}: cannot tell the corpus format from its content; pass --converter ({', '.join(CONVERTERS)})"
    )


__all__ = [
    "CONVERTERS",
    "Entity",
    "MedCorpus",
    "Problem",
    "ReadReport",
    "Record",
    "guess_converter",
    "iter_files",
    "make_doc",
    "normalize_text",
    "read_docs",
    "read_records",
]
