"""Copy-constrained decoding with speculative verification and shared-prefix KV reuse.

For the symbol strategy the answer is fully known except for where the brackets go: a
forced prefix (the type line) followed by the source sentence with ``[`` ``]`` inserted.
Three things follow from that and are implemented here:

- **Constraint.** A small nondeterministic automaton over the UTF-8 *bytes* of the legal
  answers (so byte-level BPE tokens that split a character or glue ``[`` to text are
  handled), walked together with a sorted index of the vocabulary's byte strings: the
  allowed tokens at a step are found by following only the bytes the automaton accepts,
  never by scanning the vocabulary. The model cannot hallucinate text, loop on brackets or
  stop early, and every entity aligns.
- **Speculative verification.** The rest of the answer without further brackets is the
  draft. It is fed in one forward pass; tokens are accepted while the constrained argmax
  equals the draft token, the model's choice is taken at the first disagreement. Each token
  is still the constrained argmax given exactly the tokens before it, so the output is
  token-for-token the constrained greedy output; only the number of forward passes falls.
- **Shared prefix.** The per-type prompts of a sentence differ only at the end (the type
  is last in the template): the common token prefix is run once and its KV cache is copied
  to every row.

Rows progress at different speeds, so the batch keeps one KV cache with explicit position
ids per row and a mask over its columns: rejected draft positions are masked, cropped when
no row needs them and compacted away when the holes grow. With drafts the batch is
continuous: a finished row leaves and the next text's rows take its cache row in the next
pass, their prefix written in place (a trained model brackets one or two types of a
sentence and copies the others in a pass or two, so a fixed batch would run its slowest
row's tail alone). Prompt tokens ride in those passes in chunks no wider than a draft;
every draft fills the pass. The draft length adapts per row to how far the model followed
the last draft (the output does not depend on it, only the compute does). The choices of
all verified positions of a pass are made in a few tensor operations (:func:`_verify`);
the output layer runs on those positions only and the feed-forward blocks skip the
padding (:func:`_plain_head`, :func:`_packed`).

``generate_constrained`` is the runtime entry (``HFGenerator`` calls it for requests that
carry a constraint); ``generate_prompt_lookup`` offers Hugging Face prompt-lookup decoding
to the strategies without a strict copy constraint. ``benchmarks/decoding.py`` measures all
of it against plain ``generate``.
"""
import bisect
import dataclasses
import inspect
import json
import re
import time
import weakref
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Deque, Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple, Union

from ..types import CopyConstraint
from .peft_model import unwrap_peft

__all__ = [
    "COPY_REQUEST_ARG",
    "CopyAutomaton",
    "CopyConstraint",
    "CopyCursor",
    "CopyRule",
    "DecodeStats",
    "DecodedRow",
    "VocabIndex",
    "copy_request_arg",
    "count_forward_passes",
    "decode_constrained",
    "forward_module",
    "generate_constrained",
    "generate_prompt_lookup",
    "read_copy_request_arg",
    "shared_prefix_groups",
    "vocab_index",
]


# Automaton state inside the body: (source index, tuple of open positions, brackets emitted
# since the last copied character, whether the last unit was an open bracket).
_Body = Tuple[int, Tuple[int, ...], int, bool]
# A configuration: the body state reached once the pending unit bytes ``rem`` are emitted.
_Config = Tuple[_Body, bytes]
Configs = FrozenSet[_Config]
DONE: Configs = frozenset()  # after EOS nothing is legal


class CopyAutomaton:
    """The byte-level automaton of one :class:`CopyConstraint`.

    A configuration set is the set of readings of the bytes emitted so far (usually one;
    more when the source contains a bracket character). ``advance`` consumes one byte.
    """

    def __init__(self, constraint: CopyConstraint, options_cache: Optional[Dict[Configs, "_Options"]] = None):
        self.constraint = constraint
        self.chars = [ch.encode("utf-8") for ch in constraint.source]
        self.open = constraint.open.encode("utf-8")
        self.close = constraint.close.encode("utf-8")
        self.n = len(self.chars)
        self.initial: Configs = frozenset({((0, (), 0, False), constraint.forced_prefix.encode("utf-8"))})
        self._units: Dict[_Body, List[Tuple[bytes, _Body]]] = {}
        # The allowed tokens per configuration set. Automata whose constraints differ only in
        # the forced prefix (the per-type prompts of one sentence) may share it: a
        # configuration inside the prefix carries its pending bytes, so the answer from a
        # configuration depends on nothing else.
        self.options_cache: Dict[Configs, "_Options"] = {} if options_cache is None else options_cache

    def units(self, state: _Body) -> List[Tuple[bytes, _Body]]:
        """The units (copied character, open, close) that may follow ``state``."""
        cached = self._units.get(state)
        if cached is not None:
            return cached
        c = self.constraint
        i, opens, brackets, last_open = state
        out: List[Tuple[bytes, _Body]] = []
        # An outer open bracket may enclose at most max_span_chars characters.
        room = not opens or i + 1 - opens[0] <= c.max_span_chars
        if i < self.n and room:
            out.append((self.chars[i], (i + 1, opens, 0, False)))
        # Bracket runs between two characters are bounded, so no answer is infinite; after
        # the last character an open bracket needs room in the run for every close.
        if brackets < 2 * c.max_depth:
            if (
                (i < self.n or (not c.forbid_empty and brackets + len(opens) + 2 <= 2 * c.max_depth))
                and room
                and len(opens) < c.max_depth
                and not (c.forbid_double_open and last_open)
            ):
                out.append((self.open, (i, opens + (i,), brackets + 1, True)))
            if opens and (not c.forbid_empty or i > opens[-1]):
                out.append((self.close, (i, opens[:-1], brackets + 1, False)))
        self._units[state] = out
        return out

    def next_bytes(self, configs: Configs) -> List[int]:
        nxt = set()
        for state, rem in configs:
            if rem:
                nxt.add(rem[0])
            else:
                nxt.update(unit[0] for unit, _ in self.units(state))
        return sorted(nxt)

    def advance(self, configs: Configs, byte: int) -> Configs:
        out = set()
        for state, rem in configs:
            if rem:
                if rem[0] == byte:
                    out.add((state, rem[1:]))
            else:
                for unit, nxt in self.units(state):
                    if unit[0] == byte:
                        out.add((nxt, unit[1:]))
        return frozenset(out)

    def advance_bytes(self, configs: Configs, data: bytes) -> Configs:
        for byte in data:
            configs = self.advance(configs, byte)
            if not configs:
                break
        return configs

    def can_end(self, configs: Configs) -> bool:
        return any(not rem and state[0] == self.n and not state[1] for state, rem in configs)

    def draft_span(self, configs: Configs, max_chars: int) -> Optional[Tuple[bytes, int, int, int]]:
        """The rest of the answer assuming no further open bracket, at most ``max_chars``
        source characters: (pending bytes of the current unit, first and end source
        character, closing brackets after the end: 0 unless it reaches the end)."""
        if not configs:
            return None
        state, rem = min(configs, key=lambda cfg: (len(cfg[0][1]), cfg))
        i, opens = state[0], state[1]
        stop = min(self.n, i + max_chars)
        return rem, i, stop, len(opens) if stop == self.n else 0


# --------------------------------------------------------------------------- vocabulary


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


def _decoder_types(tokenizer) -> set:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    found = set()

    def walk(node):
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


def token_bytes(tokenizer) -> List[Optional[bytes]]:
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

    def __init__(self, tokenizer):
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

    def bracket_tensor(self, open: str, close: str, logits):
        """:meth:`bracket_ids` within ``logits``' vocabulary axis, ascending, as an index
        tensor on its device (cached per device and width)."""
        import torch

        key = (open, close, logits.device, logits.shape[-1])
        found = self._bracket_tensors.get(key)
        if found is None:
            ids = sorted(i for i in self.bracket_ids(open, close) if i < logits.shape[-1])
            found = self._bracket_tensors[key] = torch.tensor(ids, dtype=torch.long, device=logits.device)
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

    def _walk_units(self, automaton: CopyAutomaton, state, prefix: bytes, lo: int, hi: int, result) -> bool:
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
                if uhi - ulo > 1 or self.keys[ulo] != node:
                    if not self._walk_units(automaton, nxt, node, ulo, uhi, result):
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
MIN_SHARED = 4  # shorter common prefixes are not worth a separate pass
MIN_DRAFT = 4


def vocab_index(tokenizer) -> VocabIndex:
    """The cached :class:`VocabIndex` of ``tokenizer`` (rebuilt if the object is gone)."""
    key = id(tokenizer)
    index = _INDEXES.get(key)
    if index is None or index.tokenizer_ref() is not tokenizer or index.size != len(tokenizer):
        index = _INDEXES[key] = VocabIndex(tokenizer)
    return index


# --------------------------------------------------------------------------- decoding


@dataclass
class DecodeStats:
    """Counters of one decoding call. ``forward_passes`` counts model calls (a batched
    call is one); ``draft_tokens``/``accepted_tokens`` measure the speculation;
    ``prompt_tokens`` is the prompts' total length, ``prefill_tokens`` the prompt tokens
    the model computed (a shared prefix once for all rows that share it)."""

    forward_passes: int = 0
    generated_tokens: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    prompt_tokens: int = 0
    prefill_tokens: int = 0
    seconds: float = 0.0


@dataclass
class DecodedRow:
    """One answer. ``text``: the answer (forced prefix included, EOS excluded);
    ``token_ids``: generated ids (EOS included when reached); ``logprobs``: the raw
    log-softmax of each chosen token over the whole vocabulary (as for unconstrained
    generation; a forced token keeps the probability the model gave it);
    ``forward_passes``: model calls this row took part in; ``finished``: EOS reached
    (False when ``max_new_tokens`` cut the answer); ``seconds``: its batch's wall time
    divided by the rows of the batch."""

    text: str
    token_ids: List[int]
    logprobs: List[float]
    forward_passes: int
    finished: bool
    seconds: float = 0.0


@dataclass
class _Row:
    """Decoding state of one prompt: ``pending`` are tokens decided but not yet in the
    cache (the prompt, then the last chosen token), ``pos`` the position of the first."""

    automaton: CopyAutomaton
    configs: Configs
    pending: List[int]
    max_new: int
    pos: int = 0
    out: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    passes: int = 0
    done: bool = False
    draft_len: int = 0


class _Batch:
    """One KV cache for several rows, with a validity mask over its columns.

    Rows advance by different numbers of tokens per pass, so positions are given per row;
    blocks are right-padded, rejected and padded columns are masked and then dropped. A
    row that leaves keeps its cache row until a joining row takes it (:meth:`seed`) or
    nobody does (:meth:`select_rows`)."""

    def __init__(self, model, pad_id: int):
        self.model = model
        self.pad_id = pad_id
        self.head = _plain_head(model)
        self.mlps = _layer_mlps(self.head[0]) if self.head is not None else []
        self.takes_logits_to_keep = "logits_to_keep" in inspect.signature(unwrap_peft(model).forward).parameters
        self._reset()
        self.last_width = 0

    def _reset(self) -> None:
        """An empty batch: no rows, a new cache (refused here, before any pass, when its
        layers are not full-attention dynamic ones: rows are moved and cut in place)."""
        import torch
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        self.cache = DynamicCache(config=self.model.config)
        for layer in self.cache.layers:
            if not isinstance(layer, DynamicLayer) or getattr(layer, "is_sliding", False):
                raise NotImplementedError(
                    f"Constrained decoding needs a full-attention dynamic KV cache, got {type(layer).__name__}."
                )
        self.mask = torch.zeros((0, 0), dtype=torch.long)

    def forward(
        self,
        blocks: Sequence[Sequence[int]],
        starts: Sequence[int],
        select: Sequence[Tuple[int, int]] = (),
    ):
        """One pass on a block of tokens per row (row r's first token at position
        ``starts[r]``); returns the logits [len(select), vocab] at the (row, block column)
        pairs of ``select``, or None when nothing is selected (a prefill).

        The output layer runs on the selected positions only where the model's logits are
        plainly its output layer on the last hidden state (:func:`_plain_head`): over a
        large vocabulary it costs as much as the layers below, and a pass selects about
        two thirds of its positions (the others are padding and prompt chunks). There the
        feed-forward blocks also skip the padding when it is a tenth of the block or more
        (:func:`_packed`; measured 15.0 -> 13.1 ms for a pass of 18 x 33 with a third padded)."""
        import torch

        width = max(1, max(len(b) for b in blocks))
        ids = torch.tensor([list(b) + [self.pad_id] * (width - len(b)) for b in blocks], dtype=torch.long)
        valid = (torch.arange(width)[None, :] < torch.tensor([len(b) for b in blocks])[:, None]).long()
        positions = torch.tensor(list(starts))[:, None] + torch.arange(width)
        mask = torch.cat([self.mask, valid], dim=1)
        device = self.model.device
        inputs = dict(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            cache=self.cache,
            use_cache=True,
        )
        rows = torch.tensor([r for r, _ in select], dtype=torch.long, device=device)
        cols = torch.tensor([c for _, c in select], dtype=torch.long, device=device)
        if self.head is not None:
            decoder, output_layer = self.head
            real = valid.flatten().nonzero().flatten()
            packed = _packed(self.mlps, real.to(device)) if len(real) < PACK_BELOW * valid.numel() else nullcontext()
            with packed:
                hidden = decoder(**inputs).last_hidden_state
            logits = output_layer(hidden[rows.to(hidden.device), cols.to(hidden.device)]) if select else None
        else:
            keep = width - int(cols.min()) if select else 1
            out = self.model(**inputs, **({"logits_to_keep": keep} if self.takes_logits_to_keep else {}))
            logits = out.logits[rows, cols - (width - out.logits.shape[1])] if select else None
        self.mask = mask
        self.last_width = width
        return logits

    def add_rows(self, seeds: Sequence[Optional["_Prefix"]]) -> None:
        """Append one row per seed, holding that cached prefix (the prompt part common to
        every row, or a text's shared part) or nothing: rows join a running batch when no
        row has left to make room (:meth:`seed` reuses one)."""
        import torch

        if not seeds:
            return
        before, width, layers = self.mask.shape[0], self.mask.shape[1], self.cache.layers
        self.mask = torch.cat([self.mask, self.mask.new_zeros((len(seeds), width))])
        reference = next((seed.kv for seed in seeds if seed is not None), None)
        if not layers or layers[0].keys is None:  # nothing cached yet
            if reference is None:
                return  # the next pass creates the cache for every row
            for i, (keys, values) in enumerate(reference):
                shape = (before, keys.shape[1], width, keys.shape[3])
                self.cache.update(keys.new_zeros(shape), values.new_zeros(shape), i)
        for layer in layers:
            rows = (len(seeds),) + tuple(layer.keys.shape[1:])
            layer.keys = torch.cat([layer.keys, layer.keys.new_zeros(rows)])
            layer.values = torch.cat([layer.values, layer.values.new_zeros(rows)])
        longest = max([seed.length for seed in seeds if seed is not None], default=0)
        if longest > width:
            self._widen(longest)
        for k, seed in enumerate(seeds):
            self.seed(before + k, seed)

    def extract(self, row: int) -> "_Prefix":
        """The keys/values of batch row ``row``'s valid columns, in order: a text's shared
        prompt part, to seed its rows with."""
        import torch

        cols = torch.nonzero(self.mask[row]).flatten()
        kv = []
        for layer in self.cache.layers:
            index = cols.to(layer.keys.device)
            kv.append(tuple(part[row : row + 1].index_select(2, index) for part in (layer.keys, layer.values)))
        return _Prefix(len(cols), kv)

    def seed(self, row: int, seed: Optional["_Prefix"]) -> None:
        """Give batch row ``row``, whose row has left, to a joining row holding ``seed``:
        the old columns are masked and the seed written over the first ones in place,
        instead of appending a row (a copy of the whole cache) and dropping the old one
        (another)."""
        self.mask[row] = 0
        if seed is None:
            return
        if seed.length > self.mask.shape[1]:
            self._widen(seed.length)
        self.mask[row, : seed.length] = 1
        for layer, (keys, values) in zip(self.cache.layers, seed.kv):
            layer.keys[row, :, : seed.length] = keys[0]
            layer.values[row, :, : seed.length] = values[0]

    def _widen(self, width: int) -> None:
        grow = width - self.mask.shape[1]
        self.mask = _with_zero_columns(self.mask, grow)
        for layer in self.cache.layers:
            layer.keys, layer.values = _with_zero_columns(layer.keys, grow), _with_zero_columns(layer.values, grow)

    def select_rows(self, rows: Sequence[int]) -> None:
        """Keep batch rows ``rows`` only, in that order (rows left and nobody took them)."""
        import torch

        if not rows:
            self._reset()
            return
        index = torch.tensor(list(rows), dtype=torch.long)
        self.mask = self.mask[index]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index.to(layer.keys.device)], layer.values[index.to(layer.keys.device)]

    def keep(self, kept_new: Sequence[Optional[int]]) -> None:
        """Of the columns of the last pass keep the first ``kept_new[r]`` for batch row r;
        None: the row left (its columns are masked, the row waits for :meth:`seed` or
        :meth:`select_rows`).

        Columns no row uses any more are cropped from the end (cheap); the cache is only
        re-gathered when masked holes would waste a quarter of it."""
        import torch

        if all(n is None for n in kept_new):
            self._reset()
            return
        mask = self.mask
        for r, n in enumerate(kept_new):
            mask[r, mask.shape[1] - self.last_width + n if n is not None else 0 :] = 0
        counts = mask.sum(dim=1)
        used = torch.nonzero(mask.any(dim=0)).flatten()
        end = int(used[-1]) + 1 if len(used) else 0
        if end - int(counts.max()) < max(32, end // 4):
            self.cache.crop(end - mask.shape[1])
            self.mask = mask[:, :end]
            return
        new_len = int(counts.max())
        # Valid columns first, in order; padding points at column 0 (masked anyway).
        order = torch.argsort(1 - mask, dim=1, stable=True)[:, :new_len]
        arange = torch.arange(new_len)[None, :]
        cols = torch.where(arange < counts[:, None], order, torch.zeros_like(order))
        self.mask = (arange < counts[:, None]).long()
        _gather_cache(self.cache, cols)


def _with_zero_columns(tensor, columns: int):
    """``tensor`` with ``columns`` zero columns appended on its sequence axis (the last
    for a mask [rows, columns], the third for keys/values [rows, heads, columns, dim])."""
    import torch

    axis = 1 if tensor.dim() == 2 else 2
    shape = list(tensor.shape)
    shape[axis] = columns
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=axis)


# Causal LMs whose forward is ``logits = lm_head(model(...).last_hidden_state)``, nothing more
# (no soft-capping or scaling of the logits).
_PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def _plain_head(model):
    """(decoder, output layer) of a model in ``_PLAIN_HEAD_TYPES`` (a peft model: of its
    base, whose modules carry the adapters), else None: use the model's own forward."""
    base = unwrap_peft(model)
    if getattr(base.config, "model_type", None) not in _PLAIN_HEAD_TYPES:
        return None
    return base.get_decoder(), base.get_output_embeddings()


PACK_BELOW = 0.9  # share of real (unpadded) positions under which the MLPs skip the padding


def _layer_mlps(decoder) -> List[Any]:
    """The feed-forward block of every decoder layer (``layer.mlp``), or [] if any lacks one."""
    mlps = [getattr(layer, "mlp", None) for layer in getattr(decoder, "layers", [])]
    return mlps if mlps and all(m is not None for m in mlps) else []


@contextmanager
def _packed(mlps: Sequence[Any], real) -> Iterator[None]:
    """Run the feed-forward blocks on the real positions only (``real``: flat indices into
    the [rows, width] block); padded positions get zeros, which nothing attends to. A
    position-wise block gives the same values either way, and it is most of a layer's
    arithmetic: a pass is padded where rows end before the widest one."""
    shapes: List[Any] = []

    def pack(_module, args):
        hidden = args[0]
        shapes.append(hidden.shape)
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, real),) + tuple(args[1:])

    def unpack(_module, _args, out):
        rows, width, _ = shapes.pop()
        full = out.new_zeros((rows * width, out.shape[-1])).index_copy_(0, real, out)
        return full.view(rows, width, -1)

    handles = [h for m in mlps for h in (m.register_forward_pre_hook(pack), m.register_forward_hook(unpack))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def forward_module(model):
    """The module every forward path of ``model`` (its forward, ``generate``, the
    constrained decoder's) runs exactly once per pass: the decoder of a model with a
    plain head, else the model (a peft model's base model)."""
    head = _plain_head(model)
    return head[0] if head is not None else unwrap_peft(model)


def _gather_cache(cache, cols) -> None:
    """Select per batch row the sequence columns ``cols`` [rows, T'] in place (the
    layers are full-attention dynamic ones: :meth:`_Batch._reset` checks)."""
    for layer in cache.layers:
        keys = layer.keys
        index = cols.to(keys.device)[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
        layer.keys = keys.gather(2, index)
        layer.values = layer.values.gather(2, index)


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def shared_prefix_groups(
    prompts: Sequence[Sequence[int]], keys: Sequence
) -> List[Tuple[List[int], int]]:
    """Consecutive rows with the same key (the source text: the per-type prompts of one
    sentence) form a group; returns (row indices, shared token prefix length) per group.

    The shared length stops one token short of each member's prompt, so every row still
    feeds its own last token and gets its own first logits.
    """
    groups: List[Tuple[List[int], int]] = []
    for r, prompt in enumerate(prompts):
        if groups and keys[groups[-1][0][0]] == keys[r]:
            members, shared = groups[-1]
            groups[-1] = (members + [r], min(shared, _lcp(prompts[members[0]], prompt), len(prompt) - 1))
        else:
            groups.append(([r], len(prompt) - 1))
    return groups


@dataclass
class _Prefix:
    """Cached key/values of a prompt prefix (the part common to every row of a call, or
    one text's shared part), computed once and seeded into the rows that start with it."""

    length: int
    kv: List[Tuple[object, object]]


def _common_prefix(model, pad_id, prompts, groups, stats: "DecodeStats") -> Optional[_Prefix]:
    """Run the prefix all groups share once (None when shorter than MIN_SHARED)."""
    if len(groups) < 2:
        return None
    heads = [prompts[members[0]] for members, _ in groups]
    top = min(min(n for _, n in groups), min(_lcp(heads[0], h) for h in heads[1:]))
    if top < MIN_SHARED:
        return None
    batch = _Batch(model, pad_id)
    batch.add_rows([None])
    batch.forward([heads[0][:top]], [0])
    stats.forward_passes += 1
    stats.prefill_tokens += top
    return _Prefix(top, [(layer.keys, layer.values) for layer in batch.cache.layers])


@dataclass(frozen=True, eq=False)
class _Options:
    """The legal tokens of one configuration set: ``after`` maps each to the configuration
    set it leads to; ``ids`` are all of them ascending (ties of the argmax go to the lowest
    id) and ``is_bracket`` says which start with a bracket (the others are text or EOS).
    ``weigh``: the choice is the constraint's ``text_mass`` decision (brackets and text both
    legal); ``brackets``/``open_bias``: the constraint's. One object per configuration set
    (cached), hashed by identity."""

    after: Dict[int, Configs]
    ids: List[int]
    is_bracket: List[bool]
    weigh: bool = False
    brackets: Tuple[str, str] = ("[", "]")
    open_bias: float = 0.0


def _options(index: VocabIndex, automaton: CopyAutomaton, configs: Configs, eos_ids) -> _Options:
    """The legal tokens in ``configs`` (EOS once the answer is complete), cached."""
    options = automaton.options_cache.get(configs)
    if options is None:
        after = index.allowed(automaton, configs)
        if automaton.can_end(configs):
            after.update(dict.fromkeys(eos_ids, DONE))
        if not after:
            raise RuntimeError(
                "No token of the vocabulary continues the constrained answer for "
                f"{automaton.constraint.source!r}: the tokenizer cannot spell it."
            )
        c = automaton.constraint
        brackets = index.bracket_ids(c.open, c.close)
        ids = sorted(after)
        is_bracket = [i in brackets for i in ids]
        weigh = c.text_mass and any(is_bracket) and not all(is_bracket)
        options = _Options(after, ids, is_bracket, weigh, (c.open, c.close), c.open_bias)
        automaton.options_cache[configs] = options
    return options


class _OptionTable:
    """The options a decoding call has met, as rows of padded tensors (ids, their number,
    bracket flags, text_mass flag, bracket pair), so that a pass gathers its positions'
    legal tokens with one index instead of building tensors from lists (a third of the
    verification's time went to that)."""

    def __init__(self):
        import torch

        self.row_of: Dict[_Options, int] = {}
        self.pairs: List[Tuple[str, str]] = []
        self.ids = torch.zeros((0, 1), dtype=torch.long)
        self.is_bracket = torch.zeros((0, 1), dtype=torch.bool)
        self.lengths = torch.zeros(0, dtype=torch.long)
        self.weigh = torch.zeros(0, dtype=torch.bool)
        self.pair = torch.zeros(0, dtype=torch.long)

    def rows(self, options: Sequence[_Options]):
        """The table rows of ``options`` (added when new), as an index tensor."""
        import torch

        found = [self.row_of.get(o, -1) for o in options]
        new = list(dict.fromkeys(o for o, r in zip(options, found) if r < 0))
        if new:
            self._add(new)
            found = [self.row_of[o] for o in options]
        return torch.tensor(found, dtype=torch.long)

    def _add(self, new: List[_Options]) -> None:
        import torch

        width = max(self.ids.shape[1], max(len(o.ids) for o in new))
        for pair in {o.brackets for o in new} - set(self.pairs):
            self.pairs.append(pair)
        ids = torch.tensor([o.ids + o.ids[:1] * (width - len(o.ids)) for o in new], dtype=torch.long)
        flags = torch.tensor([o.is_bracket + [False] * (width - len(o.ids)) for o in new], dtype=torch.bool)
        old = self.ids.shape[1]
        if width > old:  # pad the rows so far: repeat their first id, not a bracket
            self.ids = torch.cat([self.ids, self.ids[:, :1].expand(-1, width - old)], dim=1)
            self.is_bracket = torch.cat([self.is_bracket, self.is_bracket.new_zeros((len(self.row_of), width - old))], 1)
        self.ids = torch.cat([self.ids, ids])
        self.is_bracket = torch.cat([self.is_bracket, flags])
        self.lengths = torch.cat([self.lengths, torch.tensor([len(o.ids) for o in new], dtype=torch.long)])
        self.weigh = torch.cat([self.weigh, torch.tensor([o.weigh for o in new], dtype=torch.bool)])
        self.pair = torch.cat([self.pair, torch.tensor([self.pairs.index(o.brackets) for o in new])])
        for o in new:
            self.row_of[o] = len(self.row_of)


@dataclass
class _Plan:
    """What one row verifies in a pass: its ``draft`` fed from block column ``start`` on.
    ``options[k]`` are the legal tokens before the k-th position: one position per draft
    token and one more for the model's own token after the draft (none after EOS)."""

    start: int
    draft: List[int]
    options: List[_Options]


def _plan(index: VocabIndex, row: _Row, draft: List[int], start: int, eos_ids) -> _Plan:
    """Walk the row's automaton along its draft (cut where a draft token is not legal)."""
    configs, options = row.configs, []
    for k, token in enumerate(draft):
        options.append(_options(index, row.automaton, configs, eos_ids))
        nxt = options[-1].after.get(token)
        if nxt is None:
            return _Plan(start, draft[:k], options)
        if token in eos_ids:
            return _Plan(start, draft[: k + 1], options)
        configs = nxt
    options.append(_options(index, row.automaton, configs, eos_ids))
    return _Plan(start, draft, options)


def _verify(logits, options: Sequence[_Options], index: VocabIndex, table: _OptionTable):
    """The constrained choice and its raw log-softmax at every selected position at once
    (``logits`` [positions, vocab]; ``options``: each position's legal tokens, looked up
    in ``table``), in a few tensor operations per pass; per token Python only compares ids.

    Plain rule: the argmax over the allowed tokens (ties: lowest id). With
    ``constraint.text_mass`` the allowed tokens that start with a bracket compete with the
    summed probability of every token that does not (the model's "no bracket here"); the
    winning side's best allowed token is taken. A choice depends on its position's logits
    only, so it is the same whether the position was computed alone or in a draft.
    Returns the chosen token ids and their log-probabilities."""
    import torch

    if not len(options):
        return [], []
    flat = logits.float()  # the same tensor when already float32
    device = flat.device
    _bias_open_brackets(flat, options, index)
    rows = table.rows(options)
    lengths = table.lengths[rows]
    k_max = int(lengths.max())
    ids, is_bracket = table.ids[rows, :k_max].to(device), table.is_bracket[rows, :k_max].to(device)
    valid = (torch.arange(k_max)[None, :] < lengths[:, None]).to(device)
    logp = torch.log_softmax(flat, dim=-1)  # one fused pass; the argmax stays on the logits
    values, value_logp = flat.gather(1, ids), logp.gather(1, ids)
    weigh = table.weigh[rows].to(device)
    if bool(weigh.any()):
        # log of the summed probability of all text tokens: log(1 - P(brackets))
        pair = table.pair[rows]
        bracket_logp = torch.full_like(logp[:, 0], float("-inf"))
        for k, brackets in enumerate(table.pairs):
            members = torch.nonzero(pair == k).flatten().to(device)
            bracket_ids = index.bracket_tensor(*brackets, flat)
            if len(members) and len(bracket_ids):
                bracket_logp[members] = torch.logsumexp(logp.index_select(1, bracket_ids).index_select(0, members), -1)
        text = torch.log(-torch.expm1(bracket_logp.clamp(max=0.0)))
        best_bracket = value_logp.masked_fill(~(valid & is_bracket), float("-inf")).max(dim=-1).values
        side = torch.where((text >= best_bracket)[:, None], ~is_bracket, is_bracket)
        valid = valid & torch.where(weigh[:, None], side, torch.ones_like(side))
    best = values.masked_fill(~valid, float("-inf")).argmax(dim=-1, keepdim=True)  # first maximum
    return ids.gather(1, best)[:, 0].tolist(), value_logp.gather(1, best)[:, 0].tolist()


def _bias_open_brackets(logits, options: Sequence[_Options], index: VocabIndex) -> None:
    """Add each position's ``open_bias`` to the logits of the tokens that open a bracket,
    in place, before any choice is made (so speculative and plain decoding see the same
    scores and stay identical)."""
    for n, o in enumerate(options):
        if o.open_bias:
            logits[n, index.ids_starting_with(o.brackets[0].encode("utf8"))] += o.open_bias


def _encode(tokenizer, text: str) -> List[int]:
    """``tokenizer.encode(text)`` without special tokens; a fast tokenizer's backend is
    called directly (a tenth of the wrapper's time, and drafts ask often)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text, add_special_tokens=False)


def _draft_tokens(index: VocabIndex, tokenizer, row: _Row, max_draft: int, eos_id: int, cache: Dict) -> List[int]:
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


def _text_tokens(index: VocabIndex, tokenizer, data: bytes, cache: Dict) -> List[int]:
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
    def of(cls, index: VocabIndex, tokenizer, automaton: CopyAutomaton, cache: Dict) -> "_SourceTokens":
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


@dataclass
class _Group:
    """Rows of one text and the part of their prompt they share (the sentence): it is run
    once, on one cache row (``pending`` is what is not in the cache yet, from ``pos``),
    whose keys/values then seed every member."""

    members: List[_Row]
    pending: List[int]
    pos: int
    passes: int = 0


class _Stream:
    """The continuous batch of one decoding call: at most ``capacity`` rows per pass.

    With drafts, rows leave the batch when they finish and others take their slots in
    the next pass, so the tail of a row with many brackets runs alongside the next texts
    instead of in passes of its own. A text's shared prompt part is computed once on one
    slot and kept; its rows then join one by one. Prompt tokens ride along in passes
    that verify other rows' drafts, in chunks no wider than a draft: the batch is padded
    to its widest block, so a long prompt would make every row pay for its length."""

    def __init__(self, model, tokenizer, index, prompts, rows, units, eos_ids, pad_id, options, prefix, stats):
        self.model, self.tokenizer, self.index = model, tokenizer, index
        self.prompts, self.rows, self.eos_ids, self.stats = prompts, rows, eos_ids, stats
        self.speculative, self.max_draft, self.capacity = options
        self.prefix = prefix
        self.top = prefix.length if prefix is not None else 0
        self.queue = deque(units)  # (row indices, shared prompt length) per text
        self.ready: Deque[Tuple[_Row, Optional[_Prefix]]] = deque()  # rows whose prompt prefix is cached
        self.live: List[Any] = []  # _Row or _Group per cache row (None: its row left)
        self.batch = _Batch(model, pad_id)
        # text bytes -> the tokens spelling them; a source text -> its _SourceTokens
        self.draft_cache: Dict[Union[bytes, str], Any] = {}
        self.table = _OptionTable()

    def run(self) -> None:
        while self.queue or self.live or self.ready:
            self._admit()
            self._step()

    def _admit(self) -> None:
        """Fill free slots: rows whose prompt prefix is computed first, then the next
        text (its group takes one slot, or its rows queue as ready). Without drafts a
        pass is one token wide and a joining prompt would widen it for every row, so
        rows then join only an empty batch (fixed batches)."""
        joining: List[Any] = []
        seeds: List[Optional[_Prefix]] = []
        occupied = sum(x is not None for x in self.live)
        open_to_join = self.speculative or not occupied
        while open_to_join:
            while self.ready and occupied + len(joining) < self.capacity:
                row, seed = self.ready.popleft()
                joining.append(row)
                seeds.append(seed)
            slots = occupied + len(joining)
            waiting = len(self.ready) + sum(len(x.members) for x in self.live + joining if isinstance(x, _Group))
            if not self.queue or slots >= self.capacity or waiting >= self.capacity:
                break
            members, shared = self.queue.popleft()
            for r in members:
                row = self.rows[r]
                row.pos, row.pending = self.top, list(self.prompts[r][self.top :])
                row.passes = int(self.prefix is not None)  # the common prefix's pass served it
            if len(members) > 1 and shared > self.top:
                group_prompt = self.prompts[members[0]][self.top : shared]
                joining.append(_Group([self.rows[r] for r in members], list(group_prompt), self.top))
                seeds.append(self.prefix)
            else:
                self.ready.extend((self.rows[r], self.prefix) for r in members)
        # joining rows take the batch rows of rows that left, then new ones
        free = [r for r, x in enumerate(self.live) if x is None]
        for r, x, seed in zip(free, joining, seeds):
            self.batch.seed(r, seed)
            self.live[r] = x
        self.batch.add_rows(seeds[len(free) :])
        self.live += joining[len(free) :]
        if len(free) > len(joining):
            rows = [r for r, x in enumerate(self.live) if x is not None]
            self.batch.select_rows(rows)
            self.live = [self.live[r] for r in rows]

    def _step(self) -> None:
        """One pass: rows whose prompt is in the cache but for one token verify a draft;
        the others (and groups) feed prompt tokens, at most one draft's width when some
        row verifies, all of them otherwise."""
        live, index = self.live, self.index
        chunk = 1 + self.max_draft
        if not any(isinstance(x, _Row) and len(x.pending) <= chunk for x in live):
            chunk = max(len(x.pending) for x in live)
        verifying = [isinstance(x, _Row) and len(x.pending) <= chunk for x in live]
        # per verifying row the draft as wide as a pass allows; a pass is as wide as its
        # widest block, and padding still costs attention: every draft fills it (capping
        # each row at its own draft length measured slower, 0.88-0.92 s against 0.86 s)
        longest = [self._draft(x, chunk - len(x.pending)) if v else [] for x, v in zip(live, verifying)]
        width = max(
            len(x.pending) + min(x.draft_len, len(d)) if v else min(chunk, len(x.pending))
            for x, v, d in zip(live, verifying, longest)
        )
        plans = [
            _plan(index, x, d[: width - len(x.pending)], len(x.pending) - 1, self.eos_ids) if v else None
            for x, v, d in zip(live, verifying, longest)
        ]
        blocks = [x.pending + plan.draft if plan else x.pending[:chunk] for x, plan in zip(live, plans)]
        select = [(r, plan.start + k) for r, plan in enumerate(plans) if plan for k in range(len(plan.options))]
        logits = self.batch.forward(blocks, [x.pos for x in live], select)
        options = [o for plan in plans if plan for o in plan.options]
        chosen, logprobs = _verify(logits, options, index, self.table)
        self.stats.forward_passes += 1
        at, kept_new = 0, []  # per batch row: columns of this pass it keeps, None: it left
        for r, (x, plan) in enumerate(zip(live, plans)):
            x.passes += 1
            if isinstance(x, _Group) or not x.out:  # the block starts with prompt tokens
                self.stats.prefill_tokens += len(blocks[r]) if plan is None else len(x.pending)
            if plan is None:
                fed = len(blocks[r])
                x.pos, x.pending = x.pos + fed, x.pending[fed:]
                if isinstance(x, _Group) and not x.pending:  # the shared part is in: its rows are ready
                    shared_kv = self.batch.extract(r)
                    for row in x.members:
                        row.pos, row.pending = x.pos, row.pending[x.pos - self.top :]
                        row.passes += x.passes
                        self.ready.append((row, shared_kv))
                    kept_new.append(None)
                else:
                    kept_new.append(fed)
                continue
            n = len(plan.options)
            accepted = self._accept(x, plan, chosen[at : at + n], logprobs[at : at + n])
            at += n
            if x.done:
                kept_new.append(None)
                continue
            kept_new.append(len(x.pending) + accepted)
            x.pos += len(x.pending) + accepted
            x.pending = [x.out[-1]]
        self.batch.keep(kept_new)
        left = [n is None for n in kept_new]
        self.live = [] if all(left) else [None if gone else x for x, gone in zip(live, left)]

    def _draft(self, row: _Row, room: int) -> List[int]:
        if not self.speculative or room <= 0:
            return []
        return _draft_tokens(self.index, self.tokenizer, row, room, self.eos_ids[0], self.draft_cache)

    def _accept(self, row: _Row, plan: _Plan, chosen: List[int], logprobs: List[float]) -> int:
        """Take the choices along the draft up to the first one that differs from it
        (that one included); returns how many draft tokens were accepted."""
        accepted = 0
        for k, (token, logprob) in enumerate(zip(chosen, logprobs)):
            row.out.append(token)
            row.logprobs.append(logprob)
            row.configs = plan.options[k].after[token]
            if token in self.eos_ids or len(row.out) >= row.max_new:
                row.done = True
                break
            if k < len(plan.draft) and plan.draft[k] == token:
                accepted += 1  # its keys/values are already in the cache
                continue
            break
        self.stats.draft_tokens += len(plan.draft)
        self.stats.accepted_tokens += accepted
        # Adapt the draft to how far the model follows the source (it only costs compute):
        # twice the accepted run, shrinking at most by half per pass, so one bracket does
        # not cut the draft of a model that otherwise copies.
        row.draft_len = min(self.max_draft, max(MIN_DRAFT, 2 * (accepted + 1), row.draft_len // 2))
        return accepted


def _decode_stream(
    model, tokenizer, index, prompts, constraints, max_new, units, eos_ids, pad_id, options, prefix, stats
):
    """Decode all rows (:class:`_Stream`); ``units``: (row indices, shared prompt length)
    per text; ``options``: (speculative, max_draft, capacity). Returns the rows' ``_Row``
    records in order."""
    _, max_draft, _ = options
    shared_options: Dict[CopyConstraint, Dict[Configs, _Options]] = {}
    automata = {
        c: CopyAutomaton(c, shared_options.setdefault(dataclasses.replace(c, forced_prefix=""), {}))
        for c in set(constraints)
    }
    rows = [
        _Row(automaton=automata[c], configs=automata[c].initial, pending=[], max_new=m, draft_len=max_draft)
        for c, m in zip(constraints, max_new)
    ]
    _Stream(model, tokenizer, index, prompts, rows, units, eos_ids, pad_id, options, prefix, stats).run()
    return rows


def decode_constrained(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    constraints: Sequence[CopyConstraint],
    *,
    eos_token_ids: Sequence[int],
    max_new_tokens: Optional[Sequence[int]] = None,
    speculative: bool = True,
    share_prefix: bool = True,
    max_draft: int = 32,
    batch_size: int = 64,
    stats: Optional[DecodeStats] = None,
) -> List[DecodedRow]:
    """Constrained greedy decoding of ``prompts`` (token ids), one constraint per prompt.

    ``speculative`` feeds the rest of the answer as a draft (at most ``max_draft`` tokens)
    and keeps exactly what greedy would produce: the output is the same with it off.
    ``share_prefix`` runs the common prompt prefix of consecutive rows once (keep the rows
    of one text adjacent). At most ``batch_size`` rows are in a model call; with drafts
    the batch is refilled as rows finish. The constraint bounds the answer length by
    itself; ``max_new_tokens`` (per row, default unbounded) only cuts it.
    """
    import torch

    if len(prompts) != len(constraints):
        raise ValueError(f"{len(prompts)} prompts but {len(constraints)} constraints")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("Every prompt needs at least one token.")
    if not eos_token_ids:
        raise ValueError("Constrained decoding needs at least one end token id.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    stats = stats if stats is not None else DecodeStats()
    max_new = list(max_new_tokens) if max_new_tokens is not None else [1 << 30] * len(prompts)
    index = vocab_index(tokenizer)
    eos_ids = sorted(set(eos_token_ids))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    results: List[Optional[DecodedRow]] = [None] * len(prompts)
    todo = [r for r in range(len(prompts)) if max_new[r] > 0]
    for r in range(len(prompts)):
        if max_new[r] <= 0:
            results[r] = DecodedRow(text="", token_ids=[], logprobs=[], forward_passes=0, finished=False)
    with torch.inference_mode():
        todo_prompts = [prompts[r] for r in todo]
        prefix = None
        if share_prefix:  # the rows of one text form a unit; the prefix all share is run once
            start = time.perf_counter()
            units = shared_prefix_groups(todo_prompts, [constraints[r].source for r in todo])
            prefix = _common_prefix(model, pad_id, todo_prompts, units, stats)
            stats.seconds += time.perf_counter() - start
        else:
            units = [([k], 0) for k in range(len(todo))]
        start = time.perf_counter()
        rows = _decode_stream(
            model,
            tokenizer,
            index,
            todo_prompts,
            [constraints[r] for r in todo],
            [max_new[r] for r in todo],
            units,
            eos_ids,
            pad_id,
            (speculative, max_draft, batch_size),
            prefix,
            stats,
        )
        seconds = time.perf_counter() - start
        stats.seconds += seconds
        for r, row in zip(todo, rows):
            data = b"".join(index.bytes_of.get(t, b"") for t in row.out if t not in eos_ids)
            stats.generated_tokens += len(row.out)
            stats.prompt_tokens += len(prompts[r])
            results[r] = DecodedRow(
                text=data.decode("utf-8", errors="replace"),
                token_ids=row.out,
                logprobs=row.logprobs,
                forward_passes=row.passes,
                finished=bool(row.out) and row.out[-1] in eos_ids,
                seconds=seconds / len(rows),
            )
    return results  # type: ignore[return-value]


class CopyCursor:
    """Where one answer decoded outside this module stands in its constraint: the tokens
    taken so far (``taken``) and the configurations they lead to."""

    def __init__(self, automaton: CopyAutomaton) -> None:
        self.automaton = automaton
        self.configs: Configs = automaton.initial
        self.taken = 0


class CopyRule:
    """The in-process decoder's choice, one position at a time, for a sampler that is not
    ours (a model server's): :meth:`choose` returns, for each cursor, the token
    :func:`decode_constrained` would take given the logits of its next position (the same
    option sets, ``open_bias`` and ``text_mass`` rule, ties to the lowest id); the caller
    then calls :meth:`take` with the token the sampler emitted."""

    def __init__(self, tokenizer, eos_token_ids: Sequence[int]) -> None:
        if not eos_token_ids:
            raise ValueError("Constrained decoding needs at least one end token id.")
        self.index = vocab_index(tokenizer)
        self.eos_ids = sorted(set(eos_token_ids))
        self.table = _OptionTable()

    def start(self, constraint: CopyConstraint) -> CopyCursor:
        return CopyCursor(CopyAutomaton(constraint))

    def choose(self, logits, cursors: Sequence[CopyCursor]) -> List[int]:
        """``logits`` [len(cursors), vocab]: the chosen token per cursor (an end token for
        a finished one). The logits are changed in place by ``open_bias`` only."""
        live = [k for k, c in enumerate(cursors) if c.configs != DONE]
        chosen = [self.eos_ids[0]] * len(cursors)
        if live:
            options = [_options(self.index, cursors[k].automaton, cursors[k].configs, self.eos_ids) for k in live]
            rows = logits if len(live) == len(cursors) else logits[live]
            for k, token in zip(live, _verify(rows, options, self.index, self.table)[0]):
                chosen[k] = token
        return chosen

    def take(self, cursor: CopyCursor, token: int) -> bool:
        """Advance ``cursor`` by ``token``; False (and the cursor unchanged) when the token
        is not a legal continuation (nothing is, after the end)."""
        if cursor.configs == DONE:
            return False
        after = _options(self.index, cursor.automaton, cursor.configs, self.eos_ids).after.get(token)
        if after is None:
            return False
        cursor.configs = after
        cursor.taken += 1
        return True


# the key of a request's constraint among vLLM's per-request arguments (vllm_xargs)
COPY_REQUEST_ARG = "medllm_copy"


def copy_request_arg(constraint: CopyConstraint, eos_token_ids: Sequence[int]) -> str:
    """A constraint and its end tokens as one string, the form a request carries to a
    server-side :class:`CopyRule` (vLLM's ``vllm_xargs``); read back by
    :func:`read_copy_request_arg`."""
    return json.dumps({"constraint": dataclasses.asdict(constraint), "eos": sorted(set(eos_token_ids))}, ensure_ascii=False)


def read_copy_request_arg(arg: str) -> Tuple[CopyConstraint, Tuple[int, ...]]:
    """The constraint and end tokens :func:`copy_request_arg` wrote; ValueError on anything else."""
    try:
        data = json.loads(arg)
        eos = tuple(int(t) for t in data["eos"])
        constraint = CopyConstraint(**data["constraint"])
    except (TypeError, KeyError, ValueError) as err:
        raise ValueError(f"not a copy constraint written by copy_request_arg: {err}") from err
    if not eos:
        raise ValueError("a copy constraint needs at least one end token id")
    return constraint, eos


# --------------------------------------------------------------------------- runtime entries


def generate_constrained(
    lm,
    requests: Sequence,
    adapter: Optional[str] = None,
    batch_size: int = 8,
    *,
    speculative: bool = True,
    share_prefix: bool = True,
    max_draft: int = 32,
):
    """Decode ``GenerationRequest``s that carry a copy constraint; ``GenerationResult``s
    in request order.

    Called by :class:`~.generation.HFGenerator` for constrained requests. Keep the
    requests of one text adjacent so their shared prompt prefix is computed once;
    ``batch_size`` bounds the rows of a model call. ``max_new_tokens`` of a request
    only cuts an answer (finish reason "length"): the constraint bounds its length.
    """
    from .generation import GenerationResult, HFGenerator

    generator = HFGenerator(lm, adapter)
    prompts = [generator.encode(req) for req in requests]
    constraints = [req.constraint for req in requests]
    with lm.use(adapter) as model:
        rows = decode_constrained(
            model,
            generator.tokenizer,
            prompts,
            constraints,
            eos_token_ids=generator.stop_ids,
            max_new_tokens=[req.max_new_tokens for req in requests],
            speculative=speculative,
            share_prefix=share_prefix,
            max_draft=max_draft,
            batch_size=batch_size,
        )
    return [
        GenerationResult(
            text=row.text,
            token_ids=row.token_ids,
            logprobs=row.logprobs,
            finish_reason="stop" if row.finished else "length",
            forward_passes=row.forward_passes,
            generated_tokens=len(row.token_ids),
            prompt_tokens=len(prompt),
            seconds=row.seconds,
        )
        for row, prompt in zip(rows, prompts)
    ]


def generate_prompt_lookup(lm, requests: Sequence, adapter: Optional[str] = None, num_tokens: int = 10):
    """Greedy decoding with Hugging Face prompt-lookup decoding (drafts copied from
    n-grams of the prompt), for strategies whose answers quote the text without a strict
    copy constraint (JSON, HTML, mark, entity lists). The output equals plain greedy;
    transformers runs it one request at a time. Returns ``GenerationResult``s."""
    import torch

    from .generation import GenerationResult, HFGenerator

    generator = HFGenerator(lm, adapter)
    tokenizer = generator.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else generator.stop_ids[0]
    results = []
    with lm.use(adapter) as model, torch.inference_mode(), count_forward_passes(model) as passes:
        for req in requests:
            start, before = time.perf_counter(), passes[0]
            prompt = generator.encode(req)
            ids = torch.tensor([prompt], device=model.device)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                prompt_lookup_num_tokens=num_tokens,
                do_sample=False,
                max_new_tokens=req.max_new_tokens,
                eos_token_id=generator.stop_ids,
                pad_token_id=pad_id,
                output_logits=True,
                return_dict_in_generate=True,
            )
            new = out.sequences[0, len(prompt) :].tolist()
            logprobs = [
                float(torch.log_softmax(step[0].double(), dim=-1)[tok]) for step, tok in zip(out.logits, new)
            ]
            stopped = bool(new) and new[-1] in generator.stop_ids
            results.append(
                GenerationResult(
                    text=tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=True),
                    token_ids=new,
                    logprobs=logprobs,
                    finish_reason="stop" if stopped else "length",
                    forward_passes=passes[0] - before,
                    generated_tokens=len(new),
                    prompt_tokens=len(prompt),
                    seconds=time.perf_counter() - start,
                )
            )
    return results


@contextmanager
def count_forward_passes(model) -> Iterator[List[int]]:
    """Count forward calls of ``model`` (a one-element list, updated in place), at
    :func:`forward_module`."""
    counter = [0]

    def hook(*_):
        counter[0] += 1

    handle = forward_module(model).register_forward_pre_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()
