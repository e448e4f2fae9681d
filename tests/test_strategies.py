"""Annotation strategies: exact round trips on the shipped CMeEE sample, the cases a
strategy cannot state, hand-made broken responses, Unicode, and property-based fuzzing of
the parsers (never raise, only valid mentions)."""
import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
import spacy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from thinc.api import Config

from spacy_medllm.labels import get_scheme
from spacy_medllm.strategies import (
    EntityCategoryStrategy,
    HtmlStrategy,
    InContextStrategy,
    IndexStrategy,
    JsonStrategy,
    MarkStrategy,
    SymbolStrategy,
    TfidfRetriever,
    mentions_from_doc,
    merge_results,
)
from spacy_medllm.strategies.base import mention_is_valid, sort_mentions
from spacy_medllm.strategies.incontext import Demonstration
from spacy_medllm.types import Mention

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CMEEE = get_scheme("cmeee")
OFFSET_STRATEGIES = [SymbolStrategy(), MarkStrategy(), HtmlStrategy(), JsonStrategy(), IndexStrategy()]
ALL_STRATEGIES = OFFSET_STRATEGIES + [EntityCategoryStrategy()]
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))


def load_cmeee(name):
    """(text, sorted gold (label, start, end exclusive)) from a CMeEE JSON file (end_idx inclusive)."""
    records = json.loads((ASSETS / name).read_text(encoding="utf8"))
    return [(r["text"], sorted({(e["type"], e["start_idx"], e["end_idx"] + 1) for e in r["entities"]})) for r in records]


SAMPLE = load_cmeee("cmeee_train.json") + load_cmeee("cmeee_dev.json")


def as_mentions(text, spans):
    return [Mention(label, text[s:e], s, e) for label, s, e in spans]


def round_trip(strategy, text, mentions, scheme=CMEEE):
    """Render the gold answer of every prompt, parse it back, merge."""
    return merge_results(
        strategy.parse(text, strategy.render_target(text, mentions, p), p) for p in strategy.prompts(text, scheme)
    )


def spans_of(result):
    return sorted((m.label, m.start, m.end) for m in result.mentions)


def texts_of(mentions):
    return Counter((m.label, m.text) for m in mentions)


# -- round trips on the sample ---------------------------------------------------------------
def test_sample_has_nested_entities():
    nested = sum(
        1 for _, spans in SAMPLE for a in spans for b in spans if a != b and a[1] <= b[1] and b[2] <= a[2]
    )
    assert len(SAMPLE) == 1800 and nested > 100


@pytest.mark.parametrize("strategy", OFFSET_STRATEGIES, ids=lambda s: s.name)
def test_round_trip_exact_on_cmeee_sample(strategy):
    # none of the sample's records holds a case a strategy cannot state (see below),
    # so every record must come back exactly, nested entities included, nothing discarded
    for text, spans in SAMPLE:
        result = round_trip(strategy, text, as_mentions(text, spans))
        assert spans_of(result) == spans, text
        assert not result.discarded, (text, result.discarded)


def test_round_trip_entity_category_on_cmeee_sample():
    # entity-category states no offsets: the answer gives back every (type, text) pair,
    # once per occurrence, in document order, and the aligner places them
    strategy = EntityCategoryStrategy()
    for text, spans in SAMPLE:
        gold = as_mentions(text, spans)
        result = round_trip(strategy, text, gold)
        assert [(m.label, m.text) for m in result.mentions] == [(m.label, m.text) for m in sort_mentions(gold, CMEEE)]
        assert all(m.start is None and m.end is None for m in result.mentions)
        assert not result.discarded


@pytest.mark.parametrize("base", [SymbolStrategy(), JsonStrategy()], ids=lambda s: s.name)
def test_round_trip_in_context_mode(base):
    demos = [Demonstration(t, tuple(as_mentions(t, s))) for t, s in SAMPLE[:200]]
    strategy = InContextStrategy(base, TfidfRetriever().fit(demos), k=2)
    for text, spans in SAMPLE[200:260]:
        prompts = strategy.prompts(text, CMEEE)
        assert len(prompts) == (len(CMEEE) if base.per_label else 1)
        assert spans_of(round_trip(strategy, text, as_mentions(text, spans))) == spans


# -- what a strategy cannot state --------------------------------------------------------------
def test_inexpressible_cases_are_named():
    sym, mark, html = SymbolStrategy(), MarkStrategy(), HtmlStrategy()
    # 1. the same span twice for one type: one marker pair per entity, duplicates collapse
    text = "肺炎"
    twice = [Mention("dis", "肺炎", 0, 2), Mention("dis", "肺炎", 0, 2)]
    for strategy in (sym, mark, html, JsonStrategy(), IndexStrategy()):
        assert spans_of(round_trip(strategy, text, twice)) == [("dis", 0, 2)]
    # 2. crossing entities of one type: brackets pair as nesting, so [a[b]c] reads as nested
    text = "甲乙丙丁"
    crossing = [Mention("dis", "甲乙丙", 0, 3), Mention("dis", "乙丙丁", 1, 4)]
    assert spans_of(round_trip(sym, text, crossing)) == [("dis", 0, 4), ("dis", 1, 3)]
    assert spans_of(round_trip(mark, text, crossing)) == [("dis", 0, 4), ("dis", 1, 3)]
    # ... while html tags carry their text and pair by it, so crossing is expressible
    assert spans_of(round_trip(html, text, crossing)) == [("dis", 0, 3), ("dis", 1, 4)]
    # 3. an entity starting with a literal "[" or ending with a literal "]": the parser
    # reads an ambiguous bracket the tightest way, so the entity loses its bracket
    text = "见[注1]"
    assert spans_of(round_trip(sym, text, [Mention("dis", "[注1]", 1, 5)])) == [("dis", 2, 4)]
    # an entity inside literal brackets, or containing one, is fine
    assert spans_of(round_trip(sym, text, [Mention("dis", "注1", 2, 4)])) == [("dis", 2, 4)]
    assert spans_of(round_trip(sym, "a[b", [Mention("dis", "a[b", 0, 3)])) == [("dis", 0, 3)]
    assert spans_of(round_trip(sym, "a]b", [Mention("dis", "a]b", 0, 3)])) == [("dis", 0, 3)]
    # 4. entity-category gives no offsets at all (tested on the sample above)


def inexpressible(strategy, text, spans):
    """The cases named above, for a per-label marker strategy."""
    for label, s, e in spans:
        if text[s:e].startswith(strategy.open) or text[s:e].endswith(strategy.close):
            return True
        if any(label == l2 and s < s2 < e < e2 for l2, s2, e2 in spans):
            return True
    return False


NASTY = "ab[]<>:：疾病-\n\r\t\\ 😀，/mark0{}\""


@st.composite
def gold_cases(draw, alphabet=NASTY):
    text = draw(st.text(alphabet=alphabet, min_size=1, max_size=14))
    n = len(text)
    spans = draw(
        st.sets(st.tuples(st.sampled_from(["dis", "sym"]), st.integers(0, n - 1), st.integers(1, n)).filter(lambda t: t[1] < t[2]), max_size=4)
    )
    return text, sorted(spans)


@pytest.mark.parametrize("strategy", OFFSET_STRATEGIES + [EntityCategoryStrategy()], ids=lambda s: s.name)
@FUZZ
@given(case=gold_cases())
def test_round_trip_property(strategy, case):
    """Texts full of markup characters: exact unless the case is one named above."""
    text, spans = case
    result = round_trip(strategy, text, as_mentions(text, spans))
    if isinstance(strategy, EntityCategoryStrategy):
        assert texts_of(result.mentions) == texts_of(as_mentions(text, spans))
    elif not (isinstance(strategy, SymbolStrategy) and inexpressible(strategy, text, spans)):
        assert spans_of(result) == spans
        assert not result.discarded


def test_mark_round_trip_with_literal_markers():
    text = "见<mark>注</mark>1"
    gold = [Mention("dis", "注", 7, 8), Mention("dis", "mark>注</mark", 2, 14)]
    assert spans_of(round_trip(MarkStrategy(), text, gold)) == [("dis", 2, 14), ("dis", 7, 8)]


# -- Unicode -----------------------------------------------------------------------------------
UNICODE_CASES = [
    # full-width punctuation and Latin letters, an entity ending in a full-width bracket
    ("患者ＣＴ示：右肺（上叶）结节，ＨＢｓＡｇ（＋）。", [("ite", 13, 21), ("pro", 2, 4), ("bod", 6, 12)]),
    # mixed Latin and digits, spaces inside an entity
    ("口服Vitamin B12 500μg/d，IgA 1.2 g/L", [("dru", 2, 15), ("ite", 23, 26)]),
    # emoji (outside the BMP) before, inside and after entities
    ("😀发热😷咳嗽🤒", [("sym", 1, 3), ("sym", 4, 6), ("sym", 1, 6)]),
    # CRLF line breaks, an entity spanning one, tabs
    ("主诉：\r\n头痛\t3天\r\n伴恶心", [("sym", 5, 7), ("sym", 5, 10), ("sym", 13, 15), ("sym", 3, 15)]),
    # a leading space and a trailing space inside entities
    (" 高热 ，寒战", [("sym", 0, 3), ("sym", 5, 7)]),
]


@pytest.mark.parametrize("text,spans", UNICODE_CASES)
@pytest.mark.parametrize("strategy", ALL_STRATEGIES, ids=lambda s: s.name)
def test_unicode_round_trip(strategy, text, spans):
    spans = sorted(spans)
    gold = as_mentions(text, spans)
    result = round_trip(strategy, text, gold)
    assert not result.discarded
    if isinstance(strategy, EntityCategoryStrategy):
        assert texts_of(result.mentions) == texts_of(gold)
    else:
        assert spans_of(result) == spans


# -- hand-made responses -----------------------------------------------------------------------
def parse(strategy, text, response, label=None):
    prompt = strategy.prompt(text, CMEEE, label)
    return strategy.parse(text, response, prompt)


def summary(result):
    return [(m.label, m.text, m.start, m.end, m.hint) for m in result.mentions], dict(result.discarded)


def test_symbol_parses_nested_and_literal_brackets():
    sym = SymbolStrategy()
    text = "血管周围单核细胞浸润"
    assert summary(parse(sym, text, "疾病：[血管周围[单核细胞]]浸润", "dis")) == (
        [("dis", "血管周围单核细胞", 0, 8, None), ("dis", "单核细胞", 4, 8, None)], {}
    )
    # a copy of a literal bracket is not a marker
    assert summary(parse(sym, "见[注1]", "疾病：见[[注1]]", "dis")) == ([("dis", "注1", 2, 4, None)], {})
    assert summary(parse(sym, "见[注1]", "疾病：见[注1]", "dis")) == ([], {})
    # no prefix at all, or the prefix with a half-width colon and spaces, still parse
    assert summary(parse(sym, text, "[血管周围]单核细胞浸润", "dis"))[0] == [("dis", "血管周围", 0, 4, None)]
    assert summary(parse(sym, text, "dis : [血管周围]单核细胞浸润", "dis"))[0] == [("dis", "血管周围", 0, 4, None)]


def test_symbol_falls_back_on_broken_copies():
    sym = SymbolStrategy()
    text = "血管周围单核细胞浸润"
    # truncated: the closed spans are kept
    assert summary(parse(sym, text, "疾病：[血管周围[单核细胞]]浸", "dis"))[0] == [
        ("dis", "血管周围单核细胞", 0, 8, None), ("dis", "单核细胞", 4, 8, None)]
    # unbalanced: the unclosed bracket is counted
    assert summary(parse(sym, text, "疾病：[血管周围[单核细胞]浸润", "dis")) == (
        [("dis", "单核细胞", 4, 8, None)], {"unbalanced_marker": 1})
    # a hallucinated character between entities does not matter
    assert summary(parse(sym, text, "疾病：[血管周围]的[单核细胞]浸润。", "dis"))[0] == [
        ("dis", "血管周围", 0, 4, None), ("dis", "单核细胞", 4, 8, None)]
    # a span whose text was changed is dropped, the rest kept
    assert summary(parse(sym, text, "疾病：[血管周边]单[核细胞]浸润", "dis")) == (
        [("dis", "核细胞", 5, 8, None)], {"unaligned_span": 1})
    # the answer names another type: its brackets are not for the asked one
    assert summary(parse(sym, text, "药物：[血管周围]单核细胞浸润", "dis")) == ([], {"wrong_label": 1})
    assert summary(parse(sym, text, "疾病：[]血管周围单核细胞浸润", "dis")) == ([], {"empty_span": 1})
    assert summary(parse(sym, text, "", "dis")) == ([], {})


def test_copy_constraint_contract():
    """Any answer a copy-constrained decoder can emit parses back to exactly its brackets."""
    sym, mark = SymbolStrategy(), MarkStrategy()
    text = "患者可高热39～40℃，神志大多清晰。"
    rng = random.Random(0)
    for strategy in (sym, mark):
        prompt = strategy.prompt(text, CMEEE, "sym")
        cc = strategy.copy_constraint(text, prompt)
        assert (cc.forced_prefix, cc.source, cc.open, cc.close) == (
            ("临床表现：", text, "[", "]") if strategy is sym else ("", text, "<mark>", "</mark>"))
        assert strategy.render_target(text, [], prompt) == cc.forced_prefix + cc.source
        for _ in range(100):  # random walks of the decoder's automaton
            out, stack, spans, i = [cc.forced_prefix], [], set(), 0
            while i < len(text) or stack:
                choice = rng.random()
                if choice < 0.15 and i < len(text):
                    out.append(cc.open)
                    stack.append(i)
                elif (choice < 0.3 or i == len(text)) and stack and stack[-1] < i:  # no empty spans
                    out.append(cc.close)
                    spans.add(("sym", stack.pop(), i))
                elif i < len(text):
                    out.append(text[i])
                    i += 1
            result = strategy.parse(text, "".join(out), prompt)
            assert spans_of(result) == sorted(spans)


def test_json_tolerates_fences_trailing_text_and_broken_json():
    js, text = JsonStrategy(), "患者高热伴肺炎"
    assert summary(parse(js, text, '```json\n[{"start_idx": 2, "end_idx": 3, "type": "临床表现", "entity": "高热"}]\n```\n以上。')) == (
        [("sym", "高热", 2, 4, None)], {})
    # a truncated list: complete objects are salvaged; unknown types and hallucinations counted
    truncated = ('[{"start_idx": 5, "end_idx": 6, "type": "dis", "entity": "肺炎"}, {"start_idx": 0, "end_idx": 1, '
                 '"type": "病人", "entity": "患者"}, {"start_idx": 2, "end_idx": 3, "type": "临床表现", "entity": "低热"}, {"start')
    assert summary(parse(js, text, truncated)) == (
        [("dis", "肺炎", 5, 7, None)], {"malformed_json": 1, "unknown_label": 1, "not_in_source": 1})
    # offsets that disagree with the text: the text is kept with the stated start as a hint
    assert summary(parse(js, text, '[{"start_idx": 1, "end_idx": 2, "type": "临床表现", "entity": "高热"}]')) == (
        [("sym", "高热", None, None, 1)], {})
    # exclusive end by mistake: same
    assert summary(parse(js, text, '[{"start_idx": 2, "end_idx": 4, "type": "临床表现", "entity": "高热"}]'))[0] == [
        ("sym", "高热", None, None, 2)]
    assert summary(parse(js, text, "[]")) == ([], {})
    assert summary(parse(js, text, "无")) == ([], {})
    assert summary(parse(js, text, '{"entities": [{"start_idx": "5", "end_idx": "6", "type": "疾病", "entity": "肺炎"}]}'))[0] == [
        ("dis", "肺炎", 5, 7, None)]


def test_html_tags_pair_by_type_and_text():
    html, text = HtmlStrategy(), "维生素B<sub>6缺乏"
    # entity texts containing < and > are read against the source
    response = "<疾病:维生素B<sub>6缺乏><药物:维生素B<sub>6>维生素B<sub>6</药物:维生素B<sub>6>缺乏</疾病:维生素B<sub>6缺乏>"
    assert summary(parse(html, text, response)) == (
        [("dis", "维生素B<sub>6缺乏", 0, 12, None), ("dru", "维生素B<sub>6", 0, 10, None)], {})
    # an end tag with another text does not close the start tag
    assert summary(parse(html, "高热伴肺炎", "<临床表现:高热>高热</临床表现:高>伴肺炎")) == ([], {"unmatched_tag": 2})
    # unknown types and garbled copies
    assert summary(parse(html, text, "<药品:维生素>维生素</药品:维生素>B<sub>6缺乏")) == ([], {"unknown_label": 1})
    assert summary(parse(html, "高热伴肺炎", "<临床表现:高热>高热</临床表现:高热>并发肺炎"))[0] == [("sym", "高热", 0, 2, None)]


def test_index_lines():
    ix, text = IndexStrategy(), "患者高热"
    response = "字符：0:患 1:者 2:高 3:热\n实体：\n2-3 临床表现 高热\n1-2 疾病 高热\n0-1 病人 患者\n乱码"
    assert summary(parse(ix, text, response)) == (
        [("sym", "高热", 2, 4, None), ("dis", "高热", None, None, 1)], {"unknown_label": 1, "unparsed_line": 1})
    assert summary(parse(ix, text, "字符：0:患 1:者 2:高 3:热\n实体：无")) == ([], {})
    # an entity across a line break is written escaped
    prompt = ix.prompt("头痛\r\n恶心", CMEEE)
    target = ix.render_target("头痛\r\n恶心", [Mention("sym", "痛\r\n恶", 1, 5)], prompt)
    assert target.splitlines()[-1] == "1-4 临床表现 痛\\r\\n恶"


def test_entity_category_lines():
    ec, text = EntityCategoryStrategy(), "患者高热-发热"
    response = "高热-临床表现\n1. 发热-临床表现\n感冒-疾病\n高热-发热-临床表现\n乱码\n无"
    assert summary(parse(ec, text, response)) == (
        [("sym", "高热", None, None, None), ("sym", "发热", None, None, None), ("sym", "高热-发热", None, None, None)],
        {"not_in_source": 1, "unparsed_line": 1})


# -- fuzzing: any response parses into valid mentions -------------------------------------------
RESPONSE_CHARS = NASTY + "临床表现实体无字符start_idxend_idxtypeentity[]{}"


@st.composite
def responses(draw):
    text, spans = draw(gold_cases(alphabet=NASTY + "患者高热"))
    strategy = draw(st.sampled_from(ALL_STRATEGIES))
    prompt = draw(st.sampled_from(strategy.prompts(text, CMEEE)))
    target = strategy.render_target(text, as_mentions(text, spans), prompt)
    kind = draw(st.sampled_from(["random", "unicode", "truncated", "mutated", "other strategy", "huge"]))
    if kind == "random":
        response = draw(st.text(alphabet=RESPONSE_CHARS, max_size=80))
    elif kind == "unicode":
        response = draw(st.text(max_size=80))
    elif kind == "truncated":
        response = target[: draw(st.integers(0, len(target)))]
    elif kind == "other strategy":
        other = draw(st.sampled_from(ALL_STRATEGIES))
        other_prompt = draw(st.sampled_from(other.prompts(text, CMEEE)))
        response = other.render_target(text, as_mentions(text, spans), other_prompt)
    elif kind == "huge":
        response = target * draw(st.integers(50, 300))
    else:
        response = target
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(0, len(response)))
            op = draw(st.sampled_from(["insert", "delete", "repeat"]))
            if op == "insert":
                response = response[:pos] + draw(st.sampled_from(RESPONSE_CHARS)) + response[pos:]
            elif op == "delete":
                response = response[:pos] + response[pos + 1 :]
            else:
                response = response[:pos] + response[pos : pos + 6] + response[pos:]
    return strategy, text, prompt, response


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=responses())
def test_parse_never_raises_and_keeps_only_valid_mentions(case):
    strategy, text, prompt, response = case
    result = strategy.parse(text, response, prompt)
    for m in result.mentions:
        assert mention_is_valid(text, m), m
        assert m.label in CMEEE
        if prompt.label is not None:
            assert m.label == prompt.label
    assert all(isinstance(k, str) and v > 0 for k, v in result.discarded.items())


def python_lines(fn) -> int:
    """Python lines executed by ``fn()``: a count of the parser's work that does not depend
    on how loaded the machine is."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        count += event == "line"
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(previous)
    return count


def pathological(k: int):
    text = "患者可高热39～40℃，神志大多清晰，部分患者有精神失常。" * 3
    return text, ["[" * (40 * k), "<疾病:" * (6 * k) + ">" * (6 * k), "{" * (20 * k), "高热-疾病\n" * (4 * k), text * k,
                  '[{"start_idx": 0, "end_idx": 1, "type": "疾病", "entity": "患者"}' * k]


def test_huge_and_pathological_responses_are_parsed_in_linear_work():
    """Every strategy reads garbage of any size into valid mentions, and its work grows
    linearly with the response: four times the garbage costs at most 4.5 times the lines
    (a quadratic parser would cost 16)."""
    text, huge = pathological(5000)  # up to 200,000 characters
    for strategy in ALL_STRATEGIES:
        prompt = strategy.prompts(text, CMEEE)[0]
        for response in huge:
            assert all(mention_is_valid(text, m) for m in strategy.parse(text, response, prompt).mentions)
        for small, large in zip(pathological(25)[1], pathological(100)[1]):
            work = [python_lines(lambda r=r: strategy.parse(text, r, prompt)) for r in (small, large)]
            assert work[1] <= 4.5 * work[0] + 100, (strategy.name, small[:12], work)


def test_sources_full_of_literal_markers_stay_within_the_state_bound(monkeypatch):
    """Where the source itself is made of markers, exact alignment explores at most
    MAX_STATES states per response position before it falls back."""
    from spacy_medllm.strategies import symbol

    expanded = Counter()
    step = symbol.SymbolStrategy._step_options

    def counted(self, *args):
        expanded["states"] += 1
        return step(self, *args)

    monkeypatch.setattr(symbol.SymbolStrategy, "_step_options", counted)
    for strategy, text, response in [(SymbolStrategy(), "[" * 300, "[" * 900), (MarkStrategy(), "<mark>" * 50, "<mark>" * 200)]:
        expanded.clear()
        result = strategy.parse(text, response, strategy.prompt(text, CMEEE, "dis"))
        assert all(mention_is_valid(text, m) for m in result.mentions)
        assert 0 < expanded["states"] <= 2 * (symbol.MAX_STATES + 1) * (len(response) + 1), expanded


# -- shared helpers ----------------------------------------------------------------------------
def test_mentions_from_doc_and_merge():
    nlp = spacy.blank("zh")
    doc = nlp("血管周围单核细胞浸润")
    doc.spans["sc"] = [doc.char_span(4, 8, "bod"), doc.char_span(0, 8, "bod"), doc.char_span(0, 10, "sym")]
    assert mentions_from_doc(doc) == [
        Mention("sym", "血管周围单核细胞浸润", 0, 10), Mention("bod", "血管周围单核细胞", 0, 8), Mention("bod", "单核细胞", 4, 8)]
    doc.ents = [doc.char_span(0, 10, "sym")]
    assert mentions_from_doc(doc, "other") == [Mention("sym", "血管周围单核细胞浸润", 0, 10)]
    a = SymbolStrategy().parse(doc.text, "身体：[血管周围[单核细胞]]浸润", SymbolStrategy().prompt(doc.text, CMEEE, "bod"))
    b = JsonStrategy().parse(doc.text, '[{"start_idx": 4, "end_idx": 7, "type": "身体", "entity": "单核细胞"}]',
                             JsonStrategy().prompt(doc.text, CMEEE))
    merged = merge_results([a, b])
    assert spans_of(merged) == [("bod", 0, 8), ("bod", 4, 8)] and merged.discarded == Counter({"duplicate": 1})


@pytest.mark.parametrize("name,cls", [
    ("spacy_medllm.SymbolStrategy.v1", SymbolStrategy), ("spacy_medllm.JsonStrategy.v1", JsonStrategy),
    ("spacy_medllm.HtmlStrategy.v1", HtmlStrategy), ("spacy_medllm.IndexStrategy.v1", IndexStrategy),
    ("spacy_medllm.MarkStrategy.v1", MarkStrategy), ("spacy_medllm.EntityCategoryStrategy.v1", EntityCategoryStrategy),
])
def test_strategies_resolve_from_config(name, cls):
    from spacy.util import registry

    resolved = registry.resolve(Config().from_str(f'[strategy]\n@misc = "{name}"\n'))["strategy"]
    assert type(resolved) is cls


# -- parsers never raise ------------------------------------------------------------------------
_PIECES = ["[", "]", "{", "}", '"', ":", ",", "<", ">", "</", "mark", "dis", "疾病", "entity", "start", "end",
           "²", "--2", "-1", "1" * 5000, "9" * 30, "\n", "实体", "：", "无", "发热", "@@", "##", "<dis>", "</dis>"]
_RESPONSES = st.lists(st.one_of(st.sampled_from(_PIECES), st.text(max_size=8)), max_size=40).map("".join)


def _json_like(draw_value):
    return st.lists(
        st.fixed_dictionaries(
            {"type": st.sampled_from(["dis", "疾病", "xx"]), "start_idx": draw_value, "end_idx": draw_value},
            optional={"entity": st.one_of(st.text(max_size=6), st.integers(), st.none())},
        ),
        max_size=4,
    ).map(lambda items: __import__("json").dumps(items, ensure_ascii=False))


_NUMBERS = st.one_of(st.integers(), st.integers(min_value=10**18, max_value=10**40), st.booleans(), st.none(),
                     st.floats(allow_nan=True), st.sampled_from(["²", "--2", "-3", " 4 ", "1" * 5000, "٣"]))
_PARSER_STRATEGIES = ALL_STRATEGIES + [
    InContextStrategy(JsonStrategy(), TfidfRetriever().fit([Demonstration("发热", (Mention("sym", "发热", 0, 2),))]), k=1)
]


@pytest.mark.parametrize("strategy", _PARSER_STRATEGIES, ids=lambda s: s.name)
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(response=st.one_of(_RESPONSES, _json_like(_NUMBERS)), text=st.sampled_from(["患者发热[咳嗽]，", "", "1²3 <mark>x</mark>"]))
def test_parsers_never_raise_on_malformed_output(strategy, response, text):
    """Any model output gives valid mentions or counted discards, never an exception."""
    prompt = strategy.prompts(text, CMEEE)[0]
    result = strategy.parse(text, response, prompt)
    for m in result.mentions:
        assert m.label in CMEEE
        if m.has_offsets:
            assert 0 <= m.start < m.end <= len(text) and text[m.start : m.end] == m.text
    assert all(isinstance(n, int) and n > 0 for n in result.discarded.values())
