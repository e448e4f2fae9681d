"""The LLM runtime on tiny Qwen2 and Llama models built on the fly: loader, adapters,
quantization, batched greedy generation, the error messages and the spacy-llm model."""
import json
import sys
import warnings

import pytest
import torch

from spacy_medllm.llm.generation import (
    GenerationRequest,
    HFGenerator,
    format_prompt,
    stop_token_ids,
)
from spacy_medllm.errors import MedLLMLoadError
from spacy_medllm.llm.loader import ModelSpec, default_adapter_name, load_lm
from spacy_medllm.llm.tiny import build_char_tokenizer

CORPUS = "患者可高热39～40℃，神志大多清晰，部分患者有精神失常，头痛三天伴呕吐。Fever and headache for 3 days."
PROMPTS = ["患者高热", "头痛三天伴呕吐，神志清晰，部分患者有精神失常。", "Fever", "部分患者有精神失常"]
MAX_NEW = [7, 5, 9, 6]


def _save_lora(base_path, out, seed, **lora_kwargs):
    """A LoRA adapter with random (non-zero) B so that it changes the outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **lora_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(model, config).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("tiny_models")
    paths = {arch: str(tiny_model_dir(CORPUS, arch, hidden=64, heads=4, kv_heads=2, seed=0)) for arch in ("qwen2", "llama")}
    paths["qwen2_small"] = str(tiny_model_dir(CORPUS, "qwen2", "qwen2_small", hidden=32, heads=4, kv_heads=2, seed=5))
    paths["lora_a"] = _save_lora(paths["qwen2"], root / "lora_a", seed=1)
    paths["lora_b"] = _save_lora(paths["qwen2"], root / "lora_b", seed=2)
    paths["lora_llama"] = _save_lora(paths["llama"], root / "lora_llama", seed=3)
    paths["lora_small"] = _save_lora(paths["qwen2_small"], root / "lora_small", seed=4)
    return paths


def _requests():
    return [GenerationRequest(p, max_new_tokens=m, chat=True) for p, m in zip(PROMPTS, MAX_NEW)]


def _hf_greedy(model, ids, max_new_tokens):
    ids = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_batched_equals_unbatched_equals_hf_generate(models, arch):
    lm = load_lm(ModelSpec(models[arch], dtype="float32", device="cpu"))
    generator = HFGenerator(lm)
    requests = _requests()
    batched = generator.generate(requests, batch_size=4)
    for request, result in zip(requests, batched):
        single = generator.generate([request], batch_size=1)[0]
        assert result.token_ids == single.token_ids
        assert result.logprobs == pytest.approx(single.logprobs, abs=1e-4)
        assert result.token_ids == _hf_greedy(lm.model, generator.encode(request), request.max_new_tokens)
        assert result.generated_tokens == len(result.token_ids) == request.max_new_tokens
        assert result.finish_reason == "length" and result.forward_passes == request.max_new_tokens
        assert result.prompt_tokens == len(generator.encode(request))
        assert result.text == lm.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    # sorting by length into batches of 2 must not change the order of results
    assert [r.token_ids for r in generator.generate(requests, batch_size=2)] == [r.token_ids for r in batched]


def test_logprobs_match_a_full_forward_pass(models):
    lm = load_lm(ModelSpec(models["llama"], dtype="float32", device="cpu"))
    generator = HFGenerator(lm)
    request = _requests()[1]
    result = generator.generate([request, _requests()[0]], batch_size=2)[0]
    prompt = generator.encode(request)
    with torch.inference_mode():
        logits = lm.model(torch.tensor([prompt + result.token_ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    for k, token in enumerate(result.token_ids):
        row = logprobs[len(prompt) - 1 + k]
        assert int(row.argmax()) == token
        assert result.logprobs[k] == pytest.approx(float(row[token]), abs=1e-4)
    assert result.logprob_sum == pytest.approx(sum(result.logprobs))


def test_generation_stops_at_a_stop_token(models):
    lm = load_lm(ModelSpec(models["qwen2"], dtype="float32", device="cpu"))
    generator = HFGenerator(lm)
    assert generator.stop_ids == [lm.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    requests = _requests()
    free = generator.generate(requests, batch_size=4)
    stop_token = free[0].token_ids[3]  # make the 4th token of the first answer a stop token
    generator.stop_ids = [stop_token]
    stopped = generator.generate(requests, batch_size=4)
    first = stopped[0]
    assert first.finish_reason == "stop" and first.token_ids == free[0].token_ids[:4]
    assert first.text == lm.tokenizer.decode(free[0].token_ids[:3])
    assert first.forward_passes == 4
    for before, after in zip(free[1:], stopped[1:]):  # the other rows go on, unaffected
        cut = before.token_ids.index(stop_token) + 1 if stop_token in before.token_ids else len(before.token_ids)
        assert after.token_ids == before.token_ids[:cut]


def test_prompt_formats_and_stop_ids(models):
    lm = load_lm(ModelSpec(models["qwen2"], dtype="float32", device="cpu"))
    generator = HFGenerator(lm)
    messages = [{"role": "system", "content": "标注"}, {"role": "user", "content": "高热"}]
    text = format_prompt(lm.tokenizer, messages)
    assert text == "<|im_start|>system\n标注<|im_end|>\n<|im_start|>user\n高热<|im_end|>\n<|im_start|>assistant\n"
    assert generator.prompt_text(GenerationRequest(messages)) == text
    assert generator.prompt_text(GenerationRequest(text)) == text
    assert generator.prompt_text(GenerationRequest("高热", chat=True)).endswith("user\n高热<|im_end|>\n<|im_start|>assistant\n")
    assert generator.encode(GenerationRequest(text)) == lm.tokenizer(text, add_special_tokens=False).input_ids
    plain = build_char_tokenizer(CORPUS)
    plain.chat_template = None
    assert format_prompt(plain, messages) == "System: 标注\n\nUser: 高热\n\nAssistant:"
    assert stop_token_ids(plain) == [plain.eos_token_id]


def test_constrained_requests_go_to_the_constrained_module(models, monkeypatch):
    from spacy_medllm.llm import generation
    from spacy_medllm.llm.copy import DecodedRow

    lm = load_lm(ModelSpec(models["qwen2"], dtype="float32", device="cpu"))
    calls = []

    def fake(model, tokenizer, prompts, constraints, *, stop_ids, max_new_tokens, batch_size=8):
        calls.append((model, list(constraints), batch_size))
        return [DecodedRow(f"c{c}", [], [], 0, True) for c in constraints]

    monkeypatch.setattr(generation, "generate_constrained", fake)
    requests = _requests()
    mixed = [requests[0], GenerationRequest("x", constraint=1), requests[1], GenerationRequest("y", constraint=2)]
    results = HFGenerator(lm).generate(mixed, batch_size=3)
    assert calls == [(lm.model, [1, 2], 3)]
    assert [r.text for r in results[1::2]] == ["c1", "c2"]
    plain = HFGenerator(lm).generate(requests[:2], batch_size=2)
    assert [r.token_ids for r in results[0::2]] == [r.token_ids for r in plain]


def test_lora_adapters_switch_and_match_merged_models(models):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = ModelSpec(models["qwen2"], dtype="float32", device="cpu", attn_implementation="eager")
    lm = load_lm(spec)
    requests = _requests()
    before = [r.token_ids for r in HFGenerator(lm).generate(requests, batch_size=4)]
    lm.add_adapter("a", models["lora_a"])
    lm.add_adapter("b", models["lora_b"])
    lm.add_adapter("a", models["lora_a"])  # same name and path again: no-op
    assert sorted(lm.adapters) == ["a", "b"]
    outputs = {name: [r.token_ids for r in HFGenerator(lm, name).generate(requests, batch_size=4)] for name in (None, "a", "b")}
    assert outputs[None] == before
    assert outputs["a"] != outputs[None] and outputs["b"] != outputs[None] and outputs["a"] != outputs["b"]
    for name in ("a", "b"):
        base = AutoModelForCausalLM.from_pretrained(models["qwen2"], attn_implementation="eager")
        merged = PeftModel.from_pretrained(base, models[f"lora_{name}"]).merge_and_unload()
        generator = HFGenerator(lm, name)
        for request, got in zip(requests, outputs[name]):
            assert got == _hf_greedy(merged, generator.encode(request), request.max_new_tokens)
    with lm.use("b"):
        assert lm.model.active_adapter == "b"
    assert lm.model.active_adapter == "a"  # restored
    # another component asking for the same spec shares the copy and its adapters
    assert load_lm(ModelSpec(models["qwen2"] + "/", dtype="float32", device="cpu", attn_implementation="eager")) is lm
    assert load_lm(ModelSpec(models["qwen2"], dtype="float32", device="cpu")) is not lm


def test_adapter_tokenizer_is_used_when_saved_with_the_adapter(models, tmp_path):
    from transformers import AutoTokenizer

    path = _save_lora(models["llama"], tmp_path / "lora_tok", seed=7)
    tok = AutoTokenizer.from_pretrained(models["llama"])
    tok.add_tokens(["<ent>"])
    tok.save_pretrained(path)
    lm = load_lm(ModelSpec(models["llama"], dtype="float32", device="cpu", attn_implementation="sdpa"))
    lm.add_adapter("tok", path)
    assert len(lm.tokenizer_for("tok")) == len(lm.tokenizer) + 1
    assert lm.tokenizer_for(None) is lm.tokenizer
    generator = HFGenerator(lm, "tok")
    assert generator.tokenizer is lm.tokenizer_for("tok")
    assert len(generator.encode(GenerationRequest("高热<ent>"))) == 3
    assert len(generator.generate(_requests()[:1])[0].token_ids) == MAX_NEW[0]


def test_4bit_nf4_loads_on_cpu_and_generates(models):
    import bitsandbytes as bnb

    lm = load_lm(ModelSpec(models["llama"], quantization="4bit", device="cpu"))
    linear4 = [m for m in lm.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 2 * 7 and linear4[0].weight.quant_type == "nf4"
    generator = HFGenerator(lm)
    requests = _requests()
    batched = generator.generate(requests, batch_size=4)
    assert [len(r.token_ids) for r in batched] == MAX_NEW
    assert all(lp <= 0 for r in batched for lp in r.logprobs)
    assert batched[0].token_ids == generator.generate(requests[:1], batch_size=1)[0].token_ids
    lm.add_adapter("a", models["lora_llama"])  # QLoRA-style inference
    with_adapter = HFGenerator(lm, "a").generate(requests, batch_size=4)
    assert [r.token_ids for r in with_adapter] != [r.token_ids for r in batched]
    # loading the adapter (peft calls state_dict()) left the quantized base unchanged
    again = HFGenerator(lm).generate(requests, batch_size=4)
    assert [r.token_ids for r in again] == [r.token_ids for r in batched]
    for a, b in zip(again, batched):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_constrained_decoding_on_a_4bit_model_with_an_adapter(models):
    """The QLoRA inference path: copy-constrained speculative decoding through the
    runtime on a 4-bit base, with and without the adapter, equals constrained greedy."""
    from spacy_medllm.llm.copy import decode_constrained
    from spacy_medllm.types import CopyConstraint

    lm = load_lm(ModelSpec(models["llama"], quantization="4bit", device="cpu"))
    lm.add_adapter("a", models["lora_llama"])
    sources = ["头痛三天伴呕吐", "神志大多清晰"]
    requests = [
        GenerationRequest(f"{s}\n{label}", chat=True, constraint=CopyConstraint(source=s, forced_prefix=label + "："))
        for s in sources
        for label in ("症状", "疾病")
    ]
    for adapter in (None, "a"):
        generator = HFGenerator(lm, adapter)
        results = generator.generate(requests, batch_size=3)
        with lm.use(adapter) as model:
            greedy = decode_constrained(
                model,
                generator.tokenizer,
                [generator.encode(r) for r in requests],
                [r.constraint for r in requests],
                eos_token_ids=generator.stop_ids,
                speculative=False,
                share_prefix=False,
            )
        assert [r.token_ids for r in results] == [g.token_ids for g in greedy]
        for r, req in zip(results, requests):
            c = req.constraint
            assert r.finish_reason == "stop" and r.text.startswith(c.forced_prefix)
            assert r.text[len(c.forced_prefix) :].replace("[", "").replace("]", "") == c.source
    with_adapter = [r.token_ids for r in HFGenerator(lm, "a").generate(requests)]
    assert with_adapter != [r.token_ids for r in HFGenerator(lm).generate(requests)]


def test_8bit_loads_on_cpu_and_generates(models):
    lm = load_lm(ModelSpec(models["qwen2"], quantization="8bit", device="cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = HFGenerator(lm).generate(_requests()[:2], batch_size=2)
    assert [len(r.token_ids) for r in result] == MAX_NEW[:2]


def _load_error(spec, match):
    with pytest.raises(MedLLMLoadError, match=match):
        load_lm(spec)


def test_model_errors(models, tmp_path, monkeypatch):
    _load_error(ModelSpec(str(tmp_path / "nope")), "does not exist.*init-tiny")
    _load_error(ModelSpec(str(tmp_path)), "has no config.json")
    bin_dir = tmp_path / "bin_only"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (bin_dir / "pytorch_model.bin").write_bytes(b"")
    _load_error(ModelSpec(str(bin_dir)), "no \\*.safetensors.*pytorch_model.bin.*use_safetensors = false")
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "chatglm", "auto_map": {"AutoConfig": "x.Y"}}))
    (remote / "model.safetensors").write_bytes(b"")
    _load_error(ModelSpec(str(remote)), "needs its own Python code.*trust_remote_code = true")
    _load_error(ModelSpec("Qwen/Qwen2.5-7B-Instruct"), "Hub id.*local directories only.*huggingface-cli download")
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (no_tokenizer / "model.safetensors").write_bytes(b"")
    _load_error(ModelSpec(str(no_tokenizer)), "has no tokenizer files")
    (no_tokenizer / "config.json").write_text("{broken")
    _load_error(ModelSpec(str(no_tokenizer)), "config.json is not valid JSON")
    if not torch.cuda.is_available():
        _load_error(ModelSpec(models["qwen2"], device="cuda"), "CUDA is not available.*device = \"cpu\"")
        _load_error(ModelSpec(models["qwen2"], device="cuda:1"), "CUDA is not available")
    for kwargs, match in [
        ({"dtype": "float64"}, "dtype='float64' is not supported"),
        ({"device": "gpu"}, "device='gpu' is not supported"),
        ({"quantization": "3bit"}, "quantization='3bit' is not supported"),
        ({"device": "cpu", "device_map": "auto"}, "set only one"),
    ]:
        with pytest.raises(MedLLMLoadError, match=match):
            ModelSpec(models["qwen2"], **kwargs)


def test_quantization_errors(models, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    _load_error(ModelSpec(models["qwen2"], quantization="4bit", bnb_4bit_compute_dtype="float32"),
                "needs bitsandbytes.*pip install bitsandbytes.*quantization = null")
    monkeypatch.undo()

    def unsupported(*args, **kwargs):
        raise RuntimeError("bitsandbytes: no kernel for this device")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", unsupported)
    _load_error(ModelSpec(models["qwen2"], quantization="8bit", dtype="float32"),
                "8bit quantization failed on device 'cpu': bitsandbytes: no kernel.*quantization = null")
    monkeypatch.undo()

    class BrokenKernel(torch.nn.Module):  # loads, but the first quantized forward pass fails
        device = torch.device("cpu")

        def forward(self, **kwargs):
            raise RuntimeError("shape '[32, 0]' is invalid for input of size 16")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: BrokenKernel())
    _load_error(ModelSpec(models["qwen2"], quantization="4bit", dtype="float32"),
                "4bit quantization failed on device 'cpu': shape .*invalid")


def test_adapter_errors(models, tmp_path):
    lm = load_lm(ModelSpec(models["qwen2"], dtype="float32", device="cpu", attn_implementation="sdpa"))
    before = [r.token_ids for r in HFGenerator(lm).generate(_requests(), batch_size=4)]
    with pytest.raises(MedLLMLoadError, match="Adapter path .* does not exist"):
        lm.add_adapter("x", str(tmp_path / "nope"))
    with pytest.raises(MedLLMLoadError, match="no adapter_config.json.*PeftModel.save_pretrained"):
        lm.add_adapter("x", models["qwen2"])
    with pytest.raises(MedLLMLoadError, match="does not fit the base.*trained on .*qwen2_small.*size mismatch"):
        lm.add_adapter("x", models["lora_small"])
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text("{}")
    with pytest.raises(MedLLMLoadError, match="no adapter_model.safetensors.*use_safetensors = false"):
        lm.add_adapter("x", str(no_weights))
    foreign = tmp_path / "foreign"
    _save_lora(models["qwen2"], foreign, seed=9)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(foreign / "adapter_model.safetensors"))
    save_file({k.replace("self_attn.q_proj", "attn.c_attn"): v for k, v in weights.items()}, str(foreign / "adapter_model.safetensors"))
    with pytest.raises(MedLLMLoadError, match="module 'model.layers.0.attn.c_attn', which the base model does not have"):
        lm.add_adapter("x", str(foreign))
    with pytest.raises(MedLLMLoadError, match="No adapter named 'x'.*add_adapter"):
        with lm.use("x"):
            pass
    # nothing above touched the base model
    assert lm.adapters == {}
    assert [r.token_ids for r in HFGenerator(lm).generate(_requests(), batch_size=4)] == before
    lm.add_adapter("a", models["lora_a"])
    with pytest.raises(MedLLMLoadError, match="already used"):
        lm.add_adapter("a", models["lora_b"])
    with pytest.raises(MedLLMLoadError, match="size mismatch"):
        lm.add_adapter("small", models["lora_small"])
    assert sorted(lm.adapters) == ["a"]


def test_default_adapter_name(tmp_path):
    a, b = tmp_path / "x" / "final", tmp_path / "y" / "final"
    assert default_adapter_name(a) != default_adapter_name(b)
    assert default_adapter_name(a).startswith("final_")
    assert default_adapter_name(tmp_path / "lora.v1-2") .startswith("lora_v1_2_")


def test_spacy_llm_component_with_our_model(models, tmp_path):
    import spacy

    def config(**model):
        return {
            "task": {"@llm_tasks": "spacy.Raw.v1", "template": "{{ text }}"},
            "model": {
                "@llm_models": "spacy_medllm.HFCausalLM.v1",
                "spec": {"@misc": "spacy_medllm.ModelSpec.v1", "path": models["qwen2"], "dtype": "float32", "device": "cpu"},
                "batch_size": 3,
                "max_new_tokens": 6,
                **model,
            },
            "save_io": True,
        }

    texts = PROMPTS[:3]
    nlp = spacy.blank("zh")
    nlp.add_pipe("llm", config=config())
    docs = list(nlp.pipe(texts, batch_size=8))
    lm = load_lm(ModelSpec(models["qwen2"], dtype="float32", device="cpu"))
    expected = HFGenerator(lm).generate([GenerationRequest(t, 6, chat=True) for t in texts])
    assert [doc._.llm_reply for doc in docs] == [r.text for r in expected]
    assert docs[0].user_data["llm_io"]["llm"]["prompt"] == [texts[0]]
    assert nlp.get_pipe("llm")._model.context_length == 4096
    # with an adapter
    nlp2 = spacy.blank("zh")
    nlp2.add_pipe("llm", config=config(adapter=models["lora_a"]))
    docs2 = list(nlp2.pipe(texts))
    name = default_adapter_name(models["lora_a"])
    expected2 = HFGenerator(lm, name).generate([GenerationRequest(t, 6, chat=True) for t in texts])
    assert [doc._.llm_reply for doc in docs2] == [r.text for r in expected2]
    # the pipeline saves and loads from its config
    nlp2.to_disk(tmp_path / "pipeline")
    reloaded = spacy.load(tmp_path / "pipeline")
    assert [reloaded(t)._.llm_reply for t in texts] == [r.text for r in expected2]


def test_decoders_pass_the_cache_under_its_current_name(models):
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` and warns on every run that
    uses the old name; plain and copy-constrained decoding must use the new one."""
    from spacy_medllm.types import CopyConstraint

    lm = load_lm(ModelSpec(models["qwen2"], dtype="float32", device="cpu"))
    seen = []

    def recording(module):
        forward = module.forward

        def record(*args, **kwargs):
            seen.append((module is lm.model, set(kwargs)))
            return forward(*args, **kwargs)

        return record

    # plain decoding calls the causal LM; the constrained decoder calls the layers below its head
    modules = (lm.model, lm.model.model)
    for module in modules:
        module.forward = recording(module)
    try:
        requests = [*_requests()[:2], GenerationRequest(PROMPTS[1], constraint=CopyConstraint(source=PROMPTS[1]), chat=True)]
        results = HFGenerator(lm).generate(requests, batch_size=3)
    finally:
        for module in modules:
            del module.forward
    assert {top for top, _ in seen} == {True, False}
    assert all("cache" in keys and "past_key_values" not in keys for _, keys in seen)
    assert results[2].generated_tokens > 0
