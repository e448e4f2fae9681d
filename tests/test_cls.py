"""The LLM-CLS filter: its data, classifier, trainer, component and calibration."""
import shutil
from collections import Counter

import pytest
import spacy
import torch
from spacy.language import Language
from spacy.tokens import Doc
from spacy.training import Example

from spacy_medllm.components.cls import MedLLMClassifierFilter, best_threshold, calibrate
from spacy_medllm.llm.cls_head import MARKERS, ClassifierSettings, SpanClassifier, load_classifier
from spacy_medllm.llm.loader import ModelSpec, load_lm
from spacy_medllm.llm.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_model, init_tiny
from spacy_medllm.spans import flat_view
from spacy_medllm.training.cls_data import (
    ClsRecord,
    build_cls_data,
    doc_candidates,
    read_cls_records,
    sample_records,
    write_cls_records,
)
from spacy_medllm.training.cls_train import (
    evaluate_classifier,
    make_encoder_classifier,
    make_llm_classifier,
    make_tiny_llm_classifier,
    train_classifier,
)
from spacy_medllm.training.sft import LoraSettings, SFTConfig

torch.set_num_threads(1)
TEXT = "患者高热头痛。无呕吐。"
GOLD = [(2, 4, "sym"), (4, 6, "sym"), (2, 6, "sym"), (2, 4, "dis"), (8, 10, "sym")]
LABELS = {"sym": "临床表现", "dis": "疾病"}
TINY = dict(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, max_length=48)


def make_doc(nlp, text=TEXT, spans=GOLD, sents=(0, 7)):
    doc = nlp.make_doc(text)
    for token in doc:
        token.is_sent_start = token.idx in sents
    doc.spans["sc"] = [doc.char_span(s, e, label) for s, e, label in spans]
    return doc


@pytest.fixture(scope="module")
def nlp():
    return spacy.blank("zh")


def keys(records):
    return {(r.start, r.end, r.label) for r in records}


def test_negatives_hand_case(nlp):
    doc = make_doc(nlp)
    cands = doc_candidates(doc, ["sym", "dis"])
    sent1, sent2 = "患者高热头痛。", "无呕吐。"
    # each record holds its sentence, offsets relative to it
    assert {(r.text, r.start, r.end, r.label) for r in cands.positives} == {
        (sent1, 2, 4, "sym"), (sent1, 4, 6, "sym"), (sent1, 2, 6, "sym"), (sent1, 2, 4, "dis"), (sent2, 1, 3, "sym")
    }
    assert all(r.is_correct and r.kind == "gold" for r in cands.positives)
    shift = {(r.text, r.start, r.end, r.label) for r in cands.negatives["shift"]}
    # sentence 1 (chars 0-7), sym: from 高热 (2,4) start -2,-1,+1, end -1,+1 (end +2 = 高热头痛 is
    # gold); from 头痛 (4,6) start -1,+1 (-2 is gold), end -1,+1 (+2 leaves the sentence); from
    # 高热头痛 (2,6) start -2,-1 (+1 made already, +2 = 头痛 is gold), end +1 (-2 = 高热 is gold)
    sym = [(0, 4), (1, 4), (3, 4), (2, 3), (2, 5), (3, 6), (5, 6), (4, 5), (4, 7), (0, 6), (1, 6), (2, 7)]
    # dis: from 高热 (2,4) the same five; its end +2 (2,6,dis) is already a type change
    dis = [(0, 4), (1, 4), (3, 4), (2, 3), (2, 5)]
    expected = {(sent1, s, e, "sym") for s, e in sym} | {(sent1, s, e, "dis") for s, e in dis}
    # sentence 2, offsets relative to it: 呕吐 (1,3) start -1,+1, end -1,+1 (the rest leaves it)
    expected |= {(sent2, s, e, "sym") for s, e in [(0, 3), (2, 3), (1, 2), (1, 4)]}
    assert shift == expected
    types = keys(cands.negatives["type"])
    # 高热 is gold as both sym and dis: no type change; the others become dis
    assert types == {(4, 6, "dis"), (2, 6, "dis"), (1, 3, "dis")}
    assert {r.kind for r in cands.negatives["type"]} == {"type"}
    for records in cands.negatives.values():
        for r in records:  # never a gold entity (offsets back in the doc)
            offset = {sent1: 0, sent2: 7}[r.text]
            assert not r.is_correct and (r.start + offset, r.end + offset, r.label) not in set(GOLD)


def test_negatives_mined_and_whitespace():
    en = spacy.blank("en")
    doc = make_doc(en, "a fever now", [(2, 7, "sym")], sents=(0,))
    pred = make_doc(en, "a fever now", [(2, 7, "sym"), (0, 7, "sym"), (2, 7, "dis")], sents=(0,))
    stats = Counter()
    cands = doc_candidates(doc, ["sym", "dis"], predicted=pred.spans["sc"], stats=stats)
    assert keys(cands.negatives["mined"]) == {(0, 7, "sym"), (2, 7, "dis")}
    assert stats["mined_correct"] == 1
    # the type change equal to a mined one is kept once, as mined
    assert keys(cands.negatives["type"]) == set()
    # a boundary may not sit on a space: " fever" (1,7) and "fever " (2,8) are not candidates
    # (0,7) "a fever" is a start shift too, but already mined
    assert keys(cands.negatives["shift"]) == {(3, 7, "sym"), (4, 7, "sym"), (2, 6, "sym"), (2, 5, "sym"), (2, 9, "sym")}
    other = make_doc(en, "another text", [], sents=(0,))
    stats = Counter()
    build_cls_data([doc], ["sym", "dis"], size=10, predicted_docs=[other], stats=stats)
    assert stats["mined_text_mismatch"] == 1


def test_sampling_balanced_seeded():
    pos = [ClsRecord("x" * 50, i, i + 1, "a", True, "gold") for i in range(40)]
    neg = {
        "shift": [ClsRecord("x" * 50, i, i + 2, "a", False, "shift") for i in range(40)],
        "type": [ClsRecord("x" * 50, i, i + 1, "b", False, "type") for i in range(5)],
        "mined": [],
    }
    a = sample_records(pos, neg, size=40, neg_ratio=1.0, seed=3)
    assert a == sample_records(pos, neg, size=40, neg_ratio=1.0, seed=3)
    assert a != sample_records(pos, neg, size=40, neg_ratio=1.0, seed=4)
    kinds = Counter(r.kind for r in a)
    assert kinds == {"gold": 20, "shift": 15, "type": 5}  # the short kind gives its share away
    b = sample_records(pos, neg, size=1000, neg_ratio=0.5, seed=0)
    assert Counter(r.is_correct for r in b) == {True: 40, False: 20}
    # too few negatives: positives are cut to keep the ratio
    c = sample_records(pos, {"shift": neg["type"]}, size=100, neg_ratio=1.0, seed=0)
    assert Counter(r.is_correct for r in c) == {True: 5, False: 5}


def test_records_file_round_trip_and_bad_lines(tmp_path):
    records = [ClsRecord(TEXT, 2, 4, "sym", True, "gold"), ClsRecord(TEXT, 1, 4, "sym", False, "shift")]
    path = tmp_path / "cls.jsonl"
    write_cls_records(records, path)
    with path.open("a", encoding="utf8") as f:
        f.write('{"text": "abc", "start": 2, "end": 9, "label": "x", "is_correct": true, "kind": "gold"}\n')
        f.write("not json\n")
    stats = Counter()
    assert read_cls_records(path, stats) == records
    assert stats["bad_lines"] == 2


def toy_records(n=64):
    """Two kinds of candidate the classifier must tell apart by their boundaries."""
    out = []
    for i in range(n):
        text = ["患者出现高热和头痛症状", "无呕吐及腹泻"][i % 2]
        good, bad = ((4, 6), (3, 6)) if i % 2 == 0 else ((1, 3), (1, 4))
        s, e = good if (i // 2) % 2 == 0 else bad
        out.append(ClsRecord(text, s, e, "sym", (s, e) == good, "gold" if (s, e) == good else "shift"))
    return out


def config(**kwargs):
    settings = dict(learning_rate=1e-3, batch_size=8, epochs=2, warmup_ratio=0.0, log_every=1000, progress_bar=False)
    settings.update(kwargs)
    return SFTConfig(**settings)


def test_tiny_llm_classifier_markers_training_and_round_trip(tmp_path, capsys):
    records = toy_records()
    result = train_classifier(make_tiny_llm_classifier(**TINY), records, records[:16], LABELS, config(epochs=5, progress_bar=True), tmp_path)
    assert "100%" in capsys.readouterr().err  # the progress bar
    clf = result.classifier
    # markers: special tokens after the base vocabulary, each with a trained embedding row
    open_id, close_id = clf.tokenizer.convert_tokens_to_ids(list(MARKERS))
    assert (open_id, close_id) == (clf.base_vocab, clf.base_vocab + 1) and len(clf.tokenizer) == clf.base_vocab + 2
    assert clf.extra_embeddings.shape == (2, 32) and any(p is clf.extra_embeddings for p in clf.trainable_parameters())
    ids, pos = clf.encode("患者出现高热", 4, 6, "sym")
    assert clf.tokenizer.decode(ids) == "临床表现\n患者出现<ent>高热</ent>"
    assert ids[pos] == close_id
    # loss falls
    first, last = result.losses[:5], result.losses[-5:]
    assert sum(last) / 5 < sum(first) / 5 - 0.2
    assert (tmp_path / "model-best" / "head.safetensors").exists() and (tmp_path / "log.jsonl").exists()
    assert [e["epoch"] for e in result.evaluations] == [1, 2, 3, 4, 5]
    # save / load: identical probabilities
    cands = [(r.text, r.start, r.end, r.label) for r in records[:8]]
    loaded = load_classifier(result.model_last)
    assert loaded.predict_proba(cands, 4) == pytest.approx(clf.predict_proba(cands, 4), abs=1e-6)
    assert evaluate_classifier(loaded, records[:16])["acc"] == result.evaluations[-1]["eval"]["acc"]


def test_markers_use_their_own_rows_on_a_padded_vocabulary():
    tokenizer = build_char_tokenizer("患者高热")
    n_tokens = len(tokenizer)
    model = build_tiny_model(tokenizer, TinyModelConfig(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64))
    model.resize_token_embeddings(n_tokens + 6)  # spare rows, as real checkpoints have
    clf = SpanClassifier(model, tokenizer, ClassifierSettings(labels=LABELS))
    assert (clf.open_id, clf.close_id) == (n_tokens, n_tokens + 1) and clf.extra_embeddings.shape[0] == 2
    inputs = clf.collate([clf.encode("患者高热", 2, 4, "sym")])
    before = clf(**inputs)
    with torch.no_grad():
        clf.extra_embeddings[1] += 1.0  # the closing marker's row
    assert not torch.allclose(before, clf(**inputs))


def test_encoder_baseline_learns(tmp_path):
    records = toy_records()
    result = train_classifier(
        make_encoder_classifier(hidden=64, layers=2, heads=2, intermediate=128, max_length=48, dropout=0.0),
        records, records, LABELS, config(learning_rate=3e-3, epochs=4), tmp_path,
    )
    assert result.classifier.settings.kind == "encoder"
    assert result.classifier.encode("无呕吐", 1, 3, "sym")[1] == 0  # [CLS]
    assert result.evaluations[-1]["eval"]["acc"] == 1.0
    assert result.best_step == 24  # the first evaluation at accuracy 1.0; a tie does not replace it
    loaded = load_classifier(result.model_last)
    cands = [(r.text, r.start, r.end, r.label) for r in records[:6]]
    assert loaded.predict_proba(cands) == pytest.approx(result.classifier.predict_proba(cands), abs=1e-6)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cls")
    records = toy_records()
    train_classifier(make_tiny_llm_classifier(**TINY), records, records[:16], LABELS, config(epochs=3), path)
    return path / "model-best"


def test_component_filters_and_round_trips(nlp, trained_dir, tmp_path):
    pipe_nlp = spacy.blank("zh")
    flt = pipe_nlp.add_pipe("medllm_cls", config={"model": str(trained_dir), "batch_size": 2})
    assert isinstance(flt, MedLLMClassifierFilter)
    spans = [(4, 6, "sym"), (3, 6, "sym"), (4, 5, "dis"), (0, 2, "sym")]

    def fresh(n=pipe_nlp):
        doc = make_doc(n, "患者出现高热和头痛症状", spans, sents=(0,))
        doc.spans["sc"].attrs["scores"] = [0.9, 0.8, 0.7, 0.6]
        return doc

    probs = flt.score_docs([fresh()])[0]
    assert len(probs) == 4 and len(set(probs)) == 4
    flt.threshold = sorted(probs)[1]  # drops exactly the least likely span
    doc = pipe_nlp(fresh())
    kept = [i for i, p in enumerate(probs) if p >= flt.threshold]
    assert len(kept) == 3
    group = doc.spans["sc"]
    assert [(s.start_char, s.end_char, s.label_) for s in group] == [spans[i] for i in kept]
    assert group.attrs["scores"] == pytest.approx([probs[i] for i in kept])
    assert group.attrs["generator_scores"] == pytest.approx([[0.9, 0.8, 0.7, 0.6][i] for i in kept])
    assert list(doc.ents) == flat_view(list(group), "longest")
    # a doc without the group passes untouched
    assert "sc" not in pipe_nlp("没有候选").spans
    # to_disk / spacy.load: the classifier is copied into the pipeline
    pipe_nlp.get_pipe_config("medllm_cls")["threshold"] = flt.threshold
    pipe_nlp.to_disk(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "medllm_cls" / "head.safetensors").exists()
    reloaded = spacy.load(tmp_path / "pipe")
    doc2 = reloaded(fresh(reloaded))
    assert doc2.spans["sc"].attrs["scores"] == pytest.approx(group.attrs["scores"], abs=1e-6)
    assert [s.text for s in doc2.ents] == [s.text for s in doc.ents]


def test_best_threshold_by_hand():
    # keep >= 0.9: P 1/1 R 1/3 F .5; >= 0.8: F 2/5; >= 0.6: P 2/3 R 2/3 F .667; >= 0.3: F 4/7
    threshold, f = best_threshold([(0.9, True), (0.8, False), (0.6, True), (0.3, False)], n_gold=3)
    assert threshold == pytest.approx(0.45) and f == pytest.approx(2 / 3)
    # keeping everything is best: midpoint between the lowest probability and 0
    assert best_threshold([(0.4, True), (0.2, True)], n_gold=2) == (pytest.approx(0.1), pytest.approx(1.0))
    with pytest.raises(ValueError):
        best_threshold([], 1)


@Language.component("test_cls_candidates")
def _candidates(doc: Doc) -> Doc:
    doc.spans["sc"] = [doc.char_span(s, e, label) for s, e, label in [(0, 2, "sym"), (2, 4, "sym"), (2, 3, "dis"), (4, 6, "sym")]]
    return doc


def test_calibrate_pipeline_and_component(capsys):
    nlp = spacy.blank("zh")
    nlp.add_pipe("test_cls_candidates")
    flt = nlp.add_pipe("medllm_cls", config={"threshold": 0.7})
    fixed = [0.9, 0.8, 0.6, 0.3]
    flt.score_docs = lambda docs: [fixed for _ in docs]  # the hand case of test_best_threshold
    gold = make_doc(nlp, "患者高热头痛", [(0, 2, "sym"), (2, 3, "dis"), (1, 3, "sym")], sents=(0,))
    examples = [Example(nlp.make_doc(gold.text), gold)]
    result = calibrate(nlp, examples, progress=True)
    bar = capsys.readouterr().err
    assert "calibrate: 100%" in bar and "1/1" in bar
    assert result.threshold == pytest.approx(0.45)
    # kept 0.9 (gold), 0.8, 0.6 (gold) of 3 gold; without the filter also 0.3
    assert result.filtered == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert result.unfiltered == pytest.approx((2 / 4, 2 / 3, 4 / 7))
    assert (result.n_candidates, result.n_kept, result.n_gold) == (4, 3, 3)
    assert flt.threshold == 0.7  # left unchanged
    predicted = _candidates(nlp.make_doc(gold.text))
    assert calibrate(flt, [Example(predicted, gold)]) == result
    # a generator that predicts nothing leaves the threshold as it is, nothing to raise
    empty = calibrate(flt, [Example(nlp.make_doc(gold.text), gold)])
    assert (empty.threshold, empty.n_candidates, empty.n_gold, empty.filtered) == (0.7, 0, 3, (0.0, 0.0, 0.0))


def test_qlora_classifier_on_cpu_shares_the_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(r.text for r in toy_records()), encoding="utf8")
    init_tiny(tmp_path / "base", [corpus], TinyModelConfig(hidden=64, layers=1, heads=2, kv_heads=1, intermediate=128))
    spec = ModelSpec(path=str(tmp_path / "base"), device="cpu", quantization="4bit")
    build = make_llm_classifier(
        spec, method="qlora", lora=LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj")),
        max_length=48,
    )
    records = toy_records(32)
    result = train_classifier(build, records, records[:8], LABELS, config(max_steps=6, epochs=1), tmp_path / "out")
    clf = result.classifier
    assert any(type(m).__name__ == "Linear4bit" for m in clf.model.modules())
    trainable = {n for n, p in clf.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)  # the 4-bit base stays frozen
    assert all(torch.isfinite(torch.tensor(result.losses)))
    saved = result.model_last
    assert (saved / "adapter" / "adapter_config.json").exists() and not (saved / "model").exists()
    assert not (saved / "adapter" / "tokenizer.json").exists()  # the loader must not resize the shared base
    cands = [(r.text, r.start, r.end, r.label) for r in records[:6]]
    expected = clf.predict_proba(cands)
    shutil.copytree(saved, tmp_path / "second")
    one, two = load_classifier(saved), load_classifier(tmp_path / "second")
    assert one.lm is two.lm is load_lm(spec)  # one base in memory, two adapters on it
    assert {one.adapter, two.adapter} <= set(one.lm.adapters) and one.adapter != two.adapter
    assert one.predict_proba(cands) == pytest.approx(expected, abs=1e-5)
    assert two.predict_proba(cands) == pytest.approx(expected, abs=1e-5)
    # a generator configured with the same base shares that copy
    nlp = spacy.blank("zh")
    model = {"@misc": "spacy_medllm.ModelSpec.v1", "path": str(tmp_path / "base"), "device": "cpu", "quantization": "4bit"}
    ner = nlp.add_pipe("medllm_ner", config={"model": model})
    flt = nlp.add_pipe("medllm_cls", config={"model": str(saved)})
    assert ner.lm is flt.classifier.lm is one.lm
