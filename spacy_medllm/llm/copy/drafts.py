"""Draft tokens: the rest of an answer without further brackets, tokenized as the model
would write it.

The draft only decides how much compute speculation saves (the verification keeps the
model's own choices), so it is its own concern: the source is tokenized once per text by
the tokenizer itself, and a draft starting on one of its token boundaries reuses those
tokens.
"""
import bisect
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Protocol, Union

from .automaton import Configs, CopyAutomaton
from .vocab import VocabIndex


class DraftRow(Protocol):
    """What a draft needs of a row of the stream (:class:`.stream._Row`, which imports this
    module): its automaton and configuration, its answer so far and its token budget."""

    automaton: CopyAutomaton
    configs: Configs
    out: List[int]
    max_new: int


# text bytes -> the tokens spelling them; a source text -> its _SourceTokens (one decoding call)
DraftCache = Dict[Union[bytes, str], Any]


def _encode(tokenizer: Any, text: str) -> List[int]:
    """``tokenizer.encode(text)`` without special tokens; a fast tokenizer's backend is
    called directly (a tenth of the wrapper's time, and drafts ask often)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text, add_special_tokens=False)


def _draft_tokens(
    index: VocabIndex, tokenizer: Any, row: DraftRow, max_draft: int, eos_id: int, cache: DraftCache
) -> List[int]:
    """Tokens of the rest of the answer without further open brackets (the draft): the
    pending bytes of the current unit, the source from the current character, the
    closing brackets and EOS when it reaches the end. The source is tokenized once per
    text by the tokenizer itself, as a fine-tuned model was trained to emit it, and a
    draft starting on one of its token boundaries takes its tokens from there (else the
    rest is tokenized on its own). ``cache`` keeps the tokenizations for the call."""
    span = row.automaton.draft_span(row.configs, 2 * max_draft)
    if span is None:
        return []
    rem, i, stop, closes = span
    automaton = row.automaton
    draft = _text_tokens(index, tokenizer, rem, cache) if rem else []
    whole = cache.get(automaton.constraint.source)
    if whole is None:
        whole = cache[automaton.constraint.source] = _SourceTokens.of(index, tokenizer, automaton, cache)
    body = whole.between(i, stop)
    if body is None:
        body = _text_tokens(index, tokenizer, b"".join(automaton.chars[i:stop]), cache)
    draft = draft + body
    if stop == automaton.n and (closes == 0 or len(draft) < max_draft):
        draft += _text_tokens(index, tokenizer, automaton.close * closes, cache)
        if len(draft) < max_draft:
            draft.append(eos_id)
    return draft[: max(0, min(max_draft, row.max_new - len(row.out) - 1))]


def _text_tokens(index: VocabIndex, tokenizer: Any, data: bytes, cache: DraftCache) -> List[int]:
    """Tokens spelling ``data`` (cached): a leading rest of a split character by the
    longest vocabulary piece, the text after by the tokenizer; a tokenization that does
    not reproduce the bytes (e.g. an added leading space) falls back to longest match."""
    found = cache.get(data)
    if found is None:
        cut = 0
        while cut < len(data) and (data[cut] & 0xC0) == 0x80:
            cut += 1
        found = index.longest_match(data[:cut]) if cut else []
        if data[cut:]:
            tail = _encode(tokenizer, data[cut:].decode("utf-8", errors="replace"))
            if b"".join(index.bytes_of.get(t, b"\0") for t in tail) != data[cut:]:
                tail = index.longest_match(data[cut:])
            found = found + tail
        cache[data] = found
    return found


@dataclass
class _SourceTokens:
    """A source text's tokens, which source character each starts at, and the byte
    offset each ends at (a byte-level token may end inside a character)."""

    ids: List[int]
    starts: Dict[int, int]  # source character -> index of the token starting there
    byte_ends: List[int]
    char_offsets: List[int]  # byte offset of each character boundary, 0 .. len(source)

    @classmethod
    def of(cls, index: VocabIndex, tokenizer: Any, automaton: CopyAutomaton, cache: DraftCache) -> "_SourceTokens":
        ids = _text_tokens(index, tokenizer, b"".join(automaton.chars), cache)
        char_offsets = [0]
        for ch in automaton.chars:
            char_offsets.append(char_offsets[-1] + len(ch))
        char_at = {offset: c for c, offset in enumerate(char_offsets)}
        starts, byte_ends, offset = {}, [], 0
        for k, tid in enumerate(ids):
            if offset in char_at:
                starts.setdefault(char_at[offset], k)
            offset += len(index.bytes_of.get(tid, b""))
            byte_ends.append(offset)
        return cls(ids, starts, byte_ends, char_offsets)

    def between(self, i: int, stop: int) -> Optional[List[int]]:
        """The tokens from character ``i`` that end by character ``stop`` (None: no
        token starts at ``i``)."""
        k = self.starts.get(i)
        if k is None:
            return None
        end = bisect.bisect_right(self.byte_ends, self.char_offsets[stop], lo=k)
        return self.ids[k:end]
