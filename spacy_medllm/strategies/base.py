"""The annotation-strategy protocol and the helpers every strategy shares.

An annotation strategy reformulates NER as text generation. For one text it

1. builds prompts: ``prompts(text, scheme) -> list[Prompt]`` — one prompt per entity type
   for *per-label* strategies (symbol, mark; ``Prompt.label`` is the asked code), else one
   prompt (``label`` None);
2. writes the response an LLM must learn: ``render_target(text, mentions, prompt) -> str``
   (per-label strategies keep only the mentions of ``prompt.label``);
3. reads any response back: ``parse(text, response, prompt) -> ParseResult``. Parsing
   never raises. Every returned mention is valid: with offsets, ``0 <= start < end <=
   len(text)`` and ``text[start:end] == mention.text``; without offsets (entity-category,
   or a JSON/index entry whose offsets disagree with its text, ``hint`` then holds the
   stated start) the text is non-empty and occurs in ``text``. Everything else is counted
   in ``ParseResult.discarded`` by reason. Identical mentions (same label and span) are
   kept once (``duplicate``), so a strategy cannot state one span twice for one label.

Mentions carry the scheme's *codes* as labels; prompts and responses use display names.
``prompt(text, scheme, label=None)`` builds a single prompt (the in-context mode uses it
to render demonstrations); ``merge_results`` joins the results of a text's prompts.

Copy-constrained decoding: ``copy_constraint(text, prompt)`` is a
:class:`~spacy_medllm.types.CopyConstraint` for a strategy whose answer is the source with
markers inserted (symbol, mark): the answer is exactly ``forced_prefix`` + ``source`` with
balanced ``open``/``close`` strings inserted, and a decoder that keeps to it produces
answers ``parse`` reads exactly. The other strategies return None.

A :class:`Prompt` is a system message plus a user message made of a shared
``instruction`` (task, type definitions, output rules) and a text-specific ``input``.
For per-label strategies the asked type is the *last* line of ``input``, so the prompts
of one text share everything up to it: a generator can encode that prefix once and reuse
its KV cache for every type. The same prompt renders as chat messages
(:meth:`Prompt.messages`, or through a tokenizer's chat template with
:meth:`Prompt.chat_text`) and in Alpaca form (:meth:`Prompt.alpaca`,
:meth:`Prompt.alpaca_text`).

Prompt wording lives in Jinja templates (``templates/<strategy>.<zh|en>.jinja``, chosen
by the scheme's language; a strategy's ``template`` argument names a replacement file).
Each defines the macros ``system()``, ``instruction()`` and ``query()``; the words a
parser depends on (answer prefixes, the "no entity" word) come from
:data:`WORDS` so a template cannot break parsing.
"""
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import jinja2
from spacy.tokens import Doc

from .. import DEFAULT_SPANS_KEY
from ..labels import LabelScheme
from ..safety import template_environment
from ..types import CopyConstraint, Mention, ParseResult

TEMPLATE_DIR = Path(__file__).parent / "templates"

# Words that both the templates and the parsers use, per language.
WORDS: Dict[str, Dict[str, str]] = {
    "zh": {"colon": "：", "none": "无", "chars": "字符", "entities": "实体"},
    "en": {"colon": ": ", "none": "None", "chars": "Characters", "entities": "Entities"},
}
NONE_WORDS = {"无", "没有", "无实体", "没有实体", "none", "no entities", "n/a", "[]", "空"}


@dataclass(frozen=True)
class Prompt:
    """One request to the LLM. ``user`` = ``instruction`` + blank line + ``input``."""

    system: str
    instruction: str
    input: str
    scheme: LabelScheme = field(compare=False, repr=False)
    label: Optional[str] = None

    @property
    def user(self) -> str:
        return f"{self.instruction}\n\n{self.input}" if self.instruction else self.input

    def messages(self, response: Optional[str] = None) -> List[Dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}, {"role": "user", "content": self.user}]
        if response is not None:
            msgs.append({"role": "assistant", "content": response})
        return msgs

    def alpaca(self, response: str = "") -> Dict[str, str]:
        """The record LLaMA-Factory's ``alpaca`` format reads."""
        return {"instruction": self.instruction, "input": self.input, "output": response, "system": self.system}

    def alpaca_text(self, response: Optional[str] = None) -> str:
        """Plain Alpaca-style text; with ``response`` None it ends where generation starts."""
        text = f"{self.system}\n\n### Instruction:\n{self.instruction}\n\n### Input:\n{self.input}\n\n### Response:\n"
        return text + (response or "")

    def chat_text(self, tokenizer: Any, response: Optional[str] = None) -> str:
        """The prompt (and response) through ``tokenizer``'s chat template, or the Alpaca
        text when the tokenizer has none."""
        if not getattr(tokenizer, "chat_template", None):
            return self.alpaca_text(response)
        return tokenizer.apply_chat_template(
            self.messages(response), tokenize=False, add_generation_prompt=response is None
        )


@runtime_checkable
class Strategy(Protocol):
    name: str
    per_label: bool

    def prompts(self, text: str, scheme: LabelScheme) -> List[Prompt]:
        ...

    def prompt(self, text: str, scheme: LabelScheme, label: Optional[str] = None) -> Prompt:
        ...

    def render_target(self, text: str, mentions: Sequence[Mention], prompt: Prompt) -> str:
        ...

    def parse(self, text: str, response: str, prompt: Prompt) -> ParseResult:
        ...

    def copy_constraint(self, text: str, prompt: Prompt) -> Optional[CopyConstraint]:
        ...


class BaseStrategy:
    """Template loading and prompt building shared by the strategies.

    ``template``: path of a Jinja file replacing the builtin one for every language.
    """

    name = "base"
    per_label = False

    def __init__(self, template: Optional[str] = None) -> None:
        self.template = template
        self._templates: Dict[str, jinja2.Template] = {}

    def use_template(self, template: Optional[str]) -> None:
        """Switch to another template file (e.g. the copy a saved pipeline stores)."""
        self.template = template
        self._templates = {}

    def copy_constraint(self, text: str, prompt: Prompt) -> Optional[CopyConstraint]:
        """None: the answer is not a copy of the text (see the module's docstring)."""
        return None

    # -- prompts ---------------------------------------------------------------------
    def prompts(self, text: str, scheme: LabelScheme) -> List[Prompt]:
        if self.per_label:
            return [self.prompt(text, scheme, code) for code in scheme.codes]
        return [self.prompt(text, scheme)]

    def prompt(self, text: str, scheme: LabelScheme, label: Optional[str] = None) -> Prompt:
        """The prompt for ``text`` (asking for ``label`` in a per-label strategy)."""
        if self.per_label and label not in scheme:
            raise ValueError(f"{self.name}: label {label!r} is not in scheme {scheme.name!r} ({scheme.codes})")
        module = self._module(scheme, text=text, label=label)
        return Prompt(
            system=str(module.system()).strip(),
            instruction=str(module.instruction()).strip(),
            input=str(module.query()).strip("\n"),
            scheme=scheme,
            label=label,
        )

    def context(self, scheme: LabelScheme, text: str, label: Optional[str]) -> Dict[str, Any]:
        """Variables the templates see; strategies add their own."""
        return {
            "text": text,
            "labels": list(scheme),
            "label": scheme.labels[label] if label is not None else None,
            "words": WORDS[scheme.language],
        }

    def _module(self, scheme: LabelScheme, text: str, label: Optional[str]) -> Any:
        return self._template(scheme.language).make_module(self.context(scheme, text, label))

    def _template(self, language: str) -> jinja2.Template:
        if language not in self._templates:
            if self.template:
                path = Path(self.template)
                if not path.exists():
                    raise ValueError(f"Template file not found: {path}")
                loader = jinja2.FileSystemLoader([str(path.parent), str(TEMPLATE_DIR)])
                name = path.name
            else:
                loader = jinja2.FileSystemLoader(str(TEMPLATE_DIR))
                name = f"{self.name}.{language}.jinja"
            env = template_environment(loader)
            self._templates[language] = env.get_template(name)
        return self._templates[language]

    # -- targets ---------------------------------------------------------------------
    def target_mentions(self, text: str, mentions: Sequence[Mention], prompt: Prompt) -> List[Mention]:
        """The gold mentions a target states: valid, in the scheme, of the asked label for a
        per-label prompt, deduplicated, in document order. Raises on a mention the
        target cannot state (outside the text, or of a type the scheme lacks)."""
        chosen = {}
        for m in mentions:
            if m.label not in prompt.scheme:
                raise ValueError(f"Mention {m} has label {m.label!r}, not in scheme {prompt.scheme.name!r}")
            if not m.has_offsets or not (0 <= m.start < m.end <= len(text)) or text[m.start : m.end] != m.text:
                raise ValueError(f"Mention {m} does not match the text it belongs to")
            if prompt.label is None or m.label == prompt.label:
                chosen[(m.start, m.end, m.label)] = m
        return sort_mentions(chosen.values(), prompt.scheme)

    def render_target(self, text: str, mentions: Sequence[Mention], prompt: Prompt) -> str:
        raise NotImplementedError

    def parse(self, text: str, response: str, prompt: Prompt) -> ParseResult:
        raise NotImplementedError


# -- mentions ----------------------------------------------------------------------------
def mentions_from_doc(doc: Doc, spans_key: str = DEFAULT_SPANS_KEY) -> List[Mention]:
    """Gold mentions (character offsets) from ``doc.spans[spans_key]``, or from
    ``doc.ents`` when the doc has no such group; in document order."""
    spans = doc.spans[spans_key] if spans_key in doc.spans else doc.ents
    mentions = [Mention(s.label_, s.text, s.start_char, s.end_char) for s in spans]
    return sorted(mentions, key=lambda m: (m.start, -m.end, m.label))


def sort_mentions(mentions: Iterable[Mention], scheme: Optional[LabelScheme] = None) -> List[Mention]:
    """Mentions with offsets in document order (outer before inner, then scheme order),
    then those without offsets in the order given (the order a response stated them)."""
    order = {c: i for i, c in enumerate(scheme.codes)} if scheme is not None else {}

    def key(item: Tuple[int, Mention]) -> tuple:
        n, m = item
        if m.has_offsets:
            return (0, m.start, -m.end, order.get(m.label, len(order)), m.label, n)
        return (1, n)

    return [m for _, m in sorted(enumerate(mentions), key=key)]


def mention_is_valid(text: str, m: Mention) -> bool:
    """The contract every parsed mention keeps (see the module docstring)."""
    if not m.text:
        return False
    if m.has_offsets:
        return 0 <= m.start < m.end <= len(text) and text[m.start : m.end] == m.text
    return m.start is None and m.end is None and m.text in text


def finish(
    text: str, candidates: Iterable[Mention], result: ParseResult, scheme: Optional[LabelScheme] = None
) -> ParseResult:
    """Validate, deduplicate and sort ``candidates`` into ``result``."""
    seen = set()
    for m in candidates:
        if not mention_is_valid(text, m) or (scheme is not None and m.label not in scheme):
            result.discard("invalid_mention")
            continue
        if m.has_offsets:
            key = (m.label, m.start, m.end)
            if key in seen:
                result.discard("duplicate")
                continue
            seen.add(key)
        result.mentions.append(m)
    result.mentions[:] = sort_mentions(result.mentions, scheme)
    return result


def mention_at(text: str, label: str, start: int, end: int, stated: str, result: ParseResult) -> Optional[Mention]:
    """A mention for a stated span and entity text: with offsets when they agree with
    the text, else without offsets (``hint`` = stated start) when the text occurs in the
    source, else None (counted)."""
    if not stated:
        result.discard("empty_entity")
        return None
    if 0 <= start < end <= len(text) and text[start:end] == stated:
        return Mention(label, stated, start, end)
    if stated in text:
        return Mention(label, stated, hint=start if 0 <= start <= len(text) else None)
    result.discard("not_in_source")
    return None


def merge_results(results: Iterable[ParseResult]) -> ParseResult:
    """One result for a text from the results of its prompts (per-label strategies)."""
    merged = ParseResult()
    candidates: List[Mention] = []
    for r in results:
        candidates.extend(r.mentions)
        merged.discarded.update(r.discarded)
    seen = set()
    for m in candidates:
        key = (m.label, m.start, m.end, m.text, m.hint)
        if m.has_offsets and key in seen:
            merged.discard("duplicate")
            continue
        seen.add(key)
        merged.mentions.append(m)
    merged.mentions[:] = sort_mentions(merged.mentions)
    return merged


# -- response text helpers --------------------------------------------------------------
_FENCE = re.compile(r"^\s*```[\w-]*\s*\n?|\n?\s*```\s*$")


def strip_code_fence(response: str) -> str:
    return _FENCE.sub("", response)


_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNESCAPES = {v[1]: k for k, v in _ESCAPES.items()}


def escape_line(s: str) -> str:
    """Keep a value on one line of a line-based response (``\\n`` → backslash-n …)."""
    return "".join(_ESCAPES.get(c, c) for c in s)


def unescape_line(s: str) -> str:
    return re.sub(r"\\([\\nrt])", lambda m: _UNESCAPES[m.group(1)], s)


def response_lines(response: str) -> List[str]:
    """Non-empty lines, a trailing ``\\r`` (a CRLF line end) removed."""
    return [line.rstrip("\r") for line in response.split("\n") if line.strip()]


def cap_response(text: str, response: str, result: ParseResult, factor: int = 8, slack: int = 2000) -> str:
    """Cut a runaway response to a length no valid answer exceeds (keeps parsing linear)."""
    limit = factor * len(text) + slack
    if len(response) > limit:
        result.discard("response_truncated")
        return response[:limit]
    return response


def label_prefix(response: str, scheme: LabelScheme) -> Optional[Tuple[str, int]]:
    """(code, length) when ``response`` opens with a type name and a colon (the answer
    line of per-label strategies), else None."""
    stripped = response.lstrip()
    skipped = len(response) - len(stripped)
    for spelling in scheme.spellings():
        if stripped.startswith(spelling):
            rest = stripped[len(spelling) :]
            m = re.match(r"[ \t]*[：:][ \t]*", rest)
            if m:
                return scheme.code_of(spelling), skipped + len(spelling) + m.end()
    return None


def project_content(source: str, content: str) -> Tuple[List[Optional[int]], List[Optional[int]]]:
    """Fallback alignment of ``content`` (a response with its markup removed) to
    ``source``, character by character (difflib). Returns ``starts`` and ``ends``, both of
    length ``len(content) + 1``: ``starts[p]`` is the source index of ``content[p]`` and
    ``ends[p]`` the source index just after ``content[p - 1]``, or None where that
    character is not aligned. A span ``content[a:b]`` maps to ``source[starts[a]:ends[b]]``."""
    starts: List[Optional[int]] = [None] * (len(content) + 1)
    ends: List[Optional[int]] = [None] * (len(content) + 1)
    matcher = difflib.SequenceMatcher(None, source, content, autojunk=False)
    for a, b, size in matcher.get_matching_blocks():
        for k in range(size):
            starts[b + k] = a + k
            ends[b + k + 1] = a + k + 1
    return starts, ends


def project_span(
    source: str, content: str, starts: Sequence[Optional[int]], ends: Sequence[Optional[int]], a: int, b: int
) -> Optional[Tuple[int, int]]:
    """The source span for ``content[a:b]`` when both ends align and the texts agree."""
    if not 0 <= a < b <= len(content):
        return None
    s, e = starts[a], ends[b]
    if s is None or e is None or s >= e or source[s:e] != content[a:b]:
        return None
    return s, e


__all__ = [
    "Prompt", "Strategy", "BaseStrategy", "WORDS", "NONE_WORDS", "mentions_from_doc", "sort_mentions",
    "mention_is_valid", "finish", "mention_at", "merge_results", "strip_code_fence", "escape_line",
    "unescape_line", "response_lines", "cap_response", "label_prefix", "project_content", "project_span",
]
