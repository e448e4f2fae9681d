"""English CoNLL IOB TSV (NCBI-disease, BC5CDR, BC2GM as prepared by Crichton et al. 2017):
``token<TAB>tag`` per line, a blank line between sentences, ``-DOCSTART-`` lines skipped.

Doc words are the tokens, joined by single spaces. Extra middle columns are ignored (the tag is
the last field). Tag repairs follow :mod:`spacy_medllm.readers.bio`.
"""

from pathlib import Path
from typing import Iterator, Optional, Union

from spacy.util import registry

from .. import DEFAULT_SPANS_KEY
from .base import ReadReport, Record
from .bio import read_tagged
from .corpus import MedCorpus


def read(path: Path, report: ReadReport) -> Iterator[Record]:
    """Sentences of a CoNLL IOB file, with word tokens."""
    return read_tagged(path, report, char_level=False)


@registry.readers("spacy_medllm.CoNLLReader.v1")
def conll_reader(
    path: Union[str, Path],
    spans_key: str = DEFAULT_SPANS_KEY,
    flat_policy: Optional[str] = "longest",
    normalize: Optional[str] = None,
    max_chars: Optional[int] = None,
    limit: int = 0,
) -> MedCorpus:
    """CoNLL IOB TSV as training or evaluation Examples (``max_chars`` must stay None: the
    sentences are already sentences and the tokens are words)."""
    return MedCorpus(
        path, read, spans_key=spans_key, flat_policy=flat_policy, normalize=normalize, max_chars=max_chars, limit=limit
    )
