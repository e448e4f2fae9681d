"""Corpus readers, ``convert``, OpenCC normalisation and sentence sharding.

The full-data tests reproduce the counts of ../shared/data/SOURCES.md (and skip when that
folder is absent); hand-made files cover every kind of broken input.
"""

import json
import re
import subprocess
import sys
from collections import Counter
from functools import lru_cache
from pathlib import Path

import pytest
import spacy
from hypothesis import given, settings
from hypothesis import strategies as st
from spacy.tokens import DocBin
from spacy.training import Corpus
from spacy.util import registry
from spacy.vocab import Vocab

from spacy_medllm.cli.convert import convert
from spacy_medllm.readers import CONVERTERS, guess_converter, make_doc, read_docs, read_records
from spacy_medllm.readers.base import (
    BAD_JSON,
    BAD_RECORD,
    EMPTY_SPAN,
    MALFORMED_ENTITY,
    MALFORMED_LINE,
    MALFORMED_TAG,
    MENTION_MISMATCH,
    ORPHAN_I,
    OUT_OF_RANGE,
    UNDECODABLE,
    UNKNOWN_TAG,
)
from spacy_medllm.readers.healthner import SENTENCE_MISMATCH
from spacy_medllm.readers.normalize import CharAlignedConverter, normalize_text
from spacy_medllm.sharding import shard_text
from spacy_medllm.spans import FLAT_POLICIES
from spacy_medllm.tokenizer import CharTokenizer

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
DATA = ROOT.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is absent")

# asset file -> converter; every converter once
ASSET_FORMATS = {
    "cmeee_dev.json": "cmeee",
    "ccks2019_sample.txt": "ccks2019",
    "rocling_sample.txt": "bio",
    "healthner_sample.json": "healthner",
    "ncbi_sample.tsv": "conll",
}


def _read(path, converter, **kwargs):
    """Docs and the single report of one file."""
    reports = []
    docs = list(read_docs(path, CONVERTERS[converter], Vocab(), reports=reports, **kwargs))
    assert len(reports) == 1
    return docs, reports[0]


def _spans(doc, key="sc"):
    return [(s.label_, s.start_char, s.end_char) for s in doc.spans[key]]


def _ents(doc):
    return [(s.label_, s.start_char, s.end_char) for s in doc.ents]


def _problems(report):
    """(line, reason, kept) in line order (tag problems are found when a sentence ends)."""
    return sorted(((p.line, p.reason, p.kept) for p in report.problems), key=lambda p: p[0])


# --------------------------------------------------------------------------- full data

FULL_COUNTS = {
    # file: (converter, documents, {label: entities}); CMeEE train drops its 2 empty entities
    "cmeee/CMeEE_train.json": (
        "cmeee",
        15000,
        {
            "bod": 17697,
            "dis": 15843,
            "sym": 12269,
            "pro": 6331,
            "dru": 3930,
            "ite": 2581,
            "mic": 1907,
            "equ": 888,
            "dep": 348,
        },
    ),
    "cmeee/CMeEE_dev.json": (
        "cmeee",
        4500,
        {
            "bod": 5307,
            "dis": 4450,
            "sym": 3668,
            "pro": 1849,
            "dru": 1289,
            "ite": 855,
            "mic": 542,
            "equ": 215,
            "dep": 104,
        },
    ),
    "ccks2019/subtask1_training_part1.txt": (
        "ccks2019",
        400,
        {"解剖部位": 3604, "疾病和诊断": 1747, "药物": 838, "实验室检验": 513, "手术": 417, "影像检查": 223},
    ),
    "ccks2019/subtask1_training_part2.txt": (
        "ccks2019",
        600,
        {"解剖部位": 4822, "疾病和诊断": 2465, "药物": 984, "影像检查": 746, "实验室检验": 682, "手术": 612},
    ),
    "rocling/ROCLING22_CHNER_truth.txt": (
        "bio",
        3205,
        {
            "BODY": 5316,
            "DISE": 2609,
            "SYMP": 1947,
            "CHEM": 1719,
            "DRUG": 481,
            "TREAT": 468,
            "INST": 250,
            "EXAM": 207,
            "TIME": 198,
            "SUPP": 183,
        },
    ),
    "rocling/HealthNER_test.json": (
        "healthner",
        2531,
        {
            "BODY": 3171,
            "SYMP": 1481,
            "DISE": 1005,
            "CHEM": 744,
            "EXAM": 404,
            "TREAT": 203,
            "SUPP": 122,
            "DRUG": 79,
            "TIME": 54,
            "INST": 42,
        },
    ),
    "english/NCBI-disease-IOB/train.tsv": ("conll", 5424, {"Disease": 5134}),
    "english/NCBI-disease-IOB/devel.tsv": ("conll", 923, {"Disease": 787}),
    "english/BC5CDR-IOB/train.tsv": ("conll", 4560, {"Chemical": 5203, "Disease": 4182}),
    "english/BC5CDR-IOB/devel.tsv": ("conll", 4581, {"Chemical": 5347, "Disease": 4246}),
    "english/BC2GM-IOB/train.tsv": ("conll", 12574, {"GENE": 15197}),
    "english/BC2GM-IOB/devel.tsv": ("conll", 2519, {"GENE": 3061}),
}


@lru_cache(maxsize=None)
def _full(name):
    """Docs count, report and the labels of the spans in the Docs of one full-data file
    (cached so that each file is read once; the Docs themselves are not kept)."""
    docs, report = _read(DATA / name, FULL_COUNTS[name][0])
    return len(docs), report, Counter(s.label_ for doc in docs for s in doc.spans["sc"])


@needs_data
@pytest.mark.parametrize("name", list(FULL_COUNTS))
def test_full_data_counts(name):
    converter, documents, labels = FULL_COUNTS[name]
    assert guess_converter(DATA / name) == converter
    n_docs, report, span_labels = _full(name)
    print(f"{name}: {report.documents} documents, {report.entities} entities, {dict(report.labels)}")
    assert (n_docs, report.documents) == (documents, documents)
    assert dict(report.labels) == labels
    assert span_labels == Counter(labels) and report.entities == sum(labels.values())
    if not name.startswith(("cmeee/CMeEE_train", "rocling/ROCLING")):
        assert report.problems == []


@needs_data
def test_full_data_problems():
    report = _full("cmeee/CMeEE_train.json")[1]
    # 61,796 entities in the release, 2 of them empty (start_idx = end_idx + 1); the line is
    # the entity's own "start_idx" line in the pretty-printed file
    assert report.entities + report.dropped == 61796
    assert _problems(report) == [(182235, EMPTY_SPAN, False), (192029, EMPTY_SPAN, False)]
    lines = (DATA / "cmeee/CMeEE_train.json").read_text(encoding="utf-8").split("\n")
    assert lines[182234].strip() == '"start_idx": 16,' and lines[182235].strip() == '"end_idx": 15,'

    report = _full("rocling/ROCLING22_CHNER_truth.txt")[1]
    print(f"ROCLING: {report.entities} entities")
    assert report.entities == 13378  # 13,372 B- tags + 6 I- tags that start an entity
    assert _problems(report) == [
        (10123, ORPHAN_I, True),
        (11988, MALFORMED_TAG, True),  # O-SYMP read as O
        (13215, ORPHAN_I, True),
        (39801, MALFORMED_TAG, True),  # i-CHEM read as I-CHEM
        (53209, ORPHAN_I, True),
        (71825, ORPHAN_I, True),
        (78742, ORPHAN_I, True),
        (98546, ORPHAN_I, True),
    ]


@needs_data
@pytest.mark.parametrize(
    "name,converter", [("rocling/ROCLING22_CHNER_truth.txt", "bio"), ("rocling/HealthNER_test.json", "healthner")]
)
def test_opencc_keeps_length_and_offsets_on_rocling(name, converter):
    original = list(read_records(DATA / name, CONVERTERS[converter]))
    simplified = list(read_records(DATA / name, CONVERTERS[converter], normalize="t2s"))
    assert len(original) == len(simplified)
    changed = 0
    for a, b in zip(original, simplified):
        assert len(a.text) == len(b.text)
        assert [(e.label, e.start, e.end) for e in a.entities] == [(e.label, e.start, e.end) for e in b.entities]
        changed += sum(x != y for x, y in zip(a.text, b.text))
    print(f"{name}: {changed} characters converted")
    assert changed > 1000


# --------------------------------------------------------------------------- broken input


def _cmeee_line(text, *entities):
    """One record line of a CMeEE list; an entity is (start_idx, end_idx, type, entity) with
    None for a missing key."""
    keys = ("start_idx", "end_idx", "type", "entity")
    ents = [{k: v for k, v in zip(keys, e) if v is not None} for e in entities]
    return (json.dumps({"text": text, "entities": ents}, ensure_ascii=False) + ",").encode()


def test_cmeee_broken_list(tmp_path):
    lines = [
        b"[",
        _cmeee_line("患者头痛发热", (2, 3, "sym", "头痛"), (4, 3, "sym", "")),
        _cmeee_line("肝功能异常", (0, 9, "ite", "肝功能异常"), (0, 2, "ite", "肝功")),
        b'{"text": "bad", "entities": [{"start_idx": 0,, ]},',
        _cmeee_line("服用阿司匹林", (2, 5, "dru", "阿司匹林"), (None, 1, "pro", None)),
        b'{"text": "\xff\xfe", "entities": []},',
        b"42,",
        _cmeee_line("咳嗽", (0, 1, "sym", "咳嗽"))[:-1],
        b"]",
    ]
    path = tmp_path / "broken.json"
    path.write_bytes(b"\n".join(lines))
    docs, report = _read(path, "cmeee")
    assert [d.text for d in docs] == ["患者头痛发热", "肝功能异常", "服用阿司匹林", "咳嗽"]
    assert [_spans(d) for d in docs] == [[("sym", 2, 4)], [("ite", 0, 3)], [("dru", 2, 6)], [("sym", 0, 2)]]
    assert _problems(report) == [
        (2, EMPTY_SPAN, False),
        (3, OUT_OF_RANGE, False),
        (3, MENTION_MISMATCH, True),
        (4, BAD_JSON, False),
        (5, MALFORMED_ENTITY, False),
        (6, UNDECODABLE, False),
        (7, BAD_RECORD, False),
    ]
    assert all(p.file == str(path) for p in report.problems)
    assert (report.documents, report.entities, report.dropped) == (4, 4, 6)
    assert [d.user_data["source"] for d in docs] == ["broken.json:2", "broken.json:3", "broken.json:5", "broken.json:8"]


def test_cmeee_offsets_that_are_not_integers_are_problems(tmp_path):
    lines = [
        b"[",
        _cmeee_line("患者头痛发热", (True, 3, "sym", "头痛"), (2.7, 3, "sym", "头痛"), ("2", "3", "sym", "头痛")),
        _cmeee_line("咳嗽", (0, 1.0, "sym", "咳嗽"), ("²", 1, "sym", "咳嗽"))[:-1],
        b"]",
    ]
    path = tmp_path / "offsets.json"
    path.write_bytes(b"\n".join(lines))
    docs, report = _read(path, "cmeee")
    assert [_spans(d) for d in docs] == [[("sym", 2, 4)], []]  # only the quoted digits count
    assert _problems(report) == [(2, MALFORMED_ENTITY, False)] * 2 + [(3, MALFORMED_ENTITY, False)] * 2


def test_cmeee_pretty_printed_lines_and_json_lines(tmp_path):
    records = [
        {"text": "无发热", "entities": []},
        {
            "text": "双肺呼吸音粗",
            "entities": [
                {"start_idx": 0, "end_idx": 1, "type": "bod", "entity": "双肺"},
                {"start_idx": 5, "end_idx": 4, "type": "sym", "entity": ""},
            ],
        },
    ]
    path = tmp_path / "pretty.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    text_lines = path.read_text(encoding="utf-8").split("\n")
    empty_line = [i for i, line in enumerate(text_lines, 1) if '"start_idx": 5' in line]
    _, report = _read(path, "cmeee")
    assert _problems(report) == [(empty_line[0], EMPTY_SPAN, False)]

    path = tmp_path / "lines.json"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n{oops\n", encoding="utf-8")
    assert guess_converter(path) == "cmeee"
    docs, report = _read(path, "cmeee")
    assert [_spans(d) for d in docs] == [[], [("bod", 0, 2)]]
    assert _problems(report) == [(2, EMPTY_SPAN, False), (3, BAD_JSON, False)]


def test_ccks_broken(tmp_path):
    good = {
        "originalText": "患者胃癌术后。",
        "entities": [
            {"label_type": "疾病和诊断", "start_pos": 2, "end_pos": 4, "overlap": 0},
            {"label_type": "手术", "start_pos": 5, "end_pos": 40, "overlap": 0},
        ],
    }
    other = {
        "originalText": "双肺 纹理增多。",
        "entities": [
            {"label_type": "解剖部位", "start_pos": 0, "end_pos": 3, "overlap": 0},
            {"label_type": "解剖部位", "start_pos": "x", "end_pos": 2},
        ],
    }
    lines = [
        json.dumps(good, ensure_ascii=False).encode(),
        b"not json",
        b"",
        b'{"entities": []}',
        b"\xc3\x28",
        json.dumps(other, ensure_ascii=False).encode(),
    ]
    path = tmp_path / "ccks.txt"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")
    assert guess_converter(path) == "ccks2019"
    docs, report = _read(path, "ccks2019")
    assert [_spans(d) for d in docs] == [[("疾病和诊断", 2, 4)], [("解剖部位", 0, 3)]]
    assert docs[1].spans["sc"][0].text == "双肺 "  # a span may end on whitespace: one token per character
    assert _problems(report) == [
        (1, OUT_OF_RANGE, False),
        (2, BAD_JSON, False),
        (4, BAD_RECORD, False),
        (5, UNDECODABLE, False),
        (6, MALFORMED_ENTITY, False),
    ]


@pytest.mark.parametrize("eol", ["\r\n", "\r", "\n"])
def test_bio_repairs_and_line_ends(tmp_path, eol):
    lines = [
        "頭 B-BODY",
        "部 I-BODY",
        "痛 I-SYMP",
        "經 O-SYMP",
        "由 b-CHEM",
        "鈣 i-CHEM",
        "質",
        "。 X-FOO",
        " ",
        "  O",
        "眼 B-BODY",
        "睛 I-BODY",
    ]
    path = tmp_path / "bio.txt"
    path.write_bytes(eol.join(lines).encode("utf-8"))  # no line end after the last line
    assert guess_converter(path) == "bio"
    docs, report = _read(path, "bio")
    assert [d.text for d in docs] == ["頭部痛經由鈣。", " 眼睛"]
    assert [_spans(d) for d in docs] == [[("BODY", 0, 2), ("SYMP", 2, 3), ("CHEM", 4, 6)], [("BODY", 1, 3)]]
    assert _problems(report) == [
        (3, ORPHAN_I, True),
        (4, MALFORMED_TAG, True),
        (5, MALFORMED_TAG, True),
        (6, MALFORMED_TAG, True),
        (7, MALFORMED_LINE, False),
        (8, UNKNOWN_TAG, True),
    ]
    assert [d.user_data["source"] for d in docs] == ["bio.txt:1", "bio.txt:10"]


def test_healthner_broken(tmp_path):
    records = [
        {
            "id": "1",
            "genre": "ft",
            "sentence": "頭痛",
            "character": ["頭", "痛"],
            "character_label": ["B-SYMP", "I-SYMP"],
        },
        {"id": "2", "sentence": "咳", "character": ["咳"], "character_label": []},
        {"id": "3", "sentence": "XX", "character": ["發", "燒"], "character_label": ["B-SYMP", "I-SYMP"]},
        "{bad json",
        {"id": "5", "sentence": "有癌", "character": ["有", "癌"], "character_label": ["O", "I-DISE"]},
    ]
    path = tmp_path / "health.json"
    path.write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records), encoding="utf-8"
    )
    assert guess_converter(path) == "healthner"
    docs, report = _read(path, "healthner")
    assert [d.text for d in docs] == ["頭痛", "發燒", "有癌"]
    assert [_spans(d) for d in docs] == [[("SYMP", 0, 2)], [("SYMP", 0, 2)], [("DISE", 1, 2)]]
    assert [(d.user_data.get("id"), d.user_data.get("genre")) for d in docs] == [("1", "ft"), ("3", None), ("5", None)]
    assert _problems(report) == [
        (2, BAD_RECORD, False),
        (3, SENTENCE_MISMATCH, True),
        (4, BAD_JSON, False),
        (5, ORPHAN_I, True),
    ]


def test_conll_words_and_repairs(tmp_path):
    text = (
        "-DOCSTART-\tO\n\n"
        "Familial\tB-Disease\nbreast\tI-Disease\ncancer\tI-Disease\nis\tO\nrare\tO\n\n"
        "The\tDT\tO\nAPC\tNN\tI-GENE\ngene\tNN\tI-GENE\nlonely\n"
    )
    path = tmp_path / "conll.tsv"
    path.write_text(text, encoding="utf-8")
    assert guess_converter(path) == "conll"
    docs, report = _read(path, "conll")
    assert [[t.text for t in d] for d in docs] == [
        ["Familial", "breast", "cancer", "is", "rare"],
        ["The", "APC", "gene"],
    ]
    assert [d.text for d in docs] == ["Familial breast cancer is rare", "The APC gene"]
    assert [_spans(d) for d in docs] == [[("Disease", 0, 22)], [("GENE", 4, 12)]]
    assert _problems(report) == [(10, ORPHAN_I, True), (12, MALFORMED_LINE, False)]
    with pytest.raises(ValueError, match="word tokens"):
        _read(path, "conll", max_chars=10)


def test_guess_converter_refuses_unknown(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("just some prose\nwith no tags at all\n", encoding="utf-8")
    with pytest.raises(ValueError, match="--converter"):
        guess_converter(path)
    for name, converter in ASSET_FORMATS.items():
        assert guess_converter(ASSETS / name) == converter
    with pytest.raises(ValueError, match="Unknown converter"):
        convert(ASSETS / "cmeee_dev.json", tmp_path, converter="brat")


# --------------------------------------------------------------------------- Docs and tokens


def test_make_doc_characters_whitespace_and_char_tokenizer(tmp_path):
    text = " 胃体\u3000可见\r\n\n肿物 "
    spans = [("bod", 0, 3), ("sym", 9, 12), ("bod", 1, 3)]
    doc = make_doc(Vocab(), text, spans)
    assert [t.text for t in doc] == list(text) and doc.text == text
    assert all(t.whitespace_ == "" for t in doc)
    assert [s.text for s in doc.spans["sc"]] == [" 胃体", "肿物 ", "胃体"]
    assert _ents(doc) == [("bod", 0, 3), ("sym", 9, 12)]

    # spacy.blank("zh") folds single spaces into the previous token and merges newlines,
    # so " 胃体"-style gold spans need the character tokenizer at prediction time
    blank = spacy.blank("zh")
    assert len(blank.make_doc(text)) < len(text)
    nlp = spacy.blank("zh", config={"nlp": {"tokenizer": {"@tokenizers": "spacy_medllm.CharTokenizer.v1"}}})
    assert [t.text for t in nlp.make_doc(text)] == list(text)
    nlp.to_disk(tmp_path / "pipeline")
    loaded = spacy.load(tmp_path / "pipeline")
    assert isinstance(loaded.tokenizer, CharTokenizer) and [t.text for t in loaded(text)] == list(text)

    reader = registry.resolve(
        {"r": {"@readers": "spacy_medllm.CCKS2019Reader.v1", "path": str(ASSETS / "ccks2019_sample.txt")}}
    )["r"]
    for eg in reader(nlp):
        assert [t.text for t in eg.predicted] == [t.text for t in eg.reference]
        assert [s.text for s in eg.get_aligned_spans_y2x(eg.reference.spans["sc"])] == [
            s.text for s in eg.reference.spans["sc"]
        ]


@pytest.mark.parametrize("policy", FLAT_POLICIES)
def test_flat_ents_are_non_overlapping_subset_of_spans(policy):
    docs, _ = _read(ASSETS / "cmeee_train.json", "cmeee", flat_policy=policy)
    nested = 0
    for doc in docs:
        group, ents = set(_spans(doc)), _ents(doc)
        assert set(ents) <= group
        assert all(a[2] <= b[1] for a, b in zip(ents, ents[1:]))
        nested += len(group) > len(set(ents))
        if policy == "longest":  # every span left out overlaps a chosen one at least as long
            for label, start, end in group - set(ents):
                assert any(s < end and start < e and e - s >= end - start for _, s, e in ents)
    assert nested > 100  # the sample really is nested


# --------------------------------------------------------------------------- OpenCC


def test_normalize_is_character_aligned():
    assert normalize_text("醫生說頭痛藉由藥物緩解") == "医生说头痛借由药物缓解"
    assert normalize_text("") == ""
    converter = CharAlignedConverter("t2s")

    class Widening:  # a conversion that changes the length falls back to characters
        def convert(self, text):
            return text.replace("甲", "XY").replace("醫", "医")

    converter._cc = Widening()
    assert converter("甲醫") == "甲医"
    with pytest.raises(ValueError, match="OpenCC"):
        CharAlignedConverter("no-such-config")


def test_normalized_reader_keeps_offsets_on_assets():
    plain, _ = _read(ASSETS / "rocling_sample.txt", "bio")
    simple, _ = _read(ASSETS / "rocling_sample.txt", "bio", normalize="t2s")
    assert [len(d.text) for d in plain] == [len(d.text) for d in simple]
    assert [_spans(d) for d in plain] == [_spans(d) for d in simple]
    assert plain[0].text.startswith("腎是脊椎動物") and simple[0].text.startswith("肾是脊椎动物")


# --------------------------------------------------------------------------- sharding


def test_shard_text_hand_cases():
    assert shard_text("", 5) == [(0, 0)]
    assert shard_text("短句。", 5) == [(0, 3)]
    assert shard_text("患者头痛。无发热！咳嗽三天；", 10) == [(0, 9), (9, 14)]
    assert shard_text("他说：“好。”然后走了。", 8) == [(0, 7), (7, 12)]  # the closing quote stays
    assert shard_text("一二三，四五六七八九", 8) == [(0, 4), (4, 10)]  # comma before any character
    assert shard_text("ABCDEFGHIJ", 4, [(3, 6)]) == [(0, 3), (3, 7), (7, 10)]  # hard split around an entity
    assert shard_text("ABCDEFGHIJ", 3, [(1, 8)]) == [(0, 1), (1, 8), (8, 10)]  # an entity longer than the window
    assert shard_text("第一行\n第二行\n", 5) == [(0, 4), (4, 8)]
    with pytest.raises(ValueError):
        shard_text("abc", 0)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="甲乙丙。，\n ", min_size=0, max_size=60),
    max_chars=st.integers(1, 12),
    raw_spans=st.lists(st.tuples(st.integers(0, 60), st.integers(1, 6)), max_size=6),
)
def test_shard_text_properties(text, max_chars, raw_spans):
    spans = [(s, min(s + w, len(text))) for s, w in raw_spans if s < len(text)]
    shards = shard_text(text, max_chars, spans)
    assert shards[0][0] == 0 and shards[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(shards, shards[1:]))
    blocked = {p for s, e in spans for p in range(s + 1, e)}
    for start, end in shards:
        assert end == len(text) or end not in blocked
        if end - start > max_chars:  # only when every cut in the window would split an entity
            assert all(p in blocked for p in range(start + 1, start + max_chars + 1))


def test_reader_shards_keep_every_entity():
    whole, report = _read(ASSETS / "ccks2019_sample.txt", "ccks2019")
    sharded, sharded_report = _read(ASSETS / "ccks2019_sample.txt", "ccks2019", max_chars=100)
    assert sharded_report.documents == report.documents == 12
    assert sharded_report.shards > 40 and max(len(d.text) for d in sharded) <= 100
    assert sharded_report.entities == report.entities and sharded_report.labels == report.labels
    rebuilt = {}
    for doc in sharded:
        offset = doc.user_data["shard"][0]
        rebuilt.setdefault(doc.user_data["source"], []).extend(
            (label, s + offset, e + offset) for label, s, e in _spans(doc)
        )
    assert rebuilt == {doc.user_data["source"]: _spans(doc) for doc in whole}


# --------------------------------------------------------------------------- spaCy readers and convert

READER_NAMES = {
    "cmeee": "spacy_medllm.CMeEEReader.v1",
    "ccks2019": "spacy_medllm.CCKS2019Reader.v1",
    "bio": "spacy_medllm.BIOReader.v1",
    "healthner": "spacy_medllm.HealthNERReader.v1",
    "conll": "spacy_medllm.CoNLLReader.v1",
}


@pytest.mark.parametrize("asset", list(ASSET_FORMATS))
def test_registered_readers_yield_examples(asset):
    converter = ASSET_FORMATS[asset]
    nlp = spacy.blank("en" if converter == "conll" else "zh")
    config = {"@readers": READER_NAMES[converter], "path": str(ASSETS / asset), "spans_key": "gold"}
    corpus = registry.resolve({"r": config})["r"]
    examples = list(corpus(nlp))
    report = corpus.reports[0]
    assert len(examples) == report.documents > 0
    assert all(eg.predicted.text == eg.reference.text for eg in examples)
    assert sum(len(eg.reference.spans["gold"]) for eg in examples) == report.entities
    assert "sc" not in examples[0].reference.spans
    limited = registry.resolve({"r": {**config, "limit": 5}})["r"]
    assert len(list(limited(nlp))) == 5


CONVERT_RUNS = {
    "cmeee_dev.json": ["--converter", "cmeee"],
    "ccks2019_sample.txt": ["--converter", "ccks2019", "--max-chars", "120"],
    "rocling_sample.txt": ["--converter", "bio", "--normalize", "t2s"],
    "healthner_sample.json": [],  # guessed from the content
    "ncbi_sample.tsv": ["-c", "conll", "--spans-key", "ner", "--flat-policy", "first"],
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Run ``python -m spacy medllm convert`` once per asset, all at once (each run pays
    spaCy's import time)."""
    out = tmp_path_factory.mktemp("converted")
    runs = {}
    for asset, args in CONVERT_RUNS.items():
        cmd = [sys.executable, "-m", "spacy", "medllm", "convert", str(ASSETS / asset), str(out / asset), *args]
        runs[asset] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    results = {}
    for asset, proc in runs.items():
        stdout, _ = proc.communicate(timeout=300)
        results[asset] = (proc.returncode, stdout, out / asset / (Path(asset).stem + ".spacy"))
    return results


def _options(args):
    opts = dict(zip(args[::2], args[1::2]))
    return {
        "converter": opts.get("--converter", opts.get("-c")),
        "spans_key": opts.get("--spans-key", "sc"),
        "flat_policy": opts.get("--flat-policy", "longest"),
        "normalize": opts.get("--normalize"),
        "max_chars": int(opts["--max-chars"]) if "--max-chars" in opts else None,
    }


@pytest.mark.parametrize("asset", list(CONVERT_RUNS))
def test_convert_cli_round_trip(converted, asset):
    returncode, stdout, output = converted[asset]
    assert returncode == 0, stdout
    opts = _options(CONVERT_RUNS[asset])
    converter = opts.pop("converter") or ASSET_FORMATS[asset]
    key = opts["spans_key"]
    expected, report = _read(ASSETS / asset, converter, **opts)
    assert f"{report.documents} documents" in stdout and f"{report.entities} entities" in stdout
    assert f"{report.shards}doc" in stdout.replace(" ", "") and "doc/s" in stdout  # the progress bar
    vocab = Vocab()
    loaded = list(DocBin().from_disk(output).get_docs(vocab))
    assert len(loaded) == len(expected) == report.shards
    for got, want in zip(loaded, expected):
        assert got.text == want.text
        assert _spans(got, key) == _spans(want, key) and _ents(got) == _ents(want)
        assert got.user_data == want.user_data
    # spaCy's own corpus reader reads the same file
    nlp = spacy.blank("en" if converter == "conll" else "zh")
    examples = list(Corpus(output)(nlp))
    assert [_spans(eg.reference, key) for eg in examples] == [_spans(d, key) for d in expected]


def test_convert_cli_reports_problems(converted):
    _, stdout, _ = converted["rocling_sample.txt"]
    assert "2 problems" in stdout and "rocling_sample.txt:4235" in stdout and "O-SYMP" in stdout


@pytest.mark.parametrize(
    "content, args, expected",
    [
        (b"", ["--converter", "bio"], "holds no documents: it is empty"),
        (b"[\n", ["--converter", "cmeee"], "holds no documents: it is empty"),
        (None, ["--converter", "cmeee"], "does not look like cmeee input.*--converter bio"),
    ],
    ids=["empty", "only-bracket", "wrong-converter"],
)
def test_convert_cli_refuses_empty_and_mismatched_input(tmp_path, content, args, expected):
    path = tmp_path / "input.txt"
    if content is None:  # a character-BIO file given to the CMeEE converter
        path.write_bytes((ASSETS / "rocling_sample.txt").read_bytes()[:20000])
    else:
        path.write_bytes(content)
    run = subprocess.run([sys.executable, "-m", "spacy", "medllm", "convert", str(path), str(tmp_path / "out"), *args],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 1
    assert re.search(expected.replace(" ", r"\s+"), run.stdout + run.stderr), run.stdout[-2000:]


@pytest.mark.parametrize("layout", ["list", "lines"])
def test_cmeee_record_nested_too_deeply_is_reported_and_the_rest_converted(tmp_path, layout):
    deep = "[" * 100000 + "]" * 100000
    records = ['{"text": "患者发热", "entities": []}', '{"text": "x", "entities": %s}' % deep, '{"text": "咳嗽", "entities": []}']
    path = tmp_path / "deep.json"
    path.write_text("[\n" + ",\n".join(records) + "\n]" if layout == "list" else "\n".join(records), encoding="utf8")
    docs, report = _read(path, "cmeee")
    assert [d.text for d in docs] == ["患者发热", "咳嗽"]
    assert _problems(report) == [(2 if layout == "lines" else 3, BAD_JSON, False)]
