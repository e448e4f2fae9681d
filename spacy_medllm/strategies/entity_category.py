"""Entity-category strategy (ROCLING-2023 LingX): one prompt; the answer lists
``实体-类型`` pairs, one per line, in reading order (``无`` when there is none).

The answer has no offsets: parsed mentions carry the entity text only and the span
aligner finds where they are (a text stated twice means two occurrences). Mentions whose
text does not occur in the source are discarded here (``not_in_source``).
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
    response_lines,
    strip_code_fence,
    unescape_line,
)

_SEPARATOR = re.compile(r"[-－—–:：][ \t]*$")
_BULLET = re.compile(r"^\s*(?:\d{1,3}[.、)）]|[-*•])\s*")


class EntityCategoryStrategy(BaseStrategy):
    name = "entity_category"

    def render_target(self, text: str, mentions: Sequence[Mention], prompt: Prompt) -> str:
        found = self.target_mentions(text, mentions, prompt)
        if not found:
            return WORDS[prompt.scheme.language]["none"]
        return "\n".join(f"{escape_line(m.text)}-{prompt.scheme.display(m.label)}" for m in found)

    def parse(self, text: str, response: str, prompt: Prompt) -> ParseResult:
        result = ParseResult()
        response = cap_response(text, response, result)
        mentions = []
        for line in response_lines(strip_code_fence(response)):
            if line.strip().casefold() in NONE_WORDS:
                continue
            mention = self._line_mention(text, line, prompt, result)
            if mention is not None:
                mentions.append(mention)
        return finish(text, mentions, result, prompt.scheme)

    @staticmethod
    def _line_mention(text: str, line: str, prompt: Prompt, result: ParseResult) -> Optional[Mention]:
        body = line.rstrip()
        for spelling in prompt.scheme.spellings():
            if body.endswith(spelling):
                sep = _SEPARATOR.search(body[: len(body) - len(spelling)])
                if sep is not None:
                    code = prompt.scheme.code_of(spelling)
                    stated = body[: sep.start()]
                    break
        else:
            result.discard("unparsed_line")
            return None
        for candidate in (stated, stated.strip(), _BULLET.sub("", stated, count=1)):
            candidate = unescape_line(candidate)
            if candidate and candidate in text:
                return Mention(code, candidate)
        result.discard("not_in_source" if stated.strip() else "empty_entity")
        return None


@registry.misc("spacy_medllm.EntityCategoryStrategy.v1")
def make_entity_category_strategy(template: Optional[str] = None) -> EntityCategoryStrategy:
    return EntityCategoryStrategy(template=template)
