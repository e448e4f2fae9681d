"""Copy pre-training data and its gate: pieces, the four kinds of examples, records in the
strategy's format whose random brackets parse back, the exact-copy evaluator on a tiny
model trained to copy a few texts, and the trainer refusing a run cut far short."""
import json
from pathlib import Path

import pytest
import torch

from spacy_medllm.llm.loader import ModelSpec, clear_cache
from spacy_medllm.llm.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_model
from spacy_medllm.strategies.symbol import SymbolStrategy
from spacy_medllm.training.copy_data import (
    COPY_SCHEME,
    CopyEvaluator,
    copy_records,
    copy_texts,
    make_copy_records,
    pieces,
)
from spacy_medllm.training.sft import SFTConfig, SFTModel, train_sft
from spacy_medllm.errors import SFTError

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = str(ROOT / "configs" / "templates" / "symbol_tiny.zh.jinja")
TEXTS = ["患者头痛伴呕吐三天。", "肺炎患者发热，咳嗽两周。", "服用阿司匹林后胃痛", "心电图检查正常；血压高。"]
SHARES = {"real": 0.25, "random": 0.25, "shuffled": 0.25, "bracketed": 0.25}


def test_pieces_cut_at_clause_ends_within_the_limit():
    text = "一二三，四五六七八九十。甲乙丙丁戊己庚辛壬癸子丑寅卯"
    got = pieces(text, 8)
    assert "".join(got) == text and all(len(p) <= 8 for p in got)
    assert got[0] == "一二三，"  # the next clause would overflow: cut at the comma
    assert pieces("   ", 8) == [] and pieces("短句。", 8) == ["短句。"]


def test_copy_texts_mix_kinds_and_are_seeded():
    examples = copy_texts(TEXTS, 400, SHARES, seed=3)
    assert examples == copy_texts(TEXTS, 400, SHARES, seed=3)
    kinds = {e.source.split("#")[0] for e in examples}
    assert kinds == {f"copy-{k}" for k in SHARES}
    alphabet = set("".join(TEXTS))
    for e in examples:
        assert set(e.text) <= alphabet
        assert all(e.text[m.start : m.end] == m.text and m.label == "mark" for m in e.mentions)
        assert bool(e.mentions) == e.source.startswith("copy-bracketed")
    assert sum(e.source.startswith("copy-random") and e.text not in TEXTS for e in examples) > 50
    with pytest.raises(ValueError, match="shares"):
        copy_texts(TEXTS, 4, {"nonsense": 1.0})


def test_random_strings_from_the_most_frequent_characters_for_a_curriculum():
    from collections import Counter

    top = {ch for ch, _ in Counter("".join(TEXTS)).most_common(5)}
    examples = copy_texts(TEXTS, 200, {"random": 1.0}, seed=1, random_alphabet=5)
    assert all(set(e.text) <= top for e in examples)
    assert set("".join(e.text for e in examples)) == top  # uniform over them: every one drawn


def test_records_are_in_the_strategy_format_and_brackets_parse_back():
    strategy = SymbolStrategy(template=TEMPLATE)
    examples = copy_texts(TEXTS, 60, SHARES, seed=0)
    for example, record in zip(examples, copy_records(examples, strategy)):
        (_, _), (_, user), (role, answer) = record.messages
        assert role == "assistant" and user.startswith(example.text)
        label = "mark" if example.mentions else "copy"
        prompt = strategy.prompt(example.text, COPY_SCHEME, label)
        if not example.mentions:
            assert answer == "原文：" + example.text
        parsed = strategy.parse(example.text, answer, prompt)
        assert sorted((m.start, m.end) for m in parsed.mentions) == sorted((m.start, m.end) for m in example.mentions)


def test_reader_reads_any_corpus_format(tmp_path):
    corpus = tmp_path / "c.json"
    corpus.write_text(json.dumps([{"text": t, "entities": []} for t in TEXTS], ensure_ascii=False), encoding="utf8")
    records = make_copy_records([str(corpus)], SymbolStrategy(template=TEMPLATE), n=20, shares=SHARES, max_chars=6)
    assert len(records) == 20 and all(len(r.messages) == 3 for r in records)


class _Echo:
    """A stand-in generator that answers every request with what ``answer`` makes of it."""

    def __init__(self, answer):
        self.answer = answer

    def generate(self, requests, batch_size=8):
        from types import SimpleNamespace

        return [SimpleNamespace(text=self.answer(r.prompt[-1]["content"])) for r in requests]


def test_copy_gate_counts_exact_copies_only():
    evaluator = CopyEvaluator(TEXTS, SymbolStrategy(template=TEMPLATE))
    perfect = evaluator.generate(_Echo(lambda user: "原文：" + user.rsplit("\n", 1)[0]))
    assert sum(a == b for a, b in perfect) == len(TEXTS)
    sloppy = evaluator.generate(_Echo(lambda user: "原文：" + user.rsplit("\n", 1)[0][:-1]))
    assert sum(a == b for a, b in sloppy) == 0


def test_a_tiny_model_trained_to_copy_passes_the_gate_on_its_texts(tmp_path):
    strategy = SymbolStrategy(template=TEMPLATE)
    tokenizer = build_char_tokenizer("".join(TEXTS) + "原文随机：[]")
    model = build_tiny_model(tokenizer, TinyModelConfig(hidden=48, layers=2, heads=2, kv_heads=1, intermediate=96))
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    examples = copy_texts(TEXTS, 4, {"real": 1.0}, seed=0)
    records = copy_records([e for e in examples], strategy)
    config = SFTConfig(learning_rate=1e-2, batch_size=4, max_steps=60, warmup_ratio=0.1, num_threads=1,
                       progress_bar=False, log_every=1000, cutoff_len=128, score_key="copy_exact")
    evaluator = CopyEvaluator(sorted({e.text for e in examples}), strategy)
    result = train_sft(SFTModel(base=ModelSpec(path=str(tmp_path / "base"), dtype="float32"), method="full"),
                       records, config, tmp_path / "out", evaluate=evaluator)
    final = result.state.evaluations[-1]["eval"]
    assert final["copy_exact"] == 1.0 and final["n"] == len(evaluator.texts)
    clear_cache()


def test_trainer_fails_when_the_clock_stops_it_far_short(tmp_path):
    tokenizer = build_char_tokenizer("".join(TEXTS) + "原文随机：[]")
    model = build_tiny_model(tokenizer, TinyModelConfig(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64))
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    records = copy_records(copy_texts(TEXTS, 8, {"real": 1.0}), SymbolStrategy(template=TEMPLATE))
    config = SFTConfig(batch_size=2, max_steps=1000, max_minutes=1e-6, num_threads=1, progress_bar=False, cutoff_len=128)
    with pytest.raises(SFTError, match="stopped at step 1 of 1000.*--resume"):
        train_sft(SFTModel(base=ModelSpec(path=str(tmp_path / "base"), dtype="float32"), method="full"), records, config, tmp_path / "out")
    assert (tmp_path / "out" / "model-last" / "model.safetensors").exists()
    clear_cache()
