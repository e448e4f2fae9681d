"""Copy-constrained decoding: the automaton, the vocabulary index, speculative verification
and shared-prefix reuse, on random tiny Qwen2/Llama models (float64, so that batch shape
cannot flip an argmax and "identical" means token by token)."""
import json
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from spacy_medllm.llm.copy import (  # noqa: E402
    CopyAutomaton,
    CopyConstraint,
    DecodeStats,
    decode_constrained,
    shared_prefix_groups,
    token_bytes,
    vocab_index,
)
from spacy_medllm.llm.tiny import (  # noqa: E402
    TinyModelConfig,
    build_bpe_tokenizer,
    build_char_tokenizer,
    build_tiny_model,
)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SMALL = {"hidden": 32, "layers": 2, "heads": 2, "kv_heads": 1, "intermediate": 64}


def _sentences(n=3):
    data = json.loads((ASSETS / "cmeee_dev.json").read_text(encoding="utf8"))
    return [d["text"] for d in data if 8 <= len(d["text"]) <= 40][:n]


@pytest.fixture(scope="module")
def char_tok():
    return build_char_tokenizer("".join(_sentences(50)) + "疾病症状药物：")


@pytest.fixture(scope="module")
def bpe_tok():
    texts = _sentences(60)
    # Symbol-style answers so that the vocabulary glues brackets to text ("[头" …).
    return build_bpe_tokenizer(texts + ["[头痛]伴[发热]"] * 30, vocab_size=700)


def _model(tok, arch="qwen2", seed=0):
    return build_tiny_model(tok, TinyModelConfig(arch=arch, seed=seed, **SMALL)).double().eval()


def _language(constraint, tok):
    """Every complete answer (text) the constraint allows, by walking allowed tokens."""
    index, automaton = vocab_index(tok), CopyAutomaton(constraint)
    out, stack = set(), [(b"", automaton.initial)]
    while stack:
        data, configs = stack.pop()
        if automaton.can_end(configs):
            out.add(data.decode("utf8"))
        for tid, nxt in index.allowed(automaton, configs).items():
            stack.append((data + index.bytes_of[tid], nxt))
    return out


def _allowed_strings(constraint, tok, text):
    """Allowed continuations that are whole characters (the char tokenizer also has the
    byte pieces of each character, which the full-scan test covers)."""
    index, automaton = vocab_index(tok), CopyAutomaton(constraint)
    configs = automaton.advance_bytes(automaton.initial, text.encode("utf8"))
    allowed = set()
    for tid in index.allowed(automaton, configs):
        try:
            allowed.add(index.bytes_of[tid].decode("utf8"))
        except UnicodeDecodeError:
            continue
    return allowed | ({"<EOS>"} if automaton.can_end(configs) else set())


def test_allowed_sets_by_hand(char_tok):
    c = CopyConstraint(source="头痛", forced_prefix="症状：")
    assert _allowed_strings(c, char_tok, "") == {"症"}
    assert _allowed_strings(c, char_tok, "症状：") == {"头", "["}
    assert _allowed_strings(c, char_tok, "症状：[") == {"头"}  # no [[ and no []
    assert _allowed_strings(c, char_tok, "症状：[头") == {"痛", "[", "]"}
    assert _allowed_strings(c, char_tok, "症状：[头[痛") == {"]"}
    assert _allowed_strings(c, char_tok, "症状：[头[痛]") == {"]"}
    assert _allowed_strings(c, char_tok, "症状：[头[痛]]") == {"<EOS>"}  # EOS only at the end
    assert _allowed_strings(c, char_tok, "症状：头痛") == {"<EOS>"}
    assert _allowed_strings(c, char_tok, "症状：头") == {"痛", "["}


def test_language_of_a_two_character_source(char_tok):
    # Spans with distinct starts over "ab": {[0,1),[0,2)} x {[1,2)} -> 6 answers.
    assert _language(CopyConstraint(source="ab"), char_tok) == {
        "ab", "[a]b", "[ab]", "a[b]", "[a][b]", "[a[b]]"
    }
    assert _language(CopyConstraint(source="ab", max_depth=1), char_tok) == {
        "ab", "[a]b", "[ab]", "a[b]", "[a][b]"
    }
    assert _language(CopyConstraint(source="ab", max_span_chars=1), char_tok) == {"ab", "[a]b", "a[b]", "[a][b]"}
    loose = _language(CopyConstraint(source="a", forbid_double_open=False, forbid_empty=False), char_tok)
    assert {"[[a]]", "[]a", "a[]", "[][a]"} <= loose and all(len(t) < 10 for t in loose)


def test_max_span_forces_a_close(char_tok):
    c = CopyConstraint(source="abcd", max_span_chars=2)
    assert _allowed_strings(c, char_tok, "[ab") == {"]"}
    assert _allowed_strings(c, char_tok, "a[b[c") == {"]"}


def test_source_containing_the_bracket_character(char_tok):
    lang = _language(CopyConstraint(source="[a"), char_tok)
    assert "[a" in lang and "[[a]" in lang  # literal then open, or open then literal
    assert "[a]" not in lang and "[[a]]" not in lang
    c = CopyConstraint(source="x[a")
    assert _allowed_strings(c, char_tok, "x[") == {"[", "a"}  # both readings alive


@pytest.mark.parametrize("which", ["char", "bpe"])
def test_index_matches_a_full_vocabulary_scan(which, char_tok, bpe_tok):
    tok = char_tok if which == "char" else bpe_tok
    index, pieces = vocab_index(tok), token_bytes(tok)
    assert vocab_index(tok) is index  # built once per tokenizer
    rng = random.Random(0)
    for source in _sentences(3):
        automaton = CopyAutomaton(CopyConstraint(source=source, forced_prefix="疾病："))
        configs, steps = automaton.initial, 0
        while True:
            allowed = index.allowed(automaton, configs)
            scan = {t: automaton.advance_bytes(configs, b) for t, b in enumerate(pieces) if b}
            assert allowed == {t: after for t, after in scan.items() if after}  # tokens and where they lead
            if not allowed:
                break
            configs = allowed[rng.choice(sorted(allowed))]
            steps += 1
        assert automaton.can_end(configs) and steps > 5
    if which == "bpe":  # tokens that glue a bracket to text, and pieces of a character
        assert any(len(b) > 1 and b[:1] == b"[" for b in pieces if b)
        assert any(b and b.decode("utf8", errors="ignore") == "" for b in pieces)


def test_bpe_token_bytes_round_trip(bpe_tok):
    pieces = token_bytes(bpe_tok)
    text = "患者[头痛]三天，伴发热。"
    ids = bpe_tok.encode(text, add_special_tokens=False)
    assert b"".join(pieces[i] for i in ids) == text.encode("utf8")


def _rows(tok, sentences, types=("疾病", "症状", "药物")):
    prompts, constraints = [], []
    for text in sentences:
        for label in types:
            msgs = [{"role": "user", "content": f"标注实体。\n句子：{text}\n类型：{label}"}]
            prompts.append(tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                               add_special_tokens=False).input_ids)
            constraints.append(CopyConstraint(source=text, forced_prefix=label + "："))
    return prompts, constraints


def _decode(model, tok, prompts, constraints, **kw):
    stats = DecodeStats()
    rows = decode_constrained(model, tok, prompts, constraints, eos_token_ids=[tok.eos_token_id], stats=stats, **kw)
    return rows, stats


def _is_valid_answer(text, c):
    if not text.startswith(c.forced_prefix):
        return False
    body, depth = text[len(c.forced_prefix):], 0
    for ch in body:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth < 0 or depth > c.max_depth:
            return False
    return depth == 0 and body.replace("[", "").replace("]", "") == c.source and "[[" not in body and "[]" not in body


@pytest.mark.parametrize("arch,seed", [("qwen2", 0), ("qwen2", 1), ("llama", 2)])
def test_speculative_equals_constrained_greedy(char_tok, arch, seed):
    model = _model(char_tok, arch, seed)
    prompts, constraints = _rows(char_tok, _sentences(2))
    greedy, g_stats = _decode(model, char_tok, prompts, constraints, speculative=False, share_prefix=False)
    spec, s_stats = _decode(model, char_tok, prompts, constraints, speculative=True, share_prefix=False, max_draft=8)
    assert [r.token_ids for r in spec] == [r.token_ids for r in greedy]
    for a, b in zip(spec, greedy):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-9)
        assert a.finished and a.token_ids[-1] == char_tok.eos_token_id
    for row, c in zip(greedy, constraints):
        assert _is_valid_answer(row.text, c)
    assert g_stats.generated_tokens == s_stats.generated_tokens == sum(len(r.token_ids) for r in greedy)
    assert s_stats.forward_passes < g_stats.forward_passes
    assert s_stats.accepted_tokens > 0


@pytest.mark.parametrize("text_mass,biases", [(False, (4.0, 0.0, -50.0)), (True, (8.0, 6.5, -50.0))])
def test_open_bias_trades_brackets_and_keeps_speculation_exact(char_tok, text_mass, biases):
    from dataclasses import replace

    model = _model(char_tok, "qwen2", 5)
    prompts, constraints = _rows(char_tok, _sentences(2))
    counts = []
    for bias in biases:
        biased = [replace(c, open_bias=bias, text_mass=text_mass) for c in constraints]
        greedy, _ = _decode(model, char_tok, prompts, biased, speculative=False, share_prefix=False)
        spec, _ = _decode(model, char_tok, prompts, biased, speculative=True, share_prefix=True)
        assert [r.token_ids for r in spec] == [r.token_ids for r in greedy]
        assert all(_is_valid_answer(r.text, c) for r, c in zip(greedy, biased))
        counts.append(sum(r.text.count("[") for r in greedy))
    # a random model's bracket probability is flat, so under text_mass the count jumps
    assert counts[0] > counts[1] >= counts[2] == 0
    assert counts[1] > 0 or text_mass


def test_text_mass_weighs_a_bracket_against_all_text(char_tok):
    """The decision by hand: "[" at logit 0 beats the source token at -1 alone, but not
    the source token plus 100 other text tokens at -1 (log 101 - 1 > 0)."""
    import torch

    from spacy_medllm.llm.copy.options import _OptionTable, _verify
    from spacy_medllm.llm.copy.stream import _plan, _Row

    index = vocab_index(char_tok)
    source = _sentences(1)[0]
    open_id = char_tok.convert_tokens_to_ids("[")
    first = char_tok.encode(source[0], add_special_tokens=False)
    others = [i for i in range(len(char_tok)) if i not in index.bracket_ids("[", "]") and i not in first][:100]
    logits = torch.full((1, 1, len(char_tok)), -30.0, dtype=torch.float64)
    logits[0, 0, open_id] = 0.0
    logits[0, 0, first[0]] = logits[0, 0, others] = -1.0
    for text_mass, expected in ((False, open_id), (True, first[0])):
        automaton = CopyAutomaton(CopyConstraint(source=source, text_mass=text_mass))
        row = _Row(automaton=automaton, configs=automaton.initial, pending=[], max_new=10, draft_len=4)
        plan = _plan(index, row, [], 0, [char_tok.eos_token_id])
        [token], [logprob] = _verify(logits[0], plan.options, index, _OptionTable())
        assert token == expected
        assert logprob == pytest.approx(float(torch.log_softmax(logits[0, 0], -1)[expected]))


def test_models_without_a_plain_head_decode_through_their_own_forward(char_tok, monkeypatch):
    """The output layer on the verified positions only (Qwen2/Llama) and the model's own
    forward with ``logits_to_keep`` (any other causal LM) give the same answers, and the
    passes are counted either way."""
    from spacy_medllm.llm.copy import batch, count_forward_passes

    model = _model(char_tok, "llama", 3)
    prompts, constraints = _rows(char_tok, _sentences(2))
    split, split_stats = _decode(model, char_tok, prompts, constraints)
    monkeypatch.setattr(batch, "_PLAIN_HEAD_TYPES", frozenset())
    with count_forward_passes(model) as calls:
        whole, whole_stats = _decode(model, char_tok, prompts, constraints)
    assert [r.token_ids for r in whole] == [r.token_ids for r in split]
    for a, b in zip(whole, split):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-9)
    assert calls[0] == whole_stats.forward_passes == split_stats.forward_passes


def test_a_pass_no_attention_layer_ran_on_is_refused(char_tok):
    """A pass packs the rows into one sequence and relies on transformers' attention
    interface to attend per row; a model whose attention bypasses it would mix the rows,
    so a pass on which no attention layer ran is an error. The model's own attention
    setting is back after every pass."""
    from spacy_medllm.llm.copy import attention

    model = _model(char_tok)
    with pytest.raises(NotImplementedError, match="attention interface"):
        with attention.packed_pass(model.config, attention.PassLayout(None, 0, 0, None)):
            pass  # a model that never called the interface
    assert model.config._attn_implementation == "sdpa"
    prompts, constraints = _rows(char_tok, _sentences(1))
    _decode(model, char_tok, prompts, constraints)
    assert model.config._attn_implementation == "sdpa"


def test_sliding_window_caches_are_refused_before_any_pass(char_tok):
    """Rows are moved and cut in place in the KV cache, which a sliding-window layer
    crops on its own: such a model (e.g. a Mistral config with ``sliding_window``) gets a
    clear error before the first pass, not wrong answers."""
    from transformers import MistralConfig, MistralForCausalLM

    from spacy_medllm.llm.copy import count_forward_passes

    config = MistralConfig(vocab_size=len(char_tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, intermediate_size=64, sliding_window=4096)
    model = MistralForCausalLM(config).eval()
    prompts, constraints = _rows(char_tok, _sentences(1))
    with count_forward_passes(model) as calls, pytest.raises(NotImplementedError, match="Sliding"):
        _decode(model, char_tok, prompts, constraints)
    assert calls[0] == 0


def test_speculative_and_shared_prefix_with_bpe(bpe_tok):
    model = _model(bpe_tok, "qwen2", 3)
    prompts, constraints = _rows(bpe_tok, _sentences(2))
    greedy, _ = _decode(model, bpe_tok, prompts, constraints, speculative=False, share_prefix=False)
    both, _ = _decode(model, bpe_tok, prompts, constraints, speculative=True, share_prefix=True)
    assert [r.token_ids for r in both] == [r.token_ids for r in greedy]
    for row, c in zip(greedy, constraints):
        assert _is_valid_answer(row.text, c)


def test_shared_prefix_equals_separate_prompts(char_tok):
    model = _model(char_tok, "qwen2", 4)
    prompts, constraints = _rows(char_tok, _sentences(3))
    plain, p_stats = _decode(model, char_tok, prompts, constraints, speculative=True, share_prefix=False)
    shared, s_stats = _decode(model, char_tok, prompts, constraints, speculative=True, share_prefix=True)
    assert [r.token_ids for r in shared] == [r.token_ids for r in plain]
    for a, b in zip(shared, plain):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-9)
    # Prompt tokens computed, by hand: without sharing every prompt in full; with it the
    # prefix common to all rows once, each sentence's shared part once, each row's rest.
    groups = shared_prefix_groups(prompts, [c.source for c in constraints])
    common = min(min(n for _, n in groups), min(_lcp(prompts[0], prompts[m[0]]) for m, _ in groups))
    expected = common + sum(n - common + sum(len(prompts[r]) - n for r in members) for members, n in groups)
    assert p_stats.prefill_tokens == p_stats.prompt_tokens == sum(map(len, prompts))
    assert s_stats.prefill_tokens == expected < p_stats.prefill_tokens
    # rows of one sentence per batch: the common prefix is still computed only once
    shared3, s3 = _decode(model, char_tok, prompts, constraints, share_prefix=True, batch_size=3)
    assert [r.token_ids for r in shared3] == [r.token_ids for r in plain]
    assert s3.prefill_tokens == expected


def _lcp(a, b):
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("share_prefix", [False, True])
def test_output_does_not_depend_on_the_batch_size(char_tok, share_prefix):
    model = _model(char_tok, "qwen2", 7)
    prompts, constraints = _rows(char_tok, _sentences(3))
    runs = [_decode(model, char_tok, prompts, constraints, share_prefix=share_prefix, batch_size=size)[0]
            for size in (1, 3, 5, 64)]
    assert all([r.token_ids for r in run] == [r.token_ids for r in runs[0]] for run in runs[1:])


def test_rows_join_as_others_finish(char_tok, monkeypatch):
    """Continuous batching. As with a trained model, one type per sentence has a long
    answer and the others stop early (``max_new_tokens`` 4 here); a batch of 5 rows holds
    one sentence's 3 rows, and the next sentence joins as soon as 2 rows are left. The
    long rows then run side by side: about half the passes of decoding the sentences one
    batch after the other, with the same tokens. Joining rows take the cache rows of rows
    that left (their prefix written in place)."""
    from spacy_medllm.llm.copy.batch import _Batch

    model = _model(char_tok, "qwen2", 7)
    sentences = _sentences(3)
    prompts, constraints = _rows(char_tok, sentences)
    budget = [1000, 4, 4] * len(sentences)
    seeded = []
    seed = _Batch.seed
    monkeypatch.setattr(_Batch, "seed", lambda self, row, prefix: seeded.append(row) or seed(self, row, prefix))
    together, t_stats = _decode(model, char_tok, prompts, constraints, batch_size=5, max_new_tokens=budget)
    assert seeded  # joining rows took the cache rows of rows that had left
    one_by_one = 1  # the prefix common to all rows: its own pass in `together`
    for k in range(len(sentences)):
        part = slice(3 * k, 3 * k + 3)
        rows, stats = _decode(model, char_tok, prompts[part], constraints[part], max_new_tokens=budget[part])
        one_by_one += stats.forward_passes
        assert [r.token_ids for r in rows] == [r.token_ids for r in together[part]]
    assert t_stats.forward_passes < 0.6 * one_by_one


def test_packed_passes_give_the_models_own_logprobs(char_tok):
    """A pass packs the rows' blocks into one sequence, keeps the cache of all layers in
    one tensor and folds grouped query heads onto their key/value head: each chosen
    token's log-probability equals the model's own forward over the prompt and the
    answer so far (the choice is made on float32 logits, as for any model), so none of
    it changes a value."""
    model = _model(char_tok, "qwen2", 4)
    assert model.config.num_attention_heads > model.config.num_key_value_heads
    prompts, constraints = _rows(char_tok, _sentences(2))
    rows, stats = _decode(model, char_tok, prompts, constraints, max_draft=8)
    assert stats.hole_columns > 0  # rejected drafts left masked columns behind
    with torch.inference_mode():
        for prompt, row in zip(prompts, rows):
            ids = torch.tensor([prompt + row.token_ids[:-1]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1 :].float(), -1)
            expected = logp[torch.arange(len(row.token_ids)), torch.tensor(row.token_ids)]
            assert row.logprobs == pytest.approx(expected.tolist(), abs=1e-6)


def test_one_transfer_each_way_per_pass_whatever_the_depth(char_tok):
    """Everything a pass needs goes to the device in one transfer and its choices come
    back in one, however many layers the model has: a 4-layer model whose last two
    layers add nothing decodes exactly as its first two layers do, with the same
    transfers."""
    import copy

    from spacy_medllm.llm.copy import count_transfers

    deep = build_tiny_model(char_tok, TinyModelConfig(**{**SMALL, "layers": 4})).double().eval()
    with torch.no_grad():
        for layer in deep.model.layers[2:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    shallow = copy.deepcopy(deep)
    shallow.model.layers = shallow.model.layers[:2]
    shallow.config.num_hidden_layers = 2
    prompts, constraints = _rows(char_tok, _sentences(2))
    _decode(shallow, char_tok, prompts[:1], constraints[:1])  # the index's one-time tensors
    counts, answers = [], []
    for model in (shallow, deep):
        with count_transfers() as transfers:
            rows, stats = _decode(model, char_tok, prompts, constraints, max_draft=8)
        counts.append((transfers[0], stats.forward_passes))
        answers.append([r.token_ids for r in rows])
    assert answers[0] == answers[1]
    assert counts[0] == counts[1]
    assert counts[0][0] <= 2 * counts[0][1]


def test_drafts_start_on_the_source_tokenization(bpe_tok):
    """A draft starting where a token of the source's own tokenization starts reuses its
    tokens; elsewhere the rest is tokenized on its own. Either way the draft spells the
    answer's next bytes."""
    from spacy_medllm.llm.copy.drafts import _draft_tokens, _SourceTokens
    from spacy_medllm.llm.copy.stream import _Row

    index, text = vocab_index(bpe_tok), _sentences(1)[0]
    automaton = CopyAutomaton(CopyConstraint(source=text))
    whole = _SourceTokens.of(index, bpe_tok, automaton, {})
    assert whole.ids == bpe_tok.encode(text, add_special_tokens=False)
    assert whole.between(0, len(text)) == whole.ids
    inner = sorted(whole.starts)[2]
    assert whole.between(inner, len(text)) == whole.ids[whole.starts[inner]:]
    cache, eos = {}, bpe_tok.eos_token_id
    for start in range(len(text)):
        configs = automaton.advance_bytes(automaton.initial, text[:start].encode("utf8"))
        row = _Row(automaton=automaton, configs=configs, pending=[], max_new=1000, draft_len=8)
        draft = _draft_tokens(index, bpe_tok, row, 64, eos, cache)
        assert draft[-1] == eos
        assert b"".join(index.bytes_of[t] for t in draft[:-1]) == text[start:].encode("utf8")


def test_shared_prefix_when_groups_share_only_the_common_prefix(char_tok):
    """Texts after the type: each group's shared part is the common prefix itself."""
    model = _model(char_tok, "qwen2", 6)
    texts = _sentences(2)
    prompts, constraints = [], []
    for text in texts:
        for label in ("疾病", "症状"):
            prompts.append(char_tok(f"标注实体。类型：{label}\n句子：{text}", add_special_tokens=False).input_ids)
            constraints.append(CopyConstraint(source=text, forced_prefix=label + "："))
    plain, _ = _decode(model, char_tok, prompts, constraints, share_prefix=False)
    shared, _ = _decode(model, char_tok, prompts, constraints, share_prefix=True)
    assert [r.token_ids for r in shared] == [r.token_ids for r in plain]


def test_shared_prefix_groups():
    prompts = [[1, 2, 3, 4, 5, 9], [1, 2, 3, 4, 5, 8], [1, 2, 7, 7, 7, 7, 6], [1, 2, 7, 7, 7, 7, 5]]
    assert shared_prefix_groups(prompts, ["s1", "s1", "s2", "s2"]) == [([0, 1], 5), ([2, 3], 6)]
    assert shared_prefix_groups([[1, 2], [1, 2]], ["s", "s"]) == [([0, 1], 1)]  # keep one own token


def test_max_new_tokens_cuts_and_unknown_character_fails(char_tok):
    model = _model(char_tok)
    prompts, constraints = _rows(char_tok, _sentences(1), types=("疾病",))
    rows, _ = _decode(model, char_tok, prompts, constraints, max_new_tokens=[4])
    assert len(rows[0].token_ids) == 4 and not rows[0].finished


def test_word_level_vocabulary_and_a_character_it_cannot_spell():
    """A tokenizer without byte pieces: token strings are the text; a missing character
    is a clear error, not a hang or a silent drop."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|im_end|>": 0, "<unk>": 1, **{ch: i + 2 for i, ch in enumerate("问：头痛[]ab")}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", unk_token="<unk>")
    assert _language(CopyConstraint(source="ab"), tok) == {"ab", "[a]b", "[ab]", "a[b]", "[a][b]", "[a[b]]"}
    model = _model(tok)
    prompt = tok("问：头痛", add_special_tokens=False).input_ids
    rows, _ = _decode(model, tok, [prompt], [CopyConstraint(source="头痛", forced_prefix="a")])
    assert rows[0].text.replace("[", "").replace("]", "") == "a头痛"
    with pytest.raises(RuntimeError, match="cannot spell"):
        _decode(model, tok, [prompt], [CopyConstraint(source="头疼", forced_prefix="a")])


def test_symbol_strategy_makes_the_decoders_constraint():
    from spacy_medllm.labels import get_scheme
    from spacy_medllm.strategies import SymbolStrategy

    strategy = SymbolStrategy()
    prompt = strategy.prompt("头痛", get_scheme("cmeee"), "sym")
    c = strategy.copy_constraint("头痛", prompt)
    assert isinstance(c, CopyConstraint)
    assert (c.forced_prefix, c.source, c.open, c.close) == ("临床表现：", "头痛", "[", "]")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: threads only add contention on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_generator_runtime_symbol_requests_and_prompt_lookup(tmp_path, char_tok):
    """Through the runtime: HFGenerator hands constrained requests to generate_constrained;
    every mention of every answer aligns; prompt lookup equals plain greedy."""
    from spacy_medllm.labels import get_scheme
    from spacy_medllm.llm.generation import GenerationRequest, HFGenerator
    from spacy_medllm.llm.loader import ModelSpec, clear_cache, load_lm
    from spacy_medllm.llm.prompt_lookup import generate_prompt_lookup
    from spacy_medllm.strategies.symbol import SymbolStrategy

    model = _model(char_tok, "qwen2", 5)
    model.save_pretrained(tmp_path)
    char_tok.save_pretrained(tmp_path)
    lm = load_lm(ModelSpec(path=str(tmp_path), device="cpu"))
    try:
        generator = HFGenerator(lm)
        strategy, scheme = SymbolStrategy(), get_scheme("cmeee")
        texts = _sentences(2)
        prompts = [(text, p) for text in texts for p in strategy.prompts(text, scheme)[:3]]
        requests = [
            GenerationRequest(
                prompt=p.chat_text(char_tok), max_new_tokens=400, constraint=strategy.copy_constraint(text, p)
            )
            for text, p in prompts
        ]
        results = generator.generate(requests, batch_size=8)
        direct, _ = _decode(
            lm.model, char_tok, [generator.encode(r) for r in requests],
            [r.constraint for r in requests], speculative=False, share_prefix=False,
        )
        assert [r.token_ids for r in results] == [d.token_ids for d in direct]
        for result, (text, p) in zip(results, prompts):
            assert result.finish_reason == "stop" and result.forward_passes > 0
            parsed = strategy.parse(text, result.text, p)
            assert not parsed.discarded and all(text[m.start:m.end] == m.text for m in parsed.mentions)
        plain = [GenerationRequest(prompt=p.chat_text(char_tok), max_new_tokens=12) for _, p in prompts[:2]]
        lookup = generate_prompt_lookup(lm, plain, num_tokens=4)
        greedy = generator.generate(plain)
        assert [r.token_ids for r in lookup] == [r.token_ids for r in greedy]
        for a, b in zip(lookup, greedy):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-6)
    finally:
        clear_cache()


@pytest.mark.parametrize("text_mass,open_bias", [(True, 0.0), (False, 0.0), (True, -1.0)])
def test_copy_rule_step_by_step_equals_the_decoder(char_tok, text_mass, open_bias):
    """What a model server's sampler runs (one position at a time, no cache, the rule
    choosing from full logits) gives the decoder's answers token for token."""
    from dataclasses import replace

    from spacy_medllm.llm.copy import CopyRule

    model = _model(char_tok, "qwen2", 5)
    prompts, constraints = _rows(char_tok, _sentences(2))
    constraints = [replace(c, text_mass=text_mass, open_bias=open_bias) for c in constraints]
    expected, _ = _decode(model, char_tok, prompts, constraints)
    rule = CopyRule(char_tok, [char_tok.eos_token_id])
    cursors = [rule.start(c) for c in constraints]
    outputs = [[] for _ in prompts]
    alive = list(range(len(prompts)))
    with torch.no_grad():
        while alive:
            logits = torch.stack([model(torch.tensor([prompts[r] + outputs[r]])).logits[0, -1] for r in alive])
            chosen = rule.choose(logits, [cursors[r] for r in alive])
            for r, token in zip(list(alive), chosen):
                assert rule.take(cursors[r], token)
                outputs[r].append(token)
                if token == char_tok.eos_token_id:
                    alive.remove(r)
    assert outputs == [row.token_ids for row in expected]
    assert not rule.take(cursors[0], char_tok.eos_token_id)  # nothing is legal after the end


def test_copy_request_arg_round_trip_and_refusals():
    from spacy_medllm.llm.copy import copy_request_arg, read_copy_request_arg

    constraint = CopyConstraint(source="发热\"[x]\n", forced_prefix="疾病：", max_span_chars=5, text_mass=False, open_bias=-0.5)
    assert read_copy_request_arg(copy_request_arg(constraint, [3, 1, 3])) == (constraint, (1, 3))
    for bad in ("", "{}", '{"constraint": {"source": "a"}, "eos": []}', '{"constraint": {"sauce": "a"}, "eos": [1]}',
                '{"constraint": {"source": "a", "max_depth": -1}, "eos": [1]}'):
        with pytest.raises(ValueError):
            read_copy_request_arg(bad)


@pytest.mark.parametrize("max_depth", [1, 2, 3])
@pytest.mark.parametrize("forbid_empty,forbid_double_open", [(False, False), (False, True), (True, False), (True, True)])
def test_every_reachable_state_can_end(max_depth, forbid_empty, forbid_double_open):
    """No dead ends: a decoder in any reachable state has a legal way to finish (without
    the run's room check, "…c][" at depth 1 left an open bracket that could not close)."""
    for source in ("", "a", "ab", "abc"):
        automaton = CopyAutomaton(CopyConstraint(
            source=source, max_depth=max_depth, max_span_chars=2,
            forbid_empty=forbid_empty, forbid_double_open=forbid_double_open,
        ))
        start = (0, (), 0, False)
        seen, stack, edges = {start}, [start], {}
        while stack:
            state = stack.pop()
            edges[state] = [nxt for _, nxt in automaton.units(state)]
            for nxt in edges[state]:
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        live = {s for s in seen if s[0] == automaton.n and not s[1]}
        changed = True
        while changed:
            changed = False
            for state in seen - live:
                if any(nxt in live for nxt in edges[state]):
                    live.add(state)
                    changed = True
        assert live == seen, (source, sorted(seen - live))
