"""medllm_ner → medllm_align on tiny models of the real architectures: prompting, parsing,
alignment policies, nlp.pipe / nlp.evaluate, disk round trips, adapters and the spacy-llm task."""
import json
from pathlib import Path

import pytest
import spacy
import torch
from spacy.training import Example

from spacy_medllm.components.align import MedLLMAlign
from spacy_medllm.labels import get_scheme
from spacy_medllm.errors import MedLLMLoadError
from spacy_medllm.llm.loader import ModelSpec, load_lm
from spacy_medllm.recognizer import Recognizer, RecognizerSettings
from spacy_medllm.scoring import score_examples
from spacy_medllm.strategies.entity_category import EntityCategoryStrategy
from spacy_medllm.strategies.symbol import SymbolStrategy
from spacy_medllm.types import Mention

torch.set_num_threads(1)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SENTENCES = ["患者出现发热、咳嗽，诊断为肺炎。", "给予阿莫西林治疗。", ""]
CMEEE = get_scheme("cmeee")


@pytest.fixture(scope="module")
def tiny_dirs(tiny_model_dir):
    return {arch: tiny_model_dir("".join(SENTENCES) + "咳嗽發熱肺炎", arch) for arch in ("qwen2", "llama")}


def char_nlp():
    return spacy.blank("zh", config={"nlp": {"tokenizer": {"@tokenizers": "spacy_medllm.CharTokenizer.v1"}}})


def make_pipeline(model_dir, constrained=True, **ner_cfg):
    nlp = char_nlp()
    recognizer = {"@misc": "spacy_medllm.Recognizer.v1", "max_new_tokens": 64, "constrained": constrained}
    cfg = {"model": {"@misc": "spacy_medllm.ModelSpec.v1", "path": str(model_dir), "device": "cpu"}, "recognizer": recognizer}
    cfg.update(ner_cfg)
    nlp.add_pipe("medllm_ner", config=cfg)
    nlp.add_pipe("medllm_align")
    return nlp


def span_tuples(doc, key="sc"):
    return [(s.start_char, s.end_char, s.label_) for s in doc.spans[key]]


# -- recognizer: prompts in, mentions out (no model) ------------------------------------------
def test_recognizer_reads_symbol_responses_into_original_offsets():
    rec = Recognizer(SymbolStrategy(), CMEEE, RecognizerSettings(max_chars=None))
    text = "患者咳嗽，诊断为肺炎。"
    jobs = rec.plan([text], lambda p: p.user)
    assert [j.prompt.label for j in jobs] == CMEEE.codes  # one prompt per type, type last
    assert all(isinstance(j.request.constraint.source, str) for j in jobs)
    answers = {"dis": "疾病：患者咳嗽，诊断为[肺炎]。", "sym": "临床表现：患者[咳嗽]，诊断为肺炎。"}
    responses = [answers.get(j.prompt.label, f"{CMEEE.display(j.prompt.label)}：{text}") for j in jobs]
    (result,) = rec.read([text], jobs, responses)
    got = sorted((m.start, m.end, m.label, m.text) for m in result.mentions)
    assert got == [(2, 4, "sym", "咳嗽"), (8, 10, "dis", "肺炎")]


def test_recognizer_counts_a_failing_parser_and_keeps_the_batch():
    class Fragile(SymbolStrategy):
        def parse(self, text, response, prompt):
            if "boom" in response:
                raise ValueError("a parser bug")
            return super().parse(text, response, prompt)

    rec = Recognizer(Fragile(), CMEEE, RecognizerSettings(max_chars=None))
    texts = ["患者咳嗽。", "诊断为肺炎。"]
    jobs = rec.plan(texts, lambda p: p.user)
    responses = ["boom" if j.text_index == 0 else "疾病：诊断为[肺炎]。" for j in jobs]
    first, second = rec.read(texts, jobs, responses)
    assert first.discarded["parser_error"] == len(CMEEE) and not first.mentions
    assert [(m.start, m.end, m.label) for m in second.mentions if m.label == "dis"] == [(3, 5, "dis")]


def test_recognizer_shards_long_texts_and_shifts_offsets():
    rec = Recognizer(SymbolStrategy(), CMEEE, RecognizerSettings(max_chars=12))
    text = "患者咳嗽三天。今日发热，诊断为肺炎。" * 3
    jobs = rec.plan([text], lambda p: p.user)
    offsets = sorted({j.offset for j in jobs})
    assert len(offsets) > 1 and offsets[0] == 0
    # answer "dis" on every shard with the shard's own 肺炎 bracketed
    responses = []
    for j in jobs:
        body = j.shard.replace("肺炎", "[肺炎]") if j.prompt.label == "dis" else j.shard
        responses.append(f"{CMEEE.display(j.prompt.label)}：{body}")
    (result,) = rec.read([text], jobs, responses)
    starts = [i for i in range(len(text)) if text.startswith("肺炎", i)]
    assert sorted((m.start, m.end) for m in result.mentions) == [(s, s + 2) for s in starts]
    assert all(text[m.start : m.end] == m.text for m in result.mentions)


def test_recognizer_normalises_without_moving_offsets():
    rec = Recognizer(SymbolStrategy(), CMEEE, RecognizerSettings(max_chars=None, normalize="t2s"))
    text = "患者發熱，診斷為肺炎。"
    jobs = rec.plan([text], lambda p: p.user)
    assert jobs[0].shard == "患者发热，诊断为肺炎。"
    responses = [
        f"{CMEEE.display(j.prompt.label)}：" + (j.shard.replace("发热", "[发热]") if j.prompt.label == "sym" else j.shard)
        for j in jobs
    ]
    (result,) = rec.read([text], jobs, responses)
    assert [(m.start, m.end, m.text) for m in result.mentions] == [(2, 4, "發熱")]  # original characters


def test_recognizer_counts_garbage_and_truncation():
    rec = Recognizer(SymbolStrategy(), CMEEE, RecognizerSettings(max_chars=None, constrained=False))
    text = "患者咳嗽。"
    jobs = rec.plan([text], lambda p: p.user)
    assert all(j.request.constraint is None for j in jobs)
    (result,) = rec.read([text], jobs, ["]]]" * 50, "", "🙂" * 1000] + ["x"] * (len(jobs) - 3))
    assert result.mentions == []
    assert sum(result.discarded.values()) >= 1


# -- aligner ---------------------------------------------------------------------------------
def aligner(**kw):
    cfg = dict(sources=None, spans_key="sc", search="nearest", alignment_mode="strict", flat_policy="longest", scorer=None)
    cfg.update(kw)
    return MedLLMAlign("align", **cfg)


def doc_with_mentions(nlp, text, mentions, source="gen"):
    doc = nlp.make_doc(text)
    doc._.llm_mentions = {source: mentions}
    return doc


@pytest.mark.parametrize(
    "policy,expected",
    [("all", [(0, 2), (5, 7)]), ("first", [(0, 2)]), ("unique", []), ("nearest", [(5, 7)])],
)
def test_aligner_search_policies(policy, expected):
    nlp = char_nlp()
    doc = doc_with_mentions(nlp, "肺炎患者，肺炎。", [Mention("dis", "肺炎", hint=4)])
    comp = aligner(search=policy)
    comp(doc)
    assert [(s.start_char, s.end_char) for s in doc.spans["sc"]] == expected
    if policy == "unique":
        assert comp.stats["ambiguous"] == 1


def test_aligner_alignment_modes_on_word_tokens():
    nlp = spacy.blank("en")
    text = "Familial adenomatous polyposis patients"
    mention = Mention("Disease", "amilial adenomatous polyp", 1, 26)
    results = {}
    for mode in ("strict", "contract", "expand"):
        doc = doc_with_mentions(nlp, text, [mention])
        comp = aligner(alignment_mode=mode)
        comp(doc)
        results[mode] = [s.text for s in doc.spans["sc"]]
        if mode == "strict":
            assert comp.stats["unaligned"] == 1
    assert results == {"strict": [], "contract": ["adenomatous"], "expand": ["Familial adenomatous polyposis"]}


def test_aligner_nested_group_flat_ents_scores_and_sources():
    nlp = char_nlp()
    text = "血管周围单核细胞浸润"
    doc = nlp.make_doc(text)
    doc._.llm_mentions = {
        "a": [Mention("bod", "血管周围单核细胞", 0, 8, score=0.4), Mention("bod", "单核细胞", 4, 8, score=0.9)],
        "b": [Mention("sym", "浸润", 8, 10, score=0.7), Mention("bod", "单核细胞", 4, 8, score=0.5)],
    }
    aligner()(doc)
    assert span_tuples(doc) == [(0, 8, "bod"), (4, 8, "bod"), (8, 10, "sym")]
    assert doc.spans["sc"].attrs["scores"] == [0.4, 0.9, 0.7]  # duplicate keeps the higher score
    assert [(e.start_char, e.end_char) for e in doc.ents] == [(0, 8), (8, 10)]
    only_b = nlp.make_doc(text)
    only_b._.llm_mentions = doc._.llm_mentions
    aligner(sources=["b"])(only_b)
    assert span_tuples(only_b) == [(4, 8, "bod"), (8, 10, "sym")]


def test_aligner_counts_out_of_range_and_missing():
    nlp = char_nlp()
    doc = doc_with_mentions(nlp, "咳嗽", [Mention("sym", "咳嗽", 0, 9), Mention("sym", "发热")])
    comp = aligner(sources=["gen", "other"])
    comp(doc)
    assert len(doc.spans["sc"]) == 0
    assert comp.stats["out_of_range"] == 1 and comp.stats["not_found"] == 1 and comp.stats["missing_source"] == 1


# -- the full pipeline on tiny models -----------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_pipeline_runs_and_spans_are_valid(tiny_dirs, arch):
    nlp = make_pipeline(tiny_dirs[arch], save_io=True)
    docs = list(nlp.pipe(SENTENCES, batch_size=2))
    assert [d.text for d in docs] == SENTENCES
    ner = nlp.get_pipe("medllm_ner")
    assert ner.stats["prompts"] == 2 * len(CMEEE.codes)  # the empty text makes no prompt
    for doc in docs:
        group = doc.spans["sc"]
        assert len(group.attrs["scores"]) == len(group)
        assert all(0.0 < s <= 1.0 for s in group.attrs["scores"])
        assert all(s.label_ in CMEEE.codes for s in group)
        ents = list(doc.ents)
        assert all(any((e.start, e.end, e.label_) == (s.start, s.end, s.label_) for s in group) for e in ents)
        assert all(a.end <= b.start for a, b in zip(ents, ents[1:]))
    io = docs[0]._.llm_io["medllm_ner"]
    assert len(io) == len(CMEEE.codes)
    # copy-constrained: every response is the answer prefix + the sentence with brackets only
    for record in io:
        body = record["response"].split("：", 1)[1]
        assert body.replace("[", "").replace("]", "") == SENTENCES[0]


def test_pipeline_matches_a_manual_run_of_the_same_generator(tiny_dirs):
    """The component adds nothing of its own: its spans are the recognizer's parse of the
    generator's answers."""
    nlp = make_pipeline(tiny_dirs["qwen2"])
    doc = nlp(SENTENCES[0])
    from spacy_medllm.llm.generation import HFGenerator

    lm = load_lm(ModelSpec(path=str(tiny_dirs["qwen2"]), device="cpu"))
    rec = Recognizer(SymbolStrategy(), CMEEE, RecognizerSettings(max_new_tokens=64))
    gen = HFGenerator(lm)
    jobs = rec.plan([SENTENCES[0]], lambda p: p.chat_text(gen.tokenizer))
    (manual,) = rec.read([SENTENCES[0]], jobs, gen.generate([j.request for j in jobs], batch_size=4))
    assert sorted({(m.start, m.end, m.label) for m in manual.mentions}) == sorted(
        (s.start_char, s.end_char, s.label_) for s in doc.spans["sc"]
    )


def test_evaluate_reports_our_scores(tiny_dirs):
    nlp = make_pipeline(tiny_dirs["qwen2"])
    gold = char_nlp().make_doc(SENTENCES[0])
    gold.spans["sc"] = [gold.char_span(11, 13, "dis"), gold.char_span(4, 6, "sym")]
    gold.ents = list(gold.spans["sc"])
    example = Example(nlp.make_doc(SENTENCES[0]), gold)
    scores = nlp.evaluate([example])
    predicted = nlp(SENTENCES[0])
    expected = score_examples([Example(predicted, gold)], "sc")
    assert scores["spans_sc_f"] == pytest.approx(expected["spans_sc_f"])
    assert scores["ents_f"] == pytest.approx(expected["ents_f"])


def test_to_disk_and_spacy_load_round_trip(tiny_dirs, tmp_path):
    nlp = make_pipeline(tiny_dirs["qwen2"])
    before = [span_tuples(d) for d in nlp.pipe(SENTENCES)]
    nlp.to_disk(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "medllm_ner" / "model" / "config.json").exists()  # tiny base is copied
    loaded = spacy.load(tmp_path / "pipe")
    assert loaded.pipe_names == ["medllm_ner", "medllm_align"]
    assert [span_tuples(d) for d in loaded.pipe(SENTENCES)] == before


def test_saved_by_reference_when_copy_base_is_off(tiny_dirs, tmp_path):
    nlp = make_pipeline(tiny_dirs["qwen2"], copy_base=False)
    nlp.to_disk(tmp_path / "pipe")
    assert not (tmp_path / "pipe" / "medllm_ner" / "model").exists()
    cfg = json.loads((tmp_path / "pipe" / "medllm_ner" / "cfg").read_text())
    assert cfg["base_path"] == str(tiny_dirs["qwen2"]) and not cfg["base_copied"]
    loaded = spacy.load(tmp_path / "pipe")
    assert span_tuples(loaded(SENTENCES[1])) == span_tuples(nlp(SENTENCES[1]))


def test_lora_adapter_is_used_and_saved(tiny_dirs, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["qwen2"])
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 2.0)
    peft_model.save_pretrained(tmp_path / "adapter")
    # free generation: a random model under the copy constraint brackets nothing either way
    plain = make_pipeline(tiny_dirs["qwen2"], save_io=True, constrained=False)
    adapted = make_pipeline(tiny_dirs["qwen2"], adapter=str(tmp_path / "adapter"), save_io=True, constrained=False)
    r_plain = [r["response"] for r in plain(SENTENCES[0])._.llm_io["medllm_ner"]]
    r_adapted = [r["response"] for r in adapted(SENTENCES[0])._.llm_io["medllm_ner"]]
    assert r_plain != r_adapted
    adapted.to_disk(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "medllm_ner" / "adapter" / "adapter_config.json").exists()
    again = spacy.load(tmp_path / "pipe")
    assert [r["response"] for r in again(SENTENCES[0])._.llm_io["medllm_ner"]] == r_adapted


def test_missing_model_and_adapter_give_clear_errors(tiny_dirs, tmp_path):
    nlp = make_pipeline(tmp_path / "nowhere")
    with pytest.raises(MedLLMLoadError):
        nlp("咳嗽")
    nlp = make_pipeline(tiny_dirs["qwen2"], adapter=str(tmp_path / "no_adapter"))
    with pytest.raises(MedLLMLoadError, match="adapter"):
        nlp("咳嗽")


def test_entity_category_strategy_through_the_pipeline(tiny_dirs):
    """Offset-less mentions are found by the aligner; garbage from a random model never crashes."""
    nlp = make_pipeline(
        tiny_dirs["qwen2"], strategy={"@misc": "spacy_medllm.EntityCategoryStrategy.v1"}, constrained=True
    )
    doc = nlp(SENTENCES[0])
    assert all(doc.text[s.start_char : s.end_char] == s.text for s in doc.spans["sc"])
    rec = Recognizer(EntityCategoryStrategy(), CMEEE)
    jobs = rec.plan(["肺炎患者，肺炎。"], lambda p: p.user)
    assert len(jobs) == 1 and jobs[0].request.constraint is None  # no copy constraint off the symbol strategy


def test_spacy_llm_component_with_our_model_and_task(tiny_dirs):
    ours = make_pipeline(tiny_dirs["qwen2"])
    nlp = char_nlp()
    nlp.add_pipe(
        "llm",
        config={
            "task": {
                "@llm_tasks": "spacy_medllm.NERTask.v2",
                "strategy": {"@misc": "spacy_medllm.SymbolStrategy.v1"},
                "labels": {"@misc": "spacy_medllm.LabelScheme.v1", "scheme": "cmeee"},
                "recognizer": {"@misc": "spacy_medllm.Recognizer.v1", "max_new_tokens": 64},
            },
            "model": {
                "@llm_models": "spacy_medllm.HFCausalLM.v1",
                "spec": {"@misc": "spacy_medllm.ModelSpec.v1", "path": str(tiny_dirs["qwen2"]), "device": "cpu"},
            },
        },
    )
    for text in SENTENCES[:2]:
        assert span_tuples(nlp(text)) == span_tuples(ours(text))


def test_spacy_llm_route_prompts_like_medllm_ner_with_a_model_that_carries_its_template():
    """The embedded model carries prompt_template.jinja: both routes must prompt with it."""
    from spacy_medllm.embedded import EMBEDDED_DIR
    from spacy_medllm.readers import CONVERTERS, read_docs

    assert (EMBEDDED_DIR / "prompt_template.jinja").is_file()
    ours = char_nlp()
    ours.add_pipe("medllm_ner")
    ours.add_pipe("medllm_align")
    nlp = char_nlp()
    nlp.add_pipe("llm", config={
        "task": {"@llm_tasks": "spacy_medllm.NERTask.v2", "strategy": {"@misc": "spacy_medllm.SymbolStrategy.v1"},
                 "labels": {"@misc": "spacy_medllm.LabelScheme.v1", "scheme": "cmeee"}},
        "model": {"@llm_models": "spacy_medllm.HFCausalLM.v1", "spec": {"@misc": "spacy_medllm.ModelSpec.v1", "path": "embedded"}},
    })
    assert nlp.get_pipe("llm")._model.prompt_template == str(EMBEDDED_DIR / "prompt_template.jinja")
    texts = [d.text for d in read_docs(ASSETS / "cmeee_dev.json", CONVERTERS["cmeee"], nlp.vocab, limit=6)]
    found = 0
    for text in texts:
        expected = span_tuples(ours(text))
        assert span_tuples(nlp(text)) == expected
        found += len(expected)
    assert found > 0


def test_custom_template_is_stored_with_the_pipeline(tiny_dirs, tmp_path):
    template = tmp_path / "short.zh.jinja"
    template.write_text(
        "{% macro system() %}{% endmacro %}{% macro instruction() %}{% endmacro %}"
        "{% macro query() %}\n{{ text }}\n{{ label.name }}\n{% endmacro %}",
        encoding="utf8",
    )
    nlp = make_pipeline(
        tiny_dirs["qwen2"], strategy={"@misc": "spacy_medllm.SymbolStrategy.v1", "template": str(template)}, save_io=True
    )
    before = nlp(SENTENCES[1])
    assert before._.llm_io["medllm_ner"][0]["prompt"].count(SENTENCES[1]) == 1
    nlp.to_disk(tmp_path / "pipe")
    template.unlink()
    after = spacy.load(tmp_path / "pipe")(SENTENCES[1])
    assert [r["prompt"] for r in after._.llm_io["medllm_ner"]] == [r["prompt"] for r in before._.llm_io["medllm_ner"]]
    assert span_tuples(after) == span_tuples(before)


def test_embedded_default_runs_with_its_own_prompt_template():
    """``add_pipe("medllm_ner")`` with no config runs the tiny model shipped in the package,
    prompted the way it was tuned (the template its directory carries)."""
    from spacy_medllm.embedded import EMBEDDED_DIR, resolve_model_path

    assert resolve_model_path("embedded") == EMBEDDED_DIR
    nlp = char_nlp()
    nlp.add_pipe("medllm_ner", config={"save_io": True, "recognizer": {"@misc": "spacy_medllm.Recognizer.v1", "max_new_tokens": 64}})
    nlp.add_pipe("medllm_align")
    doc = nlp(SENTENCES[1])
    io = doc._.llm_io["medllm_ner"]
    assert len(io) == len(CMEEE.codes)
    template = (EMBEDDED_DIR / "prompt_template.jinja").read_text(encoding="utf8")
    assert "label.name" in template and io[0]["prompt"].count(SENTENCES[1]) == 1
    assert "你是" not in io[0]["prompt"]  # not the builtin instruction the model was not tuned on
    assert all(doc.text[s.start_char : s.end_char] == s.text for s in doc.spans["sc"])


def test_flat_view_breaks_ties_between_types_by_score():
    """阿莫西林 under several types: doc.ents takes the best-scored type, not the first."""
    from spacy_medllm.spans import flat_view

    doc = char_nlp()("给予阿莫西林治疗。")
    spans = [doc.char_span(2, 6, label=label) for label in ("bod", "dru", "sym")]
    assert [s.label_ for s in flat_view(spans, "longest", [0.2, 0.9, 0.5])] == ["dru"]
    assert [s.label_ for s in flat_view(spans, "outermost", [0.2, 0.3, 0.5])] == ["sym"]
    assert [s.label_ for s in flat_view(spans, "longest")] == ["bod"]  # no scores: document order
    longer = doc.char_span(0, 6, label="pro")
    assert [s.label_ for s in flat_view(spans + [longer], "longest", [0.2, 0.9, 0.5, 0.1])] == ["pro"]


def test_max_doc_chars_skips_and_counts_long_documents(tiny_dirs, caplog):
    limited = make_pipeline(tiny_dirs["qwen2"], max_doc_chars=10)
    plain = make_pipeline(tiny_dirs["qwen2"])
    long_text = SENTENCES[0] * 3
    docs = list(limited.pipe([long_text, SENTENCES[1]]))
    assert list(docs[0].spans["sc"]) == [] and docs[0]._.llm_mentions["medllm_ner"] == []
    assert span_tuples(docs[1]) == span_tuples(plain(SENTENCES[1]))
    ner = limited.get_pipe("medllm_ner")
    assert ner.stats["skipped_long_docs"] == 1 and ner.stats["prompts"] == len(CMEEE)
    assert ner.stats["generated_tokens"] > 0
    assert f"skipped a document of {len(long_text)} characters" in caplog.text
