"""The GBNF grammar of a copy constraint: its language is exactly the set of answers the
decoder's automaton accepts (both enumerated for short sources), its size is linear in
the source, and its literals are escaped so that a GBNF reader gets the text back."""
import re
from functools import lru_cache
from typing import Dict, List, Set, Tuple

import pytest

from spacy_medllm.llm.copy.automaton import CopyAutomaton, _Body
from spacy_medllm.llm.copy_grammar import copy_grammar
from spacy_medllm.types import CopyConstraint

# An alternative: its items, each ("lit", text) or ("ref", rule name).
Grammar = Dict[str, List[List[Tuple[str, str]]]]

_NAMED = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"'}
_TOKEN = re.compile(r'\s*(?:(?P<lit>"(?:[^"\\]|\\.)*")|(?P<ref>[A-Za-z0-9_-]+)|(?P<bar>\|))')


def _unescape(body: str) -> str:
    out, k = [], 0
    while k < len(body):
        if body[k] != "\\":
            out.append(body[k])
            k += 1
        elif body[k + 1] in _NAMED:
            out.append(_NAMED[body[k + 1]])
            k += 2
        else:
            width = {"x": 2, "u": 4, "U": 8}[body[k + 1]]
            out.append(chr(int(body[k + 2 : k + 2 + width], 16)))
            k += 2 + width
    return "".join(out)


def read_gbnf(text: str) -> Grammar:
    """The subset of GBNF ``copy_grammar`` writes: one rule a line, alternatives of
    string literals and rule names."""
    grammar: Grammar = {}
    for line in text.splitlines():
        name, _, body = line.partition(" ::= ")
        assert re.fullmatch(r"[a-z0-9]+", name) and name not in grammar, line
        alts: List[List[Tuple[str, str]]] = [[]]
        pos = 0
        while pos < len(body):
            m = _TOKEN.match(body, pos)
            assert m, f"cannot read {body[pos:]!r}"
            pos = m.end()
            if m["bar"]:
                alts.append([])
            elif m["ref"]:
                alts[-1].append(("ref", m["ref"]))
            else:
                alts[-1].append(("lit", _unescape(m["lit"][1:-1])))
        assert all(alts), f"empty alternative in {line!r}"
        grammar[name] = alts
    return grammar


def grammar_language(grammar: Grammar) -> Set[str]:
    @lru_cache(maxsize=None)
    def language(name: str) -> Set[str]:
        out: Set[str] = set()
        for alt in grammar[name]:
            strings = {""}
            for kind, value in alt:
                tails = language(value) if kind == "ref" else {value}
                strings = {s + t for s in strings for t in tails}
            out |= strings
        return out

    return language("root")


def automaton_language(constraint: CopyConstraint) -> Set[str]:
    automaton = CopyAutomaton(constraint)
    memo: Dict[_Body, Set[bytes]] = {}

    def language(state: _Body) -> Set[bytes]:
        if state not in memo:
            ends = {b""} if state[0] == automaton.n and not state[1] else set()
            memo[state] = ends | {unit + tail for unit, nxt in automaton.units(state) for tail in language(nxt)}
        return memo[state]

    prefix = constraint.forced_prefix.encode("utf-8")
    return {(prefix + answer).decode("utf-8") for answer in language((0, (), 0, False))}


CASES = [
    CopyConstraint("abcde"),
    CopyConstraint("abcde", max_depth=1),
    CopyConstraint("abcde", max_depth=1, max_span_chars=1),
    CopyConstraint("abcde", max_span_chars=2),
    CopyConstraint("abcde", max_span_chars=1, forbid_double_open=False),
    CopyConstraint("abcd", max_span_chars=2, forbid_empty=False),
    CopyConstraint("abcd", forbid_empty=False),
    CopyConstraint("abcd", max_depth=1, forbid_empty=False, forbid_double_open=False),
    CopyConstraint("abc", max_span_chars=2, forbid_empty=False, forbid_double_open=False),
    CopyConstraint("abc", max_depth=3, max_span_chars=2, forbid_double_open=False),
    CopyConstraint("abcd", max_depth=0),
    CopyConstraint("", forced_prefix="p"),
    CopyConstraint("", forbid_empty=False, forbid_double_open=False),
    CopyConstraint("a", max_depth=1, forbid_empty=False),
    CopyConstraint("ab\"c\\", forced_prefix='say "x"\\\n\t\r:\x00\x1f\x7f\x85\u2028 '),
    CopyConstraint("a[b]c"),
    CopyConstraint("[]x]", max_span_chars=2, forbid_empty=False),
    CopyConstraint("a[[b", max_depth=1, forbid_double_open=False),
    CopyConstraint("患者发热", forced_prefix="疾病：\n"),
    CopyConstraint("咳嗽", max_span_chars=1, forbid_empty=False),
    CopyConstraint("a<b>", open="<", close=">"),
    CopyConstraint("a<<b>", open="<<", close=">>"),
    CopyConstraint("x<y", open="<<", close=">>", max_span_chars=1, forbid_empty=False, forbid_double_open=False),
    CopyConstraint("病史", open="【", close="】", forced_prefix="症状："),
    CopyConstraint("a|b ::= \"c\"", max_depth=1, max_span_chars=3),
]


@pytest.mark.parametrize("constraint", CASES, ids=lambda c: repr(c)[13:80])
def test_language_equals_automaton(constraint):
    expected = automaton_language(constraint)
    assert constraint.forced_prefix + constraint.source in expected
    assert grammar_language(read_gbnf(copy_grammar(constraint))) == expected


def test_rule_count_is_linear():
    source = "".join(chr(0x4E00 + k) for k in range(200))
    for span in (1, 2, 8, 64):
        rules = len(read_gbnf(copy_grammar(CopyConstraint(source, max_span_chars=span))))
        assert rules < len(source) * span * 4
    for constraint in (CopyConstraint(source, max_span_chars=200), CopyConstraint(source, max_span_chars=10_000)):
        assert len(read_gbnf(copy_grammar(constraint))) <= 6 * len(source)
    assert len(read_gbnf(copy_grammar(CopyConstraint(source, max_depth=0)))) == len(source) + 2


def test_escaped_prefix_round_trips():
    prefix = 'a "quoted" \\ back\\slash\nnew\tline\r\x00\x01a\x1b\x7f\x85\u200b\u2028中文😀 '
    text = copy_grammar(CopyConstraint("文本", forced_prefix=prefix))
    root = text.splitlines()[0]
    assert root.isprintable() and root.startswith('root ::= "')
    assert read_gbnf(text)["root"][0] == [("lit", prefix), ("ref", "s0")]
    assert grammar_language(read_gbnf(text)) >= {prefix + "文本", prefix + "[文本]", prefix + "[文]本"}


def test_no_prefix_and_plain_copy():
    text = copy_grammar(CopyConstraint("ab", max_depth=0))
    assert text == 'root ::= s0\ns0 ::= "a" s1\ns1 ::= "b" s2\ns2 ::= ""\n'
