"""Symbol strategy (the paper's best): one prompt per type; the answer is the type name,
a colon, and the sentence again with ``[`` … ``]`` around every entity of that type.

The answer is the source with markers inserted, so it is parsed by *aligning* it to the
source, never by a regex: a ``[`` that matches the source character at that point may
be a copy of a literal bracket. Of several valid alignments the parser takes the
tightest: an ambiguous opening bracket is read as a copy first (the entity starts after
the literal), an ambiguous closing bracket as a marker first (the entity ends before the
literal). So an entity whose text starts with a literal ``[`` or ends with a literal
``]`` cannot be stated, nor can two same-type entities that cross (``[a[b]c]`` pairs
as nesting) or the same span twice. A response that is not such a copy (garbled,
truncated, rephrased) falls back to a character alignment (difflib) ignoring the marker
strings; a bracketed span is kept only when its text equals the aligned source slice.
"""
from typing import Dict, List, Optional, Sequence, Set, Tuple

from spacy.util import registry

from ..labels import LabelScheme
from ..types import CopyConstraint, Mention, ParseResult
from .base import (
    WORDS,
    BaseStrategy,
    Prompt,
    cap_response,
    finish,
    label_prefix,
    project_content,
    project_span,
)

MAX_STATES = 256  # alignment states kept per response position before giving up on exactness


class SymbolStrategy(BaseStrategy):
    name = "symbol"
    per_label = True
    open = "["
    close = "]"

    def answer_prefix(self, scheme: LabelScheme, label: str) -> str:
        return scheme.display(label) + WORDS[scheme.language]["colon"]

    def context(self, scheme: LabelScheme, text: str, label: Optional[str]) -> Dict:
        ctx = super().context(scheme, text, label)
        ctx.update(open=self.open, close=self.close, example_prefix=self.answer_prefix(scheme, scheme.codes[0]))
        return ctx

    def copy_constraint(self, text: str, prompt: Prompt) -> CopyConstraint:
        return CopyConstraint(
            source=text, forced_prefix=self.answer_prefix(prompt.scheme, self._asked(prompt)), open=self.open, close=self.close
        )

    def render_target(self, text: str, mentions: Sequence[Mention], prompt: Prompt) -> str:
        label = self._asked(prompt)
        opens: Dict[int, List[int]] = {}
        closes: Dict[int, List[int]] = {}
        for m in self.target_mentions(text, mentions, prompt):
            opens.setdefault(m.start, []).append(m.end)
            closes.setdefault(m.end, []).append(m.start)
        out = [self.answer_prefix(prompt.scheme, label)]
        for i in range(len(text) + 1):
            # inner spans close first (they started later), outer spans open first (longer)
            out.extend(self.close for _ in sorted(closes.get(i, ()), reverse=True))
            out.extend(self.open for _ in sorted(opens.get(i, ()), reverse=True))
            if i < len(text):
                out.append(text[i])
        return "".join(out)

    def parse(self, text: str, response: str, prompt: Prompt) -> ParseResult:
        label = self._asked(prompt)
        result = ParseResult()
        response = cap_response(text, response, result)
        body = self._strip_prefix(response, prompt, result)
        if body is None:
            return result
        spans = None
        for candidate in dict.fromkeys((body, body.strip())):
            spans = self._align_exact(text, candidate)
            if spans is not None:
                break
        if spans is None:
            spans = self._align_fallback(text, body, result)
        if any(s >= e for s, e in spans):
            result.discard("empty_span", sum(s >= e for s, e in spans))
        mentions = [Mention(label, text[s:e], s, e) for s, e in spans if s < e]
        return finish(text, mentions, result, prompt.scheme)

    # -- helpers ---------------------------------------------------------------------
    def _asked(self, prompt: Prompt) -> str:
        if prompt.label is None:
            raise ValueError(f"{self.name} is a per-label strategy: the prompt must carry the asked label")
        return prompt.label

    def _strip_prefix(self, response: str, prompt: Prompt, result: ParseResult) -> Optional[str]:
        """The response after its answer prefix; None (counted) when it names another type."""
        prefix = self.answer_prefix(prompt.scheme, prompt.label)
        if response.startswith(prefix):
            return response[len(prefix) :]
        found = label_prefix(response, prompt.scheme)
        if found is None:
            return response
        code, length = found
        if code != prompt.label:
            result.discard("wrong_label", max(1, response.count(self.open)))
            return None
        return response[length:]

    def _step_options(self, resp: str, src: str, j: int, i: int, d: int) -> List[Tuple[int, int, int, str]]:
        """Transitions from state (j, i, d) in preference order: (j', i', d', kind)."""
        copy = [(j + 1, i + 1, d, "copy")] if j < len(resp) and i < len(src) and resp[j] == src[i] else []
        opening = [(j + len(self.open), i, d + 1, "open")] if resp.startswith(self.open, j) else []
        closing = [(j + len(self.close), i, d - 1, "close")] if d > 0 and resp.startswith(self.close, j) else []
        return closing + copy + opening

    def _align_exact(self, src: str, resp: str) -> Optional[List[Tuple[int, int]]]:
        """Spans when ``resp`` is ``src`` with balanced markers inserted, else None."""
        # Greedy first: when it reaches the end it took the preferred choice everywhere,
        # which is what the full search below would return.
        path = self._walk(src, resp, alive=None)
        if path is None:
            alive = self._alive_states(src, resp)
            if alive is None or (0, 0, 0) not in alive:
                return None
            path = self._walk(src, resp, alive)
        return path

    def _walk(self, src: str, resp: str, alive: Optional[Set[Tuple[int, int, int]]]) -> Optional[List[Tuple[int, int]]]:
        j = i = d = 0
        stack: List[int] = []
        spans: List[Tuple[int, int]] = []
        while (j, i, d) != (len(resp), len(src), 0):
            options = [o for o in self._step_options(resp, src, j, i, d) if alive is None or o[:3] in alive]
            if not options:
                return None
            j, i, d, kind = options[0]
            if kind == "open":
                stack.append(i)
            elif kind == "close":
                spans.append((stack.pop(), i))
        return spans

    def _alive_states(self, src: str, resp: str) -> Optional[Set[Tuple[int, int, int]]]:
        """States (j, i, d) reachable from the start that can still reach the end."""
        layers: List[Set[Tuple[int, int]]] = [set() for _ in range(len(resp) + 1)]
        layers[0].add((0, 0))
        edges: Dict[Tuple[int, int, int], List[Tuple[int, int, int]]] = {}
        for j in range(len(resp) + 1):
            if len(layers[j]) > MAX_STATES:
                return None
            for i, d in layers[j]:
                nexts = [o[:3] for o in self._step_options(resp, src, j, i, d)]
                edges[(j, i, d)] = nexts
                for nj, ni, nd in nexts:
                    layers[nj].add((ni, nd))
        alive = {(len(resp), len(src), 0)}
        for state in sorted(edges, reverse=True):  # later j first: successors are decided
            if state not in alive and any(n in alive for n in edges[state]):
                alive.add(state)
        return alive

    def _align_fallback(self, src: str, resp: str, result: ParseResult) -> List[Tuple[int, int]]:
        content: List[str] = []
        stack: List[int] = []
        pairs: List[Tuple[int, int]] = []
        j = 0
        while j < len(resp):
            if resp.startswith(self.open, j):
                stack.append(len(content))
                j += len(self.open)
            elif resp.startswith(self.close, j):
                if stack:
                    pairs.append((stack.pop(), len(content)))
                else:
                    result.discard("unbalanced_marker")
                j += len(self.close)
            else:
                content.append(resp[j])
                j += 1
        if stack:
            result.discard("unbalanced_marker", len(stack))
        joined = "".join(content)
        starts, ends = project_content(src, joined)
        spans = []
        for a, b in pairs:
            span = project_span(src, joined, starts, ends, a, b)
            if span is None:
                result.discard("unaligned_span")
            else:
                spans.append(span)
        return spans


@registry.misc("spacy_medllm.SymbolStrategy.v1")
def make_symbol_strategy(template: Optional[str] = None) -> SymbolStrategy:
    return SymbolStrategy(template=template)
