"""The answers of a :class:`~spacy_medllm.types.CopyConstraint` as a GBNF grammar.

Inference servers (vLLM ``structured_outputs.grammar`` and SGLang ``ebnf`` through
xgrammar, llama.cpp ``grammar``) cannot run this package's decoder; a grammar is the only
constraint they take. This one is built by walking the :class:`~.copy.automaton.CopyAutomaton`
that the in-process decoder walks, so both accept exactly the same answers (the text the
model writes before its end token).

The grammar is right-linear: one rule per automaton state, each alternative a unit (a
source character, the open or the close bracket) followed by the next state's rule; the
states where the answer may end also allow ``""``. A source containing a bracket string
gives both readings as two alternatives with the same literal, as the automaton keeps both. Body states are first reduced to what
their future depends on (:func:`_state_key`), and states with the same alternatives are
then merged, so the grammar has a few rules per character outside brackets and
O(len(source) * max_span_chars) in all.
"""
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Tuple

from ..types import CopyConstraint
from .copy.automaton import CopyAutomaton, _Body

# (source index, depth, characters enclosed by the outer bracket or -1 when it cannot run
# out of room any more, whether a character was copied since the innermost open bracket,
# brackets since the last copied character, whether the last unit was an open bracket)
_Key = Tuple[int, int, int, bool, int, bool]
# a merged state: (whether the answer may end there, its alternatives (unit, next state))
_Rule = Tuple[bool, Tuple[Tuple[str, int], ...]]

_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def copy_grammar(constraint: CopyConstraint) -> str:
    """The GBNF grammar (``root`` first) whose language is the set of answers
    ``CopyAutomaton(constraint)`` accepts: ``forced_prefix`` + the source with brackets."""
    automaton = CopyAutomaton(constraint)
    key = _state_key(constraint, automaton.n)
    start: _Body = (0, (), 0, False)
    # the reachable keys, each with the units of one of its states and the keys they lead to
    edges: Dict[_Key, List[Tuple[str, _Key]]] = {}
    todo = [(start, key(start))]
    seen = {todo[0][1]}
    while todo:
        state, state_key = todo.pop()
        out = edges[state_key] = []
        for unit, nxt in automaton.units(state):
            nxt_key = key(nxt)
            out.append((unit.decode("utf-8"), nxt_key))
            if nxt_key not in seen:
                seen.add(nxt_key)
                todo.append((nxt, nxt_key))
    # Merge states with equal alternatives, successors first (every unit advances the
    # source index or adds a bracket to the run), and drop the states from which the
    # answer cannot end: with forbid_empty off the automaton has a few (after the last
    # character, a bracket run at its limit with a bracket still open).
    merged: Dict[_Key, Optional[int]] = {}
    rules: Dict[_Rule, int] = {}
    for k in sorted(edges, key=lambda k: (k[0], k[4]), reverse=True):
        final = k[0] == automaton.n and k[1] == 0
        alts = tuple(sorted({(text, merged[nxt]) for text, nxt in edges[k] if merged[nxt] is not None}))
        merged[k] = rules.setdefault((final, alts), len(rules)) if final or alts else None
    by_id = list(rules)
    first = merged[key(start)]
    assert first is not None  # copying the source without brackets always ends
    names = {first: "s0"}
    prefix = _literal(constraint.forced_prefix) + " " if constraint.forced_prefix else ""
    lines = [f"root ::= {prefix}s0"]
    order = [first]
    for rule in order:  # grows while it is walked: the rules in breadth-first order
        final, alts = by_id[rule]
        parts = ['""'] if final else []
        for text, nxt in alts:
            if nxt not in names:
                names[nxt] = f"s{len(names)}"
                order.append(nxt)
            parts.append(f"{_literal(text)} {names[nxt]}")
        lines.append(f"{names[rule]} ::= " + " | ".join(parts))
    return "\n".join(lines) + "\n"


def _state_key(c: CopyConstraint, n: int) -> Callable[[_Body], _Key]:
    """The part of a body state ``(i, opens, brackets, last_open)`` that ``units`` reads.

    The open positions matter through their number, ``i > opens[-1]`` (read by the close
    under ``forbid_empty``; opens ascend and a close needs it, so it holds for the bracket
    below too) and ``d = i - opens[0]`` (the room check ``d + 1 <= max_span_chars``). The
    room is checked up to index ``last``: when ``last + 1 - opens[0] <= max_span_chars``
    the outer bracket cannot run out of it and ``d`` is kept as -1. Flags that no
    transition reads are dropped. Equal keys give equal units leading to equal keys, so
    the states of one key have one future language.
    """
    last = n - 1 if c.forbid_empty else n

    def key(state: _Body) -> _Key:
        i, opens, brackets, last_open = state
        d = i - opens[0] if opens and last + 1 - opens[0] > c.max_span_chars else -1
        copied = bool(opens) and c.forbid_empty and i > opens[-1]
        return (i, len(opens), d, copied, brackets, last_open and c.forbid_double_open)

    return key


@lru_cache(maxsize=4096)
def _literal(text: str) -> str:
    """A GBNF string literal. Other characters than printable ones are written as
    ``\\uHHHH``/``\\UHHHHHHHH`` (llama.cpp and xgrammar both read them; xgrammar's ``\\x``
    takes every hex digit that follows, llama.cpp's two)."""
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'
