"""Mark strategy (BioNER-LLaMA): one prompt per type; the answer is the sentence with
``<mark>`` … ``</mark>`` around every entity of that type, the plain sentence when there
is none. It is the symbol strategy with other markers and no answer prefix, parsed by
the same alignment (see :mod:`.symbol`)."""
from typing import Optional

from spacy.util import registry

from ..labels import LabelScheme
from .symbol import SymbolStrategy


class MarkStrategy(SymbolStrategy):
    name = "mark"
    open = "<mark>"
    close = "</mark>"

    def answer_prefix(self, scheme: LabelScheme, label: str) -> str:
        return ""


@registry.misc("spacy_medllm.MarkStrategy.v1")
def make_mark_strategy(template: Optional[str] = None) -> MarkStrategy:
    return MarkStrategy(template=template)
