"""One-call GPU check: the copy-constrained decoder at real model shapes, one QLoRA
training step, and vLLM with the copy grammar when it is installed.

    python benchmarks/gpu_check.py --out gpu_results                  # on a CUDA machine
    python benchmarks/gpu_check.py --out /tmp/gpu_check --dry-run     # tiny shapes, CPU

A GPU machine is lent rarely and briefly, and bare (torch with CUDA and this repository,
no network), so the check is one script that needs no checkpoint and no download, and
``--dry-run`` proves every step of it on a CPU first (tiny shapes, float32; under half a
minute on an idle 2-core machine).

What it measures:

* decoding, per shape of ``--shapes`` (Qwen2.5-7B's and Qwen2.5-1.5B's published configs,
  random weights, bf16, on ``--device``): the 9 per-type symbol prompts (builtin prompt,
  as configs/pipeline_gpu.cfg) of ``--sentences`` CMeEE dev sentences decoded the four
  ways of benchmarks/decoding.py, whose functions run them: (a) Hugging Face ``generate``
  greedy, (b) copy-constrained greedy, (c) + speculative drafts with continuous batching,
  (d) + the shared prompt prefix computed once. Per mode: seconds and model calls per
  sentence, generated tokens per second, peak GPU memory, the ratios against (a), and
  whether the answers equal (a)'s and the gold answers. Every mode puts at most
  9 x ``--batch-sentences`` rows (36) in a model call.
* QLoRA (the 7B shape): one training step with a 4-bit nf4 base (bitsandbytes) and LoRA
  r=16 on q, k, v, o, gate, up and down (configs/train_llm_qlora.cfg: alpha 32, dropout
  0.05, gradient checkpointing), a batch of 4 x 512 tokens, AdamW: the median seconds of
  3 steps after a warm-up, and the peak memory.
* vLLM, if importable (the smallest shape asked for): the same prompts through its
  offline engine with the copy grammar. Unsteered: a random model brackets freely and
  its answers are longer than the gold ones, so generated tokens per second is the
  figure to compare, not seconds per sentence.

Random weights would stop, bracket and copy anywhere, so the drafts' acceptance would
mean nothing: every mode is steered to the gold answers by the same logits bias
(:class:`GoldForcing`). The vocabulary is the embedded model's tokenizer (5,075 tokens,
one per character) instead of Qwen's ~152k: a smaller output layer, and more tokens
per Chinese sentence than Qwen's tokenizer makes. The figures are speeds, not quality.

It prints progress lines and one markdown table, and writes every number to
OUT/gpu_check.json, rewritten after each step so that a run cut short keeps what it
measured. A step that raises is recorded as failed (in the JSON and the table) and the
others still run; the exit status is 1 if any step failed.

Expected duration on an H100/H200-class GPU: about 3 minutes, plus 2 or 3 when vLLM is
installed (an estimate, never measured: building a model on the GPU takes seconds, each
shape makes about 1,200 model calls, mostly in (a) and (b), of 20-40 ms each, the QLoRA
step takes a few seconds, vLLM's engine start a minute or two). GPU figures in the
README come only from a real run of this script.
"""
import argparse
import gc
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402

from decoding import build_rows, run_constrained, run_plain  # noqa: E402
from spacy_medllm.llm.copy import forward_module  # noqa: E402

# The published configs of Qwen/Qwen2.5-7B-Instruct and Qwen/Qwen2.5-1.5B-Instruct (the
# project's base models), all but the vocabulary.
SHAPES: Dict[str, Dict[str, Any]] = {
    "7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
    "1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    # the dry run's stand-in: widths are multiples of 64 (bitsandbytes' 4-bit block), heads
    # of 64 (vLLM's CPU attention takes no smaller), grouped-query attention as Qwen's
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    ),
}
COMMON = dict(
    max_position_embeddings=32768,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    rms_norm_eps=1e-6,
)
MODES = {
    "a": "(a) HF generate greedy",
    "b": "(b) constrained greedy",
    "c": "(c) + speculative",
    "d": "(d) + shared prefix",
}
QLORA_BATCH = (4, 512)  # sequences x tokens
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BIAS = 50.0  # random logits spread over a few units: +50 always wins
MAX_CHARS = 120  # longest sentence taken, as benchmarks/decoding.py
GIB = 1 << 30


# --------------------------------------------------------------------------- models


def build_config(shape: str, tokenizer):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SHAPES[shape],
        **COMMON,
    )


def build_model(config, device: str, dtype: torch.dtype):
    """A random model made on ``device`` itself: initialising 7B weights on a CPU takes
    minutes, on a GPU a few seconds."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def count_parameters(config) -> int:
    """Parameters of the model ``config`` describes, counted on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> Optional[float]:
    return torch.cuda.max_memory_allocated() / GIB if device.startswith("cuda") else None


# --------------------------------------------------------------------------- gold forcing

MOD = (1 << 31) - 1
BASES = (1_000_003, 1_234_567_891)


class PrefixHasher:
    """Polynomial hashes of token prefixes, two bases modulo 2**31 - 1 (62 bits together),
    for a whole block of new tokens at once: the hash at column j is
    ``prev * P**n + sum (t_i + 1) * P**(n - rank_i)`` over the valid columns i <= j, n of them,
    computed with cumulative sums of ``(t_i + 1) * P**-rank_i`` instead of a loop."""

    def __init__(self, device: torch.device, length: int):
        self.device = device
        self._grow(length)

    def _grow(self, length: int) -> None:
        powers, inverse = [], []
        for base in BASES:
            inv = pow(base, MOD - 2, MOD)
            p, q = [1], [1]
            for _ in range(length):
                p.append(p[-1] * base % MOD)
                q.append(q[-1] * inv % MOD)
            powers.append(p)
            inverse.append(q)
        self.powers = torch.tensor(powers, dtype=torch.long, device=self.device)
        self.inverse = torch.tensor(inverse, dtype=torch.long, device=self.device)

    def extend(self, prev, tokens, valid):
        """Hashes [rows, width, 2] after each column of ``tokens`` [rows, width], the invalid
        columns skipped, continuing from ``prev`` [rows, 2]."""
        rank = valid.long().cumsum(1)
        if tokens.shape[1] >= self.powers.shape[1]:
            self._grow(2 * tokens.shape[1])
        power, inverse = self.powers[:, rank], self.inverse[:, rank]  # [2, rows, width]
        terms = (tokens + 1) * valid * inverse % MOD
        hashes = (prev.T[:, :, None] * power % MOD + terms.cumsum(-1) % MOD * power % MOD) % MOD
        return hashes.permute(1, 2, 0)


def _key(hashes):
    return hashes[..., 0] * MOD + hashes[..., 1]


HASH_DIGITS = 5  # base-128 digits of a hash below 2**31; each is exact in bf16


def _encode(hashes, dtype):
    """Hashes [..., 2] as 2 x ``HASH_DIGITS`` base-128 digits [..., 10] of ``dtype``."""
    shifts = 7 * torch.arange(HASH_DIGITS, device=hashes.device)
    return (hashes[..., None] >> shifts & 127).flatten(-2).to(dtype)


def _decode(digits):
    """:func:`_encode`'s inverse: digits [..., 10] back to hashes [..., 2]."""
    shifts = 7 * torch.arange(HASH_DIGITS, device=digits.device)
    return (digits.round().long().unflatten(-1, (2, HASH_DIGITS)) << shifts).sum(-1)


def _last_valid(past, valid):
    """Per row the entry of ``past`` [rows, columns, ...] at the row's last valid column
    (``valid`` [rows, columns]), zeros for a row with none."""
    rows, columns = valid.shape
    last = (valid.long() * torch.arange(1, columns + 1, device=valid.device)).amax(1)
    index = (last - 1).clamp(min=0).view(rows, 1, *([1] * (past.dim() - 2)))
    found = past.gather(1, index.expand(rows, 1, *past.shape[2:]))[:, 0]
    return torch.where((last > 0).view(rows, *([1] * (found.dim() - 1))), found, torch.zeros_like(found))


@contextmanager
def history_slot(config) -> Iterator[int]:
    """Every KV cache made for ``config`` in the block gets one more layer, after the
    model's: :class:`GoldForcing` keeps each column's history hash there, where it stays
    with its column whoever moves, copies or cuts the cache's rows and columns. Two kinds
    of cache are made: ``generate``'s ``DynamicCache(config=...)`` (its ``__init__`` is
    wrapped meanwhile, and the hashes are long tensors in the extra ``DynamicLayer``), and
    the constrained decoder's :class:`~spacy_medllm.llm.copy.kvstore.KVStore`, one tensor
    for all layers that the decoder moves as a whole (its ``__init__`` is wrapped to
    count one more layer; the hashes are digits in that layer's keys, see
    :func:`_encode`). Yields the slot's layer index."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    from spacy_medllm.llm.copy.kvstore import KVStore

    layers = config.num_hidden_layers
    original, original_store = DynamicCache.__init__, KVStore.__init__

    def init(cache, *args, **kwargs):
        original(cache, *args, **kwargs)
        if len(cache.layers) == layers:  # made from the config (a lazy cache starts empty)
            cache.layers.append(DynamicLayer())

    def init_store(store, count: int) -> None:
        original_store(store, count + 1 if count == layers else count)

    DynamicCache.__init__, KVStore.__init__ = init, init_store
    try:
        yield layers
    finally:
        DynamicCache.__init__, KVStore.__init__ = original, original_store


class GoldForcing:
    """Steers a random model to the gold answers, the same way in every decoding mode.

    Adds ``BIAS`` to the logit of the gold next token at every position where the row's
    tokens so far are a prompt followed by the start of its gold answer (as the tokenizer
    spells it, then EOS), and nothing elsewhere. The bias is a function of the row's token
    history alone, so plain, constrained, speculative and shared-prefix decoding see the
    same logits and make the same choices; positions off the gold path (a rejected draft,
    padding after EOS) get none, and their choices are never kept.

    A call computes only its new tokens; the history is in the KV cache, where each column
    carries the hash of the tokens up to it (:func:`history_slot`). After the decoder has
    run, a hook hashes the new tokens on from each row's last valid column, looks the
    hashes up in the gold paths' table and appends the gold next token to the hidden
    state as 3 base-128 digits (exact in bf16); the output layer's hooks strip them and add
    the bias. The digits follow each position through the decoder's own choice of the
    positions it needs logits for.

    The new tokens come in two layouts: ``generate``'s [rows, width] block with an
    ``attention_mask`` [rows, columns] over cache and block, and the constrained decoder's
    packed pass, one sequence [1, tokens] of real tokens whose rows, block columns and
    mask are the pass's :class:`~spacy_medllm.llm.copy.attention.PassLayout`."""

    def __init__(self, model, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]):
        self.model = model
        self.decoder = forward_module(model)
        self.head = model.get_output_embeddings()
        device = model.device
        longest = max(len(p) + len(a) for p, a in zip(prompts, answers))
        self.hasher = PrefixHasher(device, longest)
        keys, targets = [], []
        for prompt, answer in zip(prompts, answers):
            path = torch.tensor(list(prompt) + list(answer), device=device)[None]
            start = torch.zeros((1, 2), dtype=torch.long, device=device)
            hashes = self.hasher.extend(start, path, torch.ones_like(path))
            keys.append(_key(hashes[0, len(prompt) - 1 : -1]))
            targets.append(path[0, len(prompt) :])
        keys, order = torch.cat(keys).sort()
        targets = torch.cat(targets)[order]
        clash = (keys[1:] == keys[:-1]) & (targets[1:] != targets[:-1])
        if bool(clash.any()):
            raise RuntimeError("two gold paths share a history hash but not the next token")
        self.keys, self.targets = keys, targets
        self.pending = None

    def __enter__(self) -> "GoldForcing":
        self._slot = history_slot(self.model.config)
        self.slot = self._slot.__enter__()
        self.handles = [
            self.decoder.register_forward_hook(self._after_decoder, with_kwargs=True),
            self.head.register_forward_pre_hook(self._strip_digits),
            self.head.register_forward_hook(self._add_bias),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self._slot.__exit__(*exc)

    def _after_decoder(self, _module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        layer = cache.layers[self.slot]
        if hasattr(layer, "store"):  # a layer of the constrained decoder's KVStore
            hashes = self._packed_hashes(ids, layer.store)
        else:
            hashes = self._block_hashes(ids, kwargs["attention_mask"].bool(), layer)
        keys = _key(hashes)
        at = torch.searchsorted(self.keys, keys).clamp(max=len(self.keys) - 1)
        target = torch.where(self.keys[at] == keys, self.targets[at], -1) + 1  # 0: no bias
        digits = torch.stack([target % 128, target // 128 % 128, target // 16384], -1)
        hidden = output.last_hidden_state
        output.last_hidden_state = torch.cat([hidden, digits.to(hidden.dtype)], -1)
        return output

    def _block_hashes(self, ids, mask, layer):
        """``generate``'s pass: hashes [rows, width, 2] of the block ``ids`` [rows, width],
        the slot's ``DynamicLayer`` holding the past columns' hashes [rows, 1, columns, 2]."""
        width = ids.shape[1]
        past_valid = mask[:, : mask.shape[1] - width]
        prev = torch.zeros((ids.shape[0], 2), dtype=torch.long, device=ids.device)
        if past_valid.shape[1]:
            prev = _last_valid(layer.keys[:, 0], past_valid)
        hashes = self.hasher.extend(prev, ids, mask[:, -width:])
        layer.update(hashes[:, None], hashes[:, None])
        return hashes

    def _packed_hashes(self, ids, store):
        """The constrained decoder's packed pass: hashes [1, tokens, 2] of ``ids`` [1, tokens],
        laid out per row by the pass's layout; the store's slot layer holds each column's
        hash as digits in the first key head, and the new ones are written at the pass's
        slots like every layer's keys."""
        from spacy_medllm.llm.copy import attention

        layout = attention._ACTIVE.layout  # set by packed_pass for the pass running
        rows, width, index = layout.rows, layout.width, layout.index
        columns = layout.allowed.shape[2] - width
        tokens = ids.new_zeros(rows * width).index_copy_(0, index, ids[0]).view(rows, width)
        valid = torch.zeros(rows * width, dtype=torch.bool, device=ids.device).index_fill_(0, index, True)
        prev = torch.zeros((rows, 2), dtype=torch.long, device=ids.device)
        if columns:
            past = store.data[self.slot, 0, :, 0, :columns, : 2 * HASH_DIGITS]  # [rows, columns, 10]
            prev = _decode(_last_valid(past, layout.allowed[:, 0, :columns]))  # the first query sees all past
        hashes = self.hasher.extend(prev, tokens, valid.view(rows, width))
        packed = hashes.reshape(rows * width, 2).index_select(0, index)  # [tokens, 2]
        heads, dim = store.data.shape[3], store.data.shape[5]
        keys = store.data.new_zeros((1, heads, len(index), dim))
        keys[0, 0, :, : 2 * HASH_DIGITS] = _encode(packed, keys.dtype)
        store.write(self.slot, keys, keys)
        return packed[None]

    def _strip_digits(self, _module, args):
        hidden = args[0]
        digits = hidden[..., -3:].round().long()
        self.pending = digits[..., 0] + 128 * digits[..., 1] + 16384 * digits[..., 2] - 1
        return (hidden[..., :-3],) + tuple(args[1:])

    def _add_bias(self, _module, _args, logits):
        flat, target = logits.view(-1, logits.shape[-1]), self.pending.reshape(-1)
        hit = torch.nonzero(target >= 0).flatten()
        flat[hit, target[hit]] += BIAS
        return logits


# --------------------------------------------------------------------------- steps


class Report:
    """Runs the steps: prints when each starts, keeps its record (or its failure) at its
    place in the results, and rewrites OUT/gpu_check.json after each one."""

    def __init__(self, out: Path, meta: Dict[str, Any]):
        self.path = out / "gpu_check.json"
        self.results: Dict[str, Any] = {"meta": meta, "failed": []}
        self.start = time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)

    def log(self, line: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f} s] {line}", flush=True)

    def step(self, place: Sequence[str], fn: Callable[[], Tuple[Any, Dict[str, Any]]]) -> Any:
        """``fn()`` returns (value, record); the record is stored at ``place`` and the value
        returned (None on failure)."""
        name = " ".join(place)
        self.log(f"{name} ...")
        start = time.perf_counter()
        try:
            value, record = fn()
            record = {"status": record.pop("status", "ok"), **record}
            self.log(f"{name}: {record['status']} in {time.perf_counter() - start:.1f} s")
        except Exception as err:  # the GPU time is precious: record it and go on
            value, record = None, {"status": "failed", "error": f"{type(err).__name__}: {err}"}
            self.results["failed"].append(name)
            self.log(f"{name} FAILED: {record['error']}")
        node = self.results
        for key in place[:-1]:
            node = node.setdefault(key, {})
        node[place[-1]] = record
        self.path.write_text(json.dumps(self.results, indent=1, ensure_ascii=False), encoding="utf8")
        free_memory()
        return value


def load_rows(tokenizer, sentences: int) -> Tuple[int, List[Dict[str, Any]]]:
    """The symbol prompts of the first ``sentences`` CMeEE dev sentences (builtin
    prompt), with their gold answers' token ids (then EOS) as ``answer``."""
    from spacy_medllm.llm.generation import stop_token_ids

    data = json.loads((ROOT / "assets" / "cmeee_dev.json").read_text(encoding="utf8"))
    examples = [d for d in data if 0 < len(d["text"]) <= MAX_CHARS][:sentences]
    _, rows = build_rows(examples, tokenizer)
    eos = stop_token_ids(tokenizer)
    for r in rows:
        r["answer"] = tokenizer(r["gold"], add_special_tokens=False).input_ids + [eos[0]]
    return len(examples), rows


def decode_shape(report: Report, shape: str, tokenizer, rows, sentences: int, batch_rows: int, device: str, dtype):
    """Build the random model of ``shape``, then decode with it: each a step of its own."""
    model = report.step(("decoding", shape, "build"), lambda: build_step(build_config(shape, tokenizer), device, dtype))
    if model is not None:
        decode_modes(report, shape, model, tokenizer, rows, sentences, batch_rows, device)


def decode_modes(report: Report, shape: str, model, tokenizer, rows, sentences: int, batch_rows: int, device: str):
    """Modes (a)-(d) on ``rows``, each its own step, under one :class:`GoldForcing`."""
    from spacy_medllm.llm.generation import stop_token_ids

    eos = stop_token_ids(tokenizer)
    budgets = [len(r["answer"]) for r in rows]
    gold = [r["gold"] for r in rows]

    def plain(part: List[Dict[str, Any]]) -> Dict[str, Any]:
        return run_plain(model, tokenizer, part, eos, batch_rows, budgets, forced=False)

    def constrained(speculative: bool, share_prefix: bool) -> Callable[[List[Dict[str, Any]]], Dict[str, Any]]:
        return lambda part: run_constrained(
            model, tokenizer, part, eos, batch_rows, speculative=speculative, share_prefix=share_prefix
        )

    runs = {"a": plain, "b": constrained(False, False), "c": constrained(True, False), "d": constrained(True, True)}

    def warm_up() -> Tuple[GoldForcing, Dict[str, Any]]:
        """The gold forcing, and each mode on one sentence under it, so that kernel
        selection and lazy set-up count in no mode."""
        forcing = GoldForcing(model, [r["ids"] for r in rows], [r["answer"] for r in rows])
        with forcing:
            return forcing, {key: run(rows[:9])["calls"] for key, run in runs.items()}

    forcing = report.step(("decoding", shape, "warm-up"), warm_up)
    if forcing is None:
        return
    with forcing:
        reference: Dict[str, Any] = {}  # mode (a)'s answers, seconds and calls

        def measure(key: str) -> Tuple[None, Dict[str, Any]]:
            reset_peak(device)
            synchronize(device)
            result = runs[key](rows)
            synchronize(device)
            texts = result["texts"]
            if key == "a":
                reference.update(texts=texts, seconds=result["seconds"], calls=result["calls"])
            record = {
                "seconds_per_sentence": result["seconds"] / sentences,
                "calls_per_sentence": result["calls"] / sentences,
                "generated_tokens": result["generated"],
                "tokens_per_second": result["generated"] / result["seconds"],
                "positions_per_sentence": result["positions"] / sentences,
                "peak_gib": peak_gib(device),
                "wall_a_over_x": reference["seconds"] / result["seconds"] if reference else None,
                "calls_a_over_x": reference["calls"] / result["calls"] if reference else None,
                "same_as_a": texts == reference["texts"] if reference else None,
                "equal_to_gold": texts == gold,
                "answers_off_gold": sum(t != g for t, g in zip(texts, gold)),
            }
            if "drafted" in result:
                record.update(draft_tokens=result["drafted"], accepted_tokens=result["accepted"])
            return None, record

        for key in MODES:
            report.step(("decoding", shape, key), lambda key=key: measure(key))


def build_step(config, device: str, dtype: torch.dtype) -> Tuple[Any, Dict[str, Any]]:
    reset_peak(device)
    start = time.perf_counter()
    model = build_model(config, device, dtype)
    synchronize(device)
    return model, {
        "seconds": time.perf_counter() - start,
        "parameters": sum(p.numel() for p in model.parameters()),
        "peak_gib": peak_gib(device),
    }


def quantize_in_place(model, bnb_config, device: str) -> None:
    """Turn the decoder's linear layers into bitsandbytes 4-bit ones holding the random
    weights, as ``from_pretrained(quantization_config=...)`` does from a checkpoint:
    transformers' own ``replace_with_bnb_linear`` makes the empty 4-bit layers, and each
    weight is quantized into its layer on the device (bitsandbytes quantizes on
    ``.to(device)``), one layer at a time. Saving the random bf16 7B model (15 GB) and
    loading it back quantized would cost a minute or more of a lent GPU and the disk."""
    import bitsandbytes as bnb
    from transformers.integrations import replace_with_bnb_linear

    linears = {name: m for name, m in model.named_modules() if type(m) is torch.nn.Linear and name != "lm_head"}
    replace_with_bnb_linear(model, modules_to_not_convert=["lm_head"], quantization_config=bnb_config)
    for name in list(linears):
        old, new = linears.pop(name), model.get_submodule(name)
        new.weight = bnb.nn.Params4bit(old.weight.data, requires_grad=False, **new.weight.__dict__).to(device)
        if old.bias is not None:
            new.bias = old.bias
    model.is_loaded_in_4bit = True  # what transformers' 4-bit quantizer marks after loading


def qlora_step(config, device: str) -> Tuple[None, Dict[str, Any]]:
    """One QLoRA training step as configs/train_llm_qlora.cfg sets it up (peft's k-bit
    preparation with gradient checkpointing, LoRA on every linear layer of the decoder),
    on random tokens: median seconds of 3 steps after a warm-up, and peak memory."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    from spacy_medllm.llm.placement import disable_bnb_cpu_packing
    from spacy_medllm.training.sft import LoraSettings

    compute = torch.bfloat16 if device.startswith("cuda") else torch.float32
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    reset_peak(device)
    start = time.perf_counter()
    model = build_model(config, device, compute)
    quantize_in_place(model, bnb_config, device)
    disable_bnb_cpu_packing(model)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraSettings()
    model = get_peft_model(
        model,
        LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(LORA_TARGETS),
            task_type="CAUSAL_LM",
        ),
    )
    model.config.use_cache = False
    synchronize(device)
    setup_seconds = time.perf_counter() - start
    model_gib = torch.cuda.memory_allocated() / GIB if device.startswith("cuda") else None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(config.vocab_size, QLORA_BATCH, generator=torch.Generator().manual_seed(0)).to(device)
    model.train()

    def train_step() -> float:
        synchronize(device)
        begin = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return time.perf_counter() - begin

    reset_peak(device)
    warm = train_step()
    seconds = [train_step() for _ in range(3)]
    return None, {
        "seconds_per_step": statistics.median(seconds),
        "step_seconds": seconds,
        "warm_up_seconds": warm,
        "setup_seconds": setup_seconds,
        "batch": list(QLORA_BATCH),
        "trainable_parameters": trainable,
        "model_gib": model_gib,
        "peak_gib": peak_gib(device),
        "gradient_checkpointing": True,
    }


def vllm_step(config, tokenizer, rows, sentences: int, device: str) -> Tuple[None, Dict[str, Any]]:
    """The prompts through vLLM's offline engine with the copy grammar (the one
    ``ServerGenerator`` sends a served model): seconds per sentence and tokens per second.
    The random model is saved to a temporary folder for the engine to load."""
    if importlib.util.find_spec("vllm") is None:
        return None, {"status": "skipped", "reason": "vllm is not importable"}
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from spacy_medllm.llm.copy_grammar import copy_grammar
    from spacy_medllm.llm.generation import stop_token_ids
    from spacy_medllm.llm.server import served_constraint

    eos = stop_token_ids(tokenizer)
    params = [
        SamplingParams(
            temperature=0,
            max_tokens=len(r["constraint"].forced_prefix) + 2 * len(r["text"]) + 8,
            stop_token_ids=eos,
            structured_outputs=StructuredOutputsParams(grammar=copy_grammar(served_constraint(r["constraint"]))),
        )
        for r in rows
    ]
    prompts = [{"prompt_token_ids": r["ids"]} for r in rows]
    with tempfile.TemporaryDirectory() as folder:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model = build_model(config, device, dtype)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del model
        free_memory()
        start = time.perf_counter()
        llm = LLM(model=folder, dtype=str(dtype).split(".")[-1], seed=0, gpu_memory_utilization=0.5)
        engine_seconds = time.perf_counter() - start
        llm.generate(prompts[:9], params[:9], use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return None, {
        "seconds_per_sentence": seconds / sentences,
        "tokens_per_second": generated / seconds,
        "generated_tokens": generated,
        # unsteered, a random model brackets freely and many answers run to max_tokens
        "answers_cut": sum(o.outputs[0].finish_reason == "length" for o in outputs),
        "engine_start_seconds": engine_seconds,
    }


# --------------------------------------------------------------------------- table


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return fmt.format(value)


def _status(record: Dict[str, Any]) -> str:
    if record["status"] == "ok":
        return "ok"
    why = record.get("error") or record.get("reason", "")
    return f"{record['status']}: {why}"[:80].replace("|", "/").replace("\n", " ")


def table(results: Dict[str, Any]) -> str:
    """The results as one markdown table."""
    lines = [
        "| step | shape | status | time | calls/sent | gen tok/s | peak GiB | wall a/x | calls a/x | = (a) | = gold |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def row(step, shape, record, time_cell="-", calls="-", rate="-", extra=("-",) * 4):
        cells = [step, shape, _status(record), time_cell, calls, rate, _cell(record.get("peak_gib"), "{:.1f}"), *extra]
        lines.append("| " + " | ".join(cells) + " |")

    for shape, steps in results.get("decoding", {}).items():
        if "build" in steps:
            row("build (random init)", shape, steps["build"], _cell(steps["build"].get("seconds"), "{:.1f} s"))
        for key, name in MODES.items():
            r = steps.get(key)
            if r is None:
                continue
            extra = (
                _cell(r.get("wall_a_over_x"), "{:.2f}"),
                _cell(r.get("calls_a_over_x"), "{:.2f}"),
                _cell(r.get("same_as_a"), ""),
                _cell(r.get("equal_to_gold"), ""),
            )
            row(
                name,
                shape,
                r,
                _cell(r.get("seconds_per_sentence"), "{:.3f} s/sent"),
                _cell(r.get("calls_per_sentence"), "{:.1f}"),
                _cell(r.get("tokens_per_second"), "{:.0f}"),
                extra,
            )
    if "qlora" in results:
        q = results["qlora"]
        seconds = _cell(q.get("seconds_per_step"), "{:.2f} s/step")
        row(f"QLoRA step {QLORA_BATCH[0]} x {QLORA_BATCH[1]}", results["meta"]["qlora_shape"], q, seconds)
    if "vllm" in results:
        v = results["vllm"]
        seconds = _cell(v.get("seconds_per_sentence"), "{:.3f} s/sent")
        rate = _cell(v.get("tokens_per_second"), "{:.0f}")
        row("vLLM + copy grammar (unsteered)", results["meta"]["vllm_shape"], v, seconds, "-", rate)
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    parser.add_argument("--shapes", nargs="+", default=["7b", "1.5b"], choices=["7b", "1.5b"])
    parser.add_argument("--sentences", type=int, default=20, help="CMeEE dev sentences (9 prompts each)")
    parser.add_argument("--batch-sentences", type=int, default=4, help="sentences (x9 rows) per model call")
    parser.add_argument("--device", default="cuda", help="torch device of the real shapes")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, float32, on the CPU")
    parser.add_argument("--skip-qlora", action="store_true")
    args = parser.parse_args(argv)

    import transformers
    from transformers import AutoTokenizer

    from spacy_medllm.embedded import resolve_model_path

    device = "cpu" if args.dry_run else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}, but torch sees no CUDA device: on a CPU, use --dry-run")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    decode_shapes = ["tiny"] if args.dry_run else args.shapes
    qlora_shape = "tiny" if args.dry_run else "7b"
    vllm_shape = "tiny" if args.dry_run else min(args.shapes, key=lambda s: SHAPES[s]["hidden_size"])
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path("embedded")))
    sentences, rows = load_rows(tokenizer, args.sentences)

    meta = {
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "dtype": str(dtype),
        "dry_run": args.dry_run,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentences": sentences,
        "prompts": len(rows),
        "prompt_tokens_avg": sum(len(r["ids"]) for r in rows) / len(rows),
        "answer_tokens_avg": sum(len(r["answer"]) for r in rows) / len(rows),
        "rows_per_call": 9 * args.batch_sentences,
        "qlora_shape": qlora_shape,
        "vllm_shape": vllm_shape,
        "note": (
            "random weights steered to the gold answers by a +50 logits bias; vocabulary: the embedded "
            f"tokenizer ({len(tokenizer)} tokens, one per character), not Qwen's: speed only, not quality"
        ),
    }
    report = Report(args.out, meta)
    report.log(
        f"{device} ({meta['device_name']}), {dtype}; {sentences} sentences, {len(rows)} prompts "
        f"({meta['prompt_tokens_avg']:.0f} tokens avg, answers {meta['answer_tokens_avg']:.0f})"
    )
    report.step(
        ("shapes",),
        lambda: (None, {s: count_parameters(build_config(s, tokenizer)) for s in args.shapes}),
    )
    for shape in decode_shapes:
        decode_shape(report, shape, tokenizer, rows, sentences, 9 * args.batch_sentences, device, dtype)
        free_memory()
    if not args.skip_qlora:
        report.step(("qlora",), lambda: qlora_step(build_config(qlora_shape, tokenizer), device))
    report.step(("vllm",), lambda: vllm_step(build_config(vllm_shape, tokenizer), tokenizer, rows, sentences, device))

    print()
    print(meta["note"])
    print()
    print(table(report.results))
    failed = report.results["failed"]
    report.log(f"results in {report.path}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
