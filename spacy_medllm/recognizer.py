"""Texts in, mentions out: the generative NER loop shared by ``medllm_ner``, the spacy-llm
task and the trainer's dev evaluation.

One place decides how a text becomes prompts (sentence sharding of long texts, optional
character-aligned OpenCC normalisation, one prompt per type for per-label strategies, the
copy constraint for the symbol strategy) and how responses become mentions with offsets
into the *original* text. Generation itself is not done here: :meth:`Recognizer.plan`
returns requests, any :class:`~spacy_medllm.llm.generation.Generator` (or spacy-llm's
model call) answers them, and :meth:`Recognizer.read` parses the answers.
"""
import logging
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

from spacy.util import registry

from .labels import LabelScheme
from .llm.generation import GenerationRequest, GenerationResult
from .readers.normalize import normalize_text
from .sharding import shard_text
from .strategies.base import Prompt, Strategy
from .types import Mention, ParseResult

logger = logging.getLogger(__name__)


@dataclass
class PromptJob:
    """One prompt for one shard of one text: where its mentions go back to."""

    text_index: int
    offset: int  # start of the shard in the original text
    shard: str  # the (normalised) shard text the prompt was built from
    prompt: Prompt
    request: GenerationRequest


@dataclass
class Recognition:
    """The mentions of one text, and what was discarded while parsing its responses."""

    mentions: List[Mention] = field(default_factory=list)
    discarded: Counter = field(default_factory=Counter)
    io: List[Dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class RecognizerSettings:
    """Every prompting and decoding setting of recognition, once, with one set of defaults:
    ``medllm_ner``, the spacy-llm task and the trainer's dev evaluation take this block
    (``spacy_medllm.Recognizer.v1``), so a checkpoint is selected under the rules it is
    served with.

    max_chars: shards longer texts at sentence ends (None: one prompt per text).
    normalize: an OpenCC configuration such as "t2s" applied character by character, so
        offsets into the normalised text are offsets into the original.
    constrained: decode per-label symbol prompts under the copy constraint.
    max_depth / max_span_chars: the constraint's structural limits (nesting depth, characters
        an entity may span).
    open_bias: logit bias on opening brackets under the constraint (negative: fewer, surer
        entities); text_mass: weigh a bracket against all text tokens together (see
        :class:`~spacy_medllm.types.CopyConstraint`).
    max_new_tokens: the generation budget per prompt.
    """

    max_chars: Optional[int] = 256
    normalize: Optional[str] = None
    constrained: bool = True
    max_depth: int = 2
    max_span_chars: int = 64
    open_bias: float = 0.0
    text_mass: bool = True
    max_new_tokens: int = 512

    def __post_init__(self) -> None:
        if self.max_chars is not None and self.max_chars < 1:
            raise ValueError(f"max_chars must be at least 1 or null, got {self.max_chars}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.max_depth < 0 or self.max_span_chars < 1:
            raise ValueError("max_depth must be >= 0 and max_span_chars >= 1")


@registry.misc("spacy_medllm.Recognizer.v1")
def make_recognizer_settings(
    max_chars: Optional[int] = 256,
    normalize: Optional[str] = None,
    constrained: bool = True,
    max_depth: int = 2,
    max_span_chars: int = 64,
    open_bias: float = 0.0,
    text_mass: bool = True,
    max_new_tokens: int = 512,
) -> RecognizerSettings:
    """The ``[...recognizer]`` block of ``medllm_ner``, the spacy-llm task and the dev evaluator."""
    return RecognizerSettings(max_chars, normalize, constrained, max_depth, max_span_chars, open_bias, text_mass, max_new_tokens)


class Recognizer:
    """Builds prompts for texts and reads responses back into mentions, with the
    annotation ``strategy``, the label ``scheme`` and the :class:`RecognizerSettings`."""

    def __init__(self, strategy: Strategy, scheme: LabelScheme, settings: RecognizerSettings = RecognizerSettings()) -> None:
        self.strategy = strategy
        self.scheme = scheme
        self.settings = settings

    @property
    def normalize(self) -> Optional[str]:
        return self.settings.normalize

    def plan(self, texts: Sequence[str], format_prompt) -> List[PromptJob]:
        """The prompt jobs for ``texts``; ``format_prompt(prompt) -> str`` renders a prompt
        as the model sees it (e.g. ``lambda p: p.chat_text(tokenizer)``)."""
        jobs: List[PromptJob] = []
        for i, text in enumerate(texts):
            for start, end in self._shards(text):
                shard = text[start:end]
                if not shard.strip():
                    continue
                if self.normalize:
                    shard = normalize_text(shard, self.normalize)
                for prompt in self.strategy.prompts(shard, self.scheme):
                    constraint = self.strategy.copy_constraint(shard, prompt) if self.settings.constrained else None
                    if constraint is not None:
                        constraint = replace(
                            constraint,
                            max_depth=self.settings.max_depth,
                            max_span_chars=self.settings.max_span_chars,
                            open_bias=self.settings.open_bias,
                            text_mass=self.settings.text_mass,
                        )
                    request = GenerationRequest(
                        prompt=format_prompt(prompt), max_new_tokens=self.settings.max_new_tokens, constraint=constraint,
                        literals=(prompt.input,),
                    )
                    jobs.append(PromptJob(i, start, shard, prompt, request))
        return jobs

    def read(
        self,
        texts: Sequence[str],
        jobs: Sequence[PromptJob],
        responses: Sequence[Any],
        save_io: bool = False,
    ) -> List[Recognition]:
        """Parse one response per job (a :class:`GenerationResult` or a plain string) into
        mentions with offsets into the original ``texts``. A mention with offsets carries
        the original characters; one without keeps the (normalised) text the model wrote,
        to be searched in :meth:`search_text`."""
        out = [Recognition() for _ in texts]
        for job, response in zip(jobs, responses):
            text, score = _response_text_and_score(response)
            try:
                parsed = self.strategy.parse(job.shard, text, job.prompt)
            except Exception:  # one response a parser cannot read must not lose the batch
                logger.exception("%s parser failed on a response; the response is discarded", self.strategy.name)
                parsed = ParseResult()
                parsed.discard("parser_error")
            rec = out[job.text_index]
            rec.discarded.update(parsed.discarded)
            if isinstance(response, GenerationResult) and response.finish_reason == "length":
                rec.discarded["truncated_response"] += 1
            for m in parsed.mentions:
                rec.mentions.append(_shifted(m, job.offset, score, texts[job.text_index]))
            if save_io:
                rec.io.append({"label": job.prompt.label, "prompt": job.request.prompt, "response": text})
        return out

    def search_text(self, text: str) -> str:
        """The text in which offset-less mentions are found: ``text`` normalised like the
        prompts (same length, so found offsets are offsets into ``text``)."""
        return normalize_text(text, self.normalize) if self.normalize else text

    def _shards(self, text: str) -> List[Tuple[int, int]]:
        if not text:
            return []
        max_chars = self.settings.max_chars
        if max_chars is None or len(text) <= max_chars:
            return [(0, len(text))]
        return shard_text(text, max_chars)


def _response_text_and_score(response: Any) -> Tuple[str, Optional[float]]:
    """The response text and its sequence confidence: the geometric mean of the chosen
    tokens' probabilities (None for a plain string response)."""
    if isinstance(response, GenerationResult):
        score = math.exp(response.logprob_sum / len(response.logprobs)) if response.logprobs else None
        return response.text, score
    return ("" if response is None else str(response)), None


def _shifted(m: Mention, offset: int, score: Optional[float], original: str) -> Mention:
    start = None if m.start is None else m.start + offset
    end = None if m.end is None else m.end + offset
    return Mention(
        label=m.label,
        text=m.text if start is None else original[start:end],
        start=start,
        end=end,
        score=m.score if m.score is not None else score,
        hint=None if m.hint is None else m.hint + offset,
    )
