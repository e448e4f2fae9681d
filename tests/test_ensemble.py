"""The ensemble: conflict detection, the rule resolvers, the LLM resolver, the component,
and exemplar selection, on hand-made cases with hand-computed expectations."""
from collections import Counter
from types import SimpleNamespace

import pytest
import spacy
from spacy.tokens import DocBin
from spacy.training import Example
from typer.testing import CliRunner

from spacy_medllm.cli import medllm_cli
from spacy_medllm.ensemble import IntersectionResolver, UnionResolver, VoteResolver, compare
from spacy_medllm.ensemble.llm_resolver import TEMPLATE_DIR, LLMResolver
from spacy_medllm.labels import get_scheme
from spacy_medllm.llm.loader import ModelSpec
from spacy_medllm.ensemble.exemplars import (
    collect_entities,
    read_exemplars,
    save_exemplars,
    select_exemplars,
    tfidf_embedder,
)


def keys(candidates):
    return [(c.start, c.end, c.label) for c in candidates]


def regions(comparison):
    return [(r.start, r.end, keys(r.candidates)) for r in comparison.regions]


# -- conflict detection -------------------------------------------------------------------
def test_nested_agreement_does_not_join_a_region():
    comp = compare({"a": [(0, 4, "x", 0.9), (0, 2, "y", 0.8)], "b": [(0, 4, "x", 0.7)]})
    assert keys(comp.agreed) == [(0, 4, "x")]
    assert comp.agreed[0].sources == ("a", "b") and comp.agreed[0].scores == (0.9, 0.7)
    assert regions(comp) == [(0, 2, [(0, 2, "y")])]
    assert comp.regions[0].candidates[0].sources == ("a",)


def test_partial_overlap_and_chain_merge_transitively():
    comp = compare({"a": [(0, 3, "x", None), (8, 9, "x", None)], "b": [(2, 5, "x", None)], "c": [(4, 7, "x", None)]})
    assert comp.agreed == ()
    assert regions(comp) == [(0, 7, [(0, 3, "x"), (2, 5, "x"), (4, 7, "x")]), (8, 9, [(8, 9, "x")])]
    # a missing score counts as full confidence
    assert comp.regions[0].candidates[0].scores == (1.0,)


def test_touching_spans_are_separate_regions():
    comp = compare({"a": [(0, 2, "x", None)], "b": [(2, 4, "x", None)]})
    assert regions(comp) == [(0, 2, [(0, 2, "x")]), (2, 4, [(2, 4, "x")])]


def test_type_disagreement_on_one_span():
    comp = compare({"a": [(0, 2, "x", 0.6)], "b": [(0, 2, "y", 0.9)]})
    assert comp.agreed == ()
    assert regions(comp) == [(0, 2, [(0, 2, "x"), (0, 2, "y")])]
    assert [c.sources for c in comp.regions[0].candidates] == [("a",), ("b",)]


def test_empty_one_and_identical_groups():
    # an empty group agrees with nothing
    comp = compare({"a": [], "b": [(0, 2, "x", 0.5)]})
    assert comp.agreed == () and regions(comp) == [(0, 2, [(0, 2, "x")])]
    # all empty, and no groups at all
    assert compare({"a": [], "b": []}) == compare({"a": [], "b": []})
    assert compare({"a": [], "b": []}).regions == () and compare({}).agreed == ()
    # one group: everything is agreed, even its own overlaps
    comp = compare({"a": [(0, 2, "x", None), (1, 3, "y", None)]})
    assert keys(comp.agreed) == [(0, 2, "x"), (1, 3, "y")] and comp.regions == ()
    # identical groups
    spans = [(0, 2, "x", 0.5), (1, 4, "y", 0.5)]
    comp = compare({"a": spans, "b": spans, "c": spans})
    assert keys(comp.agreed) == [(0, 2, "x"), (1, 4, "y")] and comp.regions == ()
    assert comp.agreed[0].support(3) == pytest.approx(0.5)


def test_duplicate_in_one_group_counts_once_with_its_higher_score():
    comp = compare({"a": [(0, 2, "x", 0.2), (0, 2, "x", 0.7)], "b": [(0, 2, "x", 0.5)]})
    assert keys(comp.agreed) == [(0, 2, "x")] and comp.agreed[0].scores == (0.7, 0.5)


# -- a hand case for the resolvers ------------------------------------------------------------
# 患者左肺上叶结节伴咳嗽发热三天: 左肺 2-4, 左肺上叶 2-6, 左肺上叶结节 2-8, 咳嗽 9-11,
# 发热 11-13, 咳嗽发热 9-13. Scores: group a 0.9, b 0.8, c 0.7.
TEXT = "患者左肺上叶结节伴咳嗽发热三天"
GROUPS = {
    "sc_a": [(2, 6, "bod"), (2, 8, "dis"), (9, 11, "sym"), (11, 13, "sym")],
    "sc_b": [(2, 4, "bod"), (2, 8, "dis"), (9, 11, "sym"), (11, 13, "dis")],
    "sc_c": [(2, 6, "bod"), (9, 11, "sym"), (9, 13, "sym")],
}
SCORES = {"sc_a": 0.9, "sc_b": 0.8, "sc_c": 0.7}


def hand_comparison():
    return compare({k: [(s, e, label, SCORES[k]) for s, e, label in v] for k, v in GROUPS.items()})


def test_hand_case_conflicts():
    comp = hand_comparison()
    assert keys(comp.agreed) == [(9, 11, "sym")]
    assert regions(comp) == [
        (2, 8, [(2, 4, "bod"), (2, 6, "bod"), (2, 8, "dis")]),
        (9, 13, [(9, 13, "sym"), (11, 13, "dis"), (11, 13, "sym")]),
    ]


def test_vote_k_of_3():
    comp = hand_comparison()
    # k=1: all pass; 发热 sym (a, support .30) beats 发热 dis (b, .27) on one range; nested kept
    assert keys(VoteResolver(k=1).resolve(comp)) == [
        (2, 4, "bod"), (2, 6, "bod"), (2, 8, "dis"), (9, 11, "sym"), (9, 13, "sym"), (11, 13, "sym")
    ]
    # k=2 (the default majority of 3)
    expected_k2 = [(2, 6, "bod"), (2, 8, "dis"), (9, 11, "sym")]
    assert keys(VoteResolver(k=2).resolve(comp)) == expected_k2
    assert keys(VoteResolver().resolve(comp)) == expected_k2
    # k=3: only what all agree on
    assert keys(VoteResolver(k=3).resolve(comp)) == [(9, 11, "sym")]
    # flat: of the two-vote pair, 左肺上叶结节 (support (.9+.8)/3) beats 左肺上叶 ((.9+.7)/3);
    # 咳嗽发热 crosses nothing but nests over the agreed 咳嗽, so it goes
    assert keys(VoteResolver(k=1, allow_nested=False).resolve(comp)) == [
        (2, 8, "dis"), (9, 11, "sym"), (11, 13, "sym")
    ]
    with pytest.raises(ValueError, match="between 1 and"):
        VoteResolver(k=4).resolve(comp)


def test_union_and_intersection():
    comp = hand_comparison()
    assert len(UnionResolver().resolve(comp)) == 7
    assert keys(UnionResolver().resolve(comp))[-2:] == [(11, 13, "dis"), (11, 13, "sym")]
    assert keys(IntersectionResolver().resolve(comp)) == [(9, 11, "sym")]


# -- the component --------------------------------------------------------------------------
def hand_doc(nlp):
    doc = nlp.make_doc(TEXT)
    for key, spans in GROUPS.items():
        group = [doc.char_span(s, e, label=label) for s, e, label in spans]
        doc.spans[key] = group
        doc.spans[key].attrs["scores"] = [SCORES[key]] * len(group)
    return doc


GOLD = [(2, 6, "bod"), (2, 8, "dis"), (9, 11, "sym"), (11, 13, "sym")]


def gold_example(nlp):
    gold = nlp.make_doc(TEXT)
    gold.spans["sc"] = [gold.char_span(s, e, label=label) for s, e, label in GOLD]
    return Example(nlp.make_doc(TEXT), gold)


def test_component_writes_group_and_ents(tmp_path):
    nlp = spacy.blank("zh")
    ensemble = nlp.add_pipe("medllm_ensemble", config={"span_keys": list(GROUPS)})
    doc = ensemble(hand_doc(nlp))
    group = doc.spans["sc"]
    assert [(s.start_char, s.end_char, s.label_) for s in group] == [(2, 6, "bod"), (2, 8, "dis"), (9, 11, "sym")]
    assert group.attrs["scores"] == pytest.approx([(0.9 + 0.7) / 3, (0.9 + 0.8) / 3, 0.8])
    assert [(e.text, e.label_) for e in doc.ents] == [("左肺上叶结节", "dis"), ("咳嗽", "sym")]
    # scoring against the gold group: 3 of 3 predicted right, 3 of 4 gold found
    scores = ensemble.score([Example(doc, gold_example(nlp).reference)])
    assert scores["spans_sc_p"] == pytest.approx(1.0) and scores["spans_sc_r"] == pytest.approx(0.75)


def test_component_config_errors_and_missing_group():
    nlp = spacy.blank("zh")
    with pytest.raises(ValueError, match="set span_keys"):
        nlp.add_pipe("medllm_ensemble")
    ensemble = nlp.add_pipe("medllm_ensemble", name="e2", config={"span_keys": ["sc_a", "sc_x"]})
    doc = hand_doc(nlp)
    with pytest.raises(ValueError, match="sc_x"):
        ensemble(doc)


def test_round_trip_keeps_resolver_and_exemplars(tmp_path):
    nlp = spacy.blank("zh")
    nlp.add_pipe(
        "medllm_ensemble",
        config={"span_keys": list(GROUPS), "resolver": {"@misc": "spacy_medllm.VoteResolver.v1", "k": 1}},
    )
    save_exemplars(tmp_path / "ex.json", {"dis": ["糖尿病"], "sym": ["咳嗽", "发热"]})
    nlp.config["initialize"]["components"]["medllm_ensemble"] = {
        "exemplars": {"@misc": "spacy_medllm.Exemplars.v1", "path": str(tmp_path / "ex.json")}
    }
    nlp.initialize()
    nlp.to_disk(tmp_path / "pipe")
    loaded = spacy.load(tmp_path / "pipe")
    ensemble = loaded.get_pipe("medllm_ensemble")
    assert ensemble.exemplars == {"dis": ["糖尿病"], "sym": ["咳嗽", "发热"]}
    assert ensemble.resolver.k == 1
    doc = loaded(hand_doc(loaded))
    assert len(doc.spans["sc"]) == 6
    assert loaded.from_bytes(nlp.to_bytes()).get_pipe("medllm_ensemble").exemplars == ensemble.exemplars


# -- exemplars --------------------------------------------------------------------------------
FAMILIES = {
    "糖尿病": {"糖尿病": 5, "1型糖尿病": 2, "2型糖尿病": 3, "糖尿病肾病": 1},
    "高血压": {"高血压": 4, "原发性高血压": 1, "高血压病": 2},
    "肺炎": {"肺炎": 3, "支气管肺炎": 1, "社区获得性肺炎": 1},
    "胃癌": {"胃癌": 2, "进展期胃癌": 1},
    "贫血": {"贫血": 2, "缺铁性贫血": 1},
}


def test_exemplars_tfidf_one_per_family_deterministic():
    pool = {"dis": Counter({t: n for fam in FAMILIES.values() for t, n in fam.items()})}
    pool["sym"] = Counter({"咳嗽": 2, "发热": 1})
    chosen = select_exemplars(pool, tfidf_embedder(), per_type=5, seed=0)
    assert chosen == select_exemplars(pool, tfidf_embedder(), per_type=5, seed=0)
    assert chosen["sym"] == ["咳嗽", "发热"]  # fewer than 5: all, most frequent first
    assert len(set(chosen["dis"])) == 5
    # each family's cluster gives one exemplar; the largest cluster (糖尿病, weight 11) first
    assert sorted(next(f for f, fam in FAMILIES.items() if t in fam) for t in chosen["dis"]) == sorted(FAMILIES)
    assert chosen["dis"][0] == "糖尿病"


def test_exemplars_cli(tmp_path):
    nlp = spacy.blank("zh")
    db = DocBin()
    for fam in FAMILIES.values():
        for text, n in fam.items():
            for _ in range(n):
                doc = nlp.make_doc(f"患{text}")
                doc.spans["sc"] = [doc.char_span(1, 1 + len(text), label="dis")]
                db.add(doc)
    db.add(nlp.make_doc("无标注"))  # no group, no ents annotation: skipped and reported
    db.to_disk(tmp_path / "train.spacy")
    docs = list(DocBin().from_disk(tmp_path / "train.spacy").get_docs(nlp.vocab))
    pool, skipped = collect_entities(docs, "sc")
    assert sum(pool["dis"].values()) == 29 and skipped == Counter({"doc_without_annotation": 1})
    out = tmp_path / "exemplars.json"
    result = CliRunner().invoke(medllm_cli, ["exemplars", str(tmp_path / "train.spacy"), str(out), "--per-type", "3"])
    assert result.exit_code == 0, result.output
    assert "Skipped 1: doc_without_annotation" in result.output
    exemplars = read_exemplars(out)
    assert list(exemplars) == ["dis"] and len(set(exemplars["dis"])) == 3
    assert exemplars == {"dis": select_exemplars(pool, tfidf_embedder(), per_type=3, seed=0)["dis"]}


# -- the LLM resolver ------------------------------------------------------------------------
CMEEE = get_scheme("cmeee")
EXEMPLARS = {"bod": ["左肺", "胃", "心脏", "肝", "肾"], "dis": ["糖尿病", "肺炎"], "sym": ["咳嗽", "发热"]}


def make_llm_resolver(path="unused", **kwargs):
    return LLMResolver(model=ModelSpec(path=str(path), device="cpu"), labels=CMEEE, **kwargs)


def test_llm_prompt_holds_context_candidates_definitions_exemplars():
    nlp = spacy.blank("zh")
    comp = hand_comparison()
    resolver = make_llm_resolver()
    prompts = resolver.prompts(nlp.make_doc(TEXT), comp, comp.regions[0], EXEMPLARS)
    assert [p.label for p in prompts] == ["dis", "bod"]  # scheme order, types of the region only
    first = prompts[0]
    assert first.instruction == prompts[1].instruction  # the region's prompts share all but the type
    assert TEXT in first.instruction and "左肺上叶结节" in first.instruction
    assert "1. [左肺]上叶结节｜身体｜sc_b（1/3）" in first.instruction
    assert "3. [左肺上叶结节]｜疾病｜sc_a、sc_b（2/3）" in first.instruction
    assert CMEEE.labels["bod"].definition in first.instruction
    assert "例如：左肺、胃、心脏、肝、肾" in first.instruction and "糖尿病、肺炎" in first.instruction
    assert "临床表现" not in first.instruction  # no sym candidate in this region
    assert first.input.endswith("类型：疾病") and prompts[1].input.endswith("类型：身体")
    en = LLMResolver(model=ModelSpec(path="unused"), labels=get_scheme("ncbi"))
    doc = nlp.make_doc("BRCA1 breast cancer")
    comp_en = compare({"a": [(6, 19, "Disease", None)], "b": [(13, 19, "Disease", None)]})
    [prompt] = en.prompts(doc, comp_en, comp_en.regions[0], {"Disease": ["cancer"]})
    assert "1. [breast cancer] | disease | a (1/2)" in prompt.instruction and prompt.input.endswith("Type: disease")


def test_llm_context_is_the_sentence_or_a_window():
    nlp = spacy.blank("zh")
    nlp.add_pipe("sentencizer")
    text = "无不适。患者咳嗽发热三天。次日好转。"
    comp = compare({"a": [(6, 10, "sym", None)], "b": [(6, 8, "sym", None)]})
    resolver = make_llm_resolver(context_chars=3)
    assert resolver.context_text(nlp(text), comp.regions[0]) == "患者咳嗽发热三天。"
    assert resolver.context_text(nlp.make_doc(text), comp.regions[0]) == "。患者咳嗽发热三天。"


def test_llm_decide_parses_symbol_answers_and_falls_back_on_garbage():
    nlp = spacy.blank("zh")
    doc = nlp.make_doc(TEXT)
    comp = hand_comparison()
    resolver = make_llm_resolver()
    region = comp.regions[0]
    prompts = resolver.prompts(doc, comp, region, EXEMPLARS)
    text = TEXT[2:8]
    # dis: keep 左肺上叶结节; bod: keep 左肺上叶 and propose 上叶 (no group did: counted, not kept)
    kept, failure = resolver.decide(comp, region, text, prompts, ["疾病：[左肺上叶结节]", "身体：[左肺[上叶]]结节"])
    assert failure is None and keys(kept) == [(2, 6, "bod"), (2, 8, "dis")]
    assert resolver.stats["not_a_candidate"] == 1
    for answers, reason in [
        (["疾病：左肺上叶结节", "身体：胡言乱语"], "not_a_copy"),
        (["疾病：[左肺上叶结节]", None], "truncated"),
        (["临床表现：[左肺上叶结节]", "身体：左肺上叶结节"], "not_a_copy"),
        (["疾病：[左肺上叶结节", "身体：左肺上叶结节"], "unparsed"),
    ]:
        assert resolver.decide(comp, region, text, prompts, answers) == ([], reason)


class ScriptedGenerator:
    """Answers every decision prompt by bracketing the candidates of the asked type proposed
    by group sc_a; records the calls."""

    tokenizer = staticmethod(lambda text, add_special_tokens=False: SimpleNamespace(input_ids=list(text)))

    def __init__(self, comparisons, texts):
        self.calls = []
        self.answers = {}
        for comp, text in zip(comparisons, texts):
            for region in comp.regions:
                for code in {c.label for c in region.candidates}:
                    spans = [c for c in region.candidates if c.label == code and "sc_a" in c.sources]
                    out = list(text[region.start : region.end])
                    for c in spans:  # single, non-nested spans in this script
                        out[c.start - region.start] = "[" + out[c.start - region.start]
                        out[c.end - 1 - region.start] += "]"
                    self.answers[(text[region.start : region.end], code)] = CMEEE.display(code) + "：" + "".join(out)

    def generate(self, requests, batch_size=8):
        self.calls.append(len(requests))
        results = []
        for r in requests:
            user = r.prompt[-1]["content"]
            region = user.split("片段：")[-1].split("\n")[0]
            code = CMEEE.code_of(user.rsplit("类型：", 1)[1])
            results.append(SimpleNamespace(text=self.answers[(region, code)], finish_reason="stop"))
        return results


def test_llm_resolver_batches_all_regions_of_all_docs_in_one_call():
    nlp = spacy.blank("zh")
    docs = [nlp.make_doc(TEXT), nlp.make_doc(TEXT)]
    comps = [hand_comparison(), hand_comparison()]
    resolver = make_llm_resolver()
    resolver._generator = ScriptedGenerator(comps, [TEXT, TEXT])
    kept = resolver(docs, comps, EXEMPLARS)
    # per doc: region 1 asks dis+bod, region 2 asks dis+sym → 4 requests, 8 in one call
    assert resolver._generator.calls == [8]
    # sc_a's choices: 左肺上叶 bod, 左肺上叶结节 dis, 发热 sym; plus the agreed 咳嗽
    assert keys(kept[0]) == keys(kept[1]) == [(2, 6, "bod"), (2, 8, "dis"), (9, 11, "sym"), (11, 13, "sym")]
    assert resolver.stats["decided"] == 4 and resolver.stats["fallback"] == 0


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    templates = [p.read_text(encoding="utf8") for p in TEMPLATE_DIR.glob("*.jinja")]
    defs = "".join(f"{i.name}{i.definition}" for i in CMEEE)
    exemplar_text = "".join(t for texts in EXEMPLARS.values() for t in texts)
    return tiny_model_dir(TEXT + defs + "".join(templates) + exemplar_text, layers=1, seed=0, max_positions=2048)


def test_llm_resolver_end_to_end_with_a_random_tiny_model(tiny_model, tmp_path):
    nlp = spacy.blank("zh")
    nlp.add_pipe(
        "medllm_ensemble",
        config={
            "span_keys": list(GROUPS),
            "resolver": {
                "@misc": "spacy_medllm.LLMResolver.v1",
                "model": {"@misc": "spacy_medllm.ModelSpec.v1", "path": str(tiny_model), "device": "cpu"},
                "labels": {"@misc": "spacy_medllm.LabelScheme.v1", "scheme": "cmeee"},
            },
        },
    )
    nlp.initialize(lambda: [gold_example(nlp)])  # exemplars from the gold group, TF-IDF
    ensemble = nlp.get_pipe("medllm_ensemble")
    assert ensemble.exemplars == {"bod": ["左肺上叶"], "dis": ["左肺上叶结节"], "sym": ["发热", "咳嗽"]}
    docs = list(nlp.pipe([hand_doc(nlp), hand_doc(nlp)]))
    comp = hand_comparison()
    allowed = {(c.start, c.end, c.label) for c in comp.candidates}
    for doc in docs:
        got = {(s.start_char, s.end_char, s.label_) for s in doc.spans["sc"]}
        assert (9, 11, "sym") in got and got <= allowed
    stats = ensemble.resolver.stats
    # copy-constrained decoding: even a random model answers with a parseable copy
    assert stats["regions"] == 4 and stats["decided"] == 4 and stats["fallback"] == 0
    nlp.to_disk(tmp_path / "pipe")
    loaded = spacy.load(tmp_path / "pipe")
    assert loaded.get_pipe("medllm_ensemble").exemplars == ensemble.exemplars
    assert loaded.get_pipe("medllm_ensemble").resolver.model.path == str(tiny_model)


def test_llm_resolver_falls_back_to_vote_on_garbage(tiny_model):
    nlp = spacy.blank("zh")
    resolver = make_llm_resolver(tiny_model, constrained=False)
    comps = [hand_comparison()]
    kept = resolver([hand_doc(nlp)], comps, EXEMPLARS)
    # free decoding with a random model never copies the region: every region is voted
    assert resolver.stats["fallback"] == 2 and resolver.stats["decided"] == 0
    assert resolver.stats["fallback_not_a_copy"] + resolver.stats["fallback_truncated"] == 2
    assert keys(kept[0]) == keys(VoteResolver().resolve(comps[0]))


def test_exemplars_from_hidden_states_of_the_tiny_model(tiny_model, tmp_path):
    from spacy_medllm.llm.loader import load_lm
    from spacy_medllm.ensemble.exemplars import lm_embedder

    lm = load_lm(ModelSpec(path=str(tiny_model), device="cpu"))
    assert lm.tokenizer("糖尿病", add_special_tokens=False).input_ids, "the loaded tokenizer drops the text"
    pool = {"dis": Counter({t: n for fam in FAMILIES.values() for t, n in fam.items()})}
    chosen = select_exemplars(pool, lm_embedder(lm.model, lm.tokenizer, batch_size=4), per_type=5, seed=0)
    assert len(set(chosen["dis"])) == 5 and set(chosen["dis"]) <= set(pool["dis"])
    # batching pads on the left; the mean over real tokens does not depend on the batch
    one = lm_embedder(lm.model, lm.tokenizer, batch_size=1)(["糖尿病", "社区获得性肺炎"])
    two = lm_embedder(lm.model, lm.tokenizer, batch_size=2)(["糖尿病", "社区获得性肺炎"])
    assert one == pytest.approx(two, abs=1e-4)
    assert chosen == select_exemplars(pool, lm_embedder(lm.model, lm.tokenizer, batch_size=4), per_type=5, seed=0)


def test_ensemble_config_block_builds_the_component():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "ensemble_tiny.cfg"
    config = spacy.util.load_config(path, interpolate=True)
    components = config["components"]
    block = {k: v for k, v in components["ensemble"].items() if k != "factory"}
    keys_written = [components[name]["spans_key"] for name in config["nlp"]["pipeline"] if name.startswith("align_")]
    assert block["span_keys"] == keys_written == ["sc_a", "sc_b", "sc_c"]
    nlp = spacy.blank("zh")
    ensemble = nlp.add_pipe("medllm_ensemble", config=block)  # the decision model loads on first use
    assert isinstance(ensemble.resolver, LLMResolver) and ensemble.resolver.model.path == config["paths"]["gen_a"]
