"""How fast a small model learns to copy text it has never seen, by alphabet size and setup.

Trains a randomly initialised tiny Qwen2 on copy records (the symbol strategy's ``原文``
prompt, spacy_medllm.training.copy_data) of random strings drawn from the N most frequent
CMeEE characters, and prints, per N and variant, the answer loss and the share of unseen
strings that free greedy generation copies exactly at each evaluation. The embedded model's
copy stage depends on this: a character-level model has thousands of characters to copy.
A variant is ``tied`` or ``untied`` (input embedding shared with the output layer or not)
and ``chatml`` or ``plain`` (the ChatML prompt, or no role markers between the source and
its copy: configs/templates/chat_plain.jinja with copy_plain.zh.jinja).

    python benchmarks/copy_learning.py --alphabets 2000 --hidden 192 --layers 3 --steps 3000 \
        --lengths 16 32 --variants untied-plain tied-plain
    python benchmarks/copy_learning.py --alphabets 2000 --start-alphabet 20 --steps 6000   # a curriculum
"""
import argparse
import json
import random
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("untied-chatml", "tied-chatml", "tied-plain", "untied-plain")


def run(alphabet, steps, hidden, layers, seed, workdir, start_alphabet=0, variant="untied-chatml", lengths=(4, 12)):
    import torch

    from spacy_medllm.llm.loader import ModelSpec, clear_cache
    from spacy_medllm.llm.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_model
    from spacy_medllm.strategies.symbol import SymbolStrategy
    from spacy_medllm.training.copy_data import CopyEvaluator, copy_records
    from spacy_medllm.training.sft import SFTConfig, SFTModel, train_sft
    from spacy_medllm.training.sft_data import GoldText

    torch.set_num_threads(1)
    rng = random.Random(seed)

    def string(chars=alphabet):
        return "".join(rng.choice(chars) for _ in range(rng.randint(*lengths)))

    tie, layout = variant.split("-")
    templates = ROOT / "configs" / "templates"
    strategy = SymbolStrategy(str(templates / ("copy_plain.zh.jinja" if layout == "plain" else "symbol_tiny.zh.jinja")))
    tokenizer = build_char_tokenizer("".join(alphabet) + "原文随机：[]")
    if layout == "plain":
        tokenizer.chat_template = (templates / "chat_plain.jinja").read_text(encoding="utf8")
    config = TinyModelConfig(
        hidden=hidden, layers=layers, heads=4, kv_heads=2, intermediate=2 * hidden, seed=seed, tie_embeddings=tie == "tied"
    )
    base = workdir / "base"
    build_tiny_model(tokenizer, config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    evaluator = CopyEvaluator([string() for _ in range(50)], strategy)
    # a curriculum: the first half of the steps copies strings of the start alphabet only
    phases = [(alphabet[:start_alphabet], steps // 2), (alphabet, steps - steps // 2)] if start_alphabet else [(alphabet, steps)]
    losses, exact, done = [], {}, 0
    for i, (chars, n) in enumerate(phases):
        records = copy_records([GoldText(string(chars), (), "r") for _ in range(16 * n)], strategy)
        settings = SFTConfig(
            learning_rate=2e-3, batch_size=16, max_steps=n, warmup_ratio=0.02, num_threads=1, progress_bar=False,
            log_every=max(1, steps // 6), cutoff_len=128, eval_every=max(1, steps // 3), score_key="copy_exact",
        )
        model = SFTModel(base=ModelSpec(path=str(base), dtype="float32", attn_implementation="eager"), method="full")
        result = train_sft(model, records, settings, workdir / f"out{i}", evaluate=evaluator)
        clear_cache()
        base = result.model_last
        losses += result.losses
        exact.update({done + e["step"]: e["eval"]["copy_exact"] for e in result.state.evaluations})
        done += n
    window = max(1, steps // 6)
    return {
        "loss": [round(sum(losses[i : i + window]) / len(losses[i : i + window]), 3) for i in range(0, steps, window)],
        "copy_exact": exact,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alphabets", type=int, nargs="+", default=[20, 200, 2000])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lengths", type=int, nargs=2, default=[4, 12], metavar=("MIN", "MAX"), help="string lengths")
    parser.add_argument("--variants", nargs="+", default=["untied-chatml"], choices=VARIANTS)
    parser.add_argument("--start-alphabet", type=int, default=0, help="curriculum: the first half of the steps copies only this many characters")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cmeee" / "CMeEE_train.json")
    args = parser.parse_args()
    counts = Counter("".join(d["text"] for d in json.loads(args.data.read_text(encoding="utf8"))))
    ranked = [ch for ch, _ in counts.most_common()]
    rows = []
    for n in args.alphabets:
        for variant in args.variants:
            with tempfile.TemporaryDirectory() as tmp:
                result = run(ranked[:n], args.steps, args.hidden, args.layers, args.seed, Path(tmp), args.start_alphabet, variant, args.lengths)
                rows.append((n, variant, result))
    print(f"tiny Qwen2 (hidden {args.hidden}, {args.layers} layers), batch 16, lr 2e-3, {args.steps} steps, "
          f"random strings of {args.lengths[0]}-{args.lengths[1]} characters; 50 unseen strings per evaluation"
          + (f"; the first {args.steps // 2} steps copy only the {args.start_alphabet} most frequent characters" if args.start_alphabet else ""))
    print("| alphabet | variant | answer loss by sixth of training | exact copies of unseen strings, by step |")
    print("|---|---|---|---|")
    for n, variant, row in rows:
        exact = ", ".join(f"{step}: {value:.2f}" for step, value in row["copy_exact"].items())
        print(f"| {n} | {variant} | {' → '.join(str(x) for x in row['loss'])} | {exact} |")


if __name__ == "__main__":
    main()
