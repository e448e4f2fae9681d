"""Our NER as a spacy-llm task: ``@llm_tasks = "spacy_medllm.NERTask.v2"``.

With ``spacy_medllm.HFCausalLM.v1`` as the model, spacy-llm's own ``llm`` component runs any
of our annotation strategies on a local fine-tuned checkpoint. Each doc's prompts (one per
type for per-label strategies, per sentence shard for long texts) go to the model as one
group; the symbol strategy's prompts carry the copy constraint, which our model honours.
Responses are parsed by the same :class:`~spacy_medllm.recognizer.Recognizer` and aligned by
the same aligner as the ``medllm_ner`` → ``medllm_align`` pipeline.
"""
from copy import copy
from dataclasses import replace
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

from spacy.tokens import Doc
from spacy.training import Example
from spacy_llm.registry import registry

from ... import DEFAULT_SPANS_KEY
from ...alignment import MentionAligner
from ...extensions import LLM_MENTIONS, LLM_SEARCH_TEXT
from ...labels import LabelScheme
from ...llm.generation import GenerationRequest
from ...recognizer import Recognizer, RecognizerSettings
from ...scoring import make_span_scorer
from ...strategies.base import Strategy
from ...types import stored_mentions

# the name the task's mentions are stored under in ``doc._.llm_mentions``
SOURCE = "llm"


class MedLLMNERTask:
    """Prompts and parsing of the generator, for spacy-llm.

    Prompts are :class:`GenerationRequest`s whose prompt is the chat messages list, so the
    model applies its own chat template. Parsing re-plans the doc's prompts (cheap and
    deterministic) instead of keeping state between the two calls.
    """

    def __init__(self, recognizer: Recognizer, aligner: MentionAligner, scorer: Callable) -> None:
        self.recognizer = recognizer
        self.aligner = aligner
        self._scorer = scorer
        self._templated: Dict[str, Recognizer] = {}

    def generate_prompts(
        self, docs: Iterable[Doc], context_length: Optional[int] = None
    ) -> Iterable[Tuple[Iterable[GenerationRequest], Iterable[Doc]]]:
        for doc in docs:
            yield [job.request for job in self._plan(doc)], [doc]

    def parse_responses(self, shards: Iterable[Iterable[Doc]], responses: Iterable[Iterable[Any]]) -> Iterable[Doc]:
        for doc_shards, doc_responses in zip(shards, responses):
            doc = list(doc_shards)[0]
            jobs = self._plan(doc)
            recognition = self.recognizer.read([doc.text], jobs, list(doc_responses))[0]
            setattr(doc._, LLM_MENTIONS, {SOURCE: stored_mentions(recognition.mentions)})
            if self.recognizer.normalize:
                setattr(doc._, LLM_SEARCH_TEXT, {SOURCE: self.recognizer.search_text(doc.text)})
            yield self.aligner.align(doc)

    def scorer(self, examples: Iterable[Example]) -> Dict[str, Any]:
        return self._scorer(examples)

    def _plan(self, doc: Doc):
        jobs = self.recognizer.plan([doc.text], lambda prompt: prompt.messages())
        if getattr(self.recognizer.strategy, "template", "own") is not None:
            return jobs
        # the strategy has no template: the model may prompt with the one it carries
        plans: Dict[str, list] = {}  # the doc's jobs under each template, planned once
        return [replace(job, request=replace(job.request, with_template=self._rebuilder(doc, i, plans))) for i, job in enumerate(jobs)]

    def _rebuilder(self, doc: Doc, index: int, plans: Dict[str, list]) -> Callable[[str], GenerationRequest]:
        def with_template(template: str) -> GenerationRequest:
            if template not in plans:
                plans[template] = self._recognizer_with(template).plan([doc.text], lambda prompt: prompt.messages())
            return plans[template][index].request

        return with_template

    def _recognizer_with(self, template: str) -> Recognizer:
        if template not in self._templated:
            recognizer = copy(self.recognizer)
            recognizer.strategy = copy(self.recognizer.strategy)
            recognizer.strategy.use_template(template)
            self._templated[template] = recognizer
        return self._templated[template]


@registry.llm_tasks("spacy_medllm.NERTask.v2")
def make_ner_task(
    strategy: Strategy,
    labels: LabelScheme,
    recognizer: Optional[RecognizerSettings] = None,
    spans_key: str = DEFAULT_SPANS_KEY,
    search: str = "nearest",
    alignment_mode: str = "strict",
    flat_policy: Optional[str] = "longest",
    scorer: Optional[Callable] = None,
) -> MedLLMNERTask:
    """The generator + aligner of ``medllm_ner``/``medllm_align`` as one spacy-llm task; the
    arguments mean what they mean on those components (``recognizer``: the
    ``spacy_medllm.Recognizer.v1`` block, its defaults when left out). v2: the decoding
    settings moved into that block."""
    aligner = MentionAligner(
        SOURCE,
        sources=None, spans_key=spans_key, search=search, alignment_mode=alignment_mode, flat_policy=flat_policy
    )
    return MedLLMNERTask(
        Recognizer(strategy, labels, recognizer or RecognizerSettings()),
        aligner,
        scorer if scorer is not None else make_span_scorer(spans_key=spans_key),
    )
