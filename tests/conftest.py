"""Fixtures several test modules share."""
import pytest
import spacy


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
