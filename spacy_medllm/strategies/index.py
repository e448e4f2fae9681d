"""Index strategy: one prompt; the answer first lists the sentence's characters with their
indices (``字符：0:患 1:者 …``), then, after an entities line, one entity per line as
``start-end 类型 实体`` with ``end`` inclusive (``实体：无`` when there is none).

Listing the characters lets the model read offsets off its own output instead of
counting. Line breaks and tabs inside values are written as ``\\n``, ``\\r``, ``\\t`` so an
entity stays on one line. The offsets are checked against the stated text as in the
JSON strategy (see :func:`.base.mention_at`).
"""
import re
from typing import Optional, Sequence

from spacy.util import registry

from ..types import Mention, ParseResult
from .base import (
    NONE_WORDS,
    WORDS,
    BaseStrategy,
    Prompt,
    cap_response,
    escape_line,
    finish,
    mention_at,
    response_lines,
    strip_code_fence,
    unescape_line,
)

_ENTITY_LINE = re.compile(r"^\s*(\d{1,9})\s*[-–—~～,，]\s*(\d{1,9})[ \t]+(.*)$")


class IndexStrategy(BaseStrategy):
    name = "index"

    def context(self, scheme, text, label):
        ctx = super().context(scheme, text, label)
        ctx["example_label"] = scheme.display(scheme.codes[0])
        return ctx

    def render_target(self, text: str, mentions: Sequence[Mention], prompt: Prompt) -> str:
        words = WORDS[prompt.scheme.language]
        listing = " ".join(f"{k}:{escape_line(c)}" for k, c in enumerate(text))
        lines = [f"{words['chars']}{words['colon']}{listing}"]
        found = self.target_mentions(text, mentions, prompt)
        if not found:
            lines.append(f"{words['entities']}{words['colon']}{words['none']}")
        else:
            lines.append(f"{words['entities']}{words['colon']}".rstrip())
            for m in found:
                lines.append(f"{m.start}-{m.end - 1} {prompt.scheme.display(m.label)} {escape_line(m.text)}")
        return "\n".join(lines)

    def parse(self, text: str, response: str, prompt: Prompt) -> ParseResult:
        result = ParseResult()
        response = cap_response(text, response, result)
        words = WORDS[prompt.scheme.language]
        header = words["entities"].casefold()
        in_entities = False
        mentions = []
        for line in response_lines(strip_code_fence(response)):
            m = _ENTITY_LINE.match(line)
            if m is None:
                head = line.strip().casefold()
                if head.startswith((header, WORDS["zh"]["entities"], "entities")):
                    in_entities = True
                elif in_entities and head not in NONE_WORDS:
                    result.discard("unparsed_line")
                continue
            mention = self._line_mention(text, int(m.group(1)), int(m.group(2)), m.group(3), prompt, result)
            if mention is not None:
                mentions.append(mention)
        return finish(text, mentions, result, prompt.scheme)

    @staticmethod
    def _line_mention(text: str, start: int, last: int, rest: str, prompt: Prompt, result: ParseResult) -> Optional[Mention]:
        for spelling in prompt.scheme.spellings():
            tail = rest[len(spelling) :]
            sep = re.match(r"[ \t]*[:：]?[ \t]*", tail)
            if rest.startswith(spelling) and (sep.end() or not tail):
                code = prompt.scheme.code_of(spelling)
                # the written form is one space then the text; take looser readings only if needed
                readings = [unescape_line(tail[1:])] if tail.startswith(" ") else []
                readings.append(unescape_line(tail[sep.end() :]))
                break
        else:
            result.discard("unknown_label")
            return None
        end = last + 1
        enclosed = text[start:end] if 0 <= start < end <= len(text) else None
        stated = next((r for r in readings if r == enclosed), readings[0])
        if enclosed is not None and (not stated.strip() or stated.strip() == enclosed.strip()):
            stated = enclosed
        return mention_at(text, code, start, end, stated, result)


@registry.misc("spacy_medllm.IndexStrategy.v1")
def make_index_strategy(template: Optional[str] = None) -> IndexStrategy:
    return IndexStrategy(template=template)
