"""``medllm_align``: the generators' mentions (``doc._.llm_mentions``) → a nested
``SpanGroup`` in ``doc.spans[spans_key]`` and a flat ``doc.ents``, by
:class:`~spacy_medllm.alignment.MentionAligner`; what cannot be aligned is counted in
``stats``."""
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from spacy.language import Language
from spacy.tokens import Doc
from spacy.training import Example

from .. import DEFAULT_SPANS_KEY
from ..alignment import MentionAligner
from ..extensions import LLM_MENTIONS
from ..scoring import SCORE_WEIGHTS


@Language.factory(
    "medllm_align",
    default_config={
        "sources": None,
        "spans_key": DEFAULT_SPANS_KEY,
        "search": "nearest",
        "alignment_mode": "strict",
        "flat_policy": "longest",
        "scorer": {"@scorers": "spacy_medllm.span_scorer.v1", "spans_key": DEFAULT_SPANS_KEY},
    },
    requires=[f"doc._.{LLM_MENTIONS}"],
    assigns=["doc.spans", "doc.ents"],
    default_score_weights=SCORE_WEIGHTS,
)
def make_medllm_align(
    nlp: Language,
    name: str,
    sources: Optional[List[str]],
    spans_key: str,
    search: str,
    alignment_mode: str,
    flat_policy: Optional[str],
    scorer: Optional[Callable],
) -> "MedLLMAlign":
    """``sources``: names of the generators whose mentions to align (None: all of them);
    ``search``: how offset-less mentions are placed: every occurrence (``all``), the first,
    only a ``unique`` one, or the one ``nearest`` to the mention's hint (first without one);
    ``alignment_mode``: spaCy's char_span mode; ``flat_policy``: how ``doc.ents`` is chosen
    (longest / score / outermost / first; null leaves doc.ents alone)."""
    return MedLLMAlign(
        name,
        sources=sources,
        spans_key=spans_key,
        search=search,
        alignment_mode=alignment_mode,
        flat_policy=flat_policy,
        scorer=scorer,
    )


class MedLLMAlign(MentionAligner):
    def __init__(
        self,
        name: str,
        *,
        sources: Optional[Sequence[str]],
        spans_key: str,
        search: str,
        alignment_mode: str,
        flat_policy: Optional[str],
        scorer: Optional[Callable],
    ) -> None:
        super().__init__(
            name, sources=sources, spans_key=spans_key, search=search, alignment_mode=alignment_mode, flat_policy=flat_policy
        )
        self.scorer = scorer

    def __call__(self, doc: Doc) -> Doc:
        return self.align(doc)

    def pipe(self, stream: Iterable[Doc], *, batch_size: int = 128) -> Iterable[Doc]:
        for doc in stream:
            yield self.align(doc)

    def score(self, examples: Iterable[Example], **kwargs) -> Dict:
        if self.scorer is None:
            return {}
        return self.scorer(examples, **kwargs)
