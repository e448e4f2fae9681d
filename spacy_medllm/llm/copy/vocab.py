"""The tokenizer's vocabulary as byte strings, sorted so that the tokens starting with a
byte prefix are a range.

The constraint is over bytes and the model emits tokens; this index is the bridge: the
tokens legal in a configuration are found by walking the automaton and this index
together, never by scanning the vocabulary.
"""
import bisect
import json
import re
import weakref
from functools import lru_cache
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Set, Tuple

from .automaton import Configs, CopyAutomaton, _Body
from .transfer import Payload


@lru_cache(maxsize=1)
def _byte_decoder() -> Dict[str, int]:
    """Inverse of GPT-2's bytes-to-unicode table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _decoder_types(tokenizer: Any) -> Set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    found: Set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "type" in node:
                found.add(node["type"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(backend.to_str()).get("decoder"))
    return found


def token_bytes(tokenizer: Any) -> List[Optional[bytes]]:
    """The byte string each token id stands for; ``None`` for special tokens.

    Byte-level BPE pieces are mapped back through the bytes-to-unicode table (a piece may
    be part of a UTF-8 character); SentencePiece pieces map ``▁`` to a space and ``<0xNN>``
    to a byte; anything else is the UTF-8 of the token string.
    """
    decoders_ = _decoder_types(tokenizer)
    byte_level = "ByteLevel" in decoders_
    metaspace = "Metaspace" in decoders_ or "Replace" in decoders_
    byte_fallback = "ByteFallback" in decoders_
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special = set(tokenizer.all_special_ids) | {i for i, tok in added.items() if tok.special}
    table = _byte_decoder()
    size = len(tokenizer)
    out: List[Optional[bytes]] = []
    for tid, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(size)))):
        if tok is None or tid in special:
            out.append(None)
        elif tid in added:
            out.append(added[tid].content.encode("utf-8") or None)
        elif byte_level and all(ch in table for ch in tok):
            out.append(bytes(table[ch] for ch in tok) or None)
        elif byte_fallback and _BYTE_FALLBACK.match(tok):
            out.append(bytes([int(tok[3:5], 16)]))
        else:
            text = tok.replace("\u2581", " ") if metaspace else tok
            out.append(text.encode("utf-8") or None)
    return out


class VocabIndex:
    """Token byte strings sorted, so the tokens starting with a byte prefix are a range.

    Built once per tokenizer (:func:`vocab_index` caches it). Walking the automaton and
    this index together visits only byte prefixes that are legal continuations.
    """

    def __init__(self, tokenizer: Any) -> None:
        by_bytes: Dict[bytes, List[int]] = {}
        for tid, data in enumerate(token_bytes(tokenizer)):
            if data:
                by_bytes.setdefault(data, []).append(tid)
        self.keys: List[bytes] = sorted(by_bytes)
        self.ids: List[List[int]] = [by_bytes[k] for k in self.keys]
        self.bytes_of: Dict[int, bytes] = {tid: k for k, ids in zip(self.keys, self.ids) for tid in ids}
        self.tokenizer_ref = weakref.ref(tokenizer)
        self.size = len(tokenizer)
        self._starting_with: Dict[bytes, List[int]] = {}
        self._children: Dict[Tuple[int, int, int, int], Tuple[int, int]] = {}
        self._brackets: Dict[Tuple[str, str], FrozenSet[int]] = {}
        self._bracket_tensors: Dict[Any, Any] = {}

    def ids_starting_with(self, prefix: bytes) -> List[int]:
        """Every token whose byte string starts with ``prefix`` (cached: the decoder asks
        for the opening bracket's tokens on every pass)."""
        found = self._starting_with.get(prefix)
        if found is None:
            lo, hi = 0, len(self.keys)
            for i in range(1, len(prefix) + 1):
                lo, hi = self.narrow(prefix[:i], lo, hi)
            found = self._starting_with[prefix] = [tid for ids in self.ids[lo:hi] for tid in ids]
        return found

    def bracket_ids(self, open: str, close: str) -> FrozenSet[int]:
        """The tokens whose text starts with ``open`` or ``close`` (cached)."""
        key = (open, close)
        found = self._brackets.get(key)
        if found is None:
            found = self._brackets[key] = frozenset(
                self.ids_starting_with(open.encode("utf8")) + self.ids_starting_with(close.encode("utf8"))
            )
        return found

    def bracket_tensor(self, open: str, close: str, logits: Any) -> Any:
        """:meth:`bracket_ids` within ``logits``' vocabulary axis, ascending, as an index
        tensor on its device (cached per device and width)."""
        return self._tensor((open, close), lambda: self.bracket_ids(open, close), logits)

    def open_tensor(self, open: str, logits: Any) -> Any:
        """The tokens starting with ``open`` (:meth:`ids_starting_with`) as an index
        tensor on ``logits``' device (cached): where ``open_bias`` is added."""
        return self._tensor((open,), lambda: self.ids_starting_with(open.encode("utf8")), logits)

    def _tensor(self, key: Tuple[str, ...], ids: Callable[[], Iterable[int]], logits: Any) -> Any:
        full = key + (str(logits.device), logits.shape[-1])
        found = self._bracket_tensors.get(full)
        if found is None:
            payload = Payload()
            payload.add(sorted(i for i in ids() if i < logits.shape[-1]))
            found = self._bracket_tensors[full] = payload.send(logits.device)[0]
        return found

    def narrow(self, prefix: bytes, lo: int, hi: int) -> Tuple[int, int]:
        """The range within [lo, hi) (keys starting with prefix[:-1]) of keys starting with prefix."""
        lo = bisect.bisect_left(self.keys, prefix, lo, hi)
        last = prefix[-1]
        if last < 255:
            hi = bisect.bisect_left(self.keys, prefix[:-1] + bytes([last + 1]), lo, hi)
        return lo, hi

    def allowed(self, automaton: CopyAutomaton, configs: Configs) -> Dict[int, Configs]:
        """Token id -> configuration after it, for every token legal in ``configs``."""
        if len(configs) == 1:
            [(state, rem)] = configs
            if not rem:
                result: Dict[int, Configs] = {}
                if self._walk_units(automaton, state, b"", 0, len(self.keys), result):
                    return result
        result = {}
        stack = [(b"", 0, len(self.keys), configs)]
        while stack:
            prefix, lo, hi, cfg = stack.pop()
            for byte in automaton.next_bytes(cfg):
                longer = prefix + bytes([byte])
                lo2, hi2 = self._child(prefix, lo, hi, byte)
                if lo2 == hi2:
                    continue
                cfg2 = automaton.advance(cfg, byte)
                if self.keys[lo2] == longer:
                    for tid in self.ids[lo2]:
                        result[tid] = cfg2
                stack.append((longer, lo2, hi2, cfg2))
        return result

    def _child(self, prefix: bytes, lo: int, hi: int, byte: int) -> Tuple[int, int]:
        """The range of keys starting with ``prefix + byte`` within [lo, hi) (the keys
        starting with ``prefix``), memoized: the decoder revisits the same trie nodes."""
        key = (lo, hi, len(prefix), byte)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = self.narrow(prefix + bytes([byte]), lo, hi)
        return found

    def _walk_units(
        self, automaton: CopyAutomaton, state: _Body, prefix: bytes, lo: int, hi: int, result: Dict[int, Configs]
    ) -> bool:
        """:meth:`allowed` for one reading on a unit boundary, a whole unit (character or
        bracket) at a time: the byte-by-byte walk builds a configuration set per byte, this
        one per token. Returns False (result unusable) when two units share a first byte
        (a source character that is a bracket): then the readings must be walked together."""
        units = automaton.units(state)
        if len({unit[0] for unit, _ in units}) < len(units):
            return False
        for unit, nxt in units:
            node, (ulo, uhi) = prefix, (lo, hi)
            for j, byte in enumerate(unit):
                ulo, uhi = self._child(node, ulo, uhi, byte)
                node += unit[j : j + 1]
                if ulo == uhi:
                    break
                if self.keys[ulo] == node:  # a token ends here, inside or at the end of the unit
                    after = frozenset({(nxt, unit[j + 1 :])})
                    for tid in self.ids[ulo]:
                        result[tid] = after
            else:  # the whole unit matched: longer tokens go on with the next units
                if (uhi - ulo > 1 or self.keys[ulo] != node) and not self._walk_units(
                    automaton, nxt, node, ulo, uhi, result
                ):
                    return False
        return True

    def longest_match(self, data: bytes) -> List[int]:
        """Tokenize ``data`` greedily by the longest vocabulary piece (the draft fallback)."""
        out: List[int] = []
        pos = 0
        while pos < len(data):
            lo, hi, best, end = 0, len(self.keys), None, pos
            while end < len(data):
                lo, hi = self.narrow(data[pos : end + 1], lo, hi)
                if lo == hi:
                    break
                end += 1
                if self.keys[lo] == data[pos:end]:
                    best = (self.ids[lo][0], end)
            if best is None:
                break  # a byte no token covers: the draft stops here
            out.append(best[0])
            pos = best[1]
        return out


_INDEXES: Dict[int, VocabIndex] = {}


def vocab_index(tokenizer: Any) -> VocabIndex:
    """The cached :class:`VocabIndex` of ``tokenizer`` (rebuilt if the object is gone)."""
    key = id(tokenizer)
    index = _INDEXES.get(key)
    if index is None or index.tokenizer_ref() is not tokenizer or index.size != len(tokenizer):
        index = _INDEXES[key] = VocabIndex(tokenizer)
    return index
