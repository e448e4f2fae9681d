"""Predicted docs serialise: DocBin with user data, multiprocessing, `spacy apply`."""
import subprocess
import sys

import spacy
import torch
from spacy.tokens import DocBin

from spacy_medllm.types import Mention, read_mentions

torch.set_num_threads(1)

TEXTS = ["患者出现发热、咳嗽，胸部CT提示肺炎。", "给予阿莫西林治疗。", "", "血常规检查未见异常。"]


def spans(doc):
    return [(s.start_char, s.end_char, s.label_) for s in doc.spans["sc"]], [(e.start_char, e.end_char, e.label_) for e in doc.ents]


def test_docs_round_trip_through_docbin_with_user_data(saved):
    nlp = spacy.load(saved)
    docs = list(nlp.pipe(TEXTS))
    assert any(doc.spans["sc"] for doc in docs), "the embedded model should find something here"
    data = DocBin(docs=docs, store_user_data=True).to_bytes()
    back = list(DocBin().from_bytes(data).get_docs(nlp.vocab))
    for doc, again in zip(docs, back):
        assert spans(again) == spans(doc)
        # msgpack gives lists back as tuples: compare the typed view
        assert read_mentions(again._.llm_mentions["medllm_ner"]) == read_mentions(doc._.llm_mentions["medllm_ner"])
        assert list(again.spans["sc"].attrs["scores"]) == list(doc.spans["sc"].attrs["scores"])
        assert all(isinstance(m, Mention) for m in read_mentions(again._.llm_mentions["medllm_ner"]))
    assert docs[0].to_bytes() and spacy.tokens.Doc(nlp.vocab).from_bytes(docs[0].to_bytes()).text == TEXTS[0]


def test_two_processes_give_the_spans_of_one(saved):
    nlp = spacy.load(saved)
    one = [spans(d) for d in nlp.pipe(TEXTS, n_process=1)]
    two = [spans(d) for d in nlp.pipe(TEXTS, n_process=2, batch_size=2)]
    assert two == one


def test_spacy_apply_on_a_saved_pipeline(saved, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join('{"text": "%s"}' % t for t in TEXTS if t), encoding="utf8")
    out = tmp_path / "out.spacy"
    run = subprocess.run(
        [sys.executable, "-m", "spacy", "apply", str(saved), str(source), str(out), "--text-key", "text"],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    nlp = spacy.load(saved)
    applied = list(DocBin().from_disk(out).get_docs(nlp.vocab))
    assert [spans(d) for d in applied] == [spans(d) for d in nlp.pipe(t for t in TEXTS if t)]
    assert all("medllm_ner" in d._.llm_mentions for d in applied)


def test_visualize_draws_documents_without_spans_quietly(saved, tmp_path):
    source = tmp_path / "in.spacy"
    nlp = spacy.load(saved)
    DocBin(docs=[nlp.make_doc("。"), nlp.make_doc("患者发热。")]).to_disk(source)
    out = tmp_path / "page.html"
    run = subprocess.run([sys.executable, "-m", "spacy", "medllm", "visualize", str(saved), str(source), str(out), "--with-gold"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "W117" not in run.stderr, run.stderr[-3000:]
    html = out.read_text(encoding="utf8")
    assert "1 predicted" in html and "2 predicted" in html


def test_first_document_comes_back_after_one_component_batch(saved):
    """nlp.pipe's batch_size (1,000 by default) does not make the first answer wait for 1,000 docs."""
    nlp = spacy.load(saved)
    pulled = []

    def texts():
        for i in range(200):
            pulled.append(i)
            yield TEXTS[i % 2]

    first = next(iter(nlp.pipe(texts())))
    assert first.text == TEXTS[0]
    assert len(pulled) <= nlp.get_pipe("medllm_ner").batch_size + 1


def test_predict_shows_progress_and_keeps_the_mentions(saved, tmp_path):
    nlp = spacy.load(saved)
    source, out = tmp_path / "in.spacy", tmp_path / "out.spacy"
    DocBin(docs=[nlp.make_doc(t) for t in TEXTS[:2]]).to_disk(source)
    run = subprocess.run([sys.executable, "-m", "spacy", "medllm", "predict", str(saved), str(source), str(out), "--threads", "1"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "2/2" in run.stderr and "doc/s" in run.stderr  # the progress bar
    assert "medllm_ner: " in run.stdout and "prompts 18" in run.stdout  # the summary counts
    predicted = list(DocBin().from_disk(out).get_docs(nlp.vocab))
    assert [spans(d) for d in predicted] == [spans(d) for d in nlp.pipe(TEXTS[:2])]
    assert all("medllm_ner" in d._.llm_mentions for d in predicted)
