"""The embedded model served by a real vLLM server (its CPU build, on loopback), against
in-process decoding on CMeEE dev sentences.

They need vLLM in its own environment (it pins its own torch and transformers):
``scripts/vllm_env.sh`` makes ``.venv-vllm`` (or point SPACY_MEDLLM_VLLM_PYTHON at a
python that has vLLM). Without one they are skipped; CI makes it and runs them.
"""
import dataclasses
import json
import os
from pathlib import Path

import pytest
import spacy

from spacy_medllm.embedded import EMBEDDED_DIR
from spacy_medllm.llm.generation import GenerationResult
from spacy_medllm.llm.server import PROCESSOR, ServerGenerator, ServerSpec, served_constraint
from spacy_medllm.llm.vllm_process import VLLMProcess

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("SPACY_MEDLLM_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
N_SENTENCES = 20

pytestmark = pytest.mark.skipif(
    not VLLM_PYTHON.exists(), reason="no vLLM environment: run scripts/vllm_env.sh (or set SPACY_MEDLLM_VLLM_PYTHON)"
)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA adapter on the embedded model with random (non-zero) B, so it changes answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(str(EMBEDDED_DIR), dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("adapter") / "ad"
    get_peft_model(model, config).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def processor_server(tmp_path_factory, adapter):
    """The copy logits processor loaded, and the adapter served as "ad"."""
    server = VLLMProcess(
        VLLM_PYTHON, tmp_path_factory.mktemp("vllm") / "processor.log",
        ["--logits-processors", PROCESSOR, "--enable-lora", "--lora-modules", f"ad={adapter}", "--max-lora-rank", "8"],
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ngram_server(tmp_path_factory):
    """n-gram (prompt lookup) speculative decoding; vLLM allows no custom processor with it."""
    speculative = {"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    server = VLLMProcess(VLLM_PYTHON, tmp_path_factory.mktemp("vllm") / "ngram.log", ["--speculative-config", json.dumps(speculative)])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def dev_jobs():
    """The embedded pipeline's prompts (one per type) for the first dev sentences of the sample."""
    texts = [r["text"] for r in json.loads((REPO / "assets" / "cmeee_dev.json").read_text("utf8"))[:N_SENTENCES]]
    nlp = spacy.blank("zh")
    ner = nlp.add_pipe("medllm_ner")
    generator = ner.generator
    jobs = ner.recognizer.plan(texts, lambda prompt: prompt.chat_text(generator.tokenizer))
    return texts, [job.request for job in jobs]


def _in_process(requests, text_mass, adapter=None, span_limit=True):
    nlp = spacy.blank("zh")
    generator = nlp.add_pipe("medllm_ner", config={"adapter": str(adapter) if adapter else None}).generator
    requests = _with_text_mass(requests, text_mass)
    if not span_limit:
        requests = [dataclasses.replace(r, constraint=served_constraint(r.constraint)) for r in requests]
    return generator.generate(requests, batch_size=16)


def _with_text_mass(requests, text_mass):
    return [dataclasses.replace(r, constraint=dataclasses.replace(r.constraint, text_mass=text_mass)) for r in requests]


def _served(server, requests, **settings):
    spec = ServerSpec(base_url=server.url, model=settings.pop("model", "tiny"), tokenizer=str(EMBEDDED_DIR), **settings)
    return ServerGenerator(spec).generate(requests)


def _assert_same(served, local, exact_logprobs=True):
    assert len(served) == len(local)
    for s, l in zip(served, local):
        assert s.token_ids == l.token_ids and s.text == l.text and s.finish_reason == l.finish_reason
        if exact_logprobs:
            assert s.logprobs == pytest.approx(l.logprobs, abs=1e-3)


def test_the_processor_gives_the_in_process_answers_token_for_token(processor_server, dev_jobs):
    _, requests = dev_jobs
    local = _in_process(requests, text_mass=True)
    served = _served(processor_server, requests)
    _assert_same(served, local)
    assert sum("[" in r.text for r in served) >= 10  # the sentences do get entities


def test_the_grammar_gives_the_in_process_answers_without_text_mass(processor_server, dev_jobs):
    _, requests = dev_jobs
    requests = requests[: 9 * 8]
    local = _in_process(requests, text_mass=False, span_limit=False)  # the grammar has no span limit
    served = _served(processor_server, _with_text_mass(requests, False), copy_rule="grammar")
    # vLLM computes log-probabilities after the grammar mask, so only the tokens compare
    _assert_same(served, local, exact_logprobs=False)
    # and this is why the processor exists: the grammar's rule brackets more
    with_mass = _in_process(requests, text_mass=True)
    assert sum(r.text.count("[") for r in served) > sum(r.text.count("[") for r in with_mass)


def test_without_a_local_tokenizer_the_chat_endpoint_applies_the_template(processor_server, dev_jobs):
    texts, _ = dev_jobs
    ner = spacy.blank("zh").add_pipe("medllm_ner")
    requests = [job.request for job in ner.recognizer.plan(texts[:4], lambda prompt: prompt.messages())]
    local = _in_process(requests, text_mass=False, span_limit=False)
    spec = ServerSpec(base_url=processor_server.url, model="tiny", copy_rule="grammar")
    served = ServerGenerator(spec).generate(_with_text_mass(requests, False))
    assert [r.text for r in served] == [r.text for r in local]
    assert [r.token_ids for r in served] == [r.token_ids for r in local]


def test_an_adapter_served_by_name_gives_the_adapter_answers(processor_server, dev_jobs, adapter):
    _, requests = dev_jobs
    requests = requests[: 9 * 5]
    local = _in_process(requests, text_mass=True, adapter=adapter)
    served = _served(processor_server, requests, model="ad")
    _assert_same(served, local)
    base = _in_process(requests, text_mass=True)
    assert [r.token_ids for r in local] != [r.token_ids for r in base]  # the adapter changes answers


def test_medllm_ner_on_the_server_predicts_what_it_predicts_in_process(processor_server, dev_jobs):
    texts, _ = dev_jobs
    local = spacy.blank("zh")
    local.add_pipe("medllm_ner")
    local.add_pipe("medllm_align")
    served = spacy.blank("zh")
    server = {"@misc": "spacy_medllm.OpenAIServer.v1", "base_url": processor_server.url, "model": "tiny", "tokenizer": str(EMBEDDED_DIR)}
    served.add_pipe("medllm_ner", config={"model": server})
    served.add_pipe("medllm_align")
    for a, b in zip(local.pipe(texts[:8]), served.pipe(texts[:8])):
        assert [(s.start_char, s.end_char, s.label_) for s in a.spans["sc"]] == [(s.start_char, s.end_char, s.label_) for s in b.spans["sc"]]


def test_ngram_drafts_keep_the_grammar_answers(ngram_server, dev_jobs):
    _, requests = dev_jobs
    requests = _with_text_mass(requests[: 9 * 8], False)
    local = _in_process(requests, text_mass=False, span_limit=False)
    _assert_same(_served(ngram_server, requests, copy_rule="grammar"), local, exact_logprobs=False)


def test_result_fields_are_the_generator_protocol(processor_server, dev_jobs):
    _, requests = dev_jobs
    result = _served(processor_server, requests[:1])[0]
    assert isinstance(result, GenerationResult) and result.generated_tokens == len(result.token_ids) > 0
    assert result.prompt_tokens > 0 and result.seconds > 0 and result.forward_passes == 0
