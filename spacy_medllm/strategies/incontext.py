"""In-context (MRC-style) mode: the prompts of a base strategy, each preceded by ``k``
demonstrations — the training sentences most similar to the text, with the answers the
base strategy would give for them — for zero/few-shot use of an untuned model.

The demonstrations depend on the text (and, for a per-label base, on the asked type), so
they go at the start of ``Prompt.input``: the prompts of one text then share the system
message and the instruction, but no longer the sentence. Retrieval is pluggable: any
object with ``nearest(text, k) -> list[Demonstration]``; the default is character n-gram
TF-IDF cosine (:class:`TfidfRetriever`).
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

from spacy.tokens import DocBin
from spacy.util import registry
from spacy.vocab import Vocab

from .. import DEFAULT_SPANS_KEY
from ..labels import LabelScheme
from ..types import CopyConstraint, Mention, ParseResult
from .base import WORDS, BaseStrategy, Prompt, mentions_from_doc


@dataclass(frozen=True)
class Demonstration:
    text: str
    mentions: Tuple[Mention, ...]


@runtime_checkable
class Retriever(Protocol):
    def nearest(self, text: str, k: int) -> List[Demonstration]:
        ...


class TfidfRetriever:
    """Nearest training sentences by cosine similarity of character n-gram TF-IDF vectors.

    ``path``: a ``.spacy`` file of gold docs (mentions from ``doc.spans[spans_key]``),
    read on first use; or call :meth:`fit`. ``exclude_identical`` skips a demonstration
    whose text is the query itself (building demonstrations for the training set).
    """

    def __init__(
        self,
        path: Optional[str] = None,
        spans_key: str = DEFAULT_SPANS_KEY,
        ngram_range: Sequence[int] = (1, 2),
        exclude_identical: bool = True,
    ) -> None:
        self.path = path
        self.spans_key = spans_key
        self.ngram_range = (int(ngram_range[0]), int(ngram_range[1]))
        self.exclude_identical = exclude_identical
        self.demos: List[Demonstration] = []
        self._vectorizer: Any = None
        self._matrix: Any = None

    def fit(self, demos: Iterable[Demonstration]) -> "TfidfRetriever":
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.demos = list(demos)
        if not self.demos:
            raise ValueError("TfidfRetriever: no demonstrations to retrieve from")
        self._vectorizer = TfidfVectorizer(analyzer="char", ngram_range=self.ngram_range, lowercase=False)
        self._matrix = self._vectorizer.fit_transform([d.text for d in self.demos])
        return self

    def nearest(self, text: str, k: int) -> List[Demonstration]:
        if self._vectorizer is None:
            self.fit(self._load())
        if k <= 0:
            return []
        scores = (self._matrix @ self._vectorizer.transform([text]).T).toarray().ravel()
        order = sorted(range(len(self.demos)), key=lambda n: (-scores[n], n))
        chosen = [self.demos[n] for n in order if not (self.exclude_identical and self.demos[n].text == text)]
        return chosen[:k]

    def _load(self) -> List[Demonstration]:
        if self.path is None:
            raise ValueError("TfidfRetriever needs a path to a .spacy file or a call to fit()")
        path = Path(self.path)
        if not path.exists():
            raise ValueError(f"TfidfRetriever: demonstration file not found: {path}")
        docs = DocBin().from_disk(path).get_docs(Vocab())
        return [Demonstration(doc.text, tuple(mentions_from_doc(doc, self.spans_key))) for doc in docs]


class InContextStrategy(BaseStrategy):
    """``base``'s prompts, answers and parser, with ``k`` retrieved demonstrations."""

    name = "incontext"

    def __init__(self, base: BaseStrategy, retriever: Retriever, k: int = 3, template: Optional[str] = None) -> None:
        super().__init__(template=template)
        self.base = base
        self.retriever = retriever
        self.k = k
        self.per_label = base.per_label

    def copy_constraint(self, text: str, prompt: Prompt) -> Optional[CopyConstraint]:
        """The base strategy's: demonstrations do not change the answer's form."""
        return self.base.copy_constraint(text, prompt)

    def prompts(self, text: str, scheme: LabelScheme) -> List[Prompt]:
        demos = self.retriever.nearest(text, self.k)
        return [self._with_demos(p, demos) for p in self.base.prompts(text, scheme)]

    def prompt(self, text: str, scheme: LabelScheme, label: Optional[str] = None) -> Prompt:
        return self._with_demos(self.base.prompt(text, scheme, label), self.retriever.nearest(text, self.k))

    def render_target(self, text: str, mentions: Sequence[Mention], prompt: Prompt) -> str:
        return self.base.render_target(text, mentions, prompt)

    def parse(self, text: str, response: str, prompt: Prompt) -> ParseResult:
        return self.base.parse(text, response, prompt)

    def _with_demos(self, prompt: Prompt, demos: Sequence[Demonstration]) -> Prompt:
        if not demos:
            return prompt
        scheme = prompt.scheme
        shots = []
        for demo in demos:
            demo_prompt = self.base.prompt(demo.text, scheme, prompt.label)
            known = [m for m in demo.mentions if m.label in scheme]  # a demonstration set may carry other types
            shots.append({"input": demo_prompt.input, "answer": self.base.render_target(demo.text, known, demo_prompt)})
        module = self._template(scheme.language).make_module({"shots": shots, "words": WORDS[scheme.language]})
        block = str(module.demonstrations()).strip("\n")
        return Prompt(prompt.system, prompt.instruction, f"{block}\n\n{prompt.input}", scheme, prompt.label)


@registry.misc("spacy_medllm.TfidfRetriever.v1")
def make_tfidf_retriever(
    path: Optional[str] = None,
    spans_key: str = DEFAULT_SPANS_KEY,
    ngram_range: List[int] = [1, 2],  # noqa: B006 - a config value, never mutated
    exclude_identical: bool = True,
) -> TfidfRetriever:
    return TfidfRetriever(path=path, spans_key=spans_key, ngram_range=ngram_range, exclude_identical=exclude_identical)


@registry.misc("spacy_medllm.InContextStrategy.v1")
def make_incontext_strategy(
    base: BaseStrategy, retriever: Retriever, k: int = 3, template: Optional[str] = None
) -> InContextStrategy:
    return InContextStrategy(base=base, retriever=retriever, k=k, template=template)
