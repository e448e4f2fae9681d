"""JSON strategy: one prompt; the answer is a JSON list of
``{"start_idx", "end_idx", "type", "entity"}`` with ``end_idx`` *inclusive* (the CMeEE
convention, said in the prompt).

Parsing tolerates code fences, text around the list and broken JSON (complete objects
are salvaged one by one). Each entry is checked against the source: offsets that agree
with the entity text give an offset mention; when they disagree but the text occurs in
the source, the mention keeps the text and the stated start as ``hint`` for the aligner.
"""
import json
from typing import Any, Iterator, List, Optional, Sequence

from spacy.util import registry

from ..types import Mention, ParseResult, parse_offset
from .base import NONE_WORDS, BaseStrategy, Prompt, cap_response, finish, mention_at, strip_code_fence

_DECODER = json.JSONDecoder()


class JsonStrategy(BaseStrategy):
    name = "json"

    def render_target(self, text: str, mentions: Sequence[Mention], prompt: Prompt) -> str:
        items = [
            {"start_idx": m.start, "end_idx": m.end - 1, "type": prompt.scheme.display(m.label), "entity": m.text}
            for m in self.target_mentions(text, mentions, prompt)
        ]
        return json.dumps(items, ensure_ascii=False)

    def parse(self, text: str, response: str, prompt: Prompt) -> ParseResult:
        result = ParseResult()
        response = cap_response(text, response, result)
        mentions = []
        for item in _json_items(strip_code_fence(response), result):
            m = self._item_mention(text, item, prompt, result)
            if m is not None:
                mentions.append(m)
        return finish(text, mentions, result, prompt.scheme)

    def _item_mention(self, text: str, item: Any, prompt: Prompt, result: ParseResult) -> Optional[Mention]:
        if not isinstance(item, dict):
            result.discard("malformed_item")
            return None
        label_value = item.get("type", item.get("label"))
        code = prompt.scheme.code_of(label_value) if isinstance(label_value, str) else None
        if code is None:
            result.discard("unknown_label")
            return None
        start, end = parse_offset(item.get("start_idx")), parse_offset(item.get("end_idx"))
        entity = item.get("entity", item.get("text"))
        if not isinstance(entity, str):
            if entity is None and start is not None and end is not None and 0 <= start <= end < len(text):
                entity = text[start : end + 1]
            else:
                result.discard("missing_field")
                return None
        if start is None or end is None:
            start = end = -1
        return mention_at(text, code, start, end + 1, entity, result)


def _json_items(response: str, result: ParseResult) -> Iterator[Any]:
    """The entries of the answer's list: the whole list when it decodes, else every
    complete ``{…}`` object found in the text (counted as ``malformed_json``)."""
    stripped = response.strip()
    if not stripped or stripped.casefold() in NONE_WORDS:
        return
    starts = [p for p in (stripped.find("["), stripped.find("{")) if p >= 0]
    if starts:
        try:
            value, _ = _DECODER.raw_decode(stripped, min(starts))
        except (ValueError, RecursionError):
            value = None
        else:
            if isinstance(value, dict):
                lists = [v for v in value.values() if isinstance(v, list)]
                value = lists[0] if lists and "entity" not in value else [value]
            if isinstance(value, list):
                yield from value
                return
    result.discard("malformed_json")
    yield from _salvage_objects(stripped)


def _salvage_objects(text: str) -> List[dict]:
    found = []
    pos = text.find("{")
    while pos >= 0:
        try:
            value, end = _DECODER.raw_decode(text, pos)
        except (ValueError, RecursionError):
            pos = text.find("{", pos + 1)
            continue
        if isinstance(value, dict):
            found.append(value)
        pos = text.find("{", end)
    return found


@registry.misc("spacy_medllm.JsonStrategy.v1")
def make_json_strategy(template: Optional[str] = None) -> JsonStrategy:
    return JsonStrategy(template=template)
