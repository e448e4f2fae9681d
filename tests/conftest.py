"""Fixtures several test modules share."""
import json
from pathlib import Path
from typing import Optional

import pytest
import spacy
from spacy.tokens import DocBin

from spacy_medllm.llm.tiny import TinyModelConfig, init_tiny

ASSETS = Path(__file__).resolve().parents[1] / "assets"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(text, arch="qwen2", name=None, **shape) -> Path``: a random tiny model saved in
    the Hugging Face layout, with a character vocabulary covering ``text``. Shapes default to
    the smallest that exercise grouped-query attention (hidden 32, 2 layers, 2 heads, 1 KV
    head); ``name`` starts the folder's name (messages that show paths can be checked); each
    distinct request is built once per test session."""
    built = {}

    def make(text: str, arch: str = "qwen2", name: Optional[str] = None, **shape) -> Path:
        shape = {"hidden": 32, "layers": 2, "heads": 2, "kv_heads": 1, "seed": 1, **shape}
        shape.setdefault("intermediate", 2 * shape["hidden"])
        key = (text, arch, name, tuple(sorted(shape.items())))
        if key not in built:
            root = tmp_path_factory.mktemp(name or f"tiny_{arch}")
            corpus = root / "corpus.txt"
            corpus.write_text(text, encoding="utf8")
            init_tiny(root / "model", [corpus], TinyModelConfig(arch=arch, **shape))
            built[key] = root / "model"
        return built[key]

    return make


@pytest.fixture(scope="session")
def cmeee_docbin():
    """``cmeee_docbin(path, n) -> records``: writes a DocBin of the first ``n`` records of the
    CMeEE sample (gold spans in ``doc.spans["sc"]``; CMeEE's end_idx is inclusive) and returns
    the records."""

    def write(path: Path, n: int) -> list:
        records = json.loads((ASSETS / "cmeee_train.json").read_text(encoding="utf8"))[:n]
        nlp = spacy.blank("zh")
        docs = []
        for record in records:
            doc = nlp.make_doc(record["text"])
            doc.spans["sc"] = [doc.char_span(e["start_idx"], e["end_idx"] + 1, e["type"]) for e in record["entities"]]
            assert all(doc.spans["sc"])
            docs.append(doc)
        DocBin(docs=docs).to_disk(path)
        return records

    return write


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The embedded pipeline (character tokens, medllm_ner → medllm_align, CMeEE labels)
    saved to disk, once per module."""
    nlp = spacy.blank("zh", config={"nlp": {"tokenizer": {"@tokenizers": "spacy_medllm.CharTokenizer.v1"}}})
    nlp.add_pipe("medllm_ner", config={"labels": {"@misc": "spacy_medllm.LabelScheme.v1", "scheme": "cmeee"}})
    nlp.add_pipe("medllm_align")
    path = tmp_path_factory.mktemp("pipe") / "pipe"
    nlp.to_disk(path)
    return path
