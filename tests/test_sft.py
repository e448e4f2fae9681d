"""Instruction tuning on the Trainer: the response-only label mask and weighted loss by
hand, length buckets and their split across processes, full / LoRA / QLoRA training of tiny
models (the loss falls), resume = uninterrupted, reproducibility, a two-process gloo run =
one process with the doubled batch, the saved output reloading through the shared loader,
clear errors, and the CLI."""
from collections import Counter
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spacy_medllm.labels import get_scheme
from spacy_medllm.llm.generation import GenerationRequest, HFGenerator, stop_token_ids
from spacy_medllm.errors import MedLLMLoadError, SFTError
from spacy_medllm.llm.loader import ModelSpec, clear_cache, load_lm
from spacy_medllm.llm.tiny import (
    TinyModelConfig,
    build_char_tokenizer,
    build_tiny_model,
)
from spacy_medllm.scoring import CharSpan
from spacy_medllm.strategies.symbol import SymbolStrategy
from spacy_medllm.alignment import place_mention
from spacy_medllm.recognizer import RecognizerSettings
from spacy_medllm.training.evaluate import DevExample, GenerationEvaluator
from spacy_medllm.training.hf_trainer import EpochBatches, answer_weights, weighted_lm_loss
from spacy_medllm.training.sft import LoraSettings, SFTConfig, SFTModel, train_sft
from spacy_medllm.training.sft_data import (
    IGNORE_INDEX,
    ChatRecord,
    GoldText,
    clauses,
    collate,
    encode_chat,
    epoch_batches,
    mix_clauses,
    read_chat_records,
    strategy_records,
    token_weight_vector,
)
from spacy_medllm.types import Mention

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "configs" / "templates" / "symbol_tiny.zh.jinja"
TEXTS = [
    ("患者头痛伴呕吐三天", [("sym", 2, 4), ("sym", 5, 7)]),
    ("肺炎患者发热", [("dis", 0, 2), ("sym", 4, 6)]),
    ("服用阿司匹林后胃痛", [("dru", 2, 6), ("sym", 7, 9), ("bod", 7, 8)]),
    ("心电图检查正常", [("pro", 0, 3)]),
]


def gold_texts():
    return [GoldText(t, tuple(Mention(lab, t[s:e], s, e) for lab, s, e in ents), f"t:{i}") for i, (t, ents) in enumerate(TEXTS)]


def symbol_records(labels=("sym", "dis")):
    scheme = get_scheme("cmeee")
    records = strategy_records(gold_texts(), SymbolStrategy(template=str(TEMPLATE)), scheme)
    names = {scheme.display(code) for code in labels}
    return [r for r in records if r.messages[-1][1].split("：")[0] in names]


def corpus_chars():
    return "".join(t for t, _ in TEXTS) + "[]：" + "".join(info.name for info in get_scheme("cmeee"))


def save_tiny(path: Path, arch: str = "qwen2", hidden: int = 32) -> Path:
    tokenizer = build_char_tokenizer(corpus_chars())
    model = build_tiny_model(tokenizer, TinyModelConfig(arch=arch, hidden=hidden, layers=2, heads=2, kv_heads=1, intermediate=64))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "qwen2")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama fully fine-tuned on the sym/dis records: LoRA on a random base barely
    moves the loss (its output layer is near zero and frozen), as on no real checkpoint."""
    root = tmp_path_factory.mktemp("tiny")
    base = save_tiny(root / "llama", arch="llama")
    model = SFTModel(base=ModelSpec(path=str(base), dtype="float32"), method="full")
    return train_sft(model, symbol_records(), quick_config(max_steps=30), root / "pre").model_last


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


def quick_config(**overrides):
    settings = dict(
        learning_rate=1e-2, batch_size=4, max_steps=6, warmup_ratio=0.0, num_threads=1, progress_bar=False,
        log_every=1000, cutoff_len=256,
    )
    settings.update(overrides)
    return SFTConfig(**settings)


# -- data --------------------------------------------------------------------------------
def test_label_mask_covers_the_answer_and_end_of_turn_only(qwen_dir):
    tokenizer = load_lm(ModelSpec(path=str(qwen_dir))).tokenizer
    record = ChatRecord((("system", ""), ("user", "头痛\n临床表现"), ("assistant", "临床表现：[头痛]")), "x:1")
    enc = encode_chat(tokenizer, record, stop_token_ids(tokenizer))
    pieces = [tokenizer.decode([i]) for i in enc.input_ids]
    text = "".join(pieces)
    # the ChatML layout, char by char: the prompt ends with the assistant header
    prompt = "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n头痛\n临床表现<|im_end|>\n<|im_start|>assistant\n"
    assert text == prompt + "临床表现：[头痛]<|im_end|>"
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert enc.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    answer = pieces[n_prompt:]
    assert enc.labels[n_prompt:] == enc.input_ids[n_prompt:]
    assert answer == list("临床表现：[头痛]") + ["<|im_end|>"]  # no trailing "\n" after the end of turn


def test_strategy_records_count_entities_per_type():
    records = strategy_records(gold_texts(), SymbolStrategy(template=str(TEMPLATE)), get_scheme("cmeee"))
    assert len(records) == 4 * 9  # one record per type and text
    first = {r.messages[-1][1]: r.n_entities for r in records if r.source == "t:0"}
    assert first["临床表现：患者[头痛]伴[呕吐]三天"] == 2
    assert first["疾病：患者头痛伴呕吐三天"] == 0


def test_clause_mixing_keeps_every_mention_valid():
    gold = GoldText("头痛，伴呕吐；肺炎，无", (Mention("sym", "头痛", 0, 2), Mention("sym", "呕吐", 4, 6), Mention("dis", "肺炎，无", 7, 11)), "g")
    # no cut inside 肺炎，无 (a mention across a comma)
    assert [c.text for c in clauses(gold)] == ["头痛，", "伴呕吐；", "肺炎，无"]
    mixed = mix_clauses([gold] + gold_texts(), 50, seed=3)
    assert len(mixed) == 50 and len({m.text for m in mixed}) > 10
    for text in mixed:
        for m in text.mentions:
            assert text.text[m.start : m.end] == m.text
    assert mix_clauses([gold], 5, seed=3) == mix_clauses([gold], 5, seed=3)
    noisy = mix_clauses(gold_texts(), 200, seed=1, noise=0.5)
    changed = total = 0
    for text, clean in zip(noisy, mix_clauses(gold_texts(), 200, seed=1)):
        inside = {i for m in clean.mentions for i in range(m.start, m.end)}
        assert all(text.text[i] == clean.text[i] for i in inside) and text.mentions == clean.mentions
        changed += sum(a != b for a, b in zip(text.text, clean.text))
        total += len(clean.text) - len(inside)
    assert 0.25 < changed / total < 0.55  # half replaced, some by the same character


def test_read_chat_records_skips_and_reports_bad_lines(tmp_path, capsys):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "meta": {"n_entities": 0}}
    path = tmp_path / "d.messages.jsonl"
    path.write_text(json.dumps(good) + "\n{oops\n" + json.dumps({"messages": [{"role": "user", "content": "a"}]}) + "\n", encoding="utf8")
    records = read_chat_records(path)
    assert [(r.source, r.n_entities) for r in records] == [(f"{path}:1", 0)]
    out = " ".join(capsys.readouterr().out.split())  # wasabi wraps long lines
    assert "Skipped 2 malformed" in out and f"{path}:2: bad JSON" in out and f"{path}:3:" in out
    with pytest.raises(SFTError, match="does not exist.*build-instructions"):
        read_chat_records(tmp_path / "missing.jsonl")


def test_length_buckets_negative_subsampling_and_determinism():
    lengths = [(i * 37) % 101 for i in range(200)]
    negatives = [i % 4 != 0 for i in range(200)]  # 150 negatives
    args = dict(batch_size=5, bucket_batches=4, negative_ratio=1 / 3, seed=7)
    batches = epoch_batches(lengths, negatives, epoch=0, **args)
    used = [i for b in batches for i in b]
    assert len(used) == len(set(used)) == 50 + 50
    assert {i for i in used if not negatives[i]} == {i for i in range(200) if not negatives[i]}
    # within a chunk of 20 records sorted by length, a batch spans a fifth of the chunk's range
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 30
    assert epoch_batches(lengths, negatives, epoch=0, **args) == batches
    assert epoch_batches(lengths, negatives, epoch=1, **args) != batches


def test_trainer_batches_labels_and_weighted_loss_by_hand(qwen_dir):
    lm = load_lm(ModelSpec(path=str(qwen_dir), dtype="float32"))
    tokenizer, model = lm.tokenizer, lm.model
    encoded = [encode_chat(tokenizer, r, stop_token_ids(tokenizer)) for r in symbol_records()[:2]]
    batch = collate(encoded, pad_id=0)
    width = max(len(e.input_ids) for e in encoded)
    for row, enc in zip(batch["labels"].tolist(), encoded):  # the collator keeps encode_chat's mask
        assert row == enc.labels + [IGNORE_INDEX] * (width - len(enc.labels))
    weights = token_weight_vector(tokenizer, {"[": 3.0, "]": 3.0}, len(tokenizer))
    total = answer_weights(batch["labels"], weights).sum()
    with torch.no_grad():
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = weighted_lm_loss(weights)(outputs, batch["labels"], num_items_in_batch=total)
        hand_sum, hand_weight = 0.0, 0.0
        for r, enc in enumerate(encoded):  # next-token cross-entropy of each answer token
            logp = torch.log_softmax(outputs.logits[r].float(), -1)
            for t in range(1, len(enc.labels)):
                if enc.labels[t] != IGNORE_INDEX:
                    w = 3.0 if tokenizer.convert_ids_to_tokens(enc.labels[t]) in "[]" else 1.0
                    hand_sum -= w * float(logp[t - 1, enc.labels[t]])
                    hand_weight += w
    assert float(total) == hand_weight and abs(float(loss) - hand_sum / hand_weight) < 1e-5
    # two processes take the halves of the same global batches, in the same order
    lengths, negatives = [5, 9, 3, 7, 8, 2, 6, 4, 1, 5], [False] * 10  # the last global batch has 2 records
    config = quick_config(batch_size=2, bucket_batches=2)
    one = list(EpochBatches(lengths, negatives, quick_config(batch_size=4, bucket_batches=2)))
    halves = [list(EpochBatches(lengths, negatives, config, 2, rank)) for rank in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == one and len(halves[0]) == len(halves[1])


def test_token_weights_match_bracket_tokens(qwen_dir):
    tokenizer = load_lm(ModelSpec(path=str(qwen_dir))).tokenizer
    vector = token_weight_vector(tokenizer, {"[": 3.0, "]": 2.0}, len(tokenizer))
    assert vector[tokenizer.convert_tokens_to_ids("[")] == 3.0
    assert vector[tokenizer.convert_tokens_to_ids("]")] == 2.0
    assert float(vector.sum()) == len(tokenizer) + 3.0
    with pytest.raises(SFTError, match="occur in no token"):
        token_weight_vector(tokenizer, {"§§": 2.0}, len(tokenizer))


# -- training ----------------------------------------------------------------------------
def test_full_fine_tuning_loss_falls_and_reloads(qwen_dir, tmp_path):
    records = symbol_records()[:4]  # one batch, repeated
    result = train_sft(
        SFTModel(base=ModelSpec(path=str(qwen_dir), dtype="float32"), method="full"),
        records, quick_config(max_steps=40, learning_rate=1e-2, warmup_ratio=0.1), tmp_path / "out",
    )
    assert result.losses[-1] < 0.25 * result.losses[0], result.losses
    assert (result.model_last / "model.safetensors").exists() and (result.model_best / "tokenizer.json").exists()
    lm = load_lm(ModelSpec(path=str(result.model_last)))
    # the model answers a training prompt with the learned answer
    messages = [{"role": role, "content": content} for role, content in records[0].messages[:-1]]
    out = HFGenerator(lm).generate([GenerationRequest(messages, max_new_tokens=40)])[0]
    assert out.text == records[0].messages[-1][1]
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 40 and "eval" in log[-1]


def test_resume_equals_uninterrupted_run_and_runs_are_reproducible(qwen_dir, tmp_path):
    model = SFTModel(base=ModelSpec(path=str(qwen_dir), dtype="float32"), method="lora", lora=LoraSettings(r=4, alpha=8, dropout=0.1))
    records = symbol_records()
    # 6 of the 8 records an epoch (2 of the 4 negatives, drawn anew each epoch): 3 steps; checkpoints
    # every 2 steps and at each epoch end; 2 is inside the first epoch, 4 inside the second
    config = quick_config(max_steps=7, batch_size=2, save_every=2, keep_checkpoints=5, learning_rate=5e-3, negative_ratio=0.5)
    full = train_sft(model, records, config, tmp_path / "a")
    again = train_sft(model, records, config, tmp_path / "b")
    checkpoints = tmp_path / "a" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"checkpoint-{n}" for n in (2, 3, 4, 6, 7)]
    resumed = [train_sft(model, records, config, tmp_path / f"c{step}", resume_from=checkpoints / f"checkpoint-{step}") for step in (2, 4)]
    weights = [load_file(str(r.model_last / "adapter_model.safetensors")) for r in (full, again, *resumed)]
    for other in weights[1:]:
        assert other.keys() == weights[0].keys()
        for name in weights[0]:
            assert torch.equal(weights[0][name], other[name]), name
    assert resumed[0].losses == full.losses[2:] and resumed[1].losses == full.losses[4:]
    with pytest.raises(SFTError, match="not a training checkpoint"):
        train_sft(model, records, config, tmp_path / "d", resume_from=tmp_path / "a")


def test_lora_on_llama_trains_only_the_adapter(llama_dir, tmp_path):
    model = SFTModel(base=ModelSpec(path=str(llama_dir), dtype="float32"), method="lora", lora=LoraSettings(r=8, alpha=16, dropout=0.0))
    records = symbol_records(("dru", "bod", "pro"))[:4]  # types the base has not seen
    result = train_sft(model, records, quick_config(max_steps=30, learning_rate=2e-2, mixed_precision="bf16"), tmp_path / "out")
    assert result.losses[-1] < 0.8 * result.losses[0], result.losses  # under bf16 autocast
    config = json.loads((result.model_last / "adapter_config.json").read_text())
    assert config["r"] == 8 and Path(config["base_model_name_or_path"]) == llama_dir
    adapter = load_file(str(result.model_last / "adapter_model.safetensors"))
    assert adapter and all("lora_" in name for name in adapter)
    assert any("mlp" in name for name in adapter) and any("self_attn" in name for name in adapter)  # all-linear


def test_qlora_on_a_4bit_qwen2_base_reloads_and_generates(tmp_path):
    base = save_tiny(tmp_path / "base", hidden=64)  # 4-bit blocks are 64 values
    model = SFTModel(
        base=ModelSpec(path=str(base), bnb_4bit_compute_dtype="float32"), method="qlora", lora=LoraSettings(r=4, alpha=8),
        gradient_checkpointing=True,
    )
    assert model.spec.quantization == "4bit"
    result = train_sft(model, symbol_records()[:4], quick_config(max_steps=8, learning_rate=2e-2), tmp_path / "out")
    assert result.losses[-1] < result.losses[0]
    lm = load_lm(ModelSpec(path=str(base), quantization="4bit", bnb_4bit_compute_dtype="float32"))
    assert "Linear4bit" in {type(m).__name__ for m in lm.model.modules()}
    lm.add_adapter("ner", str(result.model_last))
    out = HFGenerator(lm, "ner").generate([GenerationRequest("头痛", chat=True, max_new_tokens=5)])[0]
    assert out.generated_tokens >= 1


def test_evaluator_scores_strict_micro_f1_by_hand():
    strategy, scheme = SymbolStrategy(template=str(TEMPLATE)), get_scheme("cmeee")
    examples = [DevExample(t, frozenset(CharSpan(s, e, lab) for lab, s, e in ents)) for t, ents in TEXTS[:2]]
    evaluator = GenerationEvaluator(examples, strategy, scheme, settings=RecognizerSettings(constrained=False), rows_per_call=1)
    calls = []

    class Echo:  # answers every prompt with the gold target, except one missed entity
        def generate(self, requests, batch_size=8):
            calls.append(len(requests))
            out = []
            for r in requests:
                text, asked = r.prompt[-1]["content"].split("\n")
                gold = [Mention(lab, text[s:e], s, e) for t, ents in TEXTS if t == text for lab, s, e in ents]
                prompt = strategy.prompt(text, scheme, scheme.code_of(asked))
                answer = strategy.render_target(text, gold, prompt).replace("[呕吐]", "呕吐")
                out.append(answer)
            return out

    predictions, discarded = evaluator.predict(Echo())
    scores = evaluator.score(predictions)
    assert (scores["n_gold"], scores["n_pred"]) == (4, 3)
    assert scores["p"] == 1.0 and scores["r"] == 0.75 and abs(scores["f"] - 6 / 7) < 1e-9
    assert not discarded
    # the 18 prompts go out in chunks of 8 batches, between which the progress bar moves
    assert calls == [8, 8, 2]
    assert place_mention(Mention("sym", "头痛", hint=2), "头痛头痛", "nearest", Counter()) == [(2, 4)]


# -- errors and CLI ----------------------------------------------------------------------
def test_wrong_model_path_and_settings_give_clear_errors(tmp_path):
    with pytest.raises(MedLLMLoadError, match="does not exist"):
        train_sft(SFTModel(base=ModelSpec(path=str(tmp_path / "nope")), method="full"), symbol_records(), quick_config(), tmp_path / "o")
    with pytest.raises(SFTError, match="mixed_precision"):
        quick_config(mixed_precision="fp8")
    with pytest.raises(SFTError, match="report_to"):
        quick_config(report_to="comet")
    with pytest.raises(SFTError, match="cannot train a 4bit"):
        SFTModel(base=ModelSpec(path="x", quantization="4bit"), method="lora")
    with pytest.raises(SFTError, match="n_entities"):
        train_sft(
            SFTModel(base=ModelSpec(path="x"), method="full"),
            [ChatRecord((("user", "a"), ("assistant", "b")), "f:1")], quick_config(negative_ratio=0.5), tmp_path / "o",
        )


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "spacy", "medllm", "train-llm", *map(str, args)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONIOENCODING": "utf8", "OMP_NUM_THREADS": "1"},
    )


def test_cli_trains_two_steps_with_overrides(qwen_dir, tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        ROOT / "configs" / "train_llm_tiny.cfg", "--output", out, "--paths.base_model", qwen_dir,
        "--corpora.train.limit", 4, "--corpora.train.mixed_texts", 4, "--training.max_steps", 2, "--training.progress_bar", "false",
        "--evaluation.limit", 2, "--evaluation.recognizer.constrained", "false", "--evaluation.recognizer.max_new_tokens", 8,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Trained 2 steps" in result.stdout
    assert (out / "model-best" / "model.safetensors").exists() and (out / "config.cfg").exists()
    assert (out / "model-best" / "prompt_template.jinja").read_text(encoding="utf8") == TEMPLATE.read_text(encoding="utf8")
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["eval"]["n_gold"] > 0
    bad = run_cli(ROOT / "configs" / "train_llm_tiny.cfg", "--output", out, "--paths.base_model", qwen_dir, "--paths.train", tmp_path / "missing.json")
    assert bad.returncode == 1 and "missing.json does not exist" in " ".join(bad.stdout.split())


def test_two_process_data_parallel_run_equals_one_process_with_the_doubled_batch(qwen_dir, tmp_path):
    records = tmp_path / "r.messages.jsonl"
    records.write_text("".join(
        json.dumps({"messages": r.as_messages(), "n_entities": r.n_entities}, ensure_ascii=False) + "\n" for r in symbol_records()
    ), encoding="utf8")
    settings = dict(learning_rate=1e-2, max_steps=4, warmup_ratio=0.0, num_threads=1, progress_bar=False, log_every=1000, bucket_batches=2)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29617",
         str(ROOT / "tests" / "ddp_train_worker.py"), str(qwen_dir), str(records), str(tmp_path / "ddp"),
         json.dumps({**settings, "batch_size": 2})],
        capture_output=True, text=True, cwd=ROOT, timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONIOENCODING": "utf8"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 process(es)" in done.stdout
    ddp = json.loads((tmp_path / "ddp" / "losses.json").read_text())
    single = train_sft(
        SFTModel(base=ModelSpec(path=str(qwen_dir), dtype="float32"), method="full"),
        read_chat_records(records), SFTConfig(**settings, batch_size=4), tmp_path / "one",
    ).losses
    assert len(ddp) == len(single) == 4 and single[-1] < single[0]
    assert ddp == pytest.approx(single, rel=1e-4), (ddp, single)
