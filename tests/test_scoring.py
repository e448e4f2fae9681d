"""Every figure of spacy_medllm.scoring against hand computation (and seqeval)."""
import json
import random
import subprocess
import sys
import warnings

import pytest
import spacy
from seqeval.metrics import f1_score, precision_score, recall_score
from seqeval.metrics.sequence_labeling import get_entities
from spacy.tokens import Doc, DocBin, Span
from spacy.training import Example
from spacy.util import registry

from spacy_medllm.error_taxonomy import error_taxonomy, render_error_report
from spacy_medllm.scoring import (
    CharSpan,
    char_bio_tags,
    conll_chunks,
    examples_from_docs,
    score_bio,
    score_char_bio,
    score_ents,
    score_examples,
    score_spans,
)

NLP = spacy.blank("zh")  # one token per character
TEN = "一二三四五六七八九十"


def make_doc(text, spans=None, ents=None, key="sc"):
    """A doc with ``doc.spans[key]`` from (start, end, label) token triples (None: no
    group) and ``doc.ents`` (None: no entity annotation)."""
    doc = NLP(text)
    if spans is not None:
        doc.spans[key] = [Span(doc, s, e, label) for s, e, label in spans]
    if ents is not None:
        doc.ents = [Span(doc, s, e, label) for s, e, label in ents]
    return doc


def eg(gold, pred):
    return Example(pred, gold)


def approx_prf(prf, p, r, f):
    assert (prf.p, prf.r, prf.f) == (pytest.approx(p), pytest.approx(r), pytest.approx(f))


# ------------------------------------------------------------------ nested strict / partial / macro


@pytest.fixture
def nested_examples():
    return [
        # duplicate (0,2,DIS) in the prediction counts once
        eg(make_doc(TEN, [(0, 2, "DIS"), (0, 4, "SYM"), (5, 7, "DRU")]),
           make_doc(TEN, [(0, 2, "DIS"), (0, 2, "DIS"), (0, 4, "DIS"), (5, 8, "DRU")])),
        eg(make_doc(TEN, [(1, 3, "SYM")]), make_doc(TEN, [(1, 3, "SYM"), (6, 8, "BOD")])),
        eg(make_doc("", []), make_doc("", [])),  # empty doc
        eg(make_doc(TEN, [(2, 4, "DIS")]), make_doc(TEN, [])),  # nothing predicted
    ]


def test_nested_strict_per_label_and_macro(nested_examples):
    s = score_spans(nested_examples)
    assert (s.n_docs, s.n_skipped) == (4, 0)
    # gold 5, pred 5 (duplicate collapsed), tp 2
    assert (s.strict.n_gold, s.strict.n_pred, s.strict.pred_hits) == (5, 5, 2)
    approx_prf(s.strict, 0.4, 0.4, 0.4)
    assert sorted(s.per_label) == ["BOD", "DIS", "DRU", "SYM"]
    approx_prf(s.per_label["DIS"], 1 / 2, 1 / 2, 1 / 2)
    approx_prf(s.per_label["SYM"], 1.0, 1 / 2, 2 / 3)
    approx_prf(s.per_label["DRU"], 0.0, 0.0, 0.0)
    approx_prf(s.per_label["BOD"], 0.0, 0.0, 0.0)  # predicted only: in the macro mean
    assert s.macro_p == pytest.approx((0.5 + 1 + 0 + 0) / 4)
    assert s.macro_r == pytest.approx((0.5 + 0.5 + 0 + 0) / 4)
    assert s.macro_f == pytest.approx((0.5 + 2 / 3) / 4)


def test_nested_partial(nested_examples):
    s = score_spans(nested_examples)
    # pred hits: DIS (0,2)+(0,4) overlap gold (0,2); SYM (1,3); DRU (5,8)~(5,7); BOD none -> 4/5
    # gold hits: DIS (0,2) yes, (2,4) no; SYM (0,4) no (no SYM pred in doc 1), (1,3) yes; DRU yes -> 3/5
    assert (s.partial.pred_hits, s.partial.n_pred, s.partial.gold_hits, s.partial.n_gold) == (4, 5, 3, 5)
    approx_prf(s.partial, 0.8, 0.6, 2 * 0.8 * 0.6 / 1.4)
    approx_prf(s.partial_per_label["DIS"], 1.0, 0.5, 2 / 3)
    approx_prf(s.partial_per_label["SYM"], 1.0, 0.5, 2 / 3)
    approx_prf(s.partial_per_label["DRU"], 1.0, 1.0, 1.0)
    approx_prf(s.partial_per_label["BOD"], 0.0, 0.0, 0.0)


def test_partial_is_per_document_and_adjacent_spans_do_not_overlap():
    examples = [
        eg(make_doc(TEN, [(0, 2, "A")]), make_doc(TEN, [(2, 4, "A")])),  # touching, not overlapping
        eg(make_doc(TEN, []), make_doc(TEN, [(0, 2, "A")])),  # same offsets, other doc
    ]
    s = score_spans(examples)
    approx_prf(s.partial, 0.0, 0.0, 0.0)
    # one prediction overlapping two gold spans: 1/1 precision, 2/2 recall
    s = score_spans([eg(make_doc(TEN, [(0, 2, "A"), (3, 5, "A")]), make_doc(TEN, [(1, 4, "A")]))])
    assert (s.partial.pred_hits, s.partial.gold_hits) == (1, 2)
    approx_prf(s.partial, 1.0, 1.0, 1.0)
    approx_prf(s.strict, 0.0, 0.0, 0.0)


def test_no_predictions_and_no_gold_are_zero_not_errors():
    s = score_spans([eg(make_doc(TEN, [(0, 2, "A")]), make_doc(TEN))])  # predicted doc has no group at all
    approx_prf(s.strict, 0.0, 0.0, 0.0)
    approx_prf(s.partial, 0.0, 0.0, 0.0)
    assert s.macro_f == 0.0
    s = score_spans([eg(make_doc(TEN, []), make_doc(TEN, []))])
    approx_prf(s.strict, 0.0, 0.0, 0.0)
    assert s.per_label == {} and s.macro_f == 0.0
    assert score_spans([]).strict.f == 0.0


def test_unannotated_reference_is_skipped_and_counted():
    examples = [
        eg(make_doc(TEN, [(0, 2, "A")], ents=[(0, 2, "A")]), make_doc(TEN, [(0, 2, "A")], ents=[(0, 2, "A")])),
        eg(make_doc(TEN), make_doc(TEN, [(4, 6, "A")], ents=[(4, 6, "A")])),  # gold has neither view
    ]
    for s in (score_spans(examples), score_ents(examples)):
        assert (s.n_docs, s.n_skipped) == (1, 1)
        approx_prf(s.strict, 1.0, 1.0, 1.0)


def test_texts_must_match():
    with pytest.raises(ValueError, match="Example 0"):
        score_spans([eg(make_doc(TEN, []), make_doc("一二三", []))])


# ------------------------------------------------------------------ flat view, other tokenisation


@pytest.fixture
def flat_examples():
    text = "一二三四五六七八"
    gold = make_doc(text, ents=[(0, 2, "A"), (2, 5, "B"), (6, 8, "A")])
    # the prediction is tokenised differently: 一二 | 三四五 | 六七 | 八
    pred = Doc(NLP.vocab, words=["一二", "三四五", "六七", "八"], spaces=[False] * 4)
    pred.ents = [Span(pred, 0, 1, "A"), Span(pred, 1, 2, "A"), Span(pred, 2, 4, "A")]
    return [eg(gold, pred)]


def test_flat_strict_partial_macro_by_character_offsets(flat_examples):
    s = score_ents(flat_examples)
    approx_prf(s.strict, 1 / 3, 1 / 3, 1 / 3)  # only (0,2,A) is exact
    approx_prf(s.per_label["A"], 1 / 3, 1 / 2, 0.4)
    approx_prf(s.per_label["B"], 0.0, 0.0, 0.0)
    assert (s.macro_p, s.macro_r, s.macro_f) == (pytest.approx(1 / 6), pytest.approx(1 / 4), pytest.approx(0.2))
    # partial: A preds (0,2) yes, (2,5) no, (5,8) yes ~ (6,8); gold A 2/2 found, B 0/1
    approx_prf(s.partial, 2 / 3, 2 / 3, 2 / 3)
    approx_prf(s.partial_per_label["A"], 2 / 3, 1.0, 0.8)


def test_char_bio_on_docs(flat_examples):
    gold = flat_examples[0].reference
    assert char_bio_tags(8, [CharSpan(s.start_char, s.end_char, s.label_) for s in gold.ents]) == [
        "B-A", "I-A", "B-B", "I-B", "I-B", "O", "B-A", "I-A"]
    bio = score_char_bio(flat_examples)
    assert (bio.n_gold, bio.n_pred, bio.pred_hits) == (3, 3, 1)
    approx_prf(bio, 1 / 3, 1 / 3, 1 / 3)
    y_true = [["B-A", "I-A", "B-B", "I-B", "I-B", "O", "B-A", "I-A"]]
    y_pred = [["B-A", "I-A", "B-A", "I-A", "I-A", "B-A", "I-A", "I-A"]]
    assert bio.f == pytest.approx(f1_score(y_true, y_pred))
    with pytest.raises(ValueError, match="Overlapping"):
        char_bio_tags(5, [CharSpan(0, 3, "A"), CharSpan(2, 4, "B")])


# ------------------------------------------------------------------ agreement with seqeval

TAG_POOL = ["O", "O", "O", "B-X", "I-X", "B-Y", "I-Y", "E-X", "S-Y", "O-X", "i-X", "b-Y",
            "B", "I", "E", "S", "X", "I-", "B-X-Z", ".", ".-Y", "I-Y"]


def _seqeval(y_true, y_pred):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return precision_score(y_true, y_pred), recall_score(y_true, y_pred), f1_score(y_true, y_pred)


def test_chunks_and_f1_agree_with_seqeval_on_random_malformed_tags():
    rng = random.Random(13)
    for _ in range(600):
        lengths = [rng.randint(0, 10) for _ in range(rng.randint(1, 4))]
        y_true = [[rng.choice(TAG_POOL) for _ in range(n)] for n in lengths]
        y_pred = [[rng.choice(TAG_POOL) for _ in range(n)] for n in lengths]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected_chunks = [(t, s, e + 1) for t, s, e in get_entities(y_true[0])]
        assert conll_chunks(y_true[0]) == expected_chunks, y_true[0]
        ours = score_bio(y_true, y_pred)
        assert (ours.p, ours.r, ours.f) == pytest.approx(_seqeval(y_true, y_pred)), (y_true, y_pred)


@pytest.mark.parametrize(
    "y_true,y_pred",
    [
        # ROCLING-style defects: O-X, lower-case prefix, I- without B-
        ([["O-SYMP", "I-SYMP", "I-SYMP", "O"]], [["B-SYMP", "I-SYMP", "I-SYMP", "O"]]),
        ([["i-CHEM", "I-CHEM", "O"]], [["B-CHEM", "I-CHEM", "O"]]),
        ([["I-DISE", "I-DISE", "B-DISE"]], [["B-DISE", "I-DISE", "B-DISE"]]),
        # a chunk never crosses the boundary between sequences
        ([["O", "B-A"], ["I-A", "O"]], [["O", "B-A"], ["B-A", "O"]]),
        ([["O", "O"]], [["O", "O"]]),  # nothing anywhere
        ([["B-A", "O"]], [["O", "O"]]),  # no predictions
    ],
)
def test_handmade_bio_agrees_with_seqeval(y_true, y_pred):
    ours = score_bio(y_true, y_pred)
    assert (ours.p, ours.r, ours.f) == pytest.approx(_seqeval(y_true, y_pred))


def test_handmade_bio_values():
    # 'I-SYMP' after 'O-SYMP' opens a chunk at 1, as conlleval does
    assert conll_chunks(["O-SYMP", "I-SYMP", "I-SYMP", "O"]) == [("SYMP", 1, 3)]
    assert conll_chunks(["I-DISE", "I-DISE", "B-DISE"]) == [("DISE", 0, 2), ("DISE", 2, 3)]
    prf = score_bio([["O", "B-A"], ["I-A", "O"]], [["O", "B-A"], ["B-A", "O"]])
    assert (prf.n_gold, prf.n_pred, prf.pred_hits) == (2, 2, 2)
    with pytest.raises(ValueError):
        score_bio([["O"]], [["O", "O"]])


# ------------------------------------------------------------------ error taxonomy


@pytest.fixture
def taxonomy_examples():
    gold1 = make_doc(TEN, [(0, 4, "SYM"), (0, 2, "DIS"), (5, 7, "DRU"), (8, 10, "BOD")])
    pred1 = make_doc(TEN, [
        (0, 2, "DIS"),  # TP
        (0, 4, "DIS"),  # (1) same span as SYM gold; also overlaps DIS gold: (1) wins
        (5, 8, "DRU"),  # (2) +1 against (5,7)
        (6, 7, "DRU"),  # (2) -1 against (5,7)
        (3, 6, "BOD"),  # (3) overlaps SYM (0,4) and DRU (5,7)
        (1, 3, "SYM"),  # (2) -2 against (0,4); also overlaps DIS (0,2): (2) wins over (3)
    ])
    gold2 = make_doc("甲乙丙丁", [(0, 2, "DIS")])
    pred2 = make_doc("甲乙丙丁", [(2, 4, "DIS")])  # (4): touching is not overlapping
    return [eg(gold1, pred1), eg(gold2, pred2)]


def test_taxonomy_categories_and_histogram(taxonomy_examples):
    r = error_taxonomy(taxonomy_examples)
    assert (r.n_gold, r.n_pred, r.tp, r.n_docs) == (5, 7, 1, 2)
    assert dict(r.fp) == {"same_span_wrong_type": 1, "overlap_right_type": 3, "overlap_wrong_type": 1, "no_overlap": 1}
    assert sum(r.fp.values()) == r.n_pred - r.tp
    # FN: SYM (0,4) and DRU (5,7) are overlapped; BOD (8,10) and doc 2's DIS are missed
    assert dict(r.fn) == {"overlapped": 2, "missed": 2}
    assert dict(r.boundary_diffs) == {1: 1, -1: 1, -2: 1}
    assert {lab: dict(c) for lab, c in r.fp_per_label.items()} == {
        "DIS": {"same_span_wrong_type": 1, "no_overlap": 1},
        "DRU": {"overlap_right_type": 2},
        "BOD": {"overlap_wrong_type": 1},
        "SYM": {"overlap_right_type": 1},
    }
    by_span = {(c.doc, c.start, c.end, c.label): c for c in r.false_positives}
    assert by_span[(0, 0, 4, "DIS")].other == CharSpan(0, 4, "SYM")
    assert by_span[(0, 1, 3, "SYM")].other == CharSpan(0, 4, "SYM")
    # tie between SYM (0,4) and DRU (5,7): one shared character and length difference 1 each
    assert by_span[(0, 3, 6, "BOD")].other == CharSpan(0, 4, "SYM")
    assert by_span[(0, 3, 6, "BOD")].text == "四五六"
    assert by_span[(1, 2, 4, "DIS")].other is None
    fn = {(c.doc, c.start, c.end): c for c in r.false_negatives}
    assert fn[(0, 0, 4)].other == CharSpan(0, 4, "DIS")  # the prediction sharing the most characters
    assert fn[(0, 8, 10)].category == "missed"
    approx_prf(r.strict, 1 / 7, 1 / 5, 2 * (1 / 7) * (1 / 5) / (1 / 7 + 1 / 5))
    text = render_error_report(r)
    for needle in ("(1) same span, wrong type", "(4) no overlap", "missed entirely", "+1", "-2"):
        assert needle in text
    json.dumps(r.to_dict())


def test_taxonomy_partitions_random_errors():
    rng = random.Random(5)
    labels = ["A", "B", "C"]

    def rand_spans():
        out = []
        for _ in range(rng.randint(0, 6)):
            s = rng.randint(0, 9)
            out.append((s, rng.randint(s + 1, 10), rng.choice(labels)))
        return out

    examples = [eg(make_doc(TEN, rand_spans()), make_doc(TEN, rand_spans())) for _ in range(200)]
    r = error_taxonomy(examples)
    s = score_spans(examples)
    assert (r.n_pred, r.n_gold, r.tp) == (s.strict.n_pred, s.strict.n_gold, s.strict.pred_hits)
    assert sum(r.fp.values()) == r.n_pred - r.tp == len(r.false_positives)
    assert sum(r.fn.values()) == r.n_gold - r.tp == len(r.false_negatives)
    assert sum(r.boundary_diffs.values()) == r.fp["overlap_right_type"]
    assert all(r.fp[k] > 0 for k in r.fp) and len(r.fp) == 4


# ------------------------------------------------------------------ scorer and CLI


def test_registered_scorer_keys_and_values(nested_examples, flat_examples):
    from importlib.metadata import entry_points

    assert "spacy_medllm.span_scorer.v1" in {ep.name for ep in entry_points(group="spacy_scorers")}
    scorer = registry.scorers.get("spacy_medllm.span_scorer.v1")(spans_key="sc")
    scores = scorer(nested_examples)
    for key in ("spans_sc_p", "spans_sc_r", "spans_sc_f", "spans_sc_per_type", "spans_sc_partial_p",
                "spans_sc_partial_r", "spans_sc_partial_f", "spans_sc_partial_per_type", "spans_sc_macro_p",
                "spans_sc_macro_r", "spans_sc_macro_f", "ents_p", "ents_r", "ents_f", "ents_per_type",
                "ents_partial_f", "ents_macro_f", "ents_char_bio_p", "ents_char_bio_r", "ents_char_bio_f"):
        assert key in scores
    assert scores["spans_sc_f"] == pytest.approx(0.4)
    assert scores["spans_sc_partial_f"] == pytest.approx(2 * 0.8 * 0.6 / 1.4)
    assert scores["spans_sc_macro_f"] == pytest.approx((0.5 + 2 / 3) / 4)
    assert scores["spans_sc_per_type"]["SYM"] == pytest.approx({"p": 1.0, "r": 0.5, "f": 2 / 3})
    flat = score_examples(flat_examples)
    assert flat["ents_f"] == pytest.approx(1 / 3) and flat["ents_char_bio_f"] == pytest.approx(1 / 3)
    assert flat["ents_partial_f"] == pytest.approx(2 / 3)
    other = registry.scorers.get("spacy_medllm.span_scorer.v1")(spans_key="nested")
    assert "spans_nested_f" in other([eg(make_doc(TEN, [(0, 2, "A")], key="nested"),
                                         make_doc(TEN, [(0, 2, "A")], key="nested"))])


def _write_docbin(path, docs):
    DocBin(docs=docs).to_disk(path)


def _run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "spacy", *args], capture_output=True, text=True, cwd=cwd)


def test_errors_cli(tmp_path, taxonomy_examples):
    _write_docbin(tmp_path / "gold.spacy", [e.reference for e in taxonomy_examples])
    _write_docbin(tmp_path / "pred.spacy", [e.predicted for e in taxonomy_examples])
    res = _run("medllm", "errors", "gold.spacy", "pred.spacy", "--output", "errors.json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr + res.stdout
    assert "(2) overlapping span, right type" in res.stdout and "spans['sc'] partial" in res.stdout
    data = json.loads((tmp_path / "errors.json").read_text(encoding="utf8"))
    assert data["errors"]["fp"] == {"same_span_wrong_type": 1, "overlap_right_type": 3,
                                    "overlap_wrong_type": 1, "no_overlap": 1}
    assert data["errors"]["fn"] == {"overlapped": 2, "missed": 2}
    assert data["errors"]["boundary_diffs"] == {"-2": 1, "-1": 1, "1": 1}
    assert data["scores"]["spans_sc_p"] == pytest.approx(1 / 7)
    # a mismatched prediction file is a clear error
    _write_docbin(tmp_path / "bad.spacy", [make_doc("甲乙丙丁", []), make_doc(TEN, [])])
    res = _run("medllm", "errors", "gold.spacy", "bad.spacy", cwd=tmp_path)
    assert res.returncode == 1 and "texts differ" in res.stdout


def test_errors_cli_scores_another_predicted_group(tmp_path, taxonomy_examples):
    """--pred-key: one generator's group of an ensemble against the gold sc group."""
    preds = []
    for e in taxonomy_examples:
        doc = e.predicted.copy()
        # generator a: exactly the gold
        doc.spans["sc_a"] = [doc.char_span(s.start_char, s.end_char, s.label_) for s in e.reference.spans["sc"]]
        doc.spans["sc"] = []
        preds.append(doc)
    _write_docbin(tmp_path / "gold.spacy", [e.reference for e in taxonomy_examples])
    _write_docbin(tmp_path / "pred.spacy", preds)
    res = _run("medllm", "errors", "gold.spacy", "pred.spacy", "--pred-key", "sc_a", "-o", "a.json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr + res.stdout
    scores = json.loads((tmp_path / "a.json").read_text(encoding="utf8"))["scores"]
    assert scores["spans_sc_p"] == scores["spans_sc_r"] == 1.0
    res = _run("medllm", "errors", "gold.spacy", "pred.spacy", "--pred-key", "sc_z", cwd=tmp_path)
    assert res.returncode == 1 and "sc_z" in res.stdout


def test_examples_from_docs_checks_count():
    with pytest.raises(ValueError, match="1 gold docs but 0 predicted"):
        examples_from_docs([make_doc(TEN)], [])


ORACLE_CODE = '''
from spacy.language import Language
from spacy.tokens import Span
from spacy_medllm.spans import set_spans

@Language.factory("test_symptom_oracle", default_config={"scorer": {"@scorers": "spacy_medllm.span_scorer.v1"}})
def make_oracle(nlp, name, scorer):
    return SymptomOracle(scorer)

class SymptomOracle:
    """Marks every 头痛 as SYM and every 发 as SYM (a wrong one-character guess)."""
    def __init__(self, scorer):
        self.scorer = scorer
    def __call__(self, doc):
        spans = [Span(doc, i, i + 2, "SYM") for i in range(len(doc) - 1) if doc[i:i + 2].text == "头痛"]
        spans += [Span(doc, t.i, t.i + 1, "SYM") for t in doc if t.text == "发"]
        set_spans(doc, spans, "sc")
        return doc
    def score(self, examples, **kwargs):
        return self.scorer(examples, **kwargs)
'''


def test_spacy_evaluate_prints_our_figures(tmp_path):
    (tmp_path / "oracle.py").write_text(ORACLE_CODE, encoding="utf8")
    nlp = spacy.blank("zh")
    sys.path.insert(0, str(tmp_path))
    try:
        import oracle  # noqa: F401
        nlp.add_pipe("test_symptom_oracle")
    finally:
        sys.path.remove(str(tmp_path))
    nlp.to_disk(tmp_path / "model")
    # gold: 头痛 (0,2,SYM) and 发热 (3,5,SYM); the oracle finds 头痛 and the partial 发 -> P 1/2, R 1/2
    gold = NLP("头痛伴发热")
    spans = [Span(gold, 0, 2, "SYM"), Span(gold, 3, 5, "SYM")]
    gold.spans["sc"] = spans
    gold.ents = spans
    _write_docbin(tmp_path / "dev.spacy", [gold])
    res = _run("evaluate", "model", "dev.spacy", "--code", "oracle.py", "--output", "m.json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr + res.stdout
    for needle in ("NER P", "NER F", "SPAN P", "SPAN F", "NER (per type)", "SPANS (per type)"):
        assert needle in res.stdout
    data = json.loads((tmp_path / "m.json").read_text(encoding="utf8"))
    assert data["spans_sc_f"] == pytest.approx(0.5) and data["ents_f"] == pytest.approx(0.5)
    assert data["spans_sc_partial_f"] == pytest.approx(1.0) and data["ents_char_bio_f"] == pytest.approx(0.5)
    # the partial figures take the SPAN rows with --spans-key sc_partial
    res = _run("evaluate", "model", "dev.spacy", "--code", "oracle.py", "--spans-key", "sc_partial", cwd=tmp_path)
    assert res.returncode == 0, res.stderr + res.stdout
    span_f = [line for line in res.stdout.splitlines() if line.startswith("SPAN F")]
    assert span_f and span_f[0].split()[-1] == "100.00"
