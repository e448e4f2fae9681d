"""The decision-LLM resolver: an LLM settles each conflict region, as in the CCL 2025
paper's ensemble (context, candidates with their sources, type definitions and five
exemplars per type in the prompt).

The answer is the symbol strategy's: for one type, the region text copied with ``[`` ``]``
around the entities the model accepts, parsed by :class:`SymbolStrategy` itself. So a region
is asked once per type among its candidates; the prompts of a region differ only in their
last line, and the copy constraint of the runtime applies when it offers one. All regions of
all docs in a batch go to one ``generate`` call.

The LLM only *chooses*: a bracketed span no group proposed is counted (``not_a_candidate``)
and not kept. A region whose answer is not a copy of the region (garbage, truncation,
another type) falls back to voting for that region, counted by reason in ``stats``.
"""
import hashlib
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jinja2
from spacy.tokens import Doc
from spacy.util import registry

from ..labels import LabelScheme
from ..llm.backends import AnyModel, open_generator
from ..safety import template_environment
from ..strategies.base import WORDS, Prompt
from ..strategies.symbol import SymbolStrategy
from .conflicts import Candidate, Comparison, ConflictRegion, candidate_order
from .resolvers import Resolver, VoteResolver, agreed_in, select_compatible

TEMPLATE_DIR = Path(__file__).parent / "templates"
# parse outcomes that do not make an answer unreliable
HARMLESS_DISCARDS = {"duplicate"}


class LLMResolver(Resolver):
    """``model``/``adapter``: the decision LLM (loaded on first use through the shared
    loader, so a base model shared with the generators is loaded once). ``labels``: the
    scheme giving display names and definitions. ``k``/``allow_nested``: the vote used as
    fallback and to settle incompatible choices (a range with two types, crossing ranges).
    ``context_chars``: context on each side of a region when the doc has no sentences.
    ``constrained``: copy-constrained decoding when the runtime offers it.
    """

    needs_exemplars = True

    def __init__(
        self,
        model: AnyModel,
        labels: LabelScheme,
        adapter: Optional[str] = None,
        k: Optional[int] = None,
        allow_nested: bool = True,
        constrained: bool = True,
        batch_size: int = 8,
        context_chars: int = 100,
        template: Optional[str] = None,
    ):
        self.model = model
        self.labels = labels
        self.adapter = adapter
        self.fallback = VoteResolver(k=k, allow_nested=allow_nested)
        self.allow_nested = allow_nested
        self.constrained = constrained
        self.batch_size = batch_size
        self.context_chars = context_chars
        self.strategy = SymbolStrategy()
        self.template = _load_template(template, labels.language)
        self.stats: Counter = Counter()
        self._generator = None

    # -- prompts ---------------------------------------------------------------------
    def context_text(self, doc: Doc, region: ConflictRegion) -> str:
        """The sentence holding the region, or a window of ``context_chars`` around it."""
        if doc.has_annotation("SENT_START"):
            span = doc.char_span(region.start, region.end, alignment_mode="expand")
            if span is not None and len(span) and region.end <= span[0].sent.end_char:
                return span[0].sent.text
        lo = max(0, region.start - self.context_chars)
        return doc.text[lo : region.end + self.context_chars]

    def prompts(
        self, doc: Doc, comparison: Comparison, region: ConflictRegion, exemplars: Mapping[str, List[str]]
    ) -> List[Prompt]:
        """One prompt per type among the region's candidates (scheme order)."""
        region_text = doc.text[region.start : region.end]
        codes = [code for code in self.labels.codes if any(c.label == code for c in region.candidates)]
        variables: Dict[str, Any] = {
            "text": self.context_text(doc, region),
            "region": region_text,
            "candidates": [self._describe(c, region_text, region.start) for c in region.candidates],
            "settled": [
                {"text": doc.text[c.start : c.end], "label": self._display(c.label)}
                for c in agreed_in(comparison, region)
            ],
            "n_groups": comparison.n_groups,
            "types": [
                {
                    "name": self.labels.display(code),
                    "definition": self.labels.labels[code].definition,
                    "exemplars": list(exemplars.get(code, [])),
                }
                for code in codes
            ],
            "words": WORDS[self.labels.language],
            "open": self.strategy.open,
            "close": self.strategy.close,
        }
        prompts = []
        for code in codes:
            module = self.template.make_module({**variables, "label": self.labels.labels[code]})
            prompts.append(
                Prompt(
                    system=str(module.system()).strip(),
                    instruction=str(module.instruction()).strip(),
                    input=str(module.query()).strip("\n"),
                    scheme=self.labels,
                    label=code,
                )
            )
        return prompts

    def _describe(self, candidate: Candidate, region_text: str, offset: int) -> Dict[str, Any]:
        s, e = candidate.start - offset, candidate.end - offset
        marked = f"{region_text[:s]}{self.strategy.open}{region_text[s:e]}{self.strategy.close}{region_text[e:]}"
        return {
            "marked": marked,
            "label": self._display(candidate.label),
            "sources": list(candidate.sources),
            "votes": candidate.votes,
        }

    def _display(self, code: str) -> str:
        return self.labels.display(code) if code in self.labels else code

    # -- resolving -------------------------------------------------------------------
    def __call__(
        self, docs: Sequence[Doc], comparisons: Sequence[Comparison], exemplars: Mapping[str, List[str]]
    ) -> List[List[Candidate]]:
        kept = [list(comparison.agreed) for comparison in comparisons]
        jobs: List[Tuple[int, ConflictRegion, List[Prompt], int]] = []
        requests: List[Any] = []
        for i, (doc, comparison) in enumerate(zip(docs, comparisons)):
            for region in comparison.regions:
                self.stats["regions"] += 1
                if any(c.label not in self.labels for c in region.candidates):
                    self._fall_back(kept[i], comparison, region, "label_not_in_scheme")
                    continue
                prompts = self.prompts(doc, comparison, region, exemplars)
                region_text = doc.text[region.start : region.end]
                jobs.append((i, region, prompts, len(requests)))
                requests.extend(self._request(p, region_text, region) for p in prompts)
        results = self.generator.generate(requests, batch_size=self.batch_size) if requests else []
        for i, region, prompts, first in jobs:
            comparison = comparisons[i]
            region_text = docs[i].text[region.start : region.end]
            answers = [r.text if r.finish_reason == "stop" else None for r in results[first : first + len(prompts)]]
            chosen, failure = self.decide(comparison, region, region_text, prompts, answers)
            if failure is not None:
                self._fall_back(kept[i], comparison, region, failure)
            else:
                self.stats["decided"] += 1
                kept[i].extend(chosen)
        return [sorted(k, key=candidate_order) for k in kept]

    def decide(
        self,
        comparison: Comparison,
        region: ConflictRegion,
        region_text: str,
        prompts: Sequence[Prompt],
        answers: Sequence[Optional[str]],
    ) -> Tuple[List[Candidate], Optional[str]]:
        """The candidates the answers accept (made compatible by vote rank), or the reason
        the region must fall back. ``None`` as an answer: generation hit its token limit."""
        by_key = {(c.start, c.end, c.label): c for c in region.candidates}
        agreed = {(c.start, c.end, c.label) for c in comparison.agreed}
        chosen: List[Candidate] = []
        for prompt, answer in zip(prompts, answers):
            if answer is None:
                return [], "truncated"
            if not self._is_copy(answer, region_text, prompt):
                return [], "not_a_copy"
            parsed = self.strategy.parse(region_text, answer, prompt)
            if set(parsed.discarded) - HARMLESS_DISCARDS:
                return [], "unparsed"
            for m in parsed.mentions:
                key = (region.start + m.start, region.start + m.end, m.label)
                if key in by_key:
                    chosen.append(by_key[key])
                elif key not in agreed:
                    self.stats["not_a_candidate"] += 1
        kept = select_compatible(chosen, comparison.n_groups, agreed_in(comparison, region), self.allow_nested)
        self.stats["incompatible_choice"] += len(chosen) - len(kept)
        return kept, None

    def _is_copy(self, answer: str, region_text: str, prompt: Prompt) -> bool:
        """The answer is the prefix and the region with markers only (markers inside the
        region text itself are ignored on both sides)."""
        prefix = self.strategy.answer_prefix(self.labels, prompt.label)
        if not answer.startswith(prefix):
            return False

        def bare(s: str) -> str:
            return s.replace(self.strategy.open, "").replace(self.strategy.close, "")

        return bare(answer[len(prefix) :].strip()) == bare(region_text.strip())

    def _fall_back(self, kept: List[Candidate], comparison: Comparison, region: ConflictRegion, reason: str) -> None:
        self.stats["fallback"] += 1
        self.stats[f"fallback_{reason}"] += 1
        kept.extend(self.fallback.resolve_region(comparison, region))

    def _request(self, prompt: Prompt, region_text: str, region: ConflictRegion):
        from ..llm.generation import GenerationRequest

        prefix = self.strategy.answer_prefix(self.labels, prompt.label)
        tokenizer = self.generator.tokenizer
        # the copy plus room for markers around every character (a constrained answer is
        # bounded by its constraint; an unconstrained one that runs past this is garbage)
        budget = len(tokenizer(prefix + region_text, add_special_tokens=False).input_ids)
        budget += 4 * len(region_text) + 8
        constraint = None
        if self.constrained:
            from ..llm.copy import CopyConstraint

            longest = max(c.length for c in region.candidates)
            constraint = CopyConstraint(
                source=region_text,
                forced_prefix=prefix,
                open=self.strategy.open,
                close=self.strategy.close,
                max_span_chars=max(longest, 1),
            )
        return GenerationRequest(prompt=prompt.messages(), max_new_tokens=budget, constraint=constraint)

    @property
    def generator(self):
        """The generator, built (and an in-process model loaded) on first use."""
        if self._generator is None:
            adapter, name = None, None
            if self.adapter is not None:
                adapter = str(Path(self.adapter).expanduser().resolve())
                name = "resolver_" + hashlib.sha1(adapter.encode("utf8")).hexdigest()[:10]
            self._generator = open_generator(self.model, adapter, name)
        return self._generator


def _load_template(template: Optional[str], language: str) -> jinja2.Template:
    if template is not None:
        path = Path(template)
        if not path.exists():
            raise ValueError(f"Decision template not found: {path}")
        directory, name = path.parent, path.name
    else:
        directory, name = TEMPLATE_DIR, f"decide.{language}.jinja"
    env = template_environment(jinja2.FileSystemLoader(str(directory)))
    return env.get_template(name)


@registry.misc("spacy_medllm.LLMResolver.v1")
def make_llm_resolver(
    model: AnyModel,
    labels: LabelScheme,
    adapter: Optional[str] = None,
    k: Optional[int] = None,
    allow_nested: bool = True,
    constrained: bool = True,
    batch_size: int = 8,
    context_chars: int = 100,
    template: Optional[str] = None,
) -> LLMResolver:
    """``model``: a ``spacy_medllm.ModelSpec.v1`` or ``spacy_medllm.OpenAIServer.v1`` block; ``labels``: a
    ``spacy_medllm.LabelScheme.v1`` block; ``adapter``: a LoRA adapter directory."""
    return LLMResolver(
        model=model,
        labels=labels,
        adapter=adapter,
        k=k,
        allow_nested=allow_nested,
        constrained=constrained,
        batch_size=batch_size,
        context_chars=context_chars,
        template=template,
    )
