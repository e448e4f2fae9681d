"""The copy constraint as a byte-level automaton: which bytes may come next in an answer
that is the source text with brackets inserted.

Kept apart from the vocabulary and the model so that the grammar writer
(:mod:`..copy_grammar`), the in-process decoder and a model server's rule all walk the
same automaton and so accept exactly the same answers.
"""
from typing import Any, Dict, FrozenSet, List, NamedTuple, Optional, Tuple

from ...types import CopyConstraint

# Automaton state inside the body: (source index, tuple of open positions, brackets emitted
# since the last copied character, whether the last unit was an open bracket).
_Body = Tuple[int, Tuple[int, ...], int, bool]
# A configuration: the body state reached once the pending unit bytes ``rem`` are emitted.
_Config = Tuple[_Body, bytes]
Configs = FrozenSet[_Config]
DONE: Configs = frozenset()  # after EOS nothing is legal


class DraftSpan(NamedTuple):
    """The rest of an answer assuming no further open bracket (:meth:`CopyAutomaton.draft_span`):
    the pending bytes of the current unit, the first and end source character, and the
    closing brackets after the end (0 unless it reaches the end of the source)."""

    pending: bytes
    start: int
    stop: int
    closes: int


class CopyAutomaton:
    """The byte-level automaton of one :class:`CopyConstraint`.

    A configuration set is the set of readings of the bytes emitted so far (usually one;
    more when the source contains a bracket character). ``advance`` consumes one byte.
    """

    def __init__(self, constraint: CopyConstraint, options_cache: Optional[Dict[Configs, Any]] = None) -> None:
        self.constraint = constraint
        self.chars = [ch.encode("utf-8") for ch in constraint.source]
        self.open = constraint.open.encode("utf-8")
        self.close = constraint.close.encode("utf-8")
        self.n = len(self.chars)
        self.initial: Configs = frozenset({((0, (), 0, False), constraint.forced_prefix.encode("utf-8"))})
        self._units: Dict[_Body, List[Tuple[bytes, _Body]]] = {}
        # The allowed tokens per configuration set (:func:`.options._options` fills it). Automata whose constraints differ only in
        # the forced prefix (the per-type prompts of one sentence) may share it: a
        # configuration inside the prefix carries its pending bytes, so the answer from a
        # configuration depends on nothing else.
        self.options_cache: Dict[Configs, Any] = {} if options_cache is None else options_cache

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

    def in_span(self, configs: Configs) -> bool:
        """Whether some reading of the answer so far has an open bracket."""
        return any(state[1] for state, _ in configs)

    def can_end(self, configs: Configs) -> bool:
        return any(not rem and state[0] == self.n and not state[1] for state, rem in configs)

    def draft_span(self, configs: Configs, max_chars: int) -> Optional[DraftSpan]:
        """The rest of the answer assuming no further open bracket, at most ``max_chars``
        source characters (:class:`DraftSpan`)."""
        if not configs:
            return None
        state, rem = min(configs, key=lambda cfg: (len(cfg[0][1]), cfg))
        i, opens = state[0], state[1]
        stop = min(self.n, i + max_chars)
        return DraftSpan(rem, i, stop, len(opens) if stop == self.n else 0)
