"""Label schemes, prompt templates (zh/en), prompt renderings, the in-context retriever and
the ``build-instructions`` command."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import spacy
import srsly
from spacy.tokens import DocBin
from spacy.util import registry
from thinc.api import Config

from spacy_medllm.cli.build_instructions import build_records, make_strategy
from spacy_medllm.labels import BUILTIN_SCHEMES, LabelScheme, get_scheme
from spacy_medllm.strategies import (
    STRATEGIES,
    EntityCategoryStrategy,
    HtmlStrategy,
    InContextStrategy,
    IndexStrategy,
    JsonStrategy,
    MarkStrategy,
    SymbolStrategy,
    TfidfRetriever,
    mentions_from_doc,
)
from spacy_medllm.strategies.incontext import Demonstration
from spacy_medllm.types import Mention

ROOT = Path(__file__).resolve().parents[1]
ALL = [SymbolStrategy(), MarkStrategy(), HtmlStrategy(), JsonStrategy(), IndexStrategy(), EntityCategoryStrategy()]
TEXT = "患者可高热39～40℃，神志大多清晰。"


# -- label schemes ---------------------------------------------------------------------------
def test_builtin_schemes():
    cmeee = get_scheme("CMeEE")
    assert cmeee.codes == ["dis", "sym", "pro", "equ", "dru", "ite", "bod", "dep", "mic"]
    assert [i.name for i in cmeee] == ["疾病", "临床表现", "医疗程序", "医疗设备", "药物", "医学检验项目", "身体", "科室", "微生物类"]
    assert all(i.definition for i in cmeee) and cmeee.language == "zh"
    assert get_scheme("ccks2019").codes == ["疾病和诊断", "影像检查", "实验室检验", "手术", "药物", "解剖部位"]
    assert get_scheme("rocling").codes == ["BODY", "SYMP", "INST", "EXAM", "CHEM", "DISE", "DRUG", "SUPP", "TREAT", "TIME"]
    # English schemes use the IOB tags of the English corpora as codes
    assert (get_scheme("ncbi").codes, get_scheme("bc5cdr").codes, get_scheme("bc2gm").codes) == (
        ["Disease"], ["Chemical", "Disease"], ["GENE"])
    assert {s.language for n, s in BUILTIN_SCHEMES.items() if n in ("ncbi", "bc5cdr", "bc2gm")} == {"en"}


def test_label_lookup_is_lenient():
    cmeee = get_scheme("cmeee")
    assert [cmeee.code_of(x) for x in ("疾病", "dis", "DIS", " 药物 ", "药品", "")] == ["dis", "dis", "dis", "dru", None, None]
    assert get_scheme("bc5cdr").code_of("CHEMICAL") == "Chemical"


def test_user_schemes(tmp_path):
    path = tmp_path / "mine.json"
    srsly.write_json(path, {"name": "mine", "language": "en",
                            "labels": {"DRUG": {"name": "drug", "definition": "a medicine"}, "ADE": "adverse event"}})
    scheme = get_scheme(str(path))
    assert (scheme.name, scheme.language, scheme.codes, scheme.display("ADE")) == ("mine", "en", ["DRUG", "ADE"], "adverse event")
    cfg = Config().from_str('[s]\n@misc = "spacy_medllm.LabelScheme.v1"\nscheme = {"a": "甲", "b": {"name": "乙", "definition": "定义"}}\n'
                            '[t]\n@misc = "spacy_medllm.LabelScheme.v1"\nscheme = "rocling"\n')
    resolved = registry.resolve(cfg)
    assert resolved["s"].codes == ["a", "b"] and resolved["s"].labels["b"].definition == "定义"
    assert resolved["t"] is BUILTIN_SCHEMES["rocling"]
    with pytest.raises(ValueError, match="Unknown label scheme"):
        get_scheme("nope")
    with pytest.raises(ValueError, match="unique"):
        LabelScheme.from_dict({"a": "同", "b": "同"})
    with pytest.raises(ValueError, match="language"):
        LabelScheme.from_dict({"a": "x"}, language="fr")


# -- templates -------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ALL, ids=lambda s: s.name)
@pytest.mark.parametrize("scheme_name", ["cmeee", "bc5cdr"])
def test_templates_render_in_both_languages(strategy, scheme_name):
    scheme = get_scheme(scheme_name)
    text = TEXT if scheme.language == "zh" else "Cisplatin-induced nephrotoxicity in rats."
    prompts = strategy.prompts(text, scheme)
    assert len(prompts) == (len(scheme) if strategy.per_label else 1)
    for prompt in prompts:
        role = "你是医学命名实体识别专家" if scheme.language == "zh" else "You are an expert in biomedical named entity recognition"
        assert prompt.system.startswith(role)
        rules = "输出规则：" if scheme.language == "zh" else "Output rules:"
        assert rules in prompt.instruction and text not in prompt.instruction
        for info in scheme:
            assert f"- {info.name}" in prompt.instruction and info.definition in prompt.instruction
        sentence = "句子：" if scheme.language == "zh" else "Sentence: "
        assert prompt.input.startswith(sentence + text)
        if strategy.per_label:
            asked = "实体类型：" if scheme.language == "zh" else "Entity type: "
            assert prompt.input.splitlines()[-1] == asked + scheme.display(prompt.label)
        # no template placeholder left behind, no CJK in the English prompts
        assert "{{" not in prompt.user and "{%" not in prompt.user
        if scheme.language == "en":
            assert not any("\u4e00" <= c <= "\u9fff" for c in prompt.system + prompt.instruction)


def test_json_prompt_says_end_is_inclusive():
    assert "包含在实体内" in JsonStrategy().prompt(TEXT, get_scheme("cmeee")).instruction
    assert "(inclusive)" in JsonStrategy().prompt("x", get_scheme("ncbi")).instruction


@pytest.mark.parametrize("strategy", [SymbolStrategy(), MarkStrategy()], ids=lambda s: s.name)
def test_per_label_prompts_share_all_but_the_last_line(strategy):
    """The KV-cache reuse contract: per-type prompts of one text differ only in the last line."""
    prompts = strategy.prompts(TEXT, get_scheme("cmeee"))
    users = [p.user for p in prompts]
    common = os.path.commonprefix(users)
    assert common.endswith("实体类型：") and all(u[len(common):] == get_scheme("cmeee").display(p.label) for u, p in zip(users, prompts))
    assert len({p.system for p in prompts}) == 1
    chats = [json.dumps(p.messages(), ensure_ascii=False) for p in prompts]
    assert len(os.path.commonprefix(chats)) > len(prompts[0].system) + len(common)


def test_prompt_renderings():
    prompt = SymbolStrategy().prompt(TEXT, get_scheme("cmeee"), "sym")
    response = "临床表现：患者可[高热]39～40℃，[神志大多清晰]。"
    assert prompt.user == f"{prompt.instruction}\n\n{prompt.input}"
    assert prompt.messages() == [{"role": "system", "content": prompt.system}, {"role": "user", "content": prompt.user}]
    assert prompt.messages(response)[-1] == {"role": "assistant", "content": response}
    assert prompt.alpaca(response) == {"instruction": prompt.instruction, "input": prompt.input, "output": response,
                                       "system": prompt.system}
    text = prompt.alpaca_text()
    assert text.startswith(prompt.system) and text.endswith(f"### Input:\n{prompt.input}\n\n### Response:\n")
    assert prompt.alpaca_text(response) == text + response

    class NoTemplate:
        chat_template = None

    assert prompt.chat_text(NoTemplate(), response) == prompt.alpaca_text(response)


def test_prompt_through_a_chat_template():
    from spacy_medllm.llm.tiny import build_char_tokenizer

    prompt = JsonStrategy().prompt(TEXT, get_scheme("cmeee"))
    tokenizer = build_char_tokenizer(prompt.system + prompt.user + "[]")
    opening = prompt.chat_text(tokenizer)
    assert opening.index(prompt.system) < opening.index(prompt.user)
    assert opening.rstrip().endswith("assistant")  # generation prompt
    assert prompt.chat_text(tokenizer, "[]").count("[]") >= 1


def test_custom_template_file(tmp_path):
    path = tmp_path / "short.jinja"
    path.write_text(
        '{% import "_common.zh.jinja" as common %}\n'
        "{% macro system() %}{{ common.role() }}{% endmacro %}\n"
        "{% macro instruction() %}只标注{{ labels|length }}类实体。{% endmacro %}\n"
        "{% macro query() %}{{ text }}|{{ label.name }}{% endmacro %}\n",
        encoding="utf8",
    )
    strategy = registry.resolve(Config().from_str(f'[s]\n@misc = "spacy_medllm.SymbolStrategy.v1"\ntemplate = "{path}"\n'))["s"]
    prompt = strategy.prompt("发热", get_scheme("cmeee"), "sym")
    assert (prompt.instruction, prompt.input) == ("只标注9类实体。", "发热|临床表现")
    with pytest.raises(ValueError, match="not found"):
        SymbolStrategy(template=str(tmp_path / "missing.jinja")).prompt("x", get_scheme("cmeee"), "dis")


# -- in-context mode -------------------------------------------------------------------------
DEMOS = [
    Demonstration("患者发热咳嗽三天", (Mention("sym", "发热", 2, 4), Mention("sym", "咳嗽", 4, 6))),
    Demonstration("左股骨骨折术后复查", (Mention("dis", "左股骨骨折", 0, 5),)),
    Demonstration("发热伴咳嗽咳痰", (Mention("sym", "发热", 0, 2), Mention("sym", "咳嗽咳痰", 3, 7))),
    Demonstration("口服阿莫西林胶囊", (Mention("dru", "阿莫西林胶囊", 2, 8),)),
]


def test_retriever_returns_nearest_demonstrations():
    retriever = TfidfRetriever().fit(DEMOS)
    assert [d.text for d in retriever.nearest("咳嗽发热两天", 2)] == ["患者发热咳嗽三天", "发热伴咳嗽咳痰"]
    assert retriever.nearest("阿莫西林过敏", 1)[0].text == "口服阿莫西林胶囊"
    assert retriever.nearest("骨折", 0) == []
    # the query itself is never its own demonstration
    assert "口服阿莫西林胶囊" not in [d.text for d in retriever.nearest("口服阿莫西林胶囊", 3)]
    with pytest.raises(ValueError, match="path"):
        TfidfRetriever().nearest("x", 1)


def test_in_context_prompts(tmp_path, cmeee_docbin):
    cfg = Config().from_str(
        '[s]\n@misc = "spacy_medllm.InContextStrategy.v1"\nk = 2\n'
        '[s.base]\n@misc = "spacy_medllm.SymbolStrategy.v1"\n'
        f'[s.retriever]\n@misc = "spacy_medllm.TfidfRetriever.v1"\npath = "{tmp_path / "demos.spacy"}"\nngram_range = [1, 3]\n'
    )
    cmeee_docbin(tmp_path / "demos.spacy", 40)
    strategy = registry.resolve(cfg)["s"]
    assert isinstance(strategy, InContextStrategy) and strategy.per_label
    scheme = get_scheme("cmeee")
    prompt = strategy.prompts(TEXT, scheme)[1]
    plain = SymbolStrategy().prompt(TEXT, scheme, "sym")
    assert (prompt.system, prompt.instruction, prompt.label) == (plain.system, plain.instruction, "sym")
    assert prompt.input.endswith(plain.input) and prompt.input.count("示例") == 2 and "答案：\n临床表现：" in prompt.input
    # the answer format is the base strategy's, including what a constrained decoder needs
    assert strategy.copy_constraint(TEXT, prompt) == SymbolStrategy().copy_constraint(TEXT, prompt)
    assert InContextStrategy(JsonStrategy(), TfidfRetriever().fit(DEMOS)).copy_constraint(TEXT, prompt) is None


# -- build-instructions ----------------------------------------------------------------------
def test_build_records_counts_and_skips(tmp_path, cmeee_docbin):
    records = cmeee_docbin(tmp_path / "train.spacy", 12)
    docs = list(DocBin().from_disk(tmp_path / "train.spacy").get_docs(spacy.blank("zh").vocab))
    n_entities = sum(len({(e["type"], e["start_idx"], e["end_idx"]) for e in r["entities"]}) for r in records)
    alpaca, messages, stats = build_records(docs, JsonStrategy(), get_scheme("cmeee"))
    assert (stats.records, stats.docs, stats.entities, len(alpaca), len(messages)) == (12, 12, n_entities, 12, 12)
    assert stats.prompt_size == sum(len(r["system"]) + len(r["instruction"]) + 2 + len(r["input"]) for r in alpaca)
    assert stats.response_size == sum(len(r["output"]) for r in alpaca)
    # a scheme lacking some of the gold types: those mentions are left out and counted
    partial = LabelScheme.from_dict({"dis": "疾病", "sym": "临床表现"})
    _, _, stats = build_records(docs, JsonStrategy(), partial)
    kept = sum(1 for r in records for e in r["entities"] if e["type"] in ("dis", "sym"))
    assert stats.entities == kept and sum(stats.skipped.values()) == n_entities - kept
    # tokens through a chat template: a character tokenizer gives one token per character
    from spacy_medllm.llm.tiny import build_char_tokenizer

    tokenizer = build_char_tokenizer("".join(r["system"] + r["instruction"] + r["input"] + r["output"] for r in alpaca))
    _, _, stats = build_records(docs[:3], JsonStrategy(), get_scheme("cmeee"), tokenizer=tokenizer)
    chars = sum(len(r["system"]) + len(r["instruction"]) + 2 + len(r["input"]) + len(r["output"]) for r in alpaca[:3])
    assert stats.unit == "tokens" and chars < stats.prompt_size + stats.response_size < chars + 3 * 40  # role markers
    with pytest.raises(ValueError, match="Unknown strategy"):
        make_strategy("regex")
    with pytest.raises(ValueError, match="--demos"):
        make_strategy("incontext")
    assert set(STRATEGIES) == {"symbol", "json", "html", "index", "mark", "entity_category"}


def test_build_instructions_cli(tmp_path, cmeee_docbin):
    records = cmeee_docbin(tmp_path / "train.spacy", 8)
    n_entities = sum(len(r["entities"]) for r in records)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "spacy", "medllm", "build-instructions", str(tmp_path / "train.spacy"), str(out),
           "--strategy", "symbol", "--scheme", "cmeee"]
    proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf8", timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert f"records {8 * 9}, docs 8, entities {n_entities}, chars" in proc.stdout
    assert "8/8" in proc.stderr and "doc/s" in proc.stderr  # the progress bar
    alpaca = list(srsly.read_jsonl(out / "train.symbol.alpaca.jsonl"))
    messages = list(srsly.read_jsonl(out / "train.symbol.messages.jsonl"))
    assert len(alpaca) == len(messages) == 72
    assert [m["role"] for m in messages[0]["messages"]] == ["system", "user", "assistant"]
    assert messages[0]["messages"][2]["content"] == alpaca[0]["output"]
    # what was written parses back to the gold docs
    strategy, scheme = SymbolStrategy(), get_scheme("cmeee")
    for n, record in enumerate(records):
        prompts = strategy.prompts(record["text"], scheme)
        found = sorted((m.label, m.start, m.end - 1) for k, p in enumerate(prompts)
                       for m in strategy.parse(record["text"], alpaca[n * 9 + k]["output"], p).mentions)
        assert found == sorted((e["type"], e["start_idx"], e["end_idx"]) for e in record["entities"])
    # in-context mode from the command line
    cmd = [sys.executable, "-m", "spacy", "medllm", "build-instructions", str(tmp_path / "train.spacy"), str(out),
           "--strategy", "incontext", "--demos", str(tmp_path / "train.spacy"), "--base", "entity_category", "--k", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf8", timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    rows = list(srsly.read_jsonl(out / "train.incontext.alpaca.jsonl"))
    assert len(rows) == 8 and all(r["input"].count("示例") == 2 for r in rows)
    # a clear error where the user must act
    bad = subprocess.run(cmd[:-6] + ["--strategy", "regex"], capture_output=True, text=True, encoding="utf8", timeout=300)
    assert bad.returncode == 1 and "Unknown strategy" in bad.stdout


def test_mentions_from_docbin_round_trip(tmp_path, cmeee_docbin):
    records = cmeee_docbin(tmp_path / "d.spacy", 5)
    docs = DocBin().from_disk(tmp_path / "d.spacy").get_docs(spacy.blank("zh").vocab)
    for doc, record in zip(docs, records):
        assert sorted((m.label, m.start, m.end) for m in mentions_from_doc(doc)) == sorted(
            (e["type"], e["start_idx"], e["end_idx"] + 1) for e in record["entities"])
