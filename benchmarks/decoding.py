"""Decoding benchmark for the symbol strategy: plain greedy vs copy-constrained decoding.

    python benchmarks/decoding.py [--sentences N] [--model embedded|random|DIR [--template FILE]]
                                  [--batch-sentences K] [--threads T] [--repeat R] [--answers FILE]

For N CMeEE dev sentences (assets/cmeee_dev.json) it builds the 9 per-type symbol prompts
and decodes them four ways, with at most 9K rows per model call in every mode:

(a) plain Hugging Face ``generate``, greedy, unconstrained, in batches of K sentences;
(b) copy-constrained greedy, one token per row and pass, in batches of K sentences;
(c) (b) + speculative verification with the rest of the source as the draft, rows
    joining the running batch as others finish (continuous batching);
(d) (c) + the shared prompt prefix (the part common to all prompts once, each sentence
    once) computed once and its KV cache copied to the rows.

By default the model is the shipped tiny checkpoint (``--model embedded``, prompted with the
template it was tuned with, its ``prompt_template.jinja``); ``--model DIR`` loads another
trained checkpoint (``--template FILE`` when its directory carries none), ``--model
random`` builds a random tiny character-level Qwen2 (``--hidden``/``--layers``). Under the
constraint a random model's brackets fall anywhere, so its drafts are rejected every few
tokens: the worst case for speculation. ``--overfit-steps K`` first trains the model on the
gold answers of the benchmark's own sentences, a stand-in for a model that copies and
brackets only entities (a speed measurement, not a quality one; it takes minutes).

A random model stops whenever it likes, so for ``random`` (a) gets
``min_new_tokens = max_new_tokens`` = the longest constrained answer of the batch: plain
greedy then produces as many tokens as the constrained answers need. With a trained
model (a) gets ``max_new_tokens = len(prefix) + 2*len(source) + 8`` and stops at EOS.

Passes are counted with a forward pre-hook on the model: "calls" are model invocations (a
batched call counts once), "row passes" count each call once per row in it while that
row is unfinished (the ``GenerationResult.forward_passes`` of the runtime), "positions"
are the token positions the model computed, padding included (the compute a CPU pays
for); "waste" the share of them that is padding or a draft token after the first rejected
one (per mode on its own line, with the masked cache columns the rows attend to);
"xfer/pass" the constrained decoder's host<->device transfers per model call (counted at
:mod:`spacy_medllm.llm.copy.transfer`, as they would be on a GPU). Torch uses
``--threads`` threads (default: its own default, every core); each mode
runs ``--repeat`` times, round-robin, and its fastest wall time counts. The last line is
machine-readable:
``passes_ratio=<a/d model calls> wall_ratio=<a/d> identical=<b==c==d> aligned=<share of (d)>``.
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from spacy_medllm.llm.copy import (  # noqa: E402
    CopyAutomaton,
    DecodeStats,
    count_forward_passes,
    count_transfers,
    decode_constrained,
    forward_module,
)


class count_positions:
    """Token positions (padding included) the model computes inside the block."""

    def __init__(self, model):
        self.model, self.total = model, 0

    def __enter__(self):
        def hook(_module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.total += ids.numel() if ids is not None else 0

        self.handle = forward_module(self.model).register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def load_model(path, hidden=256, layers=4):
    """A trained checkpoint (``path``; ``embedded``: the shipped tiny model) or, for
    ``random``, a random tiny char-level Qwen2 built here."""
    if path != "random":
        from spacy_medllm.llm.loader import ModelSpec, load_lm

        lm = load_lm(ModelSpec(path=path, device="cpu"))  # the loader resolves "embedded"
        return lm.model.eval(), lm.tokenizer, f"checkpoint {path}"
    from spacy_medllm.llm.tiny import (
        TinyModelConfig,
        build_char_tokenizer,
        build_tiny_model,
        read_corpus_text,
    )

    tokenizer = build_char_tokenizer(read_corpus_text(sorted((ROOT / "assets").glob("cmeee_*.json"))))
    config = TinyModelConfig(hidden=hidden, layers=layers, intermediate=2 * hidden)
    model = build_tiny_model(tokenizer, config).eval()
    n = sum(p.numel() for p in model.parameters())
    return model, tokenizer, f"random tiny char-level Qwen2 ({n / 1e6:.1f}M parameters, {config})"


def checkpoint_template(path):
    """The prompt template a checkpoint was tuned with (``prompt_template.jinja`` in its
    directory), or None: the strategy's builtin one."""
    if path == "random":
        return None
    from spacy_medllm.llm.loader import MODEL_TEMPLATE_FILE
    from spacy_medllm.embedded import resolve_model_path

    found = resolve_model_path(path) / MODEL_TEMPLATE_FILE
    return str(found) if found.exists() else None


def build_rows(examples, tokenizer, template=None):
    """Per sentence the 9 symbol prompts (type last), token ids, constraints, gold answers."""
    from spacy_medllm.labels import get_scheme
    from spacy_medllm.strategies.symbol import SymbolStrategy
    from spacy_medllm.types import Mention

    strategy, scheme = SymbolStrategy(template=template), get_scheme("cmeee")
    rows = []
    for eg in examples:
        text = eg["text"]
        gold = [
            Mention(e["type"], e["entity"], e["start_idx"], e["end_idx"] + 1)
            for e in eg["entities"]
            if e["start_idx"] <= e["end_idx"] and text[e["start_idx"] : e["end_idx"] + 1] == e["entity"]
        ]
        for prompt in strategy.prompts(text, scheme):
            ids = tokenizer(prompt.chat_text(tokenizer), add_special_tokens=False).input_ids
            constraint = strategy.copy_constraint(text, prompt)
            answer = strategy.render_target(text, gold, prompt)
            rows.append({"text": text, "prompt": prompt, "ids": ids, "constraint": constraint, "gold": answer})
    return strategy, rows


def overfit(model, tokenizer, rows, eos, steps, lr=3e-3):
    """Train ``model`` on the gold answers of the benchmark's own prompts (full batch,
    AdamW): a stand-in for a well fine-tuned model, one that copies the sentence and
    brackets the entities, so that speculation is measured where it matters. Not a
    quality measurement: the model has seen these very answers."""
    batch = []
    for r in rows:
        answer = tokenizer(r["gold"], add_special_tokens=False).input_ids + [eos[0]]
        batch.append((r["ids"], answer))
    width = max(len(p) + len(a) for p, a in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100)
    mask = torch.zeros_like(ids)
    for k, (p, a) in enumerate(batch):
        ids[k, : len(p) + len(a)] = torch.tensor(p + a)
        mask[k, : len(p) + len(a)] = 1
        labels[k, len(p) : len(p) + len(a)] = torch.tensor(a)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return float(loss.detach()), time.perf_counter() - start


def run_constrained(model, tokenizer, rows, eos, batch_rows, **options):
    stats = DecodeStats()
    start = time.perf_counter()
    with count_forward_passes(model) as calls, count_positions(model) as positions, count_transfers() as transfers:
        out = decode_constrained(
            model,
            tokenizer,
            [r["ids"] for r in rows],
            [r["constraint"] for r in rows],
            eos_token_ids=eos,
            batch_size=batch_rows,
            stats=stats,
            **options,
        )
    seconds = time.perf_counter() - start
    assert calls[0] == stats.forward_passes and positions.total == stats.positions
    return {
        "tokens": [o.token_ids for o in out],
        "texts": [o.text for o in out],
        "calls": calls[0],
        "positions": positions.total,
        "row_passes": sum(o.forward_passes for o in out),
        "generated": stats.generated_tokens,
        "seconds": seconds,
        "accepted": stats.accepted_tokens,
        "drafted": stats.draft_tokens,
        "transfers": transfers[0],
        "padding": 0,  # a pass packs its rows' blocks: no position is padding
        "rejected": stats.draft_tokens - stats.accepted_tokens,
        "holes": stats.hole_columns / stats.key_columns if stats.key_columns else 0.0,
    }


def run_plain(model, tokenizer, rows, eos, batch_rows, budgets, forced):
    """Plain HF greedy ``generate`` per batch (left-padded); ``forced``: min = max tokens."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    texts, calls_total, positions_total, row_passes, generated, seconds, fed = [], 0, 0, 0, 0, 0.0, 0
    for lo in range(0, len(rows), batch_rows):
        chunk = rows[lo : lo + batch_rows]
        width = max(len(r["ids"]) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, r in enumerate(chunk):
            ids[k, width - len(r["ids"]) :] = torch.tensor(r["ids"])
            mask[k, width - len(r["ids"]) :] = 1
        budget = max(budgets[lo : lo + batch_rows])
        start = time.perf_counter()
        with torch.inference_mode(), count_forward_passes(model) as calls, count_positions(model) as positions:
            out = model.generate(
                input_ids=ids.to(model.device),
                attention_mask=mask.to(model.device),
                do_sample=False,
                max_new_tokens=budget,
                min_new_tokens=budget if forced else 0,
                eos_token_id=eos,
                pad_token_id=pad,
            )
        seconds += time.perf_counter() - start
        calls_total += calls[0]
        positions_total += positions.total
        for k in range(len(chunk)):
            new = out[k, width:].tolist()
            ends = [i for i, t in enumerate(new) if t in eos]
            n = ends[0] + 1 if ends else len(new)
            generated += n
            row_passes += n
            fed += len(chunk[k]["ids"]) + n - 1  # the prompt and every generated token but the last
            texts.append(tokenizer.decode(new[: ends[0]] if ends else new, skip_special_tokens=True))
    return {
        "texts": texts,
        "calls": calls_total,
        "positions": positions_total,
        "row_passes": row_passes,
        "generated": generated,
        "seconds": seconds,
        "transfers": None,  # transformers' own loop, not instrumented
        "padding": positions_total - fed,  # left padding and the steps of rows that had stopped
        "rejected": 0,
        "holes": None,
    }


def aligned_share(strategy, rows, texts):
    """Parsed (exactly aligned) mentions over bracket pairs stated in the responses; None
    when no response states any."""
    stated = found = 0
    for row, response in zip(rows, texts):
        result = strategy.parse(row["text"], response, row["prompt"])
        stated += max(response.count("["), response.count("]"))
        found += len(result.mentions)
    return found / stated if stated else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=20, help="CMeEE dev sentences (9 prompts each)")
    parser.add_argument(
        "--model", default="embedded", help="checkpoint directory, 'embedded' (the shipped tiny model) or 'random'"
    )
    parser.add_argument(
        "--template", default=None, help="prompt template (default: the checkpoint's prompt_template.jinja)"
    )
    parser.add_argument("--batch-sentences", type=int, default=2, help="sentences (x9 rows) per model call, all modes")
    parser.add_argument("--max-draft", type=int, default=32, help="most draft tokens per speculative pass")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, every core)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per mode; the fastest wall time counts")
    parser.add_argument("--max-chars", type=int, default=120, help="skip longer sentences")
    parser.add_argument(
        "--answers", type=Path, help="write (d)'s answer per prompt as JSON lines, to compare two versions of the decoder"
    )
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the random tiny model")
    parser.add_argument("--layers", type=int, default=4, help="layers of the random tiny model")
    parser.add_argument(
        "--overfit-steps", type=int, default=0, help="first train the model on these sentences' gold answers"
    )
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, described = load_model(args.model, args.hidden, args.layers)
    template = args.template or checkpoint_template(args.model)
    data = json.loads((ROOT / "assets" / "cmeee_dev.json").read_text(encoding="utf8"))
    examples = [d for d in data if 0 < len(d["text"]) <= args.max_chars][: args.sentences]
    texts = [eg["text"] for eg in examples]
    strategy, rows = build_rows(examples, tokenizer, template)
    from spacy_medllm.llm.generation import stop_token_ids

    eos = stop_token_ids(tokenizer, model.generation_config)
    if args.overfit_steps:
        loss, seconds = overfit(model, tokenizer, rows, eos, args.overfit_steps)
        described += (
            f", then overfit on these sentences' gold answers ({args.overfit_steps} steps, {seconds:.0f} s, "
            f"final loss {loss:.4f})"
        )
    batch_rows = 9 * args.batch_sentences
    n = len(texts)
    print(f"model: {described}")
    print(
        f"torch threads: {torch.get_num_threads()}; {n} sentences ({sum(map(len, texts)) / n:.1f} chars avg), "
        f"{len(rows)} prompts ({sum(len(r['ids']) for r in rows) / len(rows):.0f} tokens avg), "
        f"at most {batch_rows} rows ({args.batch_sentences} sentences) per call, max draft {args.max_draft}"
    )
    # Warm-up so that lazy imports and first-call kernel set-up count in no mode.
    run_constrained(model, tokenizer, rows[:2], eos, batch_rows, speculative=True, share_prefix=True)
    with torch.inference_mode():
        model.generate(input_ids=torch.tensor([rows[0]["ids"]]), max_new_tokens=2, do_sample=False, pad_token_id=eos[0])

    trained = args.model != "random" or bool(args.overfit_steps)
    modes = {
        "b": lambda: run_constrained(model, tokenizer, rows, eos, batch_rows, speculative=False, share_prefix=False),
        "c": lambda: run_constrained(
            model, tokenizer, rows, eos, batch_rows, speculative=True, share_prefix=False, max_draft=args.max_draft
        ),
        "d": lambda: run_constrained(
            model, tokenizer, rows, eos, batch_rows, speculative=True, share_prefix=True, max_draft=args.max_draft
        ),
    }
    results = {key: modes[key]() for key in "bcd"}
    if trained:
        budgets = [len(r["constraint"].forced_prefix) + 2 * len(r["text"]) + 8 for r in rows]
    else:
        budgets = [len(t) for t in results["b"]["tokens"]]
    modes["a"] = lambda: run_plain(model, tokenizer, rows, eos, batch_rows, budgets, forced=not trained)
    results["a"] = modes["a"]()
    # Repeats (round-robin over the modes) keep each mode's fastest wall time: the
    # machine is shared, and the slowest runs measure the neighbours, not the decoder.
    for _ in range(args.repeat - 1):
        for key in "abcd":
            results[key]["seconds"] = min(results[key]["seconds"], modes[key]()["seconds"])

    identical = results["b"]["tokens"] == results["c"]["tokens"] == results["d"]["tokens"]
    for r in results["b"]["texts"], results["c"]["texts"], results["d"]["texts"]:
        valid = all(
            CopyAutomaton(row["constraint"]).advance_bytes(CopyAutomaton(row["constraint"]).initial, t.encode("utf8"))
            for row, t in zip(rows, r)
        )
        assert valid, "a constrained answer left the constraint"
    a = results["a"]
    names = {
        "a": "(a) HF generate greedy",
        "b": "(b) constrained greedy",
        "c": "(c) + speculative",
        "d": "(d) + shared prefix",
    }
    header = (
        f"{'mode':<24}{'calls/sent':>11}{'row-pass/sent':>14}{'positions/sent':>15}{'gen tok/sent':>13}{'s/sent':>8}"
        f"{'sent/s':>8}{'calls a/x':>10}{'rowpass a/x':>12}{'wall a/x':>9}{'same as b':>10}{'aligned':>9}"
        f"{'xfer/pass':>10}{'waste':>7}"
    )
    print(header)
    print("-" * len(header))
    shares = {}
    for key in "abcd":
        r = results[key]
        share = aligned_share(strategy, rows, r["texts"])
        shares[key] = "n/a" if share is None else f"{share:.3f}"
        same = "-" if key in "ab" else str(r["tokens"] == results["b"]["tokens"]).lower()
        print(
            f"{names[key]:<24}{r['calls'] / n:>11.1f}{r['row_passes'] / n:>14.1f}{r['positions'] / n:>15.0f}"
            f"{r['generated'] / n:>13.1f}"
            f"{r['seconds'] / n:>8.3f}{n / r['seconds']:>8.2f}{a['calls'] / r['calls']:>10.2f}"
            f"{a['row_passes'] / r['row_passes']:>12.2f}{a['seconds'] / r['seconds']:>9.2f}{same:>10}"
            f"{shares[key]:>9}{'-' if r['transfers'] is None else format(r['transfers'] / r['calls'], '.2f'):>10}"
            f"{(r['padding'] + r['rejected']) / r['positions']:>7.1%}"
        )
    for key in "cd":
        r = results[key]
        print(f"{names[key]}: {r['accepted']} of {r['drafted']} draft tokens accepted")
    for key in "abcd":
        r = results[key]
        holes = "" if r["holes"] is None else f"; masked holes {r['holes']:.1%} of the key columns attended"
        print(
            f"{names[key]} waste: padding {r['padding'] / r['positions']:.1%}, "
            f"post-bracket drafts {r['rejected'] / r['positions']:.1%} of positions{holes}"
        )
    d = results["d"]
    if args.answers:
        with args.answers.open("w", encoding="utf8") as out:
            for row, text in zip(rows, d["texts"]):
                out.write(json.dumps({"text": row["text"], "answer": text}, ensure_ascii=False) + "\n")
    print(
        f"passes_ratio={a['calls'] / d['calls']:.2f} wall_ratio={a['seconds'] / d['seconds']:.2f} "
        f"identical={str(identical).lower()} aligned={shares['d']}"
    )


if __name__ == "__main__":
    main()
