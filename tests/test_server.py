"""The OpenAI-compatible server generator against a small local HTTP server that plays the
parts a real one can fail in: dropped connections, 5xx, a missing model, a rejected grammar,
a grammar ignored. (A real vLLM server: tests/test_vllm_server.py.)"""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import spacy

from spacy_medllm.embedded import EMBEDDED_DIR
from spacy_medllm.llm.copy import COPY_REQUEST_ARG, read_copy_request_arg
from spacy_medllm.llm.generation import GenerationRequest, PromptEncoder
from spacy_medllm.llm.loader import load_tokenizer
from spacy_medllm.errors import MedLLMServerError
from spacy_medllm.llm.server import ServerGenerator, ServerSpec
from spacy_medllm.types import CopyConstraint

TOKENIZER = load_tokenizer(EMBEDDED_DIR, trust_remote_code=False)


class FakeServer:
    """Answers /v1/models and /v1/completions; ``script`` says what the next completion
    calls do ("drop": close the connection, an int: that HTTP status, "ok": answer)."""

    def __init__(self, answer="疾病：[发热]", served=("tiny",), status_body=""):
        self.answer, self.served, self.status_body = answer, served, status_body
        self.script, self.bodies, self.attempts = [], [], 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                fake._json(self, 200, {"object": "list", "data": [{"id": m, "object": "model"} for m in fake.served]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.attempts += 1
                step = fake.script.pop(0) if fake.script else "ok"
                if step == "drop":
                    self.connection.shutdown(2)
                    self.close_connection = True
                    return
                if isinstance(step, int):
                    fake._json(self, step, {"error": {"message": fake.status_body or f"status {step}", "code": step}})
                    return
                fake.bodies.append(body)
                answer = fake.answer
                if answer is None:  # copy the constraint's source without brackets
                    constraint, _ = read_copy_request_arg(body["vllm_xargs"][COPY_REQUEST_ARG])
                    answer = constraint.forced_prefix + constraint.source
                ids = TOKENIZER(answer, add_special_tokens=False).input_ids + [TOKENIZER.eos_token_id]
                fake._json(self, 200, {
                    "id": "c", "object": "text_completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "text": answer, "finish_reason": "stop", "logprobs": {
                        "tokens": [f"token_id:{i}" for i in ids], "token_logprobs": [-0.5] * len(ids),
                        "top_logprobs": None, "text_offset": list(range(len(ids)))}}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
                })

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @staticmethod
    def _json(handler, status, data):
        raw = json.dumps(data).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(raw)))
        handler.end_headers()
        handler.wfile.write(raw)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake():
    server = FakeServer()
    yield server
    server.close()


def _generator(url, **settings):
    settings.setdefault("tokenizer", str(EMBEDDED_DIR))
    return ServerGenerator(ServerSpec(base_url=url, model="tiny", max_retries=settings.pop("max_retries", 3), timeout=10, **settings))


def _request(source="发热", prefix="疾病：", text_mass=True):
    constraint = CopyConstraint(source=source, forced_prefix=prefix, text_mass=text_mass)
    return GenerationRequest(prompt="<|im_start|>发热\n疾病\n", constraint=constraint, literals=("发热",))


def test_requests_carry_token_ids_the_processor_argument_and_come_back_in_order(fake):
    generator = _generator(fake.url)
    requests = [_request(), _request(source="发热咳嗽"), GenerationRequest(prompt="plain", chat=False)]
    fake.answer = "疾病：[发热]"
    results = generator.generate(requests[:1] + requests[2:])
    assert [r.finish_reason for r in results] == ["stop", "stop"]
    answer_ids = TOKENIZER("疾病：[发热]", add_special_tokens=False).input_ids
    assert results[0].token_ids == answer_ids + [TOKENIZER.eos_token_id] and results[0].text == "疾病：[发热]"
    assert results[0].logprobs == [-0.5] * (len(answer_ids) + 1)
    # the prompt went as the ids the in-process generator would feed the model
    encoder = PromptEncoder(TOKENIZER)
    by_prompt = {json.dumps(b["prompt"]): b for b in fake.bodies}
    body = by_prompt[json.dumps(encoder.encode(requests[0]))]
    constraint, eos = read_copy_request_arg(body["vllm_xargs"][COPY_REQUEST_ARG])
    assert constraint == requests[0].constraint and set(eos) == set(generator.encoder.stop_ids)
    assert body["temperature"] == 0.0 and body["return_tokens_as_token_ids"] is True
    assert "structured_outputs" not in body


def test_dropped_connections_and_5xx_are_retried(fake):
    fake.script = ["drop", 503, "drop"]
    result = _generator(fake.url, max_retries=3).generate([_request()])[0]
    assert result.finish_reason == "stop" and fake.attempts == 4


def test_a_server_that_keeps_failing_is_reported_with_its_url(fake):
    fake.script = ["drop"] * 10
    with pytest.raises(MedLLMServerError, match=f"Cannot reach .* at {fake.url}.*after 1 retries"):
        _generator(fake.url, max_retries=1).generate([_request()])
    assert fake.attempts == 2


def test_unreachable_server_and_unknown_model_say_what_to_fix(fake):
    with pytest.raises(MedLLMServerError, match="Cannot reach an OpenAI-compatible server at http://127.0.0.1:9/v1"):
        _generator("http://127.0.0.1:9/v1", max_retries=0).generate([_request()])
    fake.served = ("other", "adapter-a")
    with pytest.raises(MedLLMServerError, match=r"serves no model named 'tiny' \(it serves other, adapter-a\).*--lora-modules"):
        _generator(fake.url).generate([_request()])


def test_grammar_dialects_put_the_grammar_in_their_own_field(fake):
    fields = {"vllm": lambda b: b["structured_outputs"]["grammar"], "sglang": lambda b: b["ebnf"], "llama.cpp": lambda b: b["grammar"]}
    for dialect, read in fields.items():
        fake.bodies.clear()
        _generator(fake.url, dialect=dialect, copy_rule="grammar").generate([_request(text_mass=False)])
        grammar = read(fake.bodies[0])
        assert grammar.startswith("root ::=") and "发" in grammar
        assert "vllm_xargs" not in fake.bodies[0]


def test_a_rejected_grammar_names_the_fix(fake):
    fake.script = [400]
    fake.status_body = "grammar is not supported"
    with pytest.raises(MedLLMServerError, match="rejected the copy grammar.*set dialect"):
        _generator(fake.url, dialect="sglang").generate([_request(text_mass=False)])


def test_an_answer_that_is_not_a_copy_means_the_rule_was_not_applied(fake):
    fake.answer = "疾病：[咳嗽]"  # not a copy of 发热
    with pytest.raises(MedLLMServerError, match="not a copy of .*does not run the copy logits processor.*--logits-processors"):
        _generator(fake.url).generate([_request()])
    with pytest.raises(MedLLMServerError, match="ignored the copy grammar"):
        _generator(fake.url, copy_rule="grammar").generate([_request(text_mass=False)])
    # the plain dialect sends no constraint and checks none
    assert _generator(fake.url, dialect="plain").generate([_request()])[0].text == "疾病：[咳嗽]"


def test_settings_are_checked(monkeypatch):
    with pytest.raises(MedLLMServerError, match="dialect"):
        ServerSpec(base_url="http://x/v1", model="m", dialect="tgi")
    with pytest.raises(MedLLMServerError, match="needs dialect=\"vllm\""):
        ServerSpec(base_url="http://x/v1", model="m", dialect="sglang", copy_rule="processor")
    monkeypatch.delenv("MEDLLM_TEST_KEY", raising=False)
    with pytest.raises(MedLLMServerError, match="MEDLLM_TEST_KEY, which is not set"):
        ServerGenerator(ServerSpec(base_url="http://x/v1", model="m", api_key_env="MEDLLM_TEST_KEY", copy_rule="grammar"))
    with pytest.raises(MedLLMServerError, match="needs the model's end tokens"):
        ServerGenerator(ServerSpec(base_url="http://x/v1", model="m"))
    assert ServerSpec(base_url="u", model="m").rule == "processor"
    assert ServerSpec(base_url="u", model="m", dialect="llama.cpp").rule == "grammar"
    assert ServerSpec(base_url="u", model="m", dialect="plain").rule == "none"


def test_medllm_ner_runs_on_a_server_and_saves_no_weights(fake, tmp_path, caplog):
    fake.answer = "疾病：[发热]"
    nlp = spacy.blank("zh")
    server = {"@misc": "spacy_medllm.OpenAIServer.v1", "base_url": fake.url, "model": "tiny", "tokenizer": str(EMBEDDED_DIR)}
    nlp.add_pipe("medllm_ner", config={"model": server, "labels": {"@misc": "spacy_medllm.LabelScheme.v1", "scheme": {"dis": "疾病"}, "language": "zh"}})
    nlp.add_pipe("medllm_align")
    doc = nlp("发热")
    assert [(s.text, s.label_) for s in doc.spans["sc"]] == [("发热", "dis")]
    nlp.to_disk(tmp_path / "p")
    assert not (tmp_path / "p" / "medllm_ner" / "model").exists()
    again = spacy.load(tmp_path / "p")
    doc = again("发热")
    assert [(s.text, s.label_) for s in doc.spans["sc"]] == [("发热", "dis")]
    with pytest.raises(ValueError, match="--lora-modules"):
        spacy.blank("zh").add_pipe("medllm_ner", config={"model": server, "adapter": str(tmp_path)})


def test_the_server_config_assembles_and_runs(fake, tmp_path):
    """configs/pipeline_server.cfg as the README assembles it, pointed at the fake server."""
    from spacy.util import load_config, load_model_from_config

    fake.answer = None
    config = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "pipeline_server.cfg",
        overrides={"paths.base_url": fake.url, "paths.model": "tiny", "paths.tokenizer": str(EMBEDDED_DIR)},
        interpolate=False,
    )
    nlp = load_model_from_config(config, auto_fill=True)
    ner = nlp.get_pipe("ner")
    assert isinstance(ner.spec, ServerSpec) and ner.spec.rule == "processor"
    doc = nlp("患者发热三天")
    assert len(doc.spans["sc"]) == 0 and ner.stats["prompts"] == 9 and ner.stats["mentions"] == 0
    assert len(fake.bodies) == 9


def test_spacy_llm_and_the_ensemble_resolver_take_a_server(fake):
    from spacy_medllm.ensemble.llm_resolver import LLMResolver
    from spacy_medllm.labels import get_scheme

    fake.answer = None  # a copy of the source without brackets
    server = {"@misc": "spacy_medllm.OpenAIServer.v1", "base_url": fake.url, "model": "tiny", "tokenizer": str(EMBEDDED_DIR)}
    nlp = spacy.blank("zh")
    nlp.add_pipe("llm", config={
        "task": {"@llm_tasks": "spacy_medllm.NERTask.v2", "strategy": {"@misc": "spacy_medllm.SymbolStrategy.v1"}, "labels": {"@misc": "spacy_medllm.LabelScheme.v1", "scheme": "cmeee"}},
        "model": {"@llm_models": "spacy_medllm.HFCausalLM.v1", "spec": server},
    })
    doc = nlp("患者发热三天")
    assert len(fake.bodies) == 9 and all(COPY_REQUEST_ARG in b["vllm_xargs"] for b in fake.bodies)
    assert list(doc.spans.get("sc", [])) == [] and nlp.get_pipe("llm")._model.context_length is None
    resolver = LLMResolver(ServerSpec(base_url=fake.url, model="tiny", tokenizer=str(EMBEDDED_DIR)), get_scheme("cmeee"))
    assert isinstance(resolver.generator, ServerGenerator)
