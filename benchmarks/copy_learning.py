"""How fast a small model learns to copy text it has never seen, by alphabet size.

Trains a randomly initialised tiny Qwen2 on copy records (the symbol strategy's ``原文``
prompt, spacy_medllm.training.copy_data) of random strings drawn from the N most frequent
CMeEE characters, and prints, per N, the answer loss and the share of unseen strings that
free greedy generation copies exactly at each evaluation. The embedded model's copy stage
depends on this: a character-level model has thousands of characters to copy.

    python benchmarks/copy_learning.py                      # alphabets 20, 200, 2000
    python benchmarks/copy_learning.py --alphabets 20 2000 --steps 1800 --hidden 128
    python benchmarks/copy_learning.py --alphabets 2000 --start-alphabet 20 --steps 6000   # a curriculum
"""
import argparse
import json
import random
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(alphabet, steps, hidden, layers, seed, workdir, start_alphabet=0):
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
        return "".join(rng.choice(chars) for _ in range(rng.randint(4, 12)))

    strategy = SymbolStrategy(str(ROOT / "configs" / "templates" / "symbol_tiny.zh.jinja"))
    tokenizer = build_char_tokenizer("".join(alphabet) + "原文随机：[]")
    config = TinyModelConfig(hidden=hidden, layers=layers, heads=4, kv_heads=2, intermediate=2 * hidden, seed=seed)
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
    parser.add_argument("--start-alphabet", type=int, default=0, help="curriculum: the first half of the steps copies only this many characters")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cmeee" / "CMeEE_train.json")
    args = parser.parse_args()
    counts = Counter("".join(d["text"] for d in json.loads(args.data.read_text(encoding="utf8"))))
    ranked = [ch for ch, _ in counts.most_common()]
    rows = []
    for n in args.alphabets:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append((n, run(ranked[:n], args.steps, args.hidden, args.layers, args.seed, Path(tmp), args.start_alphabet)))
    print(f"tiny Qwen2 (hidden {args.hidden}, {args.layers} layers), batch 16, lr 2e-3, {args.steps} steps, "
          "random strings of 4-12 characters; 50 unseen strings per evaluation"
          + (f"; the first {args.steps // 2} steps copy only the {args.start_alphabet} most frequent characters" if args.start_alphabet else ""))
    print("| alphabet | answer loss by sixth of training | exact copies of unseen strings, by step |")
    print("|---|---|---|")
    for n, row in rows:
        exact = ", ".join(f"{step}: {value:.2f}" for step, value in row["copy_exact"].items())
        print(f"| {n} | {' → '.join(str(x) for x in row['loss'])} | {exact} |")


if __name__ == "__main__":
    main()
