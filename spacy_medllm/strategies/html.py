"""HTML strategy: one prompt; the answer is the sentence with ``<类型:实体>`` before and
``</类型:实体>`` after every entity. A start and an end tag pair only when they carry the
same type *and* the same entity text (the paper's rule), so nested, crossing and
multi-type entities are all expressible; the same span twice for one type is not.

Entity texts may themselves contain ``<`` and ``>`` (``维生素B<sub>6``), so a tag's end
is found against the source: while the answer copies the source exactly, an opening
tag's text must be what follows in the source and a closing tag's what precedes. A
response that is not such a copy falls back to a character alignment (difflib) of its
text without tags.
"""
import re
from typing import Dict, List, Optional, Sequence, Tuple

from spacy.util import registry

from ..labels import LabelScheme
from ..types import Mention, ParseResult
from .base import BaseStrategy, Prompt, cap_response, finish, project_content, project_span

# (is_close, code or None for an unknown type, entity text, position in source or content)
Event = Tuple[bool, Optional[str], str, int]
MAX_SEARCH_STEPS = 200_000  # beyond this a response is read by the fallback alignment
MAX_READINGS = 16  # complete readings tried in search of one whose tags all pair
_ANY_TAG = re.compile(r"<(/?)[ \t]*([^<>:：/\n]{1,30}?)[ \t]*[:：]")


class HtmlStrategy(BaseStrategy):
    name = "html"

    def render_target(self, text: str, mentions: Sequence[Mention], prompt: Prompt) -> str:
        scheme = prompt.scheme
        order = {c: k for k, c in enumerate(scheme.codes)}
        opens: Dict[int, List[Mention]] = {}
        closes: Dict[int, List[Mention]] = {}
        for m in self.target_mentions(text, mentions, prompt):
            opens.setdefault(m.start, []).append(m)
            closes.setdefault(m.end, []).append(m)
        out = []
        for i in range(len(text) + 1):
            # close the innermost (latest opened) first, open the outermost (longest) first
            for m in sorted(closes.get(i, ()), key=lambda m: (-m.start, -order[m.label])):
                out.append(f"</{scheme.display(m.label)}:{m.text}>")
            for m in sorted(opens.get(i, ()), key=lambda m: (-m.end, order[m.label])):
                out.append(f"<{scheme.display(m.label)}:{m.text}>")
            if i < len(text):
                out.append(text[i])
        return "".join(out)

    def parse(self, text: str, response: str, prompt: Prompt) -> ParseResult:
        result = ParseResult()
        response = cap_response(text, response, result)
        scheme = prompt.scheme
        events = self._exact_events(text, response, scheme)
        if events is not None:
            spans = self._pair(events, result)
            mentions = [Mention(code, x, s, e) for code, x, s, e in spans if self._agrees(text[s:e], x, result)]
            return finish(text, mentions, result, prompt.scheme)
        content, events = self._lex(text, response, scheme)
        starts, ends = project_content(text, content)
        mentions = []
        for code, x, a, b in self._pair(events, result):
            span = project_span(text, content, starts, ends, a, b)
            if span is None:
                result.discard("unaligned_span")
            elif self._agrees(text[span[0] : span[1]], x, result):
                mentions.append(Mention(code, x, *span))
        return finish(text, mentions, result, prompt.scheme)

    # -- helpers ---------------------------------------------------------------------
    @staticmethod
    def _agrees(enclosed: str, stated: str, result: ParseResult) -> bool:
        if enclosed != stated:
            result.discard("tag_text_mismatch")
            return False
        return True

    @staticmethod
    def _tag_head(response: str, j: int, scheme: LabelScheme) -> Optional[Tuple[bool, Optional[str], int]]:
        """(is_close, code, end of ``<类型:``) when a tag starts at ``j``."""
        m = _ANY_TAG.match(response, j)
        if m is None:
            return None
        return bool(m.group(1)), scheme.code_of(m.group(2)), m.end()

    @staticmethod
    def _tag_texts(response: str, head_end: int, limit: int) -> List[Tuple[str, int]]:
        """Candidate (entity text, position after ``>``) for a tag, longest first."""
        out = []
        k = response.find(">", head_end)
        while 0 <= k <= head_end + limit:
            out.append((response[head_end:k], k + 1))
            k = response.find(">", k + 1)
        return out[::-1]

    def _exact_events(self, src: str, resp: str, scheme: LabelScheme) -> Optional[List[Event]]:
        """Tags with source positions when ``resp`` is ``src`` with tags inserted, else None.

        Depth-first over the readings of each tag (the longest text that fits the source
        first, a literal copy last); positions that cannot reach the end are remembered.
        A reading whose tags do not all pair up is kept only if no later one does."""
        goal = (len(resp), len(src))
        dead = set()
        first: Optional[List[Event]] = None
        readings = 0
        # frames: [j, i, transitions out, next transition to try, event that led here, reached the end]
        stack: List[list] = [[0, 0, self._transitions(src, resp, 0, 0, scheme), 0, None, False]]
        for _ in range(MAX_SEARCH_STEPS):
            if not stack:
                return first
            frame = stack[-1]
            if (frame[0], frame[1]) == goal:
                events = [f[4] for f in stack if f[4] is not None]
                probe = ParseResult()
                self._pair(events, probe)
                readings += 1
                if not probe.discarded or readings >= MAX_READINGS:
                    return events if not probe.discarded else first
                first = first or events
                for f in stack:
                    f[5] = True
                stack.pop()
                continue
            if frame[3] >= len(frame[2]):
                if not frame[5]:
                    dead.add((frame[0], frame[1]))
                stack.pop()
                continue
            nj, ni, event = frame[2][frame[3]]
            frame[3] += 1
            if (nj, ni) not in dead:
                stack.append([nj, ni, self._transitions(src, resp, nj, ni, scheme), 0, event, False])
        return first

    def _transitions(self, src: str, resp: str, j: int, i: int, scheme: LabelScheme) -> List[Tuple[int, int, Optional[Event]]]:
        """(next j, next i, tag event or None for a copy) from response position ``j`` and
        source position ``i``, in preference order."""
        out: List[Tuple[int, int, Optional[Event]]] = []
        if j >= len(resp):
            return out
        head = self._tag_head(resp, j, scheme) if resp[j] == "<" else None
        if head is not None and head[1] is not None:
            is_close, code, head_end = head
            for x, after in self._tag_texts(resp, head_end, len(src)):
                if x and (src.endswith(x, 0, i) if is_close else src.startswith(x, i)):
                    out.append((after, i, (is_close, code, x, i)))
        if i < len(src) and resp[j] == src[i]:
            out.append((j + 1, i + 1, None))
        return out

    def _lex(self, src: str, resp: str, scheme: LabelScheme) -> Tuple[str, List[Event]]:
        """The response's text without tags, and its tags at content positions."""
        content: List[str] = []
        events: List[Event] = []
        j = 0
        while j < len(resp):
            head = self._tag_head(resp, j, scheme) if resp[j] == "<" else None
            tag = None
            texts = self._tag_texts(resp, head[2], len(src)) if head is not None else []
            if texts:
                x, after = next(((x, a) for x, a in texts if x and x in src), texts[-1])
                # a tag of an unknown type is still markup, unless the source has it literally
                if head[1] is not None or resp[j:after] not in src:
                    tag = (head[0], head[1], x, after)
            if tag is not None:
                events.append((tag[0], tag[1], tag[2], len(content)))
                j = tag[3]
            else:
                content.append(resp[j])
                j += 1
        return "".join(content), events

    @staticmethod
    def _pair(events: List[Event], result: ParseResult) -> List[Tuple[str, str, int, int]]:
        """(code, text, start, end) for every end tag matched with the latest open start
        tag of the same type and text."""
        pending: List[Tuple[Optional[str], str, int]] = []
        spans = []
        for is_close, code, x, pos in events:
            if code is None:
                if not is_close:
                    result.discard("unknown_label")
                continue
            if not is_close:
                pending.append((code, x, pos))
                continue
            for k in range(len(pending) - 1, -1, -1):
                if pending[k][:2] == (code, x):
                    spans.append((code, x, pending.pop(k)[2], pos))
                    break
            else:
                result.discard("unmatched_tag")
        if pending:
            result.discard("unmatched_tag", len(pending))
        return spans


@registry.misc("spacy_medllm.HtmlStrategy.v1")
def make_html_strategy(template: Optional[str] = None) -> HtmlStrategy:
    return HtmlStrategy(template=template)
