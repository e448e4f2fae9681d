"""`predict` on a corpus: sharded input with bad lines, one whole shard per block, resuming a
killed run, the single `.spacy` output, and Ray Data writing the very shards of a local run."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import spacy
import torch
from spacy.tokens import DocBin

from spacy_medllm.cli.predict import predict_corpus, print_summary
from spacy_medllm.errors import CorpusError

torch.set_num_threads(1)  # as the Ray actors (one CPU each): the same arithmetic, the same bytes

ASSETS = Path(__file__).resolve().parents[1] / "assets"
BLOCK = 8
SHARDS = ["b.txt.00000", "b.txt.00001", "notes__a.jsonl.00000", "notes__a.jsonl.00001", "notes__a.jsonl.00002"]


@pytest.fixture(scope="module")
def texts():
    return [r["text"] for r in json.loads((ASSETS / "cmeee_dev.json").read_text(encoding="utf8"))[:30]]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, texts):
    """30 documents in two files: a JSONL of 20 (with an "id") and 3 bad lines at lines
    4-6, in a subfolder, and a text file of 10."""
    folder = tmp_path_factory.mktemp("corpus") / "in"
    (folder / "notes").mkdir(parents=True)
    lines = [json.dumps({"text": t, "id": i}, ensure_ascii=False) for i, t in enumerate(texts[:20])]
    lines[3:3] = ['{"text": "患者发热', '{"id": 99}', '{"text": 5}']
    (folder / "notes" / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf8")
    (folder / "b.txt").write_text("\n".join(texts[20:]) + "\n", encoding="utf8")
    return folder


@pytest.fixture(scope="module")
def local_run(saved, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    summary = predict_corpus(str(saved), str(corpus), out, block_size=BLOCK, progress=False)
    return out, summary


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


def files(folder: Path):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_one_whole_shard_per_block_with_origin_and_metadata(local_run, corpus, texts):
    out, summary = local_run
    assert sorted(files(out)) == sorted([f"{n}.{ext}" for n in SHARDS for ext in ("jsonl", "spacy")] + ["corpus.json"])
    assert (summary.documents, summary.blocks_written, summary.blocks_skipped) == (30, 5, 0)
    lines = [json.loads(line) for name in SHARDS for line in (out / f"{name}.jsonl").read_text(encoding="utf8").splitlines()]
    assert [line["text"] for line in lines] == texts[20:] + texts[:20]
    assert lines[10]["origin"] == f"{corpus}/notes/a.jsonl:1" and lines[10]["meta"] == {"id": 0}
    assert lines[13]["origin"] == f"{corpus}/notes/a.jsonl:7" and lines[13]["meta"] == {"id": 3}
    assert lines[0]["origin"] == f"{corpus}/b.txt:1" and lines[0]["meta"] == {}
    assert any(line["spans"] for line in lines), "the embedded model should find something here"
    nlp = spacy.blank("zh")
    docs = [doc for name in SHARDS for doc in DocBin().from_disk(out / f"{name}.spacy").get_docs(nlp.vocab)]
    assert [d.user_data["origin"] for d in docs] == [line["origin"] for line in lines]
    for doc, line in zip(docs, lines):
        group = doc.spans["sc"]
        expected = [(s["start"], s["end"], s["label"], s["score"]) for s in line["spans"]]
        assert [(s.start_char, s.end_char, s.label_, sc) for s, sc in zip(group, group.attrs["scores"])] == expected
    assert summary.stats["medllm_ner"]["mentions"] > 0 and summary.stats["medllm_ner"]["prompts"] > 0


def test_bad_lines_are_counted_and_listed_with_file_and_line(local_run, corpus, saved, capsys):
    out, summary = local_run
    assert summary.input.bad == {"invalid_json": 1, "no_text": 1, "text_not_string": 1}
    print_summary(summary, str(saved), out)
    printed = capsys.readouterr().out
    assert "3 bad input lines skipped" in printed
    for number, reason in ((4, "invalid JSON"), (5, 'no "text" field'), (6, '"text" is not a string')):
        assert f"{corpus}/notes/a.jsonl:{number} {reason}" in printed
    assert "medllm_ner: " in printed and "blocks: 5 written, 0 already written" in printed


def test_a_killed_run_resumes_with_only_the_missing_shard(local_run, saved, corpus, tmp_path):
    out, _ = local_run
    killed = tmp_path / "out"
    shutil.copytree(out, killed)
    # killed while writing the second shard of a.jsonl: its entities are in, its DocBin is a temp file
    (killed / "notes__a.jsonl.00001.spacy").unlink()
    (killed / ".notes__a.jsonl.00001.spacy.x1y2.tmp").write_bytes(b"half a DocBin")
    summary = predict_corpus(str(saved), str(corpus), killed, block_size=BLOCK, progress=False)
    assert (summary.documents, summary.blocks_written, summary.blocks_skipped) == (8, 1, 4)
    assert files(killed) == files(out)


def test_a_folder_written_with_other_blocks_is_not_resumed(local_run, saved, corpus):
    out, _ = local_run
    with pytest.raises(CorpusError, match="block_size"):
        predict_corpus(str(saved), str(corpus), out, block_size=BLOCK + 1, progress=False)


def test_a_spacy_output_is_one_docbin_in_input_order_with_titles(saved, texts, tmp_path):
    nlp = spacy.load(saved)
    source, out = tmp_path / "in.spacy", tmp_path / "pred.spacy"
    docs = [nlp.make_doc(t) for t in texts[:3]]
    for i, doc in enumerate(docs):
        doc.user_data["title"] = f"doc {i}"
    DocBin(docs=docs, store_user_data=True).to_disk(source)
    summary = predict_corpus(str(saved), str(source), out, block_size=2, limit=3, progress=False)
    predicted = list(DocBin().from_disk(out).get_docs(nlp.vocab))
    assert [d.text for d in predicted] == texts[:3]
    assert [d.user_data["title"] for d in predicted] == ["doc 0", "doc 1", "doc 2"]
    assert summary.blocks_written == 2 and not (tmp_path / "pred.spacy.parts").exists()


def test_ray_missing_is_a_clear_error(saved, corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(CorpusError, match=r'pip install "spacy-medllm\[ray\]"'):
        predict_corpus(str(saved), str(corpus), tmp_path / "out", engine="ray", block_size=BLOCK, progress=False)


def test_ray_writes_the_shards_of_the_local_engine(ray_session, local_run, saved, corpus, tmp_path):
    out, local = local_run
    summary = predict_corpus(str(saved), str(corpus), tmp_path / "out", engine="ray", workers=2, block_size=BLOCK, progress=False)
    assert files(tmp_path / "out") == files(out)
    assert (summary.documents, summary.blocks_written) == (30, 5)
    assert summary.stats == local.stats and summary.input == local.input
