"""``medllm_ensemble``: combine the span groups of several generators into one.

Each doc's groups (``span_keys``) are compared (``spacy_medllm.ensemble.conflicts``): what all
groups agree on is kept, the rest is handed to the configured resolver region by region.
The final group goes to ``doc.spans[spans_key]`` with each span's support (mean score over
the groups) in ``attrs["scores"]``, and its flat view to ``doc.ents``. The component holds
the exemplars a decision-LLM resolver shows in its prompts and saves them with the pipeline.
"""
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import srsly
from spacy.language import Language
from spacy.tokens import Doc
from spacy.training import Example
from spacy.util import ensure_path, minibatch

from .. import DEFAULT_SPANS_KEY
from ..ensemble import Resolver, compare, doc_groups
from ..ensemble import llm_resolver  # noqa: F401  (registers spacy_medllm.LLMResolver.v1)
from ..scoring import SCORE_WEIGHTS
from ..spans import FLAT_POLICIES, set_spans
from ..ensemble.exemplars import collect_entities, select_exemplars, tfidf_embedder

EXEMPLARS_FILE = "exemplars.json"


@Language.factory(
    "medllm_ensemble",
    default_config={
        "span_keys": [],
        "spans_key": DEFAULT_SPANS_KEY,
        "resolver": {"@misc": "spacy_medllm.VoteResolver.v1"},
        "flat_policy": "longest",
        "scorer": {"@scorers": "spacy_medllm.span_scorer.v1", "spans_key": DEFAULT_SPANS_KEY},
    },
    assigns=["doc.spans", "doc.ents"],
    default_score_weights=SCORE_WEIGHTS,
)
def make_medllm_ensemble(
    nlp: Language,
    name: str,
    span_keys: List[str],
    spans_key: str,
    resolver: Resolver,
    flat_policy: Optional[str],
    scorer: Optional[Callable],
) -> "MedLLMEnsemble":
    """``span_keys``: the groups of the generators, in order; ``spans_key``: the output
    group; ``flat_policy``: how ``doc.ents`` is chosen from it (None leaves doc.ents alone)."""
    return MedLLMEnsemble(nlp.vocab, name, span_keys, spans_key, resolver, flat_policy, scorer)


class MedLLMEnsemble:
    def __init__(
        self,
        vocab,
        name: str,
        span_keys: Sequence[str],
        spans_key: str,
        resolver: Resolver,
        flat_policy: Optional[str] = "longest",
        scorer: Optional[Callable] = None,
    ):
        if not span_keys:
            raise ValueError(f"{name}: set span_keys to the span groups of the generators to combine")
        if len(set(span_keys)) != len(span_keys):
            raise ValueError(f"{name}: span_keys has duplicates: {list(span_keys)}")
        if spans_key in span_keys:
            raise ValueError(f"{name}: the output spans_key {spans_key!r} must differ from the input span_keys")
        if flat_policy is not None and flat_policy not in FLAT_POLICIES:
            raise ValueError(f"{name}: flat_policy must be one of {FLAT_POLICIES} or null, not {flat_policy!r}")
        self.vocab = vocab
        self.name = name
        self.span_keys = list(span_keys)
        self.spans_key = spans_key
        self.resolver = resolver
        self.flat_policy = flat_policy
        self.scorer = scorer
        self.exemplars: Dict[str, List[str]] = {}

    def __call__(self, doc: Doc) -> Doc:
        return self._process([doc])[0]

    def pipe(self, stream: Iterable[Doc], batch_size: int = 64) -> Iterator[Doc]:
        # a whole batch goes to the resolver at once, so an LLM resolver batches its prompts
        for batch in minibatch(stream, size=batch_size):
            yield from self._process(list(batch))

    def _process(self, docs: List[Doc]) -> List[Doc]:
        comparisons = [compare(doc_groups(doc, self.span_keys)) for doc in docs]
        decisions = self.resolver(docs, comparisons, self.exemplars)
        for doc, comparison, kept in zip(docs, comparisons, decisions):
            spans = [doc.char_span(c.start, c.end, label=c.label) for c in kept]
            scores = [c.support(comparison.n_groups) for c in kept]
            set_spans(doc, spans, self.spans_key, scores=scores, flat_policy=self.flat_policy)
        return docs

    def initialize(
        self,
        get_examples: Optional[Callable[[], Iterable[Example]]] = None,
        *,
        nlp: Optional[Language] = None,
        exemplars: Optional[Dict[str, List[str]]] = None,
        per_type: int = 5,
        seed: int = 0,
    ) -> None:
        """Take ``exemplars`` (``[initialize.components.NAME.exemplars]``, for example
        ``spacy_medllm.Exemplars.v1``); without them, and when the resolver needs them,
        choose them from the gold ``spans_key`` groups of the training examples with TF-IDF."""
        if exemplars is not None:
            self.exemplars = {str(k): [str(t) for t in v] for k, v in exemplars.items()}
        elif self.resolver.needs_exemplars and get_examples is not None:
            pool, _ = collect_entities((eg.reference for eg in get_examples()), self.spans_key)
            self.exemplars = select_exemplars(pool, tfidf_embedder(), per_type=per_type, seed=seed)

    def score(self, examples: Iterable[Example], **kwargs) -> Dict[str, float]:
        if self.scorer is None:
            return {}
        return self.scorer(examples, **{"spans_key": self.spans_key, **kwargs})

    # serialization: the exemplars are the component's only state; the resolver is rebuilt
    # from the config (a decision model is referenced there by path)
    def to_bytes(self, *, exclude: Sequence[str] = tuple()) -> bytes:
        return srsly.msgpack_dumps({"exemplars": self.exemplars})

    def from_bytes(self, bytes_data: bytes, *, exclude: Sequence[str] = tuple()) -> "MedLLMEnsemble":
        self.exemplars = dict(srsly.msgpack_loads(bytes_data)["exemplars"])
        return self

    def to_disk(self, path, *, exclude: Sequence[str] = tuple()) -> None:
        path = ensure_path(path)
        path.mkdir(parents=True, exist_ok=True)
        srsly.write_json(path / EXEMPLARS_FILE, {"exemplars": self.exemplars})

    def from_disk(self, path, *, exclude: Sequence[str] = tuple()) -> "MedLLMEnsemble":
        data = srsly.read_json(Path(path) / EXEMPLARS_FILE)
        self.exemplars = {str(k): list(v) for k, v in data["exemplars"].items()}
        return self
