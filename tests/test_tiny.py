"""The embedded tiny model: character and BPE tokenizers, model builder, init-tiny CLI."""
import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from spacy_medllm.llm.loader import ModelSpec, load_lm
from spacy_medllm.llm.tiny import (
    CHATML_TEMPLATE,
    IM_END,
    IM_START,
    PAD_TOKEN,
    TinyModelConfig,
    build_bpe_tokenizer,
    build_char_tokenizer,
    build_tiny_model,
    init_tiny,
    read_corpus_text,
)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
ROUND_TRIP = [
    "患者可高热39～40℃，神志大多清晰。",
    "Headache  with   fever, BP 120/80.",
    "  leading and trailing spaces  ",
    "[高热]是[症状]，[[精神]失常]",
    "tab\tnew\nline\r\nend",
    "（括号）【方括】“引号”",
    "0123456789 !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
]
CORPUS = "患者可高热，标注" + "".join(ROUND_TRIP)  # the vocabulary covers every test string


@pytest.fixture(scope="module")
def char_tok():
    return build_char_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def bracket_corpus():
    """CMeEE sentences with every entity wrapped in brackets, as symbol-strategy answers are."""
    records = json.loads((ASSETS / "cmeee_train.json").read_text(encoding="utf8"))[:400]
    texts = []
    for record in records:
        text = record["text"]
        for ent in sorted(record["entities"], key=lambda e: -e["start_idx"]):
            s, e = ent["start_idx"], ent["end_idx"] + 1
            text = text[:s] + "[" + text[s:e] + "]" + text[e:]
        texts.append(text)
    return texts


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_char_tokenizer_round_trip_one_token_per_char(char_tok, text):
    ids = char_tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)
    assert char_tok.decode(ids) == text
    assert [char_tok.decode([i]) for i in ids] == list(text)


@pytest.mark.parametrize("arch,tokenizer_class", [("qwen2", "Qwen2Tokenizer"), ("llama", "TokenizersBackend")])
def test_char_tokenizer_reloads_identically_with_the_model(char_tok, tmp_path, arch, tokenizer_class):
    """transformers 5 rebuilds a qwen2 checkpoint's tokenizer as Qwen2Tokenizer from the saved
    vocab and merges; the character tokenizer must come back unchanged."""
    build_tiny_model(char_tok, TinyModelConfig(arch=arch, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)).save_pretrained(tmp_path)
    char_tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded).__name__ == tokenizer_class
    assert loaded.get_vocab() == char_tok.get_vocab()
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.padding_side) == (2, 0, "left")
    for text in ROUND_TRIP + ["龘 é"]:
        ids = loaded.encode(text, add_special_tokens=False)
        assert ids == char_tok.encode(text, add_special_tokens=False)
        assert loaded.decode(ids) == text


def test_char_tokenizer_special_tokens_and_chat_template(char_tok):
    ids = {tok: char_tok.convert_tokens_to_ids(tok) for tok in (PAD_TOKEN, IM_START, IM_END)}
    assert ids == {PAD_TOKEN: 0, IM_START: 1, IM_END: 2}
    assert (char_tok.eos_token, char_tok.pad_token) == (IM_END, PAD_TOKEN)
    messages = [{"role": "system", "content": "标注"}, {"role": "user", "content": "高热"}]
    prompt = char_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>system\n标注<|im_end|>\n<|im_start|>user\n高热<|im_end|>\n<|im_start|>assistant\n"
    ids_prompt = char_tok.encode(prompt, add_special_tokens=False)
    # 3 x im_start, 2 x im_end: each special token is one id, everything else one id per char
    assert ids_prompt.count(1) == 3 and ids_prompt.count(2) == 2
    assert len(ids_prompt) == len(prompt) - 3 * (len(IM_START) - 1) - 2 * (len(IM_END) - 1)
    assert char_tok.decode(ids_prompt) == prompt
    assert char_tok.decode(ids_prompt, skip_special_tokens=True) == "system\n标注\nuser\n高热\nassistant\n"


def test_char_tokenizer_unknown_character_falls_back_to_bytes(char_tok):
    ids = char_tok.encode("高龘热", add_special_tokens=False)
    assert len(ids) == 1 + len("龘".encode("utf8")) + 1
    assert char_tok.decode(ids) == "高龘热"
    assert char_tok.decode(ids[1:4]) == "龘"


def test_read_corpus_text_handles_bom_and_json_escapes(tmp_path):
    (tmp_path / "a.txt").write_bytes("\ufeff患者".encode("utf8"))
    (tmp_path / "b.json").write_text(json.dumps({"text": "龘麤"}, ensure_ascii=True), encoding="utf8")
    (tmp_path / "c.jsonl").write_bytes(b"\xff\xfe broken \xe9\xab\x98\n")
    text = read_corpus_text([tmp_path / "a.txt", tmp_path / "b.json", tmp_path / "c.jsonl"])
    assert "\ufeff" not in text
    assert {"患", "者", "龘", "麤", "高"} <= set(text)
    tok = build_char_tokenizer(text)
    assert len(tok.encode("龘高麤", add_special_tokens=False)) == 3
    assert len(tok.encode("\ufffd", add_special_tokens=False)) == 3  # a decoding error is no character


def test_bpe_tokenizer_multi_char_tokens_and_bracket_glue(bracket_corpus):
    tok = build_bpe_tokenizer(bracket_corpus, vocab_size=2000)
    assert len(tok) == 2000
    pieces = [tok.decode([i]) for i in range(len(tok)) if i not in tok.all_special_ids]
    assert sum(len(p) > 1 for p in pieces) > 500
    glued = [p for p in pieces if "[" in p and any("\u4e00" <= ch <= "\u9fff" for ch in p)]
    assert glued, "no token glues [ to Chinese text"
    for text in bracket_corpus[:50] + ROUND_TRIP:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    sample = bracket_corpus[0]
    assert len(tok.encode(sample, add_special_tokens=False)) < len(sample)
    assert tok.convert_tokens_to_ids(IM_END) == tok.eos_token_id == 2
    assert tok.chat_template == CHATML_TEMPLATE
    prompt = tok.apply_chat_template([{"role": "user", "content": "高热"}], tokenize=False, add_generation_prompt=True)
    assert tok.decode(tok.encode(prompt, add_special_tokens=False)) == prompt
    assert tok.decode(tok.encode("龘 é", add_special_tokens=False)) == "龘 é"


@pytest.mark.parametrize("arch,cls_name", [("qwen2", "Qwen2ForCausalLM"), ("llama", "LlamaForCausalLM")])
def test_build_tiny_model(char_tok, arch, cls_name):
    model = build_tiny_model(char_tok, TinyModelConfig(arch=arch, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64))
    assert type(model).__name__ == cls_name
    assert model.config.vocab_size == len(char_tok)
    assert model.config.num_key_value_heads == 2
    assert model.generation_config.eos_token_id == char_tok.eos_token_id
    assert model.generation_config.pad_token_id == char_tok.pad_token_id
    again = build_tiny_model(char_tok, TinyModelConfig(arch=arch, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64))
    assert all((a == b).all() for a, b in zip(model.parameters(), again.parameters()))


def test_tiny_config_rejects_bad_shapes():
    with pytest.raises(ValueError, match="architecture"):
        TinyModelConfig(arch="gpt2")
    with pytest.raises(ValueError, match="divisible"):
        TinyModelConfig(hidden=30, heads=4)
    with pytest.raises(ValueError, match="divisible"):
        TinyModelConfig(heads=4, kv_heads=3)


def test_init_tiny_saves_a_loadable_model(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf8")
    out = tmp_path / "tiny"
    model = init_tiny(out, [corpus], TinyModelConfig(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64))
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    gen_config = json.loads((out / "generation_config.json").read_text())
    lm = load_lm(ModelSpec(str(out), device="cpu"))
    assert gen_config["eos_token_id"] == lm.tokenizer.convert_tokens_to_ids(IM_END)
    assert sum(p.numel() for p in lm.model.parameters()) == sum(p.numel() for p in model.parameters())
    assert lm.tokenizer.decode(lm.tokenizer.encode(ROUND_TRIP[3], add_special_tokens=False)) == ROUND_TRIP[3]


def test_init_tiny_cli(tmp_path):
    out = tmp_path / "cli_tiny"
    cmd = [sys.executable, "-m", "spacy", "medllm", "init-tiny", str(out), "--corpus", str(ASSETS / "cmeee_dev.json"),
           "--corpus", str(ASSETS / "ccks2019_sample.txt"), "--arch", "llama", "--hidden", "32", "--layers", "1",
           "--heads", "2", "--kv-heads", "1", "--intermediate", "64", "--seed", "3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "Saved a tiny llama model" in done.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == 32
    assert config["tie_word_embeddings"] is True  # the CLI ties: what lets a small model copy
    tok = AutoTokenizer.from_pretrained(out)
    assert config["vocab_size"] == len(tok)
    ccks_text = unicodedata.normalize("NFC", read_corpus_text([ASSETS / "ccks2019_sample.txt"]))
    assert len(tok.encode(ccks_text, add_special_tokens=False)) == len(ccks_text)


def test_init_tiny_cli_rejects_a_bad_architecture(tmp_path):
    from typer.testing import CliRunner

    from spacy_medllm.cli import medllm_cli

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf8")
    result = CliRunner().invoke(medllm_cli, ["init-tiny", str(tmp_path / "out"), "--corpus", str(corpus), "--arch", "gpt2"])
    assert result.exit_code == 1
    assert "Unknown tiny architecture" in result.output
    assert not (tmp_path / "out").exists()


def test_tied_model_stays_tied_through_save_and_load(char_tok, tmp_path):
    """One matrix embeds and unembeds, after a round trip through disk too."""
    shape = dict(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    tied = build_tiny_model(char_tok, TinyModelConfig(**shape, tie_embeddings=True))
    untied = build_tiny_model(char_tok, TinyModelConfig(**shape))
    saved = sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters())
    assert saved == len(char_tok) * 32  # the output layer is the embedding
    tied.save_pretrained(tmp_path / "tied")
    char_tok.save_pretrained(tmp_path / "tied")
    model = load_lm(ModelSpec(str(tmp_path / "tied"), device="cpu")).model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert (model.get_input_embeddings().weight == tied.get_input_embeddings().weight).all()


def test_embedded_model_prompts_without_role_markers():
    """The shipped model learned to copy in chat_plain.jinja: prompt, newline, then the answer;
    training splits such a record into prompt and answer exactly where generation starts."""
    from spacy_medllm.embedded import EMBEDDED_DIR
    from spacy_medllm.labels import get_scheme
    from spacy_medllm.strategies.symbol import SymbolStrategy
    from spacy_medllm.training.sft_data import ChatRecord, encode_chat
    from spacy_medllm.types import Mention

    lm = load_lm(ModelSpec("embedded", device="cpu"))
    shipped = (EMBEDDED_DIR / "chat_template.jinja").read_text(encoding="utf8")
    assert shipped == (Path(__file__).resolve().parents[1] / "configs" / "templates" / "chat_plain.jinja").read_text(encoding="utf8")
    strategy = SymbolStrategy(str(EMBEDDED_DIR / "prompt_template.jinja"))
    text = "患者头痛"
    prompt = strategy.prompt(text, get_scheme("cmeee"), "sym")
    answer = strategy.render_target(text, [Mention("sym", "头痛", 2, 4)], prompt)
    messages = prompt.messages(answer)
    assert lm.tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True) == f"{IM_START}{text}\n临床表现\n"
    record = ChatRecord(tuple((m["role"], m["content"]) for m in messages), "t", 1)
    encoded = encode_chat(lm.tokenizer, record, [lm.tokenizer.convert_tokens_to_ids(IM_END)])
    learned = [t for t, label in zip(encoded.input_ids, encoded.labels) if label != -100]
    assert lm.tokenizer.decode(learned) == "临床表现：患者[头痛]" + IM_END
