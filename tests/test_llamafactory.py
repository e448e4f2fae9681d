"""The way out to LLaMA-Factory: build-instructions writes a dataset_info.json whose
entries, read the way LLaMA-Factory's converters read them, give byte for byte the prompts
medllm_ner sends, records carry entity counts, --template takes a custom prompt template,
and a LoRA adapter folder as LLaMA-Factory writes it loads into medllm_ner."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import spacy
import srsly
import torch

from spacy_medllm.cli.build_instructions import make_strategy
from spacy_medllm.labels import get_scheme
from spacy_medllm.llm.generation import format_prompt
from spacy_medllm.llm.loader import clear_cache
from spacy_medllm.llm.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_model
from spacy_medllm.strategies.symbol import SymbolStrategy
from spacy_medllm.training.sft_data import read_chat_records

ROOT = Path(__file__).resolve().parents[1]
TINY_TEMPLATE = ROOT / "configs" / "templates" / "symbol_tiny.zh.jinja"


def lf_convert(record, attr):
    """LLaMA-Factory's Alpaca / ShareGPT converters (data/converter.py) for a plain
    one-turn record: (system, user message, response)."""
    columns = attr.get("columns", {})
    if attr["formatting"] == "alpaca":
        query = [record[columns[c]] for c in ("prompt", "query") if columns.get(c) and record[columns[c]]]
        system = record[columns["system"]] if columns.get("system") else ""
        return system, "\n".join(query), record[columns["response"]]
    tags = attr["tags"]
    messages = record[columns["messages"]]
    system = ""
    if messages[0][tags["role_tag"]] == tags["system_tag"]:
        system, messages = messages[0][tags["content_tag"]], messages[1:]
    (user, answer) = messages
    assert (user[tags["role_tag"]], answer[tags["role_tag"]]) == (tags["user_tag"], tags["assistant_tag"])
    return system, user[tags["content_tag"]], answer[tags["content_tag"]]


def lf_qwen_prompt(system: str, user: str) -> str:
    """LLaMA-Factory's ``qwen`` template (format_system, format_user) for the first turn."""
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return head + f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def test_llamafactory_reads_the_prompts_medllm_ner_sends(tmp_path, cmeee_docbin):
    records = cmeee_docbin(tmp_path / "train.spacy", 4)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "spacy", "medllm", "build-instructions", str(tmp_path / "train.spacy"), str(out),
           "--strategy", "symbol", "--scheme", "cmeee", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf8", timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    info = json.loads((out / "dataset_info.json").read_text(encoding="utf8"))
    assert set(info) == {"train.symbol.alpaca", "train.symbol.messages"}
    strategy, scheme = SymbolStrategy(), get_scheme("cmeee")
    prompts = [p for r in records for p in strategy.prompts(r["text"], scheme)]
    tokenizer = build_char_tokenizer("".join(r["text"] for r in records))  # a ChatML chat template
    for name, attr in info.items():
        rows = list(srsly.read_jsonl(out / attr["file_name"]))
        assert len(rows) == len(prompts) == 4 * 9
        for row, prompt in zip(rows, prompts):
            system, user, response = lf_convert(row, attr)
            assert system and response
            sent = format_prompt(tokenizer, prompt.messages())  # what medllm_ner sends
            assert lf_qwen_prompt(system, user) == sent, name
            assert tokenizer.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": user}], tokenize=False,
                add_generation_prompt=True,
            ) == sent
    # LLaMA-Factory's default Alpaca columns join instruction and input with one newline: not what is sent
    row = next(srsly.read_jsonl(out / "train.symbol.alpaca.jsonl"))
    assert "\n".join([row["instruction"], row["input"]]) != row["user"]
    # entity counts: what negative_ratio needs, as many as the answer marks
    chat = read_chat_records(out / "train.symbol.messages.jsonl")
    assert all(r.n_entities == r.messages[-1][1].count("[") for r in chat)
    assert sum(r.n_entities for r in chat) == sum(len({(e["type"], e["start_idx"], e["end_idx"]) for e in r["entities"]}) for r in records)


def test_custom_prompt_template(tmp_path):
    strategy = make_strategy("symbol", template=TINY_TEMPLATE)
    prompt = strategy.prompts("患者头痛", get_scheme("cmeee"))[0]
    assert prompt.user == SymbolStrategy(template=str(TINY_TEMPLATE)).prompts("患者头痛", get_scheme("cmeee"))[0].user
    assert prompt.user != SymbolStrategy().prompts("患者头痛", get_scheme("cmeee"))[0].user
    with pytest.raises(ValueError, match="does not exist"):
        make_strategy("symbol", template=tmp_path / "missing.jinja")


def test_a_llamafactory_lora_folder_loads_into_medllm_ner(tmp_path):
    from peft import LoraConfig, get_peft_model

    from spacy_medllm.llm.generation import GenerationRequest, HFGenerator

    text = "患者头痛伴呕吐三天"
    tokenizer = build_char_tokenizer(text + "[]：临床表现疾病")
    base = tmp_path / "base"
    build_tiny_model(tokenizer, TinyModelConfig(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    # LLaMA-Factory's LoRA output folder: the peft adapter, the tokenizer, and its trainer's files
    lf = tmp_path / "saves" / "lora" / "sft"
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"),
    )
    model.save_pretrained(lf)
    tokenizer.save_pretrained(lf)
    for name, content in {"trainer_state.json": "{}", "train_results.json": "{}", "all_results.json": "{}", "README.md": "# lora"}.items():
        (lf / name).write_text(content, encoding="utf8")
    (lf / "training_args.bin").write_bytes(b"\x80\x04N.")
    clear_cache()
    nlp = spacy.blank("zh")
    ner = nlp.add_pipe("medllm_ner", config={
        "model": {"@misc": "spacy_medllm.ModelSpec.v1", "path": str(base), "dtype": "float32"}, "adapter": str(lf),
    })
    nlp(text)
    request = [GenerationRequest(text, chat=True, max_new_tokens=6)]
    with_adapter = HFGenerator(ner.lm, ner._adapter_name).generate(request)[0].text
    # the same adapter applied by peft directly
    model.eval()
    ids = tokenizer(format_prompt(tokenizer, [{"role": "user", "content": text}]), return_tensors="pt", add_special_tokens=False).input_ids
    direct = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert with_adapter == tokenizer.decode(direct[0, ids.shape[1]:], skip_special_tokens=True)
    plain = AutoModelForCausalLM.from_pretrained(base).generate(ids, max_new_tokens=6, do_sample=False)
    assert with_adapter != tokenizer.decode(plain[0, ids.shape[1]:], skip_special_tokens=True)  # the adapter acts
    clear_cache()
